//! qcow2 reading: images made by qemu-img/qemu-io, read by diskit, compared byte for byte.

mod common;

use common::*;
use diskit::{Mapping, OpenOptions};
use std::path::Path;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes a mix of data, zeroes, discards and partial clusters with qemu-io.
fn scribble(dir: &Path, img: &str, cs: u64) {
    let c = |x: u64| (x * cs).to_string();
    let list = [
        format!("write -P 0x11 0 {}", c(3)),
        format!("write -P 0x22 {} 700", cs * 5 + 100),
        format!("write -z {} {}", c(1), c(1)),
        format!("write -P 0x33 {} {}", c(8), c(2)),
        format!("discard {} {}", c(9), c(1)),
        format!("write -P 0x44 {} 512", cs * 12 + 512),
        format!("write -z {} {}", c(14), c(2)),
    ];
    let refs: Vec<&str> = list.iter().map(|x| x.as_str()).collect();
    ok(qemu_io(dir, "qcow2", img, &refs));
}

fn compare(dir: &Path, img: &str) {
    let want = qemu_raw(dir, img, None);
    let got = diskit_raw(&dir.join(img));
    assert_eq!(want.len(), got.len(), "size of {img}");
    if want != got {
        let first = want.iter().zip(&got).position(|(a, b)| a != b).unwrap();
        panic!("{img}: content differs first at offset {first:#x}");
    }
}

#[test]
fn read_variants_match_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    let variants: &[(&str, u64)] = &[
        ("compat=0.10", 65536),
        ("compat=1.1", 65536),
        ("cluster_size=512", 512),
        ("cluster_size=2M", 2 << 20),
        ("cluster_size=4k,refcount_bits=1", 4096),
        ("extended_l2=on,cluster_size=64k", 65536),
        ("extended_l2=on,cluster_size=16k,refcount_bits=64", 16384),
        ("compression_type=zstd", 65536),
    ];
    for (i, (o, cs)) in variants.iter().enumerate() {
        let name = format!("v{i}.qcow2");
        let size = (cs * 20).to_string();
        ok(qemu_img(
            dir,
            &["create", "-q", "-f", "qcow2", "-o", o, &name, &size],
        ));
        scribble(dir, &name, *cs);
        compare(dir, &name);
    }
}

#[test]
fn compressed_images_match_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    // data with repeats further apart than 4 KiB and some incompressible parts
    let mut data = Vec::new();
    for i in 0..48u64 {
        let chunk = pattern(3000, i % 5);
        data.extend_from_slice(&chunk);
        data.extend_from_slice(&vec![(i % 7) as u8; 5000]);
    }
    data.extend_from_slice(&pattern(70000, 99));
    data.resize(1 << 20, 0);
    std::fs::write(dir.join("src.raw"), &data).unwrap();
    for (i, o) in [
        "compression_type=zlib",
        "compression_type=zstd",
        "cluster_size=4k",
        "cluster_size=512",
        "compat=0.10",
        "extended_l2=on,cluster_size=32k",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("c{i}.qcow2");
        ok(qemu_img(
            dir,
            &[
                "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", o, "src.raw", &name,
            ],
        ));
        compare(dir, &name);
        let got = diskit_raw(&dir.join(&name));
        assert_eq!(got, data, "{name}");
        let img = diskit::open(s(&dir.join(&name)), &OpenOptions::read_only()).unwrap();
        let mut off = 0;
        let mut compressed = 0;
        while off < 1 << 20 {
            let (m, n) = img.map(off, (1 << 20) - off).unwrap();
            assert!(n > 0);
            if m == Mapping::Compressed {
                compressed += n;
            }
            off += n;
        }
        assert!(
            compressed >= 1 << 17,
            "{name}: only {compressed} bytes compressed"
        );
    }
}

#[test]
fn backing_chain_reads() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "raw", "base.raw", "300k"],
    ));
    ok(qemu_io(dir, "raw", "base.raw", &["write -P 0x5a 0 300k"]));
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(
        dir,
        "qcow2",
        "mid.qcow2",
        &["write -P 0x66 64k 64k", "write -z 128k 64k"],
    ));
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(
        dir,
        "qcow2",
        "top.qcow2",
        &["write -P 0x77 2k 3k", "write -P 0x78 200k 1k"],
    ));
    compare(dir, "top.qcow2");
    let img = diskit::open(s(&dir.join("top.qcow2")), &OpenOptions::read_only()).unwrap();
    assert!(img.backing().is_some());
    assert_eq!(img.map(0, 2048).unwrap(), (Mapping::Unallocated, 2048));
    let no_backing = OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    };
    let img = diskit::open(s(&dir.join("top.qcow2")), &no_backing).unwrap();
    assert!(img.backing().is_none());
}

#[test]
fn external_data_file() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=img.data",
            "img.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(
        dir,
        "qcow2",
        "img.qcow2",
        &["write -P 0x12 0 100k", "write -z 300k 64k"],
    ));
    compare(dir, "img.qcow2");
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=raw.data,data_file_raw=on",
            "raw.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(
        dir,
        "qcow2",
        "raw.qcow2",
        &["write -P 0x13 4k 100k"],
    ));
    compare(dir, "raw.qcow2");
    let img = diskit::open(s(&dir.join("raw.qcow2")), &OpenOptions::read_only()).unwrap();
    match img.map(0, 1 << 20).unwrap().0 {
        Mapping::Data { host_offset } => assert_eq!(host_offset, 0),
        m => panic!("unexpected {m:?}"),
    }
}

#[test]
fn snapshots_listed() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    ));
    ok(qemu_io(dir, "qcow2", "s.qcow2", &["write -P 1 0 64k"]));
    ok(qemu_img(dir, &["snapshot", "-c", "first", "s.qcow2"]));
    ok(qemu_io(dir, "qcow2", "s.qcow2", &["write -P 2 0 32k"]));
    ok(qemu_img(dir, &["snapshot", "-c", "second", "s.qcow2"]));
    compare(dir, "s.qcow2");
    let img = diskit::open(s(&dir.join("s.qcow2")), &OpenOptions::read_only()).unwrap();
    let info = img.info().unwrap();
    let names: Vec<_> = info.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    assert_eq!(info.snapshots[0].id, "1");
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn open_err(path: &Path) -> String {
    match diskit::open(s(path), &OpenOptions::read_only()) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

/// The feature name table as qemu reads it (iotest 036): a short last entry padded with
/// zeroes names its feature; unknown autoclear bits go on a writable open, `check -r` too.
#[test]
fn feature_table_and_autoclear_bits_like_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "f.qcow2", "1M"],
    ));
    let p = dir.join("f.qcow2");
    // one feature-table extension of 14 bytes, then the end of the extensions
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x6803_f857u32.to_be_bytes());
    ext.extend_from_slice(&14u32.to_be_bytes());
    ext.extend_from_slice(b"\x00\x3fTest feature\0\0");
    ext.extend_from_slice(&[0u8; 8]);
    patch(&p, 112, &ext);
    for bits in [1u64 << 63, 0x6000_0000_0000_0000, 0xe000_0000_0000_0000] {
        patch(&p, 72, &bits.to_be_bytes());
        let out = same_as_qemu(dir, &["info", "f.qcow2"]);
        assert!(
            stderr(&out).contains("Unsupported qcow2 feature(s): "),
            "{}",
            stderr(&out)
        );
    }
    let out = same_as_qemu(dir, &["info", "f.qcow2"]);
    assert!(stderr(&out).contains("Test feature, Unknown incompatible feature: 6000000000000000"));

    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    ));
    let a = dir.join("a.qcow2");
    patch(&a, 88, &(1u64 << 63).to_be_bytes());
    let (qd, dd) = same_effect_as_qemu(dir, &["a.qcow2"], &["check", "-r", "all", "a.qcow2"]);
    for w in [qd, dd] {
        let raw = std::fs::read(w.join("a.qcow2")).unwrap();
        assert_eq!(&raw[88..96], &[0u8; 8], "{}", w.display());
    }
}

/// A snapshot table entry with more than 1 KiB of extra data (iotest 261): qemu-img's
/// message names the entry and the repair, for info and check alike.
#[test]
fn oversized_snapshot_extra_data_like_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    ));
    for n in ["a", "b"] {
        ok(qemu_img(dir, &["snapshot", "-c", n, "s.qcow2"]));
    }
    let p = dir.join("s.qcow2");
    let second = snapshot_entries(&p)[1];
    patch(&p, second + 36, &4096u32.to_be_bytes());
    let out = same_as_qemu(dir, &["info", "s.qcow2"]);
    assert!(stderr(&out).contains("snapshot table entry 1\nYou can force-remove"));
    same_as_qemu(dir, &["check", "s.qcow2"]);
}

/// A v3 snapshot table entry with less than the 16 bytes of extra data v3 requires
/// (iotest 261): `check` reports it, `check -r all` completes it as qemu-img does.
#[test]
fn incomplete_snapshot_entries_are_repaired_like_qemu() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"],
    ));
    for n in ["a", "b"] {
        ok(qemu_img(dir, &["snapshot", "-c", n, "s.qcow2"]));
    }
    let p = dir.join("s.qcow2");
    let raw = std::fs::read(&p).unwrap();
    let at = snapshot_entries(&p);
    let (table, second) = (at[0] as usize, at[1] as usize);
    // the first entry keeps 8 of its 24 bytes of extra data; the second follows it
    let e = |at: usize| {
        let id = u16::from_be_bytes([raw[at + 12], raw[at + 13]]) as usize;
        let name = u16::from_be_bytes([raw[at + 14], raw[at + 15]]) as usize;
        let extra = u32::from_be_bytes(raw[at + 36..at + 40].try_into().unwrap()) as usize;
        (id + name, extra)
    };
    let (ids0, ex0) = e(table);
    let (ids1, ex1) = e(second);
    let mut t = raw[table..table + 40].to_vec();
    t[36..40].copy_from_slice(&8u32.to_be_bytes());
    t.extend_from_slice(&raw[table + 40..table + 48]);
    t.extend_from_slice(&raw[table + 40 + ex0..table + 40 + ex0 + ids0]);
    t.resize(t.len().div_ceil(8) * 8, 0);
    t.extend_from_slice(&raw[second..second + 40 + ex1 + ids1]);
    t.resize(t.len().div_ceil(8) * 8 + 64, 0);
    patch(&p, table as u64, &t);
    let out = same_as_qemu(dir, &["check", "s.qcow2"]);
    let all = stdout(&out) + &stderr(&out);
    assert!(
        all.contains("ERROR snapshot table entry 0 is incomplete"),
        "{all}"
    );
    let (qd, dd) = same_effect_as_qemu(dir, &["s.qcow2"], &["check", "-r", "all", "s.qcow2"]);
    // (disk size may differ by a file system block)
    let info = |w: &Path| {
        stdout(&ok(qemu_img(w, &["info", "s.qcow2"])))
            .lines()
            .filter(|l| !l.contains("disk size"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(info(&dd), info(&qd));
    same_as_qemu(&dd, &["check", "s.qcow2"]);
}

#[test]
fn hostile_headers_are_refused() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    let mk = |name: &str| {
        ok(qemu_img(dir, &["create", "-q", "-f", "qcow2", name, "1M"]));
        dir.join(name)
    };
    let p = mk("feat.qcow2");
    patch(&p, 72, &(1u64 << 40 | 1 << 5).to_be_bytes());
    let e = open_err(&p);
    assert!(
        e.contains("Unsupported qcow2 feature(s): Unknown incompatible feature: 10000000020"),
        "{e}"
    );

    let p = mk("l1.qcow2");
    patch(&p, 40, &(0x30200u64).to_be_bytes());
    assert!(open_err(&p).contains("Active L1 table offset invalid"));

    let p = mk("l1big.qcow2");
    patch(&p, 36, &(0x0800_0000u32).to_be_bytes());
    assert!(open_err(&p).contains("Active L1 table too large"));

    let p = mk("rt.qcow2");
    patch(&p, 48, &(1u64 << 40).to_be_bytes());
    assert!(open_err(&p).contains("beyond the end of the file"));

    let p = mk("cb.qcow2");
    patch(&p, 20, &30u32.to_be_bytes());
    assert!(open_err(&p).contains("Unsupported cluster size: 2^30"));

    let p = mk("ver.qcow2");
    patch(&p, 4, &4u32.to_be_bytes());
    assert!(open_err(&p).contains("Unsupported qcow2 version 4"));

    // encryption: diskit has no key to give, as qemu-img without --object secret
    for (method, expected) in [
        (
            1u32,
            "Parameter 'encrypt.key-secret' is required for cipher",
        ),
        (2, "Missing CRYPTO header for crypt method 2"),
        (3, "Unsupported encryption method 3"),
    ] {
        let p = mk(&format!("enc{method}.qcow2"));
        patch(&p, 32, &method.to_be_bytes());
        let e = open_err(&p);
        assert!(e.contains(expected), "{e}");
    }

    // L2 table pointer that is not cluster aligned: read fails cleanly
    let p = mk("l2.qcow2");
    ok(qemu_io(dir, "qcow2", "l2.qcow2", &["write 0 4k"]));
    patch(&p, 0x30000, &(0x8000_0000_0005_0200u64).to_be_bytes());
    let img = diskit::open(s(&p), &OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; 4096];
    let e = img.read_at(&mut b, 0).unwrap_err().to_string();
    assert!(e.contains("not cluster-aligned"), "{e}");
}

#[test]
fn dirty_image_is_readable() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "d.qcow2",
            "1M",
        ],
    ));
    ok(qemu_io(dir, "qcow2", "d.qcow2", &["write -P 9 0 64k"]));
    patch(&dir.join("d.qcow2"), 72, &1u64.to_be_bytes());
    let img = diskit::open(s(&dir.join("d.qcow2")), &OpenOptions::read_only()).unwrap();
    assert!(img.info().unwrap().dirty_flag);
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 9));
}
