//! Shared helpers for integration tests: temp dirs, the qemu-img oracle, running diskit.
#![allow(dead_code)]

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
        eprintln!("\n*** SKIPPING: qemu-img not found; install qemu-utils to run interop tests ***\n");
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
