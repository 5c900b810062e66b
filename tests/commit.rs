//! `commit` against qemu-img: the same command on copies of the same chains must print the
//! same, exit the same, leave every image of the chain with the same content and the same
//! allocation, and leave images that `qemu-img check` finds clean.

mod common;

use std::path::Path;

use common::*;

/// A chain to build: (file, create args, qemu-io commands).
type Layer = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

fn build(dir: &Path, layers: &[Layer]) {
    for (file, create, cmds) in layers {
        let mut args = vec!["create", "-q"];
        args.extend_from_slice(create);
        ok(qemu_img(dir, &args));
        let _ = file;
        if !cmds.is_empty() {
            let fmt = if file.ends_with(".raw") {
                "raw"
            } else {
                "qcow2"
            };
            ok(qemu_io(dir, fmt, file, cmds));
        }
    }
}

/// The classic 3-deep chain: data, zero clusters and partial clusters in every layer.
const CHAIN: &[Layer] = &[
    (
        "base.qcow2",
        &["-f", "qcow2", "base.qcow2", "4M"],
        &[
            "write -P 1 0 1M",
            "write -P 2 2M 512k",
            "write -P 7 3584k 512k",
        ],
    ),
    (
        "mid.qcow2",
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &[
            "write -P 3 512k 1M",
            "write -z 2M 64k",
            "write -z 3584k 64k",
        ],
    ),
    (
        "top.qcow2",
        &["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        &[
            "write -P 4 3M 64k",
            "write -z 0 64k",
            "write -P 5 2M 4k",
            "write -P 6 1000k 200k",
        ],
    ),
];

/// The base is smaller than the layers above: commit grows it.
const GROWING: &[Layer] = &[
    (
        "base.qcow2",
        &["-f", "qcow2", "base.qcow2", "1M"],
        &["write -P 1 0 1M"],
    ),
    (
        "mid.qcow2",
        &[
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
            "2M",
        ],
        &["write -P 3 1536k 256k"],
    ),
    (
        "top.qcow2",
        &[
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "3M",
        ],
        &["write -P 4 2560k 64k", "write -z 512k 64k"],
    ),
];

/// Different cluster sizes in each layer, compressed clusters in the middle.
const MIXED: &[Layer] = &[
    (
        "base.qcow2",
        &["-f", "qcow2", "-o", "cluster_size=4096", "base.qcow2", "2M"],
        &["write -P 1 0 2M"],
    ),
    (
        "mid.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &["write -c -P 8 64k 64k", "write -P 3 100k 3k"],
    ),
    (
        "top.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=131072",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["write -P 4 1M 128k", "write -z 0 128k"],
    ),
];

/// A raw base under qcow2 overlays.
const RAW_BASE: &[Layer] = &[
    (
        "base.raw",
        &["-f", "raw", "base.raw", "2M"],
        &["write -P 1 0 1M"],
    ),
    (
        "mid.qcow2",
        &["-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2"],
        &["write -P 3 512k 1M"],
    ),
    (
        "top.qcow2",
        &["-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        &["write -P 4 1M 64k", "write -z 0 64k"],
    ),
];

/// Extended L2 entries (subclusters) in the top image, v2 (compat=0.10) in the middle.
const SUBCLUSTERS: &[Layer] = &[
    (
        "base.qcow2",
        &["-f", "qcow2", "base.qcow2", "2M"],
        &["write -P 1 0 2M"],
    ),
    (
        "mid.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &["write -P 3 512k 64k"],
    ),
    (
        "top.qcow2",
        &[
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["write -P 4 8k 4k", "write -z 600k 8k", "write -P 6 1M 2k"],
    ),
];

fn files(layers: &[Layer]) -> Vec<&'static str> {
    layers.iter().map(|l| l.0).collect()
}

/// `qemu-img map --output=json` without host offsets (the layout of the host file is
/// not part of the contract), or the error text.
fn map(dir: &Path, file: &str) -> String {
    let out = qemu_img(dir, &["map", "-U", "--output=json", file]);
    let s = stdout(&out);
    let mut v: serde_json::Value =
        serde_json::from_str(&s).unwrap_or_else(|_| serde_json::Value::String(stderr(&out)));
    if let Some(a) = v.as_array_mut() {
        // Without offsets, runs split only by the host layout merge.
        let mut merged: Vec<serde_json::Value> = Vec::new();
        for mut e in a.drain(..) {
            if let Some(o) = e.as_object_mut() {
                o.remove("offset");
            }
            if let Some(last) = merged.last_mut() {
                let key = |v: &serde_json::Value| {
                    let mut v = v.clone();
                    let o = v.as_object_mut().unwrap();
                    o.remove("start");
                    o.remove("length");
                    v
                };
                let end = last["start"].as_u64().unwrap() + last["length"].as_u64().unwrap();
                if key(last) == key(&e) && end == e["start"].as_u64().unwrap() {
                    let len = last["length"].as_u64().unwrap() + e["length"].as_u64().unwrap();
                    last["length"] = len.into();
                    continue;
                }
            }
            merged.push(e);
        }
        *a = merged;
    }
    v.to_string()
}

fn check_clean(dir: &Path, file: &str) {
    if file.ends_with(".raw") {
        return;
    }
    let out = qemu_img(dir, &["check", "-U", file]);
    assert!(
        out.status.success(),
        "qemu-img check {file} in {}: {}{}",
        dir.display(),
        stdout(&out),
        stderr(&out)
    );
}

fn backing_of(dir: &Path, file: &str) -> (Option<String>, Option<String>) {
    let out = ok(qemu_img(dir, &["info", "-U", "--output=json", file]));
    let v = json(&out);
    (
        v["backing-filename"].as_str().map(str::to_string),
        v["backing-filename-format"].as_str().map(str::to_string),
    )
}

/// Runs `args` with both tools on copies of `layers` and compares everything.
fn compare(layers: &[Layer], args: &[&str]) {
    let t = tmpdir();
    build(t.path(), layers);
    let fs = files(layers);
    let (qd, dd) = same_effect_as_qemu(t.path(), &fs, args);
    for f in &fs {
        assert_eq!(
            map(&dd, f),
            map(&qd, f),
            "allocation of {f} differs after {args:?}"
        );
        assert_eq!(
            backing_of(&dd, f),
            backing_of(&qd, f),
            "backing of {f} differs after {args:?}"
        );
        check_clean(&dd, f);
    }
}

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
