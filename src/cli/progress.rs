//! Progress reporting: qemu-img's `(NN.NN/100%)` lines where stdout is not a terminal, an
//! indicatif bar on a terminal, JSON lines for scripts (`--progress=json`), and one line on
//! stderr at SIGUSR1 when no progress was asked for, as qemu-img does.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static SIGUSR1_PENDING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    SIGUSR1_PENDING.store(true, Ordering::Relaxed);
}

enum Mode {
    /// No progress; SIGUSR1 prints one line to stderr.
    Quiet,
    /// qemu-img's text on stdout.
    Text,
    /// A bar on the terminal.
    Bar(indicatif::ProgressBar),
    /// One JSON object per line on stdout.
    Json,
}

/// A progress reporter shared by the worker threads.
pub struct Progress {
    mode: Mode,
    min_skip: f64,
    /// A sequential caller: print 0% again when told 0% again, and steps back (qemu-img
    /// does both; convert's engine reports its start once more than qemu-img's copy loop,
    /// and its workers report out of order).
    sequential: bool,
    state: Mutex<(f64, f64)>, // (current, last printed)
    start: Instant,
}

impl Progress {
    /// `enabled`: `-p`; `json`: `--progress=json`; `min_skip`: percent between updates.
    pub fn new(enabled: bool, json: bool, min_skip: f64) -> Progress {
        let mode = if json {
            Mode::Json
        } else if enabled && std::io::stdout().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(10_000),
                indicatif::ProgressDrawTarget::stdout(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{wide_bar} {percent:>3}% {elapsed_precise} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            Mode::Bar(bar)
        } else if enabled {
            Mode::Text
        } else {
            // SAFETY: installing a handler that only stores to an atomic.
            unsafe {
                libc::signal(
                    libc::SIGUSR1,
                    on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
            Mode::Quiet
        };
        Progress {
            mode,
            min_skip,
            sequential: false,
            state: Mutex::new((0.0, -1.0)),
            start: Instant::now(),
        }
    }

    /// Prints every 0% it is told and every step back, as qemu-img's progress does (for a
    /// caller that reports in order).
    pub fn sequential(mut self) -> Progress {
        self.sequential = true;
        self
    }

    /// Reports `done` of `total` bytes.
    pub fn report(&self, done: u64, total: u64) {
        let pct = if total == 0 {
            100.0
        } else {
            (done as f64 * 100.0 / total as f64).min(100.0)
        };
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 = pct;
        match &self.mode {
            Mode::Quiet => {
                if SIGUSR1_PENDING.swap(false, Ordering::Relaxed) {
                    eprintln!("    ({pct:.2}/100%)");
                }
            }
            Mode::Text => {
                // a step back too where the caller is sequential (amend's projected totals
                // can shrink), as qemu-img; a parallel copy's late reports are not steps back
                let back = self.sequential && pct < st.1 - self.min_skip;
                let moved = pct >= st.1 + self.min_skip || back;
                if moved || pct == 100.0 || pct == 0.0 {
                    if pct == 0.0 && st.1 == 0.0 && !self.sequential {
                        return;
                    }
                    st.1 = pct;
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "    ({pct:.2}/100%)\r");
                    let _ = out.flush();
                }
            }
            Mode::Bar(bar) => bar.set_position((pct * 100.0) as u64),
            Mode::Json => {
                if pct > st.1 + self.min_skip || (pct == 100.0 && st.1 < 100.0) || st.1 < 0.0 {
                    st.1 = pct;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(
                        out,
                        "{{\"done\": {done}, \"total\": {total}, \"elapsed\": {:.3}}}",
                        self.start.elapsed().as_secs_f64()
                    );
                    let _ = out.flush();
                }
            }
        }
    }

    /// Ends the display (a newline after qemu-style text).
    pub fn finish(&self) {
        match &self.mode {
            Mode::Text => println!(),
            Mode::Bar(bar) => bar.finish(),
            _ => {}
        }
    }
}
