//! Files an image names (backing files, VMDK extents) are opened only under one policy
//! (`formats::check_named_file`): regular files always, block devices as backing files
//! (qemu-img's behaviour, which LVM-based chains rely on), and never a character device,
//! FIFO or socket unless `DISKIT_ALLOW_DEVICES=1`. A raw image's bytes are never read as
//! metadata, so it never has a backing file.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use diskit::formats::{check_named_file, NamedBy};

/// Runs diskit with extra environment, killing it (and failing) after 20 s: a FIFO opened
/// by mistake would block forever.
fn diskit_env(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(diskit_bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("DISKIT_ALLOW_DEVICES")
        .env_remove("DISKIT_VMDK_ALLOW_DEVICES")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("running diskit");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("waiting for diskit").is_some() {
            return child.wait_with_output().expect("diskit output");
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("diskit {args:?} hung (killed after 20 s)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn mkfifo(path: &Path) {
    let st = Command::new("mkfifo").arg(path).status().expect("mkfifo");
    assert!(st.success(), "mkfifo failed");
}

#[test]
fn backing_char_device_refused_unless_allowed() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/dev/zero",
            "-F",
            "raw",
            "z.qcow2",
            "1M",
        ],
    ));
    // info does not open the backing file (as qemu-img): it works and names it
    let info = ok(diskit(d, &["info", "z.qcow2"]));
    assert!(stdout(&info).contains("backing file: /dev/zero"));
    let out = diskit_env(d, &[], &["convert", "-O", "raw", "z.qcow2", "z.raw"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("backing file '/dev/zero' is a character device")
            && e.contains("DISKIT_ALLOW_DEVICES=1"),
        "{e}"
    );
    // allowed: the same result as qemu-img (zeros)
    let out = diskit_env(
        d,
        &[("DISKIT_ALLOW_DEVICES", "1")],
        &["convert", "-O", "raw", "z.qcow2", "z.raw"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    ok(qemu_img(d, &["convert", "-O", "raw", "z.qcow2", "q.raw"]));
    let same = std::fs::read(d.join("z.raw")).unwrap() == std::fs::read(d.join("q.raw")).unwrap();
    assert!(same, "z.raw differs from qemu-img's q.raw");
}

#[test]
fn backing_fifo_never_blocks() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    mkfifo(&d.join("pipe"));
    ok(qemu_img(
        d,
        &[
            "create", "-f", "qcow2", "-u", "-b", "pipe", "-F", "raw", "f.qcow2", "1M",
        ],
    ));
    for args in [
        &["convert", "-O", "raw", "f.qcow2", "f.raw"][..],
        &["info", "--backing-chain", "f.qcow2"][..],
        &["compare", "f.qcow2", "f.qcow2"][..],
        &["map", "f.qcow2"][..],
    ] {
        let out = diskit_env(d, &[], args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let e = stderr(&out);
        assert!(e.contains("is a FIFO"), "{args:?}: {e}");
    }
}

#[test]
fn extent_fifo_and_socket_refused() {
    let t = tmpdir();
    let d = t.path();
    mkfifo(&d.join("pipe"));
    let _sock = std::os::unix::net::UnixListener::bind(d.join("sock")).unwrap();
    for target in ["pipe", "sock"] {
        let desc = format!(
            "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"{target}\" 0\n"
        );
        std::fs::write(d.join("e.vmdk"), desc).unwrap();
        let out = diskit_env(d, &[], &["convert", "-O", "raw", "e.vmdk", "e.raw"]);
        assert_eq!(out.status.code(), Some(1));
        let e = stderr(&out);
        let kind = if target == "pipe" {
            "a FIFO"
        } else {
            "a socket"
        };
        assert!(
            e.contains(&format!("extent file '{}", d.join(target).display()))
                || e.contains(&format!("extent file '{target}'")),
            "{e}"
        );
        assert!(e.contains(kind), "{e}");
    }
}

/// Block devices: fine as backing files (qemu-img's behaviour), refused as VMDK extents.
#[test]
fn block_devices_by_role() {
    let dev = std::fs::read_dir("/dev").ok().and_then(|rd| {
        rd.flatten()
            .find(|e| e.file_type().map(|t| t.is_block_device()).unwrap_or(false))
            .map(|e| e.path())
    });
    let Some(dev) = dev else {
        eprintln!("SKIP block_devices_by_role: no block device under /dev");
        return;
    };
    let dev = dev.to_str().unwrap();
    if diskit::formats::devices_allowed() {
        eprintln!("SKIP block_devices_by_role: DISKIT_ALLOW_DEVICES is set");
        return;
    }
    assert!(check_named_file(dev, NamedBy::Backing).is_ok());
    let e = check_named_file(dev, NamedBy::Extent).unwrap_err();
    assert!(e.to_string().contains("is a block device"), "{e}");
    // regular files, directories and missing files pass (the open reports the latter)
    let t = tmpdir();
    std::fs::write(t.path().join("f"), b"x").unwrap();
    for p in ["f", "missing"] {
        let p = t.path().join(p);
        assert!(check_named_file(p.to_str().unwrap(), NamedBy::Extent).is_ok());
    }
}

/// `-f raw` never reads the bytes as a header: a qcow2 header naming a FIFO as its backing
/// file, opened as raw, converts to itself byte for byte without touching the FIFO.
#[test]
fn raw_has_no_backing_file() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    mkfifo(&d.join("pipe"));
    ok(qemu_img(
        d,
        &[
            "create", "-f", "qcow2", "-u", "-b", "pipe", "-F", "qcow2", "h.qcow2", "1M",
        ],
    ));
    for args in [
        &["convert", "-f", "raw", "-O", "raw", "h.qcow2", "h.raw"][..],
        &["info", "-f", "raw", "--backing-chain", "h.qcow2"][..],
    ] {
        let out = diskit_env(d, &[], args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    // the same bytes as qemu-img reads with -f raw (the file padded to a sector)
    let want = qemu_raw(d, "h.qcow2", Some("raw"));
    let got = std::fs::read(d.join("h.raw")).unwrap();
    assert!(got == want, "convert -f raw changed the bytes");
    assert!(got.starts_with(&std::fs::read(d.join("h.qcow2")).unwrap()));
    let info = diskit_env(d, &[], &["info", "-f", "raw", "--output=json", "h.qcow2"]);
    let v = json(&info);
    assert!(v.get("backing-filename").is_none(), "{v}");
}

/// A differencing VDI's parent is searched among the `*.vdi` files next to it: a FIFO with
/// that name is skipped, never opened (which would block).
#[test]
fn vdi_parent_search_skips_fifos() {
    require_qemu!();
    let t = tmpdir();
    let d = t.path();
    ok(qemu_img(d, &["create", "-f", "vdi", "child.vdi", "1M"]));
    mkfifo(&d.join("parent.vdi"));
    // give the image a parent UUID (uuid_link at 0x1a8) that no file carries
    let mut b = std::fs::read(d.join("child.vdi")).unwrap();
    b[0x1a8..0x1b8].copy_from_slice(&[0x5a; 16]);
    std::fs::write(d.join("child.vdi"), b).unwrap();
    let out = diskit_env(d, &[], &["convert", "-O", "raw", "child.vdi", "c.raw"]);
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(
        e.contains("parent image with UUID") && e.contains("not found"),
        "{e}"
    );
}
