//! Fault injection for crash and error tests.
//!
//! A [`FaultInjector`] shared by the host files of one test counts their I/O operations
//! (writes, truncates, flushes). After the configured number, it either silently drops every
//! further write (a simulated power cut: the process goes on, the disk sees nothing more) or
//! fails the next operation with an OS error (EIO, ENOSPC).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What happens once the countdown is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// Drop every write and flush from then on (a crash).
    StopWrites,
    /// Fail that one operation with this errno, then behave normally.
    FailOnce(i32),
    /// Fail every operation from then on with this errno.
    FailAlways(i32),
}

/// Counts I/O and injects a fault after `after` operations.
#[derive(Debug)]
pub struct FaultInjector {
    after: u64,
    mode: FaultMode,
    count: AtomicU64,
    fired: AtomicBool,
    fail_reads: bool,
}

impl FaultInjector {
    /// A fault after `after` write-side operations.
    pub fn new(after: u64, mode: FaultMode) -> Self {
        FaultInjector {
            after,
            mode,
            count: AtomicU64::new(0),
            fired: AtomicBool::new(false),
            fail_reads: false,
        }
    }

    /// Also count reads (for EIO on read tests).
    pub fn counting_reads(mut self) -> Self {
        self.fail_reads = true;
        self
    }

    /// How many operations were seen so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Has the fault been injected?
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Returns Ok(true) to perform the operation, Ok(false) to drop it, Err to fail it (the
    /// host file reports that OS error exactly as a real one, naming itself and the offset).
    fn tick(&self) -> std::io::Result<bool> {
        let n = self.count.fetch_add(1, Ordering::SeqCst);
        if n < self.after {
            return Ok(true);
        }
        let fail = |errno: i32| Err(std::io::Error::from_raw_os_error(errno));
        match self.mode {
            FaultMode::StopWrites => {
                self.fired.store(true, Ordering::SeqCst);
                Ok(false)
            }
            FaultMode::FailOnce(errno) => {
                if self.fired.swap(true, Ordering::SeqCst) {
                    Ok(true)
                } else {
                    fail(errno)
                }
            }
            FaultMode::FailAlways(errno) => {
                self.fired.store(true, Ordering::SeqCst);
                fail(errno)
            }
        }
    }

    pub(crate) fn on_write(&self, _offset: u64, _len: usize) -> std::io::Result<bool> {
        self.tick()
    }

    pub(crate) fn on_flush(&self) -> std::io::Result<bool> {
        self.tick()
    }

    pub(crate) fn on_read(&self, _offset: u64, _len: usize) -> std::io::Result<()> {
        if !self.fail_reads || matches!(self.mode, FaultMode::StopWrites) {
            return Ok(());
        }
        self.tick().map(|_| ())
    }
}

/// The process-wide injector (a test hook, see [`install_global`]).
static GLOBAL: Mutex<Option<Arc<FaultInjector>>> = Mutex::new(None);

/// Test hook: installs `inj` as the injector of every host file opened from now on whose
/// options carry none (reads and writes alike; reads only tick with
/// [`FaultInjector::counting_reads`]), or uninstalls it with `None`. Files already open keep
/// what they had. Lets crash tests reach files that library calls (`ops::*`) open themselves.
/// Process-global: tests using it must not run concurrently with other I/O tests of the same
/// binary. The `diskit` binary never installs one.
pub fn install_global(inj: Option<Arc<FaultInjector>>) {
    *GLOBAL.lock().unwrap_or_else(|p| p.into_inner()) = inj;
}

/// The injector installed by [`install_global`], if any.
pub fn global() -> Option<Arc<FaultInjector>> {
    GLOBAL.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Installs an injector for as long as the guard lives (uninstalled on drop, even on panic).
#[derive(Debug)]
pub struct GlobalGuard(());

impl GlobalGuard {
    /// Installs `inj` globally until the guard is dropped.
    pub fn install(inj: Arc<FaultInjector>) -> GlobalGuard {
        install_global(Some(inj));
        GlobalGuard(())
    }
}

impl Drop for GlobalGuard {
    fn drop(&mut self) {
        install_global(None);
    }
}
