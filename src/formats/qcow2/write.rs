//! Guest writes: data (with copy-on-write), zeroes, discards and compressed clusters.

use super::header;
use super::tables::Meta;
use super::{Kind, Qcow2, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{Error, Result};
use crate::formats::Prepared;

const ALL_ALLOC: u64 = 0xffff_ffff;
const ALL_ZERO: u64 = 0xffff_ffff << 32;

impl Qcow2 {
    /// Reads the current guest content of `[start, start + buf.len())` of guest cluster
    /// `gcl`, whose L2 entry is (`w`, `bm`).
    pub(crate) fn read_old(
        &self,
        w: u64,
        bm: u64,
        gcl: u64,
        start: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut pos = 0u64;
        let len = buf.len() as u64;
        while pos < len {
            let in_cl = start + pos;
            let sub = in_cl / self.sc;
            let k = self.classify(w, bm, sub, gcl)?;
            let unit_end = if matches!(k, Kind::Compressed(_)) {
                self.cs
            } else {
                (sub + 1) * self.sc
            };
            let n = (unit_end - in_cl).min(len - pos);
            let k = match k {
                Kind::Data(h) => Kind::Data(h + (in_cl - sub * self.sc)),
                k => k,
            };
            let guest = (gcl << self.cluster_bits) + in_cl;
            self.read_segment(k, &mut buf[pos as usize..(pos + n) as usize], guest)?;
            pos += n;
        }
        Ok(())
    }

    /// Builds the content of `[a, b)` of a cluster: old content where `data` (which covers
    /// `[start, start + data.len())`) does not reach, `data` elsewhere.
    #[allow(clippy::too_many_arguments)]
    fn merge_old(
        &self,
        w: u64,
        bm: u64,
        gcl: u64,
        a: u64,
        b: u64,
        start: u64,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let end = start + data.len() as u64;
        let mut buf = vec![0u8; (b - a) as usize];
        if start > a {
            self.read_old(w, bm, gcl, a, &mut buf[..(start - a) as usize])?;
        }
        if end < b {
            self.read_old(w, bm, gcl, end, &mut buf[(end - a) as usize..])?;
        }
        buf[(start - a) as usize..(end - a) as usize].copy_from_slice(data);
        Ok(buf)
    }

    fn write_data(&self, m: &Meta, buf: &[u8], host: u64) -> Result<()> {
        if self.has_data_file {
            return self.data()?.write_at(buf, host);
        }
        self.overlap_check(m, host, buf.len() as u64, "data")?;
        self.file.write_at(buf, host)
    }

    /// Writes `data` at `start` within guest cluster `gcl`.
    pub(crate) fn write_cluster(
        &self,
        m: &mut Meta,
        gcl: u64,
        start: u64,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.cs;
        let l1_idx = gcl / self.l2_entries;
        let idx = gcl % self.l2_entries;
        let l2 = self.l2_table_for_write(m, l1_idx)?;
        let (w, bm) = self.l2_get(m, l2, idx)?;
        let end = start + data.len() as u64;
        let full = start == 0 && end == cs;
        let host = w & L2E_OFFSET_MASK;
        let compressed = w & OFLAG_COMPRESSED != 0;
        if self.has_data_file {
            if compressed {
                return Err(self.signal_corruption(
                    m,
                    format!("Compressed cluster entry found in image with external data file (guest cluster {gcl:#x})"),
                ));
            }
            let host = gcl * cs;
            if self.ext_l2 {
                let s0 = start / self.sc;
                let s1 = end.div_ceil(self.sc);
                let buf = self.merge_old(w, bm, gcl, s0 * self.sc, s1 * self.sc, start, data)?;
                self.write_data(m, &buf, host + s0 * self.sc)?;
                let units = unit_mask(s0, s1);
                let nbm = ((bm & ALL_ALLOC) | units) | (bm & ALL_ZERO & !(units << 32));
                self.l2_set(m, l2, idx, host | OFLAG_COPIED, nbm)?;
            } else {
                let allocated = w & OFLAG_COPIED != 0 && w & OFLAG_ZERO == 0;
                if allocated || full {
                    self.write_data(m, data, host + start)?;
                } else {
                    let buf = self.merge_old(w, bm, gcl, 0, cs, start, data)?;
                    self.write_data(m, &buf, host)?;
                }
                if !allocated {
                    self.l2_set(m, l2, idx, host | OFLAG_COPIED, 0)?;
                }
            }
            return Ok(());
        }
        let inplace = !compressed && host != 0 && w & OFLAG_COPIED != 0;
        if !self.ext_l2 {
            if inplace && w & OFLAG_ZERO == 0 {
                return self.write_data(m, data, host + start);
            }
            if inplace {
                // preallocated zero cluster
                let mut buf = vec![0u8; cs as usize];
                buf[start as usize..end as usize].copy_from_slice(data);
                self.write_data(m, &buf, host)?;
                return self.l2_set(m, l2, idx, w & !OFLAG_ZERO, 0);
            }
            let new = self.alloc_clusters(m, 1)?;
            if full {
                self.write_data(m, data, new)?;
            } else {
                let buf = self.merge_old(w, bm, gcl, 0, cs, start, data)?;
                self.write_data(m, &buf, new)?;
            }
            self.free_entry(m, w);
            return self.l2_set(m, l2, idx, new | OFLAG_COPIED, 0);
        }
        // extended L2
        let s0 = start / self.sc;
        let s1 = end.div_ceil(self.sc);
        let units = unit_mask(s0, s1);
        let (a, b) = (s0 * self.sc, s1 * self.sc);
        if inplace {
            let buf = self.merge_old(w, bm, gcl, a, b, start, data)?;
            self.write_data(m, &buf, host + a)?;
            let nbm = ((bm & ALL_ALLOC) | units) | (bm & ALL_ZERO & !(units << 32));
            return self.l2_set(m, l2, idx, w, nbm);
        }
        let has_data = compressed || (host != 0 && bm & ALL_ALLOC != 0);
        let new = self.alloc_clusters(m, 1)?;
        if has_data {
            // copy the whole cluster; every subcluster becomes allocated
            let buf = self.merge_old(w, bm, gcl, 0, cs, start, data)?;
            self.write_data(m, &buf, new)?;
            self.free_entry(m, w);
            return self.l2_set(m, l2, idx, new | OFLAG_COPIED, ALL_ALLOC);
        }
        let buf = self.merge_old(w, bm, gcl, a, b, start, data)?;
        self.write_data(m, &buf, new + a)?;
        self.free_entry(m, w);
        let nbm = units | (bm & ALL_ZERO & !(units << 32));
        self.l2_set(m, l2, idx, new | OFLAG_COPIED, nbm)
    }

    pub(crate) fn write_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.invalidate_ccache();
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let gcl = pos >> self.cluster_bits;
            let in_cl = pos & (self.cs - 1);
            let s = (pos - offset) as usize;
            if in_cl == 0 && end - pos >= 2 * self.cs {
                let k = self.write_fresh_clusters(&mut m, gcl, &buf[s..])?;
                if k > 0 {
                    pos += k * self.cs;
                    continue;
                }
            }
            let n = (self.cs - in_cl).min(end - pos);
            self.write_cluster(&mut m, gcl, in_cl, &buf[s..s + n as usize])?;
            pos += n;
        }
        Ok(())
    }

    /// Writes whole clusters from `gcl` on while their entries are unallocated (at least two,
    /// within one L2 table) with a single allocation and a single write, as qemu does for
    /// sequential data. Returns how many clusters it wrote (0: none, use the slow path).
    fn write_fresh_clusters(&self, m: &mut Meta, gcl: u64, data: &[u8]) -> Result<u64> {
        if self.has_data_file {
            return Ok(0);
        }
        let max_k = data.len() as u64 / self.cs;
        let l1_idx = gcl / self.l2_entries;
        let room = self.l2_entries - gcl % self.l2_entries;
        // A new refcount block takes the first cluster of its range: a run longer than
        // half a range could never be found contiguous.
        let max_k = max_k.min(room).min(self.rb_entries() / 2);
        if max_k < 2 {
            return Ok(0);
        }
        let l2 = self.l2_table_for_write(m, l1_idx)?;
        let mut k = 0;
        while k < max_k {
            let (w, bm) = self.l2_get(m, l2, (gcl + k) % self.l2_entries)?;
            if w != 0 || (self.ext_l2 && bm & ALL_ALLOC != 0) {
                break;
            }
            k += 1;
        }
        if k < 2 {
            return Ok(0);
        }
        let new = self.alloc_clusters(m, k)?;
        self.write_data(m, &data[..(k * self.cs) as usize], new)?;
        let bm = if self.ext_l2 { ALL_ALLOC } else { 0 };
        for i in 0..k {
            let host = new + i * self.cs;
            self.l2_set(m, l2, (gcl + i) % self.l2_entries, host | OFLAG_COPIED, bm)?;
        }
        Ok(k)
    }

    /// Makes a whole guest cluster read as zero.
    fn zero_cluster(&self, m: &mut Meta, gcl: u64, unmap: bool) -> Result<()> {
        let l1_idx = gcl / self.l2_entries;
        let idx = gcl % self.l2_entries;
        if self.hdr.version < 3 {
            // a backing file named in the header counts even when it was not opened
            // (convert -n opens its target without): unallocated would show it through
            if self.backing.is_some() || self.hdr.backing_file.is_some() {
                let zeros = vec![0u8; self.cs as usize];
                return self.write_cluster(m, gcl, 0, &zeros);
            }
            // without a backing file an unallocated cluster reads as zero
            if self.l2_table_for_read(m, l1_idx)?.is_none() {
                return Ok(());
            }
            let l2 = self.l2_table_for_write(m, l1_idx)?;
            let (w, _) = self.l2_get(m, l2, idx)?;
            if w == 0 {
                return Ok(());
            }
            self.free_entry(m, w);
            return self.l2_set(m, l2, idx, 0, 0);
        }
        let l2 = self.l2_table_for_write(m, l1_idx)?;
        let (w, _) = self.l2_get(m, l2, idx)?;
        let host = w & L2E_OFFSET_MASK;
        if self.has_data_file {
            let raw = m.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0;
            let host = gcl * self.cs;
            let allocated = w & OFLAG_COPIED != 0;
            if raw {
                let len = self.cs.min(self.size - host);
                self.data()?.write_zeroes(host, len)?;
            } else if unmap && allocated {
                let len = self.cs.min(self.size - host);
                let _ = self.data()?.punch_hole(host, len)?;
            }
            let keep = raw || (allocated && !unmap);
            let nw = if keep { host | OFLAG_COPIED } else { 0 };
            return if self.ext_l2 {
                self.l2_set(m, l2, idx, nw, ALL_ZERO)
            } else {
                self.l2_set(m, l2, idx, nw | OFLAG_ZERO, 0)
            };
        }
        let keep = !unmap && host != 0 && w & OFLAG_COPIED != 0 && w & OFLAG_COMPRESSED == 0;
        let nw = if keep {
            w
        } else {
            self.free_entry(m, w);
            0
        };
        if self.ext_l2 {
            self.l2_set(m, l2, idx, nw, ALL_ZERO)
        } else {
            self.l2_set(m, l2, idx, nw | OFLAG_ZERO, 0)
        }
    }

    /// Sets zero bits for whole subclusters `[s0, s1)` (extended L2, v3).
    fn zero_subclusters(&self, m: &mut Meta, gcl: u64, s0: u64, s1: u64) -> Result<()> {
        let l2 = self.l2_table_for_write(m, gcl / self.l2_entries)?;
        let idx = gcl % self.l2_entries;
        let (w, bm) = self.l2_get(m, l2, idx)?;
        if w & OFLAG_COMPRESSED != 0 {
            let zeros = vec![0u8; ((s1 - s0) * self.sc) as usize];
            return self.write_cluster(m, gcl, s0 * self.sc, &zeros);
        }
        let host = w & L2E_OFFSET_MASK;
        if host != 0 && w & OFLAG_COPIED == 0 && bm & ALL_ALLOC != 0 {
            // shared with a snapshot: copy first, then zero
            let zeros = vec![0u8; ((s1 - s0) * self.sc) as usize];
            return self.write_cluster(m, gcl, s0 * self.sc, &zeros);
        }
        let units = unit_mask(s0, s1);
        let nbm = (bm & ALL_ALLOC & !units) | (bm & ALL_ZERO) | (units << 32);
        self.l2_set(m, l2, idx, w, nbm)
    }

    pub(crate) fn write_zeroes_impl(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.invalidate_ccache();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gcl = pos >> self.cluster_bits;
            let in_cl = pos & (self.cs - 1);
            let n = (self.cs - in_cl).min(end - pos);
            let cl_end = in_cl + n;
            let whole = in_cl == 0 && (n == self.cs || pos + n == self.size);
            if whole {
                self.zero_cluster(&mut m, gcl, unmap)?;
            } else if self.ext_l2 {
                let s0 = in_cl.div_ceil(self.sc);
                let s1 = if pos + n == self.size {
                    cl_end.div_ceil(self.sc)
                } else {
                    cl_end / self.sc
                };
                if s0 < s1 {
                    if in_cl < s0 * self.sc {
                        let z = vec![0u8; (s0 * self.sc - in_cl) as usize];
                        self.write_cluster(&mut m, gcl, in_cl, &z)?;
                    }
                    self.zero_subclusters(&mut m, gcl, s0, s1)?;
                    let tail = s1 * self.sc;
                    if tail < cl_end {
                        let z = vec![0u8; (cl_end - tail) as usize];
                        self.write_cluster(&mut m, gcl, tail, &z)?;
                    }
                } else {
                    let z = vec![0u8; n as usize];
                    self.write_cluster(&mut m, gcl, in_cl, &z)?;
                }
            } else {
                let z = vec![0u8; n as usize];
                self.write_cluster(&mut m, gcl, in_cl, &z)?;
            }
            pos += n;
        }
        Ok(())
    }

    pub(crate) fn discard_impl(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.invalidate_ccache();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gcl = pos >> self.cluster_bits;
            let in_cl = pos & (self.cs - 1);
            let n = (self.cs - in_cl).min(end - pos);
            let whole = in_cl == 0 && (n == self.cs || pos + n == self.size);
            if whole {
                self.discard_cluster(&mut m, gcl)?;
            }
            pos += n;
        }
        Ok(())
    }

    fn discard_cluster(&self, m: &mut Meta, gcl: u64) -> Result<()> {
        let l1_idx = gcl / self.l2_entries;
        if self.l2_table_for_read(m, l1_idx)?.is_none() && self.backing.is_none() {
            return Ok(());
        }
        if self.hdr.version >= 3 {
            let l2 = self.l2_table_for_write(m, l1_idx)?;
            let (w, bm) = self.l2_get(m, l2, gcl % self.l2_entries)?;
            if w == 0 && bm == 0 && self.backing.is_none() {
                return Ok(());
            }
            return self.zero_cluster(m, gcl, true);
        }
        let l2 = self.l2_table_for_write(m, l1_idx)?;
        let idx = gcl % self.l2_entries;
        let (w, _) = self.l2_get(m, l2, idx)?;
        if w == 0 {
            return Ok(());
        }
        self.free_entry(m, w);
        self.l2_set(m, l2, idx, 0, 0)
    }

    pub(crate) fn write_compressed_impl(&self, buf: &[u8], offset: u64) -> Result<()> {
        match self.compress_blob(buf, offset)? {
            Prepared::Data(c) => self.store_compressed_blob(&c, offset),
            _ => self.write_impl(buf, offset),
        }
    }

    /// Compresses one cluster for [`Qcow2::store_compressed_blob`], taking no lock (the
    /// copy engine calls it on every core): the compressed bytes, or [`Prepared::Plain`]
    /// where compression does not pay (the cluster is then stored as plain data).
    pub(crate) fn compress_blob(&self, buf: &[u8], offset: u64) -> Result<Prepared> {
        let cs = self.cs;
        if offset & (cs - 1) != 0
            || (buf.len() as u64 != cs && offset + buf.len() as u64 != self.size)
            || buf.len() as u64 > cs
        {
            return Err(Error::invalid_arg(format!(
                "{}: compressed writes must cover exactly one cluster (offset {offset}, length {})",
                self.filename,
                buf.len()
            )));
        }
        if self.has_data_file {
            return Err(Error::unsupported(
                "Compression is not supported with external data files",
            ));
        }
        // the tail cluster of an image is compressed padded with zeroes, as qemu does
        let padded: Vec<u8>;
        let input = if buf.len() as u64 == cs {
            buf
        } else {
            padded = [buf, &vec![0u8; cs as usize - buf.len()]].concat();
            &padded
        };
        let mut out = Vec::new();
        if super::compress::compress_into(self.compression(), input, cs as usize - 1, &mut out)? {
            Ok(Prepared::Data(out))
        } else {
            Ok(Prepared::Plain)
        }
    }

    /// Stores the compressed bytes made by [`Qcow2::compress_blob`] for the cluster at
    /// `offset`.
    pub(crate) fn store_compressed_blob(&self, payload: &[u8], offset: u64) -> Result<()> {
        let cs = self.cs;
        if offset & (cs - 1) != 0 || payload.len() as u64 >= cs {
            return Err(Error::invalid_arg(format!(
                "{}: bad compressed cluster for offset {offset}",
                self.filename
            )));
        }
        let c = payload;
        let clen = c.len() as u64;
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.invalidate_ccache();
        let gcl = offset >> self.cluster_bits;
        let l2 = self.l2_table_for_write(&mut m, gcl / self.l2_entries)?;
        let idx = gcl % self.l2_entries;
        let (w, _) = self.l2_get(&mut m, l2, idx)?;
        // Compressed clusters are packed back to back, running on into the next host
        // cluster where it is free, as qemu packs them.
        let mut host = None;
        if let Some(t) = m.ctail {
            let c = t >> self.cluster_bits;
            let rc = self.refcount(&mut m, c)?;
            if rc > 0 && rc < self.refcount_max() {
                let room = ((c + 1) << self.cluster_bits) - t;
                if clen <= room || self.try_alloc_at(&mut m, c + 1, (clen - room).div_ceil(cs))? {
                    self.update_refcount(&mut m, c, 1)?;
                    host = Some(t);
                }
            }
        }
        let host = match host {
            Some(h) => h,
            None => self.alloc_clusters(&mut m, clen.div_ceil(cs))?,
        };
        let tail = host + clen;
        m.ctail = if tail & (cs - 1) == 0 {
            None
        } else {
            Some(tail)
        };
        self.write_data(&m, c, host)?;
        let shift = 62 - (self.cluster_bits - 8);
        let nsec = ((host + clen - 1) >> 9) - (host >> 9);
        let nw = OFLAG_COMPRESSED | (nsec << shift) | host;
        self.free_entry(&mut m, w);
        self.l2_set(&mut m, l2, idx, nw, 0)
    }
}

fn unit_mask(s0: u64, s1: u64) -> u64 {
    if s1 - s0 >= 32 {
        ALL_ALLOC
    } else {
        ((1u64 << (s1 - s0)) - 1) << s0
    }
}
