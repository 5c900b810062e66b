//! qcow2 `amend` against qemu-img: same messages, exit codes, content and `info`; qemu-img
//! check clean afterwards.

mod common;
use common::*;
use std::path::Path;

fn info_text(dir: &Path, f: &str) -> String {
    stdout(&ok(qemu_img(dir, &["info", f])))
        .lines()
        .filter(|l| !(l.contains("disk size") || l.contains("file length")))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn amend_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "v3.qcow2", "4M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "v3.qcow2",
        &["write -P 1 0 1M", "write -z 1M 64k", "write -c -P 3 2M 64k"],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "4M",
        ],
    ));
    ok(qemu_io(d, "qcow2", "v2.qcow2", &["write -P 1 0 1M"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "x.qcow2",
            "4M",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "z.qcow2",
            "4M",
        ],
    ));
    ok(qemu_io(d, "qcow2", "z.qcow2", &["write -c -P 3 0 64k"]));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "s.qcow2", "4M"],
    ));
    ok(qemu_img(d, &["snapshot", "-c", "s", "s.qcow2"]));
    ok(qemu_img(d, &["resize", "-q", "s.qcow2", "8M"]));
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]));
    let files = ["v3.qcow2", "v2.qcow2"];
    for f in files {
        for o in [
            "compat=0.10",
            "compat=1.1",
            "compat=2",
            "refcount_bits=3",
            "refcount_bits=8",
            "refcount_bits=1",
            "refcount_bits=64",
            "lazy_refcounts=on",
            "lazy_refcounts=off",
            "lazy_refcounts=x",
            "backing_file=foo",
            "data_file=x",
            "data_file_raw=on",
            "size=8M",
            "size=2M",
            "cluster_size=4k",
            "foo=1",
            "help",
            "compat=0.10,refcount_bits=8",
            "compat=1.1,lazy_refcounts=on",
        ] {
            let (q, dk) = same_effect_as_qemu(d, &[f], &["amend", "-o", o, f]);
            ok(qemu_img(&dk, &["check", f]));
            assert_eq!(info_text(&q, f), info_text(&dk, f), "{f} {o}");
        }
    }
    for (f, o) in [
        ("x.qcow2", "compat=0.10"),
        ("z.qcow2", "compat=0.10"),
        ("z.qcow2", "refcount_bits=8"),
        ("s.qcow2", "compat=0.10"),
        ("s.qcow2", "refcount_bits=4"),
    ] {
        let (q, dk) = same_effect_as_qemu(d, &[f], &["amend", "-o", o, f]);
        ok(qemu_img(&dk, &["check", f]));
        assert_eq!(info_text(&q, f), info_text(&dk, f), "{f} {o}");
    }
    for args in [
        &["amend", "v3.qcow2"][..],
        &["amend", "-o", "size=1M", "v3.qcow2", "v2.qcow2"],
        &["amend", "-f", "qcow2", "-o", "help"],
        &["amend", "-f", "raw", "-o", "size=2M", "r.raw"],
        &["amend", "-f", "raw", "-o", "help", "r.raw"],
    ] {
        same_effect_as_qemu(d, &["v3.qcow2", "v2.qcow2", "r.raw"], args);
    }
}
