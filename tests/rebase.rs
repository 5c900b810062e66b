//! `rebase` against qemu-img: the same command on copies of the same chains must print the
//! same, exit the same, leave every image with the same content, allocation and backing
//! file reference, and leave images that `qemu-img check` finds clean.

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

/// The classic chain and an unrelated image to rebase onto.
const WITH_OTHER: &[Layer] = &[
    CHAIN[0],
    CHAIN[1],
    CHAIN[2],
    (
        "other.qcow2",
        &["-f", "qcow2", "other.qcow2", "4M"],
        &["write -P 1 0 512k", "write -P 9 3M 1M", "write -P 2 2M 64k"],
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
fn rebase_onto_an_image_in_the_chain() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["rebase", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        &[
            "rebase",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &[
            "rebase",
            "--backing=base.qcow2",
            "--backing-format=qcow2",
            "top.qcow2",
        ],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn rebase_flatten() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "", "top.qcow2"][..],
        &["rebase", "-b", "", "mid.qcow2"],
        &["rebase", "-b", "", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-q", "-p", "-b", "", "top.qcow2"],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn rebase_onto_another_image() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &[
            "rebase",
            "-U",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &[
            "rebase",
            "-t",
            "none",
            "-T",
            "none",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        compare(WITH_OTHER, args);
    }
}

#[test]
fn rebase_compressed() {
    require_qemu!();
    for args in [
        &["rebase", "-c", "-b", "", "top.qcow2"][..],
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "--compress",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        compare(WITH_OTHER, args);
    }
    compare(MIXED, &["rebase", "-c", "-b", "", "top.qcow2"]);
}

#[test]
fn rebase_unsafe_only_rewrites_the_header() {
    require_qemu!();
    for args in [
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ][..],
        &["rebase", "-u", "-b", "", "top.qcow2"],
        &["rebase", "-u", "top.qcow2"],
        &[
            "rebase",
            "--backing-unsafe",
            "-b",
            "other.qcow2",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    ] {
        compare(WITH_OTHER, args);
    }
}

#[test]
fn rebase_unsafe_onto_a_missing_file() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), CHAIN);
    let args = [
        "rebase",
        "-u",
        "-b",
        "renamed/elsewhere.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    let mut outs = Vec::new();
    for (sub, qemu) in [("q", true), ("d", false)] {
        let dir = t.path().join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        for f in files(CHAIN) {
            std::fs::copy(t.path().join(f), dir.join(f)).unwrap();
        }
        let out = if qemu {
            qemu_img(&dir, &args)
        } else {
            diskit_as_qemu(&dir, &args)
        };
        outs.push((
            stdout(&out),
            stderr(&out),
            out.status.code(),
            backing_of(&dir, "top.qcow2"),
        ));
        // once the file is there, the image opens and is clean
        std::fs::create_dir_all(dir.join("renamed")).unwrap();
        std::fs::copy(dir.join("mid.qcow2"), dir.join("renamed/elsewhere.qcow2")).unwrap();
        std::fs::copy(dir.join("base.qcow2"), dir.join("renamed/base.qcow2")).unwrap();
        check_clean(&dir, "top.qcow2");
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(
        outs[1].3,
        (
            Some("renamed/elsewhere.qcow2".to_string()),
            Some("qcow2".to_string())
        )
    );
}

#[test]
fn rebase_with_smaller_backing_files() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["rebase", "-b", "", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        compare(GROWING, args);
    }
}

#[test]
fn rebase_mixed_cluster_sizes_subclusters_raw() {
    require_qemu!();
    compare(
        MIXED,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    compare(MIXED, &["rebase", "-b", "", "mid.qcow2"]);
    compare(
        SUBCLUSTERS,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    compare(SUBCLUSTERS, &["rebase", "-b", "", "top.qcow2"]);
    compare(SUBCLUSTERS, &["rebase", "-b", "", "mid.qcow2"]);
    compare(
        RAW_BASE,
        &["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"],
    );
    compare(RAW_BASE, &["rebase", "-b", "", "top.qcow2"]);
}

#[test]
fn rebase_errors_like_qemu() {
    require_qemu!();
    for args in [
        &["rebase", "top.qcow2"][..],
        &["rebase"],
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
        &[
            "rebase",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "mid.qcow2",
        ],
        &["rebase", "-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "bogus", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "nothere.qcow2"],
        &[
            "rebase",
            "-t",
            "bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "-T",
            "bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-r", "top.qcow2"],
        &["rebase", "--bogus", "top.qcow2"],
        &["rebase", "-b"],
        &["rebase", "-u", "-b", "x", "-F", "qcow2", "nothere.qcow2"],
        &["rebase", "-f", "vdi", "-b", "", "top.qcow2"],
    ] {
        compare(CHAIN, args);
    }
    // on a raw image: copied, then the header cannot name a backing file
    for args in [
        &[
            "rebase", "-f", "raw", "-b", "base.raw", "-F", "raw", "base.raw",
        ][..],
        &["rebase", "-c", "-f", "raw", "-b", "", "base.raw"],
    ] {
        compare(RAW_BASE, args);
    }
}

#[test]
fn rebase_without_backing_format() {
    require_qemu!();
    // qemu-img refuses to write a backing file name without its format; it copies first
    // (diskit refuses before copying), so only output, exit code and content compare.
    for args in [
        &["rebase", "-b", "base.qcow2", "top.qcow2"][..],
        &["rebase", "-u", "-b", "base.qcow2", "top.qcow2"],
    ] {
        let t = tmpdir();
        build(t.path(), CHAIN);
        let fs = files(CHAIN);
        let (qd, dd) = same_effect_as_qemu(t.path(), &fs, args);
        for f in &fs {
            assert_eq!(backing_of(&dd, f), backing_of(&qd, f), "{f}");
            check_clean(&dd, f);
        }
    }
}

#[test]
fn rebase_header_keeps_extensions() {
    require_qemu!();
    // a persistent bitmap and a long backing name survive the header rewrite
    let t = tmpdir();
    build(t.path(), CHAIN);
    ok(qemu_img(t.path(), &["bitmap", "--add", "top.qcow2", "bm0"]));
    let long = format!("{}/../{}/base.qcow2", ".", "x".repeat(200));
    std::fs::create_dir_all(t.path().join("x".repeat(200))).unwrap();
    std::fs::copy(
        t.path().join("base.qcow2"),
        t.path().join("x".repeat(200)).join("base.qcow2"),
    )
    .unwrap();
    let fs = files(CHAIN);
    let args = [
        "rebase",
        "-u",
        "-b",
        long.as_str(),
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    let (qd, dd) = same_effect_as_qemu(t.path(), &fs, &args);
    let info = |dir: &Path| {
        let mut v = json(&ok(qemu_img(
            dir,
            &["info", "-U", "--output=json", "top.qcow2"],
        )));
        let o = v.as_object_mut().unwrap();
        o.remove("actual-size");
        o.remove("filename");
        o.remove("children");
        v
    };
    assert_eq!(info(&dd), info(&qd));
    check_clean(&dd, "top.qcow2");
    let args = ["rebase", "-u", "-b", "", "top.qcow2"];
    let (qd, dd) = same_effect_as_qemu(t.path(), &fs, &args);
    assert_eq!(info(&dd), info(&qd));
}

#[test]
fn rebase_progress_and_library_call() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), WITH_OTHER);
    let out = ok(diskit(
        t.path(),
        &[
            "rebase",
            "-p",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    ));
    assert!(stdout(&out).contains("(100.00/100%)"), "{}", stdout(&out));
    let want = qemu_raw(t.path(), "top.qcow2", None);
    let top = t.path().join("top.qcow2");
    let o = diskit::ops::rebase::RebaseOptions {
        backing: Some(String::new()),
        workers: 3,
        ..Default::default()
    };
    diskit::ops::rebase::rebase(top.to_str().unwrap(), &o, None).unwrap();
    assert_eq!(qemu_raw(t.path(), "top.qcow2", None), want);
    assert_eq!(backing_of(t.path(), "top.qcow2"), (None, None));
    check_clean(t.path(), "top.qcow2");
}
