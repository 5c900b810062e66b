//! Beyond qemu-img: resizing and compacting VDI images.

use super::driver::{VdiDriver, COMBINE_LARGE};
use super::header::{
    is_allocated, ImageType, BLOCKS_IN_IMAGE_MAX, BLOCK_FREE, DISK_SIZE_MAX, SECTOR,
};
use crate::error::{Error, Result};

/// What [`VdiDriver::compact`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// All-zero data blocks turned into zero blocks.
    pub blocks_released: u32,
    /// Data blocks moved down to fill the holes.
    pub blocks_moved: u32,
    /// File size before.
    pub old_file_size: u64,
    /// File size after.
    pub new_file_size: u64,
}

impl VdiDriver {
    /// Releases every all-zero data block (it becomes a zero block), moves the remaining
    /// blocks down into the holes and truncates the file.
    ///
    /// Crash-safe: the zero blocks are released in one metadata write (map entries and the
    /// header's count together where they are within 8 MiB of the file start), flushed;
    /// then each moved block is copied to its new place and flushed before its map entry
    /// changes (flushed too); the file is truncated last. A crash at any point leaves an
    /// image with the same content that passes `qemu-img check` (possibly with unused
    /// blocks in the file, which the next `compact` reclaims).
    pub fn compact(&self) -> Result<CompactStats> {
        let mut guard = self.wr();
        let st = &mut *guard;
        self.check_writable(st)?;
        if st.hdr.image_type() == ImageType::Static {
            return Err(Error::unsupported(format!(
                "{}: cannot compact a static (preallocated) VDI image",
                self.filename
            )));
        }
        let old_file_size = self.file.len()?;
        let mut zero = Vec::new();
        for (idx, &e) in st.map.iter().enumerate() {
            if is_allocated(e) && self.slot_is_zero(&st.hdr, e)? {
                zero.push(idx);
            }
        }
        let blocks_released = self.mark_zero(st, &zero)?;
        let blocks_moved = self.defrag(st)?;
        Ok(CompactStats {
            blocks_released,
            blocks_moved,
            old_file_size,
            new_file_size: self.file.len()?,
        })
    }

    /// Changes the guest size. Growing enlarges the block map, moving the first data blocks
    /// to the end of the file when the map needs their room. Shrinking needs `shrink` and is
    /// refused while a block past the new end holds data. Sizes are rounded up to 512 bytes.
    pub fn resize(&self, new_size: u64, shrink: bool) -> Result<()> {
        let mut guard = self.wr();
        let st = &mut *guard;
        self.check_writable(st)?;
        let name = &self.filename;
        let new_size = new_size
            .checked_next_multiple_of(SECTOR)
            .unwrap_or(u64::MAX);
        if new_size > DISK_SIZE_MAX {
            return Err(Error::unsupported(format!(
                "{name}: Unsupported VDI image size (size is {new_size:#x}, max supported is {DISK_SIZE_MAX:#x})"
            )));
        }
        let bs = st.hdr.block_size as u64;
        let new_blocks = new_size.div_ceil(bs);
        if new_blocks > BLOCKS_IN_IMAGE_MAX as u64 {
            return Err(Error::unsupported(format!(
                "{name}: a size of {new_size} needs {new_blocks} blocks, more than {BLOCKS_IN_IMAGE_MAX}"
            )));
        }
        let new_blocks = new_blocks as u32;
        let old_size = st.hdr.virtual_size();
        if new_size == old_size {
            return Ok(());
        }
        let fixed = st.hdr.image_type() == ImageType::Static;
        if new_size < old_size {
            if !shrink {
                return Err(Error::invalid_arg(
                    "Use the --shrink option to perform a shrink operation.",
                ));
            }
            if let Some(i) = (new_blocks as usize..st.map.len()).find(|&i| is_allocated(st.map[i]))
            {
                return Err(Error::unsupported(format!(
                    "{name}: cannot shrink to {new_size} bytes: block {i} (guest offset {}) holds data",
                    i as u64 * bs
                )));
            }
            // All data blocks now fit below the new block count.
            self.defrag(st)?;
            st.map.truncate(new_blocks as usize);
            st.hdr.blocks_in_image = new_blocks;
            st.hdr.disk_size = new_size;
            st.rebuild()?;
            self.write_header(st)?;
            return self.file.sync();
        }
        // Growing: the tail of the old last block must read as zero once visible.
        if old_size % bs != 0 {
            let e = st.map[(old_size / bs) as usize];
            if is_allocated(e) {
                let host = st.hdr.slot_offset(e) + old_size % bs;
                self.file.write_zeroes(host, bs - old_size % bs)?;
            }
        }
        if new_blocks <= st.hdr.blocks_in_image {
            st.hdr.disk_size = new_size;
            self.write_header(st)?;
            return self.file.sync();
        }
        let slot = st.hdr.slot_size();
        let need = (new_blocks as u64 * 4).div_ceil(SECTOR) * SECTOR;
        let room = st.hdr.offset_data as u64 - st.hdr.offset_bmap as u64;
        if need > room {
            let shift = (need - room).div_ceil(slot);
            let new_data = st.hdr.offset_data as u64 + shift * slot;
            if new_data > u32::MAX as u64 {
                return Err(Error::too_large(format!(
                    "{name}: the block map for {new_blocks} blocks does not fit before offset 4 GiB"
                )));
            }
            // Move the data blocks in the way to the end of the data area.
            let top = (0..st.used.len()).rev().find(|&s| st.used.get(s));
            let mut next = top.map_or(0, |t| t as u64 + 1).max(shift);
            for idx in 0..st.map.len() {
                let e = st.map[idx];
                if is_allocated(e) && (e as u64) < shift {
                    self.copy_slot(&st.hdr, e, next as u32)?;
                    st.map[idx] = next as u32;
                    next += 1;
                }
            }
            self.file.sync()?;
            for e in st.map.iter_mut() {
                if is_allocated(*e) {
                    *e -= shift as u32;
                }
            }
            st.hdr.offset_data = new_data as u32;
        }
        let old_blocks = st.map.len() as u32;
        st.map.resize(new_blocks as usize, BLOCK_FREE);
        st.hdr.blocks_in_image = new_blocks;
        st.hdr.disk_size = new_size;
        st.rebuild()?;
        if fixed {
            for idx in old_blocks..new_blocks {
                let s = st.alloc_slot()?;
                st.map[idx as usize] = s;
                let host = st.hdr.slot_offset(s);
                if host < self.file.len()? {
                    self.file.write_zeroes(host, bs)?;
                }
            }
            let end = st.hdr.offset_data as u64 + st.count as u64 * slot;
            if self.file.len()? < end {
                self.file.set_len(end)?;
            }
        }
        st.hdr.blocks_allocated = st.count;
        let n = st.map.len();
        self.write_meta(st, 0, n - 1, true, COMBINE_LARGE)?;
        self.file.sync()
    }
}
