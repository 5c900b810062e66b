//! `convert` flags and their errors against qemu-img, on raw images.

mod common;
use common::*;

#[test]
fn convert_errors_match_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("src.raw"), pattern(2 << 20, 1)).unwrap();
    std::fs::write(d.join("small.raw"), pattern(4096, 2)).unwrap();
    let cases: &[&[&str]] = &[
        &["convert", "-O", "nope", "src.raw", "o.raw"],
        &["convert", "-c", "-O", "raw", "src.raw", "o.raw"],
        &["convert", "-n", "-O", "raw", "src.raw", "missing.raw"],
        &["convert", "-S", "foo", "src.raw", "o.raw"],
        &["convert", "-S", "100", "src.raw", "o.raw"],
        &["convert", "-m", "0", "src.raw", "o.raw"],
        &["convert", "-m", "17", "src.raw", "o.raw"],
        &["convert", "-B", "x.raw", "-O", "raw", "src.raw", "o.raw"],
        &["convert", "-F", "raw", "src.raw", "o.raw"],
        &["convert", "-O", "raw", "-o", "foo=1", "src.raw", "o.raw"],
        &["convert", "missing.raw", "o.raw"],
        &["convert", "-r", "foo", "src.raw", "o.raw"],
        &["convert", "-t", "foo", "src.raw", "o.raw"],
        &["convert", "-T", "foo", "src.raw", "o.raw"],
        &[
            "convert",
            "--target-is-zero",
            "-O",
            "raw",
            "src.raw",
            "o.raw",
        ],
        &["convert", "-o", "help", "src.raw", "o.raw"],
        &["convert", "-n", "-o", "size=1", "src.raw", "small.raw"],
        &["convert", "-c", "-C", "src.raw", "o.raw"],
        &["convert", "--skip-broken-bitmaps", "src.raw", "o.raw"],
        &["convert", "-n", "src.raw", "small.raw"],
        &["convert", "src.raw"],
        &["create", "-f", "raw", "-o", "help", "x.raw"],
        &["create", "-o", "?"],
    ];
    for args in cases {
        same_as_qemu(d, args);
        let _ = std::fs::remove_file(d.join("o.raw"));
    }
}

#[test]
fn convert_flags_give_qemu_img_content_and_allocation() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    mixed_raw(d, "src.raw", 16 << 20);
    let map = |dir: &std::path::Path| {
        stdout(&ok(qemu_img(
            dir,
            &["map", "--output=json", "-f", "raw", "o.raw"],
        )))
    };
    for flags in [
        &[][..],
        &["-S", "0"],
        &["-S", "64k"],
        &["-m", "1"],
        &["-m", "16", "-W"],
        &["-W"],
        &["-C"],
        &["--salvage"],
        &["-t", "none", "-T", "none"],
        &["-r", "1G"],
        &["-q"],
    ] {
        let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
        args.extend_from_slice(flags);
        args.extend(["src.raw", "o.raw"]);
        let (q, k) = same_effect_as_qemu(d, &["src.raw"], &args);
        assert_eq!(
            std::fs::read(q.join("o.raw")).unwrap(),
            std::fs::read(k.join("o.raw")).unwrap(),
            "{flags:?}"
        );
        assert_eq!(map(&q), map(&k), "allocation differs with {flags:?}");
    }
    // -p: qemu-img's progress lines (how many depends on timing; the first and last do not)
    let out = ok(diskit(
        d,
        &[
            "convert", "-p", "-f", "raw", "-O", "raw", "src.raw", "p.raw",
        ],
    ));
    let text = stdout(&out);
    assert!(text.starts_with("    (0.00/100%)\r"), "{text:?}");
    assert!(text.ends_with("    (100.00/100%)\r\n"), "{text:?}");
    // -n onto an existing, larger target: content copied, tail kept
    std::fs::write(d.join("big.raw"), pattern(20 << 20, 9)).unwrap();
    let (q, k) = same_effect_as_qemu(
        d,
        &["src.raw", "big.raw"],
        &[
            "convert", "-n", "-f", "raw", "-O", "raw", "src.raw", "big.raw",
        ],
    );
    assert_eq!(
        std::fs::read(q.join("big.raw")).unwrap(),
        std::fs::read(k.join("big.raw")).unwrap()
    );
}
