//! QEMU's image locks: diskit takes the same lock bytes as qemu-img for each operation and
//! format, so it refuses exactly what qemu-img refuses while a QEMU process holds an image,
//! and a diskit writer keeps qemu-img out where qemu-img would keep itself out.

mod common;
use common::*;

/// Waits until no lock is left on `path`. A child process that another test thread is
/// spawning holds copies of our open files (and so their locks) until it execs.
fn wait_unlocked(path: &std::path::Path) -> bool {
    for _ in 0..400 {
        if locks_on(path).is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

#[test]
fn running_qemu_blocks_diskit_like_qemu_img() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("busy.raw"), pattern(1 << 20, 3)).unwrap();
    let mut child = hold(d, "raw", "busy.raw", false);
    // qemu-io writes the raw image and shares write: readers that need a consistent
    // source (convert) are refused, others are not; diskit must agree case by case.
    for args in [
        &["info", "-f", "raw", "busy.raw"][..],
        &["map", "-f", "raw", "--output=json", "busy.raw"],
        &["compare", "-f", "raw", "-F", "raw", "busy.raw", "busy.raw"],
    ] {
        ok(same_as_qemu(d, args));
    }
    let out = same_as_qemu(
        d,
        &["convert", "-f", "raw", "-O", "raw", "busy.raw", "out.raw"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&out)
    );
    // -U reads anyway, as qemu-img does.
    ok(same_as_qemu(
        d,
        &[
            "convert", "-U", "-f", "raw", "-O", "raw", "busy.raw", "out.raw",
        ],
    ));
    let _ = child.kill();
    let _ = child.wait();
    ok(diskit(
        d,
        &["convert", "-f", "raw", "-O", "raw", "busy.raw", "out2.raw"],
    ));
}

#[test]
fn lock_bytes_match_qemu_img() {
    // What diskit holds on a raw image opened for writing, as qemu-img resize holds it.
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("mine.raw"), pattern(1 << 20, 5)).unwrap();
    let path = d.join("mine.raw");
    let opts = diskit::OpenOptions {
        format: Some(diskit::Format::Raw),
        write: true,
        resize: true,
        ..Default::default()
    };
    let img = diskit::open(path.to_str().unwrap(), &opts).unwrap();
    let mut held = locks_on(&path);
    held.sort();
    assert_eq!(held, vec![100, 101, 103]);
    drop(img);
    assert!(wait_unlocked(&path));
    // A consistent reader (convert source) unshares write and resize.
    let opts = diskit::OpenOptions {
        format: Some(diskit::Format::Raw),
        exclusive: true,
        ..Default::default()
    };
    let img = diskit::open(path.to_str().unwrap(), &opts).unwrap();
    let mut held = locks_on(&path);
    held.sort();
    assert_eq!(held, vec![100, 201, 203]);
    drop(img);
}

#[test]
fn diskit_writer_blocks_qemu_img_convert() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    std::fs::write(d.join("mine.raw"), pattern(1 << 20, 5)).unwrap();
    let path = d.join("mine.raw");
    let img = diskit::open(
        path.to_str().unwrap(),
        &diskit::OpenOptions::read_write().with_format(Some(diskit::Format::Raw)),
    )
    .unwrap();
    let out = qemu_img(
        d,
        &["convert", "-f", "raw", "-O", "raw", "mine.raw", "x.raw"],
    );
    assert!(
        !out.status.success(),
        "qemu-img copied an image diskit is writing"
    );
    assert!(
        stderr(&out).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&out)
    );
    drop(img);
    ok(qemu_img(
        d,
        &["convert", "-f", "raw", "-O", "raw", "mine.raw", "x.raw"],
    ));
}
