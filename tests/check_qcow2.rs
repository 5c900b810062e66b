//! `check` of qcow2 images against `qemu-img check`: damaged images built by poking bytes
//! into qemu-made images, repairs, crash safety of repairs, and a metadata fuzz.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use diskit::formats::{OpenOptions, RepairMode};
use diskit::io::fault::FaultMode;
use diskit::io::FaultInjector;

const CS: u64 = 65536;

fn rd64(b: &[u8], o: u64) -> u64 {
    u64::from_be_bytes(b[o as usize..o as usize + 8].try_into().unwrap())
}

fn poke(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Where the metadata of a simple image lives.
struct Layout {
    rt: u64,
    rb: u64,
    l1: u64,
    l2: u64,
}

fn layout(path: &Path) -> Layout {
    let b = std::fs::read(path).unwrap();
    let rt = rd64(&b, 48);
    let l1 = rd64(&b, 40);
    Layout {
        rt,
        rb: rd64(&b, rt) & !0x1ff,
        l1,
        l2: rd64(&b, l1) & 0x00ff_ffff_ffff_fe00,
    }
}

fn l2_entry(path: &Path, i: u64) -> u64 {
    let b = std::fs::read(path).unwrap();
    rd64(&b, layout(path).l2 + i * 8)
}

/// A 4 MiB image with data in guest clusters 0-2 and 16, plus one spare cluster at the end
/// of the file (so that a leak can live inside the file).
fn base(dir: &Path, name: &str, extra: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(extra);
    args.extend([name, "4M"]);
    ok(qemu_img(dir, &args));
    ok(qemu_io(
        dir,
        "qcow2",
        name,
        &["write -P 1 0 192k", "write -P 2 1M 64k"],
    ));
}

fn strip_findings(mut v: serde_json::Value) -> serde_json::Value {
    v.as_object_mut().unwrap().remove("findings");
    v
}

/// `check --output=json` and human `check` of diskit and qemu-img agree (JSON minus
/// diskit's `findings`); returns the exit code.
fn check_same(dir: &Path, name: &str) -> i32 {
    let args = ["check", "--output=json", name];
    let q = qemu_img(dir, &args);
    let d = diskit_as_qemu(dir, &args);
    assert_eq!(stderr(&d), stderr(&q), "stderr differs for {name}");
    assert_eq!(d.status.code(), q.status.code(), "exit code for {name}");
    if !q.stdout.is_empty() {
        assert_eq!(
            strip_findings(json(&d)),
            json(&q),
            "JSON differs for {name}"
        );
    } else {
        assert!(d.stdout.is_empty());
    }
    same_as_qemu(dir, &["check", name]);
    q.status.code().unwrap()
}

/// Repairs a copy with qemu-img and one with diskit (`-r all`); both end with the same
/// verdict of qemu-img check, diskit agrees with qemu-img about its own result, and the
/// guest data is the same as after qemu's repair.
fn repair_same(dir: &Path, name: &str, expect_clean: bool) {
    let qn = format!("q-{name}");
    let dn = format!("d-{name}");
    std::fs::copy(dir.join(name), dir.join(&qn)).unwrap();
    std::fs::copy(dir.join(name), dir.join(&dn)).unwrap();
    let q = qemu_img(dir, &["check", "-r", "all", &qn]);
    let d = diskit_as_qemu(dir, &["check", "-r", "all", &dn]);
    assert_eq!(d.status.code(), q.status.code(), "repair exit code {name}");
    let qa = qemu_img(dir, &["check", &dn]);
    let da = diskit(dir, &["check", &dn]);
    let qq = qemu_img(dir, &["check", &qn]);
    assert_eq!(qa.status.code(), qq.status.code(), "after repair {name}");
    assert_eq!(da.status.code(), qa.status.code(), "diskit vs qemu {name}");
    if expect_clean {
        assert_eq!(qa.status.code(), Some(0), "{name}: {}", stderr(&qa));
        assert!(stdout(&da).contains("No errors were found"));
    }
    if expect_clean {
        assert!(
            qemu_raw(dir, &dn, None) == qemu_raw(dir, &qn, None),
            "data after repair differs for {name}"
        );
    }
}

#[test]
fn clean_images_match_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "plain.qcow2", &[]);
    assert_eq!(check_same(d, "plain.qcow2"), 0);
    base(d, "ext.qcow2", &["-o", "extended_l2=on"]);
    assert_eq!(check_same(d, "ext.qcow2"), 0);
    base(
        d,
        "small.qcow2",
        &["-o", "cluster_size=4096,refcount_bits=1"],
    );
    assert_eq!(check_same(d, "small.qcow2"), 0);
    // compressed and fragmented
    ok(qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "plain.qcow2", "c.qcow2"],
    ));
    ok(qemu_io(d, "qcow2", "c.qcow2", &["write -P 7 64k 4k"]));
    assert_eq!(check_same(d, "c.qcow2"), 0);
    // snapshots and bitmaps
    ok(qemu_img(d, &["snapshot", "-c", "s1", "plain.qcow2"]));
    ok(qemu_io(d, "qcow2", "plain.qcow2", &["write -P 3 0 64k"]));
    ok(qemu_img(d, &["bitmap", "--add", "plain.qcow2", "b0"]));
    assert_eq!(check_same(d, "plain.qcow2"), 0);
}

#[test]
fn damaged_images_match_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "a.qcow2", &[]);
    let a = d.join("a.qcow2");
    let lay = layout(&a);
    let e0 = l2_entry(&a, 0);
    let host0 = e0 & 0x00ff_ffff_ffff_fe00;
    let flen = std::fs::metadata(&a).unwrap().len();
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, i32, bool)> = vec![
        (
            "leak",
            Box::new(move |p: &Path| {
                // one more cluster in the file, with refcount 1 and no reference
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(flen + CS)
                    .unwrap();
                poke(p, lay.rb + 2 * (flen / CS), &1u16.to_be_bytes());
            }),
            3,
            true,
        ),
        (
            "refcount-zero",
            Box::new(move |p: &Path| poke(p, lay.rb + 2 * (host0 / CS), &0u16.to_be_bytes())),
            2,
            true,
        ),
        (
            "double-reference",
            Box::new(move |p: &Path| poke(p, lay.l2 + 8, &e0.to_be_bytes())),
            2,
            true,
        ),
        (
            "l2-past-eof",
            Box::new(move |p: &Path| poke(p, lay.l1, &(0x8000_0000_0100_0000u64).to_be_bytes())),
            2,
            false,
        ),
        (
            "l2-unaligned",
            Box::new(move |p: &Path| poke(p, lay.l1, &((lay.l2 + 0x200) | 1 << 63).to_be_bytes())),
            2,
            false,
        ),
        (
            "refblock-on-l2",
            Box::new(move |p: &Path| poke(p, lay.rt, &lay.l2.to_be_bytes())),
            2,
            true,
        ),
        (
            "copied-missing",
            Box::new(move |p: &Path| poke(p, lay.l2, &(e0 & !(1 << 63)).to_be_bytes())),
            2,
            true,
        ),
        (
            "l1-copied-missing",
            Box::new(move |p: &Path| poke(p, lay.l1, &lay.l2.to_be_bytes())),
            2,
            true,
        ),
        (
            "reserved-bits",
            Box::new(move |p: &Path| poke(p, lay.l2, &(e0 | 0x100).to_be_bytes())),
            2,
            false,
        ),
    ];
    for (name, damage, code, clean) in &cases {
        let f = format!("{name}.qcow2");
        std::fs::copy(&a, d.join(&f)).unwrap();
        damage(&d.join(&f));
        assert_eq!(check_same(d, &f), *code, "{name}");
        repair_same(d, &f, *clean);
    }
    // a bad snapshot table offset: the check fails like qemu's
    let f = "snap.qcow2";
    std::fs::copy(&a, d.join(f)).unwrap();
    poke(&d.join(f), 60, &1u32.to_be_bytes());
    poke(&d.join(f), 64, &0x12345u64.to_be_bytes());
    assert_eq!(check_same(d, f), 1);
    let out = same_as_qemu(d, &["check", "-r", "leaks", f]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn json_findings_name_the_cluster() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "a.qcow2", &[]);
    let a = d.join("a.qcow2");
    let lay = layout(&a);
    let e0 = l2_entry(&a, 0);
    poke(&a, lay.l2 + 8, &e0.to_be_bytes());
    let out = diskit(d, &["check", "--output=json", "a.qcow2"]);
    assert_eq!(out.status.code(), Some(2));
    let v = json(&out);
    let f = v["findings"].as_array().unwrap();
    let host = e0 & 0x00ff_ffff_ffff_fe00;
    assert!(f
        .iter()
        .any(|x| x["kind"] == "refcount-too-low" && x["cluster"] == host / CS));
    assert!(f.iter().any(|x| x["kind"] == "leak"));
    // a clean image has no findings field
    base(d, "b.qcow2", &[]);
    let v = json(&ok(diskit(d, &["check", "--output=json", "b.qcow2"])));
    assert!(v.get("findings").is_none());
}

#[test]
fn copied_flag_wrong_both_ways_with_snapshot() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "a.qcow2", &[]);
    ok(qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]));
    ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 9 0 64k"]));
    let a = d.join("a.qcow2");
    let lay = layout(&a);
    // entry 0 was rewritten (refcount 1, COPIED); entry 1 is shared (refcount 2)
    let e0 = l2_entry(&a, 0);
    let e1 = l2_entry(&a, 1);
    assert!(e0 & (1 << 63) != 0 && e1 & (1 << 63) == 0);
    poke(&a, lay.l2, &(e0 & !(1 << 63)).to_be_bytes());
    poke(&a, lay.l2 + 8, &(e1 | (1 << 63)).to_be_bytes());
    assert_eq!(check_same(d, "a.qcow2"), 2);
    repair_same(d, "a.qcow2", true);
    // refcount too low but not zero (2 -> 1): raised in place
    std::fs::copy(d.join("q-a.qcow2"), d.join("b.qcow2")).unwrap();
    let b = d.join("b.qcow2");
    let host1 = l2_entry(&b, 1) & 0x00ff_ffff_ffff_fe00;
    poke(&b, layout(&b).rb + 2 * (host1 / CS), &1u16.to_be_bytes());
    assert_eq!(check_same(d, "b.qcow2"), 2);
    repair_same(d, "b.qcow2", true);
    // -r leaks leaves the corruption and says so like qemu
    std::fs::copy(&b, d.join("c.qcow2")).unwrap();
    let (qd, dd) = same_effect_as_qemu(d, &["c.qcow2"], &["check", "-r", "leaks", "c.qcow2"]);
    assert_eq!(qemu_img(&dd, &["check", "c.qcow2"]).status.code(), Some(2));
    assert_eq!(qemu_img(&qd, &["check", "c.qcow2"]).status.code(), Some(2));
}

/// A lazy-refcounts image after a crash: dirty bit set, refcounts of new clusters missing.
fn crashed_lazy(d: &Path, name: &str) {
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            name,
            "4M",
        ],
    ));
    ok(qemu_io(d, "qcow2", name, &["write -P 5 0 64k"]));
    let p = d.join(name);
    let lay = layout(&p);
    ok(qemu_io(d, "qcow2", name, &["write -P 6 2M 128k"]));
    // forget the refcounts of everything allocated by the second write
    let b = std::fs::read(&p).unwrap();
    let rb = lay.rb;
    for c in 0..(b.len() as u64 / CS) {
        let used_before = c <= (lay.l2.max(lay.rb).max(lay.l1) / CS) + 1;
        if !used_before {
            poke(&p, rb + 2 * c, &0u16.to_be_bytes());
        }
    }
    let inc = u64::from_be_bytes(b[72..80].try_into().unwrap()) | 1;
    poke(&p, 72, &inc.to_be_bytes());
}

#[test]
fn crashed_lazy_refcount_image() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    crashed_lazy(d, "l.qcow2");
    assert_eq!(check_same(d, "l.qcow2"), 2);
    let before = qemu_raw(d, "l.qcow2", None);
    repair_same(d, "l.qcow2", true);
    let info = json(&ok(qemu_img(d, &["info", "--output=json", "d-l.qcow2"])));
    assert_eq!(info["dirty-flag"], false);
    assert!(qemu_raw(d, "d-l.qcow2", None) == before);
    // opening the dirty image for writing repairs it first, as qemu does
    crashed_lazy(d, "w.qcow2");
    {
        let img = diskit::open(
            d.join("w.qcow2").to_str().unwrap(),
            &OpenOptions::read_write(),
        )
        .unwrap();
        img.write_at(&[7u8; 4096], 3 << 20).unwrap();
        img.close().unwrap();
    }
    let out = qemu_img(d, &["check", "w.qcow2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut expect = before.clone();
    expect[3 << 20..(3 << 20) + 4096].fill(7);
    assert!(qemu_raw(d, "w.qcow2", None) == expect);
}

#[test]
fn corrupt_bit_cleared_by_repair() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "a.qcow2", &[]);
    let a = d.join("a.qcow2");
    let b = std::fs::read(&a).unwrap();
    let inc = rd64(&b, 72) | 2;
    poke(&a, 72, &inc.to_be_bytes());
    assert_eq!(check_same(d, "a.qcow2"), 0);
    std::fs::copy(&a, d.join("d.qcow2")).unwrap();
    let (_, dd) = same_effect_as_qemu(d, &["a.qcow2"], &["check", "-r", "all", "a.qcow2"]);
    let info = json(&ok(qemu_img(&dd, &["info", "--output=json", "a.qcow2"])));
    assert_eq!(info["format-specific"]["data"]["corrupt"], false);
}

/// Every prefix of a repair's writes leaves an image that qemu-img finds no worse than
/// before, with the same intact data.
#[test]
fn repair_is_crash_safe() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "a.qcow2", &[]);
    let a = d.join("a.qcow2");
    let lay = layout(&a);
    let e0 = l2_entry(&a, 0);
    let host0 = e0 & 0x00ff_ffff_ffff_fe00;
    // two damages: a zero refcount (forces a rebuild) and a doubly referenced cluster
    let mut damaged = Vec::new();
    for (i, f) in [
        Box::new(|p: &Path| poke(p, lay.rb + 2 * (host0 / CS), &0u16.to_be_bytes()))
            as Box<dyn Fn(&Path)>,
        Box::new(|p: &Path| poke(p, lay.l2 + 8, &e0.to_be_bytes())),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("dmg{i}.qcow2");
        std::fs::copy(&a, d.join(&name)).unwrap();
        f(&d.join(&name));
        damaged.push(name);
    }
    // Refcounts too low (a cluster in use that could be handed out again) are what loses
    // data; their number must never grow. (Raising a refcount before the OFLAG_COPIED
    // flags follow makes qemu count flag errors for a moment: that state is no less safe
    // than the one before, where the same flags were as wrong for the true refcount.)
    let corruptions = |dir: &Path, f: &str| -> u64 {
        let o = qemu_img(dir, &["check", f]);
        stderr(&o)
            .lines()
            .filter(|l| l.starts_with("ERROR cluster") || l.starts_with("ERROR: counting"))
            .count() as u64
    };
    for name in &damaged {
        let before_c = corruptions(d, name);
        let before_data = qemu_raw(d, name, None);
        // count the operations of a full repair
        let total = {
            std::fs::copy(d.join(name), d.join("probe.qcow2")).unwrap();
            let inj = Arc::new(FaultInjector::new(u64::MAX, FaultMode::StopWrites));
            run_repair(&d.join("probe.qcow2"), inj.clone());
            inj.count()
        };
        assert!(total > 2, "repair of {name} did nothing");
        for n in 0..total {
            let f = format!("crash{n}.qcow2");
            std::fs::copy(d.join(name), d.join(&f)).unwrap();
            let inj = Arc::new(FaultInjector::new(n, FaultMode::StopWrites));
            run_repair(&d.join(&f), inj);
            let after = corruptions(d, &f);
            assert!(
                after <= before_c,
                "{name}: crash after {n} ops: {after} corruptions, {before_c} before"
            );
            assert!(
                qemu_raw(d, &f, None) == before_data,
                "{name}: data changed after crash at {n}"
            );
            std::fs::remove_file(d.join(&f)).unwrap();
        }
    }
}

fn run_repair(path: &Path, inj: Arc<FaultInjector>) {
    let img = diskit::open(
        path.to_str().unwrap(),
        &OpenOptions {
            write: true,
            no_backing: true,
            check: true,
            faults: Some(inj),
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let _ = img.check(Some(RepairMode::All));
    drop(img);
}

/// Random byte corruption of metadata: check never panics or hangs, and never says
/// "clean" (or only leaks) where qemu-img finds corruption.
#[test]
fn fuzz_metadata_corruption() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "a.qcow2", &["-o", "cluster_size=4096"]);
    ok(qemu_img(d, &["snapshot", "-c", "s1", "a.qcow2"]));
    ok(qemu_io(d, "qcow2", "a.qcow2", &["write -P 3 8k 8k"]));
    let a = d.join("a.qcow2");
    let orig = std::fs::read(&a).unwrap();
    let lay = layout(&a);
    let snap_off = rd64(&orig, 64);
    let regions = [
        (40u64, 32u64),
        (lay.rt, 64),
        (lay.rb, 64),
        (lay.l1, 16),
        (lay.l2, 512),
        (snap_off, 64),
    ];
    for seed in 0..60u64 {
        let mut img = orig.clone();
        let rnd = pattern(64, seed + 1);
        let nflip = 1 + (rnd[0] % 4) as usize;
        for k in 0..nflip {
            let (ro, rl) = regions[(rnd[1 + k] as usize) % regions.len()];
            let off = ro + (u16::from_le_bytes([rnd[8 + k * 2], rnd[9 + k * 2]]) as u64 % rl);
            if (off as usize) < img.len() {
                img[off as usize] ^= rnd[20 + k] | 1;
            }
        }
        let f = format!("f{seed}.qcow2");
        std::fs::write(d.join(&f), &img).unwrap();
        let q = qemu_img(d, &["check", &f]);
        let start = std::time::Instant::now();
        let o = diskit(d, &["check", &f]);
        assert!(
            start.elapsed().as_secs() < 20,
            "seed {seed}: check too slow"
        );
        let code = o.status.code();
        assert!(
            matches!(code, Some(0..=3)),
            "seed {seed}: diskit check exit {code:?}: {}",
            stderr(&o)
        );
        if q.status.code() == Some(2) {
            assert!(
                matches!(code, Some(1) | Some(2)),
                "seed {seed}: qemu says corrupt, diskit exit {code:?}\n{}",
                stderr(&q)
            );
        }
        // a repair never panics either
        let r = diskit(d, &["check", "-r", "all", &f]);
        assert!(
            matches!(r.status.code(), Some(0..=3)),
            "seed {seed}: repair exit {:?}: {}",
            r.status.code(),
            stderr(&r)
        );
        std::fs::remove_file(d.join(&f)).unwrap();
    }
}

/// `-r all` makes a preallocated zero cluster at an unaligned host offset a plain zero
/// cluster (its cluster then leaks and is freed), with and without subclusters, as qemu-img
/// repairs it and in its words (iotest 271).
#[test]
fn unaligned_preallocated_cluster_is_repaired_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    for ext in ["off", "on"] {
        let opt = format!("extended_l2={ext}");
        let _ = std::fs::remove_file(d.join("p.qcow2"));
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", &opt, "p.qcow2", "1M"],
        ));
        ok(qemu_io(
            d,
            "qcow2",
            "p.qcow2",
            &["write -P 1 0 64k", "write -z 0 64k"],
        ));
        let p = d.join("p.qcow2");
        let e = l2_entry(&p, 0);
        assert_ne!(e & 0x00ff_ffff_ffff_fe00, 0, "a preallocated zero cluster");
        poke(&p, layout(&p).l2, &(e + 0x200).to_be_bytes());
        let (_, dd) = same_effect_as_qemu(d, &["p.qcow2"], &["check", "-r", "all", "p.qcow2"]);
        ok(qemu_img(&dd, &["check", "p.qcow2"]));
    }
}

/// Snapshot IDs and names end at a NUL, as qemu reads them (C strings; iotest 261 fills
/// them with NULs): `snapshot -l`, `info` and `check` show them so.
#[test]
fn snapshot_names_end_at_a_nul_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "n.qcow2", &[]);
    ok(qemu_img(d, &["snapshot", "-c", "abcdef", "n.qcow2"]));
    let p = d.join("n.qcow2");
    let off = snapshot_entries(&p)[0];
    let b = std::fs::read(&p).unwrap();
    let extra = u32::from_be_bytes(b[off as usize + 36..off as usize + 40].try_into().unwrap());
    let id_len = u16::from_be_bytes([b[off as usize + 12], b[off as usize + 13]]) as u64;
    // "ab\0def"
    poke(&p, off + 40 + extra as u64 + id_len + 2, &[0]);
    for args in [
        &["snapshot", "-l", "n.qcow2"][..],
        &["info", "n.qcow2"],
        &["info", "--output=json", "n.qcow2"],
        &["check", "n.qcow2"],
    ] {
        same_as_qemu(d, args);
    }
    assert!(stdout(&ok(diskit(d, &["snapshot", "-l", "n.qcow2"]))).contains(" ab "));
}

/// `-r all` cuts a snapshot table entry's extra data of 64 KiB to 1 KiB and writes the
/// table anew (the refcount check, which counted the old table whole, rebuilds first), in
/// qemu-img's words and order (iotest 261); the image checks clean afterwards and keeps its
/// snapshots as qemu-img's repair keeps them.
#[test]
fn oversized_snapshot_extra_data_is_cut_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    base(d, "s.qcow2", &[]);
    for sn in ["sn0", "sn1"] {
        ok(qemu_img(d, &["snapshot", "-c", sn, "s.qcow2"]));
    }
    let p = d.join("s.qcow2");
    let off = *snapshot_entries(&p).last().unwrap();
    poke(&p, off + 36, &0x10000u32.to_be_bytes());
    same_as_qemu(d, &["check", "s.qcow2"]);
    let (qd, dd) = (d.join("q"), d.join("d"));
    for dir in [&qd, &dd] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(&p, dir.join("s.qcow2")).unwrap();
    }
    let args = ["check", "-r", "all", "s.qcow2"];
    let (q, k) = (qemu_img(&qd, &args), diskit_as_qemu(&dd, &args));
    assert_eq!(stderr(&k), stderr(&q));
    assert_eq!(k.status.code(), q.status.code());
    // the rebuilt refcount structure lies elsewhere (diskit appends it to the file, qemu
    // fills the first free cluster): the image end offset differs, nothing else
    let summary = |o: &std::process::Output| {
        stdout(o)
            .lines()
            .filter(|l| !l.starts_with("Image end offset"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(summary(&k), summary(&q));
    assert!(qemu_raw(&dd, "s.qcow2", None) == qemu_raw(&qd, "s.qcow2", None));
    ok(qemu_img(&dd, &["check", "s.qcow2"]));
    // both snapshots stay (the cut entry's ID and name lay beyond its 64 KiB: empty now)
    let list = |dir: &Path| stdout(&ok(qemu_img(dir, &["snapshot", "-l", "s.qcow2"])));
    assert_eq!(list(&dd), list(&qd));
    assert_eq!(list(&dd).lines().count(), 4);
}

/// A snapshot whose L1 table offset or size is invalid does not stop the image from
/// opening (qemu checks a snapshot's L1 table where it is used): `info` and `check` work,
/// and loading, applying, deleting it or downgrading fail with qemu-img's messages (iotest
/// 080). A snapshot table beyond the end of the file reads as zeroes, and a full table
/// refuses one more snapshot as qemu-img does.
#[test]
fn broken_snapshot_l1_tables_fail_where_used_like_qemu() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    for (field, value) in [
        (0u64, 0x40_0200u64.to_be_bytes().to_vec()),
        (8, 0x1000_0000u32.to_be_bytes().to_vec()),
    ] {
        let _ = std::fs::remove_file(d.join("b.qcow2"));
        base(d, "b.qcow2", &[]);
        ok(qemu_img(d, &["snapshot", "-c", "test", "b.qcow2"]));
        let p = d.join("b.qcow2");
        let off = snapshot_entries(&p)[0];
        poke(&p, off + field, &value);
        same_as_qemu(d, &["info", "b.qcow2"]);
        same_as_qemu(d, &["check", "b.qcow2"]);
        same_as_qemu(d, &["convert", "-l", "test", "b.qcow2", "out.raw"]);
        for args in [
            &["snapshot", "-a", "test", "b.qcow2"][..],
            &["snapshot", "-d", "test", "b.qcow2"],
            &["amend", "-o", "compat=0.10", "b.qcow2"],
        ] {
            same_effect_as_qemu(d, &["b.qcow2"], args);
        }
    }
    // 65536 snapshots said to be at 16 MiB, beyond the end of the file
    base(d, "f.qcow2", &[]);
    let p = d.join("f.qcow2");
    poke(&p, 60, &0x1_0000u32.to_be_bytes());
    poke(&p, 64, &0x100_0000u64.to_be_bytes());
    same_effect_as_qemu(d, &["f.qcow2"], &["snapshot", "-c", "test", "f.qcow2"]);
}
