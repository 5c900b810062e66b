//! `snapshot` against qemu-img: listings, create/apply/delete in both directions, and
//! qemu-img check after each step.

mod common;
use common::*;
use std::path::Path;

fn check_clean(dir: &Path, f: &str) {
    let out = qemu_img(dir, &["check", f]);
    assert!(
        out.status.success() && !stdout(&out).contains("leaked"),
        "qemu-img check {f}: {}{}",
        stdout(&out),
        stderr(&out)
    );
}

fn make(d: &Path, name: &str, opts: &str) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        name,
        &["write -P 1 0 1M", "write -c -P 7 2M 64k", "write -z 3M 64k"],
    ));
}

/// Lines of `snapshot -l` without the date column (creation times differ).
fn listing(dir: &Path, f: &str, diskit_side: bool) -> Vec<String> {
    let out = if diskit_side {
        ok(diskit(dir, &["snapshot", "-l", f]))
    } else {
        ok(qemu_img(dir, &["snapshot", "-l", f]))
    };
    stdout(&out)
        .lines()
        .map(|l| {
            let mut v: Vec<&str> = l.split_whitespace().collect();
            if v.len() == 7 && v[0] != "ID" {
                v.drain(3..5);
            }
            v.join(" ")
        })
        .collect()
}

#[test]
fn diskit_snapshots_work_in_qemu() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for opts in [
        "compat=1.1",
        "compat=0.10",
        "extended_l2=on",
        "refcount_bits=8,cluster_size=4k",
    ] {
        make(d, "a.qcow2", opts);
        let v0 = qemu_raw(d, "a.qcow2", None);
        ok(diskit(d, &["snapshot", "-c", "s1", "a.qcow2"]));
        check_clean(d, "a.qcow2");
        ok(qemu_io(
            d,
            "qcow2",
            "a.qcow2",
            &["write -P 2 512k 1M", "write -P 8 2M 64k"],
        ));
        check_clean(d, "a.qcow2");
        let v1 = qemu_raw(d, "a.qcow2", None);
        ok(diskit(d, &["snapshot", "-q", "-c", "s2", "a.qcow2"]));
        check_clean(d, "a.qcow2");
        // listings agree
        assert_eq!(
            listing(d, "a.qcow2", true),
            listing(d, "a.qcow2", false),
            "{opts}"
        );
        assert_eq!(listing(d, "a.qcow2", true).len(), 4, "{opts}");
        // qemu applies diskit's snapshots
        ok(qemu_img(d, &["snapshot", "-a", "s1", "a.qcow2"]));
        check_clean(d, "a.qcow2");
        assert!(qemu_raw(d, "a.qcow2", None) == v0, "{opts}");
        // diskit applies (by ID) and deletes
        ok(diskit(d, &["snapshot", "-a", "2", "a.qcow2"]));
        check_clean(d, "a.qcow2");
        assert!(qemu_raw(d, "a.qcow2", None) == v1, "{opts}");
        assert!(diskit_raw(&d.join("a.qcow2")) == v1, "{opts}");
        ok(diskit(d, &["snapshot", "-d", "s2", "a.qcow2"]));
        check_clean(d, "a.qcow2");
        assert!(qemu_raw(d, "a.qcow2", None) == v1, "{opts}");
        // writing after the delete must not touch the remaining snapshot
        ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 9 0 4M"]));
        check_clean(d, "a.qcow2");
        ok(qemu_img(d, &["snapshot", "-d", "s1", "a.qcow2"]));
        check_clean(d, "a.qcow2");
        assert!(stdout(&ok(diskit(d, &["snapshot", "-l", "a.qcow2"]))).is_empty());
    }
}

#[test]
fn qemu_snapshots_work_in_diskit() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    make(d, "a.qcow2", "compat=1.1");
    let v0 = qemu_raw(d, "a.qcow2", None);
    ok(qemu_img(d, &["snapshot", "-c", "one", "a.qcow2"]));
    ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 4 0 4M"]));
    ok(qemu_img(d, &["resize", "a.qcow2", "6M"]));
    ok(qemu_img(d, &["snapshot", "-c", "two", "a.qcow2"]));
    let v2 = qemu_raw(d, "a.qcow2", None);
    assert_eq!(listing(d, "a.qcow2", true), listing(d, "a.qcow2", false));
    // apply goes back to the 4M size of "one"
    ok(diskit(d, &["snapshot", "-a", "one", "a.qcow2"]));
    check_clean(d, "a.qcow2");
    assert!(diskit_raw(&d.join("a.qcow2")) == v0);
    assert!(qemu_raw(d, "a.qcow2", None) == v0);
    ok(diskit(d, &["snapshot", "-d", "one", "a.qcow2"]));
    check_clean(d, "a.qcow2");
    ok(diskit(d, &["snapshot", "-a", "two", "a.qcow2"]));
    check_clean(d, "a.qcow2");
    assert!(qemu_raw(d, "a.qcow2", None) == v2);
    ok(diskit(d, &["snapshot", "-d", "two", "a.qcow2"]));
    check_clean(d, "a.qcow2");
    assert!(qemu_raw(d, "a.qcow2", None) == v2);
}

#[test]
fn snapshot_messages_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    make(d, "a.qcow2", "compat=1.1");
    ok(qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]));
    ok(qemu_img(d, &["snapshot", "-c", "1", "a.qcow2"]));
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]));
    // a refcount overflow fails the same way (and leaves the same leaks)
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1",
            "r1.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(d, "qcow2", "r1.qcow2", &["write -P 1 0 64k"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "df.qcow2",
            "1M",
        ],
    ));
    for args in [
        &["snapshot", "-a", "nope", "a.qcow2"][..],
        &["snapshot", "-d", "nope", "a.qcow2"],
        &["snapshot", "-d", "2", "a.qcow2"],
        &["snapshot", "-l", "-c", "x", "a.qcow2"],
        &["snapshot", "-c", "x", "-d", "y", "a.qcow2"],
        &["snapshot", "a.qcow2", "b.qcow2"],
        &["snapshot"],
        &["snapshot", "-c"],
        &["snapshot", "-x", "a.qcow2"],
        &["snapshot", "--output=json", "a.qcow2"],
        &["snapshot", "--help"],
        &["snapshot", "-f", "raw", "-c", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-a", "x", "r.raw"],
        &["snapshot", "-f", "raw", "-d", "x", "r.raw"],
        &["snapshot", "-f", "raw", "r.raw"],
        &["snapshot", "-c", "x", "df.qcow2"],
        &["snapshot", "-l", "df.qcow2"],
        &["snapshot", "-c", "x", "missing.qcow2"],
        &["snapshot", "-c", "x", "r1.qcow2"],
    ] {
        same_effect_as_qemu(
            d,
            &["a.qcow2", "r.raw", "df.qcow2", "d.raw", "r1.qcow2"],
            args,
        );
    }
    // deleting by name removes the one named "1" (not ID 1), like qemu-img
    let (q, dk) = same_effect_as_qemu(d, &["a.qcow2"], &["snapshot", "-d", "1", "a.qcow2"]);
    assert_eq!(
        listing(&q, "a.qcow2", false),
        listing(&dk, "a.qcow2", false)
    );
    check_clean(&dk, "a.qcow2");
}
