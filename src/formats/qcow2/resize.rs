//! Changing the guest size of a qcow2 image (`qemu-img resize`, also used by snapshot
//! apply and `amend size=`).
//!
//! Growing enlarges the L1 table (exactly to the new size, like qemu), optionally
//! preallocates the new part, zeroes it when a backing file would otherwise show through,
//! and finally writes the new size into the header. Shrinking drops every cluster past the
//! new end (the L1 table keeps its size, its cropped entries are zeroed), frees refcount
//! blocks that no longer count anything and truncates the file after the last used cluster.
//!
//! The in-memory guest size of the driver is not updated: a resized image must be closed
//! (every caller does so right away).

use super::create::Prealloc;
use super::tables::Meta;
use super::{header, Qcow2, L2E_OFFSET_MASK, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{Error, Result};

impl Qcow2 {
    /// Every (word, bitmap) of the L2 table at `off`.
    pub(crate) fn l2_entries_of(&self, m: &mut Meta, off: u64) -> Result<Vec<(u64, u64)>> {
        let mut v = Vec::with_capacity(self.l2_entries as usize);
        for i in 0..self.l2_entries {
            v.push(self.l2_get(m, off, i)?);
        }
        Ok(v)
    }

    /// Changes the guest size to `new` (the caller has checked consent to shrink).
    pub(crate) fn resize_impl(&self, new: u64, prealloc: Option<&str>) -> Result<()> {
        let mode = match prealloc {
            None | Some("off") => Prealloc::Off,
            Some("metadata") => Prealloc::Metadata,
            Some("falloc") => Prealloc::Falloc,
            Some("full") => Prealloc::Full,
            Some(o) => {
                return Err(Error::unsupported(format!(
                    "Unsupported preallocation mode '{o}'"
                )))
            }
        };
        if new % 512 != 0 {
            return Err(Error::invalid_arg("The new size must be a multiple of 512"));
        }
        let snapshots = super::snapshot::read_table(self)?;
        if !snapshots.is_empty() && self.hdr.version < 3 {
            return Err(Error::unsupported(
                "Can't resize a v2 image which has snapshots",
            ));
        }
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        let old = self.current_size()?;
        self.resize_locked(&mut m, old, new, mode)?;
        self.flush_meta(&mut m)
    }

    /// The guest size as the header on disk says.
    pub(crate) fn current_size(&self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.file.read_at(&mut b, 24)?;
        Ok(u64::from_be_bytes(b))
    }

    pub(crate) fn resize_locked(
        &self,
        m: &mut Meta,
        old: u64,
        new: u64,
        mode: Prealloc,
    ) -> Result<()> {
        super::bitmap::resize_bitmaps_check(self)?;
        if new < old {
            if mode != Prealloc::Off {
                return Err(Error::invalid_arg(
                    "Preallocation can't be used for shrinking an image",
                ));
            }
            // The new size first: a crash then leaves the smaller image with clusters past
            // its end still referenced or leaked, never the old size with its tail gone.
            self.file.write_at(&new.to_be_bytes(), 24)?;
            self.file.sync()?;
            self.shrink(m, old, new)?;
            self.flush_meta(m)?;
        } else {
            self.grow(m, old, new, mode)?;
            self.flush_meta(m)?;
            self.file.write_at(&new.to_be_bytes(), 24)?;
            self.file.sync()?;
        }
        super::bitmap::resize_bitmaps(self, m, new)?;
        Ok(())
    }

    fn shrink(&self, m: &mut Meta, old: u64, new: u64) -> Result<()> {
        let cs = self.cs;
        let new_l1 = new.div_ceil(cs).div_ceil(self.l2_entries);
        let first = new.div_ceil(cs);
        let end = old.div_ceil(cs);
        // Entries past the new end in the L2 tables that stay.
        let mut gcl = first;
        while gcl < end {
            let l1_idx = gcl / self.l2_entries;
            if l1_idx >= new_l1 {
                break;
            }
            let stop = ((l1_idx + 1) * self.l2_entries).min(end);
            if self.l2_table_for_read(m, l1_idx)?.is_some() {
                for g in gcl..stop {
                    let l2 = self.l2_table_for_read(m, l1_idx)?.unwrap_or(0);
                    let (w, bm) = self.l2_get(m, l2, g % self.l2_entries)?;
                    if w == 0 && bm == 0 {
                        continue;
                    }
                    let l2 = self.l2_table_for_write(m, l1_idx)?;
                    self.free_entry(m, w);
                    self.l2_set(m, l2, g % self.l2_entries, 0, 0)?;
                }
            }
            gcl = stop;
        }
        // Whole L2 tables past the new end.
        let l1_len = m.l1.len() as u64;
        for i in new_l1..l1_len {
            let Some(l2) = self.l2_table_for_read(m, i)? else {
                if m.l1[i as usize] != 0 {
                    m.l1[i as usize] = 0;
                    m.l1_dirty = true;
                }
                continue;
            };
            for (w, _) in self.l2_entries_of(m, l2)? {
                self.free_entry(m, w);
            }
            m.pending_free.push(l2 >> self.cluster_bits);
            m.l1[i as usize] = 0;
            m.l1_dirty = true;
            m.changed = true;
        }
        let frees = m.pending_free.clone();
        self.flush_meta(m)?;
        self.shrink_reftable(m)?;
        self.truncate_tail(m)?;
        // what was freed inside the file goes back to the host (qemu discards it)
        self.punch_freed(m, frees)
    }

    /// Drops refcount blocks that count nothing but (maybe) themselves.
    fn shrink_reftable(&self, m: &mut Meta) -> Result<()> {
        let rbe = self.rb_entries();
        let mut dropped = Vec::new();
        for r in 0..m.rt.len() as u64 {
            let off = m.rt[r as usize] & super::REFT_OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let own = off >> self.cluster_bits;
            let mut unused = true;
            for i in 0..rbe {
                let c = r * rbe + i;
                if c == own {
                    continue;
                }
                if self.refcount(m, c)? != 0 {
                    unused = false;
                    break;
                }
            }
            if unused {
                dropped.push((r, own));
            }
        }
        if dropped.is_empty() {
            return Ok(());
        }
        for &(r, _) in &dropped {
            m.rt[r as usize] = 0;
        }
        let mut raw = vec![0u8; (m.rt_clusters * self.cs) as usize];
        for (i, &v) in m.rt.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        self.file.write_at(&raw, m.rt_offset)?;
        self.file.sync()?;
        for (r, own) in dropped {
            if own / rbe != r {
                // counted by another block
                self.update_refcount(m, own, -1)?;
            }
            if own < m.free_hint {
                m.free_hint = own;
            }
        }
        self.write_dirty_refblocks(m)?;
        Ok(())
    }

    /// The index of the last host cluster with a non-zero refcount below `limit`.
    pub(crate) fn last_used_cluster(&self, m: &mut Meta, limit: u64) -> Result<Option<u64>> {
        let rbe = self.rb_entries();
        let mut c = limit;
        while c > 0 {
            let r = (c - 1) / rbe;
            let has = (r as usize) < m.rt.len() && m.rt[r as usize] & super::REFT_OFFSET_MASK != 0;
            if !has {
                c = r * rbe;
                continue;
            }
            if self.refcount(m, c - 1)? > 0 {
                return Ok(Some(c - 1));
            }
            c -= 1;
        }
        Ok(None)
    }

    fn truncate_tail(&self, m: &mut Meta) -> Result<()> {
        let flen = self.file.len()?;
        let Some(last) = self.last_used_cluster(m, flen.div_ceil(self.cs))? else {
            return Err(self.signal_corruption(
                m,
                "There are no references in the refcount table.".to_string(),
            ));
        };
        let end = (last + 1) * self.cs;
        if end < flen {
            self.file.set_len(end)?;
            m.end = last + 1;
            if m.free_hint > m.end {
                m.free_hint = m.end;
            }
        }
        Ok(())
    }

    fn grow(&self, m: &mut Meta, old: u64, new: u64, mode: Prealloc) -> Result<()> {
        let cs = self.cs;
        let zero_new = self
            .backing
            .as_ref()
            .is_some_and(|b| b.virtual_size() > old)
            && new > old;
        if zero_new && self.hdr.version < 3 {
            return Err(Error::unsupported(
                "Failed to zero out new clusters: Operation not supported",
            ));
        }
        let need = new.div_ceil(cs).div_ceil(self.l2_entries);
        if need > m.l1.len() as u64 {
            self.grow_l1(m, need)?;
        }
        let raw = m.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let mode = if raw && mode == Prealloc::Off {
            Prealloc::Metadata
        } else {
            mode
        };
        if new == old {
            return Ok(());
        }
        let mut fresh = Vec::new();
        let whole_zero = matches!(mode, Prealloc::Falloc | Prealloc::Full);
        match mode {
            Prealloc::Off => {
                if let Some(d) = &self.data_file {
                    if self.has_data_file {
                        d.set_len(new)?;
                    }
                }
            }
            _ => {
                let head = self.preallocate_head(m, old, mode)?;
                fresh = self.preallocate_range(m, old, new, mode)?;
                if let Some(gcl) = head {
                    if whole_zero && fresh.first() != Some(&gcl) {
                        fresh.insert(0, gcl);
                    }
                }
            }
        }
        if zero_new {
            // falloc and full preallocation leave the clusters they allocate reading as zero
            // (qemu-img sets no zero flag there); metadata needs the flag
            if !whole_zero {
                fresh.clear();
            }
            self.zero_new_area(m, old, new, &fresh)?;
        }
        Ok(())
    }

    /// Whether L2 entry `w` has a data cluster of its own (compressed ones are shared
    /// bytes); with an external data file, whether its cluster there is allocated.
    fn has_own_cluster(&self, w: u64) -> bool {
        if self.has_data_file {
            w & OFLAG_COPIED != 0
        } else {
            w & L2E_OFFSET_MASK != 0 && w & super::OFLAG_COMPRESSED == 0
        }
    }

    /// Preallocation of a size that ends inside a cluster: the part of that cluster below
    /// the old size keeps what the guest read there (from the backing file, say), the part
    /// above reads as zero. Written once whole, like a copy-on-write; with falloc and full,
    /// also where the cluster was allocated already (what lies beyond the old size is stale).
    /// Returns the guest cluster if it wrote it.
    fn preallocate_head(&self, m: &mut Meta, old: u64, mode: Prealloc) -> Result<Option<u64>> {
        let in_cl = old & (self.cs - 1);
        if in_cl == 0 {
            return Ok(None);
        }
        let gcl = old >> self.cluster_bits;
        let l2 = self.l2_table_for_write(m, gcl / self.l2_entries)?;
        let (w, bm) = self.l2_get(m, l2, gcl % self.l2_entries)?;
        if self.has_own_cluster(w) && !matches!(mode, Prealloc::Falloc | Prealloc::Full) {
            return Ok(None);
        }
        // with subclusters and metadata preallocation, from the subcluster of the old size
        // on (those below keep their state, as qemu's copy-on-write of a subcluster)
        let whole = !self.ext_l2 || matches!(mode, Prealloc::Falloc | Prealloc::Full);
        let from = if whole { 0 } else { in_cl / self.sc * self.sc };
        let mut buf = vec![0u8; (self.cs - from) as usize];
        self.read_old(w, bm, gcl, from, &mut buf[..(in_cl - from) as usize])?;
        self.write_cluster(m, gcl, from, &buf)?;
        Ok(Some(gcl))
    }

    /// Makes `[old, new)` read as zero instead of the backing file; the guest clusters in
    /// `fresh` (sorted) were just preallocated with zeroes and are left alone.
    fn zero_new_area(&self, m: &mut Meta, old: u64, new: u64, fresh: &[u64]) -> Result<()> {
        let sc = self.sc;
        let zstart = old.div_ceil(sc) * sc;
        if zstart > old {
            // explicit zeroes for the unaligned head, through the normal write path
            let len = zstart.min(new) - old;
            let zeros = vec![0u8; len as usize];
            drop_guard_write(self, m, &zeros, old)?;
        }
        let mut pos = zstart;
        while pos < new {
            let gcl = pos >> self.cluster_bits;
            let in_cl = pos & (self.cs - 1);
            let n = (self.cs - in_cl).min(new - pos);
            if fresh.binary_search(&gcl).is_ok() {
                pos += n;
                continue;
            }
            let l1_idx = gcl / self.l2_entries;
            let idx = gcl % self.l2_entries;
            let l2 = self.l2_table_for_write(m, l1_idx)?;
            let (w, bm) = self.l2_get(m, l2, idx)?;
            if self.ext_l2 {
                let s0 = in_cl / sc;
                let s1 = (in_cl + n).div_ceil(sc);
                let units = if s1 - s0 >= 32 {
                    0xffff_ffffu64
                } else {
                    ((1u64 << (s1 - s0)) - 1) << s0
                };
                let nbm = (bm & 0xffff_ffff & !units) | (bm & !0xffff_ffffu64) | (units << 32);
                self.l2_set(m, l2, idx, w, nbm)?;
            } else if in_cl == 0 {
                let host = w & L2E_OFFSET_MASK;
                let keep = host != 0 && w & OFLAG_COPIED != 0 && w & super::OFLAG_COMPRESSED == 0;
                let nw = if keep {
                    w
                } else {
                    self.free_entry(m, w);
                    0
                };
                self.l2_set(m, l2, idx, nw | OFLAG_ZERO, 0)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Allocates L2 tables and data clusters for the guest range `[old, new)` (metadata,
    /// falloc, full); returns the guest clusters it allocated (in the image file: falloc and
    /// full leave them reading as zero).
    fn preallocate_range(
        &self,
        m: &mut Meta,
        old: u64,
        new: u64,
        mode: Prealloc,
    ) -> Result<Vec<u64>> {
        let cs = self.cs;
        let first = old >> self.cluster_bits;
        let end = new.div_ceil(cs);
        // L2 tables first, so that the data lies in one run after them.
        let mut l1_idx = first / self.l2_entries;
        while l1_idx * self.l2_entries < end {
            self.l2_table_for_write(m, l1_idx)?;
            l1_idx += 1;
        }
        let mut todo = Vec::new();
        for gcl in first..end {
            let l2 = self.l2_table_for_write(m, gcl / self.l2_entries)?;
            let (w, _) = self.l2_get(m, l2, gcl % self.l2_entries)?;
            if !self.has_own_cluster(w) {
                todo.push(gcl);
            }
        }
        if self.has_data_file {
            for &gcl in &todo {
                let l2 = self.l2_table_for_write(m, gcl / self.l2_entries)?;
                let (_, bm) = self.l2_get(m, l2, gcl % self.l2_entries)?;
                self.l2_set(m, l2, gcl % self.l2_entries, (gcl * cs) | OFLAG_COPIED, bm)?;
            }
            self.flush_meta(m)?;
            if let Some(d) = &self.data_file {
                let cur = d.len()?;
                if cur < new {
                    let rm = match mode {
                        Prealloc::Full => Some(crate::formats::raw::Prealloc::Full),
                        Prealloc::Falloc => Some(crate::formats::raw::Prealloc::Falloc),
                        _ => None,
                    };
                    match rm {
                        Some(rm) => crate::formats::raw::preallocate(d, cur, new, rm)?,
                        None => d.set_len(new)?,
                    }
                }
            }
            return Ok(Vec::new());
        }
        if todo.is_empty() {
            return Ok(todo);
        }
        let n = todo.len() as u64;
        let start = self.alloc_clusters(m, n)?;
        // falloc and full clusters read as zero: with subclusters, every one is allocated
        let all = self.ext_l2 && matches!(mode, Prealloc::Falloc | Prealloc::Full);
        for (i, &gcl) in todo.iter().enumerate() {
            let l2 = self.l2_table_for_write(m, gcl / self.l2_entries)?;
            let (_, bm) = self.l2_get(m, l2, gcl % self.l2_entries)?;
            let bm = if all { 0xffff_ffff } else { bm };
            self.l2_set(
                m,
                l2,
                gcl % self.l2_entries,
                (start + i as u64 * cs) | OFLAG_COPIED,
                bm,
            )?;
        }
        // the data is written (or reserved) before the tables reference it
        let dend = start + n * cs;
        match mode {
            Prealloc::Full => {
                let zeros = vec![0u8; (1u64 << 20).min(n * cs) as usize];
                let mut off = start;
                while off < dend {
                    let k = (dend - off).min(zeros.len() as u64) as usize;
                    self.file.write_at(&zeros[..k], off)?;
                    off += k as u64;
                }
            }
            Prealloc::Falloc => {
                let len = self.file.len()?;
                if start < len {
                    // clusters freed inside the file hold stale data
                    self.file.write_zeroes(start, len.min(dend) - start)?;
                }
                if len < dend {
                    self.file.set_len(dend)?;
                }
                self.file.allocate(start, dend - start)?;
            }
            _ => {
                // as far as the last (sub)cluster the guest size reaches, as qemu-img does
                let mut fend = dend;
                if todo.last() == Some(&(end - 1)) {
                    let tail = new - (end - 1) * cs;
                    fend = dend - cs + tail.div_ceil(self.sc) * self.sc;
                }
                if self.file.len()? < fend {
                    self.file.set_len(fend)?;
                }
            }
        }
        self.flush_meta(m)?;
        Ok(todo)
    }
}

/// A guest write (within one cluster or across several) while the metadata lock is held.
fn drop_guard_write(q: &Qcow2, m: &mut Meta, buf: &[u8], off: u64) -> Result<()> {
    let end = off + buf.len() as u64;
    let mut pos = off;
    while pos < end {
        let gcl = pos >> q.cluster_bits;
        let in_cl = pos & (q.cs - 1);
        let n = (q.cs - in_cl).min(end - pos);
        let s = (pos - off) as usize;
        q.write_cluster(m, gcl, in_cl, &buf[s..s + n as usize])?;
        pos += n;
    }
    Ok(())
}
