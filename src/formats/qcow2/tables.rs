//! Metadata state: the L1 table, cached L2 tables and refcount blocks, the cluster
//! allocator and the ordered flush.
//!
//! Ordering (what makes a crash leave at most leaks):
//! - a new reference is only written (L2, L1) after the refcount increment that covers it
//!   has reached the disk: `flush_meta` writes refcount blocks, syncs, then L2 tables,
//!   syncs, then the L1 table;
//! - refcount decrements are kept in `pending_free` and applied only after the L2/L1 writes
//!   that drop the references are on disk; the clusters are not reused before that;
//! - refcount blocks and refcount table growth are written (and synced) at once.

use super::header::{self, Header};
use super::{
    Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, REFT_OFFSET_MASK,
};
use crate::error::{Error, ErrorKind, Result};
use crate::io::HostFile;

/// Bytes of cached tables of each kind.
const L2_CACHE_BYTES: u64 = crate::limits::QCOW2_L2_CACHE_BYTES;
const RB_CACHE_BYTES: u64 = crate::limits::QCOW2_REFCOUNT_CACHE_BYTES;

pub(crate) struct Slot {
    pub data: Vec<u8>,
    pub dirty: bool,
    used: u64,
}

use crate::formats::OffsetMap;

/// A bounded LRU cache of cluster-sized tables keyed by their host offset.
pub(crate) struct Cache {
    map: OffsetMap<u64, Slot>,
    tick: u64,
    cap: usize,
}

impl Cache {
    fn new(cluster_size: u64, bytes: u64, min: usize, max: usize) -> Cache {
        Cache {
            map: OffsetMap::default(),
            tick: 0,
            cap: ((bytes / cluster_size) as usize).clamp(min, max),
        }
    }
    fn get(&mut self, off: u64) -> Option<&mut Slot> {
        self.tick += 1;
        let t = self.tick;
        let s = self.map.get_mut(&off)?;
        s.used = t;
        Some(s)
    }
    fn victim(&self) -> Option<u64> {
        if self.map.len() < self.cap {
            return None;
        }
        self.map.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k)
    }
    fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.tick += 1;
        self.map.insert(
            off,
            Slot {
                data,
                dirty,
                used: self.tick,
            },
        );
    }
    fn dirty_keys(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }
    /// Drops a table from the cache (it no longer belongs to the image).
    pub(crate) fn forget(&mut self, off: u64) {
        self.map.remove(&off);
    }
    pub(crate) fn keys(&self) -> impl Iterator<Item = &u64> {
        self.map.keys()
    }
}

/// Mutable metadata of an open image.
pub(crate) struct Meta {
    pub l1: Vec<u64>,
    pub l1_offset: u64,
    pub l1_dirty: bool,
    pub l2: Cache,
    pub rt: Vec<u64>,
    pub rt_offset: u64,
    pub rt_clusters: u64,
    pub rb: Cache,
    pub incompat: u64,
    pub autoclear: u64,
    /// First cluster index that may be free.
    pub free_hint: u64,
    /// One past the highest cluster index known to be in use.
    pub end: u64,
    /// Refcount decrements (cluster indices) waiting for the next flush.
    pub pending_free: Vec<u64>,
    /// Next free byte in the host cluster used for compressed data.
    pub ctail: Option<u64>,
    /// The first write has set the image up (dirty bit, autoclear bits).
    pub write_started: bool,
    /// Metadata changed since the last flush.
    pub changed: bool,
}

impl Meta {
    pub(crate) fn load(file: &HostFile, h: &Header) -> Result<Meta> {
        let cs = h.cluster_size();
        let mut l1 = vec![0u64; h.l1_size as usize];
        if h.l1_size > 0 {
            let mut raw = vec![0u8; h.l1_size as usize * 8];
            file.read_at(&mut raw, h.l1_table_offset)?;
            for (i, c) in raw.chunks_exact(8).enumerate() {
                l1[i] = u64::from_be_bytes(c.try_into().unwrap());
            }
        }
        let rt_len = h.refcount_table_clusters as u64 * cs / 8;
        let mut raw = vec![0u8; (rt_len * 8) as usize];
        file.read_at(&mut raw, h.refcount_table_offset)?;
        let rt: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let flen = file.len()?;
        Ok(Meta {
            l1,
            l1_offset: h.l1_table_offset,
            l1_dirty: false,
            l2: Cache::new(cs, L2_CACHE_BYTES, 16, 4096),
            rt,
            rt_offset: h.refcount_table_offset,
            rt_clusters: h.refcount_table_clusters as u64,
            rb: Cache::new(cs, RB_CACHE_BYTES, 4, 1024),
            incompat: h.incompatible,
            autoclear: h.autoclear,
            free_hint: 0,
            end: flen.div_ceil(cs),
            pending_free: Vec::new(),
            ctail: None,
            write_started: false,
            changed: false,
        })
    }
}

fn get_be64(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().unwrap())
}
fn put_be64(b: &mut [u8], i: usize, v: u64) {
    b[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
}

impl Qcow2 {
    fn refcount_order(&self) -> u32 {
        self.hdr.refcount_order
    }
    /// Refcount entries per refcount block.
    pub(crate) fn rb_entries(&self) -> u64 {
        (self.cs * 8) >> self.refcount_order()
    }
    pub(crate) fn refcount_max(&self) -> u64 {
        let bits = 1u32 << self.refcount_order();
        if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        }
    }

    fn rb_read(&self, data: &[u8], i: u64) -> u64 {
        let order = self.refcount_order();
        match order {
            0..=2 => {
                let bits = 1u64 << order;
                let bit = i * bits;
                let byte = data[(bit / 8) as usize];
                ((byte >> (bit % 8)) as u64) & ((1 << bits) - 1)
            }
            _ => {
                let w = 1usize << (order - 3);
                let s = i as usize * w;
                let mut v = 0u64;
                for &b in &data[s..s + w] {
                    v = (v << 8) | b as u64;
                }
                v
            }
        }
    }

    fn rb_write(&self, data: &mut [u8], i: u64, v: u64) {
        let order = self.refcount_order();
        match order {
            0..=2 => {
                let bits = 1u64 << order;
                let bit = i * bits;
                let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
                let b = &mut data[(bit / 8) as usize];
                *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
            }
            _ => {
                let w = 1usize << (order - 3);
                let s = i as usize * w;
                let bytes = v.to_be_bytes();
                data[s..s + w].copy_from_slice(&bytes[8 - w..]);
            }
        }
    }

    /// Checks that a table offset read from the image is usable.
    fn check_table_offset(&self, what: &str, off: u64) -> Result<()> {
        if off & (self.cs - 1) != 0 {
            return Err(
                self.corrupt_err(format!("{what} at offset {off:#x} is not cluster-aligned"))
            );
        }
        let flen = self.file.len()?;
        if off.checked_add(self.cs).is_none_or(|e| e > flen) {
            return Err(self.corrupt_err(format!(
                "{what} at offset {off:#x} is beyond the end of the file ({flen} bytes)"
            )));
        }
        if off < self.cs {
            return Err(self.corrupt_err(format!(
                "{what} at offset {off:#x} overlaps the image header"
            )));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- L2 tables

    /// The L2 table offset for L1 index `l1_idx`, or None if unallocated.
    pub(crate) fn l2_table_for_read(&self, m: &mut Meta, l1_idx: u64) -> Result<Option<u64>> {
        if l1_idx >= m.l1.len() as u64 {
            return Ok(None);
        }
        let off = m.l1[l1_idx as usize] & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if m.l2.get(off).is_none() {
            self.check_table_offset("L2 table", off)?;
            self.l2_load(m, off)?;
        }
        Ok(Some(off))
    }

    fn l2_load(&self, m: &mut Meta, off: u64) -> Result<()> {
        let mut data = vec![0u8; self.cs as usize];
        self.file.read_at(&mut data, off)?;
        self.l2_insert(m, off, data, false)
    }

    pub(crate) fn l2_insert(
        &self,
        m: &mut Meta,
        off: u64,
        data: Vec<u8>,
        dirty: bool,
    ) -> Result<()> {
        while let Some(v) = m.l2.victim() {
            if m.l2.map[&v].dirty {
                // references may only reach the disk after their refcounts
                self.write_dirty_refblocks(m)?;
                if !self.lazy() {
                    self.file.sync()?;
                }
                let data = m.l2.map[&v].data.clone();
                self.meta_write(m, &data, v)?;
            }
            m.l2.map.remove(&v);
        }
        m.l2.insert(off, data, dirty);
        Ok(())
    }

    /// Entry `idx` of the L2 table at `off` (must be cached): (word, bitmap).
    pub(crate) fn l2_get(&self, m: &mut Meta, off: u64, idx: u64) -> Result<(u64, u64)> {
        if m.l2.get(off).is_none() {
            self.l2_load(m, off)?;
        }
        let s = m.l2.get(off).unwrap();
        if self.ext_l2 {
            Ok((
                get_be64(&s.data, idx as usize * 2),
                get_be64(&s.data, idx as usize * 2 + 1),
            ))
        } else {
            Ok((get_be64(&s.data, idx as usize), 0))
        }
    }

    pub(crate) fn l2_set(&self, m: &mut Meta, off: u64, idx: u64, w: u64, bm: u64) -> Result<()> {
        if m.l2.get(off).is_none() {
            self.l2_load(m, off)?;
        }
        let ext = self.ext_l2;
        let s = m.l2.get(off).unwrap();
        if ext {
            put_be64(&mut s.data, idx as usize * 2, w);
            put_be64(&mut s.data, idx as usize * 2 + 1, bm);
        } else {
            put_be64(&mut s.data, idx as usize, w);
        }
        s.dirty = true;
        m.changed = true;
        Ok(())
    }

    /// The L2 table for `l1_idx`, allocated or copied (snapshot-shared) so that it can be
    /// written.
    pub(crate) fn l2_table_for_write(&self, m: &mut Meta, l1_idx: u64) -> Result<u64> {
        if l1_idx >= m.l1.len() as u64 {
            return Err(self.corrupt_err(format!(
                "L1 index {l1_idx} is beyond the L1 table ({} entries)",
                m.l1.len()
            )));
        }
        let l1e = m.l1[l1_idx as usize];
        let old = l1e & L1E_OFFSET_MASK;
        if old != 0 && l1e & OFLAG_COPIED != 0 {
            if m.l2.get(old).is_none() {
                self.check_table_offset("L2 table", old)?;
                self.l2_load(m, old)?;
            }
            return Ok(old);
        }
        let new = self.alloc_clusters(m, 1)?;
        let data = if old == 0 {
            vec![0u8; self.cs as usize]
        } else {
            // Copy a table shared with a snapshot. Data cluster refcounts count the L1
            // tables that reach them, so they do not change.
            if m.l2.get(old).is_none() {
                self.check_table_offset("L2 table", old)?;
                self.l2_load(m, old)?;
            }
            let data = m.l2.get(old).unwrap().data.clone();
            m.pending_free.push(old >> self.cluster_bits);
            data
        };
        self.l2_insert(m, new, data, true)?;
        m.l1[l1_idx as usize] = new | OFLAG_COPIED;
        m.l1_dirty = true;
        m.changed = true;
        Ok(new)
    }

    /// Host clusters an L2 word references: (first cluster index, count).
    pub(crate) fn entry_clusters(&self, w: u64) -> Option<(u64, u64)> {
        if self.has_data_file && w & OFLAG_COMPRESSED == 0 {
            return None;
        }
        if w & OFLAG_COMPRESSED != 0 {
            let shift = 62 - (self.cluster_bits - 8);
            let mask = (1u64 << (self.cluster_bits - 8)) - 1;
            let coff = w & ((1u64 << shift) - 1);
            let nsec = ((w >> shift) & mask) + 1;
            let last = (coff & !511) + nsec * 512 - 1;
            let first = coff >> self.cluster_bits;
            return Some((first, (last >> self.cluster_bits) - first + 1));
        }
        let h = w & L2E_OFFSET_MASK;
        if h == 0 {
            None
        } else {
            Some((h >> self.cluster_bits, 1))
        }
    }

    /// Drops the references an L2 word holds (at the next flush).
    pub(crate) fn free_entry(&self, m: &mut Meta, w: u64) {
        if let Some((first, n)) = self.entry_clusters(w) {
            for c in first..first + n {
                m.pending_free.push(c);
            }
        }
    }

    // ---------------------------------------------------------------- refcounts

    fn lazy(&self) -> bool {
        self.hdr.compatible & header::COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Offset of the refcount block for range `r`, if any.
    fn rb_offset(&self, m: &Meta, r: u64) -> Result<Option<u64>> {
        if r >= m.rt.len() as u64 {
            return Ok(None);
        }
        let off = m.rt[r as usize] & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        Ok(Some(off))
    }

    fn rb_load(&self, m: &mut Meta, off: u64) -> Result<()> {
        if m.rb.get(off).is_some() {
            return Ok(());
        }
        self.check_table_offset("Refcount block", off)?;
        let mut data = vec![0u8; self.cs as usize];
        self.file.read_at(&mut data, off)?;
        while let Some(v) = m.rb.victim() {
            if m.rb.map[&v].dirty {
                let d = m.rb.map[&v].data.clone();
                self.meta_write(m, &d, v)?;
            }
            m.rb.map.remove(&v);
        }
        m.rb.insert(off, data, false);
        Ok(())
    }

    /// The refcount of host cluster `idx`.
    pub(crate) fn refcount(&self, m: &mut Meta, idx: u64) -> Result<u64> {
        let r = idx / self.rb_entries();
        let Some(off) = self.rb_offset(m, r)? else {
            return Ok(0);
        };
        self.rb_load(m, off)?;
        let s = m.rb.get(off).unwrap();
        Ok(self.rb_read(&s.data, idx % self.rb_entries()))
    }

    /// Adds `delta` to the refcount of cluster `idx` (its refcount block must exist).
    pub(crate) fn update_refcount(&self, m: &mut Meta, idx: u64, delta: i64) -> Result<()> {
        let rbe = self.rb_entries();
        let r = idx / rbe;
        let off = match self.rb_offset(m, r)? {
            Some(o) => o,
            None => {
                if delta < 0 {
                    return Err(self.signal_corruption(
                        m,
                        format!(
                            "Freeing cluster {:#x} with no refcount block",
                            idx << self.cluster_bits
                        ),
                    ));
                }
                self.ensure_refblock(m, r)?;
                self.rb_offset(m, r)?.unwrap()
            }
        };
        self.rb_load(m, off)?;
        let max = self.refcount_max();
        let cur = self.rb_read(&m.rb.get(off).unwrap().data, idx % rbe);
        let new = if delta < 0 {
            let d = delta.unsigned_abs();
            if cur < d {
                return Err(self.signal_corruption(
                    m,
                    format!(
                        "Refcount of cluster {:#x} would drop below zero",
                        idx << self.cluster_bits
                    ),
                ));
            }
            cur - d
        } else {
            let d = delta as u64;
            if max - cur < d {
                return Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "{}: refcount of cluster {:#x} would overflow",
                        self.filename,
                        idx << self.cluster_bits
                    ),
                ));
            }
            cur + d
        };
        let mut data = std::mem::take(&mut m.rb.get(off).unwrap().data);
        self.rb_write(&mut data, idx % rbe, new);
        let s = m.rb.get(off).unwrap();
        s.data = data;
        s.dirty = true;
        m.changed = true;
        if new == 0 && idx < m.free_hint {
            m.free_hint = idx;
        }
        Ok(())
    }

    /// Makes sure range `r` has a refcount block (creating it at the first cluster of its
    /// range, which is free when the range has no block), growing the table if needed.
    fn ensure_refblock(&self, m: &mut Meta, r: u64) -> Result<()> {
        if r >= m.rt.len() as u64 {
            self.grow_reftable(m, r + 1)?;
        }
        if self.rb_offset(m, r)?.is_some() {
            return Ok(());
        }
        let rbe = self.rb_entries();
        let idx = r * rbe;
        let off = idx << self.cluster_bits;
        if off > header::MAX_CLUSTER_OFFSET {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("{}: image file is full", self.filename),
            ));
        }
        let mut data = vec![0u8; self.cs as usize];
        self.rb_write(&mut data, 0, 1);
        self.meta_write(m, &data, off)?;
        self.file.sync()?;
        m.rt[r as usize] = off;
        let mut e = [0u8; 8];
        e.copy_from_slice(&off.to_be_bytes());
        self.meta_write(m, &e, m.rt_offset + r * 8)?;
        m.end = m.end.max(idx + 1);
        Ok(())
    }

    /// Moves the refcount table to a bigger one of at least `min_entries` entries.
    fn grow_reftable(&self, m: &mut Meta, min_entries: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let cs = self.cs;
        let per_cluster = cs / 8;
        let old_len = m.rt.len() as u64;
        let start = m.end.max(self.file.len()?.div_ceil(cs));
        let mut k = 0u64;
        let mut tc = 0u64;
        let mut missing: Vec<u64>;
        loop {
            let region_end = start + k + tc;
            let need = min_entries
                .max(old_len + old_len / 2)
                .max(region_end.div_ceil(rbe) + 1);
            let entries = need.div_ceil(per_cluster) * per_cluster;
            let ntc = entries / per_cluster;
            let region_end = start + k + ntc;
            missing = (start / rbe..region_end.div_ceil(rbe))
                .filter(|&r| r >= old_len || m.rt[r as usize] & REFT_OFFSET_MASK == 0)
                .collect();
            let nk = missing.len() as u64;
            if nk == k && ntc == tc {
                break;
            }
            k = nk;
            tc = ntc;
        }
        if tc * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::too_large(format!(
                "{}: the refcount table would exceed the maximum size",
                self.filename
            )));
        }
        let end = start + k + tc;
        // New refcount blocks for ranges without one: they describe the region.
        let mut new_rt = m.rt.clone();
        new_rt.resize((tc * per_cluster) as usize, 0);
        for (j, &r) in missing.iter().enumerate() {
            let boff = (start + j as u64) << self.cluster_bits;
            let mut data = vec![0u8; cs as usize];
            for c in (r * rbe).max(start)..((r + 1) * rbe).min(end) {
                self.rb_write(&mut data, c - r * rbe, 1);
            }
            self.meta_write(m, &data, boff)?;
            new_rt[r as usize] = boff;
        }
        m.rt = new_rt;
        // Clusters of the region in ranges that already had a block.
        for c in start..end {
            let r = c / rbe;
            if !missing.contains(&r) {
                self.update_refcount(m, c, 1)?;
            }
        }
        self.write_dirty_refblocks(m)?;
        let table_off = (start + k) << self.cluster_bits;
        let mut raw = vec![0u8; (tc * cs) as usize];
        for (i, &v) in m.rt.iter().enumerate() {
            put_be64(&mut raw, i, v);
        }
        self.meta_write(m, &raw, table_off)?;
        self.file.sync()?;
        let mut hb = [0u8; 12];
        hb[..8].copy_from_slice(&table_off.to_be_bytes());
        hb[8..].copy_from_slice(&(tc as u32).to_be_bytes());
        self.file.write_at(&hb, 48)?;
        self.file.sync()?;
        let (old_off, old_clusters) = (m.rt_offset, m.rt_clusters);
        m.rt_offset = table_off;
        m.rt_clusters = tc;
        m.end = m.end.max(end);
        for c in 0..old_clusters {
            self.update_refcount(m, (old_off >> self.cluster_bits) + c, -1)?;
        }
        Ok(())
    }

    /// Allocates `n` contiguous free clusters (refcount 1); returns the host offset.
    ///
    /// A range of clusters without a refcount block is free throughout. The blocks such
    /// ranges need are placed right in front of the run (`k` clusters, then the `n` asked
    /// for), so that a run may be longer than one block describes: placing each block at the
    /// start of its own range would leave no free run longer than a range.
    pub(crate) fn alloc_clusters(&self, m: &mut Meta, n: u64) -> Result<u64> {
        let rbe = self.rb_entries();
        let mut start = m.free_hint.max(1);
        // The first free cluster the scan passes over (too short a run for `n`).
        let mut first_free: Option<u64> = None;
        'outer: loop {
            // k: the new refcount blocks the ranges of start..start+k+n lack
            let mut k = 0u64;
            loop {
                let end = start + k + n;
                if end << self.cluster_bits > header::MAX_CLUSTER_OFFSET {
                    return Err(Error::new(
                        ErrorKind::NoSpace,
                        format!("{}: no free cluster left in the image", self.filename),
                    ));
                }
                let mut missing = 0u64;
                for r in start / rbe..=(end - 1) / rbe {
                    if self.rb_offset(m, r)?.is_none() {
                        missing += 1;
                    }
                }
                if missing <= k {
                    break;
                }
                k = missing;
            }
            let end = start + k + n;
            let mut c = start;
            while c < end {
                let r = c / rbe;
                if self.rb_offset(m, r)?.is_none() && !self.is_reserved(m, c) {
                    // the whole rest of the range is free
                    c = ((r + 1) * rbe).min(end);
                    continue;
                }
                if self.refcount(m, c)? != 0 || self.is_reserved(m, c) {
                    if c > start && first_free.is_none() {
                        first_free = Some(start);
                    }
                    start = c + 1;
                    continue 'outer;
                }
                c += 1;
            }
            let last_range = (end - 1) / rbe;
            if last_range >= m.rt.len() as u64 {
                // the table moves to the end of the file: search again
                self.grow_reftable(m, last_range + 1)?;
                continue 'outer;
            }
            let mut missing = Vec::new();
            for r in start / rbe..=last_range {
                if self.rb_offset(m, r)?.is_none() {
                    missing.push(r);
                }
            }
            // New blocks first (each counting the clusters of start..end in its range), on
            // disk before the table points at them.
            for (j, &r) in missing.iter().enumerate() {
                let mut data = vec![0u8; self.cs as usize];
                for c in (r * rbe).max(start)..((r + 1) * rbe).min(end) {
                    self.rb_write(&mut data, c - r * rbe, 1);
                }
                self.meta_write(m, &data, (start + j as u64) << self.cluster_bits)?;
            }
            if !missing.is_empty() {
                self.file.sync()?;
            }
            for (j, &r) in missing.iter().enumerate() {
                let off = (start + j as u64) << self.cluster_bits;
                m.rt[r as usize] = off;
                self.meta_write(m, &off.to_be_bytes(), m.rt_offset + r * 8)?;
            }
            for c in start..end {
                if !missing.contains(&(c / rbe)) {
                    self.update_refcount(m, c, 1)?;
                }
            }
            // Everything from the old hint to `start` is taken, but for runs too short for
            // this request: the next search starts at the first of those.
            m.free_hint = first_free.unwrap_or(end);
            m.end = m.end.max(end);
            return Ok((start + k) << self.cluster_bits);
        }
    }

    /// Allocates exactly clusters `start..start+n` if they are all free (refcount 1 each);
    /// false where any is taken. Lets compressed data run on into the next cluster.
    pub(crate) fn try_alloc_at(&self, m: &mut Meta, start: u64, n: u64) -> Result<bool> {
        if (start + n) << self.cluster_bits > header::MAX_CLUSTER_OFFSET {
            return Ok(false);
        }
        let rbe = self.rb_entries();
        for c in start..start + n {
            let r = c / rbe;
            if self.rb_offset(m, r)?.is_none() {
                self.ensure_refblock(m, r)?;
            }
            if self.refcount(m, c)? != 0 || self.is_reserved(m, c) {
                return Ok(false);
            }
        }
        for c in start..start + n {
            self.update_refcount(m, c, 1)?;
        }
        if m.free_hint == start {
            m.free_hint = start + n;
        }
        m.end = m.end.max(start + n);
        Ok(true)
    }

    /// Punches holes where the host clusters `frees` (freed already) lie, those whose
    /// refcount is still 0 and that are inside the file: the space goes back to the host, as
    /// qemu's discards on freeing do. Best effort: a file system without hole punching
    /// keeps the space.
    pub(crate) fn punch_freed(&self, m: &mut Meta, mut frees: Vec<u64>) -> Result<()> {
        frees.sort_unstable();
        frees.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in frees {
            if self.refcount(m, c)? != 0 || self.is_reserved(m, c) {
                continue;
            }
            match runs.last_mut() {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        let flen = self.file.len()?;
        for (s, n) in runs {
            let off = s << self.cluster_bits;
            if off >= flen {
                continue;
            }
            let len = (n << self.cluster_bits).min(flen - off);
            let _ = self.file.punch_hole(off, len);
        }
        Ok(())
    }

    /// Clusters that must never be handed out even with refcount 0 (defensive).
    fn is_reserved(&self, m: &Meta, c: u64) -> bool {
        let off = c << self.cluster_bits;
        if off < self.cs {
            return true;
        }
        let in_range = |start: u64, len: u64| off >= start && off < start + len;
        in_range(m.rt_offset, m.rt_clusters * self.cs)
            || in_range(m.l1_offset, (m.l1.len() as u64 * 8).max(1))
    }

    /// Marks the image corrupt (v3) and returns the error.
    pub(crate) fn signal_corruption(&self, m: &mut Meta, msg: String) -> Error {
        if self.hdr.version >= 3 && self.writable && m.incompat & header::INCOMPAT_CORRUPT == 0 {
            m.incompat |= header::INCOMPAT_CORRUPT;
            let _ = self.file.write_at(&m.incompat.to_be_bytes(), 72);
            let _ = self.file.sync();
            crate::warn::emit(&format!(
                "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
            ));
        }
        self.corrupt_err(msg)
    }

    // ---------------------------------------------------------------- writing metadata

    /// Refuses metadata/data writes that would overlap the header, the L1 table or the
    /// refcount table.
    pub(crate) fn overlap_check(&self, m: &Meta, off: u64, len: u64, what: &str) -> Result<()> {
        let hits = |start: u64, l: u64| l > 0 && off < start + l && start < off + len;
        let bad = if off < self.cs {
            Some("the image header")
        } else if hits(m.rt_offset, m.rt_clusters * self.cs) && what != "refcount table" {
            Some("the refcount table")
        } else if hits(m.l1_offset, m.l1.len() as u64 * 8) && what != "L1 table" {
            Some("the active L1 table")
        } else if what == "data" {
            if m.l2.keys().any(|&k| hits(k, self.cs)) {
                Some("an L2 table")
            } else if m.rb.keys().any(|&k| hits(k, self.cs)) {
                Some("a refcount block")
            } else {
                None
            }
        } else {
            None
        };
        if let Some(b) = bad {
            return Err(self.corrupt_err(format!(
                "Preventing invalid write of {what} at offset {off:#x}: it would overlap {b}"
            )));
        }
        Ok(())
    }

    fn meta_write(&self, m: &Meta, data: &[u8], off: u64) -> Result<()> {
        let what = if off >= m.rt_offset && off < m.rt_offset + m.rt_clusters * self.cs {
            "refcount table"
        } else {
            "metadata"
        };
        self.overlap_check(m, off, data.len() as u64, what)?;
        self.file.write_at(data, off)
    }

    pub(crate) fn write_dirty_refblocks(&self, m: &mut Meta) -> Result<()> {
        for k in m.rb.dirty_keys() {
            let data = std::mem::take(&mut m.rb.get(k).unwrap().data);
            let r = self.meta_write(m, &data, k);
            let s = m.rb.get(k).unwrap();
            s.data = data;
            r?;
            s.dirty = false;
        }
        Ok(())
    }

    fn write_dirty_l2(&self, m: &mut Meta) -> Result<bool> {
        let keys = m.l2.dirty_keys();
        for &k in &keys {
            let data = std::mem::take(&mut m.l2.get(k).unwrap().data);
            let r = self.meta_write(m, &data, k);
            let s = m.l2.get(k).unwrap();
            s.data = data;
            r?;
            s.dirty = false;
        }
        Ok(!keys.is_empty())
    }

    pub(crate) fn write_l1(&self, m: &mut Meta) -> Result<()> {
        let mut raw = vec![0u8; m.l1.len() * 8];
        for (i, &v) in m.l1.iter().enumerate() {
            put_be64(&mut raw, i, v);
        }
        let hits_rt = m.l1_offset < m.rt_offset + m.rt_clusters * self.cs
            && m.rt_offset < m.l1_offset + raw.len() as u64;
        if m.l1_offset < self.cs || hits_rt {
            return Err(self.corrupt_err(format!(
                "Preventing invalid write of the L1 table at offset {:#x}",
                m.l1_offset
            )));
        }
        self.file.write_at(&raw, m.l1_offset)?;
        m.l1_dirty = false;
        Ok(())
    }

    /// Writes all cached metadata in the safe order and makes it durable.
    pub(crate) fn flush_meta(&self, m: &mut Meta) -> Result<()> {
        if m.changed || m.l1_dirty || !m.pending_free.is_empty() {
            self.write_dirty_refblocks(m)?;
            self.file.sync()?;
            self.write_dirty_l2(m)?;
            if m.l1_dirty {
                self.file.sync()?;
                self.write_l1(m)?;
            }
            if !m.pending_free.is_empty() {
                self.file.sync()?;
                let frees = std::mem::take(&mut m.pending_free);
                m.ctail = None;
                for c in frees {
                    self.update_refcount(m, c, -1)?;
                }
                self.write_dirty_refblocks(m)?;
            }
            m.changed = false;
        }
        self.file.sync()?;
        if let Some(d) = &self.data_file {
            if d.is_writable() {
                d.sync()?;
            }
        }
        Ok(())
    }

    /// Flushes and clears the dirty bit.
    pub(crate) fn close_meta(&self, m: &mut Meta) -> Result<()> {
        self.flush_meta(m)?;
        if m.incompat & header::INCOMPAT_DIRTY != 0 && self.hdr.version >= 3 {
            m.incompat &= !header::INCOMPAT_DIRTY;
            self.file.write_at(&m.incompat.to_be_bytes(), 72)?;
            self.file.sync()?;
            m.write_started = false;
        }
        Ok(())
    }

    /// Called at open for writing.
    pub(crate) fn prepare_write(&self) -> Result<()> {
        let m = self.meta.lock().unwrap();
        if m.incompat & header::INCOMPAT_DIRTY != 0 {
            return Err(Error::unsupported(format!(
                "{}: the image is dirty (lazy refcounts); repair it with 'qemu-img check -r all' before writing",
                self.filename
            )));
        }
        Ok(())
    }

    /// Done once before the first modification: sets the dirty bit (lazy refcounts),
    /// clears unknown autoclear bits and marks persistent bitmaps in use.
    pub(crate) fn start_write(&self, m: &mut Meta) -> Result<()> {
        if m.write_started {
            return Ok(());
        }
        if !self.writable {
            return Err(Error::unsupported(format!(
                "{}: the image is open read-only",
                self.filename
            )));
        }
        if self.hdr.version >= 3 {
            let known = header::AUTOCLEAR_MASK;
            if m.autoclear & !known != 0 {
                m.autoclear &= known;
                self.file.write_at(&m.autoclear.to_be_bytes(), 88)?;
            }
            if !self.bitmaps.is_empty() && m.autoclear & header::AUTOCLEAR_BITMAPS != 0 {
                self.mark_bitmaps_in_use()?;
            }
            if self.lazy() {
                m.incompat |= header::INCOMPAT_DIRTY;
                self.file.write_at(&m.incompat.to_be_bytes(), 72)?;
            }
            self.file.sync()?;
        }
        m.write_started = true;
        Ok(())
    }

    fn mark_bitmaps_in_use(&self) -> Result<()> {
        let Some(ext) = &self.hdr.bitmaps else {
            return Ok(());
        };
        let (_, mut dir) = header::read_bitmaps(&self.file, ext)?;
        let mut off = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let flags = u32::from_be_bytes(dir[off + 12..off + 16].try_into().unwrap()) | 1;
            dir[off + 12..off + 16].copy_from_slice(&flags.to_be_bytes());
            let name_size = u16::from_be_bytes([dir[off + 18], dir[off + 19]]) as usize;
            let extra = u32::from_be_bytes(dir[off + 20..off + 24].try_into().unwrap()) as usize;
            off += (24 + extra + name_size).div_ceil(8) * 8;
        }
        self.file.write_at(&dir, ext.directory_offset)
    }
}
