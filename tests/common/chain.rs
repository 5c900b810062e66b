//! Backing chains for the commit and rebase tests: building them with qemu-img/qemu-io and
//! comparing what both tools leave in every image.

use std::path::Path;

use super::*;

/// A chain to build: (file, create args, qemu-io commands).
pub type Layer = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
);

pub fn build(dir: &Path, layers: &[Layer]) {
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
pub const CHAIN: &[Layer] = &[
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
pub const GROWING: &[Layer] = &[
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
pub const MIXED: &[Layer] = &[
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
pub const RAW_BASE: &[Layer] = &[
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
pub const SUBCLUSTERS: &[Layer] = &[
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

pub fn files(layers: &[Layer]) -> Vec<&'static str> {
    layers.iter().map(|l| l.0).collect()
}

/// `qemu-img map --output=json` without host offsets (the layout of the host file is
/// not part of the contract), or the error text.
pub fn map(dir: &Path, file: &str) -> String {
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

pub fn check_clean(dir: &Path, file: &str) {
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

pub fn backing_of(dir: &Path, file: &str) -> (Option<String>, Option<String>) {
    let out = ok(qemu_img(dir, &["info", "-U", "--output=json", file]));
    let v = json(&out);
    (
        v["backing-filename"].as_str().map(str::to_string),
        v["backing-filename-format"].as_str().map(str::to_string),
    )
}

/// Runs `args` with both tools on copies of `layers` and compares everything.
pub fn compare(layers: &[Layer], args: &[&str]) {
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
