//! `create` on the command line against qemu-img: same output, exit code and image options.

mod common;
use common::*;

#[test]
fn create_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"],
    ));
    let cases: &[&[&str]] = &[
        &["create", "-f", "qcow2", "a.qcow2", "1G"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k,lazy_refcounts=on",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,lazy_refcounts=on",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=3",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=1,cluster_size=512",
            "a.qcow2",
            "16M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
        ],
        &["create", "-f", "qcow2", "-b", "base.qcow2", "a.qcow2"],
        // a backing file that does not open: its error comes before the missing format
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nonexist.qcow2",
            "a.qcow2",
            "64M",
        ],
        &["create", "-f", "qcow2", "-b", "nonexist.qcow2", "a.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nonexist.qcow2",
            "a.qcow2",
            "64M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nothere.qcow2",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nothere.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "1G",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nothere.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nothere.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
            "1G",
        ],
        &["create", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "1G"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=d.raw,data_file_raw=on",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file_raw=on",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=falloc",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "preallocation=full",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd,compat=0.10",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4M",
            "a.qcow2",
            "1M",
        ],
        &["create", "-f", "qcow2", "-o", "size=5M", "a.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2",
            "a.qcow2",
            "10M",
        ],
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "raw",
            "a.qcow2",
        ],
        &["create", "-f", "qcow2", "a.qcow2", "1Q"],
        &["create", "-f", "qcow2", "-o", "help"],
        &["create", "-f", "qcow2", "-o", "help", "a.qcow2"],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "a.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "vmdk",
            "-o",
            "adapter_type=foo",
            "a.qcow2",
            "1M",
        ],
        &["create", "-f", "vdi", "-o", "static=on", "a.qcow2", "1M"],
    ];
    for args in cases {
        let (q, k) = same_effect_as_qemu(d, &["base.qcow2"], args);
        let info = |dir: &std::path::Path| {
            if dir.join("a.qcow2").exists() {
                let out = ok(qemu_img(dir, &["info", "-U", "--output=json", "a.qcow2"]));
                let mut v = json(&out);
                // allocation on the host may differ by a block
                v.as_object_mut().unwrap().remove("actual-size");
                v["children"] = serde_json::Value::Null;
                // random per image: vmdk content ids
                if let Some(d) = v.pointer_mut("/format-specific/data") {
                    if let Some(o) = d.as_object_mut() {
                        o.remove("cid");
                    }
                }
                Some(v)
            } else {
                None
            }
        };
        assert_eq!(info(&q), info(&k), "image differs after {args:?}");
        if k.join("a.qcow2").exists() {
            // the same verdict as on qemu-img's own image (0, or 1 where the backing is missing)
            let ck = qemu_img(&k, &["check", "a.qcow2"]);
            let cq = qemu_img(&q, &["check", "a.qcow2"]);
            assert_eq!(
                ck.status.code(),
                cq.status.code(),
                "check after {args:?}: {}",
                stdout(&ck)
            );
            assert_eq!(stdout(&ck), stdout(&cq), "check after {args:?}");
        }
    }
}

/// `-o` values are checked in order, as qemu parses them, before `-b`, the size argument and
/// the `Formatting` line: the same message, the same exit code, and no file made.
#[test]
fn create_checks_option_values_first_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    for (fmt, opts) in [
        ("qcow2", "cluster_size=abc"),
        ("qcow2", "cluster_size=0x10k"),
        ("qcow2", "lazy_refcounts=maybe"),
        ("qcow2", "refcount_bits=x"),
        ("qcow2", "size=0x10k"),
        ("qcow2", "size=-1k"),
        ("qcow2", "size=-5"),
        ("qcow2", "size=99999999999999999999"),
        ("qcow2", "cluster_size=20E"),
        ("qcow2", "size=bad,bogus=1"),
        ("qcow2", "bogus=1,size=bad"),
        ("raw", "backing_file=x"),
        ("raw", "size=bad,backing_file=x"),
        ("vdi", "static=maybe"),
        ("vmdk", "zeroed_grain=2"),
        ("vmdk", "hwversion=4,size=1.5.5"),
        // encryption needs a secret object, which neither tool is given here
        ("qcow2", "encrypt.format=luks"),
        ("qcow2", "encrypt.format=aes,encrypt.key-secret=sec0"),
        ("qcow2", "encryption=on"),
        ("qcow2", "encrypt.format=bogus"),
    ] {
        same_as_qemu(d, &["create", "-f", fmt, "-o", opts, "x.img", "1M"]);
        assert!(!d.join("x.img").exists(), "{fmt} {opts}: a file was made");
    }
    // -o size is checked even when a size argument overrides it; -b comes after -o
    same_as_qemu(
        d,
        &[
            "create", "-f", "raw", "-b", "x", "-F", "raw", "-o", "size=bad", "x.img", "1M",
        ],
    );
    // sizes written as qemu accepts them
    let out = same_as_qemu(d, &["create", "-f", "qcow2", "-o", "size=1.5k", "x.img"]);
    assert!(stdout(&out).contains("size=1536"));
}
