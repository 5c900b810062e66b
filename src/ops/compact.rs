//! `compact`: shrink an image in place by releasing all-zero blocks and moving the rest down
//! (VirtualBox's `modifymedium --compact`; qemu-img has no such verb). VDI for now.

use crate::error::{Error, Result};
use crate::formats::vdi::{CompactStats, VdiDriver};
use crate::formats::{self, Format, OpenOptions};

/// Compacts `filename` (format probed unless given); returns what was done.
pub fn compact(filename: &str, format: Option<Format>) -> Result<CompactStats> {
    let img = formats::open(
        filename,
        &OpenOptions {
            format,
            write: true,
            resize: true,
            no_backing: true,
            ..OpenOptions::default()
        },
    )?;
    let Some(vdi) = img.as_any().downcast_ref::<VdiDriver>() else {
        return Err(Error::unsupported(format!(
            "{filename}: compaction is supported for vdi images only (format '{}')",
            img.format()
        )));
    };
    let stats = vdi.compact()?;
    img.close()?;
    Ok(stats)
}
