//! Warnings the library gives while it goes on (a corrupt image being marked, a VMDK parent
//! whose CID changed, a probed raw image opened for writing, ...).
//!
//! They go to standard error, as qemu-img prints them, unless a program using the library
//! installs its own sink with [`set_sink`].

use std::sync::OnceLock;

type Sink = Box<dyn Fn(&str) + Send + Sync>;

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends every later warning to `sink` instead of standard error. Only the first call takes
/// effect; it returns false when a sink was already installed.
pub fn set_sink(sink: impl Fn(&str) + Send + Sync + 'static) -> bool {
    SINK.set(Box::new(sink)).is_ok()
}

/// Gives a warning (one or more lines, without the final newline).
pub(crate) fn emit(msg: &str) {
    match SINK.get() {
        Some(f) => f(msg),
        None => eprintln!("{msg}"),
    }
}
