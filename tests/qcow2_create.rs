//! qcow2 creation: options help, the `Formatting` summary, errors, and images that
//! `qemu-img check` accepts and `qemu-img info` describes like qemu's own.

mod common;

use common::*;
use diskit::formats::qcow2;
use diskit::CreateOpts;
use std::path::Path;

fn qemu_create(dir: &Path, o: &str, name: &str, size: Option<&str>) -> std::process::Output {
    let mut args = vec!["create", "-f", "qcow2"];
    if !o.is_empty() {
        args.push("-o");
        args.push(o);
    }
    args.push(name);
    if let Some(s) = size {
        args.push(s);
    }
    qemu_img(dir, &args)
}

fn opts(o: &str, size: Option<&str>) -> CreateOpts {
    let mut c = CreateOpts::parse(o).unwrap();
    if let Some(s) = size {
        c.set("size", s);
    }
    c
}

/// Runs diskit's create with the cwd at `dir` (names are relative like qemu-img's).
fn diskit_create(dir: &Path, name: &str, c: &CreateOpts) -> diskit::Result<()> {
    let _g = CWD.lock().unwrap();
    let cwd = std::env::current_dir().unwrap();
    std::env::set_current_dir(dir).unwrap();
    let r = qcow2::create(name, c);
    std::env::set_current_dir(cwd).unwrap();
    r
}

static CWD: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn help_lines_match() {
    require_qemu!();
    let d = tmpdir();
    let out = stdout(&ok(qemu_img(
        d.path(),
        &["create", "-f", "qcow2", "-o", "help"],
    )));
    let want: Vec<&str> = out.lines().filter(|l| l.starts_with("  ")).collect();
    let got: Vec<String> = qcow2::CREATE_OPTS.iter().map(|o| o.help_line()).collect();
    assert_eq!(got, want);
}

const COMBOS: &[&str] = &[
    "",
    "compat=0.10",
    "compat=v2",
    "compat=1.1,lazy_refcounts=on",
    "cluster_size=512",
    "cluster_size=2M,refcount_bits=64",
    "cluster_size=4k,refcount_bits=1",
    "refcount_bits=2",
    "refcount_bits=4,lazy_refcounts=yes",
    "extended_l2=on",
    "extended_l2=on,cluster_size=16k",
    "compression_type=zstd",
    "preallocation=metadata",
    "preallocation=falloc,cluster_size=4k",
    "preallocation=full,extended_l2=on",
    "data_file=DF.raw",
    "data_file=DF.raw,data_file_raw=on",
    "data_file=DF.raw,data_file_raw=on,preallocation=full",
    "backing_file=base.qcow2,backing_fmt=qcow2",
    "backing_file=base.qcow2,backing_fmt=qcow2,extended_l2=on,preallocation=metadata",
    "backing_file=base.raw,backing_fmt=raw,compat=0.10",
];

fn formatting_line(out: &std::process::Output) -> String {
    let s = stdout(out);
    let l = s
        .lines()
        .find(|l| l.starts_with("Formatting"))
        .unwrap_or_else(|| panic!("no Formatting line: {s} {}", stderr(out)))
        .to_string();
    let p = l.find(", fmt=").unwrap();
    l[p + 2..].to_string()
}

#[test]
fn created_images_pass_check_and_match_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "3M"],
    ));
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "raw", "base.raw", "2M"],
    ));
    for (i, combo) in COMBOS.iter().enumerate() {
        for size in [Some("3M"), None] {
            if size.is_none() && !combo.contains("backing_file") {
                continue;
            }
            let qo = combo.replace("DF", &format!("q{i}"));
            let dko = combo.replace("DF", &format!("d{i}"));
            let qname = format!("q{i}.qcow2");
            let dname = format!("d{i}.qcow2");
            let qout = ok(qemu_create(dir, &qo, &qname, size));
            // the summary qemu-img prints (size resolved from the backing file)
            let c = opts(&dko, size);
            let resolved = {
                let _g = CWD.lock().unwrap();
                let cwd = std::env::current_dir().unwrap();
                std::env::set_current_dir(dir).unwrap();
                let r = qcow2::create::resolve_create_opts(&dname, &c);
                std::env::set_current_dir(cwd).unwrap();
                r.unwrap()
            };
            assert_eq!(
                qcow2::create_summary(&resolved).replace(&format!("d{i}"), &format!("q{i}")),
                formatting_line(&qout),
                "summary for {combo}"
            );
            diskit_create(dir, &dname, &c).unwrap_or_else(|e| panic!("{combo}: {e}"));
            let chk = qemu_img(dir, &["check", &dname]);
            assert!(
                chk.status.success(),
                "{combo}: check: {} {}",
                stdout(&chk),
                stderr(&chk)
            );
            let qi = json(&ok(qemu_img(dir, &["info", "--output=json", &qname])));
            let di = json(&ok(qemu_img(dir, &["info", "--output=json", &dname])));
            for key in [
                "virtual-size",
                "cluster-size",
                "backing-filename",
                "backing-filename-format",
            ] {
                assert_eq!(qi[key], di[key], "{combo}: {key}");
            }
            let mut qs = qi["format-specific"].clone();
            let mut ds = di["format-specific"].clone();
            if let Some(df) = qs["data"].get_mut("data-file") {
                *df = serde_json::Value::Null;
                ds["data"]["data-file"] = serde_json::Value::Null;
            }
            assert_eq!(qs, ds, "{combo}");
            // same guest content and allocation map
            assert_eq!(
                qemu_raw(dir, &qname, None),
                qemu_raw(dir, &dname, None),
                "{combo}"
            );
            let qm = stdout(&ok(qemu_img(dir, &["map", "--output=json", &qname])));
            let dm = stdout(&ok(qemu_img(dir, &["map", "--output=json", &dname])));
            let strip = |s: &str| -> Vec<(bool, bool, u64, u64)> {
                let v: serde_json::Value = serde_json::from_str(s).unwrap();
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        (
                            e["data"].as_bool().unwrap(),
                            e["zero"].as_bool().unwrap(),
                            e["start"].as_u64().unwrap(),
                            e["length"].as_u64().unwrap(),
                        )
                    })
                    .collect()
            };
            assert_eq!(strip(&qm), strip(&dm), "{combo}: map");
            // the image file ends where qemu-img's does
            let flen = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
            assert_eq!(flen(&dname), flen(&qname), "{combo}: file length");
            if combo.contains("falloc") || combo.contains("full") {
                let (qf, df) = if combo.contains("data_file") {
                    (format!("q{i}.raw"), format!("d{i}.raw"))
                } else {
                    (qname.clone(), dname.clone())
                };
                let qa = std::fs::metadata(dir.join(&qf)).unwrap().len();
                let da = std::fs::metadata(dir.join(&df)).unwrap().len();
                assert!(da >= 3 << 20 && qa >= 3 << 20, "{combo}: {qa} {da}");
            }
        }
    }
}

#[test]
fn errors_match_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    ));
    let bad = [
        "compat=0.10,lazy_refcounts=on",
        "extended_l2=on,cluster_size=8k",
        "cluster_size=3000",
        "cluster_size=4M",
        "refcount_bits=3",
        "refcount_bits=128",
        "compat=0.10,refcount_bits=8",
        "data_file_raw=on",
        "compat=0.10,extended_l2=on",
        "compat=0.10,data_file=x.raw",
        "compat=0.10,compression_type=zstd",
        "compression_type=lz4",
        "compat=2",
        "backing_fmt=raw",
        "preallocation=foo",
        "preallocation=metadata,backing_file=a.qcow2,backing_fmt=qcow2",
        "data_file_raw=on,data_file=y.raw,backing_file=a.qcow2,backing_fmt=qcow2",
        "lazy_refcounts=maybe",
        "refcount_bits=abc",
        "refcount_bits=-1",
        "refcount_bits= -0",
        "refcount_bits=18446744073709551616",
        "refcount_bits=",
        "cluster_size=abc",
        "bogus=1",
        "backing_file=a.qcow2",
        "backing_file=nonexist.qcow2",
        "backing_file=nonexist.qcow2,backing_fmt=qcow2",
    ];
    for o in bad {
        let size = if o.contains("nonexist") {
            None
        } else {
            Some("1M")
        };
        let q = qemu_create(dir, o, "t.qcow2", size);
        assert!(!q.status.success(), "{o}");
        let want = stderr(&q);
        let want = want
            .trim_end()
            .strip_prefix("qemu-img: ")
            .unwrap()
            .to_string();
        let e = diskit_create(dir, "t.qcow2", &opts(o, size)).expect_err(o);
        assert_eq!(e.to_string(), want, "{o}");
    }
}
