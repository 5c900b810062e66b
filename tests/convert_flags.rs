//! `convert` flags not covered by convert_cli.rs, each against qemu-img on the same input:
//! `--progress[=json]`, SIGUSR1, `-r`, `--image-opts`/`--target-image-opts`, `-U`, `-t`/`-T`.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn map(dir: &Path, file: &str) -> String {
    stdout(&ok(qemu_img(dir, &["map", "--output=json", file])))
}

/// A 4 MiB qcow2 image with data at 0, 1 MiB and 3 MiB (holes between).
fn qcow2_src(d: &Path, name: &str) {
    ok(qemu_img(d, &["create", "-q", "-f", "qcow2", name, "4M"]));
    ok(qemu_io(
        d,
        "qcow2",
        name,
        &[
            "write -P 0x5a 0 256k",
            "write -P 0xa5 1M 64k",
            "write -P 0x33 3M 512k",
        ],
    ));
}

/// Runs `args` with qemu-img when the last argument (the output) starts with `q`, with
/// diskit otherwise.
fn by_output_name(d: &Path, args: &[&str]) -> std::process::Output {
    if args.last().is_some_and(|o| o.starts_with('q')) {
        qemu_img(d, args)
    } else {
        diskit(d, args)
    }
}

/// `qemu-img compare` of two images (exit 0: identical guest content).
fn same_content(d: &Path, a: &str, b: &str) {
    ok(qemu_img(d, &["compare", a, b]));
}

#[test]
fn progress_json_lines() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    mixed_raw(d, "src.raw", 16 << 20);
    // the total is what qemu-img's progress counts: the source's data
    let m: serde_json::Value = serde_json::from_str(&map(d, "src.raw")).unwrap();
    let data: u64 = m
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(data > 0 && data < 16 << 20);
    for flag in ["--progress=json", "--progress-json"] {
        let out = ok(diskit(
            d,
            &[
                "convert", flag, "-f", "raw", "-O", "qcow2", "src.raw", "o.qcow2",
            ],
        ));
        let text = stdout(&out);
        let mut last_done = 0u64;
        let mut lines = 0;
        let mut last = None;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{flag}: line {line:?} is not JSON: {e}"));
            let done = v["done"].as_u64().expect("done");
            let total = v["total"].as_u64().expect("total");
            let elapsed = v["elapsed"].as_f64().expect("elapsed");
            assert!(elapsed >= 0.0, "{line}");
            // the same total on every line, the first one included
            assert_eq!(total, data, "{flag}: {line}");
            assert!(done >= last_done, "{flag}: done went back: {text}");
            assert!(done <= total, "{line}");
            last_done = done;
            lines += 1;
            last = Some((done, total));
        }
        assert!(lines >= 2, "{flag}: {text:?}");
        let (done, total) = last.unwrap();
        assert_eq!(done, total, "{flag}: last line {text}");
        assert!(text.starts_with("{\"done\": 0, "), "{text}");
        same_content(d, "src.raw", "o.qcow2");
        std::fs::remove_file(d.join("o.qcow2")).unwrap();
    }
    // -q silences it, as it silences -p
    let out = ok(diskit(
        d,
        &["convert", "-q", "--progress=json", "src.raw", "o.raw"],
    ));
    assert_eq!(stdout(&out), "");
}

#[test]
fn progress_long_form_is_dash_p() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    mixed_raw(d, "src.raw", 8 << 20);
    // a bare --progress does not take the next word (the source) as its value
    for flags in [&["--progress"][..], &["--progress=text"], &["-p"]] {
        let mut args = vec!["convert"];
        args.extend_from_slice(flags);
        args.extend(["src.raw", "o.raw"]);
        let out = ok(diskit(d, &args));
        let text = stdout(&out);
        assert!(text.starts_with("    (0.00/100%)\r"), "{flags:?}: {text:?}");
        assert!(
            text.ends_with("    (100.00/100%)\r\n"),
            "{flags:?}: {text:?}"
        );
        same_content(d, "src.raw", "o.raw");
        std::fs::remove_file(d.join("o.raw")).unwrap();
    }
    // (qemu-img 10.0.2 lists --progress in its help but does not accept it): its -p ends
    // the same way and copies the same image
    let q = ok(qemu_img(d, &["convert", "-p", "src.raw", "q.raw"]));
    assert!(
        stdout(&q).ends_with("    (100.00/100%)\r\n"),
        "{:?}",
        stdout(&q)
    );
    same_content(d, "src.raw", "q.raw");
    // -p combines with other short flags as before
    let out = ok(diskit(d, &["convert", "-p", "-q", "src.raw", "o.raw"]));
    assert_eq!(stdout(&out), "");
    for bad in ["--progress=bogus", "--progress="] {
        let out = diskit(d, &["convert", bad, "src.raw", "b.raw"]);
        assert_eq!(out.status.code(), Some(1), "{bad}");
        let err = stderr(&out);
        assert!(
            err.starts_with("diskit: Invalid progress output specified: '")
                && err.contains("'text' and 'json'"),
            "{bad}: {err}"
        );
        assert!(!d.join("b.raw").exists(), "{bad} created the target");
    }
}

/// Is a handler for SIGUSR1 installed in process `pid` (SigCgt in /proc/PID/status)?
fn catches_sigusr1(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGUSR1 - 1)) != 0)
}

/// Runs `prog args` (in `d`), sends SIGUSR1 once it catches the signal and while it runs;
/// returns (exit code, stderr, whether the signal was sent before the end).
fn convert_with_sigusr1(d: &Path, prog: &Path, args: &[&str]) -> (Option<i32>, String, bool) {
    let child = Command::new(prog)
        .args(args)
        .current_dir(d)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if catches_sigusr1(pid) {
            // SAFETY: signalling our own child, which has a handler installed
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
            sent = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), stderr(&out), sent)
}

fn is_progress_line(l: &str) -> bool {
    let Some(inner) = l
        .strip_prefix("    (")
        .and_then(|r| r.strip_suffix("/100%)"))
    else {
        return false;
    };
    let Some((int, frac)) = inner.split_once('.') else {
        return false;
    };
    !int.is_empty()
        && int.chars().all(|c| c.is_ascii_digit())
        && frac.len() == 2
        && frac.chars().all(|c| c.is_ascii_digit())
        && inner
            .parse::<f64>()
            .is_ok_and(|v| (0.0..=100.0).contains(&v))
}

#[test]
fn sigusr1_prints_progress_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("src.raw"), pattern(4 << 20, 7)).unwrap();
    // -r 2M: diskit takes about 2 s for 4 MiB, qemu-img about 1 s (it lets a burst through)
    let args = ["convert", "-r", "2M", "-f", "raw", "-O", "raw", "src.raw"];
    let run = |prog: &Path, target: &str| {
        let mut a = args.to_vec();
        a.push(target);
        let (code, err, sent) = convert_with_sigusr1(d, prog, &a);
        assert!(sent, "{prog:?} never installed a SIGUSR1 handler");
        assert_eq!(code, Some(0), "{prog:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{prog:?}: one progress line: {err:?}");
        assert!(is_progress_line(lines[0]), "{prog:?}: {err:?}");
        same_content(d, "src.raw", target);
    };
    run(Path::new("/usr/bin/qemu-img"), "q.raw");
    run(&diskit_bin(), "o.raw");
}

#[test]
fn rate_limit_copies_slowly_and_rejects_bad_rates_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("src.raw"), pattern(4 << 20, 8)).unwrap();
    let t = Instant::now();
    let out = diskit(
        d,
        &[
            "convert", "-r", "2M", "-f", "raw", "-O", "raw", "src.raw", "o.raw",
        ],
    );
    let took = t.elapsed();
    ok(out);
    same_content(d, "src.raw", "o.raw");
    // 4 MiB at 2 MiB/s: about 2 s; qemu-img lets about 2 MiB through at once (~1 s):
    // a generous lower bound both meet
    assert!(
        took >= Duration::from_millis(750),
        "-r 2M copied 4 MiB in {took:?}"
    );
    // through qcow2 too, content and allocation as qemu-img's
    qcow2_src(d, "a.qcow2");
    let (q, k) = same_effect_as_qemu(
        d,
        &["a.qcow2"],
        &["convert", "-r", "64M", "-O", "qcow2", "a.qcow2", "o.qcow2"],
    );
    same_content(&k, "a.qcow2", "o.qcow2");
    assert_eq!(map(&q, "o.qcow2"), map(&k, "o.qcow2"));
    // 0 is no limit; bad rates: same text and exit code (a tiny source, in case one is
    // taken as a low rate)
    std::fs::write(d.join("small.raw"), pattern(4096, 9)).unwrap();
    for r in [
        "0",
        "abc",
        "-5",
        "",
        "1x",
        "-1k",
        "-1.5",
        "-0x10",
        "-",
        "-0",
        "0x10k",
        "0x1.5",
        "0x",
        "9223372036854775808",
        "8E",
    ] {
        same_as_qemu(d, &["convert", "-r", r, "small.raw", "e.raw"]);
        let _ = std::fs::remove_file(d.join("e.raw"));
    }
    let out = same_as_qemu(d, &["convert", "-r", "-5", "src.raw", "e.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Invalid rate limit specified"));
}

#[test]
fn image_opts_sources_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    qcow2_src(d, "a.qcow2");
    std::fs::write(d.join("r.raw"), pattern(1 << 20, 4)).unwrap();
    std::fs::write(d.join("c,d.raw"), pattern(64 << 10, 5)).unwrap();
    // accepted specifications: same content and allocation of the target
    for (spec, fmt) in [
        ("driver=qcow2,file.filename=a.qcow2", "raw"),
        (
            "driver=qcow2,file.driver=file,file.filename=a.qcow2",
            "qcow2",
        ),
        ("file.filename=a.qcow2", "raw"),
        ("driver=raw,file.filename=a.qcow2", "raw"),
        ("driver=file,filename=a.qcow2", "raw"),
        ("driver=qcow2,file.filename=a.qcow2,driver=raw", "raw"),
        ("driver=qcow2,file.filename=a.qcow2,", "raw"),
        ("driver=qcow2,file.filename=a.qcow2,read-only=on", "raw"),
        ("driver=raw,file.filename=c,,d.raw", "qcow2"),
    ] {
        let args = ["convert", "--image-opts", spec, "-O", fmt, "o.img"];
        let (q, k) = same_effect_as_qemu(d, &["a.qcow2", "c,d.raw"], &args);
        assert!(
            qemu_raw(&q, "o.img", Some(fmt)) == qemu_raw(&k, "o.img", Some(fmt)),
            "{spec}"
        );
        assert_eq!(map(&q, "o.img"), map(&k, "o.img"), "{spec}");
    }
    // concatenating two specifications
    let (q, k) = same_effect_as_qemu(
        d,
        &["a.qcow2", "r.raw"],
        &[
            "convert",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "driver=raw,file.driver=file,file.filename=r.raw",
            "o.raw",
        ],
    );
    assert_eq!(
        std::fs::read(q.join("o.raw")).unwrap(),
        std::fs::read(k.join("o.raw")).unwrap()
    );
    // malformed or unsupported specifications: same text and exit code, no target
    for spec in [
        "",
        "=x",
        "a.qcow2",
        "driver",
        "driver=",
        "file=a.qcow2",
        "filename=a.qcow2",
        "driver=qcow2",
        "driver=nope,file.filename=a.qcow2",
        "driver=qcow2,,file.filename=a.qcow2",
        "driver=qcow2,file.driver=nope,file.filename=a.qcow2",
        "driver=qcow2,file.driver=raw,file.filename=a.qcow2",
        "driver=qcow2,file.filename=",
        "driver=qcow2,file.filename=missing.qcow2",
        "driver=qcow2,file.filename=a.qcow2,bogus=1",
        "driver=qcow2,file.filename=a.qcow2,file.bogus=1",
        "driver=file,filename=a.qcow2,bogus=1",
        "driver=file,file.filename=a.qcow2",
        "driver=qcow2,file.driver=file,filename=a.qcow2",
        "driver=qcow2,file.filename=r.raw",
    ] {
        let out = same_as_qemu(d, &["convert", "--image-opts", spec, "e.raw"]);
        assert_eq!(out.status.code(), Some(1), "{spec}");
        assert!(!d.join("e.raw").exists(), "{spec}");
    }
    for args in [
        &[
            "convert",
            "--image-opts",
            "-f",
            "qcow2",
            "driver=qcow2,file.filename=a.qcow2",
            "e.raw",
        ][..],
        &[
            "convert",
            "-U",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,force-share=off",
            "e.raw",
        ],
    ] {
        let out = same_as_qemu(d, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
}

#[test]
fn target_image_opts_with_n_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    qcow2_src(d, "a.qcow2");
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "t.qcow2", "4M"],
    ));
    std::fs::write(d.join("t.raw"), pattern(4 << 20, 6)).unwrap();
    let files = ["a.qcow2", "t.qcow2", "t.raw"];
    for (src_args, spec, target) in [
        (
            &["a.qcow2"][..],
            "driver=qcow2,file.filename=t.qcow2",
            "t.qcow2",
        ),
        (
            &["a.qcow2"],
            "driver=qcow2,file.driver=file,file.filename=t.qcow2",
            "t.qcow2",
        ),
        (&["a.qcow2"], "file.filename=t.qcow2", "t.qcow2"),
        (&["a.qcow2"], "driver=raw,file.filename=t.raw", "t.raw"),
        (&["a.qcow2"], "file.filename=t.raw", "t.raw"),
        (&["a.qcow2"], "driver=file,filename=t.raw", "t.raw"),
        (
            &["--image-opts", "driver=qcow2,file.filename=a.qcow2"],
            "driver=raw,file.filename=t.raw",
            "t.raw",
        ),
    ] {
        let mut args = vec!["convert", "-n", "--target-image-opts"];
        args.extend_from_slice(src_args);
        args.push(spec);
        let (q, k) = same_effect_as_qemu(d, &files, &args);
        let fmt = if target.ends_with("qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let a = qemu_raw(&k, target, Some(fmt));
        assert!(a == qemu_raw(&q, target, Some(fmt)), "{args:?}");
        assert!(
            a == qemu_raw(&k, "a.qcow2", None),
            "{args:?}: not the source"
        );
        assert_eq!(map(&q, target), map(&k, target), "{args:?}");
    }
    for args in [
        &[
            "convert",
            "--target-image-opts",
            "a.qcow2",
            "driver=raw,file.filename=t.raw",
        ][..],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "-O",
            "qcow2",
            "a.qcow2",
            "driver=qcow2,file.filename=t.qcow2",
        ],
        &["convert", "-n", "--target-image-opts", "a.qcow2", "t.qcow2"],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "a.qcow2",
            "driver=qcow2",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "a.qcow2",
            "driver=qcow2,file.filename=nope.qcow2",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "a.qcow2",
            "driver=raw,file.filename=t.raw,bogus=2",
        ],
        &[
            "convert",
            "-n",
            "--target-image-opts",
            "a.qcow2",
            "driver=qcow2,file.filename=t.raw",
        ],
    ] {
        let (q, _) = same_effect_as_qemu(d, &files, args);
        assert!(!q.join("nope.qcow2").exists());
        let out = qemu_img(&q, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
}

#[test]
fn force_share_reads_a_busy_image_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    qcow2_src(d, "a.qcow2");
    let expect = qemu_raw(d, "a.qcow2", None);
    let mut child = hold(d, "qcow2", "a.qcow2", false);
    let out = same_as_qemu(d, &["convert", "-O", "raw", "a.qcow2", "o.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "qemu-img: Could not open 'a.qcow2': Failed to get shared \"write\" lock\n\
         Is another process using the image [a.qcow2]?\n"
    );
    // also through an image specification: qemu-img names the specification
    same_as_qemu(
        d,
        &[
            "convert",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "o.raw",
        ],
    );
    for args in [
        &["convert", "-U", "-O", "raw", "a.qcow2", "o.raw"][..],
        &["convert", "-U", "-O", "qcow2", "a.qcow2", "o.raw"],
        &[
            "convert",
            "-U",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "o.raw",
        ],
        &[
            "convert",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,force-share=on",
            "o.raw",
        ],
    ] {
        let q = ok(qemu_img(d, args));
        let q_raw = qemu_raw(d, "o.raw", None);
        let k = ok(diskit_as_qemu(d, args));
        assert_eq!(stderr(&k), stderr(&q), "{args:?}");
        assert!(qemu_raw(d, "o.raw", None) == q_raw, "{args:?}");
        assert!(q_raw == expect, "{args:?}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn cache_modes_copy_correctly_and_reject_bad_modes_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    qcow2_src(d, "a.qcow2");
    mixed_raw(d, "m.raw", 8 << 20);
    for mode in ["none", "writeback", "unsafe", "directsync", "writethrough"] {
        for flag in ["-t", "-T"] {
            for (src, fmt) in [("a.qcow2", "qcow2"), ("m.raw", "raw")] {
                let args = ["convert", flag, mode, "-O", fmt, src, "o.img"];
                let (q, k) = same_effect_as_qemu(d, &[src], &args);
                same_content(&k, src, "o.img");
                assert_eq!(map(&q, "o.img"), map(&k, "o.img"), "{args:?}");
            }
        }
    }
    for args in [
        &["convert", "-t", "bogus", "m.raw", "e.raw"][..],
        &["convert", "-T", "bogus", "m.raw", "e.raw"],
        &["convert", "-t", "", "m.raw", "e.raw"],
        &["convert", "-T", "", "m.raw", "e.raw"],
        &["convert", "-t", "none", "-T", "Writeback", "m.raw", "e.raw"],
        &["convert", "-t", "-x", "m.raw", "e.raw"],
        &["convert", "-T", "bogus", "-t", "bogus", "m.raw", "e.raw"],
    ] {
        let out = same_as_qemu(d, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let _ = std::fs::remove_file(d.join("e.raw"));
    }
}

/// iotest 122's cases: `-c -S 0` compresses every cluster, zero ones included (the whole
/// map is compressed, as qemu-img makes it); `-n` into a compat=0.10 image with a backing
/// file writes zeroes as data (v2 has no zero clusters: left unallocated, the backing file's
/// data would show through).
#[test]
fn compressed_dense_and_n_into_v2_overlay_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "s.qcow2", "8M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "s.qcow2",
        &["write -P 0x22 0 1M", "write -P 0 1M 1M"],
    ));
    for o in ["q.qcow2", "d.qcow2"] {
        ok(by_output_name(
            d,
            &["convert", "-O", "qcow2", "-c", "-S", "0", "s.qcow2", o],
        ));
    }
    same_content(d, "s.qcow2", "d.qcow2");
    assert_eq!(map(d, "d.qcow2"), map(d, "q.qcow2"));
    assert!(map(d, "d.qcow2").contains("\"compressed\": true"));

    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "z.qcow2", "4M"],
    ));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"],
    ));
    ok(qemu_io(d, "qcow2", "base.qcow2", &["write -P 7 0 4M"]));
    for compat in ["1.1", "0.10"] {
        for o in ["qn.qcow2", "dn.qcow2"] {
            let opt = format!("compat={compat}");
            ok(qemu_img(
                d,
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    &opt,
                    "-b",
                    "base.qcow2",
                    "-F",
                    "qcow2",
                    o,
                    "4M",
                ],
            ));
            ok(by_output_name(
                d,
                &["convert", "-O", "qcow2", "-n", "z.qcow2", o],
            ));
        }
        same_content(d, "z.qcow2", "dn.qcow2");
        assert_eq!(map(d, "dn.qcow2"), map(d, "qn.qcow2"), "compat={compat}");
    }
}

/// `-p` counts the data to copy, as qemu-img does (iotest 086): four 1 MiB runs of data in a
/// 128 MiB image print 0, 25, 50, 75 and 100 percent (and 100 once more at the end), line
/// for line qemu-img's.
#[test]
fn progress_counts_the_data_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "p.qcow2", "128M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "p.qcow2",
        &["write 0 1M", "write 2M 1M", "write 4M 1M", "write 32M 1M"],
    ));
    let args = [
        "convert", "-p", "-O", "qcow2", "-f", "qcow2", "p.qcow2", "o.qcow2",
    ];
    let out = same_as_qemu(d, &args);
    assert_eq!(
        stdout(&out),
        "    (0.00/100%)\r    (25.00/100%)\r    (50.00/100%)\r    (75.00/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"
    );
    same_content(d, "p.qcow2", "o.qcow2");
    // an image without data: 0 and 100
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "e.qcow2", "8M"],
    ));
    std::fs::remove_file(d.join("o.qcow2")).unwrap();
    same_as_qemu(d, &["convert", "-p", "-O", "qcow2", "e.qcow2", "o.qcow2"]);
}

/// `-c` on data deflate cannot shrink (random; random 8 KiB repeated, beyond qcow2's 4 KiB
/// window) and on data it can (random 2 KiB repeated; random with short repeats; an
/// executable, diskit's own; text):
/// diskit stores the same clusters compressed as qemu-img, in a file no larger than
/// qemu-img's, that qemu-img checks clean and reads back the same. The same for VMDK stream
/// grains (stored deflate blocks for what deflate cannot shrink).
#[test]
fn compressed_output_skips_incompressible_clusters_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let exe = std::fs::read(diskit_bin()).expect("diskit binary");
    let mut img = pattern(1 << 20, 41);
    img.extend(pattern(8192, 42).iter().cycle().take(1 << 20));
    img.extend(pattern(2048, 43).iter().cycle().take(1 << 20));
    // random, but every 4 KiB ends with a copy of 512 bytes from 2 KiB earlier: byte values
    // as even as random's, yet deflate shrinks it by a tenth
    let mut near = pattern(1 << 20, 44);
    for at in (0..near.len()).step_by(4096) {
        near.copy_within(at + 1024..at + 1536, at + 3584);
    }
    img.extend(near);
    img.extend(exe.iter().cycle().take(1 << 20));
    img.extend(
        b"log line: disk image converted\n"
            .iter()
            .cycle()
            .take(1 << 20),
    );
    std::fs::write(d.join("s.raw"), &img).unwrap();
    for (fmt, opts) in [
        ("qcow2", "compat=1.1"),
        ("vmdk", "subformat=streamOptimized"),
    ] {
        let (q, k) = (format!("q.{fmt}"), format!("d.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt, "-o", opts];
        if fmt == "qcow2" {
            args.push("-c");
        }
        ok(qemu_img(d, &[&args[..], &["s.raw", &q]].concat()));
        ok(diskit(d, &[&args[..], &["s.raw", &k]].concat()));
        same_content(d, "s.raw", &k);
        if fmt == "qcow2" {
            ok(qemu_img(d, &["check", &k]));
            assert_eq!(map(d, &k), map(d, &q));
            let m = map(d, &k);
            assert!(m.contains("\"compressed\": true") && m.contains("\"compressed\": false"));
        }
        let size = |f: &str| std::fs::metadata(d.join(f)).unwrap().len();
        assert!(size(&k) <= size(&q), "{fmt}: {} > {}", size(&k), size(&q));
    }
}
