//! `resize` against qemu-img.

mod common;
use common::*;

#[test]
fn resize_raw_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("r.raw"), pattern(3 << 20, 5)).unwrap();
    for args in [
        &["resize", "-f", "raw", "r.raw", "+1M"][..],
        &["resize", "-f", "raw", "r.raw", "1M"],
        &["resize", "--shrink", "-f", "raw", "r.raw", "1M"],
        &["resize", "-f", "raw", "r.raw", "--", "-512"],
        &["resize", "-f", "raw", "r.raw", "-512"],
        &["resize", "--shrink", "-f", "raw", "r.raw", "-512"],
        &["resize", "--preallocation=full", "-f", "raw", "r.raw", "5M"],
        &[
            "resize",
            "--preallocation=falloc",
            "-f",
            "raw",
            "r.raw",
            "1M",
        ],
        &["resize", "--preallocation=foo", "-f", "raw", "r.raw", "5M"],
        &["resize", "-f", "raw", "r.raw", "1Q"],
        &["resize", "-f", "raw", "r.raw", "--", "-9G"],
        &["resize", "-q", "-f", "raw", "r.raw", "7M"],
        &["resize", "r.raw"],
        &["resize"],
    ] {
        let (q, dk) = same_effect_as_qemu(d, &["r.raw"], args);
        let len = |p: &std::path::Path| std::fs::metadata(p.join("r.raw")).unwrap().len();
        assert_eq!(len(&q), len(&dk), "size after {args:?}");
    }
}
