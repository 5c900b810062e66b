//! `commit` against qemu-img: the same command on copies of the same chains must print the
//! same, exit the same, leave every image of the chain with the same content and the same
//! allocation, and leave images that `qemu-img check` finds clean.

mod common;

use common::*;

use common::chain::*;

#[test]
fn commit_into_immediate_backing() {
    require_qemu!();
    compare(CHAIN, &["commit", "top.qcow2"]);
    compare(CHAIN, &["commit", "-f", "qcow2", "mid.qcow2"]);
}

#[test]
fn commit_with_flags() {
    require_qemu!();
    for args in [
        &["commit", "-q", "top.qcow2"][..],
        &["commit", "-d", "top.qcow2"],
        &["commit", "--drop", "top.qcow2"],
        &["commit", "-t", "none", "top.qcow2"],
        &["commit", "-r", "1G", "top.qcow2"],
        &["commit", "-p", "-q", "top.qcow2"],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn commit_to_named_base() {
    require_qemu!();
    for args in [
        &["commit", "-b", "base.qcow2", "top.qcow2"][..],
        &["commit", "-b", "mid.qcow2", "top.qcow2"],
        &["commit", "--base=base.qcow2", "mid.qcow2"],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn commit_named_base_by_absolute_path() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), CHAIN);
    // the base named by another spelling of the same file
    let (qd, dd) = (t.path().join("q"), t.path().join("d"));
    for (dir, tool) in [(&qd, "q"), (&dd, "d")] {
        std::fs::create_dir_all(dir).unwrap();
        for f in files(CHAIN) {
            std::fs::copy(t.path().join(f), dir.join(f)).unwrap();
        }
        let abs = dir.join("./base.qcow2");
        let args = ["commit", "-b", abs.to_str().unwrap(), "top.qcow2"];
        let out = if tool == "q" {
            qemu_img(dir, &args)
        } else {
            diskit_as_qemu(dir, &args)
        };
        assert_eq!(stdout(&out), "Image committed.\n", "{}", stderr(&out));
    }
    for f in files(CHAIN) {
        assert_eq!(qemu_raw(&qd, f, None), qemu_raw(&dd, f, None), "{f}");
        assert_eq!(map(&qd, f), map(&dd, f), "{f}");
    }
}

#[test]
fn commit_grows_a_smaller_base() {
    require_qemu!();
    compare(GROWING, &["commit", "top.qcow2"]);
    compare(GROWING, &["commit", "-b", "base.qcow2", "top.qcow2"]);
}

#[test]
fn commit_mixed_cluster_sizes_and_compressed() {
    require_qemu!();
    compare(MIXED, &["commit", "top.qcow2"]);
    compare(MIXED, &["commit", "-b", "base.qcow2", "top.qcow2"]);
    compare(MIXED, &["commit", "mid.qcow2"]);
}

#[test]
fn commit_into_raw_base() {
    require_qemu!();
    compare(RAW_BASE, &["commit", "-b", "base.raw", "top.qcow2"]);
    compare(RAW_BASE, &["commit", "mid.qcow2"]);
}

#[test]
fn commit_subclusters_and_v2() {
    require_qemu!();
    compare(SUBCLUSTERS, &["commit", "top.qcow2"]);
    compare(SUBCLUSTERS, &["commit", "mid.qcow2"]);
}

#[test]
fn commit_errors_like_qemu() {
    require_qemu!();
    for args in [
        &["commit", "base.qcow2"][..],
        &["commit", "-b", "nothere.qcow2", "top.qcow2"],
        &["commit", "-b", "top.qcow2", "top.qcow2"],
        &["commit", "nothere.qcow2"],
        &["commit"],
        &["commit", "top.qcow2", "mid.qcow2"],
        &["commit", "-b"],
        &["commit", "-x", "top.qcow2"],
        &["commit", "--bogus", "top.qcow2"],
        &["commit", "-r", "fast", "top.qcow2"],
        &["commit", "-t", "bogus", "top.qcow2"],
        &["commit", "-f", "vdi", "top.qcow2"],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn commit_empties_top_with_snapshot() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), CHAIN);
    ok(qemu_img(t.path(), &["snapshot", "-c", "s1", "top.qcow2"]));
    ok(qemu_io(
        t.path(),
        "qcow2",
        "top.qcow2",
        &["write -P 9 0 128k"],
    ));
    let fs = files(CHAIN);
    let (qd, dd) = same_effect_as_qemu(t.path(), &fs, &["commit", "top.qcow2"]);
    for f in &fs {
        assert_eq!(map(&dd, f), map(&qd, f), "allocation of {f}");
        check_clean(&dd, f);
    }
    // the snapshot still holds what the top held when it was taken
    for dir in [&qd, &dd] {
        ok(qemu_img(dir, &["snapshot", "-a", "s1", "top.qcow2"]));
    }
    assert_eq!(
        qemu_raw(&dd, "top.qcow2", None),
        qemu_raw(&qd, "top.qcow2", None)
    );
    check_clean(&dd, "top.qcow2");
}

#[test]
fn commit_progress_ends_at_100() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), CHAIN);
    let out = ok(diskit(t.path(), &["commit", "-p", "top.qcow2"]));
    let s = stdout(&out);
    assert!(s.contains("(100.00/100%)"), "{s}");
    assert!(s.ends_with("Image committed.\n"), "{s}");
}

#[test]
fn commit_library_call() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), CHAIN);
    let want = qemu_raw(t.path(), "top.qcow2", None);
    let top = t.path().join("top.qcow2");
    let o = diskit::ops::commit::CommitOptions {
        workers: 3,
        ..Default::default()
    };
    diskit::ops::commit::commit(top.to_str().unwrap(), &o, None).unwrap();
    // top now reads through to mid, which holds what top showed
    assert_eq!(qemu_raw(t.path(), "top.qcow2", None), want);
    assert_eq!(qemu_raw(t.path(), "mid.qcow2", None), want);
    let m = map(t.path(), "top.qcow2");
    assert!(!m.contains("\"depth\":0"), "top still holds data: {m}");
    check_clean(t.path(), "top.qcow2");
    check_clean(t.path(), "mid.qcow2");
}
