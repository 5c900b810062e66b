//! Persistent dirty bitmaps (the bitmaps header extension and the bitmap directory).

use super::tables::Meta;
use super::Qcow2;
use crate::error::{Error, Result};

/// Can the image be resized with its bitmaps?
pub(crate) fn resize_bitmaps_check(q: &Qcow2) -> Result<()> {
    if q.bitmaps.is_empty() {
        return Ok(());
    }
    Err(Error::unsupported(
        "Cannot resize qcow2 with persistent bitmaps (not supported by diskit yet)",
    ))
}

/// Gives the bitmaps the new guest size.
pub(crate) fn resize_bitmaps(_q: &Qcow2, _m: &mut Meta, _new: u64) -> Result<()> {
    Ok(())
}
