//! `convert -l` (internal snapshots), `measure -l`, `convert --bitmaps` and `convert -C`
//! against qemu-img: same output, exit code and resulting images.

mod common;
use common::*;
use std::path::Path;

/// `a.qcow2`: 1 MiB with 0x11 at 0 (snapshot s1), then 0x22/0x33 written, grown to 2 MiB
/// (snapshot s2), then 0x44 written at 1.5 MiB (current state only).
fn snap_image(d: &Path) {
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    ));
    ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 0x11 0 64k"]));
    ok(qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]));
    ok(qemu_io(
        d,
        "qcow2",
        "a.qcow2",
        &["write -P 0x22 0 32k", "write -P 0x33 512k 64k"],
    ));
    ok(qemu_img(d, &["resize", "-q", "a.qcow2", "2M"]));
    ok(qemu_img(d, &["snapshot", "-c", "s2", "a.qcow2"]));
    ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 0x44 1536k 64k"]));
}

fn map(dir: &Path, file: &str) -> String {
    stdout(&ok(qemu_img(dir, &["map", "--output=json", file])))
}

/// Runs `args` (writing `o.img`) with both tools on copies of `files`; asserts the same
/// output, untouched sources, and the same target content and allocation. Returns the
/// target's guest content.
fn same_convert(d: &Path, files: &[&str], args: &[&str]) -> Vec<u8> {
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(d.join(f)).unwrap())
        .collect();
    let (q, k) = same_effect_as_qemu(d, files, args);
    for (f, b) in files.iter().zip(&before) {
        assert!(
            std::fs::read(k.join(f)).unwrap() == *b,
            "{f} changed by {args:?}"
        );
    }
    let a = qemu_raw(&q, "o.img", None);
    let b = qemu_raw(&k, "o.img", None);
    assert!(a == b, "target content differs for {args:?}");
    assert_eq!(
        map(&q, "o.img"),
        map(&k, "o.img"),
        "allocation for {args:?}"
    );
    b
}

#[test]
fn convert_from_internal_snapshot_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    snap_image(d);
    std::fs::write(d.join("r.raw"), pattern(64 << 10, 3)).unwrap();
    for (sel, first) in [
        ("s1", 0x11u8),
        ("1", 0x11),
        ("s2", 0x22),
        ("snapshot.id=1", 0x11),
        ("snapshot.name=s2", 0x22),
        ("snapshot.id=1,snapshot.name=s1", 0x11),
        ("snapshot.id=1,snapshot.id=2", 0x22),
        ("snapshot.name=s1,id=x", 0x11),
    ] {
        for fmt in ["qcow2", "raw"] {
            let args = ["convert", "-O", fmt, "-l", sel, "a.qcow2", "o.img"];
            let data = same_convert(d, &["a.qcow2"], &args);
            // the snapshot's data, at the image's current size
            assert_eq!(data.len(), 2 << 20, "{args:?}");
            assert_eq!(data[0], first, "{args:?}");
            assert_eq!(data[1536 << 10], 0, "{args:?}: current data leaked in");
        }
    }
    // the ID=...,name=... form loads the snapshot on the first source only
    let data = same_convert(
        d,
        &["a.qcow2", "r.raw"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-l",
            "snapshot.id=1",
            "a.qcow2",
            "r.raw",
            "o.img",
        ],
    );
    assert_eq!(data.len(), (2 << 20) + (64 << 10));
    // -s (the old form, a diskit extension) is -l ID_OR_NAME
    let out = ok(diskit(
        d,
        &["convert", "-O", "raw", "-s", "s1", "a.qcow2", "s.raw"],
    ));
    assert!(stderr(&out).is_empty());
    let l = ok(diskit(
        d,
        &["convert", "-O", "raw", "-l", "s1", "a.qcow2", "l.raw"],
    ));
    assert!(stderr(&l).is_empty());
    assert!(std::fs::read(d.join("s.raw")).unwrap() == std::fs::read(d.join("l.raw")).unwrap());
}

#[test]
fn snapshot_option_errors_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    snap_image(d);
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]));
    ok(qemu_img(d, &["create", "-q", "-f", "vmdk", "v.vmdk", "1M"]));
    let bad: &[&str] = &[
        "nope",
        "snapshot.id=2,snapshot.name=s1",
        "snapshot.foo=1",
        "snapshot.id=",
        "snapshot.name",
        "snapshot.",
        "snapshot.name=s1,foo",
        "snapshot.name=a,,b",
        "snapshot.id=1,help",
        "snapshot.id=1,?",
        "snapshot.id=1,id=1x",
        "snapshot.id=1,nosnapshot.name",
        "snapshot.id=1,,,snapshot.name=s1",
    ];
    for sel in bad {
        same_as_qemu(
            d,
            &["convert", "-O", "qcow2", "-l", sel, "a.qcow2", "o.img"],
        );
        same_as_qemu(d, &["measure", "-O", "qcow2", "-l", sel, "a.qcow2"]);
        assert!(!d.join("o.img").exists(), "{sel}: target created");
    }
    let cases: &[&[&str]] = &[
        &["convert", "-l", "s1", "r.raw", "o.img"],
        &["convert", "-l", "snapshot.id=1", "r.raw", "o.img"],
        &["convert", "-l", "s1", "v.vmdk", "o.img"],
        &["convert", "-l", "s1", "a.qcow2", "a.qcow2", "o.img"],
        &["convert", "-l", "nope", "a.qcow2", "r.raw", "o.img"],
        &["convert", "-l", "s1", "missing.qcow2", "o.img"],
        &["convert", "-l", "s1", "-O", "foo", "a.qcow2", "o.img"],
        &["convert", "-l", "nope", "-O", "foo", "a.qcow2", "o.img"],
        &["measure", "-l", "s1", "r.raw"],
        &["measure", "-l", "s1", "--size", "1M"],
        &["measure", "-l", "nope", "-O", "foo", "a.qcow2"],
    ];
    for args in cases {
        same_as_qemu(d, args);
        assert!(!d.join("o.img").exists(), "{args:?}: target created");
    }
}

#[test]
fn measure_of_a_snapshot_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    snap_image(d);
    let mut seen = Vec::new();
    for sel in ["s1", "s2", "snapshot.id=2", "snapshot.name=s1"] {
        for fmt in ["qcow2", "raw"] {
            let out = same_as_qemu(d, &["measure", "-O", fmt, "-l", sel, "a.qcow2"]);
            assert!(out.status.success());
            seen.push(stdout(&out));
            same_as_qemu(
                d,
                &["measure", "--output=json", "-O", fmt, "-l", sel, "a.qcow2"],
            );
        }
    }
    let current = stdout(&same_as_qemu(d, &["measure", "-O", "qcow2", "a.qcow2"]));
    assert_ne!(seen[0], current, "s1 measured like the current state");
}

/// Sets the in-use flag of bitmap `want` in the bitmap directory (an inconsistent bitmap).
fn set_in_use(path: &Path, want: &str) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = vec![0u8; 4096];
    f.read_exact_at(&mut h, 0).unwrap();
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap());
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let mut off = be32(&h, 100) as usize;
    let (dsz, doff) = loop {
        let (t, l) = (be32(&h, off), be32(&h, off + 4) as usize);
        assert_ne!(t, 0, "no bitmaps extension");
        if t == 0x2385_2875 {
            break (be64(&h, off + 16) as usize, be64(&h, off + 24));
        }
        off += 8 + l.div_ceil(8) * 8;
    };
    let mut dir = vec![0u8; dsz];
    f.read_exact_at(&mut dir, doff).unwrap();
    let mut p = 0;
    while p < dir.len() {
        let ns = u16::from_be_bytes([dir[p + 18], dir[p + 19]]) as usize;
        let ex = be32(&dir, p + 20) as usize;
        if &dir[p + 24 + ex..p + 24 + ex + ns] == want.as_bytes() {
            let flags = be32(&dir, p + 12) | 1;
            f.write_all_at(&flags.to_be_bytes(), doff + p as u64 + 12)
                .unwrap();
            return;
        }
        p += (24 + ex + ns).div_ceil(8) * 8;
    }
    panic!("bitmap {want} not found");
}

/// (name, granularity, flags, bits) of each persistent bitmap, through the diskit library.
fn bitmaps(path: &Path) -> Vec<(String, u64, u32, Vec<u8>)> {
    let img = diskit::open(path.to_str().unwrap(), &diskit::OpenOptions::read_only()).unwrap();
    let q = img
        .as_any()
        .downcast_ref::<diskit::formats::qcow2::Qcow2>()
        .expect("qcow2");
    q.bitmap_list()
        .iter()
        .map(|b| {
            let bits = q.read_bitmap(&b.name).unwrap().unwrap().bits;
            (b.name.clone(), b.granularity, b.flags, bits)
        })
        .collect()
}

#[test]
fn convert_bitmaps_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"],
    ));
    ok(qemu_io(d, "qcow2", "b.qcow2", &["write -P 1 0 64k"]));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "64k", "b.qcow2", "bm1"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", "b.qcow2", "bm2"]));
    ok(qemu_img(
        d,
        &["bitmap", "--add", "-g", "512", "b.qcow2", "bm0"],
    ));
    // qemu-io dirties the enabled bitmaps
    ok(qemu_io(
        d,
        "qcow2",
        "b.qcow2",
        &["write -P 2 1M 128k", "write -P 3 3M 64k"],
    ));
    ok(qemu_img(d, &["bitmap", "--disable", "b.qcow2", "bm2"]));
    ok(qemu_io(d, "qcow2", "b.qcow2", &["write -P 4 2M 64k"]));
    ok(qemu_img(d, &["snapshot", "-c", "s1", "b.qcow2"]));
    std::fs::copy(d.join("b.qcow2"), d.join("bi.qcow2")).unwrap();
    set_in_use(&d.join("bi.qcow2"), "bm2");
    // two inconsistent bitmaps: qemu-img names them last to first
    std::fs::copy(d.join("b.qcow2"), d.join("bi2.qcow2")).unwrap();
    set_in_use(&d.join("bi2.qcow2"), "bm1");
    set_in_use(&d.join("bi2.qcow2"), "bm2");
    ok(qemu_img(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "b.qcow2",
            "v2.qcow2",
        ],
    ));
    std::fs::write(d.join("r.raw"), pattern(1 << 20, 5)).unwrap();

    let src = bitmaps(&d.join("b.qcow2"));
    assert_eq!(src.len(), 3);
    assert!(src[0].3.iter().any(|&b| b != 0), "bm1 was not dirtied");
    for args in [
        &["convert", "--bitmaps", "-O", "qcow2", "b.qcow2", "o.img"][..],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-l",
            "s1",
            "b.qcow2",
            "o.img",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "bi.qcow2",
            "o.img",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "bi2.qcow2",
            "o.img",
        ],
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "b.qcow2",
            "o.img",
        ],
    ] {
        let (q, k) = same_effect_as_qemu(d, &["b.qcow2", "bi.qcow2", "bi2.qcow2"], args);
        let (bq, bk) = (bitmaps(&q.join("o.img")), bitmaps(&k.join("o.img")));
        assert_eq!(bq, bk, "bitmaps differ for {args:?}");
        assert!(!bk.is_empty());
        let info = |dir: &Path| {
            let v = json(&ok(qemu_img(dir, &["info", "--output=json", "o.img"])));
            v["format-specific"]["data"]["bitmaps"].clone()
        };
        assert_eq!(info(&q), info(&k), "{args:?}");
        let chk = stdout(&ok(qemu_img(&k, &["check", "o.img"])));
        assert!(chk.contains("No errors"), "{chk}");
        assert_eq!(map(&q, "o.img"), map(&k, "o.img"), "{args:?}");
    }
    // the bitmaps of the source, bit for bit
    let (_, k) = same_effect_as_qemu(
        d,
        &["b.qcow2"],
        &["convert", "--bitmaps", "-O", "qcow2", "b.qcow2", "o.img"],
    );
    assert_eq!(bitmaps(&k.join("o.img")), src);

    let errors: &[&[&str]] = &[
        &["convert", "--bitmaps", "-O", "raw", "b.qcow2", "o.img"],
        &["convert", "--bitmaps", "-O", "vdi", "b.qcow2", "o.img"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10",
            "b.qcow2",
            "o.img",
        ],
        &["convert", "--bitmaps", "-O", "qcow2", "r.raw", "o.img"],
        &["convert", "--bitmaps", "-O", "qcow2", "v2.qcow2", "o.img"],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "b.qcow2",
            "b.qcow2",
            "o.img",
        ],
        &["convert", "--bitmaps", "-O", "qcow2", "bi.qcow2", "o.img"],
        &["convert", "--bitmaps", "-O", "qcow2", "bi2.qcow2", "o.img"],
        &["convert", "--skip-broken-bitmaps", "b.qcow2", "o.img"],
    ];
    for args in errors {
        same_as_qemu(d, args);
        let _ = std::fs::remove_file(d.join("o.img"));
    }
}

#[test]
fn copy_offloading_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    // data, a hole, zeroes written as data, mixed data
    mixed_raw(d, "src.raw", 8 << 20);
    // a raw file whose last sector is partial: the kernel copy stops short, both fall back
    std::fs::write(d.join("odd.raw"), pattern((1 << 20) + 100, 3)).unwrap();
    ok(qemu_img(
        d,
        &[
            "convert", "-f", "raw", "-O", "qcow2", "-S", "0", "src.raw", "s.qcow2",
        ],
    ));
    ok(qemu_io(d, "qcow2", "s.qcow2", &["write -z 64k 64k"]));
    for args in [
        &[
            "convert", "-C", "-f", "raw", "-O", "raw", "src.raw", "o.img",
        ][..],
        &[
            "convert", "-C", "-W", "-m", "4", "-f", "raw", "-O", "raw", "src.raw", "o.img",
        ],
        &[
            "convert", "-C", "-f", "raw", "-O", "qcow2", "src.raw", "o.img",
        ],
        &["convert", "-C", "-O", "qcow2", "s.qcow2", "o.img"],
        &["convert", "-C", "-O", "vdi", "s.qcow2", "o.img"],
        &[
            "convert", "-C", "-f", "raw", "-O", "raw", "odd.raw", "o.img",
        ],
        &[
            "convert", "-C", "-f", "raw", "-O", "qcow2", "-B", "s.qcow2", "-F", "qcow2", "src.raw",
            "o.img",
        ],
    ] {
        same_convert(d, &["src.raw", "odd.raw", "s.qcow2"], args);
    }
    // -n onto an existing raw file
    std::fs::write(d.join("big.raw"), pattern(9 << 20, 9)).unwrap();
    let (q, k) = same_effect_as_qemu(
        d,
        &["src.raw", "big.raw"],
        &[
            "convert", "-C", "-n", "-f", "raw", "-O", "raw", "src.raw", "big.raw",
        ],
    );
    assert!(std::fs::read(q.join("big.raw")).unwrap() == std::fs::read(k.join("big.raw")).unwrap());
    for args in [
        &["convert", "-C", "-c", "-O", "qcow2", "src.raw", "o.img"][..],
        &["convert", "-C", "-S", "4k", "src.raw", "o.img"],
        &["convert", "-C", "--salvage", "src.raw", "o.img"],
    ] {
        same_as_qemu(d, args);
    }
}

#[test]
fn host_copy_range_copies_and_reports_short_sources() {
    let dir = tmpdir();
    let d = dir.path();
    let data = pattern(300_000, 7);
    std::fs::write(d.join("a"), &data).unwrap();
    std::fs::write(d.join("b"), vec![0u8; 400_000]).unwrap();
    let a = diskit::io::HostFile::open(d.join("a"), &diskit::io::HostOpenOptions::read()).unwrap();
    let b = diskit::io::HostFile::open(d.join("b"), &diskit::io::HostOpenOptions::write()).unwrap();
    a.copy_range_to(4096, &b, 8192, 200_000).unwrap();
    let out = std::fs::read(d.join("b")).unwrap();
    assert!(out[8192..208_192] == data[4096..204_096]);
    assert!(out[..8192].iter().all(|&x| x == 0));
    // past the end of the source: an error for the caller to fall back on
    assert!(a.copy_range_to(299_000, &b, 0, 4096).is_err());
}
