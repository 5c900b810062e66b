//! qcow2 images made by qemu-img over its whole option space: diskit's info (JSON and
//! human), map and raw conversion must equal qemu-img's, text for text, byte for byte.

mod common;
use common::*;
use std::path::Path;

/// Writes a mix of data, zeroes, compressed clusters and discards with qemu-io.
fn populate(d: &Path, img: &str, cluster: u64, compressed: bool) {
    let c = cluster;
    let mut cmds: Vec<String> = vec![
        format!("write -P 0x11 0 {}", 3 * c),
        format!("write -P 0x22 {} {}", 5 * c + 512, c),
        format!("write -z {} {}", 8 * c, 2 * c),
        format!("write -P 0x33 {} 4096", 40 * c),
        format!("discard {} {}", c, c),
    ];
    if compressed {
        cmds.push(format!("write -c -P 0x44 {} {}", 12 * c, c));
        cmds.push(format!("write -c -P 0x55 {} {}", 13 * c, c));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ok(qemu_io(d, "qcow2", img, &refs));
}

fn compare_all(d: &Path, img: &str) {
    same_as_qemu(d, &["map", "--output=json", img]);
    same_as_qemu(d, &["map", img]);
    same_as_qemu(d, &["info", img]);
    same_as_qemu(d, &["info", "--output=json", img]);
    same_as_qemu(d, &["info", "--output=json", "--backing-chain", img]);
    let want = qemu_raw(d, img, None);
    ok(diskit(d, &["convert", "-O", "raw", img, "diskit.raw"]));
    let got = std::fs::read(d.join("diskit.raw")).unwrap();
    assert!(got == want, "{img}: converted content differs");
    std::fs::remove_file(d.join("diskit.raw")).unwrap();
}

#[test]
fn option_matrix_reads_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let mut n = 0;
    for compat in ["0.10", "1.1"] {
        for cluster in [512u64, 4096, 65536, 2 << 20] {
            for refbits in [1u32, 16, 64] {
                for ext_l2 in [false, true] {
                    if ext_l2 && (compat == "0.10" || cluster < 16384) {
                        continue;
                    }
                    if compat == "0.10" && refbits != 16 {
                        continue;
                    }
                    let name = format!("m{n}.qcow2");
                    n += 1;
                    let opts = format!(
                        "compat={compat},cluster_size={cluster},refcount_bits={refbits},extended_l2={}",
                        if ext_l2 { "on" } else { "off" }
                    );
                    let size = (64 * cluster).max(4 << 20).to_string();
                    ok(qemu_img(
                        d,
                        &["create", "-q", "-f", "qcow2", "-o", &opts, &name, &size],
                    ));
                    populate(d, &name, cluster, true);
                    compare_all(d, &name);
                }
            }
        }
    }
    assert!(n > 10);
}

#[test]
fn feature_variants_read_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (i, opts) in [
        "lazy_refcounts=on",
        "compression_type=zstd",
        "compression_type=zlib,cluster_size=2M",
        "preallocation=metadata",
        "preallocation=falloc",
        "compat=0.10,preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("f{i}.qcow2");
        let cluster: u64 = if opts.contains("2M") { 2 << 20 } else { 65536 };
        let size = (64 * cluster).to_string();
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", opts, &name, &size],
        ));
        populate(
            d,
            &name,
            cluster,
            !opts.contains("0.10") && !opts.contains("prealloc"),
        );
        compare_all(d, &name);
    }
}

#[test]
fn backing_chains_snapshots_bitmaps_and_data_files() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::create_dir_all(d.join("sub")).unwrap();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "16M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "base.qcow2",
        &["write -P 1 0 4M", "write -P 2 8M 1M"],
    ));
    // relative name resolved against the overlay's directory
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "sub/mid.qcow2",
        ],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "sub/mid.qcow2",
        &["write -P 3 1M 1M", "write -z 8M 64k"],
    ));
    let abs = d.join("sub/mid.qcow2");
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            abs.to_str().unwrap(),
            "-F",
            "qcow2",
            "top.qcow2",
            "20M",
        ],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "top.qcow2",
        &["write -P 4 3M 512", "write -P 5 17M 64k"],
    ));
    compare_all(d, "top.qcow2");
    compare_all(d, "sub/mid.qcow2");
    // raw backing without format: probed
    std::fs::write(d.join("rb.raw"), pattern(2 << 20, 3)).unwrap();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "rb.raw",
            "-F",
            "raw",
            "over-raw.qcow2",
        ],
    ));
    compare_all(d, "over-raw.qcow2");
    // snapshots
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "snap.qcow2", "4M"],
    ));
    ok(qemu_io(d, "qcow2", "snap.qcow2", &["write -P 7 0 1M"]));
    ok(qemu_img(d, &["snapshot", "-c", "first", "snap.qcow2"]));
    ok(qemu_io(d, "qcow2", "snap.qcow2", &["write -P 8 0 512k"]));
    ok(qemu_img(d, &["snapshot", "-c", "second", "snap.qcow2"]));
    compare_all(d, "snap.qcow2");
    // persistent bitmaps
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "bm.qcow2", "4M"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", "bm.qcow2", "b0"]));
    ok(qemu_img(
        d,
        &[
            "bitmap",
            "--add",
            "-g",
            "128k",
            "--disable",
            "bm.qcow2",
            "b1",
        ],
    ));
    compare_all(d, "bm.qcow2");
    // external data file, raw and not
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=ext.data",
            "ext.qcow2",
            "4M",
        ],
    ));
    ok(qemu_io(d, "qcow2", "ext.qcow2", &["write -P 9 64k 128k"]));
    compare_all(d, "ext.qcow2");
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=extr.data,data_file_raw=on",
            "extr.qcow2",
            "4M",
        ],
    ));
    ok(qemu_io(d, "qcow2", "extr.qcow2", &["write -P 10 0 128k"]));
    compare_all(d, "extr.qcow2");
}

#[test]
fn measure_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "src.qcow2",
        &["write -P 1 100k 3M", "write -z 8M 1M", "write -P 2 30M 4k"],
    ));
    ok(qemu_img(d, &["bitmap", "--add", "src.qcow2", "bm"]));
    for args in [
        &["measure", "--size", "1G", "-O", "qcow2"][..],
        &["measure", "--output=json", "--size", "1G", "-O", "qcow2"],
        &["measure", "-O", "qcow2", "src.qcow2"],
        &["measure", "--output=json", "-O", "qcow2", "src.qcow2"],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,refcount_bits=1",
            "src.qcow2",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,extended_l2=on",
            "--size",
            "100T",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=512",
            "--size",
            "10T",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "preallocation=full",
            "--size",
            "100M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "backing_file=x",
            "src.qcow2",
        ],
        &["measure", "-O", "raw", "src.qcow2"],
        // subclusters without a cluster size: 64 KiB, as everywhere (iotest 271)
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            "--size",
            "512M",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            "--size",
            "1025T",
        ],
    ] {
        same_as_qemu(d, args);
    }
}

/// An external data file: `map` names it as the file holding the data, raw or not.
#[test]
fn external_data_file_reads_and_maps_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (img, opts) in [
        ("df.qcow2", "data_file=df.data"),
        ("dfr.qcow2", "data_file=dfr.data,data_file_raw=on"),
    ] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", opts, img, "8M"],
        ));
        populate(d, img, 65536, false);
        compare_all(d, img);
    }
}
