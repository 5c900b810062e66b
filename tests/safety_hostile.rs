//! Hostile images without a fuzzer: deterministic mutations (truncations, header bytes set to
//! edge values, 64-bit words overwritten anywhere) of small qemu-made qcow2, vmdk and vdi
//! images go through the fuzz targets' own harness (`fuzz/src/lib.rs`: open read-only,
//! `info()`, `map()` over the guest, bounded reads). Any panic, or an input taking longer than
//! a few seconds, fails the test and names the mutation. Inputs saved by fuzzing under
//! `tests/fuzz_regressions/<target>/` are replayed the same way.

mod common;
use common::*;

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use diskit::{Format, OpenOptions};

/// One input may take this long (open, info, map walk, 4 MiB of reads) before it counts as a
/// hang. Generous: debug builds and a busy machine.
const INPUT_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `f` on a thread; panics (naming `what`) if it panics or outlives [`INPUT_TIMEOUT`].
fn guarded(what: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(INPUT_TIMEOUT) {
        Ok(()) => h.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let e = h.join().unwrap_err();
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{what}: panicked: {msg}");
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {INPUT_TIMEOUT:?} (endless loop?)")
        }
    }
}

/// Writes `data` to `path`, opens it (format forced or probed) and exercises it. Returns
/// whether it opened.
fn exercise(path: &Path, data: &[u8], format: Option<Format>, what: &str) -> bool {
    // a new file each time: rewriting a truncated file makes ext4 flush it on close
    let _ = std::fs::remove_file(path);
    std::fs::write(path, data).unwrap();
    let p = path.to_str().unwrap().to_string();
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let o = opened.clone();
    guarded(what, move || {
        let opts = OpenOptions::read_only().with_format(format);
        if let Ok(img) = diskit::open(&p, &opts) {
            o.store(true, std::sync::atomic::Ordering::Relaxed);
            harness::exercise_driver(img.as_ref());
        }
    });
    opened.load(std::sync::atomic::Ordering::Relaxed)
}

/// Deterministic mutations of `img`: (description, bytes).
fn mutations(img: &[u8], seed: u64) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // truncations
    for cut in [0, 1, 4, 8, 16, 64, 100, 511, 512, 1024, 4096, 65536, 65537] {
        if cut < img.len() {
            out.push((format!("truncated to {cut}"), img[..cut].to_vec()));
        }
    }
    out.push((
        format!("truncated to {}", img.len() / 2),
        img[..img.len() / 2].to_vec(),
    ));
    // every header byte (first 512) set to edge values (fewer for big images: each
    // mutation writes the whole file)
    let values: &[u8] = if img.len() > 256 << 10 {
        &[0x00, 0xff]
    } else {
        &[0x00, 0xff, 0x80, 0x01]
    };
    for pos in 0..img.len().min(512) {
        for &v in values {
            if img[pos] != v {
                let mut m = img.to_vec();
                m[pos] = v;
                out.push((format!("byte {pos:#x} = {v:#04x}"), m));
            }
        }
    }
    // 64-bit words anywhere (tables, descriptors) set to edge values, big and little endian
    let rnd = pattern(8 * 192, seed);
    for (i, w) in rnd.chunks(8).enumerate() {
        let pos = (u64::from_le_bytes(w.try_into().unwrap()) % img.len() as u64) as usize & !7;
        if pos + 8 > img.len() {
            continue;
        }
        let v: u64 = match i % 6 {
            0 => u64::MAX,
            1 => 1 << 63,
            2 => 0x0000_00ff_ffff_fe00,
            3 => 1,
            4 => img.len() as u64 * 4,
            _ => 0,
        };
        let mut m = img.to_vec();
        if i % 2 == 0 {
            m[pos..pos + 8].copy_from_slice(&v.to_be_bytes());
        } else {
            m[pos..pos + 8].copy_from_slice(&v.to_le_bytes());
        }
        out.push((format!("u64 at {pos:#x} = {v:#x} ({})", i % 2), m));
    }
    out
}

/// Mutates every image of `images` (made in `dir`) and exercises each mutation with the format
/// forced and probed.
fn run_mutations(dir: &Path, images: &[(&str, Format)]) {
    let target = dir.join("img");
    let mut n = 0;
    for (i, (name, fmt)) in images.iter().enumerate() {
        let img = std::fs::read(dir.join(name)).unwrap();
        assert!(
            exercise(&target, &img, Some(*fmt), name),
            "{name} does not open unmutated"
        );
        let mut opened = 0;
        let muts = mutations(&img, i as u64 + 1);
        let total = muts.len();
        for (k, (what, data)) in muts.into_iter().enumerate() {
            let what = format!("{name}: {what}");
            opened += exercise(&target, &data, Some(*fmt), &what) as usize;
            if k % 4 == 0 {
                let _ = exercise(&target, &data, None, &format!("{what} (probed)"));
            }
            n += 1;
        }
        // most header bytes are padding or values a driver accepts: if almost nothing opens,
        // the mutations no longer reach past the header checks
        assert!(
            opened * 10 > total,
            "{name}: only {opened} of {total} mutations open"
        );
        eprintln!("{name}: {opened} of {total} mutations open");
    }
    assert!(n > 500 * images.len(), "only {n} mutations");
}

#[test]
fn mutated_qcow2_images_are_handled() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    let data = [
        "write -P 0xaa 0 4k",
        "write -z 64k 4k",
        "write -P 0x55 900k 8k",
    ];
    for (name, opts) in [
        ("v3.qcow2", "cluster_size=4k"),
        ("v2.qcow2", "cluster_size=4k,compat=0.10"),
        ("extl2.qcow2", "cluster_size=16k,extended_l2=on"),
    ] {
        ok(qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", opts, name, "1M"],
        ));
        ok(qemu_io(d, "qcow2", name, &data));
    }
    std::fs::write(d.join("t.raw"), "hostile qcow2 test line\n".repeat(5000)).unwrap();
    ok(qemu_img(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "t.raw",
            "z.qcow2",
        ],
    ));
    ok(qemu_img(d, &["snapshot", "-c", "s", "v3.qcow2"]));
    run_mutations(
        d,
        &[
            ("v3.qcow2", Format::Qcow2),
            ("v2.qcow2", Format::Qcow2),
            ("extl2.qcow2", Format::Qcow2),
            ("z.qcow2", Format::Qcow2),
        ],
    );
}

#[test]
fn mutated_vmdk_images_are_handled() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "vmdk", "sparse.vmdk", "1M"],
    ));
    ok(qemu_io(
        d,
        "vmdk",
        "sparse.vmdk",
        &["write -P 0xaa 0 4k", "write -P 0x55 900k 8k"],
    ));
    std::fs::write(d.join("t.raw"), "hostile vmdk test line\n".repeat(5000)).unwrap();
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
    // a descriptor whose extents name the image itself ("img", the harness's file name)
    std::fs::write(
        d.join("desc.vmdk"),
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\nRW 2 FLAT \"img\" 0\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"1\"\n\
         ddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\n",
    )
    .unwrap();
    run_mutations(
        d,
        &[
            ("sparse.vmdk", Format::Vmdk),
            ("stream.vmdk", Format::Vmdk),
            ("desc.vmdk", Format::Vmdk),
        ],
    );
}

#[test]
fn mutated_vdi_images_are_handled() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(d, &["create", "-q", "-f", "vdi", "dyn.vdi", "3M"]));
    ok(qemu_io(d, "vdi", "dyn.vdi", &["write -P 0xaa 1M 4k"]));
    ok(qemu_img(
        d,
        &[
            "create",
            "-q",
            "-f",
            "vdi",
            "-o",
            "static=on",
            "st.vdi",
            "1M",
        ],
    ));
    run_mutations(d, &[("dyn.vdi", Format::Vdi), ("st.vdi", Format::Vdi)]);
}

/// Inputs that once crashed a fuzz target, replayed through the same harness.
#[test]
fn fuzz_regressions_replay() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let dir = tmpdir();
    let target_file = dir.path().join("img");
    let mut n = 0;
    for (target, fmt) in [
        ("open_qcow2", Some(Format::Qcow2)),
        ("open_vmdk", Some(Format::Vmdk)),
        ("open_vdi", Some(Format::Vdi)),
        ("open_probe", None),
        ("vmdk_stream", Some(Format::Vmdk)),
        ("options", None),
        ("check_qcow2", None),
        ("vmdk_descriptor", None),
    ] {
        let Ok(entries) = std::fs::read_dir(root.join(target)) else {
            continue;
        };
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        for f in files {
            if f.extension().is_some_and(|e| e == "md") {
                continue;
            }
            let data = std::fs::read(&f).unwrap();
            let what = format!("{target}/{}", f.file_name().unwrap().to_string_lossy());
            if target == "options" {
                guarded(&what, move || harness::exercise_options(&data));
            } else if target == "check_qcow2" || target == "vmdk_descriptor" {
                // these harness functions write their own files (under DISKIT_FUZZ_DIR)
                let check = target == "check_qcow2";
                guarded(&what, move || {
                    if check {
                        harness::exercise_check(&data)
                    } else {
                        harness::exercise_vmdk_descriptor(&data)
                    }
                });
            } else {
                let _ = exercise(&target_file, &data, fmt, &what);
            }
            n += 1;
        }
    }
    // option strings that are easy to get wrong, through the options target's checks
    for s in [
        "",
        ",",
        ",,",
        ",,,",
        "=",
        "==",
        "a=",
        "=b",
        "a=b,,c",
        "size=16E",
        "size=-1",
        "size=0x",
        "size=1.5.5k",
        "size=99999999999999999999",
        "size=\u{0}",
        "help,?",
        "cluster_size=64k,cluster_size=2M",
        "\u{ffff}=\u{10ffff}",
    ] {
        let data = s.as_bytes().to_vec();
        guarded(&format!("options {s:?}"), move || {
            harness::exercise_options(&data)
        });
        n += 1;
    }
    eprintln!("replayed {n} option strings and fuzz regression inputs");
}
