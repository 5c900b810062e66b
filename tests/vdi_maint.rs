//! VDI beyond qemu-img: compaction (with a crash test), resize, and hostile headers.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use diskit::formats::vdi::VdiDriver;
use diskit::io::fault::FaultMode;
use diskit::io::FaultInjector;
use diskit::{BlockDriver, CreateOpts, Format, OpenOptions};

const MIB: u64 = 1 << 20;

/// Tests in this file run one at a time: a qemu-img child forked by another test thread
/// inherits our open image descriptors (and their OFD locks) until it execs, which makes
/// concurrent opens fail with "Failed to get lock" now and then.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn open_rw(path: &Path) -> Box<dyn BlockDriver> {
    diskit::open(s(path), &OpenOptions::read_write()).expect("open rw")
}

fn vdi(img: &dyn BlockDriver) -> &VdiDriver {
    img.as_any()
        .downcast_ref::<VdiDriver>()
        .expect("vdi driver")
}

fn create(path: &Path, opts: &str) {
    diskit::create(s(path), Format::Vdi, &CreateOpts::parse(opts).unwrap()).expect("create");
}

fn qcheck(dir: &Path, path: &Path) {
    ok(qemu_img(dir, &["check", "-f", "vdi", s(path)]));
}

fn flen(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// qemu-img compare of the image with a raw model file.
fn qemu_same(dir: &Path, img: &Path, model: &[u8]) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    ok(qemu_img(
        dir,
        &["compare", "-q", "-f", "vdi", "-F", "raw", s(img), s(&raw)],
    ));
    std::fs::remove_file(raw).unwrap();
}

/// An image with 8 blocks of data where blocks 0, 2, 5 and 6 hold only zeroes.
fn half_zero_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let img = dir.join("c.vdi");
    create(&img, "size=8M");
    let mut model = vec![0u8; 8 * MIB as usize];
    let im = open_rw(&img);
    for b in 0..8u64 {
        let data = if [0, 2, 5, 6].contains(&b) {
            vec![0u8; MIB as usize]
        } else {
            pattern(MIB as usize, b + 1)
        };
        im.write_at(&data, b * MIB).unwrap();
        model[(b * MIB) as usize..((b + 1) * MIB) as usize].copy_from_slice(&data);
    }
    im.close().unwrap();
    (img, model)
}

#[test]
fn vdi_compact_shrinks_file() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let (img, model) = half_zero_image(d.path());
    assert_eq!(flen(&img), 0x400 + 8 * MIB);
    {
        let im = open_rw(&img);
        let st = vdi(&*im).compact().unwrap();
        assert_eq!(st.blocks_released, 4);
        assert_eq!(st.old_file_size, 0x400 + 8 * MIB);
        assert_eq!(st.new_file_size, 0x400 + 4 * MIB);
        im.close().unwrap();
    }
    // header + map (one sector each) + the 4 data blocks
    assert_eq!(flen(&img), 0x400 + 4 * MIB);
    qcheck(d.path(), &img);
    assert!(diskit_raw(&img) == model);
    assert!(qemu_raw(d.path(), s(&img), Some("vdi")) == model);
    // qemu can still allocate without clobbering anything.
    ok(qemu_io(d.path(), "vdi", s(&img), &["write -P 0xee 0 512"]));
    let mut m2 = model.clone();
    m2[..512].fill(0xee);
    assert!(diskit_raw(&img) == m2);
    qcheck(d.path(), &img);
    // A second compaction finds nothing to do.
    let im = open_rw(&img);
    let st = vdi(&*im).compact().unwrap();
    assert_eq!((st.blocks_released, st.blocks_moved), (0, 0));
}

#[test]
fn vdi_compact_crash_safe() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let (base, model) = half_zero_image(d.path());
    let work = d.path().join("w.vdi");
    // Count the write-side operations of a full run.
    std::fs::copy(&base, &work).unwrap();
    let total = {
        let f = Arc::new(FaultInjector::new(u64::MAX, FaultMode::StopWrites));
        let o = OpenOptions {
            faults: Some(f.clone()),
            ..OpenOptions::read_write()
        };
        let im = diskit::open(s(&work), &o).unwrap();
        vdi(&*im).compact().unwrap();
        drop(im);
        f.count()
    };
    assert!(total >= 8, "only {total} operations");
    assert_eq!(flen(&work), 0x400 + 4 * MIB);
    for n in 0..=total {
        std::fs::copy(&base, &work).unwrap();
        let f = Arc::new(FaultInjector::new(n, FaultMode::StopWrites));
        let o = OpenOptions {
            faults: Some(f.clone()),
            ..OpenOptions::read_write()
        };
        {
            let im = diskit::open(s(&work), &o).unwrap();
            let _ = vdi(&*im).compact();
        }
        assert_eq!(f.fired(), n < total, "n={n}");
        assert!(
            diskit_raw(&work) == model,
            "content changed after crash at op {n}"
        );
        let out = qemu_img(d.path(), &["check", "-f", "vdi", s(&work)]);
        assert!(
            out.status.success(),
            "qemu-img check after crash at op {n}: {}",
            stderr(&out)
        );
        let im = diskit::open(s(&work), &OpenOptions::read_only()).unwrap();
        assert!(vdi(&*im).check(false).unwrap().is_clean());
    }
    // Finishing an interrupted compaction reclaims everything.
    std::fs::copy(&base, &work).unwrap();
    {
        let f = Arc::new(FaultInjector::new(total / 2, FaultMode::StopWrites));
        let o = OpenOptions {
            faults: Some(f),
            ..OpenOptions::read_write()
        };
        let im = diskit::open(s(&work), &o).unwrap();
        let _ = vdi(&*im).compact();
    }
    let im = open_rw(&work);
    vdi(&*im).compact().unwrap();
    drop(im);
    assert_eq!(flen(&work), 0x400 + 4 * MIB);
    assert!(diskit_raw(&work) == model);
}

#[test]
fn vdi_resize_grow_and_shrink() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let img = d.path().join("r.vdi");
    // 3 MiB: the map sector has room for 128 blocks.
    ok(qemu_img(
        d.path(),
        &["create", "-q", "-f", "vdi", s(&img), "2.5M"],
    ));
    ok(qemu_io(
        d.path(),
        "vdi",
        s(&img),
        &["write -P 0x61 0 1M", "write -P 0x62 2M 512k"],
    ));
    let mut model = diskit_raw(&img);
    {
        let im = open_rw(&img);
        let v = vdi(&*im);
        // Within the existing blocks, then past them.
        v.resize(3 * MIB, false).unwrap();
        v.resize(5 * MIB + 512, false).unwrap();
        im.close().unwrap();
    }
    model.resize((5 * MIB + 512) as usize, 0);
    qcheck(d.path(), &img);
    qemu_same(d.path(), &img, &model);
    {
        // 130 blocks need 520 bytes of map: the first data block moves out of the way.
        let im = open_rw(&img);
        let v = vdi(&*im);
        v.resize(130 * MIB, false).unwrap();
        assert_eq!(v.header_info().offset_data, 0x400 + MIB as u32);
        im.write_at(&[0x63; 4096], 129 * MIB).unwrap();
        im.close().unwrap();
    }
    model.resize(130 * MIB as usize, 0);
    model[129 * MIB as usize..129 * MIB as usize + 4096].fill(0x63);
    qcheck(d.path(), &img);
    qemu_same(d.path(), &img, &model);
    ok(qemu_io(
        d.path(),
        "vdi",
        s(&img),
        &["write -P 0x64 100M 512"],
    ));
    model[100 * MIB as usize..100 * MIB as usize + 512].fill(0x64);
    qemu_same(d.path(), &img, &model);
    {
        let im = open_rw(&img);
        let v = vdi(&*im);
        let e = v.resize(3 * MIB, false).unwrap_err();
        assert!(e.message().contains("--shrink"), "{}", e.message());
        let e = v.resize(3 * MIB, true).unwrap_err();
        assert!(e.message().contains("holds data"), "{}", e.message());
        im.discard(3 * MIB, 127 * MIB).unwrap();
        v.resize(3 * MIB - 1000, true).unwrap();
        assert_eq!(im.virtual_size(), 3 * MIB - 512);
        im.close().unwrap();
    }
    model.truncate((3 * MIB - 512) as usize);
    qcheck(d.path(), &img);
    qemu_same(d.path(), &img, &model);
    assert!(diskit_raw(&img) == model);
}

#[test]
fn vdi_resize_static() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let img = d.path().join("s.vdi");
    create(&img, "size=2M,static=on");
    {
        let im = open_rw(&img);
        im.write_at(&[5; 1000], 2 * MIB - 1000).unwrap();
        vdi(&*im).resize(3 * MIB + MIB / 2, false).unwrap();
        im.close().unwrap();
    }
    let mut model = vec![0u8; (3 * MIB + MIB / 2) as usize];
    model[(2 * MIB - 1000) as usize..2 * MIB as usize].fill(5);
    qcheck(d.path(), &img);
    qemu_same(d.path(), &img, &model);
    assert_eq!(flen(&img), 0x400 + 4 * MIB);
    let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
    assert_eq!(vdi(&*im).header_info().blocks_allocated, 4);
}

// ---- hostile headers -------------------------------------------------------------------

fn put(path: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

fn base_image(dir: &Path) -> PathBuf {
    let img = dir.join("h.vdi");
    create(&img, "size=3M");
    let im = open_rw(&img);
    im.write_at(&pattern(5000, 3), MIB - 100).unwrap();
    im.close().unwrap();
    img
}

/// Opening fails with a one-line error containing `want` (and naming the file).
fn open_fails(img: &Path, want: &str) {
    let e = diskit::open(s(img), &OpenOptions::read_only())
        .map(|_| ())
        .expect_err("hostile image opened");
    let m = e.message();
    assert!(m.contains(want), "{m}");
    assert!(m.contains("h.vdi"), "{m}");
    assert!(!m.contains('\n'), "{m}");
}

#[test]
fn vdi_hostile_block_count_times_size_overflow() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    put(&img, 0x178, &0x8000_0000u32.to_le_bytes()); // 2 GiB blocks
    put(&img, 0x180, &u32::MAX.to_le_bytes());
    put(&img, 0x170, &(1u64 << 62).to_le_bytes());
    open_fails(&img, "Unsupported VDI image size");
    put(&img, 0x170, &(3 * MIB).to_le_bytes());
    open_fails(&img, "block size");
    put(&img, 0x178, &(1u32 << 20).to_le_bytes());
    open_fails(&img, "too many blocks");
}

#[test]
fn vdi_hostile_map_past_eof() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    // 100000 entries would fit before a data offset at 1 MiB, but not in the file.
    put(&img, 0x180, &100_000u32.to_le_bytes());
    put(&img, 0x158, &(MIB as u32).to_le_bytes());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(0x1000)
        .unwrap();
    open_fails(&img, "extends past the end of the file");
    // Overlapping the data area is refused too.
    put(&img, 0x158, &0x400u32.to_le_bytes());
    open_fails(&img, "overlaps the data area");
}

#[test]
fn vdi_hostile_duplicate_block_indices() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    put(&img, 0x200 + 8, &0u32.to_le_bytes()); // block 2 shares block 0's data
    let want = diskit_raw(&img);
    assert_eq!(
        &want[2 * MIB as usize..2 * MIB as usize + 100],
        &want[..100]
    );
    let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
    let rep = vdi(&*im).check(false).unwrap();
    assert!(rep.messages.iter().any(|m| m.contains("also used by")));
    drop(im);
    let im = open_rw(&img);
    let e = im.write_at(&[1; 10], 0).unwrap_err();
    assert!(
        e.message().contains("used by more than one block"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains('\n'));
}

#[test]
fn vdi_hostile_header_size_gigabytes() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    put(&img, 0x48, &0xc000_0000u32.to_le_bytes());
    open_fails(&img, "invalid VDI header size");
    put(&img, 0x48, &0x10u32.to_le_bytes());
    open_fails(&img, "invalid VDI header size");
}

#[test]
fn vdi_hostile_blocks_in_image_absurd() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    put(&img, 0x180, &0x7fff_ffffu32.to_le_bytes());
    open_fails(&img, "too many blocks");
    // The largest count qemu allows: a 2 GiB map, refused before any allocation.
    put(&img, 0x180, &536_870_784u32.to_le_bytes());
    put(&img, 0x158, &0x8000_0200u32.to_le_bytes());
    open_fails(&img, "extends past the end of the file");
}

#[test]
fn vdi_hostile_entries_past_eof_read_zero() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    put(&img, 0x200 + 8, &2u32.to_le_bytes()); // block 2 -> data block 2, past the file end
    put(&img, 0x184, &3u32.to_le_bytes());
    let content = diskit_raw(&img);
    assert!(content[2 * MIB as usize..].iter().all(|&b| b == 0));
    let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
    assert!(vdi(&*im).check(false).unwrap().is_clean());
}

#[test]
fn vdi_hostile_random_header_bytes_no_panic() {
    let _serial = serial();
    let d = tmpdir();
    let img = base_image(d.path());
    let orig = std::fs::read(&img).unwrap();
    let mut x = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Fields that matter: sizes, offsets, counts, the map.
    let hot = [
        0x48, 0x4c, 0x154, 0x158, 0x170, 0x174, 0x178, 0x17c, 0x180, 0x184, 0x200, 0x204, 0x208,
    ];
    for _ in 0..300 {
        let mut b = orig.clone();
        for _ in 0..1 + next() % 3 {
            let off = hot[(next() % hot.len() as u64) as usize] + (next() % 4) as usize;
            b[off] = next() as u8;
        }
        std::fs::write(&img, &b).unwrap();
        if let Ok(im) = diskit::open(s(&img), &OpenOptions::read_write()) {
            let size = im.virtual_size().min(4 * MIB);
            let mut buf = vec![0u8; size as usize];
            let _ = im.read_at(&mut buf, 0);
            let _ = im.map(0, size);
            let _ = vdi(&*im).check(false);
            let _ = im.write_at(&[1; 100], 0);
            let _ = vdi(&*im).compact();
        }
    }
}
