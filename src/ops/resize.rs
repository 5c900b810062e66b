//! `resize`: grow or shrink an image's guest size.

use crate::error::{Error, Result};
use crate::formats::{self, Format, OpenOptions};

/// A size argument of `resize`: absolute, or relative with `+`/`-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// The new size.
    Absolute(u64),
    /// Grow by.
    Grow(u64),
    /// Shrink by.
    Shrink(u64),
}

/// What `resize` takes.
#[derive(Debug, Clone)]
pub struct ResizeOptions {
    /// Format (`-f`), probed when `None`.
    pub format: Option<Format>,
    /// `--preallocation`
    pub prealloc: Option<String>,
    /// `--shrink`: the user agrees to lose data past the new end.
    pub shrink: bool,
}

/// Resizes `filename`; returns the new size.
pub fn resize(filename: &str, change: SizeChange, opts: &ResizeOptions) -> Result<u64> {
    let img = formats::open(
        filename,
        &OpenOptions {
            format: opts.format,
            write: true,
            resize: true,
            ..OpenOptions::default()
        },
    )?;
    let current = img.virtual_size();
    let new = match change {
        SizeChange::Absolute(n) => n as i128,
        SizeChange::Grow(n) => current as i128 + n as i128,
        SizeChange::Shrink(n) => current as i128 - n as i128,
    };
    if new <= 0 {
        return Err(Error::invalid_arg("New image size must be positive"));
    }
    if new > i64::MAX as i128 {
        return Err(Error::invalid_arg("Image size too large"));
    }
    let new = new as u64;
    let prealloc = opts.prealloc.as_deref().filter(|p| *p != "off");
    if new <= current && prealloc.is_some() {
        return Err(Error::invalid_arg(
            "Preallocation can only be used for growing images",
        ));
    }
    if new < current && !opts.shrink {
        return Err(Error::invalid_arg(
            "Use the --shrink option to perform a shrink operation.",
        ));
    }
    formats::resize_image(img, new, prealloc)?;
    Ok(new)
}
