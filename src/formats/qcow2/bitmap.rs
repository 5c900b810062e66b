//! Persistent dirty bitmaps (the bitmaps header extension and the bitmap directory).
//!
//! A bitmap has one bit per `granularity` bytes of the guest (least significant bit first in
//! each byte), stored in clusters listed by its bitmap table; a table entry of 0 is a cluster
//! of zeroes, 1 a cluster of ones. `BitmapEditor` loads the directory, applies `qemu-img
//! bitmap`'s operations in memory and writes the result in a crash-safe order: bitmap data
//! and tables first, then the new directory, then the header extension, and only then are
//! the old clusters freed.

use super::header::{self, be32, be64, BitmapsExt, Header};
use super::tables::Meta;
use super::Qcow2;
use crate::error::{Error, ErrorKind, Result};

/// At most this many bitmaps in an image.
pub const MAX_BITMAPS: usize = crate::limits::QCOW2_MAX_BITMAPS;
/// The largest bitmap directory.
pub const MAX_DIRECTORY_SIZE: u64 = crate::limits::QCOW2_MAX_BITMAP_DIRECTORY;
/// The longest bitmap name (bytes).
pub const MAX_NAME_SIZE: usize = crate::limits::QCOW2_MAX_BITMAP_NAME;
const MAX_TABLE_SIZE: u64 = crate::limits::QCOW2_MAX_BITMAP_TABLE;
const MAX_PHYS_SIZE: u64 = crate::limits::QCOW2_MAX_BITMAP_DATA;
const MIN_GRANULARITY_BITS: u32 = 9;
const MAX_GRANULARITY_BITS: u32 = 31;
const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 2;
const RESERVED_FLAGS: u32 = 0xffff_fffc;
const ENTRY_RESERVED: u64 = 0xff00_0000_0000_01fe;
const ENTRY_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const ENTRY_ALL_ONES: u64 = 1;
const TYPE_DIRTY_TRACKING: u8 = 1;

/// Can the image be resized with its bitmaps?
pub(crate) fn resize_bitmaps_check(q: &Qcow2) -> Result<()> {
    if q.bitmaps.is_empty() {
        return Ok(());
    }
    Err(Error::unsupported(
        "Cannot resize qcow2 with persistent bitmaps (not supported by diskit yet)",
    ))
}

/// Gives the bitmaps the new guest size.
pub(crate) fn resize_bitmaps(_q: &Qcow2, _m: &mut Meta, _new: u64) -> Result<()> {
    Ok(())
}

/// A name for the image's node in messages, the way qemu names anonymous nodes
/// (`#block` + counter + two random digits).
pub fn node_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("#block1{:02}", (nanos / 1000) % 100)
}

/// The contents of one bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapData {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Guest bytes covered (the virtual size).
    pub size: u64,
    /// The bits, least significant first; bits past `size` are zero.
    pub bits: Vec<u8>,
    /// Marked in use in the image: its contents are not valid.
    pub inconsistent: bool,
}

impl BitmapData {
    fn nbits(size: u64, granularity: u64) -> u64 {
        size.div_ceil(granularity)
    }

    /// A bitmap of zeroes.
    pub fn new(name: &str, granularity: u64, size: u64) -> BitmapData {
        let n = Self::nbits(size, granularity).div_ceil(8) as usize;
        BitmapData {
            name: name.to_string(),
            granularity,
            size,
            bits: vec![0; n],
            inconsistent: false,
        }
    }

    /// Is the bit covering guest byte `offset` set?
    pub fn get(&self, offset: u64) -> bool {
        let i = offset / self.granularity;
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Sets every bit covering guest bytes `start..end`.
    pub fn set_range(&mut self, start: u64, end: u64) {
        let end = end.min(self.size);
        if start >= end {
            return;
        }
        let first = start / self.granularity;
        let last = (end - 1) / self.granularity;
        let mut i = first;
        while i <= last {
            if i % 8 == 0 && i + 8 <= last + 1 {
                self.bits[(i / 8) as usize] = 0xff;
                i += 8;
            } else {
                self.bits[(i / 8) as usize] |= 1 << (i % 8);
                i += 1;
            }
        }
    }

    /// Sets the bits of `self` wherever `src` has dirty bytes (any granularities).
    pub fn merge_from(&mut self, src: &BitmapData) {
        if src.granularity == self.granularity && src.bits.len() == self.bits.len() {
            for (d, s) in self.bits.iter_mut().zip(&src.bits) {
                *d |= s;
            }
            return;
        }
        let g = src.granularity;
        let mut run: Option<(u64, u64)> = None;
        for (bi, &byte) in src.bits.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for bit in 0..8u64 {
                if byte & (1 << bit) == 0 {
                    continue;
                }
                let i = bi as u64 * 8 + bit;
                let (s, e) = (i * g, (i + 1) * g);
                run = match run {
                    Some((rs, re)) if re == s => Some((rs, e)),
                    Some((rs, re)) => {
                        self.set_range(rs, re);
                        Some((s, e))
                    }
                    None => Some((s, e)),
                };
            }
        }
        if let Some((rs, re)) = run {
            self.set_range(rs, re);
        }
    }

    /// Clears the bits past the end of the covered range.
    fn mask_tail(&mut self) {
        let n = Self::nbits(self.size, self.granularity);
        if n % 8 != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u8 << (n % 8)) - 1;
            }
        }
    }
}

/// Where `--merge` takes its source bitmap from.
#[derive(Debug, Clone)]
pub enum MergeSource {
    /// A bitmap of the image being edited (as it stands after the earlier operations).
    Same,
    /// A bitmap read from another image (`None`: that image has no such bitmap).
    Other(Option<BitmapData>),
}

/// One operation of `qemu-img bitmap`.
#[derive(Debug, Clone)]
pub enum BitmapAction {
    /// `--add` (with `-g`: the granularity as given, truncated to 32 bits as qemu does).
    Add {
        /// Granularity in bytes; `None` for the default.
        granularity: Option<u64>,
    },
    /// `--remove`
    Remove,
    /// `--clear`
    Clear,
    /// `--enable`
    Enable,
    /// `--disable`
    Disable,
    /// `--merge SOURCE`
    Merge {
        /// Source bitmap name.
        source: String,
        /// Where it lives.
        from: MergeSource,
    },
}

impl BitmapAction {
    /// The operation's name in qemu-img's messages.
    pub fn op_name(&self) -> &'static str {
        match self {
            BitmapAction::Add { .. } => "add",
            BitmapAction::Remove => "remove",
            BitmapAction::Clear => "clear",
            BitmapAction::Enable => "enable",
            BitmapAction::Disable => "disable",
            BitmapAction::Merge { .. } => "merge",
        }
    }
}

/// One bitmap of the directory, as loaded and as edited.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    granularity_bits: u32,
    /// The flags as read (kept for in-use bitmaps, which are left untouched).
    flags: u32,
    enabled: bool,
    in_use: bool,
    table_offset: u64,
    table_size: u32,
    /// New contents to write (new, cleared or merged bitmaps).
    data: Option<BitmapData>,
}

impl Entry {
    fn dir_len(name_len: usize) -> u64 {
        (24 + name_len as u64).div_ceil(8) * 8
    }
}

fn bitmap_err(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}

fn not_found(name: &str) -> Error {
    bitmap_err(format!("Dirty bitmap '{name}' not found"))
}

fn inconsistent(name: &str) -> Error {
    bitmap_err(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

impl Qcow2 {
    /// The bitmaps extension as it is on disk now.
    fn bitmaps_ext_now(&self) -> Result<Option<BitmapsExt>> {
        Ok(Header::read(&self.file)?.bitmaps)
    }

    /// Reads and validates the bitmap directory (as qemu does when it loads bitmaps).
    fn load_directory(&self) -> Result<Vec<Entry>> {
        let Some(ext) = self.bitmaps_ext_now()? else {
            return Ok(Vec::new());
        };
        let fname = &self.filename;
        let size = ext.directory_size;
        if size == 0 {
            return Err(Error::invalid_image(format!(
                "{fname}: Requested bitmap directory size is zero"
            )));
        }
        if size > MAX_DIRECTORY_SIZE {
            return Err(Error::invalid_image(format!(
                "{fname}: Requested bitmap directory size is too big"
            )));
        }
        let flen = self.file.len()?;
        if ext
            .directory_offset
            .checked_add(size)
            .is_none_or(|e| e > flen)
        {
            return Err(Error::invalid_image(format!(
                "{fname}: bitmap directory is beyond the end of the file"
            )));
        }
        let mut dir = vec![0u8; size as usize];
        self.file.read_at(&mut dir, ext.directory_offset)?;
        let broken = || Error::invalid_image(format!("{fname}: Broken bitmap directory"));
        let mut out = Vec::new();
        let mut off = 0usize;
        while off < dir.len() {
            if off + 24 > dir.len() {
                return Err(broken());
            }
            if out.len() >= ext.nb_bitmaps as usize {
                return Err(Error::invalid_image(format!(
                    "{fname}: More bitmaps found than specified in header extension"
                )));
            }
            let e = &dir[off..];
            let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = be32(e, 20) as usize;
            let total = (24 + extra + name_size).div_ceil(8) * 8;
            if off + total > dir.len() {
                return Err(broken());
            }
            if extra != 0 {
                return Err(Error::unsupported(format!(
                    "{fname}: Bitmap extra data is not supported"
                )));
            }
            let name = String::from_utf8_lossy(&e[24..24 + name_size]).into_owned();
            let ent = Entry {
                table_offset: be64(e, 0),
                table_size: be32(e, 8),
                flags: be32(e, 12),
                granularity_bits: e[17] as u32,
                enabled: be32(e, 12) & FLAG_AUTO != 0,
                in_use: be32(e, 12) & FLAG_IN_USE != 0,
                name,
                data: None,
            };
            if !self.entry_ok(&ent, e[16], name_size) {
                return Err(Error::invalid_image(format!(
                    "{fname}: Bitmap '{}' doesn't satisfy the constraints",
                    ent.name
                )));
            }
            out.push(ent);
            off += total;
        }
        if out.len() != ext.nb_bitmaps as usize {
            return Err(Error::invalid_image(format!(
                "{fname}: Less bitmaps found than specified in header extension"
            )));
        }
        Ok(out)
    }

    /// qemu's constraints on a directory entry.
    fn entry_ok(&self, e: &Entry, kind: u8, name_size: usize) -> bool {
        if e.table_size == 0
            || e.table_offset == 0
            || e.table_offset % self.cs != 0
            || e.table_size as u64 > MAX_TABLE_SIZE
            || e.granularity_bits > MAX_GRANULARITY_BITS
            || e.granularity_bits < MIN_GRANULARITY_BITS
            || e.flags & RESERVED_FLAGS != 0
            || name_size > MAX_NAME_SIZE
            || kind != TYPE_DIRTY_TRACKING
        {
            return false;
        }
        let phys = e.table_size as u64 * self.cs;
        if phys > MAX_PHYS_SIZE {
            return false;
        }
        e.in_use || (self.size as u128) <= ((phys as u128 * 8) << e.granularity_bits)
    }

    /// Number of table entries (clusters of bitmap data) for this size and granularity.
    fn table_entries(&self, granularity: u64) -> u64 {
        BitmapData::nbits(self.size, granularity)
            .div_ceil(8)
            .div_ceil(self.cs)
    }

    /// Reads the table of a bitmap, checking every entry.
    fn read_table(&self, e: &Entry) -> Result<Vec<u64>> {
        let flen = self.file.len()?;
        let len = e.table_size as u64 * 8;
        if e.table_offset.checked_add(len).is_none_or(|x| x > flen) {
            return Err(Error::invalid_image(format!(
                "{}: Could not read bitmap_table table from image for bitmap '{}': bitmap table is beyond the end of the file",
                self.filename, e.name
            )));
        }
        let mut raw = vec![0u8; len as usize];
        self.file.read_at(&mut raw, e.table_offset)?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for &w in &table {
            let off = w & ENTRY_OFFSET;
            let bad = w & ENTRY_RESERVED != 0
                || (off != 0 && (w & ENTRY_ALL_ONES != 0 || off % self.cs != 0))
                || (off != 0 && off.checked_add(self.cs).is_none_or(|x| x > flen));
            if bad {
                return Err(Error::invalid_image(format!(
                    "{}: Could not read bitmap '{}' from image: invalid bitmap table entry {w:#x}",
                    self.filename, e.name
                )));
            }
        }
        Ok(table)
    }

    /// Loads the contents of a bitmap (an in-use bitmap reads as inconsistent and empty).
    fn load_entry_data(&self, e: &Entry) -> Result<BitmapData> {
        let gran = 1u64 << e.granularity_bits;
        if e.in_use {
            // its contents are never used: allocate nothing (its size is unchecked)
            return Ok(BitmapData {
                name: e.name.clone(),
                granularity: gran,
                size: self.size,
                bits: Vec::new(),
                inconsistent: true,
            });
        }
        if let Some(new) = &e.data {
            return Ok(new.clone());
        }
        // the table size is bounded (MAX_PHYS_SIZE) by the directory checks: check it
        // before allocating the bits
        if e.table_size as u64 != self.table_entries(gran) {
            return Err(Error::invalid_image(format!(
                "{}: Could not read bitmap '{}' from image: Invalid argument",
                self.filename, e.name
            )));
        }
        let mut d = BitmapData::new(&e.name, gran, self.size);
        let table = self.read_table(e)?;
        let cs = self.cs as usize;
        let mut buf = vec![0u8; cs];
        for (i, &w) in table.iter().enumerate() {
            let start = i * cs;
            if start >= d.bits.len() {
                break;
            }
            let end = (start + cs).min(d.bits.len());
            let off = w & ENTRY_OFFSET;
            if off != 0 {
                self.file.read_at(&mut buf, off)?;
                d.bits[start..end].copy_from_slice(&buf[..end - start]);
            } else if w & ENTRY_ALL_ONES != 0 {
                d.bits[start..end].fill(0xff);
            }
        }
        d.mask_tail();
        Ok(d)
    }

    /// The contents of the persistent bitmap `name`, if the image has one.
    pub fn read_bitmap(&self, name: &str) -> Result<Option<BitmapData>> {
        let list = self.load_directory()?;
        match list.iter().find(|e| e.name == name) {
            None => Ok(None),
            Some(e) => Ok(Some(self.load_entry_data(e)?)),
        }
    }

    /// Starts editing the persistent bitmaps (the image must be open for writing).
    pub fn bitmap_editor(&self) -> Result<BitmapEditor<'_>> {
        if !self.writable {
            return Err(Error::unsupported(format!(
                "{}: the image is open read-only",
                self.filename
            )));
        }
        let list = self.load_directory()?;
        let orig = list.clone();
        Ok(BitmapEditor {
            q: self,
            list,
            orig,
            changed: false,
        })
    }

    /// Writes new data clusters and a table for `d`; returns (table offset, entries).
    fn store_data(&self, m: &mut Meta, d: &BitmapData) -> Result<(u64, u32)> {
        let cs = self.cs as usize;
        let n = self.table_entries(d.granularity);
        let mut table = vec![0u64; n as usize];
        let mut buf = vec![0u8; cs];
        for (i, t) in table.iter_mut().enumerate() {
            let start = i * cs;
            let end = (start + cs).min(d.bits.len());
            if start >= end || d.bits[start..end].iter().all(|&b| b == 0) {
                continue;
            }
            buf.fill(0);
            buf[..end - start].copy_from_slice(&d.bits[start..end]);
            let off = self.alloc_clusters(m, 1)?;
            self.overlap_check(m, off, self.cs, "bitmap data")?;
            self.file.write_at(&buf, off)?;
            *t = off;
        }
        let mut raw = Vec::with_capacity(table.len() * 8);
        for t in &table {
            raw.extend_from_slice(&t.to_be_bytes());
        }
        let nclusters = (raw.len() as u64).div_ceil(self.cs).max(1);
        let off = self.alloc_clusters(m, nclusters)?;
        self.overlap_check(m, off, raw.len() as u64, "bitmap table")?;
        self.file.write_at(&raw, off)?;
        Ok((off, n as u32))
    }

    /// Drops the references of a bitmap's table and data clusters.
    fn free_entry_clusters(&self, m: &mut Meta, e: &Entry) -> Result<()> {
        let Ok(table) = self.read_table(e) else {
            // a broken table is leaked rather than freed blindly (check -r reclaims it)
            return Ok(());
        };
        for w in table {
            let off = w & ENTRY_OFFSET;
            if off != 0 {
                self.update_refcount(m, off >> self.cluster_bits, -1)?;
            }
        }
        let n = (e.table_size as u64 * 8).div_ceil(self.cs);
        for c in 0..n {
            self.update_refcount(m, (e.table_offset >> self.cluster_bits) + c, -1)?;
        }
        Ok(())
    }

    /// Points the header at a new bitmap directory (or none) and makes it durable.
    fn write_bitmaps_ext(&self, m: &mut Meta, ext: Option<BitmapsExt>) -> Result<()> {
        let mut h = Header::read(&self.file)?;
        h.unknown_exts.retain(|e| e.kind != header::EXT_BITMAPS);
        h.autoclear &= header::AUTOCLEAR_MASK;
        if ext.is_some() {
            h.autoclear |= header::AUTOCLEAR_BITMAPS;
        } else {
            h.autoclear &= !header::AUTOCLEAR_BITMAPS;
        }
        h.bitmaps = ext;
        let raw = h.serialize()?;
        self.file.write_at(&raw, 0)?;
        self.file.sync()?;
        m.autoclear = h.autoclear;
        Ok(())
    }
}

/// Edits the persistent bitmaps of an open qcow2 image: operations change the in-memory
/// list, `commit` writes it.
pub struct BitmapEditor<'a> {
    q: &'a Qcow2,
    list: Vec<Entry>,
    orig: Vec<Entry>,
    changed: bool,
}

impl BitmapEditor<'_> {
    fn find(&self, name: &str) -> Result<usize> {
        self.list
            .iter()
            .position(|e| e.name == name)
            .ok_or_else(|| not_found(name))
    }

    /// Applies one operation to the bitmap `name`; the error is qemu's text (without the
    /// "Operation ... failed" prefix).
    pub fn apply(&mut self, name: &str, action: &BitmapAction) -> Result<()> {
        let q = self.q;
        match action {
            BitmapAction::Add { granularity } => {
                if name.is_empty() {
                    return Err(bitmap_err("Bitmap name cannot be empty"));
                }
                let gran = match granularity {
                    Some(g) => {
                        let g = g & 0xffff_ffff;
                        if g < 512 || !g.is_power_of_two() {
                            return Err(bitmap_err(
                                "Granularity must be power of 2 and at least 512",
                            ));
                        }
                        g
                    }
                    None => q.cs.clamp(4096, 65536),
                };
                if self.list.iter().any(|e| e.name == name) {
                    return Err(bitmap_err(format!("Bitmap already exists: {name}")));
                }
                let persist_err = |why: &str| {
                    bitmap_err(format!(
                        "Can't make bitmap '{name}' persistent in '{}': {why}",
                        node_name()
                    ))
                };
                if q.hdr.version < 3 {
                    return Err(persist_err("Cannot store dirty bitmaps in qcow2 v2 files"));
                }
                let bytes = BitmapData::nbits(q.size, gran).div_ceil(8);
                if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE * q.cs {
                    return Err(persist_err(
                        "Too much space will be occupied by the bitmap. Use larger granularity",
                    ));
                }
                if name.len() > MAX_NAME_SIZE {
                    return Err(persist_err(&format!(
                        "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
                    )));
                }
                if self.list.len() + 1 > MAX_BITMAPS {
                    return Err(persist_err(
                        "Maximum number of persistent bitmaps is already reached",
                    ));
                }
                let dir: u64 = self
                    .list
                    .iter()
                    .map(|e| Entry::dir_len(e.name.len()))
                    .sum::<u64>()
                    + Entry::dir_len(name.len());
                if dir > MAX_DIRECTORY_SIZE {
                    return Err(persist_err("Not enough space in the bitmap directory"));
                }
                self.list.push(Entry {
                    name: name.to_string(),
                    granularity_bits: gran.trailing_zeros(),
                    flags: FLAG_AUTO,
                    enabled: true,
                    in_use: false,
                    table_offset: 0,
                    table_size: 0,
                    data: Some(BitmapData::new(name, gran, q.size)),
                });
            }
            BitmapAction::Remove => {
                let i = self.find(name)?;
                self.list.remove(i);
            }
            BitmapAction::Clear => {
                let i = self.find(name)?;
                let e = &mut self.list[i];
                if e.in_use {
                    return Err(inconsistent(name));
                }
                e.data = Some(BitmapData::new(name, 1 << e.granularity_bits, q.size));
            }
            BitmapAction::Enable | BitmapAction::Disable => {
                let i = self.find(name)?;
                let e = &mut self.list[i];
                if e.in_use {
                    return Err(inconsistent(name));
                }
                e.enabled = matches!(action, BitmapAction::Enable);
            }
            BitmapAction::Merge { source, from } => {
                let i = self.find(name)?;
                let src = match from {
                    MergeSource::Same => {
                        let j = self.find(source)?;
                        q.load_entry_data(&self.list[j])?
                    }
                    MergeSource::Other(d) => d.clone().ok_or_else(|| not_found(source))?,
                };
                if self.list[i].in_use {
                    return Err(inconsistent(name));
                }
                if src.inconsistent {
                    return Err(inconsistent(source));
                }
                if src.size != q.size {
                    return Err(bitmap_err(format!(
                        "Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                        q.size, src.size
                    )));
                }
                let mut dst = q.load_entry_data(&self.list[i])?;
                dst.merge_from(&src);
                self.list[i].data = Some(dst);
            }
        }
        self.changed = true;
        Ok(())
    }

    /// Writes the edited bitmaps: new data and tables, the directory, the header extension,
    /// then frees what the old directory used. Does nothing if no operation succeeded.
    pub fn commit(mut self) -> Result<()> {
        if !self.changed {
            return Ok(());
        }
        let q = self.q;
        if self.list.iter().any(|e| e.data.is_some()) && q.table_entries(512) == 0 {
            // an empty image has no room for bitmap data: qemu fails to store (and keeps
            // the old state)
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "Lost persistent bitmaps during inactivation of node '{}': No memory",
                    node_name()
                ),
            ));
        }
        let mut m = q.meta.lock().unwrap_or_else(|e| e.into_inner());
        // 1. data and tables of new/rewritten bitmaps
        for e in self.list.iter_mut() {
            if let Some(d) = e.data.take() {
                let (off, n) = q.store_data(&mut m, &d)?;
                e.table_offset = off;
                e.table_size = n;
            }
        }
        // 2. the directory
        let mut dir = Vec::new();
        for e in &self.list {
            let flags = if e.in_use {
                e.flags
            } else if e.enabled {
                FLAG_AUTO
            } else {
                0
            };
            let start = dir.len();
            dir.extend_from_slice(&e.table_offset.to_be_bytes());
            dir.extend_from_slice(&e.table_size.to_be_bytes());
            dir.extend_from_slice(&flags.to_be_bytes());
            dir.push(TYPE_DIRTY_TRACKING);
            dir.push(e.granularity_bits as u8);
            dir.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
            dir.extend_from_slice(&0u32.to_be_bytes());
            dir.extend_from_slice(e.name.as_bytes());
            dir.resize(start + Entry::dir_len(e.name.len()) as usize, 0);
        }
        let ext = if self.list.is_empty() {
            None
        } else {
            let n = (dir.len() as u64).div_ceil(q.cs);
            let off = q.alloc_clusters(&mut m, n)?;
            q.overlap_check(&m, off, dir.len() as u64, "bitmap directory")?;
            q.file.write_at(&dir, off)?;
            Some(BitmapsExt {
                nb_bitmaps: self.list.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: off,
            })
        };
        q.write_dirty_refblocks(&mut m)?;
        q.file.sync()?;
        // 3. the header extension
        let old_ext = q.bitmaps_ext_now()?;
        q.write_bitmaps_ext(&mut m, ext)?;
        // 4. free what is no longer referenced
        if let Some(old) = old_ext {
            let n = old.directory_size.div_ceil(q.cs);
            for c in 0..n {
                q.update_refcount(&mut m, (old.directory_offset >> q.cluster_bits) + c, -1)?;
            }
        }
        for o in &self.orig {
            let kept = self
                .list
                .iter()
                .any(|e| e.table_offset == o.table_offset && e.table_size == o.table_size);
            if !kept {
                q.free_entry_clusters(&mut m, o)?;
            }
        }
        q.write_dirty_refblocks(&mut m)?;
        q.file.sync()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::BitmapData;

    #[test]
    fn set_range_and_merge() {
        let mut a = BitmapData::new("a", 512, 64 * 512);
        a.set_range(512, 512 * 11);
        assert_eq!(a.bits[..2], [0xfe, 0x07]);
        let mut b = BitmapData::new("b", 4096, 64 * 512);
        b.merge_from(&a);
        assert_eq!(b.bits, vec![0x03]);
        let mut c = BitmapData::new("c", 512, 64 * 512);
        c.merge_from(&b);
        assert_eq!(c.bits[..3], [0xff, 0xff, 0x00]);
        assert!(c.get(8191) && !c.get(8192));
    }
}
