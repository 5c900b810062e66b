//! `bench`: argument checks, header lines and written data, compared with qemu-img.

mod common;

use std::path::Path;

use common::*;

/// stdout without the timing line.
fn header_lines(s: &str) -> String {
    s.lines()
        .filter(|l| !l.starts_with("Run completed in "))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Runs bench with qemu-img and diskit on copies of `img`; equal header, stderr, exit code.
fn same_bench(d: &Path, img: &str, args: &[&str]) {
    let qd = d.join("q");
    let dd = d.join("d");
    for dir in [&qd, &dd] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(d.join(img), dir.join(img)).unwrap();
    }
    let mut v = vec!["bench"];
    v.extend(args);
    v.push(img);
    let q = qemu_img(&qd, &v);
    let k = diskit_as_qemu(&dd, &v);
    assert_eq!(stderr(&k), stderr(&q), "stderr differs for {v:?}");
    assert_eq!(
        header_lines(&stdout(&k)),
        header_lines(&stdout(&q)),
        "stdout differs for {v:?}"
    );
    assert_eq!(k.status.code(), q.status.code(), "exit code for {v:?}");
    if q.status.success() {
        assert!(stdout(&k).contains("Run completed in "));
    }
}

#[test]
fn argument_errors_match_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
    ));
    let cases: &[&[&str]] = &[
        &["-c", "10", "--flush-interval", "4"],
        &["-c", "10", "-w", "--flush-interval", "4"],
        &["-c", "abc"],
        &["-c", "-1"],
        &["-c", "3000000000"],
        &["-c", "0"],
        &["-c", "1k"],
        &["-c", "08"],
        &["-d", "x"],
        &["-d", "0"],
        &["-i", "foo"],
        &["-n", "-c", "2"],
        &["-i", "native", "-c", "2"],
        &["-t", "bad"],
        &["-o", "abc"],
        &["-o", "-5"],
        &["-s", "3G"],
        &["-s", "abc"],
        &["-s", "0"],
        &["-S", "3G"],
        &["--pattern", "256"],
        &["--pattern", "x"],
        &["--pattern", "-1"],
        &["--flush-interval", "x"],
        &["-w", "--flush-interval", "3000000000"],
        &["--foo"],
        &["-z"],
        &["-f", "foo"],
        &["-f", "vmdk", "-c", "2"],
        &["b.qcow2"],
    ];
    for c in cases {
        same_bench(d, "b.qcow2", c);
    }
    for args in [
        vec!["bench"],
        vec!["bench", "-c"],
        vec!["bench", "-c", "2", "nope.qcow2"],
    ] {
        same_as_qemu(d, &args);
    }
}

#[test]
fn header_lines_match_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
    ));
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "r.raw", "1M"]));
    let cases: &[&[&str]] = &[
        &["-c", "10", "-d", "2"],
        &["-q", "-c", "10", "-d", "2"],
        &["-c", "0x10", "-d", "010", "-s", "0x200"],
        &["-c", "+3", "-s", "1.5k", "-S", "1k", "-o", "1k"],
        &[
            "-c",
            "20",
            "-d",
            "4",
            "-w",
            "--flush-interval",
            "4",
            "-S",
            "8192",
            "-s",
            "1k",
        ],
        &[
            "-c",
            "9",
            "-d",
            "2",
            "-w",
            "--flush-interval",
            "3",
            "--no-drain",
        ],
        &["-c", "4", "-t", "none", "-n"],
        &["-c", "4", "-t", "writethrough", "-w", "-U", "-i", "threads"],
        // requests past the end fail like qemu's
        &["-c", "1", "-s", "2M"],
        &["-c", "2", "-o", "2M"],
        &["-c", "2", "-w", "-o", "1020k", "-s", "8k"],
        // offsets wrap at the end of the image
        &["-c", "600", "-d", "8", "-s", "4k", "-S", "12k"],
    ];
    for c in cases {
        same_bench(d, "b.qcow2", c);
    }
    same_bench(d, "r.raw", &["-f", "raw", "-c", "50", "-w", "-s", "64k"]);
}

#[test]
fn write_bench_writes_the_pattern() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
    ));
    let out = ok(diskit_as_qemu(
        d,
        &[
            "bench",
            "-w",
            "-c",
            "8",
            "-d",
            "4",
            "-o",
            "64k",
            "-s",
            "4k",
            "-S",
            "16k",
            "--pattern",
            "0xab",
            "b.qcow2",
        ],
    ));
    assert!(stdout(&out).starts_with(
        "Sending 8 write requests, 4096 bytes each, 4 in parallel (starting at offset 65536, step size 16384)\n"
    ));
    ok(qemu_img(d, &["check", "b.qcow2"]));
    for i in 0..8u64 {
        let off = 65536 + i * 16384;
        let r = ok(qemu_io(
            d,
            "qcow2",
            "b.qcow2",
            &[&format!("read -P 0xab {off} 4k")],
        ));
        assert!(!stdout(&r).contains("Pattern verification failed"));
        let gap = off + 4096;
        let r = ok(qemu_io(
            d,
            "qcow2",
            "b.qcow2",
            &[&format!("read -P 0 {gap} 12k")],
        ));
        assert!(!stdout(&r).contains("Pattern verification failed"));
    }
    // the default pattern is zero, and a read benchmark changes nothing
    let before = qemu_raw(d, "b.qcow2", None);
    ok(diskit_as_qemu(d, &["bench", "-c", "100", "b.qcow2"]));
    assert_eq!(qemu_raw(d, "b.qcow2", None), before);
    assert!(before[65536..65536 + 4096].iter().all(|&b| b == 0xab));
}
