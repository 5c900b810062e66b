//! Hostile vmdk input: every malformed image gives a clear one-line error, never a panic, an
//! endless loop or an unbounded allocation.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use diskit::formats::{self, CreateOpts, Format, OpenOptions};

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// A monolithicSparse image of 4 MiB with data in its first grains, made by diskit.
fn sparse_image(dir: &Path, name: &str, opts: &str) -> String {
    let img = p(dir, name);
    let o = CreateOpts::parse(&format!("size=4M{opts}")).unwrap();
    formats::create(&img, Format::Vmdk, &o).unwrap();
    let d = formats::open(&img, &OpenOptions::read_write()).unwrap();
    d.write_at(&pattern(200 << 10, 1), 0).unwrap();
    d.close().unwrap();
    img
}

fn patch(path: &str, at: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

fn open_err(path: &str) -> String {
    let e = formats::open(path, &OpenOptions::read_only())
        .err()
        .unwrap_or_else(|| panic!("{path} opened although it is broken"));
    let m = e.message().to_string();
    eprintln!("open error: {m}");
    assert!(!m.contains('\n'), "not one line: {m}");
    assert!(
        m.contains(Path::new(path).file_name().unwrap().to_str().unwrap()),
        "{m}"
    );
    m
}

/// Reads the whole image and returns the first error.
fn read_err(path: &str) -> String {
    let d = formats::open(path, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < d.virtual_size() {
        let n = (d.virtual_size() - off).min(buf.len() as u64) as usize;
        if let Err(e) = d.read_at(&mut buf[..n], off) {
            let m = e.message().to_string();
            eprintln!("read error: {m}");
            assert!(!m.contains('\n'), "not one line: {m}");
            return m;
        }
        off += n as u64;
    }
    panic!("{path} read without error");
}

#[test]
fn hostile_absurd_capacity() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "cap.vmdk", "");
    for cap in [1u64 << 60, u64::MAX, 1 << 45] {
        patch(&img, 12, &cap.to_le_bytes());
        let m = open_err(&img);
        assert!(
            m.contains("capacity") || m.contains("L1 size too big") || m.contains("directory"),
            "{m}"
        );
    }
}

#[test]
fn hostile_gd_past_eof() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "gd.vmdk", "");
    patch(&img, 48, &(1u64 << 30).to_le_bytes()); // redundant directory
    patch(&img, 56, &(1u64 << 30).to_le_bytes()); // primary directory
    let m = open_err(&img);
    assert!(
        m.contains("grain directory") && m.contains("beyond the end"),
        "{m}"
    );
}

#[test]
fn hostile_gt_past_eof() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "gt.vmdk", "");
    // Both directories (sectors 21 and 26 in this layout) name a table far away.
    patch(&img, 21 * 512, &0x7fff_0000u32.to_le_bytes());
    patch(&img, 26 * 512, &0x7fff_0000u32.to_le_bytes());
    let m = open_err(&img);
    assert!(
        m.contains("grain table") && m.contains("beyond the end"),
        "{m}"
    );
}

#[test]
fn hostile_grain_past_eof() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "gr.vmdk", "");
    // The first entry of the primary grain table (sector 27) points far beyond the file.
    patch(&img, 27 * 512, &0x7fff_0000u32.to_le_bytes());
    let m = read_err(&img);
    assert!(m.contains("gr.vmdk") && m.contains("beyond the end"), "{m}");
}

#[test]
fn hostile_grain_size_zero() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "g0.vmdk", "");
    patch(&img, 20, &0u64.to_le_bytes());
    let m = open_err(&img);
    assert!(m.contains("L1 entry size is invalid"), "{m}");
}

#[test]
fn hostile_grain_size_too_big() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "gbig.vmdk", "");
    patch(&img, 20, &(1u64 << 19).to_le_bytes()); // 256 MiB grains
    let m = open_err(&img);
    assert!(m.contains("128 MiB"), "{m}");
}

#[test]
fn hostile_huge_text_descriptor() {
    let dir = tmpdir();
    let img = p(dir.path(), "huge.vmdk");
    let mut text =
        String::from("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n");
    while text.len() < 3 << 20 {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&img, text).unwrap();
    // read up to 1 MiB, as QEMU reads a descriptor file: the extents are not in that part
    let m = open_err(&img);
    assert!(
        m.contains("lists no extents (in its first 1048575 bytes"),
        "{m}"
    );
}

#[test]
fn hostile_huge_embedded_descriptor_size_is_bounded() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "emb.vmdk", "");
    patch(&img, 36, &u64::MAX.to_le_bytes()); // descriptor size
    let d = formats::open(&img, &OpenOptions::read_only()).unwrap();
    let mut b = vec![0u8; 512];
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b, pattern(512, 1));
}

#[test]
fn hostile_too_many_extents() {
    let dir = tmpdir();
    let img = p(dir.path(), "many.vmdk");
    let mut text = String::from(
        "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n# Extent description\n",
    );
    for _ in 0..5000 {
        text.push_str("RW 1 ZERO\n");
    }
    std::fs::write(&img, text).unwrap();
    let m = open_err(&img);
    assert!(m.contains("more than 4096 extents"), "{m}");
}

#[test]
fn hostile_extent_escapes_to_device() {
    let dir = tmpdir();
    for (name, target) in [
        ("dev.vmdk", "../../../../../../../../../../dev/zero"),
        ("null.vmdk", "/dev/null"),
    ] {
        let img = p(dir.path(), name);
        std::fs::write(
            &img,
            format!("# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n# Extent description\nRW 2048 FLAT \"{target}\" 0\n"),
        )
        .unwrap();
        let m = open_err(&img);
        assert!(
            m.contains("is a character device") && m.contains("DISKIT_ALLOW_DEVICES=1"),
            "{m}"
        );
    }
}

#[test]
fn hostile_extent_is_a_descriptor() {
    // A SPARSE extent naming the descriptor itself must not recurse.
    let dir = tmpdir();
    let img = p(dir.path(), "self.vmdk");
    std::fs::write(
        &img,
        "# Disk DescriptorFile\nversion=1\ncreateType=\"twoGbMaxExtentSparse\"\n# Extent description\nRW 2048 SPARSE \"self.vmdk\"\n",
    )
    .unwrap();
    let m = open_err(&img);
    assert!(m.contains("not in VMDK format"), "{m}");
}

#[test]
fn hostile_parent_is_itself() {
    let dir = tmpdir();
    let img = sparse_image(dir.path(), "loop.vmdk", "");
    let mut desc = vec![0u8; 20 * 512];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut desc, 512)
        .unwrap();
    let text = String::from_utf8_lossy(&desc)
        .trim_end_matches('\0')
        .to_string();
    let text = text.replace(
        "createType=\"monolithicSparse\"\n",
        "createType=\"monolithicSparse\"\nparentFileNameHint=\"loop.vmdk\"\n",
    );
    let mut bytes = text.into_bytes();
    bytes.resize(20 * 512, 0);
    patch(&img, 512, &bytes);
    let m = open_err(&img);
    assert!(m.contains("infinite loop"), "{m}");
}

fn stream_image(dir: &Path) -> String {
    let img = p(dir, "s.vmdk");
    let o = CreateOpts::parse("size=1M,subformat=streamOptimized").unwrap();
    formats::create(&img, Format::Vmdk, &o).unwrap();
    let d = formats::open(&img, &OpenOptions::read_write()).unwrap();
    d.write_at(&pattern(64 << 10, 2), 0).unwrap();
    d.close().unwrap();
    img
}

#[test]
fn hostile_compressed_grain_inflates_beyond_grain() {
    let dir = tmpdir();
    let img = stream_image(dir.path());
    // Replace the first grain (at sector 128) with 1 MiB of zeroes, deflated.
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut z, &vec![0u8; 1 << 20]).unwrap();
    let data = z.finish().unwrap();
    let mut marker = 0u64.to_le_bytes().to_vec();
    marker.extend_from_slice(&(data.len() as u32).to_le_bytes());
    marker.extend_from_slice(&data);
    assert!(marker.len() < 64 << 10);
    patch(&img, 128 * 512, &marker);
    let m = read_err(&img);
    assert!(m.contains("inflates beyond its grain size"), "{m}");
}

#[test]
fn hostile_grain_marker_size() {
    let dir = tmpdir();
    let img = stream_image(dir.path());
    patch(&img, 128 * 512 + 8, &u32::MAX.to_le_bytes());
    let m = read_err(&img);
    assert!(m.contains("invalid grain marker"), "{m}");
}

#[test]
fn hostile_stream_without_footer() {
    let dir = tmpdir();
    let img = stream_image(dir.path());
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len - 512)
        .unwrap();
    let m = open_err(&img);
    assert!(m.contains("Invalid footer"), "{m}");
}

#[test]
fn hostile_tiny_and_truncated_files() {
    let dir = tmpdir();
    let tiny = p(dir.path(), "tiny.vmdk");
    std::fs::write(&tiny, b"KDMV").unwrap();
    let m = open_err(&tiny);
    assert!(m.contains("tiny.vmdk"), "{m}");
    let img = sparse_image(dir.path(), "trunc.vmdk", "");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let m = open_err(&img);
    assert!(
        m.contains("truncated") || m.contains("beyond the end"),
        "{m}"
    );
}

/// Header geometry qemu refuses, refused with qemu-img's words in qemu's order: a zero
/// grain size, a grain over 1 GiB, a capacity needing more than 32M grain tables (iotest
/// 059's afl9 image).
#[test]
fn hostile_geometry_messages_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (at, value) in [
        (20u64, 0u64),
        (20, 0x40_0000),
        (12, 2_233_785_398_448_881_665),
    ] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "vmdk", "h.vmdk", "10M"],
        ));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("h.vmdk"))
            .unwrap();
        f.write_all_at(&value.to_le_bytes(), at).unwrap();
        same_as_qemu(d, &["info", "h.vmdk"]);
    }
}
