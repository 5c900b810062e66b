//! `check` on vmdk images, against qemu-img: clean images of every subformat (made by qemu
//! and by diskit) and damaged ones (grain entries past the end of the file, a grain used
//! twice, directories past the end, truncated flat extents) print the same stdout and
//! stderr and exit with the same code.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

fn u32_at(f: &std::fs::File, off: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    u32::from_le_bytes(b)
}

fn u64_at(f: &std::fs::File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_le_bytes(b)
}

/// Byte offset of the grain directory (`redundant`: the redundant one) of a hosted sparse
/// file, from its header or, for VMware's stream layout, its footer.
fn gd_offset(path: &Path, redundant: bool) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut hdr = 0u64;
    if u64_at(&f, 56) == u64::MAX {
        hdr = f.metadata().unwrap().len() - 1024;
    }
    u64_at(&f, hdr + if redundant { 48 } else { 56 }) * 512
}

/// Sets grain table entry `idx` of the first grain table (of the primary directory, or the
/// redundant one) to `value`; returns the old value.
fn poke_gte(path: &Path, idx: u64, value: u32, redundant: bool) -> u32 {
    let gd = gd_offset(path, redundant);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let gt = u32_at(&f, gd) as u64 * 512;
    assert!(gt > 0, "no first grain table in {path:?}");
    let old = u32_at(&f, gt + idx * 4);
    f.write_all_at(&value.to_le_bytes(), gt + idx * 4).unwrap();
    old
}

/// Sets entry `idx` of the grain directory to `value`.
fn poke_gde(path: &Path, idx: u64, value: u32, redundant: bool) {
    let gd = gd_offset(path, redundant);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&value.to_le_bytes(), gd + idx * 4).unwrap();
}

fn same_check(dir: &Path, img: &str) {
    same_as_qemu(dir, &["check", img]);
    same_as_qemu(dir, &["check", "--output=json", img]);
    same_as_qemu(dir, &["check", "-r", "all", img]);
    same_as_qemu(dir, &["check", "-q", "-f", "vmdk", img]);
}

/// A 4 MiB raw source: compressible text, random data across grains, zero runs.
fn source(dir: &Path) {
    let mut d = vec![0u8; 4 << 20];
    let text = b"the quick brown fox jumps over the lazy dog 0123456789\n";
    for (i, b) in d[..200_000].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    d[1 << 20..(1 << 20) + 300_000].copy_from_slice(&pattern(300_000, 7));
    d[(4 << 20) - 512..].fill(0x5a);
    std::fs::write(dir.join("src.raw"), d).unwrap();
}

#[test]
fn clean_images_of_every_subformat_check_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    source(dir);
    for sf in SUBFORMATS {
        let q = format!("q-{sf}.vmdk");
        ok(qemu_img(
            dir,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sf}"),
                "src.raw",
                &q,
            ],
        ));
        same_check(dir, &q);
        let d = format!("d-{sf}.vmdk");
        ok(diskit(
            dir,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sf}"),
                "src.raw",
                &d,
            ],
        ));
        let out = same_as_qemu(dir, &["check", &d]);
        assert_eq!(stdout(&out), "No errors were found on the image.\n");
        same_check(dir, &d);
    }
    // an empty image, freshly created by each tool
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "vmdk", "qe.vmdk", "1G"],
    ));
    ok(diskit(
        dir,
        &["create", "-q", "-f", "vmdk", "de.vmdk", "1G"],
    ));
    same_check(dir, "qe.vmdk");
    same_check(dir, "de.vmdk");
}

#[test]
fn grain_past_the_end_fails_the_check_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    source(dir);
    let mut cases = Vec::new();
    for (tool, sf) in [
        ("qemu", "monolithicSparse"),
        ("diskit", "monolithicSparse"),
        ("qemu", "streamOptimized"),
        ("diskit", "streamOptimized"),
    ] {
        let img = format!("{tool}-{sf}.vmdk");
        let args = [
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sf}"),
            "src.raw",
            &img,
        ];
        ok(if tool == "qemu" {
            qemu_img(dir, &args)
        } else {
            diskit(dir, &args)
        });
        cases.push(img);
    }
    for img in &cases {
        for (idx, what) in [(0u64, "first"), (17, "later")] {
            let bad = format!("{what}-{img}");
            std::fs::copy(dir.join(img), dir.join(&bad)).unwrap();
            poke_gte(&dir.join(&bad), idx, 0x0100_0000, false);
            let out = same_as_qemu(dir, &["check", &bad]);
            assert_eq!(out.status.code(), Some(1));
            let sector = idx * 128;
            assert_eq!(
                stderr(&out),
                format!(
                    "ERROR: cluster offset for sector {sector} points after EOF\nqemu-img: Check failed: Invalid argument\n"
                )
            );
            assert_eq!(stdout(&out), "");
            same_check(dir, &bad);
        }
    }
    // the entry just at the end of the file counts as past it; one sector before does not
    let img = "edge.vmdk";
    std::fs::copy(dir.join(&cases[0]), dir.join(img)).unwrap();
    let len = std::fs::metadata(dir.join(img)).unwrap().len();
    poke_gte(&dir.join(img), 5, (len / 512) as u32, false);
    let out = same_as_qemu(dir, &["check", img]);
    assert_eq!(out.status.code(), Some(1));
    poke_gte(&dir.join(img), 5, (len / 512 - 1) as u32, false);
    let out = same_as_qemu(dir, &["check", img]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn other_damage_checks_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    source(dir);
    ok(qemu_img(
        dir,
        &["convert", "-O", "vmdk", "src.raw", "base.vmdk"],
    ));
    let copy = |name: &str| {
        std::fs::copy(dir.join("base.vmdk"), dir.join(name)).unwrap();
        dir.join(name)
    };
    // a grain used by two entries: QEMU does not look for this, and neither do we
    let p = copy("twice.vmdk");
    let first = poke_gte(&p, 0, 0, false);
    assert!(first > 1);
    poke_gte(&p, 3, first, false);
    poke_gte(&p, 0, first, false);
    let out = same_as_qemu(dir, &["check", "twice.vmdk"]);
    assert_eq!(out.status.code(), Some(0));
    // a directory entry naming a grain table past the end: it reads as empty in both
    let p = copy("gde.vmdk");
    poke_gde(&p, 0, 0x0100_0000, false);
    same_check(dir, "gde.vmdk");
    poke_gde(&p, 0, 0x0100_0000, true);
    same_check(dir, "gde.vmdk");
    // the redundant table damaged only: QEMU reads the primary one
    let p = copy("rgt.vmdk");
    poke_gte(&p, 0, 0x0100_0000, true);
    let out = same_as_qemu(dir, &["check", "rgt.vmdk"]);
    assert_eq!(out.status.code(), Some(0));
    // zeroed-grain entries (GTE 1) are fine
    let p = copy("zero.vmdk");
    poke_gte(&p, 2, 1, false);
    let out = same_as_qemu(dir, &["check", "zero.vmdk"]);
    assert_eq!(out.status.code(), Some(0));
    // the grain directory itself past the end of the file
    let p = copy("gd.vmdk");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&0x0100_0000u64.to_le_bytes(), 56).unwrap();
    drop(f);
    same_check(dir, "gd.vmdk");
}

#[test]
fn split_and_flat_extents_check_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    source(dir);
    for sf in [
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "monolithicFlat",
    ] {
        let img = format!("{sf}.vmdk");
        ok(qemu_img(
            dir,
            &[
                "convert",
                "-O",
                "vmdk",
                "-o",
                &format!("subformat={sf}"),
                "src.raw",
                &img,
            ],
        ));
    }
    // a grain in the extent file of a split image
    poke_gte(
        &dir.join("twoGbMaxExtentSparse-s001.vmdk"),
        16,
        0x0100_0000,
        false,
    );
    let out = same_as_qemu(dir, &["check", "twoGbMaxExtentSparse.vmdk"]);
    assert!(stderr(&out).contains("sector 2048 points after EOF"));
    // flat extent files cut to nothing
    for f in ["twoGbMaxExtentFlat-f001.vmdk", "monolithicFlat-flat.vmdk"] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(f))
            .unwrap()
            .set_len(0)
            .unwrap();
    }
    for img in ["twoGbMaxExtentFlat.vmdk", "monolithicFlat.vmdk"] {
        let out = same_as_qemu(dir, &["check", img]);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("sector 0 points after EOF"));
        same_check(dir, img);
    }
}
