//! qcow2 writing: random operations against an in-memory model, checked by qemu-img;
//! snapshots (shared clusters), refcount table growth, crash consistency.

mod common;

use common::*;
use diskit::formats::qcow2;
use diskit::io::fault::FaultMode;
use diskit::io::FaultInjector;
use diskit::{BlockDriver, CreateOpts, OpenOptions};
use proptest::prelude::*;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Config {
    cs: u64,
    opts: &'static str,
    v2: bool,
    backing: bool,
}

const CONFIGS: &[Config] = &[
    Config {
        cs: 65536,
        opts: "",
        v2: false,
        backing: false,
    },
    Config {
        cs: 65536,
        opts: "",
        v2: false,
        backing: true,
    },
    Config {
        cs: 512,
        opts: "cluster_size=512,refcount_bits=1",
        v2: false,
        backing: false,
    },
    Config {
        cs: 512,
        opts: "cluster_size=512,refcount_bits=64",
        v2: false,
        backing: true,
    },
    Config {
        cs: 65536,
        opts: "compat=0.10",
        v2: true,
        backing: false,
    },
    Config {
        cs: 65536,
        opts: "compat=0.10",
        v2: true,
        backing: true,
    },
    Config {
        cs: 65536,
        opts: "extended_l2=on",
        v2: false,
        backing: false,
    },
    Config {
        cs: 32768,
        opts: "extended_l2=on,cluster_size=32k,refcount_bits=1",
        v2: false,
        backing: true,
    },
    Config {
        cs: 2 << 20,
        opts: "cluster_size=2M",
        v2: false,
        backing: true,
    },
    Config {
        cs: 2 << 20,
        opts: "cluster_size=2M,extended_l2=on",
        v2: false,
        backing: false,
    },
    Config {
        cs: 4096,
        opts: "cluster_size=4k,compression_type=zstd,refcount_bits=2",
        v2: false,
        backing: true,
    },
    Config {
        cs: 16384,
        opts: "cluster_size=16k,lazy_refcounts=on",
        v2: false,
        backing: false,
    },
];

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Compressed(u64, u64),
    Flush,
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    if seed % 3 == 0 {
        // compressible, with repeats further apart than 4 KiB
        let block = pattern(5000, seed);
        block.iter().cycle().take(len).copied().collect()
    } else {
        pattern(len, seed)
    }
}

fn op_strategy() -> impl Strategy<Value = (u8, u64, u64, u64, u64, bool)> {
    (
        0u8..10,
        0u64..1000,
        0u64..4096,
        0u64..1000,
        any::<u64>(),
        any::<bool>(),
    )
}

fn image_size(cfg: &Config) -> u64 {
    let clusters = match cfg.cs {
        512 => 300,
        c if c >= 1 << 20 => 3,
        _ => 12,
    };
    clusters * cfg.cs - 1024
}

fn make_op(cfg: &Config, size: u64, r: (u8, u64, u64, u64, u64, bool)) -> Op {
    let (kind, a, b, c, seed, flag) = r;
    let cs = cfg.cs;
    let clusters = size.div_ceil(cs);
    let cl = a % clusters;
    // offsets: cluster aligned, sector aligned or arbitrary
    let off = match b % 3 {
        0 => cl * cs,
        1 => cl * cs + (b * 512) % cs,
        _ => cl * cs + (b * 37) % cs,
    }
    .min(size - 1);
    let len = match c % 4 {
        0 => cs,
        1 => (c * 97) % (3 * cs) + 1,
        2 => cs * (1 + c % 3),
        _ => (c * 512) % (2 * cs) + 512,
    }
    .min(size - off);
    match kind {
        0..=3 => Op::Write(off, len, seed),
        4 | 5 => Op::Zero(off, len, flag),
        6 => Op::Discard(off, len),
        7 | 8 => Op::Compressed(cl, seed),
        _ => Op::Flush,
    }
}

struct Case {
    _dir: tempfile::TempDir,
    img: std::path::PathBuf,
    model: Vec<u8>,
    base: Vec<u8>,
    cfg: Config,
}

fn setup(cfg: &Config) -> Case {
    let d = tmpdir();
    let dir = d.path().to_path_buf();
    let size = image_size(cfg);
    let img = dir.join("img.qcow2");
    let mut base = vec![0u8; size as usize];
    let mut o = CreateOpts::parse(cfg.opts).unwrap();
    o.set("size", &size.to_string());
    if cfg.backing {
        // the backing file is shorter than the image: its tail reads as zero
        let bsize = size - cfg.cs.min(size / 4) - 512;
        let b = pattern(bsize as usize, 4242);
        std::fs::write(dir.join("base.raw"), &b).unwrap();
        base[..bsize as usize].copy_from_slice(&b);
        o.set("backing_file", dir.join("base.raw").to_str().unwrap());
        o.set("backing_fmt", "raw");
    }
    qcow2::create(img.to_str().unwrap(), &o).unwrap();
    Case {
        _dir: d,
        img,
        model: base.clone(),
        base,
        cfg: cfg.clone(),
    }
}

fn apply(img: &dyn BlockDriver, case: &mut Case, op: &Op) {
    let cs = case.cfg.cs;
    let size = case.model.len() as u64;
    let whole = |off: u64, len: u64| -> Vec<u64> {
        // clusters fully covered (the last cluster counts when the range reaches the end)
        let mut v = Vec::new();
        let mut c = off.div_ceil(cs);
        while c * cs < off + len {
            let end = ((c + 1) * cs).min(size);
            if end <= off + len {
                v.push(c);
            }
            c += 1;
        }
        v
    };
    match *op {
        Op::Write(off, len, seed) => {
            let d = data(len as usize, seed);
            img.write_at(&d, off).unwrap();
            case.model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        Op::Zero(off, len, unmap) => {
            img.write_zeroes(off, len, unmap).unwrap();
            case.model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard(off, len) => {
            img.discard(off, len).unwrap();
            for c in whole(off, len) {
                let a = (c * cs) as usize;
                let b = ((c + 1) * cs).min(size) as usize;
                if case.cfg.v2 {
                    let src = case.base[a..b].to_vec();
                    case.model[a..b].copy_from_slice(&src);
                } else {
                    case.model[a..b].fill(0);
                }
            }
        }
        Op::Compressed(cl, seed) => {
            let off = cl * cs;
            let len = cs.min(size - off);
            let d = data(len as usize, seed);
            img.write_compressed(&d, off).unwrap();
            case.model[off as usize..(off + len) as usize].copy_from_slice(&d);
        }
        Op::Flush => img.flush().unwrap(),
    }
}

fn verify(case: &Case) {
    let dir = case.img.parent().unwrap();
    let name = case.img.file_name().unwrap().to_str().unwrap();
    let chk = qemu_img(dir, &["check", name]);
    assert!(
        chk.status.success(),
        "{:?}: qemu-img check: {}{}",
        case.cfg,
        stdout(&chk),
        stderr(&chk)
    );
    let got = qemu_raw(dir, name, Some("qcow2"));
    if got != case.model {
        let first = got.iter().zip(&case.model).position(|(a, b)| a != b);
        panic!(
            "{:?}: qemu reads different content, first at {:?}",
            case.cfg, first
        );
    }
    assert!(
        diskit_raw(&case.img) == case.model,
        "diskit reads different content"
    );
}

/// Tests of this file run one at a time: a child process forked by another test thread
/// briefly holds inherited file descriptions (and their OFD locks) of files we reopen.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_rw(path: &Path) -> Box<dyn BlockDriver> {
    diskit::open(path.to_str().unwrap(), &OpenOptions::read_write()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn random_ops_match_model(ci in 0usize..CONFIGS.len(), ops in prop::collection::vec(op_strategy(), 1..25)) {
        if !have_qemu() { return Ok(()); }
        let _g = serial();
        let cfg = &CONFIGS[ci];
        let mut case = setup(cfg);
        let size = case.model.len() as u64;
        let ops: Vec<Op> = ops.into_iter().map(|r| make_op(cfg, size, r)).collect();
        {
            let img = open_rw(&case.img);
            for (i, op) in ops.iter().enumerate() {
                apply(img.as_ref(), &mut case, op);
                // reopen now and then so that the on-disk state is exercised
                if i == ops.len() / 2 {
                    img.close().unwrap();
                }
            }
            img.close().unwrap();
        }
        verify(&case);
    }
}

#[test]
fn every_config_once() {
    require_qemu!();
    let _g = serial();
    for cfg in CONFIGS {
        let mut case = setup(cfg);
        let size = case.model.len() as u64;
        let cs = cfg.cs;
        let ops = vec![
            Op::Write(0, cs * 2 + 100, 1),
            Op::Write(cs / 2, 700, 2),
            Op::Compressed(1, 3),
            Op::Compressed(2, 6),
            Op::Flush,
            Op::Zero(cs + 512, cs, false),
            Op::Discard(0, cs),
            Op::Write(size - 1000, 1000, 4),
            Op::Zero(size - cs.min(size), cs.min(size), true),
            Op::Write(cs * 2 + 3, 5, 5),
        ];
        {
            let img = open_rw(&case.img);
            for op in &ops {
                apply(img.as_ref(), &mut case, op);
            }
            img.close().unwrap();
        }
        verify(&case);
    }
}

#[test]
fn writes_to_image_with_snapshot() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "s.qcow2", "2M"],
    ));
    ok(qemu_io(
        dir,
        "qcow2",
        "s.qcow2",
        &["write -P 1 0 1M", "write -c -P 2 1M 64k"],
    ));
    ok(qemu_img(dir, &["snapshot", "-c", "snap", "s.qcow2"]));
    let p = dir.join("s.qcow2");
    let mut model = qemu_raw(dir, "s.qcow2", None);
    {
        let img = open_rw(&p);
        let d1 = pattern(5000, 7);
        img.write_at(&d1, 70000).unwrap();
        model[70000..75000].copy_from_slice(&d1);
        img.write_zeroes(0, 65536, true).unwrap();
        model[..65536].fill(0);
        let d2 = pattern(100, 8);
        img.write_at(&d2, (1 << 20) + 10).unwrap();
        model[(1 << 20) + 10..(1 << 20) + 110].copy_from_slice(&d2);
        img.close().unwrap();
    }
    let chk = qemu_img(dir, &["check", "s.qcow2"]);
    assert!(chk.status.success(), "{}", stdout(&chk));
    assert_eq!(qemu_raw(dir, "s.qcow2", None), model);
    // the snapshot still holds the old content
    ok(qemu_img(dir, &["snapshot", "-a", "snap", "s.qcow2"]));
    let old = qemu_raw(dir, "s.qcow2", None);
    assert!(old[..1 << 20].iter().all(|&b| b == 1));
}

#[test]
fn refcount_table_grows() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let p = d.path().join("g.qcow2");
    let o = CreateOpts::parse("cluster_size=512,refcount_bits=64,size=8M").unwrap();
    qcow2::create(p.to_str().unwrap(), &o).unwrap();
    let data = pattern(5 << 20, 3);
    {
        let img = open_rw(&p);
        for (i, c) in data.chunks(100_000).enumerate() {
            img.write_at(c, (i * 100_000) as u64).unwrap();
        }
        img.close().unwrap();
    }
    let chk = qemu_img(d.path(), &["check", "g.qcow2"]);
    assert!(chk.status.success(), "{}{}", stdout(&chk), stderr(&chk));
    let got = qemu_raw(d.path(), "g.qcow2", None);
    assert_eq!(&got[..5 << 20], &data[..]);
    let info = json(&ok(qemu_img(
        d.path(),
        &["info", "--output=json", "g.qcow2"],
    )));
    assert_eq!(info["virtual-size"], 8 << 20);
}

/// Runs of clusters longer than one refcount block describes: an 8 GiB image with 1 KiB
/// clusters has a 512-cluster L1 table where a refcount block covers 512 clusters (qemu-img
/// creates it in no time; diskit used to search the whole address space for the run), and
/// preallocated metadata allocates the data of the whole image at once.
#[test]
fn runs_longer_than_a_refcount_block() {
    require_qemu!();
    let d = tmpdir();
    for (name, o, size) in [
        ("l1.qcow2", "cluster_size=1024", "8G"),
        (
            "pre.qcow2",
            "preallocation=metadata,cluster_size=1k",
            "64512K",
        ),
        (
            "r1.qcow2",
            "cluster_size=512,refcount_bits=1,preallocation=metadata",
            "16M",
        ),
    ] {
        let out = diskit(
            d.path(),
            &["create", "-q", "-f", "qcow2", "-o", o, name, size],
        );
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let chk = qemu_img(d.path(), &["check", name]);
        assert!(
            chk.status.success(),
            "{name}: {}{}",
            stdout(&chk),
            stderr(&chk)
        );
        let q = format!("q-{name}");
        ok(qemu_img(
            d.path(),
            &["create", "-q", "-f", "qcow2", "-o", o, &q, size],
        ));
        let len = |f: &str| std::fs::metadata(d.path().join(f)).unwrap().len();
        assert_eq!(
            len(name),
            len(&q),
            "{name}: file size differs from qemu-img's"
        );
        // data written by qemu-io lands in free clusters and reads back
        let w = qemu_io(d.path(), "qcow2", name, &["write -P 0x5a 1M 3M"]);
        assert!(w.status.success(), "{}", stderr(&w));
        let chk = qemu_img(d.path(), &["check", name]);
        assert!(
            chk.status.success(),
            "{name}: {}{}",
            stdout(&chk),
            stderr(&chk)
        );
        let img = diskit::open(
            d.path().join(name).to_str().unwrap(),
            &OpenOptions::read_only(),
        )
        .unwrap();
        let mut got = vec![0xffu8; 8 << 20];
        img.read_at(&mut got, 0).unwrap();
        assert!(got[1 << 20..4 << 20].iter().all(|&b| b == 0x5a), "{name}");
        assert!(got[..1 << 20].iter().all(|&b| b == 0), "{name}");
        assert!(got[4 << 20..].iter().all(|&b| b == 0), "{name}");
    }
}

#[test]
fn sequential_writes_are_contiguous() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let p = d.path().join("c.qcow2");
    let o = CreateOpts::parse("size=4M").unwrap();
    qcow2::create(p.to_str().unwrap(), &o).unwrap();
    {
        let img = open_rw(&p);
        img.write_at(&pattern(3 << 20, 1), 0).unwrap();
        img.close().unwrap();
    }
    let img = diskit::open(p.to_str().unwrap(), &OpenOptions::read_only()).unwrap();
    let (m, n) = img.map(0, 4 << 20).unwrap();
    assert!(matches!(m, diskit::Mapping::Data { .. }));
    assert_eq!(n, 3 << 20);
}

/// Crash at every write of a workload: what was flushed survives, check never finds
/// corruption.
#[test]
fn crash_consistency() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let dir = d.path();
    let base = dir.join("base.qcow2");
    let o = CreateOpts::parse("cluster_size=4k,size=256k").unwrap();
    qcow2::create(base.to_str().unwrap(), &o).unwrap();
    let cs = 4096u64;
    // phase i writes region i (disjoint), then flushes
    let phases: Vec<Vec<Op>> = vec![
        vec![Op::Write(0, 3 * cs, 1), Op::Write(cs / 2, 100, 2)],
        vec![Op::Write(10 * cs, 2 * cs, 3), Op::Compressed(12, 3)],
        vec![Op::Zero(0, cs, true), Op::Write(20 * cs, cs * 5, 4)],
        vec![Op::Discard(10 * cs, cs), Op::Write(30 * cs, 100, 5)],
    ];
    let run = |img: &dyn BlockDriver, model: &mut Vec<u8>, inj: Option<&FaultInjector>| -> usize {
        let mut done = 0;
        for ph in &phases {
            for op in ph {
                let r = match *op {
                    Op::Write(off, len, seed) => {
                        let dd = data(len as usize, seed);
                        model[off as usize..(off + len) as usize].copy_from_slice(&dd);
                        img.write_at(&dd, off)
                    }
                    Op::Zero(off, len, u) => {
                        model[off as usize..(off + len) as usize].fill(0);
                        img.write_zeroes(off, len, u)
                    }
                    Op::Discard(off, len) => {
                        model[off as usize..(off + len) as usize].fill(0);
                        img.discard(off, len)
                    }
                    Op::Compressed(cl, seed) => {
                        let dd = data(cs as usize, seed);
                        model[(cl * cs) as usize..((cl + 1) * cs) as usize].copy_from_slice(&dd);
                        img.write_compressed(&dd, cl * cs)
                    }
                    Op::Flush => img.flush(),
                };
                if r.is_err() {
                    return done;
                }
            }
            if img.flush().is_err() || inj.is_some_and(|i| i.fired()) {
                return done;
            }
            done += 1;
        }
        done
    };
    // count the operations of a clean run
    let total = {
        let p = dir.join("count.qcow2");
        std::fs::copy(&base, &p).unwrap();
        let inj = Arc::new(FaultInjector::new(u64::MAX, FaultMode::StopWrites));
        let opts = OpenOptions {
            write: true,
            faults: Some(inj.clone()),
            ..OpenOptions::default()
        };
        let img = diskit::open(p.to_str().unwrap(), &opts).unwrap();
        let mut model = vec![0u8; 256 << 10];
        assert_eq!(run(img.as_ref(), &mut model, Some(&inj)), phases.len());
        img.close().unwrap();
        inj.count()
    };
    assert!(total > 10);
    let regions: [(usize, usize); 4] = [
        (0, 3 * 4096),
        (10 * 4096, 13 * 4096),
        (0, 25 * 4096),
        (10 * 4096, 31 * 4096),
    ];
    for n in 0..total {
        let p = dir.join("crash.qcow2");
        std::fs::copy(&base, &p).unwrap();
        let inj = Arc::new(FaultInjector::new(n, FaultMode::StopWrites));
        let opts = OpenOptions {
            write: true,
            faults: Some(inj.clone()),
            ..OpenOptions::default()
        };
        let mut model = vec![0u8; 256 << 10];
        let done;
        let mut snapshots = Vec::new();
        {
            let img = diskit::open(p.to_str().unwrap(), &opts).unwrap();
            // record the model after each phase by re-running the phases on a copy
            done = run(img.as_ref(), &mut model, Some(&inj));
            drop(img);
        }
        {
            let mut m = vec![0u8; 256 << 10];
            for (i, ph) in phases.iter().enumerate() {
                if i >= done {
                    break;
                }
                for op in ph {
                    match *op {
                        Op::Write(off, len, seed) => m[off as usize..(off + len) as usize]
                            .copy_from_slice(&data(len as usize, seed)),
                        Op::Zero(off, len, _) | Op::Discard(off, len) => {
                            m[off as usize..(off + len) as usize].fill(0)
                        }
                        Op::Compressed(cl, seed) => m[(cl * cs) as usize..((cl + 1) * cs) as usize]
                            .copy_from_slice(&data(cs as usize, seed)),
                        Op::Flush => {}
                    }
                }
                snapshots.push(m.clone());
            }
        }
        let chk = qemu_img(dir, &["check", "crash.qcow2"]);
        let code = chk.status.code().unwrap();
        assert!(
            code == 0 || code == 3,
            "crash after {n} ops: check exit {code}: {}",
            stdout(&chk)
        );
        if done > 0 {
            let got = qemu_raw(dir, "crash.qcow2", Some("qcow2"));
            let want = &snapshots[done - 1];
            // regions written after the last completed flush may hold either state
            let later: Vec<(usize, usize)> = regions[done..].to_vec();
            for i in 0..got.len() {
                if later.iter().any(|&(a, b)| i >= a && i < b) {
                    continue;
                }
                assert_eq!(
                    got[i], want[i],
                    "crash after {n} ops ({done} phases flushed): byte {i:#x}"
                );
            }
        }
    }
}

#[test]
fn data_file_writes() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let dir = d.path();
    for (name, o) in [
        ("df.qcow2", "data_file=df.data"),
        ("dfr.qcow2", "data_file=dfr.data,data_file_raw=on"),
        ("dfx.qcow2", "data_file=dfx.data,extended_l2=on"),
    ] {
        ok(qemu_img(
            dir,
            &["create", "-q", "-f", "qcow2", "-o", o, name, "1M"],
        ));
        let p = dir.join(name);
        let mut model = vec![0u8; 1 << 20];
        {
            let img = open_rw(&p);
            let a = pattern(100_000, 1);
            img.write_at(&a, 3000).unwrap();
            model[3000..103_000].copy_from_slice(&a);
            img.write_zeroes(65536, 65536, true).unwrap();
            model[65536..131_072].fill(0);
            img.discard(0, 65536).unwrap();
            model[..65536].fill(0);
            assert!(img.write_compressed(&[1u8; 65536], 196_608).is_err());
            img.close().unwrap();
        }
        let chk = qemu_img(dir, &["check", name]);
        assert!(chk.status.success(), "{name}: {}", stdout(&chk));
        assert_eq!(qemu_raw(dir, name, None), model, "{name}");
        if name == "dfr.qcow2" {
            // the data file stays a valid raw image
            let raw = std::fs::read(dir.join("dfr.data")).unwrap();
            assert_eq!(&raw[..model.len()], &model[..]);
        }
    }
}

#[test]
fn bitmaps_and_autoclear_on_write() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"],
    ));
    ok(qemu_img(dir, &["bitmap", "--add", "b.qcow2", "bm"]));
    let p = dir.join("b.qcow2");
    // set an unknown autoclear bit next to the bitmaps bit
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, 88).unwrap();
        let v = u64::from_be_bytes(b) | 1 << 20;
        f.write_all_at(&v.to_be_bytes(), 88).unwrap();
    }
    {
        let img = open_rw(&p);
        img.write_at(&[7u8; 4096], 0).unwrap();
        img.close().unwrap();
    }
    let raw = std::fs::read(&p).unwrap();
    let autoclear = u64::from_be_bytes(raw[88..96].try_into().unwrap());
    assert_eq!(
        autoclear, 1,
        "unknown autoclear bit cleared, bitmaps bit kept"
    );
    let info = json(&ok(qemu_img(dir, &["info", "--output=json", "b.qcow2"])));
    let flags = &info["format-specific"]["data"]["bitmaps"][0]["flags"];
    assert!(
        flags.as_array().unwrap().iter().any(|f| f == "in-use"),
        "{flags}"
    );
}

#[test]
fn compressed_clusters_share_host_clusters() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let p = d.path().join("z.qcow2");
    qcow2::create(p.to_str().unwrap(), &CreateOpts::parse("size=4M").unwrap()).unwrap();
    let mut model = vec![0u8; 4 << 20];
    {
        let img = open_rw(&p);
        for c in 0..64u64 {
            let block = pattern(300, c);
            let dd: Vec<u8> = block.iter().cycle().take(65536).copied().collect();
            img.write_compressed(&dd, c * 65536).unwrap();
            model[(c * 65536) as usize..((c + 1) * 65536) as usize].copy_from_slice(&dd);
        }
        img.close().unwrap();
    }
    let chk = qemu_img(d.path(), &["check", "z.qcow2"]);
    assert!(chk.status.success(), "{}", stdout(&chk));
    assert_eq!(qemu_raw(d.path(), "z.qcow2", None), model);
    // 64 clusters of 300-byte-periodic data pack into far fewer host clusters
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(len < 20 * 65536, "file is {len} bytes");
}

#[test]
fn inconsistency_marks_image_corrupt() {
    require_qemu!();
    let _g = serial();
    let d = tmpdir();
    let dir = d.path();
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "k.qcow2", "1M"],
    ));
    ok(qemu_io(dir, "qcow2", "k.qcow2", &["write 0 64k"]));
    let p = dir.join("k.qcow2");
    // zero the refcount block entry of the data cluster (host cluster 4, after the L2 table)
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0, 0], 0x20000 + 2 * 5).unwrap();
    }
    {
        let img = open_rw(&p);
        // overwriting the cluster frees it: its refcount would drop below zero
        img.write_zeroes(0, 65536, true).unwrap();
        assert!(img.flush().is_err());
    }
    let raw = std::fs::read(&p).unwrap();
    let incompat = u64::from_be_bytes(raw[72..80].try_into().unwrap());
    assert_eq!(incompat & 2, 2, "corrupt bit set");
    let e = diskit::open(p.to_str().unwrap(), &OpenOptions::read_write())
        .err()
        .unwrap();
    assert!(e.to_string().contains("corrupt"), "{e}");
}
