//! Shared helpers for integration tests: temp dirs, the qemu-img oracle, running diskit.
#![allow(dead_code)]

pub mod chain;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Is qemu-img (and qemu-io) installed? Without it, interop tests skip with a loud message,
/// unless `DISKIT_REQUIRE_QEMU=1`, where they fail.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("DISKIT_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("qemu-img is required (DISKIT_REQUIRE_QEMU=1) but not installed");
        }
        eprintln!(
            "\n*** SKIPPING: qemu-img not found; install qemu-utils to run interop tests ***\n"
        );
    }
    ok
}

/// Skips the test (returns) when qemu-img is missing.
#[macro_export]
macro_rules! require_qemu {
    () => {
        if !common::have_qemu() {
            return;
        }
    };
}

/// A fresh temporary directory.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("diskit-test")
        .tempdir()
        .expect("tempdir")
}

/// Runs a program with arguments in `dir`; returns its output.
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"))
}

/// Path of the diskit binary under test.
pub fn diskit_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_diskit"))
}

/// Runs diskit in `dir`.
pub fn diskit(dir: &Path, args: &[&str]) -> Output {
    Command::new(diskit_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running diskit")
}

/// Runs qemu-img in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Output {
    run_in(dir, "qemu-img", args)
}

/// Runs qemu-io in `dir` with one or more `-c` commands on `image` (format `fmt`).
pub fn qemu_io(dir: &Path, fmt: &str, image: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    run_in(dir, "qemu-io", &args)
}

/// Panics with both streams unless the command succeeded.
pub fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "command failed ({:?})\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// stdout as a string.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as a string.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Guest content of an image as qemu-img sees it (converted to raw in `dir`).
pub fn qemu_raw(dir: &Path, image: &str, fmt: Option<&str>) -> Vec<u8> {
    let target = dir.join(format!("{}.qemu-raw", image.replace('/', "_")));
    let t = target.to_str().unwrap();
    let mut args = vec!["convert"];
    if let Some(f) = fmt {
        args.push("-f");
        args.push(f);
    }
    args.extend(["-O", "raw", image, t]);
    ok(qemu_img(dir, &args));
    let data = std::fs::read(&target).unwrap();
    std::fs::remove_file(&target).unwrap();
    data
}

/// Guest content of an image as the diskit library reads it.
pub fn diskit_raw(path: &Path) -> Vec<u8> {
    let img = diskit::open(path.to_str().unwrap(), &diskit::OpenOptions::read_only())
        .unwrap_or_else(|e| panic!("diskit open {}: {e}", path.display()));
    let size = img.virtual_size() as usize;
    let mut buf = vec![0u8; size];
    let chunk = 1 << 20;
    for (i, c) in buf.chunks_mut(chunk).enumerate() {
        img.read_at(c, (i * chunk) as u64).unwrap();
    }
    buf
}

/// Parses JSON output.
pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Deterministic pseudo-random bytes (xorshift), for test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Runs diskit under the name `qemu-img` (a symlink in `dir/.bin`), so that its messages can
/// be compared line for line with qemu-img's.
pub fn diskit_as_qemu(dir: &Path, args: &[&str]) -> Output {
    let bin = dir.join(".bin");
    let link = bin.join("qemu-img");
    if !link.exists() {
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(diskit_bin(), &link).unwrap();
    }
    Command::new(&link)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running diskit as qemu-img")
}

/// Runs the same command with qemu-img and with diskit (named qemu-img) and asserts equal
/// stdout, stderr and exit code. Returns diskit's output.
pub fn same_as_qemu(dir: &Path, args: &[&str]) -> Output {
    let q = qemu_img(dir, args);
    let d = diskit_as_qemu(dir, args);
    assert_eq!(
        stderr(&d),
        stderr(&q),
        "stderr differs for {args:?}\nqemu stdout: {}\ndiskit stdout: {}",
        stdout(&q),
        stdout(&d)
    );
    assert_eq!(stdout(&d), stdout(&q), "stdout differs for {args:?}");
    assert_eq!(
        d.status.code(),
        q.status.code(),
        "exit code differs for {args:?}"
    );
    d
}

/// Runs `args` with qemu-img on copies of `files` (from `base`) in `base/q`, and with diskit
/// (named qemu-img) on other copies in `base/d`; asserts equal output and exit code, and
/// that each file has the same guest content afterwards (compared by qemu-img as raw).
/// Returns (qemu dir, diskit dir).
pub fn same_effect_as_qemu(base: &Path, files: &[&str], args: &[&str]) -> (PathBuf, PathBuf) {
    let qd = base.join("q");
    let dd = base.join("d");
    for dir in [&qd, &dd] {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        for f in files {
            std::fs::copy(base.join(f), dir.join(f)).unwrap();
        }
    }
    let q = qemu_img(&qd, args);
    let d = diskit_as_qemu(&dd, args);
    assert_eq!(stderr(&d), stderr(&q), "stderr differs for {args:?}");
    assert_eq!(stdout(&d), stdout(&q), "stdout differs for {args:?}");
    assert_eq!(
        d.status.code(),
        q.status.code(),
        "exit code differs for {args:?}"
    );
    for f in files {
        let a = qemu_raw(&qd, f, None);
        let b = qemu_raw(&dd, f, None);
        assert!(a == b, "content of {f} differs after {args:?}");
    }
    (qd, dd)
}

/// A raw image of `size` bytes: 1 MiB of data at 0, 1 MiB of zeroes written as data at
/// 2 MiB, 1 MiB of data with an 8 KiB zero run inside at 5 MiB, holes elsewhere.
pub fn mixed_raw(dir: &Path, name: &str, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(dir.join(name)).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&pattern(1 << 20, 1), 0).unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 2 << 20).unwrap();
    let mut mixed = pattern(1 << 20, 2);
    mixed[8192..16384].fill(0);
    f.write_all_at(&mixed, 5 << 20).unwrap();
}

/// The lock bytes held on `path`, from /proc/locks (ranges expanded).
pub fn locks_on(path: &std::path::Path) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).unwrap().ino();
    let text = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    text.lines()
        .filter(|l| l.contains(&format!(":{ino} ")))
        .flat_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let a: u64 = f.get(6).and_then(|s| s.parse().ok()).unwrap_or(0);
            let b: u64 = f.get(7).and_then(|s| s.parse().ok()).unwrap_or(a);
            a..=b
        })
        .collect()
}

/// Starts qemu-io on `image` (read-write unless `ro`) and waits until it holds its locks (seen
/// in /proc/locks: probing with qemu-img would itself take a lock qemu-io could trip on).
pub fn hold(dir: &std::path::Path, fmt: &str, image: &str, ro: bool) -> std::process::Child {
    let mut args = vec!["-f", fmt];
    if ro {
        args.push("-r");
    }
    args.push(image);
    let mut child = std::process::Command::new("qemu-io")
        .args(&args)
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    for _ in 0..400 {
        if !locks_on(&dir.join(image)).is_empty() {
            return child;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("qemu-io did not lock {image}");
}

/// Where the snapshot table entries of a qcow2 image start (from its header).
pub fn snapshot_entries(path: &Path) -> Vec<u64> {
    let b = std::fs::read(path).unwrap();
    let nb = u32::from_be_bytes(b[60..64].try_into().unwrap());
    let mut off = u64::from_be_bytes(b[64..72].try_into().unwrap());
    let be16 = |o: u64| u16::from_be_bytes([b[o as usize], b[o as usize + 1]]) as u64;
    let be32 = |o: u64| u32::from_be_bytes(b[o as usize..o as usize + 4].try_into().unwrap());
    let mut v = Vec::new();
    for _ in 0..nb {
        v.push(off);
        let len = 40 + be32(off + 36) as u64 + be16(off + 12) + be16(off + 14);
        off += len.div_ceil(8) * 8;
    }
    v
}
