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

/// The guest content of internal snapshot `snap` of `img` in `dir`, as qemu-img reads it.
fn snapshot_content(dir: &Path, img: &str, snap: &str) -> Vec<u8> {
    let opt = format!("snapshot.name={snap}");
    ok(qemu_img(
        dir,
        &["convert", "-l", &opt, "-O", "raw", img, "snap.raw"],
    ));
    let v = std::fs::read(dir.join("snap.raw")).unwrap();
    std::fs::remove_file(dir.join("snap.raw")).unwrap();
    v
}

/// `amend -o compat=0.10` expands the zero clusters of internal snapshots too, as qemu-img
/// does (iotest 061): with and without a backing file, preallocated (`write -z` over data)
/// and plain ones, in tables the snapshot shares with the active image and in its own.
/// Same messages, the same content for the image and its snapshots, and a clean check.
#[test]
fn downgrade_expands_zero_clusters_of_snapshots_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for backed in [false, true] {
        let _ = std::fs::remove_file(d.join("t.qcow2"));
        let mut create = vec!["create", "-q", "-f", "qcow2", "-o", "compat=1.1"];
        if backed {
            ok(qemu_img(
                d,
                &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"],
            ));
            ok(qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x11 0 8M"]));
            create.extend(["-b", "base.qcow2", "-F", "qcow2"]);
        }
        create.extend(["t.qcow2", "8M"]);
        ok(qemu_img(d, &create));
        ok(qemu_io(
            d,
            "qcow2",
            "t.qcow2",
            &[
                "write -P 0x22 0 256k",
                "write -z 64k 64k",
                "write -z 512k 128k",
                "write -z 4M 64k",
            ],
        ));
        ok(qemu_img(d, &["snapshot", "-c", "s1", "t.qcow2"]));
        // the active image moves on: its copy of the shared table differs from the snapshot's
        ok(qemu_io(
            d,
            "qcow2",
            "t.qcow2",
            &["write -P 0x33 0 64k", "write -z 1M 64k"],
        ));
        let mut files = vec!["t.qcow2"];
        if backed {
            files.push("base.qcow2");
        }
        let (qd, dd) = same_effect_as_qemu(d, &files, &["amend", "-o", "compat=0.10", "t.qcow2"]);
        ok(qemu_img(&dd, &["check", "t.qcow2"]));
        assert!(stdout(&ok(qemu_img(&dd, &["info", "t.qcow2"]))).contains("compat: 0.10"));
        assert_eq!(
            snapshot_content(&dd, "t.qcow2", "s1"),
            snapshot_content(&qd, "t.qcow2", "s1"),
            "snapshot s1 (backing file: {backed})"
        );
    }
}

/// `amend -p` prints qemu-img's progress: one step per L1 entry visited while zero clusters
/// are expanded, the snapshot's L1 table counted too (iotest 061), then 100% and a newline.
#[test]
fn amend_progress_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    // 4 KiB clusters: an L2 table maps 2 MiB, the L1 table has 8 entries (iotest 061 has
    // 64 KiB clusters and 4 GiB)
    let opts = "compat=1.1,cluster_size=4k".to_string();
    for snapshot in [false, true] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", &opts, "b.qcow2", "16M"],
        ));
        ok(qemu_img(
            d,
            &[
                "create", "-q", "-f", "qcow2", "-o", &opts, "-b", "b.qcow2", "-F", "qcow2",
                "t.qcow2", "16M",
            ],
        ));
        ok(qemu_io(
            d,
            "qcow2",
            "t.qcow2",
            &[
                "write -z 0 4k",
                "write -z 4M 4k",
                "write -z 8M 4k",
                "write -z 12M 4k",
            ],
        ));
        if snapshot {
            ok(qemu_img(d, &["snapshot", "-c", "foo", "t.qcow2"]));
        }
        let files = ["t.qcow2", "b.qcow2"];
        let (_, dd) =
            same_effect_as_qemu(d, &files, &["amend", "-p", "-o", "compat=0.10", "t.qcow2"]);
        ok(qemu_img(&dd, &["check", "t.qcow2"]));
    }
    // upgrade, and nothing to do: the same lines; -q silences them
    for args in [
        &["amend", "-p", "-o", "compat=1.1", "t.qcow2"][..],
        &["amend", "-p", "-o", "lazy_refcounts=off", "t.qcow2"],
        &["amend", "-p", "-q", "-o", "compat=0.10", "t.qcow2"],
        &["amend", "-p", "-o", "compat=0.2", "t.qcow2"],
    ] {
        same_effect_as_qemu(d, &["t.qcow2", "b.qcow2"], args);
    }
}

/// An image left dirty (lazy refcounts, QEMU killed) is repaired when it is opened for
/// writing, and the repair says what it does as qemu-img does (iotest 061).
#[test]
fn dirty_image_repair_on_open_is_reported_like_qemu_img() {
    require_qemu!();
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
            "compat=1.1,lazy_refcounts=on",
            "t.qcow2",
            "64M",
        ],
    ));
    // qemu-io is killed after its writes reached the file: the image stays dirty
    let _ = qemu_io(
        d,
        "qcow2",
        "t.qcow2",
        &["write -P 0x2a 0 128k", "flush", "sigraise 9"],
    );
    let h = std::fs::read(d.join("t.qcow2")).unwrap();
    assert_eq!(h[79] & 1, 1, "the dirty bit is set");
    let (_, dd) = same_effect_as_qemu(d, &["t.qcow2"], &["amend", "-o", "compat=0.10", "t.qcow2"]);
    ok(qemu_img(&dd, &["check", "t.qcow2"]));
}
