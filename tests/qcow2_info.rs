//! `info` of qcow2 images equals `qemu-img info --output=json` text.

mod common;

use common::*;
use diskit::OpenOptions;
use std::path::Path;

fn diskit_info(dir: &Path, name: &str) -> String {
    // qemu-img info names files as given; open with the same relative name
    let cwd = std::env::current_dir().unwrap();
    std::env::set_current_dir(dir).unwrap();
    let opts = OpenOptions {
        no_backing: true,
        ..OpenOptions::default()
    };
    let r = diskit::open(name, &opts)
        .map(|img| diskit::qjson::to_pretty(&img.info().unwrap().to_json()));
    std::env::set_current_dir(cwd).unwrap();
    r.unwrap()
}

fn check(dir: &Path, name: &str) {
    let want = stdout(&ok(qemu_img(dir, &["info", "--output=json", name])));
    let got = diskit_info(dir, name);
    assert_eq!(got.trim_end(), want.trim_end(), "{name}");
}

#[test]
fn info_matches_qemu_img() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    let q = |args: &[&str]| {
        ok(qemu_img(dir, args));
    };
    q(&["create", "-q", "-f", "qcow2", "v3.qcow2", "1G"]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "10M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on,refcount_bits=8,cluster_size=4k",
        "lazy.qcow2",
        "3M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,compression_type=zstd",
        "ext.qcow2",
        "5M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.raw",
        "df.qcow2",
        "1M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=dfr.raw,data_file_raw=on",
        "dfr.qcow2",
        "1M",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "v3.qcow2",
        "-F",
        "qcow2",
        "over.qcow2",
    ]);
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "v2.qcow2",
        "-F",
        "qcow2",
        "over2.qcow2",
    ]);
    q(&["create", "-q", "-f", "qcow2", "bm.qcow2", "4M"]);
    q(&["bitmap", "--add", "bm.qcow2", "bm1"]);
    q(&["bitmap", "--add", "-g", "128k", "bm.qcow2", "second"]);
    q(&["bitmap", "--disable", "bm.qcow2", "second"]);
    q(&["create", "-q", "-f", "qcow2", "snap.qcow2", "4M"]);
    ok(qemu_io(dir, "qcow2", "snap.qcow2", &["write 0 100k"]));
    q(&["snapshot", "-c", "s1", "snap.qcow2"]);
    for n in [
        "v3.qcow2",
        "v2.qcow2",
        "lazy.qcow2",
        "ext.qcow2",
        "df.qcow2",
        "dfr.qcow2",
        "over.qcow2",
        "over2.qcow2",
        "bm.qcow2",
    ] {
        check(dir, n);
    }
    // snapshots: compare everything but the dates, which qemu prints too
    let want = stdout(&ok(qemu_img(dir, &["info", "--output=json", "snap.qcow2"])));
    let got = diskit_info(dir, "snap.qcow2");
    assert_eq!(got.trim_end(), want.trim_end());
}

/// Encrypted images (LUKS with several cipher settings, legacy AES, an encrypted overlay):
/// `info` shows the encryption as qemu-img does without the key; everything that reads data
/// fails with qemu-img's message for a missing key.
#[test]
fn encrypted_images_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let secret = "secret,id=sec0,data=abc";
    for (name, opts, backing) in [
        (
            "luks.qcow2",
            "encrypt.format=luks,encrypt.iter-time=10",
            None,
        ),
        (
            "twofish.qcow2",
            "encrypt.format=luks,encrypt.cipher-alg=twofish-128,encrypt.cipher-mode=cbc,\
             encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.iter-time=10",
            None,
        ),
        ("aes.qcow2", "encrypt.format=aes", None),
        ("aes-v2.qcow2", "compat=0.10,encrypt.format=aes", None),
        (
            "overlay.qcow2",
            "encrypt.format=luks,encrypt.iter-time=10",
            Some("luks.qcow2"),
        ),
    ] {
        let o = format!("{opts},encrypt.key-secret=sec0");
        let mut args = vec!["create", "-q", "--object", secret, "-f", "qcow2", "-o", &o];
        if let Some(b) = backing {
            args.extend(["-b", b, "-F", "qcow2", name]);
        } else {
            args.extend([name, "16M"]);
        }
        ok(qemu_img(d, &args));
        same_as_qemu(d, &["info", name]);
        same_as_qemu(d, &["info", "--output=json", "--backing-chain", name]);
        same_as_qemu(d, &["check", name]);
        same_as_qemu(d, &["map", name]);
        same_as_qemu(d, &["convert", "-O", "raw", name, "out.raw"]);
        assert!(!d.join("out.raw").exists(), "{name}: a target was made");
    }
}
