//! Writing a stream-optimized extent in VMware's layout.
//!
//! ```text
//! header (gdOffset = GD_AT_END) | descriptor | ... overHead sectors
//! grain marker {lba, size} + zlib data, padded to a sector       (one per non-zero grain)
//! GT marker {sectors, 0, 1} + grain table                        (after the grains it covers)
//! GD marker {sectors, 0, 2} + grain directory
//! footer marker {1, 0, 3} + footer (the header with the real gdOffset)
//! end-of-stream marker (a zero sector)
//! ```
//! Grains must arrive in increasing guest order; a grain still being filled is buffered.

use std::sync::Arc;

use flate2::{Compress, Compression, FlushCompress, Status};

use super::header::*;
use crate::error::{Error, Result};
use crate::io::{is_zero, HostFile};

/// The append-only writer of one stream-optimized extent.
#[derive(Debug)]
pub struct StreamWriter {
    file: Arc<HostFile>,
    name: String,
    header: SparseHeader,
    grain: u64,
    gtes: u32,
    capacity: u64,
    started: bool,
    finished: bool,
    next_sector: u64,
    gd: Vec<u32>,
    gt: Vec<u32>,
    gt_index: u64,
    gt_dirty: bool,
    cur: Option<(u64, Vec<u8>)>,
    next_grain: u64,
    parent: bool,
}

impl StreamWriter {
    /// A writer for an extent that holds no grains yet.
    pub fn new(
        file: Arc<HostFile>,
        name: &str,
        header: SparseHeader,
        gd_len: usize,
        parent: bool,
    ) -> Self {
        StreamWriter {
            file,
            name: name.to_string(),
            grain: header.grain_sectors * SECTOR,
            gtes: header.gtes_per_gt,
            capacity: header.capacity * SECTOR,
            header,
            started: false,
            finished: false,
            next_sector: header.grain_offset,
            gd: vec![0; gd_len],
            gt: vec![0; header.gtes_per_gt as usize],
            gt_index: 0,
            gt_dirty: false,
            cur: None,
            next_grain: 0,
            parent,
        }
    }

    /// Has anything been written?
    pub fn started(&self) -> bool {
        self.started
    }

    fn order_error(&self, offset: u64) -> Error {
        Error::unsupported(format!(
            "{}: streamOptimized images must be written in increasing offset order (write at {offset:#x} after grain {:#x} was completed)",
            self.name,
            self.next_grain.saturating_sub(1) * self.grain
        ))
    }

    /// Writes guest data (`None`: zeroes) of `len` bytes at `offset`.
    pub fn write(&mut self, data: Option<&[u8]>, offset: u64, len: u64) -> Result<()> {
        if self.finished {
            return Err(Error::unsupported(format!(
                "{}: the stream is already closed",
                self.name
            )));
        }
        if !self.started {
            self.file.set_len(self.header.grain_offset * SECTOR)?;
            self.started = true;
        }
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let idx = off / self.grain;
            let in_grain = off % self.grain;
            let n = (self.grain - in_grain).min(len - done);
            if idx < self.next_grain {
                return Err(self.order_error(off));
            }
            if let Some((cur, _)) = &self.cur {
                if *cur > idx {
                    return Err(self.order_error(off));
                }
                if *cur < idx {
                    self.flush_grain()?;
                }
            }
            let whole_zero = data.is_none() && n == self.grain;
            if whole_zero && self.cur.is_none() {
                self.next_grain = idx + 1;
                self.zero_grain(idx)?;
            } else {
                if self.cur.is_none() {
                    self.cur = Some((idx, vec![0u8; self.grain as usize]));
                }
                let buf = &mut self.cur.as_mut().unwrap().1;
                let dst = &mut buf[in_grain as usize..(in_grain + n) as usize];
                match data {
                    Some(d) => dst.copy_from_slice(&d[done as usize..(done + n) as usize]),
                    None => dst.fill(0),
                }
            }
            done += n;
        }
        Ok(())
    }

    fn zero_grain(&mut self, idx: u64) -> Result<()> {
        // Without a parent an unallocated grain reads as zero; with one, zeroes must be
        // recorded, as a zeroed-grain entry where the header allows it.
        if !self.parent {
            return Ok(());
        }
        if self.header.flags & FLAG_ZERO_GRAIN != 0 {
            self.set_gte(idx, GTE_ZEROED)
        } else {
            let zeros = vec![0u8; self.grain as usize];
            self.append_grain(idx, &zeros)
        }
    }

    fn flush_grain(&mut self) -> Result<()> {
        let Some((idx, buf)) = self.cur.take() else {
            return Ok(());
        };
        self.next_grain = idx + 1;
        if is_zero(&buf) {
            return self.zero_grain(idx);
        }
        self.append_grain(idx, &buf)
    }

    fn append_grain(&mut self, idx: u64, buf: &[u8]) -> Result<()> {
        let start = idx * self.grain;
        let valid = (self.capacity - start).min(self.grain) as usize;
        let data = &buf[..valid];
        let mut c = Compress::new(Compression::default(), true);
        let mut out = Vec::with_capacity(12 + valid + valid / 8 + 1024);
        out.extend_from_slice(&(start / SECTOR).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        loop {
            let consumed = c.total_in() as usize;
            let st = c
                .compress_vec(&data[consumed..], &mut out, FlushCompress::Finish)
                .map_err(|e| Error::corrupt(format!("{}: deflate failed: {e}", self.name)))?;
            if st == Status::StreamEnd {
                break;
            }
            out.reserve(out.capacity().max(4096));
        }
        let size = (out.len() - 12) as u32;
        out[8..12].copy_from_slice(&size.to_le_bytes());
        out.resize(out.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
        let sector = self.next_sector;
        if sector > u32::MAX as u64 {
            return Err(Error::too_large(format!(
                "{}: the stream is too large",
                self.name
            )));
        }
        self.file.write_at(&out, sector * SECTOR)?;
        self.next_sector += out.len() as u64 / SECTOR;
        self.set_gte(idx, sector as u32)
    }

    fn set_gte(&mut self, idx: u64, value: u32) -> Result<()> {
        let gt_index = idx / self.gtes as u64;
        if gt_index != self.gt_index {
            self.emit_gt()?;
            self.gt_index = gt_index;
        }
        self.gt[(idx % self.gtes as u64) as usize] = value;
        self.gt_dirty = true;
        Ok(())
    }

    fn emit_gt(&mut self) -> Result<()> {
        if !self.gt_dirty {
            return Ok(());
        }
        let bytes = (self.gtes as usize * 4).div_ceil(SECTOR as usize) * SECTOR as usize;
        let sectors = bytes as u64 / SECTOR;
        let mut buf = Marker::meta(MARKER_GT, sectors).to_vec();
        buf.extend_from_slice(&encode_table(&self.gt, bytes));
        let at = self.next_sector;
        if at + 1 > u32::MAX as u64 {
            return Err(Error::too_large(format!(
                "{}: the stream is too large",
                self.name
            )));
        }
        self.file.write_at(&buf, at * SECTOR)?;
        self.gd[self.gt_index as usize] = (at + 1) as u32;
        self.next_sector += 1 + sectors;
        self.gt.iter_mut().for_each(|e| *e = 0);
        self.gt_dirty = false;
        Ok(())
    }

    /// Writes the last grain, its grain table, the directory, the footer and the
    /// end-of-stream marker. Does nothing when nothing was written.
    pub fn finish(&mut self) -> Result<()> {
        if !self.started || self.finished {
            return Ok(());
        }
        self.flush_grain()?;
        self.emit_gt()?;
        let gd_bytes = (self.gd.len() * 4).div_ceil(SECTOR as usize).max(1) * SECTOR as usize;
        let gd_sectors = (gd_bytes as u64) / SECTOR;
        let mut buf = Marker::meta(MARKER_GD, gd_sectors).to_vec();
        buf.extend_from_slice(&encode_table(&self.gd, gd_bytes));
        let gd_sector = self.next_sector + 1;
        let mut footer = self.header;
        footer.gd_offset = gd_sector;
        buf.extend_from_slice(&Marker::meta(MARKER_FOOTER, 1));
        buf.extend_from_slice(&footer.to_bytes());
        buf.extend_from_slice(&Marker::meta(MARKER_EOS, 0));
        let at = self.next_sector * SECTOR;
        self.file.write_at(&buf, at)?;
        self.file.set_len(at + buf.len() as u64)?;
        self.next_sector += buf.len() as u64 / SECTOR;
        self.finished = true;
        self.file.sync()
    }
}

/// The trailer of an empty stream (directory, footer, end of stream) written at `at_sector`.
pub fn empty_trailer(header: &SparseHeader, gd_len: usize, at_sector: u64) -> Vec<u8> {
    let gd_bytes = (gd_len * 4).div_ceil(SECTOR as usize).max(1) * SECTOR as usize;
    let mut buf = Marker::meta(MARKER_GD, gd_bytes as u64 / SECTOR).to_vec();
    buf.extend_from_slice(&vec![0u8; gd_bytes]);
    let mut footer = *header;
    footer.gd_offset = at_sector + 1;
    buf.extend_from_slice(&Marker::meta(MARKER_FOOTER, 1));
    buf.extend_from_slice(&footer.to_bytes());
    buf.extend_from_slice(&Marker::meta(MARKER_EOS, 0));
    buf
}
