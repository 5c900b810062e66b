//! `convert -O vmdk -o subformat=streamOptimized SRC -`: the stream goes to standard output,
//! byte for byte what the same conversion writes into a file named `disk.vmdk` (the name
//! the descriptor of a stdout stream gives its extent), except the random CID: the test
//! compares the descriptor text without its `CID=` line, and every other byte exactly.
//! qemu-img reads the stream back with the source's content and `qemu-img check` passes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use diskit::io::SeqFile;

const SECTOR: usize = 512;

fn stream_args<'a>(src: &'a str, target: &'a str) -> Vec<&'a str> {
    vec![
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        src,
        target,
    ]
}

/// The descriptor text (up to its first NUL) without the CID line, and the CID.
fn descriptor_without_cid(img: &[u8]) -> (String, String) {
    let area = &img[SECTOR..21 * SECTOR];
    let end = area.iter().position(|&b| b == 0).unwrap_or(area.len());
    let text = String::from_utf8(area[..end].to_vec()).unwrap();
    let cid = text
        .lines()
        .find(|l| l.starts_with("CID="))
        .expect("a CID line")
        .to_string();
    let rest = text
        .lines()
        .filter(|l| !l.starts_with("CID="))
        .collect::<Vec<_>>()
        .join("\n");
    (rest, cid)
}

/// Asserts that two streams are equal except for the CID, byte for byte elsewhere.
fn assert_same_stream(a: &[u8], b: &[u8]) {
    assert_eq!(a.len(), b.len(), "stream lengths differ");
    assert!(a.len() > 64 * 1024);
    assert_eq!(a[..SECTOR], b[..SECTOR], "header differs");
    let (da, ca) = descriptor_without_cid(a);
    let (db, cb) = descriptor_without_cid(b);
    assert_eq!(da, db, "descriptor differs");
    assert!(da.contains("RW ") && da.contains("SPARSE \"disk.vmdk\""));
    assert!(ca.len() > 4 && cb.len() > 4);
    if let Some(i) = a[21 * SECTOR..]
        .iter()
        .zip(&b[21 * SECTOR..])
        .position(|(x, y)| x != y)
    {
        panic!("streams differ at byte {:#x}", 21 * SECTOR + i);
    }
}

/// A source of `len` bytes: text-like runs, random data, zero runs, a partial last grain.
fn write_source(dir: &Path, name: &str, len: usize) {
    let mut d = vec![0u8; len];
    let words = [
        "block ", "grain ", "stream ", "sector ", "zlib ", "marker ", "footer ",
    ];
    let mut i = 0;
    let mut w = 0usize;
    while i < len.min(400_000) {
        let s = words[(w * 7 + w / 3) % words.len()].as_bytes();
        let n = s.len().min(len - i);
        d[i..i + n].copy_from_slice(&s[..n]);
        i += n;
        w += 1;
    }
    if len > 1_500_000 {
        d[1 << 20..(1 << 20) + 300_000].copy_from_slice(&pattern(300_000, 3));
    }
    let tail = len - 1000;
    d[tail..].fill(0x77);
    std::fs::write(dir.join(name), d).unwrap();
}

fn diskit_stdout(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(diskit_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn stdout_stream_is_the_file_stream_and_reads_back_in_qemu() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    // 3 MiB + 3 sectors: the last grain is partial
    write_source(dir, "src.raw", (3 << 20) + 1536);
    let out = diskit_stdout(dir, &stream_args("src.raw", "-"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
    let piped = out.stdout;
    ok(diskit(dir, &stream_args("src.raw", "disk.vmdk")));
    let file = std::fs::read(dir.join("disk.vmdk")).unwrap();
    assert_same_stream(&piped, &file);
    // the two CIDs are random, so the streams are not simply equal
    std::fs::write(dir.join("piped.vmdk"), &piped).unwrap();
    let check = ok(qemu_img(dir, &["check", "piped.vmdk"]));
    assert_eq!(stdout(&check), "No errors were found on the image.\n");
    let back = qemu_raw(dir, "piped.vmdk", Some("vmdk"));
    assert!(back == std::fs::read(dir.join("src.raw")).unwrap());
    // and diskit reads it too
    assert!(diskit_raw(&dir.join("piped.vmdk")) == back);
    // stdout redirected to a regular file (not a pipe) gives the same stream
    let f = std::fs::File::create(dir.join("redirected.vmdk")).unwrap();
    let st = Command::new(diskit_bin())
        .args(stream_args("src.raw", "-"))
        .current_dir(dir)
        .stdout(Stdio::from(f))
        .status()
        .unwrap();
    assert!(st.success());
    assert_same_stream(&std::fs::read(dir.join("redirected.vmdk")).unwrap(), &file);
    // no file named '-' appeared
    assert!(!dir.join("-").exists());
}

#[test]
fn empty_and_tiny_sources_stream_to_stdout() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    for (name, len, data) in [
        ("zero.raw", 2usize << 20, false),
        ("tiny.raw", 1536, true),
        ("big-grains.raw", 70 << 20, true),
    ] {
        let mut d = vec![0u8; len];
        if data {
            d[..1000].fill(b'x');
            d[len - 500..].copy_from_slice(&pattern(500, 9));
        }
        std::fs::write(dir.join(name), &d).unwrap();
        let out = diskit_stdout(dir, &stream_args(name, "-"));
        assert!(out.status.success(), "{}", stderr(&out));
        ok(diskit(dir, &stream_args(name, "disk.vmdk")));
        assert_same_stream(&out.stdout, &std::fs::read(dir.join("disk.vmdk")).unwrap());
        std::fs::write(dir.join("s.vmdk"), &out.stdout).unwrap();
        ok(qemu_img(dir, &["check", "s.vmdk"]));
        assert!(qemu_raw(dir, "s.vmdk", Some("vmdk")) == d, "{name}");
    }
}

#[test]
fn other_targets_on_stdout_are_refused_clearly() {
    let t = tmpdir();
    let dir = t.path();
    std::fs::write(dir.join("src.raw"), vec![1u8; 65536]).unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["convert", "-O", "qcow2", "src.raw", "-"],
        vec!["convert", "src.raw", "-"],
        vec!["convert", "-O", "vmdk", "src.raw", "-"],
        vec![
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            "src.raw",
            "-",
        ],
        vec![
            "convert",
            "-W",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "src.raw",
            "-",
        ],
        vec![
            "convert",
            "-p",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "src.raw",
            "-",
        ],
    ];
    for args in cases {
        let out = diskit_stdout(dir, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?} wrote to stdout");
        let e = stderr(&out);
        assert!(
            e.contains("standard output") && e.lines().count() == 1,
            "{args:?}: {e}"
        );
        assert!(!dir.join("-").exists(), "{args:?} created a file named '-'");
    }
}

#[test]
fn sequential_sink_only_appends() {
    let t = tmpdir();
    let path = t.path().join("seq.bin");
    let s = SeqFile::new(std::fs::File::create(&path).unwrap(), "seq.bin");
    s.write_at(b"abc", 0).unwrap();
    let e = s.write_at(b"x", 0).unwrap_err();
    assert!(e.message().contains("sequential"), "{}", e.message());
    assert!(s.write_at(b"x", 10).is_err());
    s.set_len(8).unwrap();
    assert_eq!(s.len(), 8);
    assert!(s.set_len(4).is_err());
    s.write_at(b"de", 8).unwrap();
    s.sync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"abc\0\0\0\0\0de");
}

/// Text-like data: words from a small vocabulary in a skewed order, with numbers.
fn text_like(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
        "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
        "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
        "been", "if", "more", "when", "will", "would", "who", "so", "no", "static", "int",
        "return", "struct", "const", "void", "uint64_t", "offset", "buf",
    ];
    let r = pattern(len, seed);
    let mut out = Vec::with_capacity(len + 32);
    let mut i = 0;
    while out.len() < len {
        let a = r[i % r.len()] as usize;
        let b = r[(i + 1) % r.len()] as usize;
        let w = words[(a * b / 255 * words.len() / 256).min(words.len() - 1)];
        out.extend_from_slice(w.as_bytes());
        match a % 17 {
            0 => out.extend_from_slice(b".\n"),
            1 => out.extend_from_slice(format!(" {}", b * 37).as_bytes()),
            2 => out.extend_from_slice(b", "),
            _ => out.push(b' '),
        }
        i += 2;
    }
    out.truncate(len);
    out
}

/// Executable-like data: records of small integers, pointers and repeated opcode runs.
fn binary_like(len: usize, seed: u64) -> Vec<u8> {
    let r = pattern(len / 4 + 64, seed);
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 0;
    while out.len() < len {
        let k = r[i % r.len()];
        match k % 4 {
            0 => out.extend_from_slice(&(0x40_0000u32 + (k as u32) * 16).to_le_bytes()),
            1 => out.extend_from_slice(&[0x48, 0x89, 0xc7, k & 7]),
            2 => out.extend_from_slice(&[0xe8, k, r[(i + 1) % r.len()], 0xff, 0xff]),
            _ => out.extend_from_slice(&[0, 0, 0, k >> 4]),
        }
        i += 1;
    }
    out.truncate(len);
    out
}

#[test]
fn stream_is_no_larger_than_qemus() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    let text = text_like(6 << 20, 1);
    let mut mixed = text_like(2 << 20, 2);
    mixed.extend(vec![0u8; 1 << 20]);
    mixed.extend(binary_like(3 << 20, 3));
    mixed.extend(pattern(1 << 20, 4));
    mixed.extend(text_like(1 << 20, 5));
    for (name, data) in [("text.raw", &text), ("mixed.raw", &mixed)] {
        std::fs::write(dir.join(name), data).unwrap();
        ok(qemu_img(dir, &stream_args(name, "q.vmdk")));
        let out = diskit_stdout(dir, &stream_args(name, "-"));
        assert!(out.status.success(), "{}", stderr(&out));
        let q = std::fs::metadata(dir.join("q.vmdk")).unwrap().len();
        let d = out.stdout.len() as u64;
        eprintln!("{name}: qemu-img {q} bytes, diskit {d} bytes");
        assert!(
            d <= q,
            "{name}: diskit's stream ({d}) is larger than qemu's ({q})"
        );
        std::fs::write(dir.join("d.vmdk"), &out.stdout).unwrap();
        assert!(qemu_raw(dir, "d.vmdk", Some("vmdk")) == *data);
    }
}

/// `-W` (out-of-order writes) on a streamOptimized file target succeeds as with qemu-img:
/// the stream is written in order anyway (grains encoded on every worker), and equals the
/// in-order stream.
#[test]
fn out_of_order_flag_on_a_stream_file_is_accepted() {
    require_qemu!();
    let t = tmpdir();
    let dir = t.path();
    write_source(dir, "src.raw", (3 << 20) + 1536);
    for sub in ["w", "in", "q"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    let with_w = |target| {
        let mut a = stream_args("src.raw", target);
        a.splice(1..1, ["-W", "-m", "4"]);
        a
    };
    ok(diskit(dir, &with_w("w/disk.vmdk")));
    ok(qemu_img(dir, &with_w("q/disk.vmdk")));
    ok(diskit(dir, &stream_args("src.raw", "in/disk.vmdk")));
    assert_same_stream(
        &std::fs::read(dir.join("w/disk.vmdk")).unwrap(),
        &std::fs::read(dir.join("in/disk.vmdk")).unwrap(),
    );
    let check = ok(qemu_img(dir, &["check", "w/disk.vmdk"]));
    assert_eq!(stdout(&check), "No errors were found on the image.\n");
    let src = std::fs::read(dir.join("src.raw")).unwrap();
    assert!(qemu_raw(dir, "w/disk.vmdk", Some("vmdk")) == src);
}
