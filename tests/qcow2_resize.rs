//! qcow2 `resize` against qemu-img: same messages, exit codes, guest content and size;
//! qemu-img check finds nothing.

mod common;
use common::*;
use std::path::Path;

fn make(d: &Path, name: &str, opts: &str) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", opts, name, "10M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        name,
        &[
            "write -P 1 0 3M",
            "write -c -P 7 4M 64k",
            "write -P 3 9M 1M",
            "write -z 6M 128k",
        ],
    ));
}

fn check_clean(dir: &Path, f: &str) {
    let out = qemu_img(dir, &["check", f]);
    assert!(
        out.status.success(),
        "qemu-img check {f}: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

fn virtual_size(dir: &Path, f: &str) -> u64 {
    let j = json(&ok(qemu_img(dir, &["info", "--output=json", f])));
    j["virtual-size"].as_u64().unwrap()
}

#[test]
fn qcow2_resize_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "extended_l2=on",
        "cluster_size=4k,refcount_bits=8",
    ] {
        make(d, "a.qcow2", opts);
        for args in [
            &["resize", "a.qcow2", "+5M"][..],
            &["resize", "a.qcow2", "1G"],
            &["resize", "--shrink", "a.qcow2", "1M"],
            &["resize", "--shrink", "a.qcow2", "3500K"],
            &["resize", "--shrink", "a.qcow2", "512"],
            &["resize", "a.qcow2", "1M"],
            &["resize", "--preallocation=metadata", "a.qcow2", "+3M"],
            &["resize", "--preallocation=full", "a.qcow2", "+3M"],
            &["resize", "--preallocation=falloc", "a.qcow2", "20M"],
            &["resize", "-q", "a.qcow2", "10M"],
            &["resize", "a.qcow2", "+100"],
        ] {
            let (q, dk) = same_effect_as_qemu(d, &["a.qcow2"], args);
            check_clean(&dk, "a.qcow2");
            assert_eq!(
                virtual_size(&q, "a.qcow2"),
                virtual_size(&dk, "a.qcow2"),
                "{opts} {args:?}"
            );
            if args.contains(&"--shrink") {
                // the file is truncated after its last used cluster, like qemu's
                let len = |p: &Path| std::fs::metadata(p.join("a.qcow2")).unwrap().len();
                assert_eq!(len(&q), len(&dk), "file length {opts} {args:?}");
            }
        }
    }
}

#[test]
fn qcow2_grow_over_backing_reads_zero() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "10M"],
    ));
    ok(qemu_io(d, "qcow2", "base.qcow2", &["write -P 5 0 10M"]));
    for opts in ["compat=1.1", "extended_l2=on", "compat=0.10"] {
        ok(qemu_img(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "ov.qcow2",
                "5000K",
            ],
        ));
        let (_, dk) = same_effect_as_qemu(
            d,
            &["base.qcow2", "ov.qcow2"],
            &["resize", "ov.qcow2", "10M"],
        );
        if opts != "compat=0.10" {
            check_clean(&dk, "ov.qcow2");
            let raw = qemu_raw(&dk, "ov.qcow2", None);
            assert!(raw[5000 * 1024..].iter().all(|&b| b == 0), "{opts}");
            assert!(raw[..5000 * 1024].iter().all(|&b| b == 5), "{opts}");
        }
    }
}

/// Growing with preallocation from a size inside a cluster over a backing file (qemu's
/// iotest 125): the part of that cluster below the old size keeps the backing file's data
/// (diskit used to preallocate it as zeroes, losing it), the rest reads as zero, and the
/// allocation map is qemu-img's.
#[test]
fn qcow2_preallocated_growth_keeps_the_partial_cluster() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "raw", "base.raw", "128k"],
    ));
    ok(qemu_io(d, "raw", "base.raw", &["write -P 1 0 128k"]));
    for opts in ["cluster_size=64k", "cluster_size=64k,extended_l2=on"] {
        for old in ["31k", "33k"] {
            for mode in ["metadata", "falloc", "full"] {
                ok(qemu_img(
                    d,
                    &[
                        "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", "-o", opts,
                        "ov.qcow2", old,
                    ],
                ));
                let pre = format!("--preallocation={mode}");
                let (qd, dk) = same_effect_as_qemu(
                    d,
                    &["base.raw", "ov.qcow2"],
                    &["resize", "-f", "qcow2", &pre, "ov.qcow2", "96k"],
                );
                let what = format!("{opts} {old} {mode}");
                check_clean(&dk, "ov.qcow2");
                let kib: usize = old.trim_end_matches('k').parse().unwrap();
                let raw = qemu_raw(&dk, "ov.qcow2", None);
                assert_eq!(raw.len(), 96 << 10, "{what}");
                assert!(raw[..kib << 10].iter().all(|&b| b == 1), "{what}");
                assert!(raw[kib << 10..].iter().all(|&b| b == 0), "{what}");
                let map =
                    |dir: &Path| stdout(&ok(qemu_img(dir, &["map", "--output=json", "ov.qcow2"])));
                assert_eq!(map(&dk), map(&qd), "{what}");
                let len = |dir: &Path| std::fs::metadata(dir.join("ov.qcow2")).unwrap().len();
                assert_eq!(len(&dk), len(&qd), "{what}");
            }
        }
    }
}

/// Shrinking gives the freed clusters inside the file back to the host, as qemu-img does
/// (iotest 250: data of the cut-off part sits in the middle of the file).
#[test]
fn qcow2_shrink_punches_freed_clusters() {
    require_qemu!();
    use std::os::unix::fs::MetadataExt;
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=1M,preallocation=metadata",
            "s.qcow2",
            "2100M",
        ],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "s.qcow2",
        &[
            "discard 0 10M",
            "discard 2090M 10M",
            "write -P 3 2090M 10M",
            "write -P 4 0 10M",
        ],
    ));
    let before = std::fs::metadata(d.join("s.qcow2")).unwrap().blocks();
    let (qd, dd) = same_effect_as_qemu(d, &["s.qcow2"], &["resize", "--shrink", "s.qcow2", "5M"]);
    check_clean(&dd, "s.qcow2");
    let used = |w: &Path| std::fs::metadata(w.join("s.qcow2")).unwrap().blocks();
    assert!(
        used(&dd) * 512 + (10 << 20) <= before * 512,
        "{} {before}",
        used(&dd)
    );
    // the metadata writes may touch a file system block or two more or less
    assert!(used(&dd) <= used(&qd) + 16, "{} > {}", used(&dd), used(&qd));
}

#[test]
fn qcow2_shrink_with_snapshot() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    make(d, "a.qcow2", "compat=1.1");
    ok(qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]));
    let (_, dk) = same_effect_as_qemu(d, &["a.qcow2"], &["resize", "--shrink", "a.qcow2", "2M"]);
    check_clean(&dk, "a.qcow2");
    // the snapshot still has its data, at its own size
    ok(qemu_img(&dk, &["snapshot", "-a", "s1", "a.qcow2"]));
    check_clean(&dk, "a.qcow2");
    assert_eq!(virtual_size(&dk, "a.qcow2"), 10 << 20);
    assert_eq!(qemu_raw(&dk, "a.qcow2", None), qemu_raw(d, "a.qcow2", None));
    // v2 images with snapshots are not resized
    make(d, "v2.qcow2", "compat=0.10");
    ok(qemu_img(d, &["snapshot", "-c", "s1", "v2.qcow2"]));
    same_effect_as_qemu(d, &["v2.qcow2"], &["resize", "v2.qcow2", "+1M"]);
}
