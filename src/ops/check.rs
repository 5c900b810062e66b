//! `check`: metadata consistency, and repair, of an image.

use crate::error::{ErrorKind, Result};
use crate::formats::{self, CheckReport, Format, OpenOptions, RepairMode};

/// What `check` takes.
#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    /// Format (`-f`), probed when `None`.
    pub format: Option<Format>,
    /// `-r leaks` / `-r all`
    pub repair: Option<RepairMode>,
    /// `-U`
    pub force_share: bool,
}

/// The outcome: the first pass (with what it repaired) and, after a repair, the second pass
/// whose counters are reported, as qemu-img does.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    /// Format name.
    pub format: Format,
    /// The report of the pass that found and repaired.
    pub first: CheckReport,
    /// The final report (the re-check after a repair, else the first pass).
    pub last: CheckReport,
    /// Something was repaired (and the image re-checked).
    pub repaired: bool,
}

/// Checks `filename`. `Unsupported` means the format has no checks (exit 63).
pub fn check(filename: &str, opts: &CheckOptions) -> Result<CheckOutcome> {
    if opts.force_share && opts.repair.is_some() {
        return Err(crate::Error::invalid_arg(format!(
            "Could not open '{filename}': force-share=on can only be used with read-only images"
        )));
    }
    let img = formats::open(
        filename,
        &OpenOptions {
            format: opts.format,
            write: opts.repair.is_some(),
            force_share: opts.force_share,
            no_backing: true,
            check: true,
            ..OpenOptions::default()
        },
    )?;
    let format = img.format();
    let first = img.check(opts.repair)?;
    let repaired = first.corruptions_fixed > 0 || first.leaks_fixed > 0;
    let last = if repaired {
        let mut again = img.check(None)?;
        again.corruptions_fixed = first.corruptions_fixed;
        again.leaks_fixed = first.leaks_fixed;
        again
    } else {
        first.clone()
    };
    if opts.repair.is_some() {
        img.close()?;
    }
    Ok(CheckOutcome {
        format,
        first,
        last,
        repaired,
    })
}

/// qemu-img's exit code for a finished check.
pub fn exit_code(r: &CheckReport) -> i32 {
    if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    }
}

/// Is this error "no checks for this format"?
pub fn is_unsupported(e: &crate::Error) -> bool {
    e.kind() == ErrorKind::Unsupported
}
