//! Consistency check (what qemu's vdi check finds) and repair.

use super::driver::{SlotSet, VdiDriver, COMBINE_LARGE};
use super::header::{is_allocated, BLOCK_ZERO};
use crate::error::{Error, Result};

/// What [`VdiDriver::check`] found (and fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VdiCheckReport {
    /// Corruptions left in the image (qemu's `corruptions`).
    pub corruptions: u64,
    /// Corruptions repaired (with `repair`).
    pub corruptions_fixed: u64,
    /// Errors that stopped the check itself.
    pub check_errors: u64,
    /// One line per problem, worded like qemu's (`ERROR: ...`), in the order found.
    pub messages: Vec<String>,
    /// Blocks in the map.
    pub total_blocks: u32,
    /// Allocated map entries counted.
    pub allocated_blocks: u32,
    /// Physical blocks inside the file that no entry uses (qemu does not report these;
    /// an interrupted compaction leaves some, `compact` reclaims them).
    pub orphaned_blocks: u64,
}

impl VdiCheckReport {
    /// No corruption left?
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.check_errors == 0
    }
}

impl VdiDriver {
    /// Checks the block map like qemu's vdi check: entries pointing past the block count,
    /// data blocks used twice, and the header's allocated-block count. With `repair`
    /// (image opened for writing), out-of-range and shared data blocks get a copy of their
    /// data in a free block (content is kept; data past the end of the file reads as zero,
    /// so such entries become zero blocks), the count is rewritten and the data area is
    /// made dense again.
    pub fn check(&self, repair: bool) -> Result<VdiCheckReport> {
        let before = self.scan()?;
        if !repair || before.corruptions == 0 {
            return Ok(before);
        }
        if !self.file.is_writable() {
            return Err(Error::unsupported(format!(
                "{}: repairing needs the image opened for writing",
                self.filename
            )));
        }
        self.repair()?;
        let mut after = self.scan()?;
        after.corruptions_fixed = before.corruptions.saturating_sub(after.corruptions);
        after.messages = before.messages;
        Ok(after)
    }

    fn scan(&self) -> Result<VdiCheckReport> {
        let st = self.rd();
        let bi = st.hdr.blocks_in_image;
        let mut rep = VdiCheckReport {
            total_blocks: bi,
            ..Default::default()
        };
        let mut seen = SlotSet::new(bi)?;
        let mut count = 0u32;
        for (block, &e) in st.map.iter().enumerate() {
            if !is_allocated(e) {
                continue;
            }
            if e < bi {
                count += 1;
                if seen.get(e) {
                    rep.messages
                        .push(format!("ERROR: block index {e} also used by {e}"));
                    rep.corruptions += 1;
                } else {
                    seen.set(e);
                }
            } else {
                rep.messages
                    .push(format!("ERROR: block index {block} too large, is {e}"));
                rep.corruptions += 1;
            }
        }
        if count != st.hdr.blocks_allocated {
            rep.messages.push(format!(
                "ERROR: allocated blocks mismatch, is {count}, should be {}",
                st.hdr.blocks_allocated
            ));
            rep.corruptions += 1;
        }
        rep.allocated_blocks = count;
        let file_len = self.file.len()?;
        let data = st.hdr.offset_data as u64;
        if file_len > data {
            let slots = (file_len - data).div_ceil(st.hdr.slot_size());
            let used_below = (0..bi)
                .take(slots.min(u32::MAX as u64) as usize)
                .filter(|&s| seen.get(s))
                .count() as u64;
            rep.orphaned_blocks = slots.saturating_sub(used_below);
        }
        Ok(rep)
    }

    fn repair(&self) -> Result<()> {
        let mut guard = self.wr();
        let st = &mut *guard;
        let bi = st.hdr.blocks_in_image;
        let file_len = self.file.len()?;
        let mut used = SlotSet::new(bi)?;
        let mut relocate = Vec::new();
        for (i, &e) in st.map.iter().enumerate() {
            if !is_allocated(e) {
                continue;
            }
            if e < bi && !used.get(e) {
                used.set(e);
            } else {
                relocate.push(i);
            }
        }
        for i in relocate {
            let e = st.map[i];
            if st.hdr.slot_offset(e) >= file_len {
                st.map[i] = BLOCK_ZERO;
                continue;
            }
            let to = used.first_clear(0).ok_or_else(|| {
                Error::corrupt(format!("{}: no free data block for repair", self.filename))
            })?;
            self.copy_slot(&st.hdr, e, to)?;
            used.set(to);
            st.map[i] = to;
        }
        self.file.sync()?;
        st.rebuild()?;
        st.hdr.blocks_allocated = st.count;
        let n = st.map.len();
        self.write_meta(st, 0, n.saturating_sub(1), true, COMBINE_LARGE)?;
        self.file.sync()?;
        self.defrag(st)?;
        Ok(())
    }
}
