//! Hostile and broken qcow2 files: each gets a clear error naming the file, a non-zero exit
//! and never a panic, a hang or a huge allocation.

mod common;
use common::*;
use std::os::unix::fs::FileExt;
use std::path::Path;

fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn be64(path: &Path, offset: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset).unwrap();
    u64::from_be_bytes(b)
}

/// A small image with data in two clusters.
fn good(d: &Path, name: &str) -> std::path::PathBuf {
    ok(qemu_img(d, &["create", "-q", "-f", "qcow2", name, "16M"]));
    ok(qemu_io(
        d,
        "qcow2",
        name,
        &["write -P 1 0 128k", "write -c -P 2 1M 64k"],
    ));
    d.join(name)
}

/// Runs `info` and `convert` and asserts a clean failure mentioning `name` and `what`.
fn assert_rejected(d: &Path, name: &str, what: &str) {
    for args in [
        vec!["info", name],
        vec!["convert", "-O", "raw", name, "out.raw"],
    ] {
        let out = diskit(d, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(
            err.contains(name),
            "{args:?}: error does not name the file: {err}"
        );
        assert!(
            err.to_lowercase().contains(&what.to_lowercase()),
            "{args:?}: error does not say '{what}': {err}"
        );
    }
}

#[test]
fn truncated_header() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "t.qcow2");
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(50).unwrap();
    let out = diskit(d, &["info", "-f", "qcow2", "t.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("t.qcow2"));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn cluster_bits_out_of_range() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "cb.qcow2");
    poke(&p, 20, &40u32.to_be_bytes());
    assert_rejected(d, "cb.qcow2", "cluster size");
}

#[test]
fn l1_table_past_end_of_file() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "l1.qcow2");
    poke(&p, 40, &(1u64 << 40).to_be_bytes());
    let out = diskit(d, &["convert", "-O", "raw", "l1.qcow2", "o.raw"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("l1.qcow2"));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn l2_table_past_end_of_file() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "l2.qcow2");
    let l1 = be64(&p, 40);
    poke(&p, l1, &((1u64 << 63) | (1u64 << 40)).to_be_bytes());
    let out = diskit(d, &["convert", "-O", "raw", "l2.qcow2", "o.raw"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("l2.qcow2"));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn l1_size_needing_gigabytes() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "big.qcow2");
    poke(&p, 36, &0x7fff_ffffu32.to_be_bytes());
    poke(&p, 24, &(1u64 << 62).to_be_bytes());
    let out = diskit(d, &["info", "big.qcow2"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("big.qcow2"));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn compressed_cluster_garbage() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "cz.qcow2");
    // The compressed cluster is the last data written: overwrite the file's tail cluster.
    let len = std::fs::metadata(&p).unwrap().len();
    poke(&p, len - 65536, &vec![0xffu8; 65536]);
    let out = diskit(d, &["convert", "-O", "raw", "cz.qcow2", "o.raw"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("cz.qcow2"));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn backing_loop() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "l2.qcow2", "-F", "qcow2", "l1.qcow2", "1M",
        ],
    ));
    ok(qemu_img(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-u", "-b", "l1.qcow2", "-F", "qcow2", "l2.qcow2", "1M",
        ],
    ));
    same_as_qemu(d, &["info", "--backing-chain", "l1.qcow2"]);
    let out = diskit(d, &["convert", "-O", "raw", "l1.qcow2", "o.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("infinite loop"), "{}", stderr(&out));
}

#[test]
fn unknown_incompatible_feature() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "inc.qcow2");
    poke(&p, 72, &(1u64 << 40).to_be_bytes());
    same_as_qemu(d, &["info", "inc.qcow2"]);
}

#[test]
fn not_an_image_with_format_qcow2() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("t.txt"), b"hello\n").unwrap();
    same_as_qemu(d, &["info", "-f", "qcow2", "t.txt"]);
    same_as_qemu(d, &["convert", "-f", "qcow2", "t.txt", "o.raw"]);
}

#[test]
fn encrypted_image_refused() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let p = good(d, "enc.qcow2");
    poke(&p, 32, &1u32.to_be_bytes());
    let out = diskit(d, &["convert", "-O", "raw", "enc.qcow2", "o.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("enc.qcow2"));
    assert!(!stderr(&out).contains("panicked"));
}
