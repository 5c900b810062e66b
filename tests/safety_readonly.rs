//! Read-only verbs never touch their inputs: `diskit info` and the source side of
//! `diskit convert` leave every input file byte-for-byte the same, with the same size,
//! allocation, mtime and ctime. Also: a command that would overwrite an image another process
//! holds open fails without destroying it (qemu-img takes the lock before truncating).

mod common;
use common::*;

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What must not change about an input file.
#[derive(Debug, PartialEq, Eq)]
struct FileState {
    len: u64,
    digest: u64,
    blocks: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
    ino: u64,
}

fn state(path: &Path) -> FileState {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut h = DefaultHasher::new();
    h.write(&data);
    let m = std::fs::metadata(path).unwrap();
    FileState {
        len: m.len(),
        digest: h.finish(),
        blocks: m.blocks(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        mode: m.mode(),
        ino: m.ino(),
    }
}

/// Snapshots `inputs` (names in `dir`), runs every command of `cmds` with diskit, and asserts
/// after each that no input changed. Returns the outputs.
fn untouched_by(dir: &Path, inputs: &[&str], cmds: &[&[&str]]) -> Vec<std::process::Output> {
    let before: Vec<FileState> = inputs.iter().map(|f| state(&dir.join(f))).collect();
    // mtime granularity: make any write show up as a later timestamp
    std::thread::sleep(std::time::Duration::from_millis(20));
    let mut outs = Vec::new();
    for args in cmds {
        let out = diskit(dir, args);
        for (f, b) in inputs.iter().zip(&before) {
            let after = state(&dir.join(f));
            assert_eq!(
                &after,
                b,
                "`diskit {}` changed input {f}\nstdout: {}\nstderr: {}",
                args.join(" "),
                stdout(&out),
                stderr(&out)
            );
        }
        outs.push(out);
    }
    outs
}

/// A raw image with data, explicit zeroes and a hole, written without qemu.
fn make_raw(dir: &Path, name: &str, seed: u64) {
    let mut data = pattern(3 << 20, seed);
    data[1 << 20..(1 << 20) + (256 << 10)].fill(0);
    std::fs::write(dir.join(name), &data).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(name))
        .unwrap();
    f.set_len(8 << 20).unwrap(); // a 5 MiB hole at the end
}

#[test]
fn info_leaves_raw_untouched() {
    let dir = tmpdir();
    let d = dir.path();
    make_raw(d, "a.raw", 1);
    std::fs::write(d.join("tiny.raw"), b"x").unwrap();
    let outs = untouched_by(
        d,
        &["a.raw", "tiny.raw"],
        &[
            &["info", "a.raw"],
            &["info", "--output=json", "a.raw"],
            &["info", "-f", "raw", "a.raw"],
            &["info", "--backing-chain", "a.raw"],
            &["info", "-U", "a.raw"],
            &["info", "tiny.raw"],
            // error paths touch nothing either
            &["info", "-f", "qcow2", "a.raw"],
            &["info", "-f", "vdi", "tiny.raw"],
        ],
    );
    assert!(outs[0].status.success(), "{}", stderr(&outs[0]));
    assert!(stdout(&outs[0]).contains("virtual size: 8 MiB"));
    assert!(!outs[6].status.success(), "raw opened as qcow2");
}

#[test]
fn convert_leaves_raw_source_untouched() {
    let dir = tmpdir();
    let d = dir.path();
    make_raw(d, "a.raw", 2);
    make_raw(d, "b.raw", 3);
    std::fs::write(d.join("pre.raw"), vec![0xee; 8 << 20]).unwrap();
    std::fs::create_dir(d.join("ro")).unwrap();
    let outs = untouched_by(
        d,
        &["a.raw", "b.raw"],
        &[
            &["convert", "a.raw", "o1.raw"],
            &[
                "convert", "-f", "raw", "-O", "raw", "-S", "0", "a.raw", "o2.raw",
            ],
            &["convert", "-m", "1", "a.raw", "o3.raw"],
            &["convert", "-m", "8", "-W", "-O", "raw", "a.raw", "o4.raw"],
            &["convert", "-n", "-O", "raw", "a.raw", "pre.raw"],
            &["convert", "-O", "raw", "a.raw", "b.raw", "cat.raw"],
            &["convert", "-U", "-O", "raw", "a.raw", "o5.raw"],
            // failures on the target side
            &["convert", "-O", "raw", "a.raw", "no/such/dir/x.raw"],
            &["convert", "-O", "raw", "a.raw", "ro"],
        ],
    );
    for o in &outs[..7] {
        ok(o.clone());
    }
    assert!(!outs[7].status.success());
    assert!(!outs[8].status.success());
    let a = std::fs::read(d.join("a.raw")).unwrap();
    for out in ["o1.raw", "o2.raw", "o3.raw", "o4.raw", "o5.raw", "pre.raw"] {
        assert!(std::fs::read(d.join(out)).unwrap() == a, "{out} differs");
    }
    let mut cat = a.clone();
    cat.extend(std::fs::read(d.join("b.raw")).unwrap());
    assert!(std::fs::read(d.join("cat.raw")).unwrap() == cat);
}

/// `convert a a` must not destroy `a` (qemu-img fails on the write lock before truncating).
#[test]
fn convert_onto_its_own_source_keeps_it() {
    let dir = tmpdir();
    let d = dir.path();
    make_raw(d, "a.raw", 4);
    std::os::unix::fs::symlink("a.raw", d.join("link.raw")).unwrap();
    let before = std::fs::read(d.join("a.raw")).unwrap();
    for args in [
        &["convert", "-O", "raw", "a.raw", "a.raw"][..],
        &["convert", "-O", "raw", "a.raw", "./a.raw"],
        &["convert", "-O", "raw", "link.raw", "a.raw"],
        &["convert", "-n", "-O", "raw", "a.raw", "a.raw"],
    ] {
        let out = diskit(d, args);
        assert!(
            !out.status.success(),
            "`diskit {}` succeeded",
            args.join(" ")
        );
        assert!(
            std::fs::read(d.join("a.raw")).unwrap() == before,
            "`diskit {}` destroyed its source: {}",
            args.join(" "),
            stderr(&out)
        );
    }
}

/// An image held open by another process (a running VM) survives `create` and `convert`
/// over it: both fail on the lock, as qemu-img does.
#[test]
fn image_in_use_is_not_overwritten() {
    let dir = tmpdir();
    let d = dir.path();
    make_raw(d, "vm.raw", 5);
    make_raw(d, "other.raw", 6);
    let before = state(&d.join("vm.raw"));
    let held = diskit::open(
        d.join("vm.raw").to_str().unwrap(),
        &diskit::OpenOptions::read_write().with_format(Some(diskit::Format::Raw)),
    )
    .unwrap();
    for args in [
        &["create", "-f", "raw", "vm.raw", "1M"][..],
        &["convert", "-O", "raw", "other.raw", "vm.raw"],
        // (`convert -n` into a raw image in use succeeds with qemu-img too: not tested here)
    ] {
        let out = diskit(d, args);
        assert!(
            !out.status.success(),
            "`diskit {}` succeeded on an image in use",
            args.join(" ")
        );
        assert!(
            stderr(&out).contains("lock"),
            "`diskit {}`: {}",
            args.join(" "),
            stderr(&out)
        );
        assert_eq!(
            state(&d.join("vm.raw")),
            before,
            "`diskit {}` changed an image in use",
            args.join(" ")
        );
    }
    drop(held);
}

#[test]
fn qemu_made_raw_untouched() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(d, &["create", "-q", "-f", "raw", "q.raw", "4M"]));
    ok(qemu_io(
        d,
        "raw",
        "q.raw",
        &[
            "write -P 0xab 0 64k",
            "write -z 1M 64k",
            "write -P 0x11 3M 4k",
        ],
    ));
    let outs = untouched_by(
        d,
        &["q.raw"],
        &[
            &["info", "--output=json", "q.raw"],
            &["convert", "-O", "raw", "q.raw", "out.raw"],
        ],
    );
    ok(outs[1].clone());
    assert!(std::fs::read(d.join("out.raw")).unwrap() == qemu_raw(d, "q.raw", Some("raw")));
}

// ---- qcow2 (and the other formats) made by qemu-img ------------------------------------------

/// Makes the qcow2 images of the qcow2 tests and returns their names. `base.qcow2` is the
/// backing file of `overlay.qcow2`; `dirty.qcow2` has the dirty bit set.
fn make_qcow2_set(d: &Path) -> Vec<&'static str> {
    let data = [
        "write -P 0xaa 0 64k",
        "write -z 128k 64k",
        "write -P 0x55 1M 4k",
    ];
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "v3.qcow2", "2M"],
    ));
    ok(qemu_io(d, "qcow2", "v3.qcow2", &data));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4k",
            "v2.qcow2",
            "2M",
        ],
    ));
    ok(qemu_io(d, "qcow2", "v2.qcow2", &data));
    std::fs::write(
        d.join("text.raw"),
        "diskit safety test line\n".repeat(40_000),
    )
    .unwrap();
    ok(qemu_img(
        d,
        &["convert", "-c", "-O", "qcow2", "text.raw", "zlib.qcow2"],
    ));
    ok(qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "text.raw",
            "zstd.qcow2",
        ],
    ));
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "2M"],
    ));
    ok(qemu_io(d, "qcow2", "base.qcow2", &["write -P 0x01 0 2M"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "overlay.qcow2",
        ],
    ));
    ok(qemu_io(
        d,
        "qcow2",
        "overlay.qcow2",
        &["write -P 0x02 64k 64k", "write -z 1M 4k"],
    ));
    // a snapshot: the active layer differs from it
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "snap.qcow2", "2M"],
    ));
    ok(qemu_io(d, "qcow2", "snap.qcow2", &["write -P 0x31 0 64k"]));
    ok(qemu_img(d, &["snapshot", "-c", "s1", "snap.qcow2"]));
    ok(qemu_io(d, "qcow2", "snap.qcow2", &["write -P 0x32 0 4k"]));
    // dirty: lazy refcounts and a crash (qemu-io's abort) leave the dirty bit set; a
    // read-only open must not repair it
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "2M",
        ],
    ));
    let _ = qemu_io(d, "qcow2", "dirty.qcow2", &["write -P 0x41 0 64k", "abort"]);
    let info = json(&qemu_img(
        d,
        &["info", "--output=json", "-U", "dirty.qcow2"],
    ));
    assert_eq!(info["dirty-flag"], true, "qemu-io abort left a clean image");
    vec![
        "v3.qcow2",
        "v2.qcow2",
        "zlib.qcow2",
        "zstd.qcow2",
        "base.qcow2",
        "overlay.qcow2",
        "snap.qcow2",
        "dirty.qcow2",
    ]
}

#[test]
fn info_leaves_qcow2_untouched() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let images = make_qcow2_set(d);
    let mut cmds: Vec<Vec<&str>> = Vec::new();
    for img in &images {
        cmds.push(vec!["info", img]);
        cmds.push(vec!["info", "--output=json", img]);
        cmds.push(vec!["info", "-f", "qcow2", "--backing-chain", img]);
        cmds.push(vec!["info", "-U", img]);
        cmds.push(vec!["info", "-f", "raw", img]);
    }
    let refs: Vec<&[&str]> = cmds.iter().map(|c| c.as_slice()).collect();
    let outs = untouched_by(d, &images, &refs);
    for (c, o) in cmds.iter().zip(&outs) {
        assert!(
            o.status.success(),
            "`diskit {}`: {}",
            c.join(" "),
            stderr(o)
        );
    }
    let dirty = json(&diskit(d, &["info", "--output=json", "dirty.qcow2"]));
    assert_eq!(
        dirty["dirty-flag"], true,
        "diskit info repaired or hid the dirty flag"
    );
}

#[test]
fn convert_leaves_qcow2_source_untouched() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let images = make_qcow2_set(d);
    let mut cmds: Vec<Vec<String>> = Vec::new();
    for img in &images {
        let stem = img.trim_end_matches(".qcow2");
        cmds.push(strings(&[
            "convert",
            "-O",
            "raw",
            img,
            &format!("{stem}.out.raw"),
        ]));
        cmds.push(strings(&[
            "convert",
            "-f",
            "qcow2",
            "-m",
            "4",
            "-W",
            "-O",
            "raw",
            img,
            &format!("{stem}.outw.raw"),
        ]));
        cmds.push(strings(&[
            "convert",
            "-s",
            "s1",
            "-O",
            "raw",
            img,
            &format!("{stem}.s1.raw"),
        ]));
    }
    cmds.push(strings(&[
        "convert",
        "-O",
        "qcow2",
        "v3.qcow2",
        "v3.copy.qcow2",
    ]));
    cmds.push(strings(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "v3.qcow2",
        "v3.c.qcow2",
    ]));
    cmds.push(strings(&[
        "convert",
        "-O",
        "qcow2",
        "-B",
        "base.qcow2",
        "-F",
        "qcow2",
        "overlay.qcow2",
        "ov.copy.qcow2",
    ]));
    let owned: Vec<Vec<&str>> = cmds
        .iter()
        .map(|c| c.iter().map(|s| s.as_str()).collect())
        .collect();
    let refs: Vec<&[&str]> = owned.iter().map(|c| c.as_slice()).collect();
    let outs = untouched_by(d, &images, &refs);
    // the plain conversions succeed and read what qemu reads (the `-s s1` ones may fail
    // where the image has no such snapshot, and touch nothing either way)
    for (c, o) in owned.iter().zip(&outs) {
        if !c.contains(&"-s") {
            assert!(
                o.status.success(),
                "`diskit {}`: {}",
                c.join(" "),
                stderr(o)
            );
        }
    }
    for img in &images {
        let stem = img.trim_end_matches(".qcow2");
        let want = qemu_raw(d, img, Some("qcow2"));
        for out in [format!("{stem}.out.raw"), format!("{stem}.outw.raw")] {
            assert!(
                std::fs::read(d.join(&out)).unwrap() == want,
                "{out} differs from qemu's view of {img}"
            );
        }
    }
}

/// vmdk and vdi images made by qemu-img: info and convert leave them untouched.
#[test]
fn vmdk_and_vdi_sources_untouched() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let data = ["write -P 0xaa 0 64k", "write -P 0x55 1M 4k"];
    for (img, fmt, opts) in [
        ("sparse.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("dyn.vdi", "vdi", "static=off"),
    ] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", fmt, "-o", opts, img, "2M"],
        ));
        ok(qemu_io(d, fmt, img, &data));
    }
    std::fs::write(d.join("t.raw"), pattern(2 << 20, 9)).unwrap();
    ok(qemu_img(
        d,
        &[
            "convert",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "t.raw",
            "stream.vmdk",
        ],
    ));
    let images = ["sparse.vmdk", "dyn.vdi", "stream.vmdk"];
    let outs = untouched_by(
        d,
        &images,
        &[
            &["info", "sparse.vmdk"],
            &["info", "--output=json", "dyn.vdi"],
            &["info", "stream.vmdk"],
            &["convert", "-O", "raw", "sparse.vmdk", "a.out"],
            &["convert", "-O", "raw", "dyn.vdi", "b.out"],
            &["convert", "-O", "raw", "stream.vmdk", "c.out"],
        ],
    );
    for o in outs {
        ok(o);
    }
    for (img, out) in [
        ("sparse.vmdk", "a.out"),
        ("dyn.vdi", "b.out"),
        ("stream.vmdk", "c.out"),
    ] {
        assert!(
            std::fs::read(d.join(out)).unwrap() == qemu_raw(d, img, None),
            "{img}"
        );
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The other read-only verbs (`check` without -r, `map`, `compare`, `measure`, and `dd`'s
/// input side) leave every input of every format alone, dirty and damaged images included.
#[test]
fn read_only_verbs_leave_inputs_untouched() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let mut images: Vec<String> = make_qcow2_set(d).iter().map(|s| s.to_string()).collect();
    let data = ["write -P 0xaa 0 64k", "write -P 0x55 1M 4k"];
    for (img, fmt, opts) in [
        ("sparse.vmdk", "vmdk", "subformat=monolithicSparse"),
        ("dyn.vdi", "vdi", "static=off"),
    ] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", fmt, "-o", opts, img, "2M"],
        ));
        ok(qemu_io(d, fmt, img, &data));
        images.push(img.to_string());
    }
    // a leaked cluster: check reports it and must not fix it. The refcount of a cluster
    // past the last one in use is set to 1 (16-bit refcounts, first refcount block).
    std::fs::copy(d.join("v3.qcow2"), d.join("leak.qcow2")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.join("leak.qcow2"))
            .unwrap();
        let be64 = |off: u64| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, off).unwrap();
            u64::from_be_bytes(b)
        };
        let rt = be64(48);
        let rb = be64(rt);
        let len = f.metadata().unwrap().len();
        let leaked = len.div_ceil(65536);
        f.write_all_at(&1u16.to_be_bytes(), rb + 2 * leaked)
            .unwrap();
        f.set_len((leaked + 1) * 65536).unwrap();
    }
    images.push("leak.qcow2".into());
    images.push("text.raw".into());
    let mut cmds: Vec<Vec<String>> = Vec::new();
    for img in &images {
        let i = img.as_str();
        cmds.push(strings(&["check", i]));
        cmds.push(strings(&["check", "--output=json", i]));
        cmds.push(strings(&["map", i]));
        cmds.push(strings(&["map", "--output=json", i]));
        cmds.push(strings(&["compare", i, i]));
        cmds.push(strings(&["compare", "-s", i, "v3.qcow2"]));
        cmds.push(strings(&["measure", "-O", "qcow2", i]));
        cmds.push(strings(&["measure", "--output=json", "-O", "raw", i]));
        let out = format!("dd-{}.raw", i.replace('.', "-"));
        cmds.push(vec![
            "dd".into(),
            "-O".into(),
            "raw".into(),
            format!("if={i}"),
            format!("of={out}"),
            "bs=64k".into(),
            "count=8".into(),
        ]);
    }
    cmds.push(strings(&[
        "convert",
        "-l",
        "s1",
        "-O",
        "raw",
        "snap.qcow2",
        "s1.raw",
    ]));
    cmds.push(strings(&[
        "measure",
        "-l",
        "s1",
        "-O",
        "qcow2",
        "snap.qcow2",
    ]));
    let refs: Vec<Vec<&str>> = cmds
        .iter()
        .map(|c| c.iter().map(String::as_str).collect())
        .collect();
    let refs: Vec<&[&str]> = refs.iter().map(|c| c.as_slice()).collect();
    let inputs: Vec<&str> = images.iter().map(String::as_str).collect();
    let outs = untouched_by(d, &inputs, &refs);
    // the verbs really ran: each exits as qemu-img does on the same input
    for (c, o) in cmds.iter().zip(&outs) {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        let q = qemu_img(d, &args);
        assert_eq!(
            o.status.code(),
            q.status.code(),
            "`diskit {}`: {}\nqemu-img: {}",
            c.join(" "),
            stderr(o),
            stderr(&q)
        );
    }
    // the leak is still there for `check -r` to find
    let o = diskit(d, &["check", "leak.qcow2"]);
    assert_eq!(o.status.code(), Some(3), "{}", stdout(&o));
}
