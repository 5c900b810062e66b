//! `dd` against qemu-img.

mod common;
use common::*;

#[test]
fn dd_raw_matches_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("in.raw"), pattern((5 << 20) + 1000, 11)).unwrap();
    for args in [
        &["dd", "-f", "raw", "if=in.raw", "of=out.raw"][..],
        &[
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            "if=in.raw",
            "of=out.raw",
            "bs=1M",
        ],
        &["dd", "if=in.raw", "of=out.raw", "bs=1M", "count=2"],
        &["dd", "if=in.raw", "of=out.raw", "bs=1M", "skip=3"],
        &[
            "dd",
            "if=in.raw",
            "of=out.raw",
            "bs=1M",
            "count=2",
            "skip=1",
        ],
        &[
            "dd",
            "if=in.raw",
            "of=out.raw",
            "bs=64k",
            "count=3",
            "skip=1",
        ],
        &["dd", "if=in.raw", "of=out.raw", "bs=1M", "skip=9"],
        &["dd", "if=in.raw", "of=out.raw", "bs=0"],
        &["dd", "if=in.raw", "of=out.raw", "bs=x"],
        &["dd", "if=in.raw", "of=out.raw", "foo=1"],
        &["dd", "if=in.raw", "of=out.raw", "count"],
        &["dd", "if=in.raw"],
        &["dd", "-O", "nope", "if=in.raw", "of=out.raw"],
        &["dd", "if=missing.raw", "of=out.raw"],
    ] {
        let (q, k) = same_effect_as_qemu(d, &["in.raw"], args);
        let a = std::fs::read(q.join("out.raw")).ok();
        let b = std::fs::read(k.join("out.raw")).ok();
        assert!(a == b, "output differs for {args:?}");
    }
}
