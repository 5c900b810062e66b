//! VDI interop with qemu-img/qemu-io: reading qemu's images, qemu reading ours, create
//! options and summaries, info JSON, check, differencing images.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use diskit::formats::vdi::{ImageType, VdiDriver};
use diskit::{BlockDriver, CreateOpts, Format, Mapping, OpenOptions};

const MIB: u64 = 1 << 20;

/// Tests in this file run one at a time: a qemu-img child forked by another test thread
/// inherits our open image descriptors (and their OFD locks) until it execs, which makes
/// concurrent opens fail with "Failed to get lock" now and then.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
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

fn put32(path: &Path, off: usize, v: u32) {
    let mut b = std::fs::read(path).unwrap();
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

fn get32(path: &Path, off: usize) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// qemu-made images written with qemu-io patterns read back identically.
fn qemu_made(static_: bool) {
    let d = tmpdir();
    let img = p(d.path(), "q.vdi");
    let size = (5 * MIB + 300 * 512).to_string();
    let mut args = vec!["create", "-f", "vdi"];
    if static_ {
        args.extend(["-o", "static=on"]);
    }
    args.extend([s(&img), size.as_str()]);
    ok(qemu_img(d.path(), &args));
    ok(qemu_io(
        d.path(),
        "vdi",
        s(&img),
        &[
            "write -P 0x11 3M 4k",
            "write -P 0x22 512 1M",
            "write -P 0x33 5M 150k",
            "write -z 4M 64k",
        ],
    ));
    let ours = diskit_raw(&img);
    let theirs = qemu_raw(d.path(), s(&img), Some("vdi"));
    assert_eq!(ours.len() as u64, 5 * MIB + 300 * 512);
    assert!(ours == theirs, "content differs");
    assert_eq!(ours[3 * MIB as usize], 0x11);
    // map: allocated blocks are data, the others unallocated (dynamic) or data (static).
    let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
    let (m, len) = im.map(2 * MIB, 10 * MIB).unwrap();
    if static_ {
        assert!(matches!(m, Mapping::Data { .. }));
        assert_eq!(len, im.virtual_size() - 2 * MIB);
    } else {
        // without a parent, free blocks read as zero (qemu-img map says present, zero)
        assert_eq!(m, Mapping::Zero { explicit: false });
        assert_eq!(len, MIB);
        let (m, _) = im.map(3 * MIB, MIB).unwrap();
        let Mapping::Data { host_offset } = m else {
            panic!("expected data")
        };
        let raw = std::fs::read(&img).unwrap();
        assert_eq!(raw[host_offset as usize], 0x11);
    }
}

#[test]
fn vdi_qemu_dynamic_reads_back() {
    let _serial = serial();
    require_qemu!();
    qemu_made(false);
}

#[test]
fn vdi_qemu_static_reads_back() {
    let _serial = serial();
    require_qemu!();
    qemu_made(true);
}

/// diskit writes; qemu-img check passes and qemu reads the same content.
fn diskit_made(static_: bool) {
    let d = tmpdir();
    let img = p(d.path(), "d.vdi");
    let size = 3 * MIB + 1536;
    create(
        &img,
        &format!("size={size},static={}", if static_ { "on" } else { "off" }),
    );
    let mut model = vec![0u8; size as usize];
    {
        let im = open_rw(&img);
        let writes: [(u64, usize, u64); 4] = [
            (1000, 5000, 1),
            (MIB - 400, 300, 2),
            (2 * MIB + 7, MIB as usize, 3),
            (3 * MIB, 1536, 4),
        ];
        for (off, len, seed) in writes {
            let data = pattern(len, seed);
            im.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        im.write_zeroes(1500, 2000, false).unwrap();
        model[1500..3500].fill(0);
        im.write_zeroes(2 * MIB + 4096, 4096, true).unwrap();
        model[2 * MIB as usize + 4096..2 * MIB as usize + 8192].fill(0);
        im.close().unwrap();
    }
    qcheck(d.path(), &img);
    assert!(
        diskit_raw(&img) == model,
        "diskit content differs from model"
    );
    assert!(
        qemu_raw(d.path(), s(&img), Some("vdi")) == model,
        "qemu content differs from model"
    );
    let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
    let h = vdi(&*im).header_info();
    assert_eq!(
        h.image_type,
        if static_ {
            ImageType::Static
        } else {
            ImageType::Dynamic
        }
    );
    assert_eq!(h.blocks_allocated, if static_ { 4 } else { 3 });
}

#[test]
fn vdi_diskit_dynamic_qemu_reads() {
    let _serial = serial();
    require_qemu!();
    diskit_made(false);
}

#[test]
fn vdi_diskit_static_qemu_reads() {
    let _serial = serial();
    require_qemu!();
    diskit_made(true);
}

#[test]
fn vdi_create_matches_qemu_bytes() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    for (size, opts) in [
        ("0", ""),
        ("1000", ""),
        ("3M", ""),
        ("1572864", "static=on"),
        ("300M", ""),
        ("2500000", "static=on"),
    ] {
        let q = p(d.path(), "q.vdi");
        let o = p(d.path(), "o.vdi");
        let mut args = vec!["create", "-q", "-f", "vdi"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&q), size]);
        ok(qemu_img(d.path(), &args));
        let sep = if opts.is_empty() { "" } else { "," };
        create(&o, &format!("size={size}{sep}{opts}"));
        let mut a = std::fs::read(&q).unwrap();
        let mut b = std::fs::read(&o).unwrap();
        assert_eq!(a.len(), b.len(), "file size for {size} {opts}");
        // UUIDs (image, last snapshot) are random; link and parent are nil in both.
        assert_ne!(&a[0x188..0x198], &b[0x188..0x198]);
        assert_ne!(&b[0x188..0x198], &[0u8; 16]);
        assert_ne!(&b[0x198..0x1a8], &[0u8; 16]);
        assert_eq!(b[0x188 + 7] >> 4, 4, "version 4 UUID");
        a[0x188..0x1a8].fill(0);
        b[0x188..0x1a8].fill(0);
        assert!(a == b, "header/map differ for {size} {opts}");
        assert_eq!(
            std::fs::metadata(&o).unwrap().len(),
            std::fs::metadata(&q).unwrap().len()
        );
        qcheck(d.path(), &o);
    }
}

#[test]
fn vdi_create_summary_matches_qemu() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    for opts in [
        "size=1.5M",
        "size=1000,static=yes",
        "size=1M,static",
        "size=1M,static=true,preallocation=off,nocow=off",
        "size=1M,static=on,extent_size_hint=1M,preallocation=falloc",
        "size=2M,preallocation=full",
    ] {
        let q = p(d.path(), "x.vdi");
        let out = ok(qemu_img(
            d.path(),
            &["create", "-f", "vdi", "-o", opts, "x.vdi"],
        ));
        let line = stdout(&out);
        let want = line
            .trim_end()
            .strip_prefix("Formatting 'x.vdi', ")
            .unwrap()
            .to_string();
        let o = CreateOpts::parse(opts).unwrap();
        assert_eq!(
            diskit::formats::create_summary(Format::Vdi, &o),
            want,
            "{opts}"
        );
        std::fs::remove_file(q).unwrap();
    }
    let names: Vec<&str> = diskit::formats::create_options(Format::Vdi)
        .iter()
        .map(|o| o.name)
        .collect();
    assert_eq!(names, ["size", "static"]);
    let help = ok(qemu_img(d.path(), &["create", "-f", "vdi", "-o", "help"]));
    for o in diskit::formats::create_options(Format::Vdi) {
        assert!(stdout(&help).contains(&o.help_line()), "{}", o.help_line());
    }
}

#[test]
fn vdi_create_errors_match_qemu() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let x = p(d.path(), "x.vdi");
    for (opts, msg) in [
        ("size=512T", "Unsupported VDI image size (size is 0x2000000000000, max supported is 0x1fffff8000000)"),
        ("static=maybe,size=1M", "Parameter 'static' expects 'on' or 'off'"),
        ("foo=1,size=1M", "Invalid parameter 'foo'"),
        ("preallocation=bogus,size=1M", "invalid parameter value: bogus"),
        ("preallocation=metadata,size=1M", "Unsupported preallocation mode: metadata"),
        ("static=on", "Image creation needs a size parameter"),
    ] {
        let _ = std::fs::remove_file(&x);
        let out = qemu_img(d.path(), &["create", "-f", "vdi", "-o", opts, s(&x)]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(msg), "qemu: {err}");
        let qemu_left_file = x.exists();
        let _ = std::fs::remove_file(&x);
        let e = diskit::create(s(&x), Format::Vdi, &CreateOpts::parse(opts).unwrap())
            .expect_err(opts);
        assert!(e.message().contains(msg), "{opts}: {}", e.message());
        assert!(e.message().contains("x.vdi"), "{}", e.message());
        assert!(!e.message().contains('\n'));
        assert_eq!(x.exists(), qemu_left_file, "{opts}: file left behind");
    }
}

fn info_json_eq(dir: &Path, img: &Path) {
    let out = ok(qemu_img(dir, &["info", "--output=json", s(img)]));
    let want = stdout(&out);
    let im = diskit::open(s(img), &OpenOptions::read_only()).unwrap();
    let ours = diskit::qjson::to_pretty(&im.info().unwrap().to_json());
    assert_eq!(ours.trim_end(), want.trim_end());
}

#[test]
fn vdi_info_json_matches_qemu() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let a = p(d.path(), "a.vdi");
    ok(qemu_img(
        d.path(),
        &["create", "-q", "-f", "vdi", s(&a), "3000000"],
    ));
    ok(qemu_io(d.path(), "vdi", s(&a), &["write -P 1 1M 64k"]));
    info_json_eq(d.path(), &a);
    let b = p(d.path(), "b.vdi");
    create(&b, "size=5M,static=on");
    info_json_eq(d.path(), &b);
    let c = p(d.path(), "c.vdi");
    create(&c, "size=7M");
    {
        let im = open_rw(&c);
        im.write_at(&pattern(70000, 9), 4 * MIB).unwrap();
        im.close().unwrap();
    }
    info_json_eq(d.path(), &c);
    let im = diskit::open(s(&c), &OpenOptions::read_only()).unwrap();
    assert_eq!(im.info().unwrap().cluster_size, Some(MIB));
}

/// A 4-block image with blocks 0..3 written by qemu (entries 0,1,2,3).
fn four_blocks(dir: &Path) -> PathBuf {
    let img = p(dir, "c.vdi");
    ok(qemu_img(dir, &["create", "-q", "-f", "vdi", s(&img), "4M"]));
    ok(qemu_io(
        dir,
        "vdi",
        s(&img),
        &[
            "write -P 1 0 1M",
            "write -P 2 1M 1M",
            "write -P 3 2M 1M",
            "write -P 4 3M 1M",
        ],
    ));
    img
}

fn qemu_check_errors(dir: &Path, img: &Path) -> Vec<String> {
    let out = qemu_img(dir, &["check", "-f", "vdi", s(img)]);
    stderr(&out)
        .lines()
        .filter(|l| l.starts_with("ERROR"))
        .map(|l| l.to_string())
        .collect()
}

#[test]
fn vdi_check_matches_qemu_and_repairs() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let img = four_blocks(d.path());
    let before = diskit_raw(&img);
    // Block 1 shares block 0's data, block 3 points past the block count, count is wrong.
    put32(&img, 0x200 + 4, 0);
    put32(&img, 0x200 + 12, 77);
    put32(&img, 0x184, 9);
    let qerr = qemu_check_errors(d.path(), &img);
    assert_eq!(qerr.len(), 3, "{qerr:?}");
    let expect_content = {
        let mut v = before.clone();
        let (b0, rest) = v.split_at_mut(MIB as usize);
        rest[..MIB as usize].copy_from_slice(b0);
        v[3 * MIB as usize..].fill(0); // data block 77 lies past the end of the file
        v
    };
    {
        let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
        let rep = vdi(&*im).check(false).unwrap();
        assert_eq!(rep.messages, qerr);
        assert_eq!(rep.corruptions, 3);
        assert!(!rep.is_clean());
        assert!(vdi(&*im).check(true).is_err(), "repair needs write access");
    }
    assert!(diskit_raw(&img) == expect_content);
    {
        let im = open_rw(&img);
        // Writes are refused while the map is inconsistent.
        let e = im.write_at(&[1], 0).unwrap_err();
        assert!(e.message().contains("corrupt"), "{}", e.message());
        assert!(!e.message().contains('\n'));
        let rep = vdi(&*im).check(true).unwrap();
        assert_eq!(rep.corruptions, 0);
        assert_eq!(rep.corruptions_fixed, 3);
        im.close().unwrap();
    }
    qcheck(d.path(), &img);
    assert!(qemu_raw(d.path(), s(&img), Some("vdi")) == expect_content);
    // Still writable by qemu without clobbering anything.
    ok(qemu_io(d.path(), "vdi", s(&img), &["write -P 9 3M 4k"]));
    let mut exp = expect_content.clone();
    exp[3 * MIB as usize..3 * MIB as usize + 4096].fill(9);
    assert!(diskit_raw(&img) == exp);
    qcheck(d.path(), &img);
}

#[test]
fn vdi_discard_keeps_image_dense_for_qemu() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let img = four_blocks(d.path());
    let mut model = diskit_raw(&img);
    let len0 = std::fs::metadata(&img).unwrap().len();
    {
        let im = open_rw(&img);
        im.discard(MIB, MIB).unwrap();
        im.discard(2 * MIB + 512, 4096).unwrap(); // partial: no effect
        im.write_zeroes(0, 4096, true).unwrap(); // partial: zeroed in place
        im.close().unwrap();
    }
    model[MIB as usize..2 * MIB as usize].fill(0);
    model[..4096].fill(0);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), len0 - MIB);
    assert_eq!(get32(&img, 0x184), 3);
    assert_eq!(get32(&img, 0x200 + 4), 0xffff_fffe);
    qcheck(d.path(), &img);
    // qemu allocates at index blocks_allocated: must not hit a live block.
    ok(qemu_io(d.path(), "vdi", s(&img), &["write -P 7 1M 512"]));
    model[MIB as usize..MIB as usize + 512].fill(7);
    assert!(qemu_raw(d.path(), s(&img), Some("vdi")) == model);
    assert!(diskit_raw(&img) == model);
    let im = diskit::open(s(&img), &OpenOptions::read_only()).unwrap();
    let (m, _) = im.map(2 * MIB, MIB).unwrap();
    assert!(matches!(m, Mapping::Data { .. }));
}

#[test]
fn vdi_zero_blocks_map_explicit() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let img = p(d.path(), "z.vdi");
    create(&img, "size=3M");
    {
        let im = open_rw(&img);
        im.write_zeroes(MIB, 2 * MIB, false).unwrap();
        assert_eq!(
            im.map(0, 3 * MIB).unwrap(),
            (Mapping::Zero { explicit: false }, MIB)
        );
        assert_eq!(
            im.map(MIB, 3 * MIB).unwrap(),
            (Mapping::Zero { explicit: true }, 2 * MIB)
        );
        im.close().unwrap();
    }
    qcheck(d.path(), &img);
    let out = ok(qemu_img(d.path(), &["map", "--output=json", s(&img)]));
    assert!(stdout(&out).contains("\"zero\": true"));
}

/// Makes `child` a differencing image of `parent` (same size) by editing its header.
fn make_diff(parent: &Path, child: &Path) {
    let pb = std::fs::read(parent).unwrap();
    let mut cb = std::fs::read(child).unwrap();
    cb[0x4c..0x50].copy_from_slice(&4u32.to_le_bytes());
    cb[0x1a8..0x1b8].copy_from_slice(&pb[0x188..0x198]);
    cb[0x1b8..0x1c8].copy_from_slice(&pb[0x198..0x1a8]);
    std::fs::write(child, cb).unwrap();
}

#[test]
fn vdi_differencing_reads_through_parent() {
    let _serial = serial();
    require_qemu!();
    let d = tmpdir();
    let parent = p(d.path(), "base.vdi");
    ok(qemu_img(
        d.path(),
        &["create", "-q", "-f", "vdi", s(&parent), "3M"],
    ));
    ok(qemu_io(
        d.path(),
        "vdi",
        s(&parent),
        &["write -P 0x5a 0 3M"],
    ));
    let child = p(d.path(), "child.vdi");
    create(&child, "size=3M");
    make_diff(&parent, &child);
    let mut model = vec![0x5au8; 3 * MIB as usize];
    {
        let im = open_rw(&child);
        assert_eq!(im.backing().unwrap().virtual_size(), 3 * MIB);
        assert_eq!(im.map(0, MIB).unwrap().0, Mapping::Unallocated);
        // A partial write copies the rest of the block from the parent.
        im.write_at(&[1, 2, 3], MIB + 10).unwrap();
        model[MIB as usize + 10..MIB as usize + 13].copy_from_slice(&[1, 2, 3]);
        // Zeroing a whole block hides the parent.
        im.write_zeroes(2 * MIB, MIB, false).unwrap();
        model[2 * MIB as usize..].fill(0);
        // Zeroing part of an unallocated block allocates it.
        im.write_zeroes(100, 100, false).unwrap();
        model[100..200].fill(0);
        im.close().unwrap();
        let info = im.info().unwrap();
        assert_eq!(info.backing_filename.as_deref(), Some("base.vdi"));
    }
    assert!(diskit_raw(&child) == model);
    // qemu refuses differencing images; the parent is untouched.
    let out = qemu_img(d.path(), &["info", s(&child)]);
    assert!(stderr(&out).contains("non-NULL link UUID"));
    assert!(qemu_raw(d.path(), s(&parent), Some("vdi")) == vec![0x5a; 3 * MIB as usize]);
    // Without the parent: a one-line error naming the UUID.
    std::fs::rename(&parent, p(d.path(), "base.img")).unwrap();
    let e = diskit::open(s(&child), &OpenOptions::read_only())
        .map(|_| ())
        .unwrap_err();
    assert!(
        e.message().contains("parent image with UUID"),
        "{}",
        e.message()
    );
    assert!(!e.message().contains('\n'));
    // no_backing opens it anyway.
    let o = OpenOptions {
        no_backing: true,
        ..OpenOptions::read_only()
    };
    let im = diskit::open(s(&child), &o).unwrap();
    assert!(im.backing().is_none());
}

/// Builds a VDI file the way VirtualBox lays it out (0x190-byte header with LCHS geometry,
/// map and data aligned far apart, data blocks in any order, optional per-block extra data).
/// `slots[b]` is the physical block of guest block `b` (or a FREE/ZERO marker).
#[allow(clippy::too_many_arguments)]
fn vbox_image(
    path: &Path,
    disk_size: u64,
    bs: u32,
    extra: u32,
    off_bmap: u32,
    off_data: u32,
    slots: &[u32],
    model: &[u8],
) {
    let mut f = vec![0u8; off_data as usize];
    let text = b"<<< Oracle VirtualBox Disk Image >>>\n";
    f[..text.len()].copy_from_slice(text);
    let put32 = |f: &mut Vec<u8>, o: usize, v: u32| f[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut f, 0x40, 0xbeda_107f);
    put32(&mut f, 0x44, 0x0001_0001);
    put32(&mut f, 0x48, 0x190);
    put32(&mut f, 0x4c, 1);
    f[0x54..0x54 + 9].copy_from_slice(b"hello vdi");
    put32(&mut f, 0x154, off_bmap);
    put32(&mut f, 0x158, off_data);
    put32(&mut f, 0x168, 512);
    f[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
    put32(&mut f, 0x178, bs);
    put32(&mut f, 0x17c, extra);
    put32(&mut f, 0x180, slots.len() as u32);
    let alloc = slots.iter().filter(|&&s| s < 0xffff_fffe).count() as u32;
    put32(&mut f, 0x184, alloc);
    for (i, b) in f[0x188..0x1a8].iter_mut().enumerate() {
        *b = i as u8 + 1;
    }
    put32(&mut f, 0x1c8, 1024); // LCHS: cylinders, heads, sectors, sector size
    put32(&mut f, 0x1cc, 16);
    put32(&mut f, 0x1d0, 63);
    put32(&mut f, 0x1d4, 512);
    for (i, &s) in slots.iter().enumerate() {
        put32(&mut f, off_bmap as usize + 4 * i, s);
    }
    let slot_size = (bs + extra) as usize;
    f.resize(off_data as usize + alloc as usize * slot_size, 0);
    for (i, &s) in slots.iter().enumerate() {
        if s >= 0xffff_fffe {
            continue;
        }
        let base = off_data as usize + s as usize * slot_size;
        f[base..base + extra as usize].fill(0xee);
        let g = i * bs as usize;
        let n = (model.len() - g).min(bs as usize);
        f[base + extra as usize..base + extra as usize + n].copy_from_slice(&model[g..g + n]);
    }
    std::fs::write(path, f).unwrap();
}

#[test]
fn vdi_virtualbox_layout_reads_and_writes() {
    require_qemu!();
    let _serial = serial();
    let d = tmpdir();
    let img = p(d.path(), "vbox.vdi");
    let size = 4 * MIB + 512 * 1000 + 77; // odd size: qemu and diskit round up to 512
    let vsize = size.div_ceil(512) * 512;
    let mut model = vec![0u8; vsize as usize];
    for (b, seed) in [(0u64, 1u64), (2, 2), (4, 3)] {
        let g = (b * MIB) as usize;
        let n = (model.len() - g).min(MIB as usize);
        model[g..g + n].copy_from_slice(&pattern(n, seed));
    }
    let slots = [2, 0xffff_ffff, 0, 0xffff_fffe, 1];
    vbox_image(
        &img, size, MIB as u32, 0, 0x10_0000, 0x20_0000, &slots, &model,
    );
    assert!(diskit_raw(&img) == model);
    assert!(qemu_raw(d.path(), s(&img), Some("vdi")) == model);
    {
        let im = open_rw(&img);
        let h = vdi(&*im).header_info();
        assert_eq!(h.description, "hello vdi");
        assert_eq!(h.header_size, 0x190);
        assert_eq!(h.lchs_geometry.unwrap().heads, 16);
        assert_eq!(h.text, "<<< Oracle VirtualBox Disk Image >>>\n");
        assert_eq!(im.virtual_size(), vsize);
        im.write_at(&[0x42; 1000], MIB + 5).unwrap();
        model[MIB as usize + 5..MIB as usize + 1005].fill(0x42);
        im.write_at(&vec![0; MIB as usize], 2 * MIB).unwrap();
        model[2 * MIB as usize..3 * MIB as usize].fill(0);
        let st = vdi(&*im).compact().unwrap();
        assert_eq!(st.blocks_released, 1);
        assert_eq!(st.new_file_size, 0x20_0000 + 3 * MIB);
        im.close().unwrap();
    }
    qcheck(d.path(), &img);
    assert!(qemu_raw(d.path(), s(&img), Some("vdi")) == model);
    assert!(diskit_raw(&img) == model);
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(&raw[0x1cc..0x1d0], &16u32.to_le_bytes(), "LCHS kept");
    assert_eq!(&raw[0x54..0x5d], b"hello vdi");
}

#[test]
fn vdi_small_blocks_with_extra_data() {
    require_qemu!();
    let _serial = serial();
    let d = tmpdir();
    let img = p(d.path(), "small.vdi");
    let bs = 64 * 1024u32;
    let size = 300 * 1024u64;
    let mut model = vec![0u8; size as usize];
    for (b, seed) in [(1u64, 5u64), (3, 6), (4, 7)] {
        let g = (b * bs as u64) as usize;
        let n = (model.len() - g).min(bs as usize);
        model[g..g + n].copy_from_slice(&pattern(n, seed));
    }
    let slots = [0xffff_fffe, 2, 0xffff_ffff, 0, 1];
    vbox_image(&img, size, bs, 512, 0x200, 0x400, &slots, &model);
    assert!(diskit_raw(&img) == model);
    let out = qemu_img(d.path(), &["info", s(&img)]);
    assert!(stderr(&out).contains("block size 65536 is not 1048576"));
    {
        let im = open_rw(&img);
        assert_eq!(im.cluster_size(), Some(bs as u64));
        im.write_at(&pattern(100_000, 8), 100_000).unwrap();
        model[100_000..200_000].copy_from_slice(&pattern(100_000, 8));
        im.write_zeroes(3 * bs as u64, bs as u64, true).unwrap();
        model[3 * bs as usize..4 * bs as usize].fill(0);
        vdi(&*im).compact().unwrap();
        assert!(vdi(&*im).check(false).unwrap().is_clean());
        im.close().unwrap();
    }
    assert!(diskit_raw(&img) == model);
    let raw = std::fs::read(&img).unwrap();
    // blocks 1, 2, 4 remain (block 1 and 2 rewritten, 3 released): 3 slots of 64 KiB + 512.
    assert_eq!(raw.len(), 0x400 + 3 * (bs as usize + 512));
}

/// A block size diskit does not take is refused in qemu-img's words (iotest 084).
#[test]
fn vdi_bad_block_size_message_matches_qemu_img() {
    require_qemu!();
    let d = tmpdir();
    for bs in [1_048_575u32, 1_114_112] {
        ok(qemu_img(
            d.path(),
            &["create", "-q", "-f", "vdi", "b.vdi", "1M"],
        ));
        put32(&p(d.path(), "b.vdi"), 376, bs);
        same_as_qemu(d.path(), &["info", "b.vdi"]);
    }
}
