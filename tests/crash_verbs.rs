//! Crash and I/O-error tests of every verb that writes, through the library calls the CLI
//! makes (`diskit::ops::*`), with the process-global fault injector
//! (`diskit::io::fault::GlobalGuard`) reaching every file those calls open.
//!
//! For each scenario: a clean run counts the write-side operations (writes, truncates,
//! flushes, punches, zeroing, allocation) of the verb; then, on fresh copies of the inputs,
//! for every N (stepped above ~120) the verb runs with
//! - all writes dropped from operation N on (a power cut: the process goes on),
//! - operation N failing once with EIO,
//! - every operation from N on failing with ENOSPC,
//!
//! and the verb's promise is checked once the injector is gone (see [`Promise`]). A failed
//! operation must make the verb return an error, never a panic. The diskit checker runs
//! after every N; qemu-img (check, info, convert to raw) keeps it honest on a sample of N.
//!
//! The injector is process-wide: every test of this file holds one lock.

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use common::*;
use diskit::formats::RepairMode;
use diskit::io::fault::{FaultInjector, FaultMode, GlobalGuard};
use diskit::ops;
use diskit::{CreateOpts, Format};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The most values of N tried per fault mode.
const MAX_POINTS: u64 = 120;
/// How many N per scenario also go through qemu-img (power cuts; half as many per error mode).
const ORACLE_POINTS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All writes dropped from N on.
    Crash,
    /// Operation N fails with EIO.
    Eio,
    /// Every operation from N on fails with ENOSPC.
    Enospc,
}

impl Mode {
    fn fault(self) -> FaultMode {
        match self {
            Mode::Crash => FaultMode::StopWrites,
            Mode::Eio => FaultMode::FailOnce(libc::EIO),
            Mode::Enospc => FaultMode::FailAlways(libc::ENOSPC),
        }
    }
    fn os_text(self) -> Option<&'static str> {
        match self {
            Mode::Crash => None,
            Mode::Eio => Some("Input/output error"),
            Mode::Enospc => Some("No space left on device"),
        }
    }
}

/// What a verb promises, whatever happens to its I/O.
enum Promise {
    /// Verbs that change images in place. `check`: images that must pass check with leaks
    /// at most (`no_worse`: images already corrupt before, whose corruptions may not grow);
    /// `same`: images whose guest view must not change; `old_or_new`: images whose guest
    /// view is either the one before or the one after a clean run.
    InPlace {
        check: &'static [&'static str],
        no_worse: &'static [&'static str],
        same: &'static [&'static str],
        old_or_new: &'static [&'static str],
    },
    /// `create`: the file is not (yet) an image of the format, or it is a complete image.
    Create {
        file: &'static str,
        format: Format,
        size: u64,
    },
    /// `convert`: the sources are untouched; errors name the target and the OS error.
    Convert {
        sources: &'static [&'static str],
        target: &'static str,
    },
}

type Action = Box<dyn Fn(&Path) -> diskit::Result<()>>;

struct Scenario {
    name: &'static str,
    setup: Box<dyn Fn(&Path)>,
    action: Action,
    promise: Promise,
}

/// One faulty run, as the promise check sees it.
struct Run<'a> {
    orig: &'a Path,
    clean: &'a Path,
    work: &'a Path,
    mode: Mode,
    fired: bool,
    oracle: bool,
    result: &'a diskit::Result<()>,
    cache: &'a RefCell<HashMap<PathBuf, Vec<u8>>>,
}

fn p(dir: &Path, f: &str) -> String {
    dir.join(f).to_str().unwrap().to_string()
}

impl Run<'_> {
    fn cached(&self, path: PathBuf) -> Vec<u8> {
        if let Some(v) = self.cache.borrow().get(&path) {
            return v.clone();
        }
        let v = diskit_raw(&path);
        self.cache.borrow_mut().insert(path, v.clone());
        v
    }
    /// Guest content before the verb.
    fn old(&self, f: &str) -> Vec<u8> {
        self.cached(self.orig.join(f))
    }
    /// Guest content after a clean run.
    fn after(&self, f: &str) -> Vec<u8> {
        self.cached(self.clean.join(f))
    }
    /// Guest content now (qemu-img's reading on oracle runs).
    fn now(&self, f: &str) -> Vec<u8> {
        if self.oracle {
            qemu_raw(self.work, f, None)
        } else {
            diskit_raw(&self.work.join(f))
        }
    }
}

/// diskit's check of `path`: (corruptions + check errors, leaks).
///
/// An OFLAG_COPIED flag that disagrees with its cluster's refcount is not counted: between
/// the refcount update and the L2 update that follows it (snapshot create and delete, as in
/// qemu), one of them is on disk before the other, whatever the order. Both directions are
/// safe (a flag set on a shared cluster whose other reference is not written yet; a flag
/// clear on an unshared cluster makes a write copy it), `check -r all` fixes them, and
/// tests/check_qcow2.rs makes the same allowance.
fn diskit_check(path: &Path) -> (u64, u64) {
    let out = ops::check::check(path.to_str().unwrap(), &ops::check::CheckOptions::default());
    match out {
        Ok(o) => {
            let copied = o
                .last
                .findings
                .iter()
                .filter(|f| f.message.contains("OFLAG_COPIED") && !f.repaired)
                .count() as u64;
            (
                (o.last.corruptions + o.last.check_errors).saturating_sub(copied),
                o.last.leaks,
            )
        }
        Err(e) if ops::check::is_unsupported(&e) => (0, 0),
        Err(e) => panic!("diskit check {}: {e}", path.display()),
    }
}

/// qemu-img's check of `f`: (exit code, number of ERROR lines but OFLAG_COPIED ones, see
/// [`diskit_check`]). Also asserts that `qemu-img info` reads the header.
fn qemu_check(dir: &Path, f: &str) -> (i32, usize) {
    let info = qemu_img(dir, &["info", f]);
    assert!(
        info.status.success(),
        "qemu-img info {f} failed: {}",
        stderr(&info)
    );
    let o = qemu_img(dir, &["check", f]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    let errors = text
        .lines()
        .filter(|l| l.starts_with("ERROR") && !l.starts_with("ERROR OFLAG_COPIED"))
        .count();
    let mut code = o.status.code().unwrap_or(-1);
    if code == 2 && errors == 0 {
        code = 0; // only flag errors
    }
    (code, errors)
}

/// The values of N to try: all below `MAX_POINTS`, else the first and last ten and evenly
/// spaced ones between.
fn points(total: u64) -> Vec<u64> {
    if total <= MAX_POINTS {
        return (0..total).collect();
    }
    let mut v: Vec<u64> = (0..10).chain(total - 10..total).collect();
    let inner = MAX_POINTS - 20;
    for i in 0..inner {
        v.push(10 + (total - 20) * i / inner);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = e.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = e.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "(panic)".to_string()
    }
}

/// Runs the action with an injector installed; returns the result and the injector.
fn run_with(
    action: &Action,
    work: &Path,
    inj: FaultInjector,
) -> (diskit::Result<()>, Arc<FaultInjector>) {
    let inj = Arc::new(inj);
    let guard = GlobalGuard::install(inj.clone());
    let r = catch_unwind(AssertUnwindSafe(|| action(work)));
    drop(guard);
    match r {
        Ok(r) => (r, inj),
        Err(e) => panic!("the verb panicked: {}", panic_text(&*e)),
    }
}

fn check_promise(r: &Run, promise: &Promise) {
    if let (Some(text), true) = (r.mode.os_text(), r.fired) {
        if let Err(e) = r.result {
            assert!(
                e.to_string().contains(text),
                "error without the OS error text: {e}"
            );
        }
    }
    match promise {
        Promise::InPlace {
            check,
            no_worse,
            same,
            old_or_new,
        } => {
            for f in *check {
                let (c, _) = diskit_check(&r.work.join(f));
                assert_eq!(c, 0, "{f}: diskit check finds {c} corruptions");
                if r.oracle {
                    let (code, errors) = qemu_check(r.work, f);
                    assert!(
                        (code == 0 || code == 3) && errors == 0,
                        "{f}: qemu-img check exit {code}, {errors} ERROR lines"
                    );
                }
            }
            for f in *no_worse {
                let (before, _) = diskit_check(&r.orig.join(f));
                let (c, _) = diskit_check(&r.work.join(f));
                assert!(c <= before, "{f}: {c} corruptions, {before} before");
                if r.oracle {
                    let (_, eb) = qemu_check(r.orig, f);
                    let (_, e) = qemu_check(r.work, f);
                    assert!(e <= eb, "{f}: qemu-img finds {e} errors, {eb} before");
                }
            }
            for f in *same {
                assert!(r.now(f) == r.old(f), "{f}: guest content changed");
            }
            for f in *old_or_new {
                let now = r.now(f);
                assert!(
                    now == r.old(f) || now == r.after(f),
                    "{f}: guest content ({} bytes) is neither the old ({}) nor the new ({})",
                    now.len(),
                    r.old(f).len(),
                    r.after(f).len()
                );
            }
        }
        Promise::Create { file, format, size } => {
            let path = r.work.join(file);
            if !path.exists() {
                return;
            }
            let img = match diskit::open(path.to_str().unwrap(), &diskit::OpenOptions::read_only())
            {
                Ok(img) => img,
                Err(e) => panic!("{file}: left in a state diskit cannot open: {e}"),
            };
            if img.format() != *format {
                return; // not recognised: no magic yet
            }
            assert_eq!(
                img.virtual_size(),
                *size,
                "{file}: a {format} image of the wrong size"
            );
            drop(img);
            let (c, l) = diskit_check(&path);
            assert_eq!((c, l), (0, 0), "{file}: a {format} image that is not clean");
            assert!(
                diskit_raw(&path).iter().all(|&b| b == 0),
                "{file}: does not read as zeroes"
            );
            if r.oracle {
                let (code, errors) = qemu_check(r.work, file);
                assert!(
                    (code == 0 || code == 63) && errors == 0,
                    "{file}: qemu-img check exit {code}, {errors} ERROR lines"
                );
                assert!(qemu_raw(r.work, file, None).iter().all(|&b| b == 0));
            }
        }
        Promise::Convert { sources, target } => {
            for f in *sources {
                let a = std::fs::read(r.orig.join(f)).unwrap();
                let b = std::fs::read(r.work.join(f)).unwrap();
                assert!(a == b, "source {f} changed");
            }
            if let (Err(e), Some(_)) = (r.result, r.mode.os_text()) {
                assert!(
                    e.to_string().contains(&p(r.work, target)),
                    "the error does not name the target: {e}"
                );
            }
        }
    }
}

/// Runs a scenario; returns the number of operations of a clean run.
fn drive(s: Scenario) -> u64 {
    // CRASH_VERBS_ONLY=text runs only the scenarios whose name contains it (debugging)
    if let Ok(only) = std::env::var("CRASH_VERBS_ONLY") {
        if !s.name.contains(only.as_str()) {
            return 0;
        }
    }
    let t = tmpdir();
    let root = t.path();
    let orig = root.join("orig");
    let clean = root.join("clean");
    let work = root.join("work");
    std::fs::create_dir_all(&orig).unwrap();
    (s.setup)(&orig);
    copy_dir(&orig, &clean);
    let (r, inj) = run_with(
        &s.action,
        &clean,
        FaultInjector::new(u64::MAX, FaultMode::StopWrites),
    );
    if let Err(e) = r {
        panic!("{}: clean run failed: {e}", s.name);
    }
    let total = inj.count();
    assert!(total > 0, "{}: no write-side operation", s.name);
    let ns = points(total);
    let sample = |k: usize| -> Vec<u64> {
        (0..k)
            .map(|i| ns[i * (ns.len() - 1) / (k - 1).max(1)])
            .collect()
    };
    let crash_sample = sample(ORACLE_POINTS.min(ns.len()));
    let err_sample = sample((ORACLE_POINTS / 2).min(ns.len()));
    let cache = RefCell::new(HashMap::new());
    let mut failures = Vec::new();
    for mode in [Mode::Crash, Mode::Eio, Mode::Enospc] {
        for &n in &ns {
            copy_dir(&orig, &work);
            let (result, inj) = run_with(&s.action, &work, FaultInjector::new(n, mode.fault()));
            let oracle = if mode == Mode::Crash {
                crash_sample.contains(&n)
            } else {
                err_sample.contains(&n)
            };
            let run = Run {
                orig: &orig,
                clean: &clean,
                work: &work,
                mode,
                fired: inj.fired(),
                oracle,
                result: &result,
                cache: &cache,
            };
            let r = catch_unwind(AssertUnwindSafe(|| {
                if mode != Mode::Crash && run.fired {
                    assert!(result.is_err(), "an injected error was swallowed (Ok)");
                }
                check_promise(&run, &s.promise)
            }));
            if let Err(e) = r {
                // CRASH_VERBS_KEEP=dir keeps the images of failing runs (debugging)
                if let Ok(keep) = std::env::var("CRASH_VERBS_KEEP") {
                    let name: String = s
                        .name
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    copy_dir(
                        &work,
                        &Path::new(&keep).join(format!("{name}-{n}-{mode:?}")),
                    );
                }
                failures.push(format!(
                    "{}: N={n}/{total} {mode:?} ({}): {}",
                    s.name,
                    match &result {
                        Ok(()) => "Ok".to_string(),
                        Err(e) => format!("Err: {e}"),
                    },
                    panic_text(&*e)
                ));
            }
        }
    }
    eprintln!(
        "{}: {total} operations, {} values of N x 3 modes, {} failures",
        s.name,
        ns.len(),
        failures.len()
    );
    if !failures.is_empty() {
        let shown: Vec<_> = failures.iter().take(12).cloned().collect();
        panic!(
            "{} of {} runs broke the promise:\n{}",
            failures.len(),
            3 * ns.len(),
            shown.join("\n")
        );
    }
    total
}

// ---------------------------------------------------------------------------------------
// Inputs

fn qimg(d: &Path, args: &[&str]) {
    ok(qemu_img(d, args));
}

fn qio(d: &Path, f: &str, cmds: &[&str]) {
    ok(qemu_io(d, "qcow2", f, cmds));
}

/// A 2 MiB qcow2 with 4 KiB clusters: data, zeroes and holes.
fn data_qcow2(d: &Path, f: &str, extra: &str) {
    let o = format!("cluster_size=4k{extra}");
    qimg(d, &["create", "-q", "-f", "qcow2", "-o", &o, f, "2M"]);
    qio(
        d,
        f,
        &[
            "write -P 1 0 40k",
            "write -P 2 300k 12k",
            "write -z 8k 8k",
            "write -P 3 1M 100k",
            "write -P 4 2040k 8k",
        ],
    );
}

/// base (2M) <- mid <- top, 4 KiB clusters, data in every layer.
fn chain(d: &Path) {
    qimg(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base.qcow2",
            "2M",
        ],
    );
    qio(
        d,
        "base.qcow2",
        &["write -P 1 0 1M", "write -P 7 1800k 200k"],
    );
    qimg(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
        ],
    );
    qio(
        d,
        "mid.qcow2",
        &["write -P 3 512k 300k", "write -z 1800k 20k"],
    );
    qimg(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    qio(
        d,
        "top.qcow2",
        &[
            "write -z 0 16k",
            "write -P 5 700k 40k",
            "write -P 6 1500k 64k",
        ],
    );
}

fn s(d: &Path, f: &str) -> String {
    p(d, f)
}

fn in_place(
    name: &'static str,
    setup: impl Fn(&Path) + 'static,
    action: impl Fn(&Path) -> diskit::Result<()> + 'static,
    check: &'static [&'static str],
    same: &'static [&'static str],
    old_or_new: &'static [&'static str],
) -> u64 {
    drive(Scenario {
        name,
        setup: Box::new(setup),
        action: Box::new(action),
        promise: Promise::InPlace {
            check,
            no_worse: &[],
            same,
            old_or_new,
        },
    })
}

// ---------------------------------------------------------------------------------------
// create

fn create_case(name: &'static str, format: Format, file: &'static str, opts: &'static str) -> u64 {
    let size = 2 << 20;
    drive(Scenario {
        name,
        setup: Box::new(|_| {}),
        action: Box::new(move |d| {
            let req = ops::create::CreateRequest {
                filename: s(d, file),
                format,
                options: CreateOpts::parse(opts).unwrap(),
                size: Some(size),
                unsafe_backing: false,
            };
            let o = req.resolve()?;
            req.run(&o)
        }),
        promise: Promise::Create { file, format, size },
    })
}

#[test]
fn create_qcow2() {
    require_qemu!();
    let _g = serial();
    create_case(
        "create qcow2",
        Format::Qcow2,
        "new.qcow2",
        "cluster_size=4k",
    );
    create_case(
        "create qcow2 preallocation=metadata",
        Format::Qcow2,
        "new.qcow2",
        "cluster_size=64k,preallocation=metadata",
    );
}

#[test]
fn create_vmdk() {
    require_qemu!();
    let _g = serial();
    create_case("create vmdk", Format::Vmdk, "new.vmdk", "");
    create_case(
        "create vmdk streamOptimized",
        Format::Vmdk,
        "new.vmdk",
        "subformat=streamOptimized",
    );
}

#[test]
fn create_vdi() {
    require_qemu!();
    let _g = serial();
    create_case("create vdi", Format::Vdi, "new.vdi", "");
    create_case("create vdi static", Format::Vdi, "new.vdi", "static=on");
}

// ---------------------------------------------------------------------------------------
// convert

fn convert_case(name: &'static str, fmt: &'static str, target: &'static str) -> u64 {
    drive(Scenario {
        name,
        setup: Box::new(chain),
        action: Box::new(move |d| {
            let mut o = ops::convert::ConvertOptions::new(vec![s(d, "top.qcow2")], s(d, target));
            o.target_format = fmt.to_string();
            o.workers = 2;
            o.tgt_flush = true;
            ops::convert::convert(&o, None).map(|_| ())
        }),
        promise: Promise::Convert {
            sources: &["base.qcow2", "mid.qcow2", "top.qcow2"],
            target,
        },
    })
}

#[test]
fn convert_leaves_sources_alone() {
    require_qemu!();
    let _g = serial();
    convert_case("convert -O qcow2", "qcow2", "out.qcow2");
    convert_case("convert -O vmdk", "vmdk", "out.vmdk");
    convert_case("convert -O vdi", "vdi", "out.vdi");
    convert_case("convert -O raw", "raw", "out.raw");
}

/// The message of a failed convert, as the CLI prints it after `qemu-img: `.
#[test]
fn convert_error_text() {
    require_qemu!();
    let _g = serial();
    let t = tmpdir();
    let d = t.path();
    chain(d);
    for (mode, text) in [
        (
            FaultMode::FailAlways(libc::ENOSPC),
            "No space left on device",
        ),
        (FaultMode::FailOnce(libc::EIO), "Input/output error"),
    ] {
        let mut o = ops::convert::ConvertOptions::new(vec![s(d, "top.qcow2")], s(d, "o.qcow2"));
        o.target_format = "qcow2".into();
        let action: Action = Box::new(move |_| ops::convert::convert(&o, None).map(|_| ()));
        let (r, _) = run_with(&action, d, FaultInjector::new(3, mode));
        let e = r.expect_err("convert must fail");
        let msg = e.to_string();
        assert!(msg.starts_with(&s(d, "o.qcow2")), "{msg}");
        assert!(msg.ends_with(text), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
}

// ---------------------------------------------------------------------------------------
// resize

fn resize_to(d: &Path, f: &str, size: u64, shrink: bool) -> diskit::Result<()> {
    ops::resize::resize(
        &s(d, f),
        ops::resize::SizeChange::Absolute(size),
        &ops::resize::ResizeOptions {
            format: None,
            prealloc: None,
            shrink,
        },
    )
    .map(|_| ())
}

#[test]
fn resize_qcow2() {
    require_qemu!();
    let _g = serial();
    // 4k clusters: 2 MiB per L2 table, so growing to 9 MiB moves the L1 table
    in_place(
        "resize qcow2 grow",
        |d| data_qcow2(d, "a.qcow2", ""),
        |d| resize_to(d, "a.qcow2", 9 << 20, false),
        &["a.qcow2"],
        &[],
        &["a.qcow2"],
    );
    in_place(
        "resize qcow2 shrink",
        |d| data_qcow2(d, "a.qcow2", ""),
        |d| resize_to(d, "a.qcow2", 1 << 20, true),
        &["a.qcow2"],
        &[],
        &["a.qcow2"],
    );
}

#[test]
fn resize_vdi_vmdk() {
    require_qemu!();
    let _g = serial();
    const VDI: &[&str] = &["a.vdi"];
    const VMDK: &[&str] = &["a.vmdk"];
    for (name, fmt, f, files) in [
        ("resize vdi grow", "vdi", "a.vdi", VDI),
        ("resize vmdk grow", "vmdk", "a.vmdk", VMDK),
    ] {
        in_place(
            name,
            move |d| {
                qimg(d, &["create", "-q", "-f", fmt, f, "2M"]);
                ok(qemu_io(
                    d,
                    fmt,
                    f,
                    &["write -P 1 0 1M", "write -P 2 1536k 64k"],
                ));
            },
            move |d| resize_to(d, f, 5 << 20, false),
            files,
            &[],
            files,
        );
    }
}

// ---------------------------------------------------------------------------------------
// snapshot

fn snap_image(d: &Path) {
    data_qcow2(d, "a.qcow2", "");
    qimg(d, &["snapshot", "-c", "s1", "a.qcow2"]);
    qio(d, "a.qcow2", &["write -P 9 0 20k", "write -P 8 1200k 64k"]);
}

fn snap(d: &Path, a: ops::snapshot::SnapshotAction) -> diskit::Result<()> {
    ops::snapshot::snapshot(&s(d, "a.qcow2"), &a, &Default::default()).map(|_| ())
}

#[test]
fn snapshot_create_apply_delete() {
    require_qemu!();
    let _g = serial();
    use ops::snapshot::SnapshotAction as A;
    in_place(
        "snapshot -c",
        snap_image,
        |d| snap(d, A::Create("s2".into())),
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
    in_place(
        "snapshot -a",
        snap_image,
        |d| snap(d, A::Apply("s1".into())),
        &["a.qcow2"],
        &[],
        &["a.qcow2"],
    );
    in_place(
        "snapshot -d",
        snap_image,
        |d| snap(d, A::Delete("s1".into())),
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
}

// ---------------------------------------------------------------------------------------
// commit and rebase

const CHAIN_FILES: &[&str] = &["base.qcow2", "mid.qcow2", "top.qcow2"];

#[test]
fn commit_keeps_the_top_view() {
    require_qemu!();
    let _g = serial();
    in_place(
        "commit (into mid)",
        chain,
        |d| {
            let o = ops::commit::CommitOptions {
                workers: 2,
                ..Default::default()
            };
            ops::commit::commit(&s(d, "top.qcow2"), &o, None)
        },
        CHAIN_FILES,
        &["top.qcow2"],
        &[],
    );
    in_place(
        "commit -b base",
        chain,
        |d| {
            let o = ops::commit::CommitOptions {
                workers: 2,
                base: Some("base.qcow2".into()),
                drop: true,
                ..Default::default()
            };
            ops::commit::commit(&s(d, "top.qcow2"), &o, None)
        },
        CHAIN_FILES,
        &["top.qcow2"],
        &[],
    );
}

fn rebase_to(d: &Path, backing: &str, fmt: Option<&str>, unsafe_mode: bool) -> diskit::Result<()> {
    let o = ops::rebase::RebaseOptions {
        backing: Some(backing.to_string()),
        backing_format: fmt.map(str::to_string),
        unsafe_mode,
        workers: 2,
        ..Default::default()
    };
    ops::rebase::rebase(&s(d, "top.qcow2"), &o, None)
}

#[test]
fn rebase_keeps_the_view() {
    require_qemu!();
    let _g = serial();
    in_place(
        "rebase onto base",
        chain,
        |d| rebase_to(d, "base.qcow2", Some("qcow2"), false),
        CHAIN_FILES,
        &["top.qcow2"],
        &[],
    );
    in_place(
        "rebase -b ''",
        chain,
        |d| rebase_to(d, "", None, false),
        CHAIN_FILES,
        &["top.qcow2"],
        &[],
    );
    in_place(
        "rebase -u onto base",
        chain,
        |d| rebase_to(d, "base.qcow2", Some("qcow2"), true),
        CHAIN_FILES,
        &[],
        &["top.qcow2"],
    );
}

// ---------------------------------------------------------------------------------------
// amend

fn amend_case(name: &'static str, extra: &'static str, opts: &'static str) -> u64 {
    in_place(
        name,
        move |d| data_qcow2(d, "a.qcow2", extra),
        move |d| {
            ops::amend::amend(
                &s(d, "a.qcow2"),
                &CreateOpts::parse(opts).unwrap(),
                &Default::default(),
            )
        },
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    )
}

#[test]
fn amend_compat() {
    require_qemu!();
    let _g = serial();
    amend_case("amend compat=0.10", "", "compat=0.10");
    amend_case("amend compat=1.1", ",compat=0.10", "compat=1.1");
}

#[test]
fn amend_refcounts() {
    require_qemu!();
    let _g = serial();
    amend_case("amend lazy_refcounts=on", "", "lazy_refcounts=on");
    amend_case(
        "amend lazy_refcounts=off",
        ",lazy_refcounts=on",
        "lazy_refcounts=off",
    );
    amend_case("amend refcount_bits=4", "", "refcount_bits=4");
    amend_case("amend refcount_bits=64", "", "refcount_bits=64");
}

// ---------------------------------------------------------------------------------------
// check -r all

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The offset of the refcount entry of host cluster `cl` (16-bit refcounts, 4k clusters).
fn refcount_entry(f: &Path, cl: u64) -> u64 {
    let b = std::fs::read(f).unwrap();
    let rt = be64(&b, 48) as usize;
    let rb = be64(&b, rt);
    rb + 2 * cl
}

fn poke(f: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(f).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

/// Host offset of guest offset `off` (qemu-img map).
fn host_offset(d: &Path, f: &str, off: u64) -> u64 {
    let out = ok(qemu_img(d, &["map", "--output=json", f]));
    let v = json(&out);
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        if start <= off && off < start + len {
            return e["offset"].as_u64().unwrap() + (off - start);
        }
    }
    panic!("{off} not mapped");
}

/// A qcow2 with two leaked clusters (one inside the file, one past its end).
fn leaky(d: &Path) {
    data_qcow2(d, "a.qcow2", "");
    let f = d.join("a.qcow2");
    let host = host_offset(d, "a.qcow2", 300 << 10);
    qio(d, "a.qcow2", &["discard 300k 4k"]);
    poke(&f, refcount_entry(&f, host >> 12), &1u16.to_be_bytes());
    let end = std::fs::metadata(&f).unwrap().len() >> 12;
    poke(&f, refcount_entry(&f, end + 3), &1u16.to_be_bytes());
}

fn repair(d: &Path) -> diskit::Result<()> {
    ops::check::check(
        &s(d, "a.qcow2"),
        &ops::check::CheckOptions {
            repair: Some(RepairMode::All),
            ..Default::default()
        },
    )
    .map(|_| ())
}

#[test]
fn check_repair() {
    require_qemu!();
    let _g = serial();
    in_place(
        "check -r all (leaks)",
        leaky,
        repair,
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
    drive(Scenario {
        name: "check -r all (leaks and a refcount too low)",
        setup: Box::new(|d| {
            leaky(d);
            let f = d.join("a.qcow2");
            let host = host_offset(d, "a.qcow2", 1 << 20);
            poke(&f, refcount_entry(&f, host >> 12), &0u16.to_be_bytes());
        }),
        action: Box::new(repair),
        promise: Promise::InPlace {
            check: &[],
            no_worse: &["a.qcow2"],
            same: &["a.qcow2"],
            old_or_new: &[],
        },
    });
}

// ---------------------------------------------------------------------------------------
// bitmap

fn bitmap_image(d: &Path) {
    data_qcow2(d, "a.qcow2", "");
    qimg(d, &["bitmap", "--add", "-g", "4k", "a.qcow2", "b0"]);
    qimg(d, &["bitmap", "--add", "a.qcow2", "b1"]);
    qio(
        d,
        "a.qcow2",
        &["write -P 5 64k 100k", "write -P 6 1600k 4k"],
    );
}

fn bitmap_op(d: &Path, name: &str, op: ops::bitmap::BitmapOp) -> diskit::Result<()> {
    ops::bitmap::bitmap(&s(d, "a.qcow2"), name, &[op], &Default::default())
}

#[test]
fn bitmap_ops() {
    require_qemu!();
    let _g = serial();
    use ops::bitmap::BitmapOp as B;
    in_place(
        "bitmap --add",
        bitmap_image,
        |d| bitmap_op(d, "b2", B::Add),
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
    in_place(
        "bitmap --remove",
        bitmap_image,
        |d| bitmap_op(d, "b0", B::Remove),
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
    in_place(
        "bitmap --clear",
        bitmap_image,
        |d| bitmap_op(d, "b0", B::Clear),
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
    in_place(
        "bitmap --merge",
        bitmap_image,
        |d| bitmap_op(d, "b1", B::Merge("b0".into())),
        &["a.qcow2"],
        &["a.qcow2"],
        &[],
    );
}

// ---------------------------------------------------------------------------------------
// compact (VDI). tests/vdi_maint.rs crash-tests the driver call with power cuts; this runs
// the verb with all three fault modes.

#[test]
fn compact_vdi() {
    require_qemu!();
    let _g = serial();
    in_place(
        "compact vdi",
        |d| {
            qimg(d, &["create", "-q", "-f", "vdi", "a.vdi", "4M"]);
            ok(qemu_io(
                d,
                "vdi",
                "a.vdi",
                &[
                    "write -P 1 0 100k",
                    "write -P 0 1M 1M",
                    "write -P 2 2M 4k",
                    "write -P 0 3M 8k",
                ],
            ));
        },
        |d| ops::compact::compact(&s(d, "a.vdi"), None).map(|_| ()),
        &["a.vdi"],
        &["a.vdi"],
        &[],
    );
}
