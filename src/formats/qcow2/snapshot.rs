//! Internal snapshots: the snapshot table, and creating, applying and deleting snapshots.
//!
//! A data cluster's refcount counts the L1 trees (active + snapshots) that reach it, and an
//! L2 table's refcount counts the L1 tables that point at it. OFLAG_COPIED marks, in the
//! active tree, what has refcount 1 (may be written in place).
//!
//! Crash safety: refcount increments reach the disk before any new reference (the snapshot
//! table entry, a rewritten L1 table); on delete, the table entry is gone from the disk
//! before any refcount goes down. A crash therefore leaves at most leaked clusters.

use super::tables::Meta;
use super::{Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::{Error, ErrorKind, Result};

/// qemu's limit on the whole snapshot table.
const MAX_TABLE_BYTES: u64 = crate::limits::QCOW2_MAX_SNAPSHOT_TABLE_BYTES;
/// qemu's limit on a snapshot's extra data.
const MAX_EXTRA: u64 = crate::limits::QCOW2_MAX_SNAPSHOT_EXTRA;

/// One entry of the snapshot table, with everything needed to write it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapEntry {
    /// Offset of its L1 table.
    pub l1_table_offset: u64,
    /// Entries of its L1 table.
    pub l1_size: u32,
    /// Unique ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Guest size at snapshot time (qemu assumes the current size when absent).
    pub disk_size: Option<u64>,
    /// icount (`u64::MAX`: none).
    pub icount: u64,
    /// Extra data past the fields we know, kept as is.
    pub unknown_extra: Vec<u8>,
}

impl SnapEntry {
    /// The listing form.
    pub fn info(&self) -> crate::formats::SnapshotInfo {
        crate::formats::SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec as u64,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            icount: if self.icount == u64::MAX {
                None
            } else {
                Some(self.icount)
            },
        }
    }

    fn encoded_len(&self) -> u64 {
        40 + 24 + self.unknown_extra.len() as u64 + self.id.len() as u64 + self.name.len() as u64
    }
}

fn be16(b: &[u8], o: usize) -> u64 {
    u16::from_be_bytes([b[o], b[o + 1]]) as u64
}
fn be32(b: &[u8], o: usize) -> u64 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap()) as u64
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// The header fields (nb_snapshots, snapshots_offset) as on disk now.
fn table_location(q: &Qcow2) -> Result<(u64, u64)> {
    let mut b = [0u8; 12];
    q.file.read_at(&mut b, 60)?;
    Ok((be32(&b, 0), be64(&b, 4)))
}

/// Reads the snapshot table as it is on disk; also returns its byte length.
pub(crate) fn read_table_sized(q: &Qcow2) -> Result<(Vec<SnapEntry>, u64)> {
    read_table_impl(q, false)
}

/// The snapshot table as `check -r all` repairs it (qemu's reading in repair mode): extra
/// data beyond 1 KiB is cut off (the byte length still spans it), and the snapshots from
/// the first one that makes the table too big on are left out.
pub(crate) fn read_table_repair(q: &Qcow2) -> Result<(Vec<SnapEntry>, u64)> {
    read_table_impl(q, true)
}

fn read_table_impl(q: &Qcow2, repair: bool) -> Result<(Vec<SnapEntry>, u64)> {
    let (nb, table_off) = table_location(q)?;
    let mut out = Vec::new();
    if nb == 0 {
        return Ok((out, 0));
    }
    if nb > super::header::MAX_SNAPSHOTS {
        return Err(q.corrupt_err(format!("Too many snapshots ({nb})")));
    }
    let flen = q.file.len()?;
    // bytes read so far, and the table's length as qemu limits it (cut extra data counted
    // as cut)
    let (mut off, mut kept_len) = (0u64, 0u64);
    for i in 0..nb {
        let pre = off;
        off = off.div_ceil(8) * 8;
        kept_len = kept_len.div_ceil(8) * 8;
        let pos = table_off
            .checked_add(off)
            .filter(|p| p.checked_add(40).is_some_and(|e| e <= flen))
            .ok_or_else(|| {
                Error::invalid_image(format!(
                    "{}: snapshot table at offset {table_off:#x} is beyond the end of the file",
                    q.filename
                ))
            })?;
        let mut h = [0u8; 40];
        q.file.read_at(&mut h, pos)?;
        let extra_len = be32(&h, 36);
        if extra_len > MAX_EXTRA && !repair {
            return Err(Error::too_large(super::header::snapshot_extra_message(
                i as u32,
            )));
        }
        let id_len = be16(&h, 12);
        let name_len = be16(&h, 14);
        let total = 40 + extra_len + id_len + name_len;
        kept_len += 40 + extra_len.min(MAX_EXTRA) + id_len + name_len;
        if kept_len > MAX_TABLE_BYTES {
            if repair {
                // this snapshot and the rest are dropped
                off = pre;
                break;
            }
            return Err(Error::too_large("Snapshot table too large"));
        }
        // repairing, what lies beyond the end of the file reads as zeroes (as in qemu)
        if pos + total > flen && !repair {
            return Err(Error::invalid_image(format!(
                "{}: snapshot table at offset {table_off:#x} is beyond the end of the file",
                q.filename
            )));
        }
        // the extra data kept (all of it unless repairing), then the strings after all of it
        let kept = extra_len.min(MAX_EXTRA);
        let mut rest = vec![0u8; (kept + id_len + name_len) as usize];
        q.file.read_at(&mut rest[..kept as usize], pos + 40)?;
        q.file
            .read_at(&mut rest[kept as usize..], pos + 40 + extra_len)?;
        let extra = &rest[..kept as usize];
        let strs = &rest[kept as usize..];
        let mut e = SnapEntry {
            l1_table_offset: be64(&h, 0),
            l1_size: be32(&h, 8) as u32,
            id: super::header::cstr(&strs[..id_len as usize]),
            name: super::header::cstr(&strs[id_len as usize..]),
            date_sec: be32(&h, 16) as u32,
            date_nsec: be32(&h, 20) as u32,
            vm_clock_nsec: be64(&h, 24),
            vm_state_size: be32(&h, 32),
            disk_size: None,
            icount: u64::MAX,
            unknown_extra: Vec::new(),
        };
        if kept >= 8 {
            e.vm_state_size = be64(extra, 0);
        }
        if kept >= 16 {
            e.disk_size = Some(be64(extra, 8));
        }
        if kept >= 24 {
            e.icount = be64(extra, 16);
        }
        if kept > 24 {
            e.unknown_extra = extra[24..].to_vec();
        }
        off += total;
        out.push(e);
    }
    Ok((out, off))
}

impl SnapEntry {
    /// qemu's check of the snapshot's L1 table offset and size, made before the table is
    /// used (the table is read without it, as qemu reads it).
    pub(crate) fn validate_l1(&self, cluster_size: u64) -> Result<()> {
        super::header::validate_table(
            "Snapshot L1 table",
            self.l1_table_offset,
            self.l1_size as u64,
            8,
            super::header::MAX_L1_BYTES,
            cluster_size,
        )
    }
}

/// The errno text qemu reports for a failed [`SnapEntry::validate_l1`].
pub(crate) fn validate_errno(e: &Error) -> &'static str {
    if e.kind() == ErrorKind::TooLarge {
        "File too large"
    } else {
        "Invalid argument"
    }
}

/// Reads the snapshot table as it is on disk.
pub(crate) fn read_table(q: &Qcow2) -> Result<Vec<SnapEntry>> {
    Ok(read_table_sized(q)?.0)
}

fn encode_table(list: &[SnapEntry], current_size: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for s in list {
        while out.len() % 8 != 0 {
            out.push(0);
        }
        if out.len() as u64 + s.encoded_len() > MAX_TABLE_BYTES {
            return Err(Error::too_large("Snapshot table too large"));
        }
        let mut h = [0u8; 40];
        h[0..8].copy_from_slice(&s.l1_table_offset.to_be_bytes());
        h[8..12].copy_from_slice(&s.l1_size.to_be_bytes());
        h[12..14].copy_from_slice(&(s.id.len() as u16).to_be_bytes());
        h[14..16].copy_from_slice(&(s.name.len() as u16).to_be_bytes());
        h[16..20].copy_from_slice(&s.date_sec.to_be_bytes());
        h[20..24].copy_from_slice(&s.date_nsec.to_be_bytes());
        h[24..32].copy_from_slice(&s.vm_clock_nsec.to_be_bytes());
        if s.vm_state_size <= u32::MAX as u64 {
            h[32..36].copy_from_slice(&(s.vm_state_size as u32).to_be_bytes());
        }
        let extra_len = 24 + s.unknown_extra.len() as u32;
        h[36..40].copy_from_slice(&extra_len.to_be_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&s.vm_state_size.to_be_bytes());
        out.extend_from_slice(&s.disk_size.unwrap_or(current_size).to_be_bytes());
        out.extend_from_slice(&s.icount.to_be_bytes());
        out.extend_from_slice(&s.unknown_extra);
        out.extend_from_slice(s.id.as_bytes());
        out.extend_from_slice(s.name.as_bytes());
    }
    Ok(out)
}

fn enotsup(what: &str, name: &str) -> Error {
    Error::unsupported(format!(
        "Could not {what} snapshot '{name}': Operation not supported"
    ))
}

impl Qcow2 {
    fn check_l2_offset(&self, off: u64) -> Result<()> {
        let flen = self.file.len()?;
        if off & (self.cs - 1) != 0 || off < self.cs || off.saturating_add(self.cs) > flen {
            return Err(self.corrupt_err(format!(
                "L2 table offset {off:#x} is invalid (unaligned, in the header or beyond the end of the file)"
            )));
        }
        Ok(())
    }

    /// Adds `addend` to the refcount of every cluster the L1 tree `l1` reaches (L2 tables
    /// and data clusters); with `flags`, then sets OFLAG_COPIED in `l1` and its L2 tables
    /// where the refcount is 1. Returns whether `l1` changed.
    pub(crate) fn tree_refcount(
        &self,
        m: &mut Meta,
        l1: &mut [u64],
        addend: i64,
        flags: bool,
    ) -> Result<bool> {
        let mut changed = false;
        for e in l1.iter_mut() {
            let l2 = *e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            self.check_l2_offset(l2)?;
            for j in 0..self.l2_entries {
                let (w, bm) = self.l2_get(m, l2, j)?;
                if w & OFLAG_COMPRESSED != 0 {
                    if addend != 0 {
                        if let Some((first, n)) = self.entry_clusters(w) {
                            for c in first..first + n {
                                self.update_refcount(m, c, addend)?;
                            }
                        }
                    }
                    continue;
                }
                let host = w & L2E_OFFSET_MASK;
                if host == 0 || self.has_data_file {
                    continue;
                }
                if host & (self.cs - 1) != 0 {
                    return Err(self.corrupt_err(format!(
                        "Cluster allocation offset {host:#x} unaligned (L2 table at {l2:#x})"
                    )));
                }
                let c = host >> self.cluster_bits;
                if addend != 0 {
                    self.update_refcount(m, c, addend)?;
                }
                if flags {
                    let rc = self.refcount(m, c)?;
                    let nw = if rc == 1 {
                        w | OFLAG_COPIED
                    } else {
                        w & !OFLAG_COPIED
                    };
                    if nw != w {
                        self.l2_set(m, l2, j, nw, bm)?;
                    }
                }
            }
            let c = l2 >> self.cluster_bits;
            if addend != 0 {
                self.update_refcount(m, c, addend)?;
            }
            if flags {
                let rc = self.refcount(m, c)?;
                let ne = if rc == 1 {
                    *e | OFLAG_COPIED
                } else {
                    *e & !OFLAG_COPIED
                };
                if ne != *e {
                    *e = ne;
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    /// Recomputes OFLAG_COPIED in the active tree.
    fn fix_copied_flags(&self, m: &mut Meta) -> Result<()> {
        let mut l1 = std::mem::take(&mut m.l1);
        let r = self.tree_refcount(m, &mut l1, 0, true);
        m.l1 = l1;
        if r? {
            m.l1_dirty = true;
            m.changed = true;
        }
        Ok(())
    }

    /// Writes a new snapshot table, points the header at it and frees the old one.
    pub(crate) fn rewrite_snapshot_table(
        &self,
        m: &mut Meta,
        list: &[SnapEntry],
        size: u64,
    ) -> Result<()> {
        // all the old table's bytes, extra data that does not stay included
        let (_, old_len) = read_table_repair(self)?;
        let (_, old_off) = table_location(self)?;
        let raw = encode_table(list, size)?;
        let new_off = if raw.is_empty() {
            0
        } else {
            let n = (raw.len() as u64).div_ceil(self.cs);
            let off = self.alloc_clusters(m, n)?;
            self.overlap_check(m, off, raw.len() as u64, "snapshot table")?;
            self.file.write_at(&raw, off)?;
            off
        };
        self.write_dirty_refblocks(m)?;
        self.file.sync()?;
        let mut hb = [0u8; 12];
        hb[..4].copy_from_slice(&(list.len() as u32).to_be_bytes());
        hb[4..].copy_from_slice(&new_off.to_be_bytes());
        self.file.write_at(&hb, 60)?;
        self.file.sync()?;
        if old_len > 0 {
            let first = old_off >> self.cluster_bits;
            let last = (old_off + old_len - 1) >> self.cluster_bits;
            for c in first..=last {
                self.update_refcount(m, c, -1)?;
            }
            self.write_dirty_refblocks(m)?;
        }
        Ok(())
    }

    /// `qemu-img snapshot -c NAME`.
    pub fn snapshot_create(&self, name: &str, date_sec: u32, date_nsec: u32) -> Result<()> {
        if self.has_data_file {
            return Err(enotsup("create", name));
        }
        // a full table is refused before it is read (it may lie beyond the end of the file:
        // qemu reads that as zeroes)
        if table_location(self)?.0 >= super::header::MAX_SNAPSHOTS {
            return Err(Error::too_large(format!(
                "Could not create snapshot '{name}': File too large"
            )));
        }
        let mut list = read_table(self)?;
        let id_max = list
            .iter()
            .map(|s| leading_number(&s.id))
            .max()
            .unwrap_or(0);
        // qemu keeps at most 255 bytes of the name
        let mut nm = name.to_string();
        while nm.len() > 255 {
            nm.pop();
        }
        let size = self.current_size()?;
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.flush_meta(&mut m)?;
        let l1_len = m.l1.len() as u64;
        let l1_off = if l1_len == 0 {
            0
        } else {
            let n = (l1_len * 8).div_ceil(self.cs);
            let off = self.alloc_clusters(&mut m, n)?;
            let mut raw = vec![0u8; (l1_len * 8) as usize];
            for (i, v) in m.l1.iter().enumerate() {
                raw[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
            }
            self.overlap_check(&m, off, raw.len() as u64, "snapshot L1 table")?;
            self.file.write_at(&raw, off)?;
            off
        };
        let mut l1 = std::mem::take(&mut m.l1);
        let r = self.tree_refcount(&mut m, &mut l1, 1, true);
        m.l1 = l1;
        if r.map_err(|e| create_err(name, e))? {
            m.l1_dirty = true;
        }
        m.changed = true;
        self.flush_meta(&mut m)?;
        list.push(SnapEntry {
            l1_table_offset: l1_off,
            l1_size: l1_len as u32,
            id: (id_max + 1).to_string(),
            name: nm,
            date_sec,
            date_nsec,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(size),
            icount: 0,
            unknown_extra: Vec::new(),
        });
        self.rewrite_snapshot_table(&mut m, &list, size)?;
        self.flush_meta(&mut m)
    }

    /// Finds a snapshot by ID, then by name (as qemu's goto does).
    pub fn find_snapshot(list: &[SnapEntry], id_or_name: &str) -> Option<usize> {
        list.iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| list.iter().position(|s| s.name == id_or_name))
    }

    /// `qemu-img snapshot -a NAME`.
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        let fail = |msg: &str| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("Could not apply snapshot '{id_or_name}': {msg}"),
            )
        };
        if self.has_data_file {
            return Err(fail("Failed to load snapshot: Operation not supported"));
        }
        if !self.bitmaps.is_empty() {
            return Err(fail("Device has active dirty bitmaps"));
        }
        let list = read_table(self)?;
        let Some(i) = Self::find_snapshot(&list, id_or_name) else {
            return Err(fail("Failed to load snapshot: No such file or directory"));
        };
        let sn = list[i].clone();
        if let Err(e) = sn.validate_l1(self.cs) {
            crate::warn::emit(&format!("{}: {}", super::check::prog_name(), e.message()));
            let errno = validate_errno(&e);
            return Err(e.with_message(format!(
                "Could not apply snapshot '{id_or_name}': Failed to load snapshot: {errno}"
            )));
        }
        let size = self.current_size()?;
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.flush_meta(&mut m)?;
        if let Some(ds) = sn.disk_size {
            if ds != size {
                self.resize_locked(&mut m, size, ds, super::create::Prealloc::Off)
                    .map_err(|e| {
                        let msg = e.message().to_string();
                        e.with_message(format!(
                            "Could not apply snapshot '{id_or_name}': Failed to load snapshot: {msg}"
                        ))
                    })?;
            }
        }
        if sn.l1_size as u64 > m.l1.len() as u64 {
            self.grow_l1(&mut m, sn.l1_size as u64)?;
            self.flush_meta(&mut m)?;
        }
        let flen = self.file.len()?;
        let bytes = sn.l1_size as u64 * 8;
        if sn.l1_table_offset.saturating_add(bytes) > flen {
            return Err(fail("Snapshot L1 table offset invalid"));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file.read_at(&mut raw, sn.l1_table_offset)?;
        let mut new_l1 = vec![0u64; m.l1.len()];
        for (k, c) in raw.chunks_exact(8).enumerate() {
            new_l1[k] = u64::from_be_bytes(c.try_into().unwrap());
        }
        self.tree_refcount(&mut m, &mut new_l1, 1, false)?;
        self.write_dirty_refblocks(&mut m)?;
        self.file.sync()?;
        let mut old_l1 = std::mem::replace(&mut m.l1, new_l1);
        self.write_l1(&mut m)?;
        self.file.sync()?;
        self.tree_refcount(&mut m, &mut old_l1, -1, false)?;
        m.changed = true;
        self.fix_copied_flags(&mut m)?;
        self.flush_meta(&mut m)
    }

    /// `qemu-img snapshot -d NAME`: deletes the snapshot with that name (qemu-img matches
    /// names only).
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        let mut list = read_table(self)?;
        let Some(i) = list.iter().position(|s| s.name == name) else {
            return Err(Error::invalid_arg(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            )));
        };
        if self.has_data_file {
            return Err(enotsup("delete", name));
        }
        if let Err(e) = list[i].validate_l1(self.cs) {
            let msg = format!("Could not delete snapshot '{name}': {}", e.message());
            return Err(e.with_message(msg));
        }
        let sn = list.remove(i);
        let size = self.current_size()?;
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        self.flush_meta(&mut m)?;
        self.rewrite_snapshot_table(&mut m, &list, size)?;
        // From here on a failure only leaks clusters.
        let bytes = sn.l1_size as u64 * 8;
        let flen = self.file.len()?;
        if bytes > 0 && sn.l1_table_offset.saturating_add(bytes) <= flen {
            let mut raw = vec![0u8; bytes as usize];
            self.file.read_at(&mut raw, sn.l1_table_offset)?;
            let mut l1: Vec<u64> = raw
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            self.tree_refcount(&mut m, &mut l1, -1, false)?;
            let first = sn.l1_table_offset >> self.cluster_bits;
            for c in first..first + bytes.div_ceil(self.cs) {
                self.update_refcount(&mut m, c, -1)?;
            }
        }
        m.changed = true;
        self.fix_copied_flags(&mut m)?;
        self.flush_meta(&mut m)
    }
}

fn create_err(name: &str, e: Error) -> Error {
    let why = match e.kind() {
        ErrorKind::TooLarge => "Invalid argument".to_string(),
        _ => e.message().to_string(),
    };
    e.with_message(format!("Could not create snapshot '{name}': {why}"))
}

/// `strtoul`-like: the leading decimal digits of `s` (0 when none).
fn leading_number(s: &str) -> u64 {
    let s = s.trim_start();
    let d: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
    d.parse().unwrap_or(if d.is_empty() { 0 } else { u64::MAX })
}

/// The snapshots of an image as `snapshot -l` lists them (none with an external data file,
/// like qemu).
pub fn list(q: &Qcow2) -> Result<Vec<crate::formats::SnapshotInfo>> {
    if q.has_data_file {
        return Ok(Vec::new());
    }
    Ok(read_table(q)?.iter().map(SnapEntry::info).collect())
}

impl Qcow2 {
    /// The index of the snapshot whose given parts (ID, name) all match.
    fn find_exact(&self, id: Option<&str>, name: Option<&str>) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n))
    }

    /// One attempt of qemu's `qcow2_snapshot_load_tmp`: swaps the active L1 table for the
    /// snapshot's, in memory only.
    fn load_tmp_exact(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if id.is_none() && name.is_none() {
            return Err(Error::invalid_arg("snapshot_id and name are both NULL"));
        }
        if self.writable {
            return Err(Error::invalid_arg("Device is not readonly"));
        }
        let Some(i) = self.find_exact(id, name) else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "Can't find snapshot",
            ));
        };
        let sn = &self.snapshots[i];
        // validated when the table was read; checked again before anything is allocated
        super::header::validate_table(
            "Snapshot L1 table",
            sn.l1_table_offset,
            sn.l1_size as u64,
            8,
            super::header::MAX_L1_BYTES,
            self.cs,
        )?;
        let mut raw = vec![0u8; sn.l1_size as usize * 8];
        self.file
            .read_at(&mut raw, sn.l1_table_offset)
            .map_err(|e| e.with_message("Failed to read l1 table for snapshot"))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        m.l1 = l1;
        m.l1_offset = sn.l1_table_offset;
        m.l1_dirty = false;
        drop(m);
        self.invalidate_ccache();
        Ok(())
    }

    /// qemu's `bdrv_snapshot_load_tmp` (and its by-ID-or-name variant) for qcow2.
    pub(crate) fn load_snapshot_tmp_impl(&self, sel: &crate::formats::SnapshotSel) -> Result<()> {
        use crate::formats::SnapshotSel;
        match sel {
            SnapshotSel::Exact { id, name } => self.load_tmp_exact(id.as_deref(), name.as_deref()),
            SnapshotSel::IdOrName(s) => match self.load_tmp_exact(Some(s), None) {
                // qemu retries by name after ENOENT or EINVAL
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidArgument | ErrorKind::InvalidImage
                    ) =>
                {
                    self.load_tmp_exact(None, Some(s))
                }
                r => r,
            },
        }
    }
}
