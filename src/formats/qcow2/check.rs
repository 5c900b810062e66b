//! `check` and repair of qcow2 images.
//!
//! The check builds an in-memory reference count for every host cluster by walking
//! everything that references clusters (header, active and snapshot L1 tables, L2 tables,
//! data and compressed clusters, the refcount table and blocks, the snapshot table, the
//! bitmap directory and bitmap tables) and compares it with the stored refcounts. The
//! messages and counters follow `qemu-img check`.
//!
//! Repairs, each crash-safe on its own:
//! - leaks: stored refcounts are lowered to the computed value (a crash leaves leaks);
//! - refcounts too low (but not zero): raised to the computed value;
//! - a broken refcount structure (a referenced cluster with refcount 0, bad refcount table
//!   entries): a complete new refcount table and blocks are written past the end of the
//!   file, where they collide with nothing, synced, and only then is the header switched
//!   to them (one 12-byte write, synced). The old structure becomes leaks, freed next;
//! - OFLAG_COPIED: fixed once the refcounts are right;
//! - dirty and corrupt bits: cleared last, when nothing is left to repair.

use super::header::{self, be64, Header};
use super::{tables::Meta, REFT_OFFSET_MASK};
use super::{Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{Error, ErrorKind, Result};
use crate::formats::{CheckReport, Finding, RepairMode};

const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
const REFT_RESERVED_MASK: u64 = 0x1ff;
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Extended L2: all allocation bits / all zero bits of the subcluster bitmap.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// The computed refcounts are kept in 32-bit counters; images needing more clusters than
/// this are refused (256 MiB of counters).
const MAX_CHECK_CLUSTERS: u64 = crate::limits::QCOW2_MAX_CHECK_CLUSTERS;

/// The refcount table as read from the header and the file.
struct Stored {
    rt: Vec<u64>,
    cache: Option<(u64, Vec<u8>)>,
}

/// A snapshot table entry as the check needs it.
struct SnapEntry {
    l1_offset: u64,
    l1_size: u32,
    id: String,
    name: String,
    extra_len: u32,
}

/// One pass's state.
struct Pass<'a> {
    q: &'a Qcow2,
    hdr: Header,
    flen: u64,
    refs: Vec<u32>,
    res: CheckReport,
    rebuild: bool,
    snaps: Vec<SnapEntry>,
    snapshots_size: u64,
    /// `-r all`: L2 entries are repaired while they are walked.
    fix_errors: bool,
}

impl Pass<'_> {
    fn cs(&self) -> u64 {
        self.q.cs
    }

    fn note(&mut self, kind: &str, cluster: Option<u64>, offset: Option<u64>, message: String) {
        self.res.findings.push(Finding {
            kind: kind.to_string(),
            cluster,
            offset,
            message,
            repaired: false,
        });
    }

    fn refcount_max(&self) -> u64 {
        self.q.refcount_max().min(u32::MAX as u64)
    }

    /// qemu's `qcow2_inc_refcounts_imrt`.
    fn inc(&mut self, offset: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let cs = self.cs();
        if offset as i128 + size as i128 - self.flen as i128 >= cs as i128 {
            self.res.corruptions += 1;
            self.note(
                "past-eof",
                None,
                Some(offset),
                format!(
                    "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
                ),
            );
            return Ok(());
        }
        let bits = self.q.cluster_bits;
        let first = offset >> bits;
        let last = (offset + size - 1) >> bits;
        for k in first..=last {
            if k >= self.refs.len() as u64 {
                if k >= MAX_CHECK_CLUSTERS {
                    self.res.check_errors += 1;
                    return Err(Error::too_large("Check failed: File too large"));
                }
                self.refs.resize(k as usize + 1, 0);
            }
            let r = self.refs[k as usize] as u64;
            if r >= self.refcount_max() {
                self.res.corruptions += 1;
                self.note(
                    "refcount-overflow",
                    Some(k),
                    Some(k << bits),
                    format!("ERROR: overflow cluster offset=0x{:x}\nUse qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing", k << bits),
                );
                continue;
            }
            self.refs[k as usize] += 1;
        }
        Ok(())
    }

    fn l2_entry_size(&self) -> u64 {
        if self.q.ext_l2 {
            16
        } else {
            8
        }
    }

    fn check_l2(&mut self, l2_offset: u64, frag: bool) -> Result<()> {
        let q = self.q;
        let cs = self.cs();
        let mut t = vec![0u8; cs as usize];
        q.file.read_at(&mut t, l2_offset)?;
        let es = self.l2_entry_size() as usize;
        let mut next_contiguous = 0u64;
        for i in 0..(cs as usize / es) {
            let e = be64(&t, i * es);
            let bm = if q.ext_l2 { be64(&t, i * es + 8) } else { 0 };
            let compressed = e & OFLAG_COMPRESSED != 0;
            if !compressed && e & L2E_STD_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.note(
                    "reserved-bits",
                    None,
                    Some(l2_offset + (i * es) as u64),
                    format!("ERROR found l2 entry with reserved bits set: {e:x}"),
                );
            }
            if compressed {
                let shift = 62 - (q.cluster_bits - 8);
                let coff_mask = (1u64 << shift) - 1;
                let mut e2 = e;
                if e & OFLAG_COPIED != 0 {
                    self.res.corruptions += 1;
                    self.note(
                        "copied-flag",
                        None,
                        Some(e & coff_mask),
                        format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            e & coff_mask
                        ),
                    );
                    e2 &= !OFLAG_COPIED;
                }
                if q.has_data_file {
                    self.res.corruptions += 1;
                    self.note(
                        "compressed-data-file",
                        None,
                        None,
                        format!("ERROR compressed cluster {i} with data file, entry=0x{e2:x}"),
                    );
                    continue;
                }
                if bm != 0 {
                    self.res.corruptions += 1;
                    self.note(
                        "subcluster-bitmap",
                        None,
                        None,
                        format!("ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{e2:x}"),
                    );
                    continue;
                }
                let coff = e2 & coff_mask;
                let nsec = ((e2 >> shift) & ((1u64 << (q.cluster_bits - 8)) - 1)) + 1;
                let csize = nsec * 512 - (coff & 511);
                self.inc(coff, csize)?;
                if frag {
                    self.res.allocated_clusters += 1;
                    self.res.compressed_clusters += 1;
                    self.res.fragmented_clusters += 1;
                }
                continue;
            }
            let off = e & L2E_OFFSET_MASK;
            let zero_flag = e & OFLAG_ZERO != 0 && !q.ext_l2;
            let normal = if zero_flag {
                off != 0
            } else {
                off != 0 || (q.has_data_file && e & OFLAG_COPIED != 0)
            };
            if !normal {
                if !zero_flag && bm & BITMAP_ALL_ALLOC != 0 {
                    self.res.corruptions += 1;
                    self.note(
                        "subcluster-bitmap",
                        None,
                        None,
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                            .to_string(),
                    );
                }
                continue;
            }
            if (bm >> 32) & bm != 0 {
                self.res.corruptions += 1;
                self.note(
                    "subcluster-bitmap",
                    None,
                    Some(off),
                    format!("ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"),
                );
            }
            if off & (cs - 1) != 0 {
                self.res.corruptions += 1;
                let contains_data = if q.ext_l2 {
                    bm & BITMAP_ALL_ALLOC != 0
                } else {
                    e & OFLAG_ZERO == 0
                };
                if contains_data {
                    self.note(
                        "unaligned",
                        None,
                        Some(off),
                        format!("ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."),
                    );
                } else {
                    let word = if self.fix_errors {
                        "Repairing"
                    } else {
                        "ERROR"
                    };
                    self.note(
                        "unaligned",
                        None,
                        Some(off),
                        format!("{word} offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."),
                    );
                    if self.fix_errors && self.zero_l2_entry(l2_offset, i, bm) {
                        // its cluster is no longer referenced (and leaks)
                        continue;
                    }
                }
            }
            if frag {
                self.res.allocated_clusters += 1;
                if next_contiguous != 0 && off != next_contiguous {
                    self.res.fragmented_clusters += 1;
                }
                next_contiguous = off.wrapping_add(cs);
            }
            if !q.has_data_file {
                self.inc(off, cs)?;
            }
        }
        Ok(())
    }

    /// Rewrites L2 entry `i` of the table at `l2_offset` as a zero cluster without a host
    /// cluster (with subclusters: the allocated ones read as zero), on disk at once, as
    /// qemu's check repairs a preallocated cluster at an unaligned offset. True if written.
    fn zero_l2_entry(&mut self, l2_offset: u64, i: usize, bm: u64) -> bool {
        let es = self.l2_entry_size();
        let mut buf = Vec::with_capacity(es as usize);
        if self.q.ext_l2 {
            buf.extend_from_slice(&0u64.to_be_bytes());
            let zeroes = (bm | (bm << 32)) & !BITMAP_ALL_ALLOC;
            buf.extend_from_slice(&zeroes.to_be_bytes());
        } else {
            buf.extend_from_slice(&OFLAG_ZERO.to_be_bytes());
        }
        let at = l2_offset + i as u64 * es;
        match self
            .q
            .file
            .write_at(&buf, at)
            .and_then(|_| self.q.file.sync())
        {
            Ok(()) => {
                self.res.corruptions -= 1;
                self.res.corruptions_fixed += 1;
                true
            }
            Err(e) => {
                self.res.check_errors += 1;
                let msg = format!("ERROR: Failed to update L2 table entry: {}", errno_text(&e));
                self.note("check-error", None, Some(at), msg);
                false
            }
        }
    }

    fn check_l1(&mut self, l1_offset: u64, l1_size: u32, frag: bool) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = l1_size as u64 * 8;
        self.inc(l1_offset, bytes)?;
        let mut raw = vec![0u8; bytes as usize];
        self.q.file.read_at(&mut raw, l1_offset)?;
        for i in 0..l1_size as usize {
            let e = be64(&raw, i * 8);
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.note(
                    "reserved-bits",
                    None,
                    Some(l1_offset + i as u64 * 8),
                    format!("ERROR found L1 entry with reserved bits set: {e:x}"),
                );
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc(l2, self.cs())?;
            if l2 & (self.cs() - 1) != 0 {
                self.res.corruptions += 1;
                self.note(
                    "unaligned",
                    None,
                    Some(l2),
                    format!(
                        "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                    ),
                );
            }
            self.check_l2(l2, frag)?;
        }
        Ok(())
    }

    fn check_bitmaps(&mut self) -> Result<()> {
        let Some(ext) = self.hdr.bitmaps else {
            return Ok(());
        };
        self.inc(ext.directory_offset, ext.directory_size)?;
        let list = match header::read_bitmaps(&self.q.file, &ext) {
            Ok((l, _)) => l,
            Err(e) => {
                self.res.corruptions += 1;
                return Err(Error::invalid_image(format!(
                    "Check failed: Invalid argument ({})",
                    e.message()
                )));
            }
        };
        for bm in list {
            let bytes = bm.table_size as u64 * 8;
            self.inc(bm.table_offset, bytes)?;
            if bytes > header::MAX_L1_BYTES
                || bm.table_offset & (self.cs() - 1) != 0
                || bm.table_offset.saturating_add(bytes) > self.flen
            {
                self.res.corruptions += 1;
                continue;
            }
            let mut raw = vec![0u8; bytes as usize];
            self.q.file.read_at(&mut raw, bm.table_offset)?;
            for i in 0..bm.table_size as usize {
                let e = be64(&raw, i * 8);
                let off = e & BME_OFFSET_MASK;
                if e & BME_RESERVED_MASK != 0
                    || (off != 0 && (e & 1 != 0 || off & (self.cs() - 1) != 0))
                {
                    self.res.corruptions += 1;
                    continue;
                }
                if off != 0 {
                    self.inc(off, self.cs())?;
                }
            }
        }
        Ok(())
    }

    fn check_refblocks(&mut self, stored: &Stored, fix: Option<RepairMode>) -> Result<()> {
        let bits = self.q.cluster_bits;
        for (i, &e) in stored.rt.iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> bits;
            if e & REFT_RESERVED_MASK != 0 {
                self.res.corruptions += 1;
                self.rebuild = true;
                self.note(
                    "reserved-bits",
                    None,
                    None,
                    format!("ERROR refcount table entry {i} has reserved bits set"),
                );
                continue;
            }
            if cluster >= self.refs.len() as u64 {
                self.res.corruptions += 1;
                // Growing the file to cover the block (qemu's repair) is not done:
                // a rebuild replaces the refcount structure instead.
                if fix == Some(RepairMode::All) {
                    self.rebuild = true;
                }
                self.note(
                    "past-eof",
                    Some(cluster),
                    Some(off),
                    format!("ERROR refcount block {i} is outside image"),
                );
                continue;
            }
            if off != 0 {
                self.inc(off, self.cs())?;
                let r = self.refs[cluster as usize];
                if r != 1 {
                    self.res.corruptions += 1;
                    self.rebuild = true;
                    self.note(
                        "overlap",
                        Some(cluster),
                        Some(off),
                        format!("ERROR refcount block {i} refcount={r}"),
                    );
                }
            }
        }
        Ok(())
    }

    fn calculate(&mut self, stored: &Stored, fix: Option<RepairMode>) -> Result<()> {
        self.fix_errors = fix == Some(RepairMode::All);
        let cs = self.cs();
        self.inc(0, cs)?;
        self.check_l1(self.hdr.l1_table_offset, self.hdr.l1_size, true)?;
        if self.q.has_data_file && !self.snaps.is_empty() {
            self.res.corruptions += 1;
            self.note(
                "snapshot",
                None,
                None,
                format!(
                    "ERROR {} snapshots in image with data file",
                    self.snaps.len()
                ),
            );
        }
        for idx in 0..self.snaps.len() {
            let (off, size) = (self.snaps[idx].l1_offset, self.snaps[idx].l1_size);
            if off & (cs - 1) != 0 {
                self.res.corruptions += 1;
                let s = &self.snaps[idx];
                let msg = format!(
                    "ERROR snapshot {} ({}) l1_offset={off:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name
                );
                self.note("unaligned", None, Some(off), msg);
                continue;
            }
            if size as u64 > header::MAX_L1_BYTES / 8 {
                self.res.corruptions += 1;
                let s = &self.snaps[idx];
                let msg = format!(
                    "ERROR snapshot {} ({}) l1_size={size:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name
                );
                self.note("snapshot", None, Some(off), msg);
                continue;
            }
            self.check_l1(off, size, false)?;
        }
        self.inc(self.hdr.snapshots_offset, self.snapshots_size)?;
        self.inc(self.hdr.refcount_table_offset, stored.rt.len() as u64 * 8)?;
        self.check_bitmaps()?;
        self.check_refblocks(stored, fix)
    }
}

impl Stored {
    fn load(q: &Qcow2, hdr: &Header) -> Result<Stored> {
        let n = hdr.refcount_table_clusters as u64 * q.cs / 8;
        let mut raw = vec![0u8; (n * 8) as usize];
        q.file.read_at(&mut raw, hdr.refcount_table_offset)?;
        Ok(Stored {
            rt: raw.chunks_exact(8).map(|c| be64(c, 0)).collect(),
            cache: None,
        })
    }

    /// The stored refcount of cluster `idx` (qemu's `qcow2_get_refcount`); Err for an
    /// unusable refcount block.
    fn get(&mut self, q: &Qcow2, idx: u64) -> Result<u64> {
        let rbe = q.rb_entries();
        let r = idx / rbe;
        if r >= self.rt.len() as u64 {
            return Ok(0);
        }
        let off = self.rt[r as usize] & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        if off & (q.cs - 1) != 0 {
            return Err(Error::new(ErrorKind::Corrupt, "Input/output error"));
        }
        if self.cache.as_ref().map(|c| c.0) != Some(off) {
            let mut b = vec![0u8; q.cs as usize];
            q.file.read_at(&mut b, off)?;
            self.cache = Some((off, b));
        }
        Ok(q.rb_get(&self.cache.as_ref().unwrap().1, idx % rbe))
    }

    /// Sets stored refcounts on disk: `changes` are (cluster, new value), sorted.
    fn set_many(&mut self, q: &Qcow2, changes: &[(u64, u64)]) -> Result<usize> {
        let rbe = q.rb_entries();
        let mut done = 0;
        let mut i = 0;
        while i < changes.len() {
            let r = changes[i].0 / rbe;
            let mut j = i;
            while j < changes.len() && changes[j].0 / rbe == r {
                j += 1;
            }
            let off = self
                .rt
                .get(r as usize)
                .map(|e| e & REFT_OFFSET_MASK)
                .unwrap_or(0);
            if off != 0 && off & (q.cs - 1) == 0 {
                let mut b = vec![0u8; q.cs as usize];
                q.file.read_at(&mut b, off)?;
                for &(c, v) in &changes[i..j] {
                    q.rb_put(&mut b, c % rbe, v);
                }
                q.file.write_at(&b, off)?;
                done += j - i;
                self.cache = None;
            }
            i = j;
        }
        Ok(done)
    }
}

/// Why the snapshot table cannot be read at all.
struct SnapTableError {
    message: String,
    /// Beyond qemu's limits (qemu's check fails with EFBIG), not merely unreadable (EIO).
    too_large: bool,
}

impl SnapTableError {
    fn io(message: impl Into<String>) -> Self {
        SnapTableError {
            message: message.into(),
            too_large: false,
        }
    }

    fn too_large(message: String) -> Self {
        SnapTableError {
            message,
            too_large: true,
        }
    }
}

/// A line of `-r all` about the snapshot table.
fn repair_note(message: String) -> Finding {
    Finding {
        kind: "snapshot".into(),
        cluster: None,
        offset: None,
        message,
        repaired: true,
    }
}

/// The snapshot table as the check reads it.
struct SnapTable {
    entries: Vec<SnapEntry>,
    /// Its length in bytes (extra data cut off included).
    size: u64,
    /// Repairing: entries whose extra data is cut to 1 KiB (index, its length).
    cut: Vec<(u32, u64)>,
    /// Repairing: snapshots left out at the end (the table would be too big).
    dropped: u32,
}

/// Reads the snapshot table as the check does (`repair`: as `-r all` does, which keeps
/// what it can): Err for a table that cannot be read at all.
fn read_snap_table(
    q: &Qcow2,
    hdr: &Header,
    flen: u64,
    repair: bool,
) -> std::result::Result<SnapTable, SnapTableError> {
    let mut t = SnapTable {
        entries: Vec::new(),
        size: 0,
        cut: Vec::new(),
        dropped: 0,
    };
    let start = hdr.snapshots_offset;
    let mut off = start;
    // the table's length as qemu limits it: with cut extra data counted as cut
    let mut kept_len = 0u64;
    for i in 0..hdr.nb_snapshots {
        let mut e = [0u8; 40];
        if off + 40 > flen {
            return Err(SnapTableError::io(
                "Could not read snapshot table: Input/output error",
            ));
        }
        q.file
            .read_at(&mut e, off)
            .map_err(|e| SnapTableError::io(e.message()))?;
        let id_len = u16::from_be_bytes([e[12], e[13]]) as u64;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as u64;
        let extra_len = u32::from_be_bytes(e[36..40].try_into().unwrap()) as u64;
        if extra_len > 1024 {
            if !repair {
                return Err(SnapTableError::too_large(header::snapshot_extra_message(i)));
            }
            t.cut.push((i, extra_len));
        }
        let total = 40 + extra_len + id_len + name_len;
        kept_len = kept_len.div_ceil(8) * 8 + 40 + extra_len.min(1024) + id_len + name_len;
        if kept_len > 1024 * header::MAX_SNAPSHOTS {
            if !repair {
                return Err(SnapTableError::too_large(header::snapshot_table_message(
                    hdr.nb_snapshots - i,
                )));
            }
            if t.cut.last().is_some_and(|c| c.0 == i) {
                t.cut.pop();
            }
            t.dropped = hdr.nb_snapshots - i;
            break;
        }
        // repairing, what lies beyond the end of the file reads as zeroes (as in qemu)
        if off + total > flen && !repair {
            return Err(SnapTableError::io(
                "Could not read snapshot table: Input/output error",
            ));
        }
        let mut strs = vec![0u8; (id_len + name_len) as usize];
        q.file
            .read_at(&mut strs, off + 40 + extra_len)
            .map_err(|e| SnapTableError::io(e.message()))?;
        t.entries.push(SnapEntry {
            l1_offset: be64(&e, 0),
            l1_size: u32::from_be_bytes(e[8..12].try_into().unwrap()),
            id: super::header::cstr(&strs[..id_len as usize]),
            name: super::header::cstr(&strs[id_len as usize..]),
            extra_len: extra_len as u32,
        });
        off += total.div_ceil(8) * 8;
    }
    t.size = off - start;
    Ok(t)
}

fn errno_text(e: &Error) -> String {
    e.io_error()
        .map(crate::error::os_error_text)
        .unwrap_or_else(|| e.message().to_string())
}

impl Qcow2 {
    pub(crate) fn rb_get(&self, data: &[u8], i: u64) -> u64 {
        let order = self.hdr.refcount_order;
        if order <= 2 {
            let bits = 1u64 << order;
            let bit = i * bits;
            ((data[(bit / 8) as usize] >> (bit % 8)) as u64) & ((1 << bits) - 1)
        } else {
            let w = 1usize << (order - 3);
            let s = i as usize * w;
            data[s..s + w]
                .iter()
                .fold(0u64, |v, &b| (v << 8) | b as u64)
        }
    }

    pub(crate) fn rb_put(&self, data: &mut [u8], i: u64, v: u64) {
        let order = self.hdr.refcount_order;
        if order <= 2 {
            let bits = 1u64 << order;
            let bit = i * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut data[(bit / 8) as usize];
            *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
        } else {
            let w = 1usize << (order - 3);
            let s = i as usize * w;
            data[s..s + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
        }
    }

    /// `qemu-img check [-r leaks|all]` of this image.
    pub(crate) fn check_image(&self, fix: Option<RepairMode>) -> Result<CheckReport> {
        let mut m = self.meta.lock().unwrap();
        if self.writable {
            self.flush_meta(&mut m)?;
        }
        if fix.is_some() && !self.writable {
            return Err(Error::unsupported(format!(
                "{}: the image is open read-only",
                self.filename
            )));
        }
        // -r all completes snapshot table entries with less extra data than a v3 image needs
        // (qemu rewrites the table with the VM state size, the current disk size and no
        // icount), cuts extra data beyond 1 KiB and leaves out the snapshots that make the
        // table too big (its refcount check then frees what they held)
        let mut completed = Vec::new();
        let mut notes: Vec<Finding> = Vec::new();
        let (mut cut, mut dropped) = (0u64, 0u64);
        if fix == Some(RepairMode::All) && self.writable {
            let mut hdr = Header::read_mode(&self.file, true)?;
            let nb = hdr.nb_snapshots as u64;
            if nb > header::MAX_SNAPSHOTS {
                dropped = nb - header::MAX_SNAPSHOTS;
                notes.push(repair_note(format!(
                    "Discarding {dropped} overhanging snapshots"
                )));
                hdr.nb_snapshots = header::MAX_SNAPSHOTS as u32;
            }
            if hdr.nb_snapshots > 0 {
                if let Ok(t) = read_snap_table(self, &hdr, self.file.len()?, true) {
                    for &(i, len) in &t.cut {
                        notes.push(repair_note(format!(
                            "Discarding too much extra metadata in snapshot table entry {i} ({len} > 1024)"
                        )));
                    }
                    cut = t.cut.len() as u64;
                    if t.dropped > 0 {
                        notes.push(repair_note(format!(
                            "Discarding {} overhanging snapshots (snapshot table is too big)",
                            t.dropped
                        )));
                        dropped += t.dropped as u64;
                    }
                    if hdr.version >= 3 {
                        completed = (0..t.entries.len())
                            .filter(|&i| t.entries[i].extra_len < 16)
                            .collect();
                    }
                }
            }
            if dropped > 0 {
                // the header counts the snapshots kept before the refcounts are checked
                let kept = (nb - dropped) as u32;
                self.file.write_at(&kept.to_be_bytes(), 60)?;
                self.file.sync()?;
            }
            if !completed.is_empty() && cut == 0 {
                let list = super::snapshot::read_table(self)?;
                let size = self.current_size()?;
                self.start_write(&mut m)?;
                self.rewrite_snapshot_table(&mut m, &list, size)?;
                self.flush_meta(&mut m)?;
            }
        }
        let mut r = self.check_locked(fix);
        if let Ok(rep) = &mut r {
            notes.extend(completed.iter().map(|i| Finding {
                kind: "snapshot".into(),
                cluster: None,
                offset: None,
                message: format!("Repairing snapshot table entry {i} is incomplete"),
                repaired: true,
            }));
            rep.corruptions_fixed += completed.len() as u64 + cut + dropped;
            notes.append(&mut rep.findings);
            rep.findings = notes;
        }
        if fix.is_some() {
            let hdr = Header::read_mode(&self.file, true)?;
            let mut fresh = Meta::load(&self.file, &hdr)?;
            fresh.write_started = m.write_started && fresh.incompat == m.incompat;
            *m = fresh;
        }
        if let (Ok(rep), true) = (&mut r, cut > 0) {
            // the table is written anew without the extra data cut off (after the refcount
            // check, which counted the old table whole)
            let written = super::snapshot::read_table_repair(self).and_then(|(list, _)| {
                let size = self.current_size()?;
                self.start_write(&mut m)?;
                self.rewrite_snapshot_table(&mut m, &list, size)?;
                self.flush_meta(&mut m)
            });
            if let Err(e) = written {
                rep.check_errors += 1;
                rep.corruptions_fixed -= cut;
                rep.corruptions += cut;
                rep.findings.push(Finding {
                    repaired: false,
                    ..repair_note(format!(
                        "ERROR failed to update snapshot table: {}",
                        errno_text(&e)
                    ))
                });
            }
        }
        match r {
            Ok(rep) => Ok(rep),
            Err((findings, e)) => {
                for f in findings {
                    crate::warn::emit(&f.message);
                }
                Err(e)
            }
        }
    }

    fn check_locked(
        &self,
        fix: Option<RepairMode>,
    ) -> std::result::Result<CheckReport, (Vec<Finding>, Error)> {
        let mut findings = Vec::new();
        let r = self.check_passes(fix, &mut findings);
        match r {
            Ok(rep) => Ok(rep),
            Err(e) => Err((findings, e)),
        }
    }

    /// A pass over the image as `hdr` describes it (`repair`: `-r all`, which reads a
    /// snapshot table with too much extra data).
    fn new_pass(
        &self,
        hdr: &Header,
        findings: &mut Vec<Finding>,
        repair: bool,
    ) -> Result<Pass<'_>> {
        let flen = self.file.len()?;
        let nb = flen.div_ceil(self.cs);
        if nb > MAX_CHECK_CLUSTERS {
            return Err(Error::too_large(format!(
                "Check failed: File too large ({}: {nb} clusters exceed the check limit of {MAX_CHECK_CLUSTERS})",
                self.filename
            )));
        }
        let mut res = CheckReport {
            total_clusters: (self.size.div_ceil(512) * 512).div_ceil(self.cs),
            ..CheckReport::default()
        };
        // snapshot table (qemu reads it separately in check mode)
        if let Err(e) = header::validate_table(
            "snapshot table",
            hdr.snapshots_offset,
            hdr.nb_snapshots as u64,
            40,
            40 * header::MAX_SNAPSHOTS,
            self.cs,
        ) {
            findings.push(Finding {
                kind: "snapshot".into(),
                cluster: None,
                offset: Some(hdr.snapshots_offset),
                message: format!("{}: ERROR {}", prog_name(), e.message()),
                repaired: false,
            });
            if hdr.nb_snapshots as u64 > header::MAX_SNAPSHOTS {
                findings.push(Finding {
                    kind: "snapshot".into(),
                    cluster: None,
                    offset: None,
                    message: format!(
                        "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                        hdr.nb_snapshots as u64 - header::MAX_SNAPSHOTS
                    ),
                    repaired: false,
                });
            }
            let errno = if e.kind() == ErrorKind::TooLarge {
                "File too large"
            } else {
                "Invalid argument"
            };
            return Err(Error::invalid_image(format!("Check failed: {errno}")));
        }
        let (snaps, snapshots_size) = match read_snap_table(self, hdr, flen, repair) {
            Ok(t) => (t.entries, t.size),
            Err(e) => {
                findings.push(Finding {
                    kind: "snapshot".into(),
                    cluster: None,
                    offset: Some(hdr.snapshots_offset),
                    message: format!(
                        "{}: ERROR failed to read the snapshot table: {}",
                        prog_name(),
                        e.message
                    ),
                    repaired: false,
                });
                let errno = if e.too_large {
                    "File too large"
                } else {
                    "Input/output error"
                };
                return Err(Error::invalid_image(format!("Check failed: {errno}")));
            }
        };
        if hdr.version >= 3 {
            for (i, s) in snaps.iter().enumerate() {
                if s.extra_len < 16 {
                    res.corruptions += 1;
                    res.findings.push(Finding {
                        kind: "snapshot".into(),
                        cluster: None,
                        offset: None,
                        message: format!("ERROR snapshot table entry {i} is incomplete"),
                        repaired: false,
                    });
                }
            }
        }
        Ok(Pass {
            q: self,
            hdr: hdr.clone(),
            flen,
            refs: vec![0u32; nb as usize],
            res,
            rebuild: false,
            snaps,
            snapshots_size,
            fix_errors: false,
        })
    }

    /// Compares computed and stored refcounts (qemu's `compare_refcounts`); returns the
    /// highest used cluster.
    fn compare(&self, p: &mut Pass, stored: &mut Stored, fix: Option<RepairMode>) -> Result<u64> {
        let mut highest = 0u64;
        let mut changes: Vec<(u64, u64, bool)> = Vec::new();
        for i in 0..p.refs.len() as u64 {
            let r1 = match stored.get(self, i) {
                Ok(v) => v,
                Err(e) => {
                    p.res.check_errors += 1;
                    let msg = format!("Can't get refcount for cluster {i}: {}", errno_text(&e));
                    p.note("check-error", Some(i), None, msg);
                    continue;
                }
            };
            let r2 = p.refs[i as usize] as u64;
            if r1 > 0 || r2 > 0 {
                highest = i;
            }
            if r1 == r2 {
                continue;
            }
            let mut fixing = None;
            if r1 == 0 {
                p.rebuild = true;
            } else if r1 > r2 && fix.is_some() {
                fixing = Some(true);
            } else if r1 < r2 && fix == Some(RepairMode::All) {
                fixing = Some(false);
            }
            let (word, kind) = match fixing {
                Some(_) => (
                    "Repairing",
                    if r1 > r2 { "leak" } else { "refcount-too-low" },
                ),
                None if r1 < r2 => ("ERROR", "refcount-too-low"),
                None => ("Leaked", "leak"),
            };
            p.note(
                kind,
                Some(i),
                Some(i << self.cluster_bits),
                format!("{word} cluster {i} refcount={r1} reference={r2}"),
            );
            match fixing {
                Some(leak) => changes.push((i, r2, leak)),
                None if r1 < r2 => p.res.corruptions += 1,
                None => p.res.leaks += 1,
            }
        }
        if !changes.is_empty() {
            let list: Vec<(u64, u64)> = changes.iter().map(|c| (c.0, c.1)).collect();
            let done = stored.set_many(self, &list);
            self.file.sync()?;
            // which ones could not be written (no refcount block): count them as unfixed
            let ok = done.is_ok();
            for (c, _, leak) in &changes {
                let fixed = ok && stored.get(self, *c).ok() == Some(p.refs[*c as usize] as u64);
                match (fixed, leak) {
                    (true, true) => p.res.leaks_fixed += 1,
                    (true, false) => p.res.corruptions_fixed += 1,
                    (false, true) => p.res.leaks += 1,
                    (false, false) => p.res.corruptions += 1,
                }
            }
            done?;
        }
        Ok(highest)
    }

    fn check_passes(
        &self,
        fix: Option<RepairMode>,
        findings: &mut Vec<Finding>,
    ) -> Result<CheckReport> {
        let hdr = Header::read_mode(&self.file, true)?;
        let repair = fix == Some(RepairMode::All);
        let mut p = self.new_pass(&hdr, findings, repair)?;
        let mut stored = Stored::load(self, &hdr)?;
        let calc = p.calculate(&stored, fix);
        findings.append(&mut p.res.findings.clone());
        calc?;
        findings.clear();
        let pre = (p.res.clone(), p.rebuild);
        let mut highest = self.compare(&mut p, &mut stored, None)?;
        if p.rebuild && fix == Some(RepairMode::All) {
            let old = p.res.clone();
            p.res
                .findings
                .push(plain("rebuild", "Rebuilding refcount structure"));
            let kept = std::mem::take(&mut p.res.findings);
            let refs = std::mem::take(&mut p.refs);
            if let Err(e) = self.rebuild_refcounts(refs, &hdr) {
                p.res.check_errors += 1;
                let mut f = kept;
                f.push(plain(
                    "check-error",
                    &format!("{}: {}", prog_name(), e.message()),
                ));
                findings.extend(f);
                return Err(Error::invalid_image(format!(
                    "Check failed: {}",
                    errno_text(&e)
                )));
            }
            // recount against the new structure
            let hdr2 = Header::read_mode(&self.file, true)?;
            let mut p2 = self.new_pass(&hdr2, findings, repair)?;
            p2.res.findings = kept;
            let mut stored2 = Stored::load(self, &hdr2)?;
            p2.calculate(&stored2, None)?;
            // the old structure is leaked now: free it quietly
            let mut tmp = Pass {
                res: CheckReport::default(),
                ..self.new_pass(&hdr2, findings, repair)?
            };
            tmp.refs = p2.refs.clone();
            highest = self.compare(&mut tmp, &mut stored2, Some(RepairMode::Leaks))?;
            if tmp.rebuild {
                p2.res.findings.push(plain(
                    "check-error",
                    "ERROR rebuilt refcount structure is still broken",
                ));
            }
            let fresh_leaks = tmp.res.leaks;
            p2.res.findings.append(&mut tmp.res.findings);
            let mut res = p2.res;
            res.corruptions_fixed = old.corruptions_fixed;
            res.leaks_fixed = old.leaks_fixed;
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
            p.res = res;
            p.hdr = hdr2;
            stored = stored2;
        } else if fix.is_some() {
            if p.rebuild {
                p.res.findings.push(plain(
                    "check-error",
                    "ERROR need to rebuild refcount structures",
                ));
                p.res.check_errors += 1;
                findings.append(&mut p.res.findings);
                return Err(Error::invalid_image("Check failed: Input/output error"));
            }
            if p.res.leaks > 0 || p.res.corruptions > 0 {
                let mut again = pre.0;
                again.findings = std::mem::take(&mut p.res.findings);
                p.res = again;
                p.rebuild = pre.1;
                highest = self.compare(&mut p, &mut stored, fix)?;
            }
        }
        self.check_copied(&mut p, &mut stored, fix)?;
        p.res.image_end_offset = (highest + 1) * self.cs;
        let mut res = p.res;
        if fix.is_some() && res.check_errors == 0 && res.corruptions == 0 {
            let cur = Header::read_mode(&self.file, true)?.incompatible;
            let clean = cur & !(header::INCOMPAT_DIRTY | header::INCOMPAT_CORRUPT);
            if clean != cur && hdr.version >= 3 {
                self.file.sync()?;
                self.file.write_at(&clean.to_be_bytes(), 72)?;
                self.file.sync()?;
            }
        }
        res.findings.iter_mut().for_each(|f| {
            if f.message.starts_with("Repairing") {
                f.repaired = true;
            }
        });
        Ok(res)
    }

    /// qemu's `check_oflag_copied` on the active L1 table.
    fn check_copied(
        &self,
        p: &mut Pass,
        stored: &mut Stored,
        fix: Option<RepairMode>,
    ) -> Result<()> {
        let repair = match fix {
            Some(RepairMode::All) => true,
            Some(RepairMode::Leaks) => {
                p.res.check_errors == 0 && p.res.corruptions == 0 && p.res.leaks == 0
            }
            None => false,
        };
        let word = if repair { "Repairing" } else { "ERROR" };
        let l1_off = p.hdr.l1_table_offset;
        let n = p.hdr.l1_size as usize;
        let mut raw = vec![0u8; n * 8];
        self.file.read_at(&mut raw, l1_off)?;
        let es = if self.ext_l2 { 16 } else { 8 };
        for i in 0..n {
            let l1e = be64(&raw, i * 8);
            let l2 = l1e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if let Ok(rc) = stored.get(self, l2 >> self.cluster_bits) {
                if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                    p.res.corruptions += 1;
                    p.note(
                        "copied-flag",
                        Some(l2 >> self.cluster_bits),
                        Some(l2),
                        format!("{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"),
                    );
                    if repair {
                        let ne = if rc == 1 {
                            l1e | OFLAG_COPIED
                        } else {
                            l1e & !OFLAG_COPIED
                        };
                        self.file
                            .write_at(&ne.to_be_bytes(), l1_off + i as u64 * 8)?;
                        self.file.sync()?;
                        p.res.corruptions -= 1;
                        p.res.corruptions_fixed += 1;
                    }
                }
            }
            let mut t = vec![0u8; self.cs as usize];
            self.file.read_at(&mut t, l2)?;
            let mut dirty = 0u64;
            for j in 0..(self.cs as usize / es) {
                let e = be64(&t, j * es);
                if e & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let off = e & L2E_OFFSET_MASK;
                let normal = if e & OFLAG_ZERO != 0 && !self.ext_l2 {
                    off != 0
                } else {
                    off != 0 || (self.has_data_file && e & OFLAG_COPIED != 0)
                };
                if !normal {
                    continue;
                }
                let rc = if self.has_data_file {
                    1
                } else {
                    match stored.get(self, off >> self.cluster_bits) {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    p.res.corruptions += 1;
                    p.note(
                        "copied-flag",
                        Some(off >> self.cluster_bits),
                        Some(off),
                        format!("{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"),
                    );
                    if repair {
                        let ne = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        t[j * es..j * es + 8].copy_from_slice(&ne.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                let hits_meta = l2 < self.cs
                    || l2 & (self.cs - 1) != 0
                    || ranges_overlap(
                        l2,
                        self.cs,
                        p.hdr.refcount_table_offset,
                        p.hdr.refcount_table_clusters as u64 * self.cs,
                    )
                    || ranges_overlap(l2, self.cs, l1_off, n as u64 * 8);
                if hits_meta {
                    p.res.check_errors += 1;
                    p.note(
                        "check-error",
                        None,
                        Some(l2),
                        "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error".into(),
                    );
                    return Ok(());
                }
                self.file.write_at(&t, l2)?;
                self.file.sync()?;
                p.res.corruptions -= dirty;
                p.res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }

    /// Writes a new refcount structure for `refs` past the end of the file and switches
    /// the header to it.
    fn rebuild_refcounts(&self, mut refs: Vec<u32>, hdr: &Header) -> Result<()> {
        let cs = self.cs;
        let rbe = self.rb_entries();
        let flen = self.file.len()?;
        let start = (refs.len() as u64).max(flen.div_ceil(cs));
        let used_ranges: Vec<u64> = {
            let mut v = Vec::new();
            for (r, chunk) in refs.chunks(rbe as usize).enumerate() {
                if chunk.iter().any(|&c| c != 0) {
                    v.push(r as u64);
                }
            }
            v
        };
        let (mut k, mut t) = (0u64, 0u64);
        let ranges = loop {
            let end = start + k + t;
            let mut ranges = used_ranges.clone();
            for r in start / rbe..end.div_ceil(rbe) {
                if ranges.last().is_none_or(|&l| l < r) {
                    ranges.push(r);
                }
            }
            let nk = ranges.len() as u64;
            let max_r = ranges.last().copied().unwrap_or(0);
            let nt = ((max_r + 1) * 8).div_ceil(cs);
            if nk == k && nt == t {
                break ranges;
            }
            k = nk;
            t = nt;
        };
        if t * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::too_large(
                "ERROR allocating reftable: File too large",
            ));
        }
        let end = start + k + t;
        if end > MAX_CHECK_CLUSTERS {
            return Err(Error::too_large(
                "ERROR allocating refblock: File too large",
            ));
        }
        refs.resize(end as usize, 0);
        for c in start..end {
            refs[c as usize] = 1;
        }
        let max = self.refcount_max();
        let mut table = vec![0u8; (t * cs) as usize];
        let mut block = vec![0u8; cs as usize];
        for (j, &r) in ranges.iter().enumerate() {
            block.fill(0);
            let lo = (r * rbe) as usize;
            let hi = ((r + 1) * rbe).min(refs.len() as u64) as usize;
            if lo < hi {
                for (i, &v) in refs[lo..hi].iter().enumerate() {
                    if v != 0 {
                        self.rb_put(&mut block, i as u64, (v as u64).min(max));
                    }
                }
            }
            let boff = (start + j as u64) * cs;
            self.file.write_at(&block, boff)?;
            table[r as usize * 8..r as usize * 8 + 8].copy_from_slice(&boff.to_be_bytes());
        }
        let toff = (start + k) * cs;
        self.file.write_at(&table, toff)?;
        self.file.sync()?;
        let mut hb = [0u8; 12];
        hb[..8].copy_from_slice(&toff.to_be_bytes());
        hb[8..].copy_from_slice(&(t as u32).to_be_bytes());
        let _ = hdr;
        self.file.write_at(&hb, 48)?;
        self.file.sync()?;
        Ok(())
    }
}

fn plain(kind: &str, message: &str) -> Finding {
    Finding {
        kind: kind.to_string(),
        cluster: None,
        offset: None,
        message: message.to_string(),
        repaired: false,
    }
}

fn ranges_overlap(a: u64, al: u64, b: u64, bl: u64) -> bool {
    al > 0 && bl > 0 && a < b.saturating_add(bl) && b < a.saturating_add(al)
}

/// The program name as invoked (qemu-img prefixes some check messages with it).
pub(crate) fn prog_name() -> String {
    std::env::args()
        .next()
        .map(|a| a.rsplit('/').next().unwrap_or("diskit").to_string())
        .unwrap_or_else(|| "diskit".to_string())
}
