//! `rebase` against qemu-img: the same command on copies of the same chains must print the
//! same, exit the same, leave every image with the same content, allocation and backing
//! file reference, and leave images that `qemu-img check` finds clean.

mod common;

use std::path::Path;

use common::*;

use common::chain::*;

/// The classic chain and an unrelated image to rebase onto.
const WITH_OTHER: &[Layer] = &[
    CHAIN[0],
    CHAIN[1],
    CHAIN[2],
    (
        "other.qcow2",
        &["-f", "qcow2", "other.qcow2", "4M"],
        &["write -P 1 0 512k", "write -P 9 3M 1M", "write -P 2 2M 64k"],
    ),
];

#[test]
fn rebase_onto_an_image_in_the_chain() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["rebase", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2"],
        &[
            "rebase",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &[
            "rebase",
            "--backing=base.qcow2",
            "--backing-format=qcow2",
            "top.qcow2",
        ],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn rebase_flatten() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "", "top.qcow2"][..],
        &["rebase", "-b", "", "mid.qcow2"],
        &["rebase", "-b", "", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-q", "-p", "-b", "", "top.qcow2"],
    ] {
        compare(CHAIN, args);
    }
}

#[test]
fn rebase_onto_another_image() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "other.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &[
            "rebase",
            "-U",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
        &[
            "rebase",
            "-t",
            "none",
            "-T",
            "none",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        compare(WITH_OTHER, args);
    }
}

#[test]
fn rebase_compressed() {
    require_qemu!();
    for args in [
        &["rebase", "-c", "-b", "", "top.qcow2"][..],
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "--compress",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        compare(WITH_OTHER, args);
    }
    compare(MIXED, &["rebase", "-c", "-b", "", "top.qcow2"]);
}

#[test]
fn rebase_unsafe_only_rewrites_the_header() {
    require_qemu!();
    for args in [
        &[
            "rebase",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ][..],
        &["rebase", "-u", "-b", "", "top.qcow2"],
        &["rebase", "-u", "top.qcow2"],
        &[
            "rebase",
            "--backing-unsafe",
            "-b",
            "other.qcow2",
            "-F",
            "raw",
            "mid.qcow2",
        ],
    ] {
        compare(WITH_OTHER, args);
    }
}

#[test]
fn rebase_unsafe_onto_a_missing_file() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), CHAIN);
    let args = [
        "rebase",
        "-u",
        "-b",
        "renamed/elsewhere.qcow2",
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    let mut outs = Vec::new();
    for (sub, qemu) in [("q", true), ("d", false)] {
        let dir = t.path().join(sub);
        std::fs::create_dir_all(&dir).unwrap();
        for f in files(CHAIN) {
            std::fs::copy(t.path().join(f), dir.join(f)).unwrap();
        }
        let out = if qemu {
            qemu_img(&dir, &args)
        } else {
            diskit_as_qemu(&dir, &args)
        };
        outs.push((
            stdout(&out),
            stderr(&out),
            out.status.code(),
            backing_of(&dir, "top.qcow2"),
        ));
        // once the file is there, the image opens and is clean
        std::fs::create_dir_all(dir.join("renamed")).unwrap();
        std::fs::copy(dir.join("mid.qcow2"), dir.join("renamed/elsewhere.qcow2")).unwrap();
        std::fs::copy(dir.join("base.qcow2"), dir.join("renamed/base.qcow2")).unwrap();
        check_clean(&dir, "top.qcow2");
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(
        outs[1].3,
        (
            Some("renamed/elsewhere.qcow2".to_string()),
            Some("qcow2".to_string())
        )
    );
}

#[test]
fn rebase_with_smaller_backing_files() {
    require_qemu!();
    for args in [
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"][..],
        &["rebase", "-b", "", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "mid.qcow2"],
        &[
            "rebase",
            "-c",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    ] {
        compare(GROWING, args);
    }
}

#[test]
fn rebase_mixed_cluster_sizes_subclusters_raw() {
    require_qemu!();
    compare(
        MIXED,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    compare(MIXED, &["rebase", "-b", "", "mid.qcow2"]);
    compare(
        SUBCLUSTERS,
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "top.qcow2"],
    );
    compare(SUBCLUSTERS, &["rebase", "-b", "", "top.qcow2"]);
    compare(SUBCLUSTERS, &["rebase", "-b", "", "mid.qcow2"]);
    compare(
        RAW_BASE,
        &["rebase", "-b", "base.raw", "-F", "raw", "top.qcow2"],
    );
    compare(RAW_BASE, &["rebase", "-b", "", "top.qcow2"]);
}

#[test]
fn rebase_errors_like_qemu() {
    require_qemu!();
    for args in [
        &["rebase", "top.qcow2"][..],
        &["rebase"],
        &["rebase", "-b", "base.qcow2", "-F", "qcow2"],
        &[
            "rebase",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "mid.qcow2",
        ],
        &["rebase", "-b", "nothere.qcow2", "-F", "qcow2", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "bogus", "top.qcow2"],
        &["rebase", "-b", "base.qcow2", "-F", "qcow2", "nothere.qcow2"],
        &[
            "rebase",
            "-t",
            "bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &[
            "rebase",
            "-T",
            "bogus",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        &["rebase", "-r", "top.qcow2"],
        &["rebase", "--bogus", "top.qcow2"],
        &["rebase", "-b"],
        &["rebase", "-u", "-b", "x", "-F", "qcow2", "nothere.qcow2"],
        &["rebase", "-f", "vdi", "-b", "", "top.qcow2"],
    ] {
        compare(CHAIN, args);
    }
    // on a raw image: copied, then the header cannot name a backing file
    for args in [
        &[
            "rebase", "-f", "raw", "-b", "base.raw", "-F", "raw", "base.raw",
        ][..],
        &["rebase", "-c", "-f", "raw", "-b", "", "base.raw"],
    ] {
        compare(RAW_BASE, args);
    }
}

#[test]
fn rebase_without_backing_format() {
    require_qemu!();
    // qemu-img refuses to write a backing file name without its format; it copies first
    // (diskit refuses before copying), so only output, exit code and content compare.
    for args in [
        &["rebase", "-b", "base.qcow2", "top.qcow2"][..],
        &["rebase", "-u", "-b", "base.qcow2", "top.qcow2"],
    ] {
        let t = tmpdir();
        build(t.path(), CHAIN);
        let fs = files(CHAIN);
        let (qd, dd) = same_effect_as_qemu(t.path(), &fs, args);
        for f in &fs {
            assert_eq!(backing_of(&dd, f), backing_of(&qd, f), "{f}");
            check_clean(&dd, f);
        }
    }
}

#[test]
fn rebase_header_keeps_extensions() {
    require_qemu!();
    // a persistent bitmap and a long backing name survive the header rewrite
    let t = tmpdir();
    build(t.path(), CHAIN);
    ok(qemu_img(t.path(), &["bitmap", "--add", "top.qcow2", "bm0"]));
    let long = format!("{}/../{}/base.qcow2", ".", "x".repeat(200));
    std::fs::create_dir_all(t.path().join("x".repeat(200))).unwrap();
    std::fs::copy(
        t.path().join("base.qcow2"),
        t.path().join("x".repeat(200)).join("base.qcow2"),
    )
    .unwrap();
    let fs = files(CHAIN);
    let args = [
        "rebase",
        "-u",
        "-b",
        long.as_str(),
        "-F",
        "qcow2",
        "top.qcow2",
    ];
    let (qd, dd) = same_effect_as_qemu(t.path(), &fs, &args);
    let info = |dir: &Path| {
        let mut v = json(&ok(qemu_img(
            dir,
            &["info", "-U", "--output=json", "top.qcow2"],
        )));
        let o = v.as_object_mut().unwrap();
        o.remove("actual-size");
        o.remove("filename");
        o.remove("children");
        v
    };
    assert_eq!(info(&dd), info(&qd));
    check_clean(&dd, "top.qcow2");
    let args = ["rebase", "-u", "-b", "", "top.qcow2"];
    let (qd, dd) = same_effect_as_qemu(t.path(), &fs, &args);
    assert_eq!(info(&dd), info(&qd));
}

#[test]
fn rebase_progress_and_library_call() {
    require_qemu!();
    let t = tmpdir();
    build(t.path(), WITH_OTHER);
    let out = ok(diskit(
        t.path(),
        &[
            "rebase",
            "-p",
            "-b",
            "other.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    ));
    assert!(stdout(&out).contains("(100.00/100%)"), "{}", stdout(&out));
    let want = qemu_raw(t.path(), "top.qcow2", None);
    let top = t.path().join("top.qcow2");
    let o = diskit::ops::rebase::RebaseOptions {
        backing: Some(String::new()),
        workers: 3,
        ..Default::default()
    };
    diskit::ops::rebase::rebase(top.to_str().unwrap(), &o, None).unwrap();
    assert_eq!(qemu_raw(t.path(), "top.qcow2", None), want);
    assert_eq!(backing_of(t.path(), "top.qcow2"), (None, None));
    check_clean(t.path(), "top.qcow2");
}

/// `rebase -u -F` records any driver name qemu knows (iotest 031 records `host_device`);
/// a name qemu does not know is refused as qemu-img refuses it.
#[test]
fn rebase_unsafe_records_any_qemu_driver_name() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "h.qcow2", "1M"],
    ));
    for fmt in ["host_device", "nbd", "nonesuch"] {
        let (qd, dd) = (d.join("q"), d.join("d"));
        for dir in [&qd, &dd] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::copy(d.join("h.qcow2"), dir.join("h.qcow2")).unwrap();
        }
        let args = [
            "rebase",
            "-u",
            "-b",
            "/some/backing/file/path",
            "-F",
            fmt,
            "h.qcow2",
        ];
        let (q, k) = (qemu_img(&qd, &args), diskit_as_qemu(&dd, &args));
        assert_eq!(stderr(&k), stderr(&q), "{fmt}");
        assert_eq!(k.status.code(), q.status.code(), "{fmt}");
        assert!(
            std::fs::read(qd.join("h.qcow2")).unwrap()
                == std::fs::read(dd.join("h.qcow2")).unwrap(),
            "{fmt}"
        );
        same_as_qemu(&dd, &["info", "-U", "h.qcow2"]);
    }
}

/// Rewriting the header keeps an extension qemu does not know, after the ones it writes
/// (feature table included), as qemu does: the header cluster is qemu-img's byte for byte
/// (iotest 031).
#[test]
fn rebase_unsafe_keeps_unknown_extensions_in_qemu_order() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    for compat in ["0.10", "1.1"] {
        let opt = format!("compat={compat}");
        let _ = std::fs::remove_file(d.join("u.qcow2"));
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", &opt, "u.qcow2", "64M"],
        ));
        // append an unknown extension where the extensions end
        let p = d.join("u.qcow2");
        let mut b = std::fs::read(&p).unwrap();
        let mut off = if compat == "0.10" {
            72
        } else {
            u32::from_be_bytes(b[100..104].try_into().unwrap()) as usize
        };
        while u32::from_be_bytes(b[off..off + 4].try_into().unwrap()) != 0 {
            let len = u32::from_be_bytes(b[off + 4..off + 8].try_into().unwrap()) as usize;
            off += 8 + len.div_ceil(8) * 8;
        }
        let data = b"This is a test header extension";
        b[off..off + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        b[off + 4..off + 8].copy_from_slice(&(data.len() as u32).to_be_bytes());
        b[off + 8..off + 8 + data.len()].copy_from_slice(data);
        b[off + 40..off + 48].fill(0);
        std::fs::write(&p, &b).unwrap();
        for args in [
            &["rebase", "-u", "-b", "", "u.qcow2"][..],
            &[
                "rebase",
                "-u",
                "-b",
                "/some/backing/file/path",
                "-F",
                "qcow2",
                "u.qcow2",
            ],
        ] {
            let (qd, dd) = (d.join("q"), d.join("d"));
            for dir in [&qd, &dd] {
                std::fs::create_dir_all(dir).unwrap();
                std::fs::copy(&p, dir.join("u.qcow2")).unwrap();
            }
            ok(qemu_img(&qd, args));
            ok(diskit(&dd, args));
            let head = |dir: &Path| std::fs::read(dir.join("u.qcow2")).unwrap()[..65536].to_vec();
            assert!(head(&qd) == head(&dd), "compat={compat} {args:?}");
        }
    }
}
