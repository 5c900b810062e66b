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
use crate::formats::entropy::looks_incompressible;
use crate::io::{is_zero, HostFile, SeqFile};

/// The deflate level of stream grains. QEMU uses zlib's default (6); zlib-rs at 6 to 8
/// makes grains up to 3% larger than zlib's on executable-like data, at 9 it is smaller than
/// zlib's 6 on text and binaries alike, for about the CPU time qemu-img spends (measured on
/// 32 MiB of source text and of mixed text/binaries/random data: 8211456 vs qemu's 8300544
/// bytes, and 10708480 vs 10809344).
const GRAIN_DEFLATE_LEVEL: u32 = 9;

/// Where a stream goes: an image file (created with its header, descriptor and an empty
/// trailer), or a sequential sink such as standard output (header and descriptor written,
/// nothing else).
#[derive(Debug, Clone)]
pub enum StreamOut {
    /// A seekable image file.
    File(Arc<HostFile>),
    /// An append-only output.
    Seq(Arc<SeqFile>),
}

impl StreamOut {
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self {
            StreamOut::File(f) => f.write_at(buf, offset),
            StreamOut::Seq(s) => s.write_at(buf, offset),
        }
    }
    fn set_len(&self, len: u64) -> Result<()> {
        match self {
            StreamOut::File(f) => f.set_len(len),
            StreamOut::Seq(s) => s.set_len(len),
        }
    }
    fn sync(&self) -> Result<()> {
        match self {
            StreamOut::File(f) => f.sync(),
            StreamOut::Seq(s) => s.sync(),
        }
    }
}

/// The append-only writer of one stream-optimized extent.
#[derive(Debug)]
pub struct StreamWriter {
    file: StreamOut,
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
        file: StreamOut,
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
        self.begin()?;
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

    fn closed(&self) -> Error {
        Error::unsupported(format!("{}: the stream is already closed", self.name))
    }

    /// Refuses writes after `finish`; the first write truncates the file to the grains' start.
    fn begin(&mut self) -> Result<()> {
        if self.finished {
            return Err(self.closed());
        }
        if !self.started {
            self.file.set_len(self.header.grain_offset * SECTOR)?;
            self.started = true;
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
        let out = encode_grain(&self.name, start, &buf[..valid])?;
        self.store_grain(idx, &out)
    }

    /// Appends a grain already encoded by [`encode_grain`] (on another thread) for guest
    /// `offset`, which starts a grain after every grain written so far.
    pub fn write_encoded(&mut self, encoded: &[u8], offset: u64) -> Result<()> {
        if self.finished {
            return Err(self.closed());
        }
        let idx = offset / self.grain;
        if offset % self.grain != 0 || idx < self.next_grain {
            return Err(self.order_error(offset));
        }
        if let Some((cur, _)) = &self.cur {
            if *cur >= idx {
                return Err(self.order_error(offset));
            }
            self.flush_grain()?;
        }
        self.begin()?;
        self.next_grain = idx + 1;
        self.store_grain(idx, encoded)
    }

    fn store_grain(&mut self, idx: u64, out: &[u8]) -> Result<()> {
        let sector = self.next_sector;
        if sector > u32::MAX as u64 {
            return Err(Error::too_large(format!(
                "{}: the stream is too large",
                self.name
            )));
        }
        self.file.write_at(out, sector * SECTOR)?;
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
    /// end-of-stream marker. In a file, does nothing when nothing was written (the file
    /// holds an empty stream already); a sequential sink gets the empty stream's trailer.
    pub fn finish(&mut self) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        if !self.started {
            if let StreamOut::File(_) = self.file {
                return Ok(());
            }
            self.file.set_len(self.header.grain_offset * SECTOR)?;
            self.started = true;
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

/// A grain as a stream stores it: the marker {guest sector of `start`, compressed size},
/// the zlib stream of `data` (at most one grain), zero padding to a sector boundary.
/// Pure: the copy engine runs it on its workers.
pub fn encode_grain(name: &str, start: u64, data: &[u8]) -> Result<Vec<u8>> {
    thread_local! {
        // one deflate state per thread, reset between grains: making one per grain cost a
        // fresh ~300 KiB allocation (page faults, zeroing) for every 64 KiB grain
        static GRAIN_DEFLATE: std::cell::RefCell<Option<Compress>> =
            const { std::cell::RefCell::new(None) };
        // level 0 (stored blocks) for grains deflate would not shrink: what level 9 ends up
        // writing for them too, at a fraction of its time
        static GRAIN_STORE: std::cell::RefCell<Option<Compress>> =
            const { std::cell::RefCell::new(None) };
    }
    let (state, level) = if looks_incompressible(data, 1 << 15) {
        (&GRAIN_STORE, 0)
    } else {
        (&GRAIN_DEFLATE, GRAIN_DEFLATE_LEVEL)
    };
    let mut out = Vec::with_capacity(12 + data.len() + data.len() / 8 + 1024);
    out.extend_from_slice(&(start / SECTOR).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    state.with(|cell| {
        let mut slot = cell.borrow_mut();
        let c = slot.get_or_insert_with(|| Compress::new(Compression::new(level), true));
        c.reset();
        loop {
            let consumed = c.total_in() as usize;
            let st = match c.compress_vec(&data[consumed..], &mut out, FlushCompress::Finish) {
                Ok(st) => st,
                Err(e) => {
                    // a stream left unfinished is not reused (see qcow2's compress.rs)
                    *slot = None;
                    return Err(Error::corrupt(format!("{name}: deflate failed: {e}")));
                }
            };
            if st == Status::StreamEnd {
                return Ok(());
            }
            out.reserve(out.capacity().max(4096));
        }
    })?;
    let size = (out.len() - 12) as u32;
    out[8..12].copy_from_slice(&size.to_le_bytes());
    out.resize(out.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
    Ok(out)
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

/// A streamOptimized image being written to a sequential sink (standard output): it takes
/// guest data in increasing offset order and nothing else (no reads, no map). `close`
/// finishes the stream; dropping it unfinished leaves the output without its footer, so
/// that a failed conversion never looks like a complete image.
#[derive(Debug)]
pub struct StreamSink {
    name: String,
    size: u64,
    grain: u64,
    writer: std::sync::Mutex<StreamWriter>,
}

impl StreamSink {
    /// A sink whose header and descriptor are written already.
    pub fn new(sink: Arc<SeqFile>, name: &str, header: SparseHeader, gd_len: usize) -> Self {
        StreamSink {
            name: name.to_string(),
            size: header.capacity * SECTOR,
            grain: header.grain_sectors * SECTOR,
            writer: std::sync::Mutex::new(StreamWriter::new(
                StreamOut::Seq(sink),
                name,
                header,
                gd_len,
                false,
            )),
        }
    }

    fn writer(&self) -> std::sync::MutexGuard<'_, StreamWriter> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::out_of_bounds(format!(
                "{}: access at offset {offset} length {len} is beyond the end of the image ({} bytes)",
                self.name, self.size
            ))),
        }
    }

    fn no_reads(&self) -> Error {
        Error::unsupported(format!(
            "{}: a stream being written to a sequential output cannot be read",
            self.name
        ))
    }
}

impl crate::formats::BlockDriver for StreamSink {
    fn format(&self) -> crate::formats::Format {
        crate::formats::Format::Vmdk
    }
    fn filename(&self) -> &str {
        &self.name
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.grain)
    }
    fn map(&self, _offset: u64, _max_len: u64) -> Result<(crate::formats::Mapping, u64)> {
        Err(self.no_reads())
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(self.no_reads())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.writer().write(Some(buf), offset, buf.len() as u64)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.writer().write(None, offset, len)
    }
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }
    fn compresses_writes(&self) -> bool {
        true
    }
    fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<crate::formats::Prepared> {
        self.check_range(offset, buf.len() as u64)?;
        let len = buf.len().min(self.grain as usize);
        encode_grain(&self.name, offset, &buf[..len]).map(crate::formats::Prepared::Data)
    }
    fn write_compressed_data(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, 1)?;
        self.writer().write_encoded(data, offset)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn backing(&self) -> Option<&dyn crate::formats::BlockDriver> {
        None
    }
    fn info(&self) -> Result<crate::formats::ImageInfo> {
        Err(self.no_reads())
    }
    fn close(&self) -> Result<()> {
        self.writer().finish()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
