//! The resource bounds of `src/limits.rs`, each exercised: backing chain depth, compressed
//! clusters that inflate past one cluster, and metadata caches that stay bounded whatever
//! the number of tables (peak RSS of the diskit process, measured with wait4).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use diskit::{CreateOpts, Format};

/// Runs diskit in `dir` with stdout discarded; returns (exit code, stderr, peak RSS bytes).
/// The child is reaped with wait4 (for its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
fn diskit_rss(dir: &Path, args: &[&str]) -> (Option<i32>, String, u64) {
    let child = Command::new(diskit_bin())
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running diskit");
    let pid = child.id() as libc::pid_t;
    let mut stderr_pipe = child.stderr.expect("stderr pipe");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr_pipe, &mut s).ok();
        s
    });
    let mut status = 0;
    // SAFETY: plain FFI calls on a zeroed rusage of our own and the pid of our child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4 failed");
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    (code, reader.join().unwrap(), ru.ru_maxrss as u64 * 1024)
}

fn chain(d: &Path, n: usize) -> String {
    let mut prev: Option<String> = None;
    for i in 0..n {
        let name = format!("c{i}.qcow2");
        let mut o = String::from("size=1M,cluster_size=4k");
        if let Some(p) = &prev {
            o.push_str(&format!(",backing_file={p},backing_fmt=qcow2"));
        }
        let opts = CreateOpts::parse(&o).unwrap();
        diskit::create(d.join(&name).to_str().unwrap(), Format::Qcow2, &opts).unwrap();
        prev = Some(name);
    }
    prev.unwrap()
}

/// A chain of 1000 images (the limit, as QEMU's) opens and reads; one more is refused with
/// a clear error instead of exhausting the stack or file descriptors.
#[test]
fn backing_chain_depth_is_bounded() {
    let t = tmpdir();
    let d = t.path();
    let top = chain(d, 1001);
    let (code, err, _) = diskit_rss(d, &["convert", "-O", "raw", &top, "o.raw"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("deeper than 1000 images"), "{err}");
    let (code, err, _) = diskit_rss(d, &["convert", "-O", "raw", "c999.qcow2", "o.raw"]);
    assert_eq!(code, Some(0), "{err}");
    let out = std::fs::read(d.join("o.raw")).unwrap();
    assert_eq!(out.len(), 1 << 20);
    assert!(out.iter().all(|&b| b == 0));
}

/// A compressed cluster whose deflate stream would inflate to 1 MiB: diskit decodes at most
/// one cluster (64 KiB), with the same guest content as qemu-img, and no more memory.
#[test]
fn compressed_cluster_never_inflates_past_a_cluster() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    // one cluster, half random: its compressed form leaves room for the bomb
    let mut data = pattern(32 << 10, 7);
    data.resize(64 << 10, 0);
    std::fs::write(d.join("src.raw"), &data).unwrap();
    ok(qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "src.raw", "z.qcow2"],
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(d.join("z.qcow2"))
        .unwrap();
    let be64 = |off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };
    let l1 = be64(40);
    let l2 = be64(l1) & 0x00ff_ffff_ffff_fe00;
    let e = be64(l2);
    assert!(e & (1 << 62) != 0, "cluster 0 is not compressed: {e:#x}");
    // cluster_bits 16: offset in bits 0..54, additional sectors in bits 54..62
    let host = e & ((1 << 54) - 1);
    let room = (((e >> 54) & 0xff) + 1) * 512 - (host % 512);
    // raw deflate of 1 MiB of 0x5a: stored, fixed-Huffman run of length-258 matches
    let bomb = deflate_run(0x5a, 1 << 20);
    assert!((bomb.len() as u64) <= room, "{} > {room}", bomb.len());
    f.write_all_at(&bomb, host).unwrap();
    drop(f);
    let (code, err, rss) = diskit_rss(d, &["convert", "-O", "raw", "z.qcow2", "o.raw"]);
    let q = qemu_img(d, &["convert", "-O", "raw", "z.qcow2", "q.raw"]);
    assert_eq!(
        code,
        q.status.code(),
        "diskit: {err}\nqemu-img: {}",
        stderr(&q)
    );
    if code == Some(0) {
        let a = std::fs::read(d.join("o.raw")).unwrap();
        let b = std::fs::read(d.join("q.raw")).unwrap();
        assert!(a == b, "content differs from qemu-img's");
        assert!(
            a.iter().all(|&x| x == 0x5a),
            "not the first cluster of the stream"
        );
    }
    assert!(rss < 64 << 20, "peak RSS {rss}");
}

/// A raw deflate stream (fixed Huffman codes) producing `len` bytes of `byte`: one literal,
/// then matches of length 258 at distance 1, then end of block.
fn deflate_run(byte: u8, len: usize) -> Vec<u8> {
    let mut w = BitWriter::default();
    w.bits(1, 1); // BFINAL
    w.bits(1, 2); // BTYPE = fixed Huffman
                  // literal: codes 0..143 are 8 bits, 0x30 + value, written MSB first
    w.huff(0x30 + byte as u32, 8);
    let mut left = len - 1;
    while left >= 258 {
        // length 258: symbol 285 (codes 280..287 are 8 bits, 0xc0 + (sym - 280)), no extra
        w.huff(0xc0 + (285 - 280), 8);
        // distance 1: distance code 0, 5 bits, no extra
        w.huff(0, 5);
        left -= 258;
    }
    for _ in 0..left {
        w.huff(0x30 + byte as u32, 8);
    }
    w.huff(0, 7); // end of block: symbol 256, 7-bit code 0
    w.finish()
}

#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// `count` bits of `v`, least significant first (header fields, extra bits).
    fn bits(&mut self, v: u32, count: u32) {
        self.acc |= (v as u64) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }
    /// A Huffman code of `len` bits, most significant bit first.
    fn huff(&mut self, code: u32, len: u32) {
        let mut rev = 0;
        for i in 0..len {
            rev |= ((code >> i) & 1) << (len - 1 - i);
        }
        self.bits(rev, len);
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// 16384 L2 tables (64 MiB of them with 4 KiB clusters) against an 8 MiB L2 cache: map,
/// check and convert of the image stay far below the tables' total size in memory, and
/// give the same results as qemu-img.
#[test]
fn metadata_caches_stay_bounded() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "wide.qcow2",
            "32G",
        ],
    ));
    // one 4 KiB cluster in each 2 MiB region (the span of one L2 table): 16384 L2 tables
    let mut script = String::new();
    for i in 0..16384u64 {
        script.push_str(&format!("write -P {} {} 4k\n", i % 251 + 1, i << 21));
    }
    let mut child = Command::new("qemu-io")
        .args(["-f", "qcow2", "wide.qcow2"])
        .current_dir(d)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let l2_total = 16384u64 * 4096;
    for args in [
        &["map", "--output=json", "wide.qcow2"][..],
        &["check", "wide.qcow2"][..],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "wide.qcow2",
            "o.qcow2",
        ][..],
        &["compare", "wide.qcow2", "o.qcow2"][..],
    ] {
        let (code, err, rss) = diskit_rss(d, args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        // caches of 8 MiB of L2 and 4 MiB of refcount blocks per image, plus the engine's
        // buffers: well below the 64 MiB of tables
        eprintln!("{args:?}: peak RSS {} MiB", rss >> 20);
        assert!(
            rss < l2_total * 3 / 4,
            "{args:?}: peak RSS {} MiB",
            rss >> 20
        );
    }
    ok(qemu_img(d, &["compare", "wide.qcow2", "o.qcow2"]));
}
