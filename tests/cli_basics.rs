//! The command line against qemu-img: messages, exit codes and info output for raw images.

mod common;
use common::*;

#[test]
fn usage_errors_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("t.txt"), b"hello\n").unwrap();
    for args in [
        &[][..],
        &["foo"],
        &["info"],
        &["info", "a", "b"],
        &["info", "--foo", "t.txt"],
        &["info", "-z", "t.txt"],
        &["info", "-f"],
        &["info", "--output=xml", "t.txt"],
        &["info", "nonexist"],
        &["info", "-f", "nosuchfmt", "t.txt"],
        &["convert", "-O"],
        &["convert", "t.txt"],
        &["create", "-f", "qcow2"],
        &["create", "-f", "raw", "x.raw"],
        &["create", "-f", "raw", "x.raw", "1Q"],
        &["create", "-f", "raw", "x.raw", "20E"],
        &["create", "-f", "raw", "-o", "foo=bar", "x.raw", "1M"],
        &["create", "-f", "foo", "x", "1M"],
        &["create", "-f", "raw", "-b", "t.txt", "-F", "raw", "y.raw"],
    ] {
        same_as_qemu(d, args);
    }
}

#[test]
fn info_raw_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("six.bin"), b"hello\n").unwrap();
    std::fs::write(d.join("data.bin"), pattern(3 << 20, 1)).unwrap();
    let f = std::fs::File::create(d.join("sparse.bin")).unwrap();
    f.set_len(10 << 30).unwrap();
    for name in ["six.bin", "data.bin", "sparse.bin"] {
        same_as_qemu(d, &["info", name]);
        same_as_qemu(d, &["info", "--output=json", name]);
        same_as_qemu(d, &["info", "-f", "raw", "--output", "json", name]);
        same_as_qemu(d, &["info", "--backing-chain", "--output=json", name]);
    }
}

#[test]
fn create_raw_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (size, opts) in [
        ("1M", ""),
        ("1.5k", ""),
        ("0", ""),
        ("64M", "preallocation=falloc"),
        ("1M", "preallocation=full"),
    ] {
        let mut args = vec!["create", "-f", "raw"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend(["img.raw", size]);
        same_as_qemu(d, &args);
        let len = std::fs::metadata(d.join("img.raw")).unwrap().len();
        let q = ok(qemu_img(d, &["info", "--output=json", "img.raw"]));
        assert_eq!(json(&q)["virtual-size"].as_u64().unwrap(), len);
    }
    same_as_qemu(d, &["create", "-f", "raw", "-o", "help"]);
}

#[test]
fn convert_raw_to_raw_keeps_content_and_holes() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    // data, a hole, data, zeroes written as data, tail hole
    let src = d.join("src.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(32 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&pattern(3 << 20, 7), 0).unwrap();
    f.write_all_at(&pattern(1 << 20, 8), 10 << 20).unwrap();
    f.write_all_at(&vec![0u8; 2 << 20], 16 << 20).unwrap();
    ok(diskit(
        d,
        &["convert", "-f", "raw", "-O", "raw", "src.raw", "dst.raw"],
    ));
    ok(qemu_img(
        d,
        &["convert", "-f", "raw", "-O", "raw", "src.raw", "q.raw"],
    ));
    let a = std::fs::read(d.join("dst.raw")).unwrap();
    assert_eq!(a, std::fs::read(&src).unwrap());
    // Same allocation as qemu-img's output: zero blocks are not written.
    let map = |f: &str| stdout(&ok(qemu_img(d, &["map", "--output=json", "-f", "raw", f])));
    assert_eq!(map("dst.raw"), map("q.raw"));
}

#[test]
fn convert_concatenates_sources() {
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("a.raw"), pattern(1 << 20, 1)).unwrap();
    std::fs::write(d.join("b.raw"), pattern(512 * 3, 2)).unwrap();
    ok(diskit(
        d,
        &["convert", "-f", "raw", "a.raw", "b.raw", "c.raw"],
    ));
    let mut want = pattern(1 << 20, 1);
    want.extend(pattern(512 * 3, 2));
    assert_eq!(std::fs::read(d.join("c.raw")).unwrap(), want);
}

#[test]
fn program_name_comes_from_argv0() {
    let dir = tmpdir();
    let out = diskit(dir.path(), &["info", "missing.img"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).starts_with("diskit: Could not open 'missing.img'"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn map_and_compare_raw_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(d.join("a.raw")).unwrap();
    f.set_len(24 << 20).unwrap();
    f.write_all_at(&pattern(3 << 20, 1), 1 << 20).unwrap();
    f.write_all_at(&pattern(4096, 2), 20 << 20).unwrap();
    drop(f);
    std::fs::copy(d.join("a.raw"), d.join("b.raw")).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("b.raw"))
        .unwrap();
    f.write_all_at(b"x", (2 << 20) + 700).unwrap();
    drop(f);
    std::fs::write(d.join("short.raw"), pattern(1 << 20, 9)).unwrap();
    for args in [
        &["map", "--output=json", "a.raw"][..],
        &["map", "a.raw"],
        &[
            "map",
            "-f",
            "raw",
            "--output=json",
            "-s",
            "1M",
            "-l",
            "9M",
            "a.raw",
        ],
        &["map", "-s", "foo", "a.raw"],
        &["map", "--start-offset=-5", "a.raw"],
        &["map"],
        &["compare", "a.raw", "a.raw"],
        &["compare", "a.raw", "b.raw"],
        &["compare", "-q", "a.raw", "b.raw"],
        &["compare", "-s", "a.raw", "short.raw"],
        &["compare", "a.raw", "short.raw"],
        &["compare", "a.raw", "missing.raw"],
        &["compare", "a.raw"],
        &["check", "-f", "raw", "a.raw"],
        &["check", "--output=json", "a.raw"],
        &["check", "-r", "foo", "a.raw"],
        &["check", "-r", "all", "a.raw"],
        &["check"],
        &["check", "--output=x", "a.raw"],
        &["measure", "--size", "1G"],
        &["measure", "-O", "raw", "a.raw"],
        &["measure", "--output=json", "-O", "raw", "a.raw"],
        &["measure"],
        &["measure", "--size", "1G", "a.raw"],
        &["measure", "-O", "nope", "--size", "1G"],
    ] {
        same_as_qemu(d, args);
    }
}

/// An option given twice takes its last value, as with qemu-img's getopt (clap would refuse).
#[test]
fn repeated_options_take_the_last_value() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    ));
    same_as_qemu(d, &["info", "-f", "raw", "-f", "qcow2", "a.qcow2"]);
    same_as_qemu(d, &["info", "--output=json", "--output=human", "a.qcow2"]);
    same_as_qemu(
        d,
        &["convert", "-O", "raw", "-O", "qcow2", "a.qcow2", "b.qcow2"],
    );
    same_as_qemu(d, &["info", "b.qcow2"]);
    // long options abbreviated to an unambiguous prefix, as getopt_long takes them
    same_as_qemu(d, &["info", "--out=json", "--backing", "a.qcow2"]);
    same_as_qemu(d, &["check", "--out", "json", "a.qcow2"]);
    same_as_qemu(d, &["map", "--start=64k", "--max-len=1k", "a.qcow2"]);
}

/// `--image-opts` on the verbs that read one or two images: the specification names the file
/// and the driver; output, errors and exit codes as qemu-img's.
/// `a.qcow2`: 4 MiB with 64 KiB of data at 0.
fn data_qcow2(d: &std::path::Path) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"],
    ));
    ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 1 0 64k"]));
}

#[test]
fn image_opts_on_reading_verbs_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    data_qcow2(d);
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "4M"]));
    let q = "driver=qcow2,file.filename=a.qcow2";
    for args in [
        vec!["info", "--image-opts", q],
        vec![
            "info",
            "--output=json",
            "--image-opts",
            "file.filename=a.qcow2",
        ],
        vec!["info", "-f", "qcow2", "--image-opts", q],
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=nonexist",
        ],
        vec!["info", "--image-opts", "driver=raw,file.filename=a.qcow2"],
        // qcow2's cache and discard tuning options are accepted (iotest 061), others not
        vec![
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,l2-cache-entry-size=4096,overlap-check=none",
        ],
        vec![
            "info",
            "--image-opts",
            "driver=raw,file.filename=a.qcow2,l2-cache-size=1M",
        ],
        vec!["check", "--image-opts", q],
        vec!["check", "--output=json", "--image-opts", q],
        vec!["map", "--output=json", "--image-opts", q],
        vec!["measure", "-O", "qcow2", "--image-opts", q],
        vec![
            "compare",
            "--image-opts",
            q,
            "driver=raw,file.filename=r.raw",
        ],
        vec!["compare", "--image-opts", "file.filename=nonexist", q],
        vec!["compare", "-f", "qcow2", "--image-opts", q, q],
        vec![
            "dd",
            "-f",
            "qcow2",
            "--image-opts",
            "if=file.filename=a.qcow2",
            "of=x",
        ],
    ] {
        same_as_qemu(d, &args);
    }
    // dd reads the image the specification names
    let iff = format!("if={q}");
    ok(diskit(
        d,
        &["dd", "--image-opts", &iff, "of=x.raw", "bs=64k"],
    ));
    assert!(std::fs::read(d.join("x.raw")).unwrap() == qemu_raw(d, "a.qcow2", None));
}

/// `--image-opts` on the verbs that change an image: same output and same result.
#[test]
fn image_opts_on_writing_verbs_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    data_qcow2(d);
    ok(qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]));
    let ov = [
        "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "o.qcow2",
    ];
    ok(qemu_img(d, &ov));
    ok(qemu_io(d, "qcow2", "o.qcow2", &["write -P 2 32k 64k"]));
    let a = "driver=qcow2,file.filename=a.qcow2";
    let o = "driver=qcow2,file.filename=o.qcow2";
    let files = ["a.qcow2", "o.qcow2"];
    for args in [
        vec!["snapshot", "-l", "--image-opts", a],
        vec!["snapshot", "-c", "s2", "--image-opts", a],
        vec!["snapshot", "-l", "-f", "qcow2", "--image-opts", a],
        vec!["resize", "--image-opts", a, "8M"],
        vec!["amend", "-o", "lazy_refcounts=on", "--image-opts", a],
        vec!["rebase", "-u", "-b", "", "--image-opts", o],
        vec!["commit", "--image-opts", o],
    ] {
        same_effect_as_qemu(d, &files, &args);
    }
}
