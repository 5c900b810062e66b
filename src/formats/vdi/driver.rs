//! The open VDI image: block map in memory, guest reads and writes, metadata updates.

use std::any::Any;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::header::{
    is_allocated, Geometry, Header, ImageType, Uuid, BLOCK_FREE, BLOCK_ZERO, SECTOR,
};
use crate::error::{Error, Result};
use crate::formats::{BlockDriver, Format, ImageInfo, Mapping};
use crate::io::{is_zero, HostFile};

/// Largest buffer used for block copies and fills.
pub(crate) const CHUNK: u64 = 1 << 20;
/// Header and map updates are written in one operation when they span at most this much.
pub(crate) const COMBINE_SMALL: u64 = 4 << 10;
/// The same limit for the commit point of compaction (rare, worth a bigger write).
pub(crate) const COMBINE_LARGE: u64 = 8 << 20;

/// A set of physical block numbers.
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotSet {
    bits: Vec<u64>,
    len: u32,
}

impl SlotSet {
    pub(crate) fn new(len: u32) -> Result<SlotSet> {
        let words = (len as usize).div_ceil(64);
        let mut bits = Vec::new();
        bits.try_reserve_exact(words)
            .map_err(|_| Error::too_large(format!("cannot allocate a map of {len} blocks")))?;
        bits.resize(words, 0);
        Ok(SlotSet { bits, len })
    }
    pub(crate) fn len(&self) -> u32 {
        self.len
    }
    pub(crate) fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    pub(crate) fn set(&mut self, i: u32) {
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
    }
    pub(crate) fn clear(&mut self, i: u32) {
        self.bits[(i / 64) as usize] &= !(1 << (i % 64));
    }
    /// The lowest clear bit at or after `from`.
    pub(crate) fn first_clear(&self, from: u32) -> Option<u32> {
        let mut w = (from / 64) as usize;
        let mut mask = !0u64 << (from % 64);
        while w < self.bits.len() {
            let free = !self.bits[w] & mask;
            if free != 0 {
                let i = w as u32 * 64 + free.trailing_zeros();
                return (i < self.len).then_some(i);
            }
            mask = !0;
            w += 1;
        }
        None
    }
}

/// Mutable state behind the lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) hdr: Header,
    /// One entry per block (host order).
    pub(crate) map: Vec<u32>,
    /// Physical blocks referenced by the map (entries below `blocks_in_image`).
    pub(crate) used: SlotSet,
    /// Number of allocated entries in the map.
    pub(crate) count: u32,
    /// Search hint for the lowest free physical block.
    pub(crate) hint: u32,
    /// Why writes are refused (duplicate or out-of-range entries), until repaired.
    pub(crate) problem: Option<String>,
}

impl State {
    /// Builds the used set, the count and the problem from the map.
    pub(crate) fn rebuild(&mut self) -> Result<()> {
        let mut used = SlotSet::new(self.hdr.blocks_in_image)?;
        let mut count = 0u32;
        let mut problem = None;
        for (i, &e) in self.map.iter().enumerate() {
            if !is_allocated(e) {
                continue;
            }
            count += 1;
            if e >= self.hdr.blocks_in_image {
                problem.get_or_insert_with(|| {
                    format!(
                        "block {i} points to data block {e}, past the {} blocks of the image",
                        self.hdr.blocks_in_image
                    )
                });
            } else if used.get(e) {
                problem.get_or_insert_with(|| {
                    format!("data block {e} is used by more than one block (block {i} and another)")
                });
            } else {
                used.set(e);
            }
        }
        self.used = used;
        self.count = count;
        self.hint = 0;
        self.problem = problem;
        Ok(())
    }

    /// Takes the lowest free physical block.
    pub(crate) fn alloc_slot(&mut self) -> Result<u32> {
        let slot = self
            .used
            .first_clear(self.hint)
            .or_else(|| self.used.first_clear(0))
            .ok_or_else(|| Error::corrupt("no free data block left in the VDI image"))?;
        self.used.set(slot);
        self.hint = slot + 1;
        self.count += 1;
        self.hdr.blocks_allocated = self.count;
        Ok(slot)
    }

    /// Releases a physical block.
    pub(crate) fn free_slot(&mut self, slot: u32) {
        if slot < self.used.len() {
            self.used.clear(slot);
            self.hint = self.hint.min(slot);
        }
    }
}

/// An open VDI image.
pub struct VdiDriver {
    pub(crate) file: HostFile,
    pub(crate) filename: String,
    pub(crate) state: RwLock<State>,
    pub(crate) parent: Option<Box<dyn BlockDriver>>,
    /// The parent's file name as found next to the image.
    pub(crate) parent_name: Option<String>,
}

impl std::fmt::Debug for VdiDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VdiDriver")
            .field("filename", &self.filename)
            .finish()
    }
}

/// Header fields of an open image, for callers that want more than `info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHeaderInfo {
    /// The pre-header text.
    pub text: String,
    /// Image type.
    pub image_type: ImageType,
    /// Image flags.
    pub image_flags: u32,
    /// Description (comment).
    pub description: String,
    /// Header size (from 0x48).
    pub header_size: u32,
    /// Block map offset.
    pub offset_bmap: u32,
    /// Data offset.
    pub offset_data: u32,
    /// Legacy geometry.
    pub legacy_geometry: Geometry,
    /// LCHS geometry, if the header has it.
    pub lchs_geometry: Option<Geometry>,
    /// Disk size as recorded.
    pub disk_size: u64,
    /// Block size.
    pub block_size: u32,
    /// Extra bytes per block.
    pub block_extra: u32,
    /// Blocks in the map.
    pub blocks_in_image: u32,
    /// Allocated blocks, as recorded in the header.
    pub blocks_allocated: u32,
    /// Image UUID.
    pub uuid_image: Uuid,
    /// Last modification (qemu: last snapshot) UUID.
    pub uuid_last_snap: Uuid,
    /// Parent image UUID (differencing images).
    pub uuid_link: Uuid,
    /// Parent's modification UUID (differencing images).
    pub uuid_parent: Uuid,
}

/// Map entry kinds for runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Data(u64),
    Zero,
    Free,
}

impl VdiDriver {
    pub(crate) fn rd(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn wr(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The host file.
    pub fn file(&self) -> &HostFile {
        &self.file
    }

    /// The header fields.
    pub fn header_info(&self) -> VdiHeaderInfo {
        let st = self.rd();
        let h = &st.hdr;
        VdiHeaderInfo {
            text: h.text(),
            image_type: h.image_type(),
            image_flags: h.image_flags,
            description: h.description(),
            header_size: h.header_size,
            offset_bmap: h.offset_bmap,
            offset_data: h.offset_data,
            legacy_geometry: h.legacy_geometry,
            lchs_geometry: h.lchs_geometry,
            disk_size: h.disk_size,
            block_size: h.block_size,
            block_extra: h.block_extra,
            blocks_in_image: h.blocks_in_image,
            blocks_allocated: h.blocks_allocated,
            uuid_image: h.uuid_image,
            uuid_last_snap: h.uuid_last_snap,
            uuid_link: h.uuid_link,
            uuid_parent: h.uuid_parent,
        }
    }

    /// The block map entries (host order).
    pub fn block_map(&self) -> Vec<u32> {
        self.rd().map.clone()
    }

    pub(crate) fn check_range(&self, st: &State, offset: u64, len: u64) -> Result<()> {
        let size = st.hdr.virtual_size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::out_of_bounds(format!(
                "{}: access at offset {offset} length {len} is beyond the end of the image ({size} bytes)",
                self.filename
            ))),
        }
    }

    pub(crate) fn check_writable(&self, st: &State) -> Result<()> {
        if !self.file.is_writable() {
            return Err(Error::unsupported(format!(
                "{}: image is opened read-only",
                self.filename
            )));
        }
        if let Some(p) = &st.problem {
            return Err(Error::corrupt(format!(
                "{}: refusing to write to a corrupt VDI image ({p}); repair it with check -r",
                self.filename
            )));
        }
        Ok(())
    }

    fn kind(hdr: &Header, entry: u32) -> Kind {
        if is_allocated(entry) {
            Kind::Data(hdr.slot_offset(entry))
        } else if entry == BLOCK_ZERO {
            Kind::Zero
        } else {
            Kind::Free
        }
    }

    /// The run starting at `offset` (inside the image), at most `max_len` long.
    fn run(st: &State, offset: u64, max_len: u64) -> (Kind, u64) {
        let bs = st.hdr.block_size as u64;
        let mut idx = (offset / bs) as usize;
        let within = offset % bs;
        let first = match Self::kind(&st.hdr, st.map[idx]) {
            Kind::Data(h) => Kind::Data(h + within),
            k => k,
        };
        let mut len = (bs - within).min(max_len);
        while len < max_len {
            idx += 1;
            let Some(&e) = st.map.get(idx) else { break };
            let k = Self::kind(&st.hdr, e);
            let same = match (first, k) {
                (Kind::Data(h0), Kind::Data(h)) => h == h0 + len,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            len = (len + bs).min(max_len);
        }
        (first, len)
    }

    /// Reads the parent's view of a guest range (zero past the parent's end).
    pub(crate) fn read_parent(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.parent {
            Some(p) => {
                let psize = p.virtual_size();
                let n = if offset >= psize {
                    0
                } else {
                    (psize - offset).min(buf.len() as u64) as usize
                };
                if n > 0 {
                    p.read_at(&mut buf[..n], offset)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Writes map entries `first..=last` (whole sectors) and, if asked, the header sector.
    /// Header and map go in one write when they span at most `combine` bytes; otherwise the
    /// map is written first, then the header.
    pub(crate) fn write_meta(
        &self,
        st: &State,
        first: usize,
        last: usize,
        header: bool,
        combine: u64,
    ) -> Result<()> {
        let h = &st.hdr;
        let map_start = h.offset_bmap as u64;
        let map_bytes = st.map.len() as u64 * 4;
        let s1 = if st.map.is_empty() {
            map_start
        } else {
            map_start + ((last as u64 + 1) * 4).div_ceil(SECTOR) * SECTOR
        };
        let together = header && s1 > map_start && s1 <= combine;
        // Written together, the map goes out from its start (from memory, the truth).
        let first = if together { 0 } else { first };
        let s0 = (map_start + (first as u64 * 4) / SECTOR * SECTOR).min(s1);
        let mut buf = Vec::with_capacity((s1 - s0) as usize);
        let mut i = ((s0 - map_start) / 4) as usize;
        while (buf.len() as u64) < s1 - s0 && (i as u64) * 4 < map_bytes {
            buf.extend_from_slice(&st.map[i].to_le_bytes());
            i += 1;
        }
        if (buf.len() as u64) < s1 - s0 {
            // The last sector of the map: keep the bytes after the map as they are on disk.
            let have = buf.len();
            buf.resize((s1 - s0) as usize, 0);
            self.file.read_at(&mut buf[have..], s0 + have as u64)?;
        }
        let mut hdr = h.clone();
        hdr.store();
        if together {
            // Header, the bytes between header and map as they are on disk, then the map.
            let mut all = vec![0u8; s0 as usize];
            all[..512].copy_from_slice(&hdr.raw);
            if s0 > 512 {
                self.file.read_at(&mut all[512..], 512)?;
            }
            all.extend_from_slice(&buf);
            return self.file.write_at(&all, 0);
        }
        if s1 > s0 {
            self.file.write_at(&buf, s0)?;
        }
        if header {
            self.file.write_at(&hdr.raw, 0)?;
        }
        Ok(())
    }

    /// Copies the data of physical block `from` to physical block `to`.
    pub(crate) fn copy_slot(&self, hdr: &Header, from: u32, to: u32) -> Result<()> {
        let bs = hdr.block_size as u64;
        let src = hdr.slot_offset(from);
        let dst = hdr.slot_offset(to);
        let mut buf = vec![0u8; bs.min(CHUNK) as usize];
        let mut done = 0;
        while done < bs {
            let n = (bs - done).min(CHUNK) as usize;
            self.file.read_at(&mut buf[..n], src + done)?;
            self.file.write_at(&buf[..n], dst + done)?;
            done += n as u64;
        }
        if hdr.block_extra > 0 {
            let mut extra = vec![0u8; hdr.block_extra as usize];
            self.file
                .read_at(&mut extra, src - hdr.block_extra as u64)?;
            self.file.write_at(&extra, dst - hdr.block_extra as u64)?;
        }
        Ok(())
    }

    /// Is the data of physical block `slot` all zero?
    pub(crate) fn slot_is_zero(&self, hdr: &Header, slot: u32) -> Result<bool> {
        let bs = hdr.block_size as u64;
        let base = hdr.slot_offset(slot);
        let mut buf = vec![0u8; bs.min(CHUNK) as usize];
        let mut done = 0;
        while done < bs {
            let n = (bs - done).min(CHUNK) as usize;
            self.file.read_at(&mut buf[..n], base + done)?;
            if !is_zero(&buf[..n]) {
                return Ok(false);
            }
            done += n as u64;
        }
        Ok(true)
    }

    /// Writes a new physical block for guest block `idx` whose old entry was `old`, with
    /// `data` placed at `within` and the rest from the parent (free block) or zero.
    fn fill_new_block(
        &self,
        hdr: &Header,
        idx: usize,
        old: u32,
        slot: u32,
        data: &[u8],
        within: u64,
    ) -> Result<()> {
        let bs = hdr.block_size as u64;
        let guest_base = idx as u64 * bs;
        let host_base = hdr.slot_offset(slot);
        let from_parent = old == BLOCK_FREE && self.parent.is_some();
        let chunk = bs.min(CHUNK.max(data.len() as u64));
        let mut buf = vec![0u8; chunk as usize];
        let (d0, d1) = (within, within + data.len() as u64);
        let mut pos = 0;
        while pos < bs {
            let n = (bs - pos).min(chunk);
            let b = &mut buf[..n as usize];
            // Skip chunks that the data covers entirely.
            if !(d0 <= pos && pos + n <= d1) {
                if from_parent {
                    self.read_parent(b, guest_base + pos)?;
                } else {
                    b.fill(0);
                }
            }
            let lo = d0.max(pos);
            let hi = d1.min(pos + n);
            if lo < hi {
                b[(lo - pos) as usize..(hi - pos) as usize]
                    .copy_from_slice(&data[(lo - d0) as usize..(hi - d0) as usize]);
            }
            self.file.write_at(b, host_base + pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Writes guest data with the state locked for writing (allocates blocks as needed).
    pub(crate) fn write_locked(&self, st: &mut State, buf: &[u8], offset: u64) -> Result<()> {
        let bs = st.hdr.block_size as u64;
        let mut dirty: Option<(usize, usize)> = None;
        let mut done = 0usize;
        let result = (|| -> Result<()> {
            while done < buf.len() {
                let off = offset + done as u64;
                let idx = (off / bs) as usize;
                let within = off % bs;
                let n = ((bs - within) as usize).min(buf.len() - done);
                let part = &buf[done..done + n];
                let e = st.map[idx];
                if is_allocated(e) {
                    self.file.write_at(part, st.hdr.slot_offset(e) + within)?;
                } else {
                    let slot = st.alloc_slot()?;
                    if let Err(err) = self.fill_new_block(&st.hdr, idx, e, slot, part, within) {
                        st.free_slot(slot);
                        st.count -= 1;
                        st.hdr.blocks_allocated = st.count;
                        return Err(err);
                    }
                    st.map[idx] = slot;
                    dirty = Some(match dirty {
                        None => (idx, idx),
                        Some((a, b)) => (a.min(idx), b.max(idx)),
                    });
                }
                done += n;
            }
            Ok(())
        })();
        if let Some((a, b)) = dirty {
            self.write_meta(st, a, b, true, COMBINE_SMALL)?;
        }
        result
    }

    /// Marks whole guest blocks as zero, releasing their data blocks (and then moving the
    /// last data blocks into the holes so the image stays dense, as qemu expects).
    pub(crate) fn release_blocks(&self, st: &mut State, blocks: &[usize]) -> Result<u32> {
        let released = self.mark_zero(st, blocks)?;
        if released > 0 {
            self.defrag(st)?;
        }
        Ok(released)
    }

    /// Sets the entries of `blocks` to zero blocks and commits map and header (in one
    /// write where they are close together), then flushes. Returns the data blocks freed.
    pub(crate) fn mark_zero(&self, st: &mut State, blocks: &[usize]) -> Result<u32> {
        let mut released = 0;
        let (mut lo, mut hi) = (usize::MAX, 0);
        for &idx in blocks {
            let e = st.map[idx];
            if e == BLOCK_ZERO {
                continue;
            }
            if is_allocated(e) {
                st.free_slot(e);
                st.count -= 1;
                released += 1;
            }
            st.map[idx] = BLOCK_ZERO;
            lo = lo.min(idx);
            hi = hi.max(idx);
        }
        if lo == usize::MAX {
            return Ok(0);
        }
        st.hdr.blocks_allocated = st.count;
        self.write_meta(st, lo, hi, true, COMBINE_LARGE)?;
        if released > 0 {
            self.file.sync()?;
        }
        Ok(released)
    }

    /// Writes the header sector alone.
    pub(crate) fn write_header(&self, st: &State) -> Result<()> {
        let mut h = st.hdr.clone();
        h.store();
        self.file.write_at(&h.raw, 0)
    }

    /// Moves data blocks from the end into free physical blocks until the data area is
    /// dense (0..count), then truncates the file. Crash-safe: each block is copied and
    /// flushed before its map entry changes; the old copy stays valid until then.
    pub(crate) fn defrag(&self, st: &mut State) -> Result<u32> {
        let count = st.count;
        let mut high: Vec<(u32, usize)> = st
            .map
            .iter()
            .enumerate()
            .filter(|(_, &e)| is_allocated(e) && e >= count)
            .map(|(i, &e)| (e, i))
            .collect();
        high.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        let mut moved = 0;
        let mut search = 0;
        for (from, idx) in high {
            let Some(to) = st.used.first_clear(search) else {
                break;
            };
            if to >= count {
                break;
            }
            search = to + 1;
            self.copy_slot(&st.hdr, from, to)?;
            self.file.sync()?;
            st.map[idx] = to;
            st.used.set(to);
            st.free_slot(from);
            self.write_meta(st, idx, idx, false, 0)?;
            self.file.sync()?;
            moved += 1;
        }
        st.hint = 0;
        self.truncate_to_data(st)?;
        Ok(moved)
    }

    /// Cuts the file after the last used physical block (only ever shrinks it).
    pub(crate) fn truncate_to_data(&self, st: &State) -> Result<()> {
        let last = (0..st.used.len()).rev().find(|&s| st.used.get(s));
        let end =
            st.hdr.offset_data as u64 + last.map_or(0, |s| (s as u64 + 1) * st.hdr.slot_size());
        let map_end =
            (st.hdr.offset_bmap as u64 + st.map.len() as u64 * 4).div_ceil(SECTOR) * SECTOR;
        let end = end.max(map_end).max(512);
        if self.file.len()? > end {
            self.file.set_len(end)?;
            self.file.sync()?;
        }
        Ok(())
    }

    fn zero_or_release(&self, offset: u64, len: u64, release: bool, discard: bool) -> Result<()> {
        let mut st = self.wr();
        self.check_range(&st, offset, len)?;
        self.check_writable(&st)?;
        if len == 0 {
            return Ok(());
        }
        let bs = st.hdr.block_size as u64;
        let vsize = st.hdr.virtual_size();
        let fixed = st.hdr.image_type() == ImageType::Static;
        let end = offset + len;
        let mut whole = Vec::new();
        let mut pos = offset;
        while pos < end {
            let idx = (pos / bs) as usize;
            let bstart = idx as u64 * bs;
            let bend = bstart + bs;
            let n = bend.min(end) - pos;
            let covers = pos == bstart && (bend <= end || end == vsize);
            let e = st.map[idx];
            if covers && !fixed && (release || !is_allocated(e)) {
                whole.push(idx);
            } else if !discard {
                // Partial block (or keep allocation): make the bytes read as zero.
                if is_allocated(e) {
                    let host = st.hdr.slot_offset(e) + (pos - bstart);
                    self.file.write_zeroes(host, n)?;
                } else if e == BLOCK_FREE && self.parent.is_some() {
                    let zeros = vec![0u8; n as usize];
                    self.write_locked(&mut st, &zeros, pos)?;
                }
            }
            pos += n;
        }
        self.release_blocks(&mut st, &whole)?;
        Ok(())
    }
}

impl BlockDriver for VdiDriver {
    fn format(&self) -> Format {
        Format::Vdi
    }
    fn filename(&self) -> &str {
        &self.filename
    }
    fn virtual_size(&self) -> u64 {
        self.rd().hdr.virtual_size()
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.rd().hdr.block_size as u64)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        let st = self.rd();
        self.check_range(&st, offset, 0)?;
        let max_len = max_len.min(st.hdr.virtual_size() - offset);
        if max_len == 0 {
            return Ok((Mapping::Zero { explicit: false }, 0));
        }
        let (k, len) = Self::run(&st, offset, max_len);
        let m = match k {
            Kind::Data(h) => Mapping::Data { host_offset: h },
            Kind::Zero => Mapping::Zero { explicit: true },
            // Without a parent, qemu reports unallocated blocks as zero and present.
            Kind::Free if self.backing().is_none() => Mapping::Zero { explicit: false },
            Kind::Free => Mapping::Unallocated,
        };
        Ok((m, len))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // The read lock is held during the data I/O: compaction, discard and repair move
        // data blocks under the write lock, so a block found here stays where it is.
        let st = self.rd();
        self.check_range(&st, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (k, len) = Self::run(&st, off, (buf.len() - done) as u64);
            let part = &mut buf[done..done + len as usize];
            match k {
                Kind::Data(h) => self.file.read_at(part, h)?,
                Kind::Zero => part.fill(0),
                Kind::Free => self.read_parent(part, off)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        {
            let st = self.rd();
            self.check_range(&st, offset, buf.len() as u64)?;
            self.check_writable(&st)?;
            // Fast path: every block is allocated, no metadata changes. The read lock stays
            // held while writing so no block moves underneath.
            let mut runs = Vec::new();
            let mut done = 0usize;
            while done < buf.len() {
                let off = offset + done as u64;
                match Self::run(&st, off, (buf.len() - done) as u64) {
                    (Kind::Data(h), len) => runs.push((done, len as usize, h)),
                    _ => break,
                }
                done += runs.last().map_or(0, |r| r.1);
            }
            if done == buf.len() {
                for (d, n, h) in runs {
                    self.file.write_at(&buf[d..d + n], h)?;
                }
                return Ok(());
            }
        }
        let mut st = self.wr();
        self.check_writable(&st)?;
        self.write_locked(&mut st, buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.zero_or_release(offset, len, unmap, false)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_or_release(offset, len, true, true)
    }

    fn flush(&self) -> Result<()> {
        if self.file.is_writable() {
            self.file.sync()?;
        }
        Ok(())
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.parent.as_deref()
    }

    fn info(&self) -> Result<ImageInfo> {
        let (vsize, bs) = {
            let st = self.rd();
            (st.hdr.virtual_size(), st.hdr.block_size as u64)
        };
        let mut info = ImageInfo::new(&self.filename, Format::Vdi, vsize);
        info.actual_size = Some(self.file.allocated_size()?);
        info.cluster_size = Some(bs);
        if let Some(name) = &self.parent_name {
            info.backing_filename = Some(name.clone());
            info.full_backing_filename =
                Some(crate::formats::resolve_backing_name(&self.filename, name));
        }
        info.children
            .push(("file".to_string(), ImageInfo::file_node(&self.file)?));
        Ok(info)
    }

    fn resize(&self, new_size: u64, prealloc: Option<&str>) -> Result<()> {
        if prealloc.is_some_and(|p| p != "off") {
            return Err(Error::unsupported(
                "Preallocation is not supported for vdi images",
            ));
        }
        // The caller has the user's consent for shrinking (--shrink).
        VdiDriver::resize(self, new_size, true)
    }

    fn check(
        &self,
        repair: Option<crate::formats::RepairMode>,
    ) -> Result<crate::formats::CheckReport> {
        let r = VdiDriver::check(self, repair.is_some())?;
        Ok(crate::formats::CheckReport {
            check_errors: r.check_errors,
            corruptions: r.corruptions,
            corruptions_fixed: r.corruptions_fixed,
            findings: r
                .messages
                .iter()
                .map(|m| crate::formats::Finding {
                    kind: "block-map".to_string(),
                    cluster: None,
                    offset: None,
                    message: m.clone(),
                    repaired: repair.is_some(),
                })
                .collect(),
            ..Default::default()
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slotset() {
        let mut s = SlotSet::new(130).unwrap();
        assert_eq!(s.first_clear(0), Some(0));
        for i in 0..70 {
            s.set(i);
        }
        assert_eq!(s.first_clear(0), Some(70));
        s.clear(3);
        assert_eq!(s.first_clear(0), Some(3));
        assert_eq!(s.first_clear(4), Some(70));
        for i in 70..130 {
            s.set(i);
        }
        assert_eq!(s.first_clear(4), None);
    }
}
