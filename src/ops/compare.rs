//! `compare`: are two images' guest contents equal? Exit codes as qemu-img's.

use crate::error::{Error, Result};
use crate::formats::BlockDriver;
use crate::ops::map::block_status;

/// What a comparison found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareResult {
    /// Same content (a longer image's tail reads as zero).
    Identical {
        /// The sizes differ (qemu-img prints a warning).
        size_mismatch: bool,
    },
    /// Different content at this offset.
    Mismatch {
        /// First differing offset (sector granularity, as qemu-img reports).
        offset: u64,
        /// The sizes differ too (the warning is printed before the mismatch).
        size_mismatch: bool,
    },
    /// `-s`: the sizes differ.
    StrictSizeMismatch,
    /// `-s`: allocation differs at this offset.
    StrictStatusMismatch(u64),
}

const BUF: u64 = 2 << 20;
const SECTOR: usize = 512;

fn first_nonzero_sector(buf: &[u8]) -> Option<usize> {
    buf.chunks(SECTOR)
        .position(|c| !crate::io::is_zero(c))
        .map(|i| i * SECTOR)
}

fn read(img: &dyn BlockDriver, buf: &mut [u8], off: u64) -> Result<()> {
    img.read_at(buf, off).map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "Error while reading offset {off} of {}: {}",
                img.filename(),
                e.io_error()
                    .map(crate::error::os_error_text)
                    .unwrap_or_else(|| e.message().to_string())
            ),
        )
    })
}

/// Compares the guest contents of `a` and `b`; `strict` also compares sizes and allocation.
/// `progress` gets (done, total) bytes.
pub fn compare(
    a: &dyn BlockDriver,
    b: &dyn BlockDriver,
    strict: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<CompareResult> {
    let (s1, s2) = (a.virtual_size(), b.virtual_size());
    let total = s1.min(s2);
    let base = s1.max(s2);
    if strict && s1 != s2 {
        return Ok(CompareResult::StrictSizeMismatch);
    }
    let mut buf1 = vec![0u8; BUF as usize];
    let mut buf2 = vec![0u8; BUF as usize];
    let mut off = 0u64;
    while off < total {
        let e1 = block_status(a, off, s1 - off)?;
        let e2 = block_status(b, off, s2 - off)?;
        let mut chunk = e1.length.min(e2.length).min(total - off);
        if strict && (e1.present != e2.present || e1.zero != e2.zero || e1.data != e2.data) {
            return Ok(CompareResult::StrictStatusMismatch(off));
        }
        if e1.zero && e2.zero {
            // both read as zero
        } else if e1.present == e2.present {
            chunk = chunk.min(BUF);
            let n = chunk as usize;
            read(a, &mut buf1[..n], off)?;
            read(b, &mut buf2[..n], off)?;
            if buf1[..n] != buf2[..n] {
                let first = buf1[..n]
                    .chunks(SECTOR)
                    .zip(buf2[..n].chunks(SECTOR))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Ok(CompareResult::Mismatch {
                    offset: off + (first * SECTOR) as u64,
                    size_mismatch: false,
                });
            }
        } else {
            chunk = chunk.min(BUF);
            let n = chunk as usize;
            let img = if e1.present { a } else { b };
            read(img, &mut buf1[..n], off)?;
            if let Some(i) = first_nonzero_sector(&buf1[..n]) {
                return Ok(CompareResult::Mismatch {
                    offset: off + i as u64,
                    size_mismatch: false,
                });
            }
        }
        off += chunk;
        progress(off, base);
    }
    if s1 != s2 {
        let over = if s1 > s2 { a } else { b };
        while off < base {
            let e = block_status(over, off, base - off)?;
            let mut chunk = e.length;
            if e.present && !e.zero {
                chunk = chunk.min(BUF);
                let n = chunk as usize;
                read(over, &mut buf1[..n], off)?;
                if let Some(i) = first_nonzero_sector(&buf1[..n]) {
                    return Ok(CompareResult::Mismatch {
                        offset: off + i as u64,
                        size_mismatch: true,
                    });
                }
            }
            off += chunk;
            progress(off, base);
        }
        return Ok(CompareResult::Identical {
            size_mismatch: true,
        });
    }
    Ok(CompareResult::Identical {
        size_mismatch: false,
    })
}
