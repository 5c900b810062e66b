//! Every pair of formats: diskit converts each source qemu-img wrote (raw, qcow2 plain and
//! compressed, VMDK sparse/stream/flat, VDI dynamic/static) into each target diskit writes;
//! qemu-img checks the result, reads back the same guest content and sees the same allocation
//! as in its own conversion; diskit converts the result back to raw with the same bytes.

mod common;
use common::*;

use std::path::Path;

/// Odd-sized (not a multiple of any cluster), with data, zeroes written as data, a mixed
/// megabyte and holes: see `mixed_raw`; plus a partial last cluster of data.
const SIZE: u64 = (7 << 20) + 1536;

/// Allocation as `qemu-img map --output=json` reports it, host offsets left out and adjacent
/// entries with the same flags merged: (start, length, [present, data, zero, compressed]).
fn allocation(dir: &Path, img: &str, fmt: &str) -> Vec<(u64, u64, [bool; 4])> {
    let out = ok(qemu_img(dir, &["map", "--output=json", "-f", fmt, img]));
    let v = json(&out);
    let mut runs: Vec<(u64, u64, [bool; 4])> = Vec::new();
    for e in v.as_array().expect("map array") {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let flags = ["present", "data", "zero", "compressed"].map(|k| e[k].as_bool().unwrap());
        match runs.last_mut() {
            Some(l) if l.0 + l.1 == start && l.2 == flags => l.1 += len,
            _ => runs.push((start, len, flags)),
        }
    }
    runs
}

#[test]
fn every_source_format_converts_to_every_target_format() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    mixed_raw(dir, "orig.raw", SIZE);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("orig.raw"))
            .unwrap();
        f.write_all_at(&pattern(1536 + 4096, 9), SIZE - 1536 - 4096)
            .unwrap();
    }
    let orig = std::fs::read(dir.join("orig.raw")).unwrap();

    // Sources, written by qemu-img: (file, format, qemu-img convert options).
    let sources: &[(&str, &str, &[&str])] = &[
        ("s.raw", "raw", &[]),
        ("s.qcow2", "qcow2", &[]),
        ("sc.qcow2", "qcow2", &["-c"]),
        ("s.vmdk", "vmdk", &[]),
        ("ss.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        ("sf.vmdk", "vmdk", &["-o", "subformat=monolithicFlat"]),
        ("s.vdi", "vdi", &[]),
        ("sst.vdi", "vdi", &["-o", "static=on"]),
    ];
    for (file, fmt, opts) in sources {
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        args.extend_from_slice(opts);
        args.extend(["orig.raw", file]);
        ok(qemu_img(dir, &args));
    }
    // Targets diskit writes: (suffix, format, options).
    let targets: &[(&str, &str, &[&str])] = &[
        ("raw", "raw", &[]),
        ("qcow2", "qcow2", &[]),
        ("c.qcow2", "qcow2", &["-c"]),
        ("vmdk", "vmdk", &[]),
        ("s.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        ("vdi", "vdi", &[]),
        ("st.vdi", "vdi", &["-o", "static=on"]),
    ];
    let mut failures = Vec::new();
    for (sfile, sfmt, _) in sources {
        // qemu-img sees the source as the original (the VDI/VMDK sizes are rounded up, the
        // tail reads as zeroes)
        let src_content = qemu_raw(dir, sfile, Some(sfmt));
        assert!(
            src_content.len() >= orig.len() && src_content[..orig.len()] == orig[..],
            "{sfile}: qemu-img's source differs from the original"
        );
        for (tsuf, tfmt, topts) in targets {
            let what = format!("{sfile} -> {tsuf}");
            let ours = format!("d-{}.{tsuf}", sfile.replace('.', "_"));
            let theirs = format!("q-{}.{tsuf}", sfile.replace('.', "_"));
            let mut args = vec!["convert", "-f", sfmt, "-O", tfmt];
            args.extend_from_slice(topts);
            let mut dargs = args.clone();
            dargs.extend([*sfile, ours.as_str()]);
            args.extend([*sfile, theirs.as_str()]);
            let out = diskit(dir, &dargs);
            if !out.status.success() {
                failures.push(format!("{what}: diskit failed: {}", stderr(&out)));
                continue;
            }
            ok(qemu_img(dir, &args));
            if *tfmt != "raw" {
                let c = qemu_img(dir, &["check", "-f", tfmt, &ours]);
                if !c.status.success() {
                    failures.push(format!("{what}: qemu-img check: {}", stdout(&c)));
                }
            }
            let got = qemu_raw(dir, &ours, Some(tfmt));
            if got != src_content {
                failures.push(format!(
                    "{what}: qemu-img reads other content ({} bytes, source {})",
                    got.len(),
                    src_content.len()
                ));
            }
            if allocation(dir, &ours, tfmt) != allocation(dir, &theirs, tfmt) {
                failures.push(format!(
                    "{what}: allocation differs from qemu-img's conversion\n diskit {:?}\n qemu   {:?}",
                    allocation(dir, &ours, tfmt),
                    allocation(dir, &theirs, tfmt)
                ));
            }
            // and back to raw with diskit
            let back = format!("{ours}.back");
            let out = diskit(dir, &["convert", "-f", tfmt, "-O", "raw", &ours, &back]);
            if !out.status.success() {
                failures.push(format!("{what}: diskit back to raw: {}", stderr(&out)));
            } else if std::fs::read(dir.join(&back)).unwrap() != src_content {
                failures.push(format!("{what}: diskit's round trip changed the content"));
            }
            for f in [&ours, &theirs, &back] {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `-B`: only what the overlay's top layer holds is copied. Overlays with scattered data
/// clusters, explicit zero clusters and discards over a backing file with data everywhere;
/// 4 KiB clusters make thousands of alternating runs (several grouped work items). diskit's
/// result has qemu-img's content, top-layer allocation (depth included) and passes check,
/// with and without -c and -W.
#[test]
fn backing_target_copies_the_top_layer_like_qemu_img() {
    require_qemu!();
    let d = tmpdir();
    let dir = d.path();
    let size = 12u64 << 20;
    ok(qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "12M"],
    ));
    ok(qemu_io(
        dir,
        "qcow2",
        "base.qcow2",
        &["write -P 0x33 0 12M"],
    ));
    for cl in ["4k", "64k"] {
        let top = format!("top{cl}.qcow2");
        ok(qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cl}"),
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                &top,
            ],
        ));
        let step: u64 = if cl == "4k" { 4096 } else { 65536 };
        let mut cmds = Vec::new();
        let mut off = 0u64;
        let mut i = 0u64;
        while off + step <= size {
            match i % 5 {
                0 => cmds.push(format!("write -P {} {off} {step}", 0x40 + i % 64)),
                2 => cmds.push(format!("write -z {off} {step}")),
                3 if i % 7 == 0 => cmds.push(format!("write -P 0 {off} {step}")),
                _ => {}
            }
            off += step * (1 + i % 3);
            i += 1;
        }
        cmds.push(format!("discard {} {}", 5 << 20, 64 << 10));
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        ok(qemu_io(dir, "qcow2", &top, &refs));
        let same = format!("cluster_size={cl}");
        // with the source's cluster size, and (4k) with bigger target clusters, whose
        // partly written clusters take the rest from the backing file
        for (flags, same_cl) in [
            (&[][..], true),
            (&["-c"], true),
            (&["-W", "-m", "4"], true),
            (&[][..], false),
            (&["-c"], false),
        ] {
            if !same_cl && cl == "64k" {
                continue;
            }
            let mut args = vec!["convert", "-f", "qcow2", "-O", "qcow2"];
            if same_cl {
                args.extend(["-o", &same]);
            }
            args.extend_from_slice(flags);
            args.extend(["-B", "base.qcow2", "-F", "qcow2", &top]);
            let mut dargs = args.clone();
            dargs.push("d.qcow2");
            args.push("q.qcow2");
            ok(diskit(dir, &dargs));
            ok(qemu_img(dir, &args));
            ok(qemu_img(dir, &["check", "d.qcow2"]));
            ok(qemu_img(
                dir,
                &["compare", "-f", "qcow2", "-F", "qcow2", &top, "d.qcow2"],
            ));
            let map = |f: &str| {
                let v = json(&ok(qemu_img(dir, &["map", "--output=json", f])));
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|e| {
                        (
                            e["start"].as_u64().unwrap(),
                            e["length"].as_u64().unwrap(),
                            e["depth"].as_u64().unwrap(),
                            e["data"].as_bool().unwrap(),
                            e["zero"].as_bool().unwrap(),
                            e["compressed"].as_bool().unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let (dm, qm) = (map("d.qcow2"), map("q.qcow2"));
            assert!(
                dm.len() > 20 || !same_cl,
                "{top} {flags:?}: too few runs to mean anything"
            );
            assert_eq!(
                dm, qm,
                "{top} {flags:?} {same_cl}: allocation differs from qemu-img's"
            );
            let _ = std::fs::remove_file(dir.join("d.qcow2"));
            let _ = std::fs::remove_file(dir.join("q.qcow2"));
        }
    }
}
