//! `bitmap`: persistent dirty bitmaps, compared with qemu-img on copies of the same images.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

/// qemu names anonymous nodes `#block` + a counter + two random digits: drop the digits.
fn normalize(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("#block") {
        out.push_str(&rest[..i + 6]);
        rest = rest[i + 6..].trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

/// The bitmaps qemu-img info reports (name, granularity, flags), or Null.
fn bitmaps(dir: &Path, img: &str) -> serde_json::Value {
    let v = json(&ok(qemu_img(
        dir,
        &["info", "--output=json", "-U", "-f", "qcow2", img],
    )));
    v["format-specific"]["data"]["bitmaps"].clone()
}

fn check_clean(dir: &Path, img: &str) {
    let out = qemu_img(dir, &["check", "-f", "qcow2", img]);
    assert!(
        out.status.success() && stdout(&out).contains("No errors were found"),
        "qemu-img check of {} failed:\n{}{}",
        dir.join(img).display(),
        stdout(&out),
        stderr(&out)
    );
}

/// The dirty areas of bitmap `bm` as qemu sees them: qemu-nbd exports it and qemu-img map
/// lists it (dirty areas are the ones reported without data).
fn bitmap_map(dir: &Path, img: &str, bm: &str) -> String {
    let sock = dir.join(format!("nbd-{bm}.sock"));
    let _ = std::fs::remove_file(&sock);
    let s = sock.to_str().unwrap();
    ok(run_in(
        dir,
        "qemu-nbd",
        &["--fork", "-r", "-k", s, "-f", "qcow2", "-B", bm, img],
    ));
    let spec = format!(
        "driver=nbd,server.type=unix,server.path={s},x-dirty-bitmap=qemu:dirty-bitmap:{bm}"
    );
    let out = ok(qemu_img(
        dir,
        &["map", "--output=json", "--image-opts", &spec],
    ));
    let v = json(&out);
    let mut dirty = Vec::new();
    for e in v.as_array().unwrap() {
        if e["data"] == false {
            dirty.push(format!("{}+{}", e["start"], e["length"]));
        }
    }
    dirty.join(",")
}

/// Runs a sequence of commands with qemu-img on copies in `base/q` and with diskit on copies
/// in `base/d`; asserts equal outputs (node names normalized), then equal bitmaps and clean
/// checks for `img`.
fn same_bitmap_effect(base: &Path, files: &[&str], img: &str, cmds: &[&[&str]]) {
    let qd = base.join("q");
    let dd = base.join("d");
    for dir in [&qd, &dd] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        for f in files {
            std::fs::copy(base.join(f), dir.join(f)).unwrap();
        }
    }
    for args in cmds {
        let q = qemu_img(&qd, args);
        let d = diskit_as_qemu(&dd, args);
        assert_eq!(
            normalize(&stderr(&d)),
            normalize(&stderr(&q)),
            "stderr differs for {args:?}"
        );
        assert_eq!(stdout(&d), stdout(&q), "stdout differs for {args:?}");
        assert_eq!(d.status.code(), q.status.code(), "exit code for {args:?}");
    }
    let qb = bitmaps(&qd, img);
    assert_eq!(bitmaps(&dd, img), qb, "bitmaps differ after {cmds:?}");
    check_clean(&dd, img);
}

fn new_qcow2(dir: &Path, name: &str, size: &str, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend(extra);
    args.extend([name, size]);
    ok(qemu_img(dir, &args));
}

fn qi(args: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec!["bitmap"];
    v.extend(args);
    v
}

#[test]
fn usage_errors_match_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    new_qcow2(d, "a.qcow2", "10M", &[]);
    for args in [
        qi(&["a.qcow2", "b1"]),
        qi(&["--add", "a.qcow2"]),
        qi(&["--add", "a.qcow2", "b1", "extra"]),
        qi(&["-g", "4096", "--remove", "a.qcow2", "b1"]),
        qi(&["-b", "x", "--add", "a.qcow2", "b1"]),
        qi(&["-F", "raw", "--merge", "x", "a.qcow2", "b1"]),
        qi(&["--add", "-g", "-1", "a.qcow2", "b1"]),
        qi(&["--add", "-g", "abc", "a.qcow2", "b1"]),
        qi(&["--foo", "a.qcow2", "b1"]),
        qi(&["--merge"]),
        qi(&["-g"]),
        qi(&["--add", "nonexist.qcow2", "b1"]),
        qi(&["--add", "-f", "foo", "a.qcow2", "b1"]),
    ] {
        same_as_qemu(d, &args);
    }
}

#[test]
fn add_remove_enable_disable_same_as_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    new_qcow2(d, "a.qcow2", "10M", &[]);
    same_bitmap_effect(
        d,
        &["a.qcow2"],
        "a.qcow2",
        &[
            &["bitmap", "--add", "a.qcow2", "b1"],
            &["bitmap", "--add", "-g", "512", "a.qcow2", "b2"],
            &["bitmap", "--add", "--disable", "a.qcow2", "b3"],
            &["bitmap", "--add", "-g", "2G", "a.qcow2", "big"],
            &["bitmap", "--add", "a.qcow2", "b1"],
            &["bitmap", "--remove", "a.qcow2", "b2"],
            &[
                "bitmap",
                "--disable",
                "--enable",
                "--disable",
                "a.qcow2",
                "b1",
            ],
            &["bitmap", "--enable", "a.qcow2", "b3"],
            &["bitmap", "--add", "-g", "0", "a.qcow2", "zero-g"],
            // the operations before a failing one are kept
            &["bitmap", "--add", "--disable", "--add", "a.qcow2", "b6"],
            &["bitmap", "--remove", "--remove", "a.qcow2", "b6"],
            &["bitmap", "--clear", "a.qcow2", "nope"],
            &["bitmap", "--enable", "a.qcow2", "nope"],
            &["bitmap", "--disable", "a.qcow2", "nope"],
            &["bitmap", "--merge", "x", "a.qcow2", "nope"],
            &["bitmap", "--merge", "nope", "a.qcow2", "b1"],
            &["bitmap", "--add", "-g", "1000", "a.qcow2", "bad"],
            &["bitmap", "--add", "-g", "4G", "a.qcow2", "bad"],
            &["bitmap", "--add", "a.qcow2", ""],
        ],
    );
    // a default granularity follows the cluster size (4 KiB .. 64 KiB)
    new_qcow2(d, "s.qcow2", "1M", &["-o", "cluster_size=512"]);
    new_qcow2(d, "l.qcow2", "4M", &["-o", "cluster_size=2M"]);
    same_bitmap_effect(
        d,
        &["s.qcow2", "l.qcow2"],
        "s.qcow2",
        &[
            &["bitmap", "--add", "s.qcow2", "x"],
            &["bitmap", "--add", "l.qcow2", "y"],
        ],
    );
    assert_eq!(
        bitmaps(&d.join("d"), "l.qcow2"),
        bitmaps(&d.join("q"), "l.qcow2")
    );
    check_clean(&d.join("d"), "l.qcow2");
}

#[test]
fn removing_every_bitmap_drops_the_extension() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    new_qcow2(d, "a.qcow2", "10M", &[]);
    ok(qemu_img(d, &["bitmap", "--add", "a.qcow2", "b1"]));
    ok(qemu_img(d, &["bitmap", "--add", "a.qcow2", "b2"]));
    same_bitmap_effect(
        d,
        &["a.qcow2"],
        "a.qcow2",
        &[
            &["bitmap", "--remove", "a.qcow2", "b1"],
            &["bitmap", "--remove", "a.qcow2", "b2"],
        ],
    );
    assert!(bitmaps(&d.join("d"), "a.qcow2").is_null());
    // and the image takes new bitmaps again
    let dd = d.join("d");
    ok(diskit_as_qemu(&dd, &["bitmap", "--add", "a.qcow2", "b3"]));
    assert_eq!(bitmaps(&dd, "a.qcow2")[0]["name"], "b3");
    check_clean(&dd, "a.qcow2");
}

#[test]
fn unsupported_images_error_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    new_qcow2(d, "v2.qcow2", "10M", &["-o", "compat=0.10"]);
    new_qcow2(d, "a.qcow2", "10M", &[]);
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]));
    let long = "x".repeat(1024);
    let ok_name = "y".repeat(1023);
    same_bitmap_effect(
        d,
        &["v2.qcow2", "r.raw", "a.qcow2"],
        "a.qcow2",
        &[
            &["bitmap", "--add", "v2.qcow2", "b1"],
            &["bitmap", "--remove", "v2.qcow2", "b1"],
            &["bitmap", "--add", "-f", "raw", "r.raw", "b1"],
            &["bitmap", "--remove", "-f", "raw", "r.raw", "b1"],
            &["bitmap", "--add", "-f", "raw", "a.qcow2", "b1"],
            &["bitmap", "--add", "a.qcow2", &long],
            &["bitmap", "--add", "a.qcow2", &ok_name],
        ],
    );
}

#[test]
fn empty_image_cannot_store_bitmaps_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    new_qcow2(d, "z.qcow2", "0", &[]);
    same_bitmap_effect(
        d,
        &["z.qcow2"],
        "z.qcow2",
        &[
            &["bitmap", "--add", "z.qcow2", "b"],
            &["bitmap", "--remove", "z.qcow2", "b"],
        ],
    );
    assert!(bitmaps(&d.join("d"), "z.qcow2").is_null());
}

#[test]
fn too_fine_granularity_is_refused_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    // 512-byte granularity over 300 GiB needs 75 MiB of bitmap: more than qemu stores
    new_qcow2(d, "big.qcow2", "300G", &[]);
    same_bitmap_effect(
        d,
        &["big.qcow2"],
        "big.qcow2",
        &[
            &["bitmap", "--add", "-g", "512", "big.qcow2", "b"],
            &["bitmap", "--add", "-g", "64k", "big.qcow2", "ok"],
        ],
    );
}

/// An image whose bitmap `b1` (4 KiB granularity) qemu dirtied, with `b2` (64 KiB) empty and
/// `b3` (512 bytes) dirtied elsewhere.
fn dirty_image(d: &Path, name: &str) {
    new_qcow2(d, name, "4M", &[]);
    ok(qemu_img(d, &["bitmap", "--add", "-g", "4k", name, "b1"]));
    ok(qemu_io(d, "qcow2", name, &["write 8k 4k", "write 1M 70k"]));
    ok(qemu_img(d, &["bitmap", "--add", "-g", "64k", name, "b2"]));
    ok(qemu_img(d, &["bitmap", "--add", "-g", "512", name, "b3"]));
    ok(qemu_img(d, &["bitmap", "--disable", name, "b1"]));
    ok(qemu_io(
        d,
        "qcow2",
        name,
        &["write 3M 1536", "write 4000k 96k"],
    ));
}

fn same_contents(d: &Path, img: &str, names: &[&str]) {
    for bm in names {
        let q = bitmap_map(&d.join("q"), img, bm);
        let k = bitmap_map(&d.join("d"), img, bm);
        assert_eq!(k, q, "contents of bitmap {bm} differ");
    }
}

#[test]
fn clear_and_merge_contents_same_as_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    dirty_image(d, "a.qcow2");
    assert_ne!(bitmap_map(d, "a.qcow2", "b1"), "");
    same_bitmap_effect(
        d,
        &["a.qcow2"],
        "a.qcow2",
        &[
            &["bitmap", "--merge", "b1", "a.qcow2", "b2"],
            &["bitmap", "--merge", "b3", "a.qcow2", "b2"],
            &["bitmap", "--merge", "b2", "--merge", "b1", "a.qcow2", "b3"],
            &[
                "bitmap", "--add", "-g", "1M", "--merge", "b3", "a.qcow2", "c",
            ],
        ],
    );
    same_contents(d, "a.qcow2", &["b1", "b2", "b3", "c"]);
    assert_ne!(bitmap_map(&d.join("d"), "a.qcow2", "c"), "");
    same_bitmap_effect(
        d,
        &["a.qcow2"],
        "a.qcow2",
        &[
            &["bitmap", "--clear", "a.qcow2", "b1"],
            &["bitmap", "--merge", "b3", "--clear", "a.qcow2", "b2"],
        ],
    );
    same_contents(d, "a.qcow2", &["b1", "b2", "b3"]);
    assert_eq!(bitmap_map(&d.join("d"), "a.qcow2", "b1"), "");
}

#[test]
fn merge_from_another_image_same_as_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    dirty_image(d, "src.qcow2");
    new_qcow2(d, "dst.qcow2", "4M", &[]);
    new_qcow2(d, "small.qcow2", "2M", &[]);
    ok(qemu_img(d, &["bitmap", "--add", "dst.qcow2", "t"]));
    ok(qemu_img(d, &["bitmap", "--add", "small.qcow2", "t"]));
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "4M"]));
    same_bitmap_effect(
        d,
        &["src.qcow2", "dst.qcow2", "small.qcow2", "r.raw"],
        "dst.qcow2",
        &[
            &[
                "bitmap",
                "--merge",
                "b1",
                "-b",
                "src.qcow2",
                "dst.qcow2",
                "t",
            ],
            &[
                "bitmap",
                "--merge",
                "b3",
                "-b",
                "src.qcow2",
                "-F",
                "qcow2",
                "dst.qcow2",
                "t",
            ],
            &[
                "bitmap",
                "--merge",
                "nope",
                "-b",
                "src.qcow2",
                "dst.qcow2",
                "t",
            ],
            &[
                "bitmap",
                "--merge",
                "b1",
                "-b",
                "r.raw",
                "-F",
                "raw",
                "dst.qcow2",
                "t",
            ],
            &[
                "bitmap",
                "--merge",
                "b1",
                "-b",
                "src.qcow2",
                "small.qcow2",
                "t",
            ],
        ],
    );
    same_contents(d, "dst.qcow2", &["t"]);
    same_contents(d, "src.qcow2", &["b1", "b3"]);
}

#[test]
fn in_use_bitmaps_are_inconsistent_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    dirty_image(d, "a.qcow2");
    // a write through diskit marks the bitmaps in use (as a crash would leave them)
    {
        let p = d.join("a.qcow2");
        let img = diskit::open(
            p.to_str().unwrap(),
            &diskit::OpenOptions::read_write().with_format(Some(diskit::Format::Qcow2)),
        )
        .unwrap();
        img.write_at(&[1u8; 512], 0).unwrap();
        img.close().unwrap();
    }
    assert_eq!(bitmaps(d, "a.qcow2")[0]["flags"][0], "in-use");
    same_bitmap_effect(
        d,
        &["a.qcow2"],
        "a.qcow2",
        &[
            &["bitmap", "--clear", "a.qcow2", "b1"],
            &["bitmap", "--enable", "a.qcow2", "b1"],
            &["bitmap", "--disable", "a.qcow2", "b2"],
            &["bitmap", "--merge", "b1", "a.qcow2", "b2"],
            &["bitmap", "--add", "a.qcow2", "b1"],
            &["bitmap", "--add", "a.qcow2", "fresh"],
            &["bitmap", "--merge", "b2", "a.qcow2", "fresh"],
            &["bitmap", "--remove", "a.qcow2", "b1"],
            &["bitmap", "--remove", "a.qcow2", "b3"],
        ],
    );
}

#[test]
fn empty_bitmaps_allocate_no_data_clusters() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    new_qcow2(d, "a.qcow2", "64M", &["-o", "cluster_size=4k"]);
    let before = std::fs::metadata(d.join("a.qcow2")).unwrap().len();
    // 64 MiB at 512 bytes per bit: 16 KiB of bitmap, 4 data clusters if they were written
    ok(diskit_as_qemu(
        d,
        &["bitmap", "--add", "-g", "512", "a.qcow2", "b"],
    ));
    let after = std::fs::metadata(d.join("a.qcow2")).unwrap().len();
    // one table cluster and one directory cluster
    assert!(after - before <= 2 * 4096, "grew by {}", after - before);
    check_clean(d, "a.qcow2");
    let out: Output = ok(qemu_img(d, &["check", "--output=json", "a.qcow2"]));
    assert_eq!(json(&out)["check-errors"], 0);
}
