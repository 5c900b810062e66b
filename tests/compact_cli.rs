//! `diskit compact` (an extension): a VDI half overwritten with zeroes shrinks in place,
//! keeps its content and passes `qemu-img check`.

mod common;
use common::*;

#[test]
fn compact_vdi_shrinks_and_keeps_content() {
    require_qemu!();
    let dir = tmpdir();
    let d = dir.path();
    ok(qemu_img(d, &["create", "-q", "-f", "vdi", "c.vdi", "16M"]));
    let mut cmds = Vec::new();
    for i in 0..16 {
        cmds.push(format!("write -P {} {}M 1M", i + 1, i));
    }
    // half of the blocks overwritten with zeroes (still allocated, as data)
    for i in (0..16).step_by(2) {
        cmds.push(format!("write -P 0 {i}M 1M"));
    }
    let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
    ok(qemu_io(d, "vdi", "c.vdi", &refs));
    let before = qemu_raw(d, "c.vdi", Some("vdi"));
    let size_before = std::fs::metadata(d.join("c.vdi")).unwrap().len();
    let out = ok(diskit(d, &["compact", "c.vdi"]));
    assert!(
        stdout(&out).contains("8 zero blocks released"),
        "{}",
        stdout(&out)
    );
    let size_after = std::fs::metadata(d.join("c.vdi")).unwrap().len();
    assert!(
        size_after <= size_before - (8 << 20),
        "{size_before} -> {size_after}"
    );
    assert_eq!(qemu_raw(d, "c.vdi", Some("vdi")), before);
    ok(qemu_img(d, &["check", "c.vdi"]));
    // other formats are refused clearly
    ok(qemu_img(
        d,
        &["create", "-q", "-f", "qcow2", "q.qcow2", "1M"],
    ));
    let out = diskit(d, &["compact", "q.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("vdi images only"), "{}", stderr(&out));
}
