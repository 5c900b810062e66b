//! vmdk interop with qemu-img: images qemu writes read back identically in diskit, images
//! diskit writes pass `qemu-img check` and read back identically in qemu, and `info` prints
//! the same JSON text.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use diskit::formats::{self, CreateOpts, Format, Mapping, OpenOptions};

const MIB: u64 = 1 << 20;

fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_str().unwrap().to_string()
}

/// Writes the usual test pattern with qemu-io: data at several offsets, partial grains,
/// a run crossing grains, and zero writes.
fn qemu_fill(dir: &Path, img: &str, size: u64) {
    let cmds = [
        "write -P 0xab 0 64k".to_string(),
        "write -P 0x11 100k 10k".to_string(),
        "write -P 0x22 1000k 300k".to_string(),
        format!("write -P 0x33 {} 4k", size - 4096),
        "write -z 1100k 64k".to_string(),
    ];
    let c: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    ok(qemu_io(dir, "vmdk", img, &c));
}

fn assert_same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i:#x}");
    }
}

fn qemu_create(dir: &Path, img: &str, opts: &str, size: &str) {
    let mut args = vec!["create", "-q", "-f", "vmdk"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([img, size]);
    ok(qemu_img(dir, &args));
}

/// Guest content through diskit, exported sparsely using `map`, then compared by qemu-img.
fn diskit_export_and_compare(dir: &Path, img: &str) {
    let d = formats::open(img, &OpenOptions::read_only()).unwrap();
    let out = std::fs::File::create(dir.join("export.raw")).unwrap();
    out.set_len(d.virtual_size()).unwrap();
    let mut off = 0;
    let mut buf = vec![0u8; MIB as usize];
    while off < d.virtual_size() {
        let (m, n) = d.map(off, 64 * MIB).unwrap();
        assert!(n > 0);
        if matches!(
            m,
            Mapping::Data { .. } | Mapping::Compressed | Mapping::Unallocated
        ) {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(MIB) as usize;
                d.read_at(&mut buf[..k], off + done).unwrap();
                if buf[..k].iter().any(|&b| b != 0) {
                    out.write_all_at(&buf[..k], off + done).unwrap();
                }
                done += k as u64;
            }
        }
        off += n;
    }
    drop(out);
    ok(qemu_img(
        dir,
        &["compare", "-f", "raw", "-F", "vmdk", "export.raw", img],
    ));
}

// ---------------------------------------------------------------- qemu writes, diskit reads

fn read_case(opts: &str) {
    let dir = tmpdir();
    let img = p(dir.path(), "t.vmdk");
    let size = 4 * MIB;
    if opts.contains("streamOptimized") {
        // qemu writes streams through convert (whole grains in order).
        let src = p(dir.path(), "src.vmdk");
        qemu_create(dir.path(), &src, "", "4M");
        qemu_fill(dir.path(), &src, size);
        ok(qemu_img(
            dir.path(),
            &["convert", "-O", "vmdk", "-o", opts, &src, &img],
        ));
    } else {
        qemu_create(dir.path(), &img, opts, "4M");
        qemu_fill(dir.path(), &img, size);
    }
    let q = qemu_raw(dir.path(), &img, Some("vmdk"));
    let d = diskit_raw(Path::new(&img));
    assert_same(&d, &q, opts);
}

#[test]
fn read_monolithic_sparse_ide() {
    require_qemu!();
    read_case("");
}

#[test]
fn read_monolithic_sparse_lsilogic_zeroed_grain() {
    require_qemu!();
    read_case("adapter_type=lsilogic,zeroed_grain=on");
}

#[test]
fn read_monolithic_sparse_buslogic_compat6() {
    require_qemu!();
    read_case("adapter_type=buslogic,compat6=on");
}

#[test]
fn read_monolithic_flat_legacy_esx() {
    require_qemu!();
    read_case("subformat=monolithicFlat,adapter_type=legacyESX");
}

#[test]
fn read_two_gb_sparse_small() {
    require_qemu!();
    read_case("subformat=twoGbMaxExtentSparse,zeroed_grain=on");
}

#[test]
fn read_two_gb_flat_small() {
    require_qemu!();
    read_case("subformat=twoGbMaxExtentFlat,hwversion=7");
}

#[test]
fn read_stream_optimized_qemu_layout() {
    require_qemu!();
    read_case("subformat=streamOptimized");
}

#[test]
fn read_two_gb_split_across_extents() {
    require_qemu!();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let dir = tmpdir();
        let img = p(dir.path(), "big.vmdk");
        qemu_create(dir.path(), &img, &format!("subformat={sub}"), "2049M");
        ok(qemu_io(
            dir.path(),
            "vmdk",
            &img,
            &[
                "write -P 0x5a 2047M 2M",
                "write -P 0x66 0 1k",
                "write -P 0x77 2148531712 512",
            ],
        ));
        let d = formats::open(&img, &OpenOptions::read_only()).unwrap();
        assert_eq!(d.virtual_size(), 2049 * MIB);
        let info = d.info().unwrap();
        let children: Vec<&str> = info.children.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(children, ["extents.1", "extents.0", "file"], "{sub}");
        drop(d);
        diskit_export_and_compare(dir.path(), &img);
    }
}

#[test]
fn read_backing_chain_and_zeroed_grains() {
    require_qemu!();
    let dir = tmpdir();
    let base = p(dir.path(), "base.vmdk");
    let top = p(dir.path(), "top.vmdk");
    qemu_create(dir.path(), &base, "", "4M");
    ok(qemu_io(
        dir.path(),
        "vmdk",
        &base,
        &["write -P 0x01 0 1M", "write -P 0x02 2M 1M"],
    ));
    ok(qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            &top,
        ],
    ));
    ok(qemu_io(
        dir.path(),
        "vmdk",
        &top,
        &[
            "write -P 0x03 10k 5k",
            "write -z 2M 128k",
            "write -P 0x04 3M 64k",
        ],
    ));
    let q = qemu_raw(dir.path(), &top, Some("vmdk"));
    let d = diskit_raw(Path::new(&top));
    assert_same(&d, &q, "overlay");
    let img = formats::open(&top, &OpenOptions::read_only()).unwrap();
    assert_eq!(
        img.map(2 * MIB, MIB).unwrap(),
        (Mapping::Zero { explicit: true }, 128 << 10)
    );
    // The overlay's first grain is the first one qemu allocated, right after the metadata.
    assert_eq!(
        img.map(0, MIB).unwrap(),
        (
            Mapping::Data {
                host_offset: 0x10000
            },
            64 << 10
        )
    );
    assert!(img.backing().is_some());
}

#[test]
fn read_descriptor_with_mixed_extents() {
    require_qemu!();
    // A hand-written descriptor: a flat extent with an offset, a sparse extent in a
    // subdirectory, and a ZERO extent (which qemu does not know, so it is last and compared
    // separately).
    let dir = tmpdir();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    let flat: Vec<u8> = pattern(3 * MIB as usize, 7);
    std::fs::write(d.join("data.bin"), &flat).unwrap();
    let sparse = p(d, "sub/s.vmdk");
    qemu_create(d, &sparse, "", "1M");
    ok(qemu_io(d, "vmdk", &sparse, &["write -P 0x42 4k 8k"]));
    let desc = "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\n# Extent description\nRW 2048 FLAT \"data.bin\" 2048\nRW 2048 SPARSE \"sub/s.vmdk\"\n";
    std::fs::write(d.join("m.vmdk"), desc).unwrap();
    let m = p(d, "m.vmdk");
    let q = qemu_raw(d, &m, Some("vmdk"));
    let dk = diskit_raw(Path::new(&m));
    assert_same(&dk, &q, "mixed");
    assert_same(
        &dk[..MIB as usize],
        &flat[MIB as usize..2 * MIB as usize],
        "flat part",
    );

    let with_zero = format!("{desc}RW 2048 ZERO\n");
    std::fs::write(d.join("z.vmdk"), with_zero).unwrap();
    let z = formats::open(&p(d, "z.vmdk"), &OpenOptions::read_only()).unwrap();
    assert_eq!(z.virtual_size(), 3 * MIB);
    assert_eq!(
        z.map(2 * MIB, MIB).unwrap(),
        (Mapping::Zero { explicit: true }, MIB)
    );
    let mut buf = vec![1u8; 4096];
    z.read_at(&mut buf, 2 * MIB + 4096).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[test]
fn read_vmfs_descriptor() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let data = pattern(MIB as usize, 3);
    std::fs::write(d.join("v-flat.vmdk"), &data).unwrap();
    std::fs::write(
        d.join("v.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"vmfs\"\n\n# Extent description\nRW 2048 VMFS \"v-flat.vmdk\"\n",
    )
    .unwrap();
    let v = p(d, "v.vmdk");
    let q = qemu_raw(d, &v, Some("vmdk"));
    assert_same(&diskit_raw(Path::new(&v)), &q, "vmfs");
    assert_same(&q, &data, "vmfs data");
}

#[test]
fn read_redundant_gd_when_primary_damaged() {
    require_qemu!();
    let dir = tmpdir();
    let img = p(dir.path(), "r.vmdk");
    qemu_create(dir.path(), &img, "", "4M");
    qemu_fill(dir.path(), &img, 4 * MIB);
    let good = qemu_raw(dir.path(), &img, Some("vmdk"));
    // Point the primary directory far beyond the end of the file.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&(1u64 << 40).to_le_bytes(), 56).unwrap();
    drop(f);
    assert_same(&diskit_raw(Path::new(&img)), &good, "redundant GD");
    // Writing to such an image is refused.
    let e = formats::open(&img, &OpenOptions::read_write())
        .err()
        .unwrap();
    assert!(e.message().contains("grain directory"), "{e}");
}

#[test]
fn read_cid_mismatch_is_only_a_warning() {
    require_qemu!();
    let dir = tmpdir();
    let base = p(dir.path(), "base.vmdk");
    qemu_create(dir.path(), &base, "", "1M");
    ok(qemu_io(dir.path(), "vmdk", &base, &["write -P 0x61 0 1M"]));
    let top = p(dir.path(), "top.vmdk");
    ok(qemu_img(
        dir.path(),
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            &top,
        ],
    ));
    // Any write to the base gives it a new CID.
    ok(qemu_io(dir.path(), "vmdk", &base, &["write -P 0x62 0 512"]));
    let d = diskit_raw(Path::new(&top));
    assert_eq!(d[0], 0x62);
    assert_eq!(d[512], 0x61);
}

// ---------------------------------------------------------------- diskit writes, qemu reads

/// Opens read-write, retrying briefly: a qemu-img child forked by a parallel test may
/// still hold our previous descriptor (and its OFD lock) until it execs.
fn open_rw(img: &str) -> Box<dyn diskit::BlockDriver> {
    for _ in 0..100 {
        match formats::open(img, &OpenOptions::read_write()) {
            Err(e) if e.kind() == diskit::ErrorKind::Locked => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => return r.unwrap(),
        }
    }
    panic!("{img} stays locked");
}

fn create_opts(s: &str) -> CreateOpts {
    CreateOpts::parse(s).unwrap()
}

/// Writes a pattern through the library: whole grains, partial grains, a run across grains
/// and zero writes, in increasing order (so it suits streams too). Returns the expected image.
fn diskit_fill(img: &dyn diskit::BlockDriver, size: u64) -> Vec<u8> {
    let mut model = vec![0u8; size as usize];
    let mut w = |data: &[u8], off: u64| {
        img.write_at(data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    w(&pattern(64 << 10, 1), 0);
    w(&pattern(10 << 10, 2), 100 << 10);
    w(&pattern(300 << 10, 3), 1000 << 10);
    img.write_zeroes(1400 << 10, 128 << 10, false).unwrap();
    w(&vec![0x5au8; 4096], 2 * MIB);
    w(&pattern(4096, 4), size - 4096);
    model
}

fn write_case(opts: &str, create_type: &str) {
    let dir = tmpdir();
    let img = p(dir.path(), "w.vmdk");
    let size = 4 * MIB;
    formats::create(&img, Format::Vmdk, &create_opts(&format!("size=4M,{opts}"))).unwrap();
    let d = open_rw(&img);
    let model = diskit_fill(d.as_ref(), size);
    d.close().unwrap();
    drop(d);
    let out = ok(qemu_img(dir.path(), &["check", "-f", "vmdk", &img]));
    assert!(
        stdout(&out).contains("No errors were found"),
        "{}",
        stdout(&out)
    );
    let info = json(&ok(qemu_img(dir.path(), &["info", "--output=json", &img])));
    assert_eq!(info["format-specific"]["data"]["create-type"], create_type);
    assert_eq!(info["virtual-size"], size);
    let q = qemu_raw(dir.path(), &img, Some("vmdk"));
    assert_same(&q, &model, opts);
    assert_same(&diskit_raw(Path::new(&img)), &model, opts);
}

#[test]
fn write_monolithic_sparse() {
    require_qemu!();
    write_case("", "monolithicSparse");
}

#[test]
fn write_monolithic_sparse_zeroed_grain() {
    require_qemu!();
    write_case("zeroed_grain=on,adapter_type=lsilogic", "monolithicSparse");
}

#[test]
fn write_monolithic_flat() {
    require_qemu!();
    write_case("subformat=monolithicFlat", "monolithicFlat");
}

#[test]
fn write_two_gb_sparse() {
    require_qemu!();
    write_case("subformat=twoGbMaxExtentSparse", "twoGbMaxExtentSparse");
}

#[test]
fn write_two_gb_flat() {
    require_qemu!();
    write_case("subformat=twoGbMaxExtentFlat", "twoGbMaxExtentFlat");
}

#[test]
fn write_stream_optimized() {
    require_qemu!();
    write_case("subformat=streamOptimized", "streamOptimized");
}

#[test]
fn write_stream_optimized_empty_and_out_of_order() {
    require_qemu!();
    let dir = tmpdir();
    let img = p(dir.path(), "s.vmdk");
    formats::create(
        &img,
        Format::Vmdk,
        &create_opts("size=1M,subformat=streamOptimized"),
    )
    .unwrap();
    ok(qemu_img(dir.path(), &["check", "-f", "vmdk", &img]));
    assert!(qemu_raw(dir.path(), &img, Some("vmdk"))
        .iter()
        .all(|&b| b == 0));
    let d = open_rw(&img);
    d.write_at(&[1u8; 512], 256 << 10).unwrap();
    let e = d.write_at(&[1u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), diskit::ErrorKind::Unsupported, "{e}");
    d.close().unwrap();
    drop(d);
    let q = qemu_raw(dir.path(), &img, Some("vmdk"));
    assert_eq!(q[256 << 10], 1);
}

#[test]
fn write_split_across_extent_boundary() {
    require_qemu!();
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let dir = tmpdir();
        let img = p(dir.path(), "b.vmdk");
        formats::create(
            &img,
            Format::Vmdk,
            &create_opts(&format!("size=2049M,subformat={sub}")),
        )
        .unwrap();
        let d = open_rw(&img);
        let data = pattern(3 * MIB as usize, 9);
        d.write_at(&data, 2046 * MIB).unwrap();
        d.close().unwrap();
        drop(d);
        ok(qemu_img(dir.path(), &["check", "-f", "vmdk", &img]));
        let out = ok(qemu_io(
            dir.path(),
            "vmdk",
            &img,
            &["read -v 2145386496 16", "read -P 0 0 1M"],
        ));
        let text = stdout(&out);
        let first: Vec<String> = data[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert!(text.contains(&first.join(" ")), "{sub}: {text}");
        diskit_export_and_compare(dir.path(), &img);
    }
}

#[test]
fn write_overlay_copies_backing_grain() {
    require_qemu!();
    let dir = tmpdir();
    let base = p(dir.path(), "base.vmdk");
    qemu_create(dir.path(), &base, "", "1M");
    ok(qemu_io(dir.path(), "vmdk", &base, &["write -P 0x77 0 1M"]));
    let top = p(dir.path(), "top.vmdk");
    formats::create(
        &top,
        Format::Vmdk,
        &create_opts("backing_file=base.vmdk,backing_fmt=vmdk"),
    )
    .unwrap();
    let d = open_rw(&top);
    assert_eq!(d.virtual_size(), MIB);
    d.write_at(&[0x99u8; 512], 4096).unwrap();
    d.close().unwrap();
    drop(d);
    ok(qemu_img(dir.path(), &["check", "-f", "vmdk", &top]));
    let q = qemu_raw(dir.path(), &top, Some("vmdk"));
    let mut model = vec![0x77u8; MIB as usize];
    model[4096..4608].fill(0x99);
    assert_same(&q, &model, "overlay");
    let info = json(&ok(qemu_img(dir.path(), &["info", "--output=json", &top])));
    assert_eq!(info["backing-filename"], "base.vmdk");
}

#[test]
fn write_updates_cid() {
    require_qemu!();
    let dir = tmpdir();
    let img = p(dir.path(), "c.vmdk");
    formats::create(&img, Format::Vmdk, &create_opts("size=1M")).unwrap();
    let before = json(&ok(qemu_img(dir.path(), &["info", "--output=json", &img])))
        ["format-specific"]["data"]["cid"]
        .clone();
    let d = open_rw(&img);
    d.write_at(&[1u8; 512], 0).unwrap();
    d.close().unwrap();
    drop(d);
    let after = json(&ok(qemu_img(dir.path(), &["info", "--output=json", &img])))
        ["format-specific"]["data"]["cid"]
        .clone();
    assert_ne!(before, after);
}

// ---------------------------------------------------------------- create options and info

#[test]
fn create_errors_match_qemu() {
    let dir = tmpdir();
    let img = p(dir.path(), "e.vmdk");
    let cases = [
        ("size=1M,adapter_type=foo", "invalid parameter value: foo"),
        ("size=1M,subformat=foo", "invalid parameter value: foo"),
        (
            "size=1M,compat6=on,hwversion=5",
            "compat6 cannot be enabled with hwversion set",
        ),
        (
            "size=1M,subformat=monolithicFlat,zeroed_grain=on",
            "Flat image can't enable zeroed grain",
        ),
        (
            "size=1M,zeroed_grain=maybe",
            "Parameter 'zeroed_grain' expects 'on' or 'off'",
        ),
        (
            "size=1M,backing_file=x,backing_fmt=raw",
            "backing_file must be a vmdk image",
        ),
        (
            "size=1M,subformat=monolithicFlat,backing_file=x",
            "Flat image can't have backing file",
        ),
        (
            "size=1M,cluster_size=64k",
            "Invalid parameter 'cluster_size'",
        ),
    ];
    for (o, msg) in cases {
        let e = formats::create(&img, Format::Vmdk, &create_opts(o)).unwrap_err();
        assert!(e.message().ends_with(msg), "{o}: {e}");
        assert!(e.message().starts_with(&img), "{o}: {e}");
    }
}

#[test]
fn create_summary_matches_qemu() {
    require_qemu!();
    let dir = tmpdir();
    for o in [
        "size=10M",
        "size=1000,adapter_type=lsilogic,subformat=monolithicFlat",
        "size=3G,compat6=on,zeroed_grain=on,subformat=twoGbMaxExtentSparse",
        "size=1M,hwversion=7,toolsversion=5,subformat=streamOptimized",
    ] {
        let out = ok(qemu_img(
            dir.path(),
            &["create", "-f", "vmdk", "-o", o, "s.vmdk"],
        ));
        let want = stdout(&out);
        let got = format!(
            "Formatting 's.vmdk', {}\n",
            formats::create_summary(Format::Vmdk, &create_opts(o))
        );
        assert_eq!(got, want, "{o}");
    }
}

#[test]
fn create_matches_qemu_descriptor_and_header() {
    require_qemu!();
    let dir = tmpdir();
    let q = p(dir.path(), "q.vmdk");
    let d = p(dir.path(), "d.vmdk");
    qemu_create(dir.path(), &q, "adapter_type=buslogic,hwversion=6", "100M");
    formats::create(
        &d,
        Format::Vmdk,
        &create_opts("size=100M,adapter_type=buslogic,hwversion=6"),
    )
    .unwrap();
    let a = std::fs::read(&q).unwrap();
    let b = std::fs::read(&d).unwrap();
    assert_eq!(a.len(), b.len());
    assert_eq!(a[..512], b[..512], "header");
    let strip = |v: &[u8]| -> String {
        // the CIDs may differ in length, which shifts the zero padding
        String::from_utf8_lossy(&v[512..512 * 21])
            .trim_end_matches('\0')
            .lines()
            .filter(|l| !l.starts_with("CID="))
            .collect::<Vec<_>>()
            .join("\n")
            .replace('q', "d")
    };
    assert_eq!(strip(&a), strip(&b), "descriptor");
    assert_eq!(a[512 * 21..], b[512 * 21..], "tables");
}

fn info_case(dir: &Path, img: &str) {
    let out = ok(qemu_img(dir, &["info", "--output=json", img]));
    let want = stdout(&out);
    let mut o = OpenOptions::read_only();
    o.no_backing = true;
    let d = formats::open(img, &o).unwrap();
    let got = diskit::qjson::to_pretty(&d.info().unwrap().to_json());
    assert_eq!(got, want.trim_end(), "{img}");
}

#[test]
fn info_json_matches_qemu_for_every_subformat() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let base = p(d, "base.vmdk");
    qemu_create(d, &base, "", "8M");
    qemu_fill(d, &base, 8 * MIB);
    for (name, opts, size) in [
        ("ms.vmdk", "zeroed_grain=on", "8M"),
        (
            "mf.vmdk",
            "subformat=monolithicFlat,adapter_type=lsilogic",
            "8M",
        ),
        ("ts.vmdk", "subformat=twoGbMaxExtentSparse", "3G"),
        ("tf.vmdk", "subformat=twoGbMaxExtentFlat", "2049M"),
    ] {
        let img = p(d, name);
        qemu_create(d, &img, opts, size);
        info_case(d, &img);
    }
    let so = p(d, "so.vmdk");
    ok(qemu_img(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            &base,
            &so,
        ],
    ));
    info_case(d, &so);
    let ov = p(d, "ov.vmdk");
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            "base.vmdk",
            "-F",
            "vmdk",
            &ov,
        ],
    ));
    info_case(d, &ov);
    info_case(d, &base);
    // And images diskit wrote.
    for (name, opts) in [
        ("dstream.vmdk", "subformat=streamOptimized"),
        ("dsplit.vmdk", "subformat=twoGbMaxExtentSparse"),
    ] {
        let img = p(d, name);
        formats::create(
            &img,
            Format::Vmdk,
            &create_opts(&format!("size=2049M,{opts}")),
        )
        .unwrap();
        let w = open_rw(&img);
        w.write_at(&pattern(1 << 20, 5), 0).unwrap();
        w.close().unwrap();
        drop(w);
        info_case(d, &img);
    }
}

// ---------------------------------------------------------------- the stream layout

#[test]
fn stream_markers_walk() {
    let dir = tmpdir();
    let img = p(dir.path(), "m.vmdk");
    let size = 70 * MIB; // more than one grain table (32 MiB each)
    formats::create(
        &img,
        Format::Vmdk,
        &create_opts(&format!("size={size},subformat=streamOptimized")),
    )
    .unwrap();
    let d = open_rw(&img);
    let data = pattern(200 << 10, 11);
    d.write_at(&data, 0).unwrap();
    d.write_at(&data, 40 * MIB + 512).unwrap();
    d.write_at(&data[..4096], size - 4096).unwrap();
    d.close().unwrap();
    drop(d);

    let f = std::fs::read(&img).unwrap();
    let le64 = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
    let le32 = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
    assert_eq!(&f[..4], b"KDMV");
    assert_eq!(le32(4), 3, "version");
    assert_eq!(le32(8) & 0x30001, 0x30001, "flags");
    assert_eq!(le64(56), u64::MAX, "gdOffset is GD_AT_END");
    let overhead = le64(64) as usize * 512;
    assert_eq!(f.len() % 512, 0);
    let mut pos = overhead;
    let mut lbas = Vec::new();
    let mut gts = Vec::new();
    let mut gd_at = 0;
    let mut kinds = Vec::new();
    loop {
        let val = le64(pos);
        let size = le32(pos + 8) as usize;
        if size > 0 {
            lbas.push(val);
            let mut z = flate2::read::ZlibDecoder::new(&f[pos + 12..pos + 12 + size]);
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut z, &mut out).unwrap();
            assert!(out.len() <= 65536);
            pos += (12 + size).div_ceil(512) * 512;
            continue;
        }
        let kind = le32(pos + 12);
        kinds.push(kind);
        match kind {
            1 => {
                assert_eq!(val, 4);
                gts.push(pos / 512 + 1);
                pos += 512 * (1 + val as usize);
            }
            2 => {
                gd_at = pos / 512 + 1;
                pos += 512 * (1 + val as usize);
            }
            3 => {
                assert_eq!(val, 1);
                assert_eq!(&f[pos + 512..pos + 516], b"KDMV");
                assert_eq!(
                    u64::from_le_bytes(f[pos + 512 + 56..pos + 512 + 64].try_into().unwrap()),
                    gd_at as u64
                );
                pos += 1024;
            }
            0 => {
                assert!(f[pos..pos + 512].iter().all(|&b| b == 0));
                pos += 512;
                break;
            }
            k => panic!("unknown marker {k} at {pos:#x}"),
        }
    }
    assert_eq!(pos, f.len(), "end-of-stream marker is the last sector");
    assert_eq!(kinds.last(), Some(&0));
    assert_eq!(&kinds[kinds.len() - 3..], &[2, 3, 0]);
    assert_eq!(
        gts.len(),
        3,
        "one table per grain table span holding grains"
    );
    assert!(
        lbas.windows(2).all(|w| w[0] < w[1]),
        "grains in increasing order"
    );
    assert_eq!(lbas[0], 0);
    assert!(lbas.contains(&((40 * MIB) / 512)));
    // The directory names the three tables.
    let gd: Vec<u32> = (0..3).map(|i| le32(gd_at * 512 + i * 4)).collect();
    assert_eq!(gd, [gts[0] as u32, gts[1] as u32, gts[2] as u32]);
    // It maps as compressed grains and holes, and reads back.
    let r = formats::open(&img, &OpenOptions::read_only()).unwrap();
    assert_eq!(r.map(0, MIB).unwrap(), (Mapping::Compressed, 256 << 10));
    assert_eq!(r.map(MIB, MIB).unwrap(), (Mapping::Unallocated, MIB));
    drop(r);
    let back = diskit_raw(Path::new(&img));
    assert_same(&back[..data.len()], &data, "stream data");
}

#[test]
fn read_vmfs_sparse_cowd_extent() {
    require_qemu!();
    // A hand-made ESX sparse (COWD) extent: 1 MiB, 8 KiB grains, one grain table of 4096
    // entries at sector 4, two grains of data.
    let dir = tmpdir();
    let d = dir.path();
    let mut f = vec![0u8; 64 * 512 + 2 * 8192];
    f[0..4].copy_from_slice(b"COWD");
    let put = |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put(&mut f, 4, 1); // version
    put(&mut f, 8, 3); // flags
    put(&mut f, 12, 2048); // capacity in sectors
    put(&mut f, 16, 16); // granularity
    put(&mut f, 20, 2); // directory at sector 2
    put(&mut f, 24, 1); // one directory entry
    put(&mut f, 2 * 512, 4); // grain table at sector 4 (32 sectors)
    put(&mut f, 4 * 512 + 3 * 4, 64); // grain 3 at sector 64
    put(&mut f, 4 * 512 + 100 * 4, 80); // grain 100 at sector 80
    let data = pattern(2 * 8192, 21);
    f[64 * 512..].copy_from_slice(&data);
    std::fs::write(d.join("c-delta.vmdk"), &f).unwrap();
    std::fs::write(
        d.join("c.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"vmfsSparse\"\n# Extent description\nRW 2048 VMFSSPARSE \"c-delta.vmdk\"\n",
    )
    .unwrap();
    let c = p(d, "c.vmdk");
    let q = qemu_raw(d, &c, Some("vmdk"));
    let dk = diskit_raw(Path::new(&c));
    assert_same(&dk, &q, "cowd");
    assert_same(&dk[3 * 8192..4 * 8192], &data[..8192], "cowd grain 3");
    assert_same(&dk[100 * 8192..101 * 8192], &data[8192..], "cowd grain 100");
    // The bare COWD file opens too.
    let bare = formats::open(&p(d, "c-delta.vmdk"), &OpenOptions::read_only()).unwrap();
    assert_eq!(bare.virtual_size(), MIB);
    assert_eq!(
        bare.map(3 * 8192, MIB).unwrap(),
        (
            Mapping::Data {
                host_offset: 64 * 512
            },
            8192
        )
    );
}

#[test]
fn resize_grows_sparse_and_flat() {
    require_qemu!();
    for (opts, steps) in [
        ("", &[100 * MIB, 5 << 30][..]), // the second step moves both directories
        ("subformat=monolithicFlat", &[3 * MIB][..]),
    ] {
        let dir = tmpdir();
        let img = p(dir.path(), "g.vmdk");
        formats::create(&img, Format::Vmdk, &create_opts(&format!("size=1M,{opts}"))).unwrap();
        let d = open_rw(&img);
        d.write_at(&pattern(100 << 10, 8), 0).unwrap();
        d.close().unwrap();
        drop(d);
        for &size in steps {
            diskit::formats::vmdk::resize(&img, size).unwrap();
            ok(qemu_img(dir.path(), &["check", "-f", "vmdk", &img]));
            let info = json(&ok(qemu_img(dir.path(), &["info", "--output=json", &img])));
            assert_eq!(info["virtual-size"], size, "{opts}");
            let d = open_rw(&img);
            assert_eq!(d.virtual_size(), size);
            d.write_at(&[0xeeu8; 4096], size - 4096).unwrap();
            d.close().unwrap();
            drop(d);
            let out = ok(qemu_io(
                dir.path(),
                "vmdk",
                &img,
                &[
                    &format!("read -P 0xee {} 4096", size - 4096),
                    "read -v 0 16",
                ],
            ));
            let first: Vec<String> = pattern(16, 8).iter().map(|b| format!("{b:02x}")).collect();
            assert!(stdout(&out).contains(&first.join(" ")), "{}", stdout(&out));
            assert!(!stdout(&out).contains("Pattern verification failed"));
        }
        assert!(
            diskit::formats::vmdk::resize(&img, MIB).is_err(),
            "shrinking is refused"
        );
    }
}

/// `map` names the extent file that holds each run, and reports a flat extent as data all
/// along (its holes too, with zero set where the extent file has a hole), as qemu-img does.
#[test]
fn map_matches_qemu_for_every_subformat() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (name, opts, size) in [
        ("ms.vmdk", "", "8M"),
        ("mf.vmdk", "subformat=monolithicFlat", "8M"),
        ("ts.vmdk", "subformat=twoGbMaxExtentSparse", "3G"),
        ("tf.vmdk", "subformat=twoGbMaxExtentFlat", "3G"),
        ("so.vmdk", "subformat=streamOptimized", "8M"),
    ] {
        qemu_create(d, name, opts, size);
        // data on both sides of the 2 GiB extent boundary where there is one, a zero write
        let cmds = if size == "3G" {
            vec!["write -P 0x11 2047M 2M", "write -P 0x22 1M 64k"]
        } else {
            vec!["write -P 0x22 1M 64k", "write -z 3M 64k"]
        };
        ok(qemu_io(d, "vmdk", name, &cmds));
        same_as_qemu(d, &["map", name]);
        same_as_qemu(d, &["map", "--output=json", name]);
        // through a path that is not the file's plain name
        let indirect = format!("../{}/{name}", d.file_name().unwrap().to_str().unwrap());
        same_as_qemu(d, &["map", &indirect]);
    }
}

/// Flat extents are made as qemu-img makes a raw file: sized, with their first block
/// written, so that `info` (disk size) and `map` agree with an image qemu-img created.
#[test]
fn created_flat_extents_allocate_like_qemu() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (opts, size) in [
        ("subformat=monolithicFlat", "5M"),
        ("subformat=monolithicFlat", "1k"),
        ("subformat=twoGbMaxExtentFlat", "3G"),
    ] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "vmdk", "-o", opts, "q.vmdk", size],
        ));
        ok(diskit(
            d,
            &["create", "-q", "-f", "vmdk", "-o", opts, "d.vmdk", size],
        ));
        let q = stdout(&ok(qemu_img(d, &["map", "--output=json", "q.vmdk"])));
        let m = stdout(&ok(qemu_img(d, &["map", "--output=json", "d.vmdk"])));
        assert_eq!(m, q, "{opts} {size}: map differs");
        let info = |name: &str| {
            let j = json(&ok(qemu_img(d, &["info", "--output=json", name])));
            j["actual-size"].as_u64().unwrap()
        };
        assert_eq!(info("d.vmdk"), info("q.vmdk"), "{opts} {size}: disk size");
    }
}
