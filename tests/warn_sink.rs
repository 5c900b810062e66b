//! The library's warnings reach the sink a program installs (here: opening a raw image whose
//! format was probed, for writing, which qemu-img warns about), not standard error.

use std::sync::{Arc, Mutex};

#[test]
fn warnings_go_to_the_installed_sink() {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = got.clone();
    assert!(diskit::warn::set_sink(move |m| g
        .lock()
        .unwrap()
        .push(m.to_string())));
    assert!(
        !diskit::warn::set_sink(|_| {}),
        "a second sink must be refused"
    );
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("probed.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let opts = diskit::OpenOptions {
        write: true,
        ..diskit::OpenOptions::default()
    };
    let img = diskit::open(p.to_str().unwrap(), &opts).unwrap();
    assert_eq!(img.format().to_string(), "raw");
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("WARNING: Image format was not specified for '")
            && got[0].contains("probing guessed raw"),
        "{got:?}"
    );
}
