//! Sparse extents: hosted sparse (VMDK4, also stream-optimized) and ESX sparse (COWD).
//!
//! The grain directory (GD) lives in memory; grain tables (GT) are read on demand into a
//! bounded cache. All metadata sits behind one mutex per extent; grain data is read outside it.

use std::sync::{Arc, Mutex, MutexGuard};

use flate2::{Decompress, FlushDecompress, Status};

use super::header::*;
use crate::error::{Error, Result};
use crate::io::HostFile;

/// Where one grain lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated in this extent.
    Unallocated,
    /// Zeroed-grain entry (GTE 1).
    Zeroed,
    /// Plain data at this byte offset of the extent file.
    Data(u64),
    /// A compressed grain (its marker or data) at this byte offset.
    Compressed(u64),
}

/// Mutable metadata of a sparse extent.
#[derive(Debug)]
pub struct State {
    /// Grain directory in use (sector numbers of grain tables).
    pub gd: Vec<u32>,
    /// Redundant grain directory, kept in step on writes.
    pub rgd: Option<Vec<u32>>,
    gts: crate::formats::OffsetMap<u32, Vec<u32>>,
    /// Current length of the extent file.
    pub file_len: u64,
    /// Where the next grain goes, in sectors.
    pub next_sector: u64,
    last: Option<(u64, Arc<Vec<u8>>)>,
}

/// An open sparse extent.
#[derive(Debug)]
pub struct SparseExtent {
    /// The extent file.
    pub file: Arc<HostFile>,
    /// Its name in messages.
    pub name: String,
    /// Size in bytes.
    pub capacity: u64,
    /// Grain size in bytes.
    pub grain: u64,
    /// Entries per grain table.
    pub gtes: u32,
    /// Grains are compressed.
    pub compressed: bool,
    /// Grains and metadata carry markers.
    pub markers: bool,
    /// GTE 1 means zeroed.
    pub zero_grain: bool,
    /// ESX sparse (COWD) extent.
    pub cowd: bool,
    /// The effective header (from the footer for streams); None for COWD.
    pub header: Option<SparseHeader>,
    /// The header said "GD at end" (VMware stream layout).
    pub gd_at_end: bool,
    /// Byte offset of the grain directory in use.
    pub gd_offset: u64,
    /// Byte offset of the redundant directory, if it is kept in step.
    pub rgd_offset: Option<u64>,
    /// The primary directory was damaged and the redundant one is used instead.
    pub using_redundant: bool,
    /// Opened for `check`: tables past the end of the file read as zero (as in QEMU), and
    /// the redundant directory is not loaded.
    pub lenient: bool,
    state: Mutex<State>,
}

fn gt_bytes(gtes: u32) -> u64 {
    gtes as u64 * 4
}

/// Reads and checks a grain directory: it must lie in the file and every table it names too.
fn read_gd(
    file: &HostFile,
    name: &str,
    what: &str,
    off: u64,
    n: u32,
    gtes: u32,
    lenient: bool,
) -> Result<Vec<u32>> {
    let file_len = file.len()?;
    let bytes = n as u64 * 4;
    if lenient {
        // Check mode reads like QEMU: what lies past the end of the file reads as zero, so
        // a directory or table there names nothing. (`n` is bounded by the caller.)
        let mut buf = vec![0u8; bytes as usize];
        if off.checked_add(bytes).is_some() {
            file.read_at(&mut buf, off)?;
        }
        return Ok(decode_table(&buf));
    }
    if off.checked_add(bytes).is_none_or(|end| end > file_len) || (off == 0 && n > 0) {
        return Err(Error::corrupt(format!(
            "{name}: {what} at offset {off:#x} ({bytes} bytes) lies beyond the end of the file ({file_len} bytes)"
        )));
    }
    let mut buf = vec![0u8; bytes as usize];
    file.read_exact_at(&mut buf, off)?;
    let gd = decode_table(&buf);
    for (i, &e) in gd.iter().enumerate() {
        if e == 0 {
            continue;
        }
        let start = e as u64 * SECTOR;
        if start
            .checked_add(gt_bytes(gtes))
            .is_none_or(|end| end > file_len)
        {
            return Err(Error::corrupt(format!(
                "{name}: {what} entry {i} names a grain table at offset {start:#x} beyond the end of the file ({file_len} bytes)"
            )));
        }
    }
    Ok(gd)
}

impl SparseExtent {
    /// Opens a hosted sparse extent whose first sector is `head`.
    pub fn open_vmdk4(
        file: Arc<HostFile>,
        name: &str,
        head: &[u8],
        writable: bool,
        lenient: bool,
    ) -> Result<SparseExtent> {
        let mut h = SparseHeader::parse(head);
        let file_len = file.len()?;
        let gd_at_end = h.gd_offset == GD_AT_END;
        if gd_at_end {
            let end = file_len.div_ceil(SECTOR) * SECTOR;
            let invalid = || Error::invalid_image(format!("{name}: Invalid footer"));
            if end < 4 * SECTOR {
                return Err(invalid());
            }
            let mut f = vec![0u8; 3 * SECTOR as usize];
            file.read_at(&mut f, end - 3 * SECTOR)?;
            let fm = Marker::parse(&f[0..16]);
            let eos = Marker::parse(&f[1024..1040]);
            if &f[512..516] != MAGIC_KDMV
                || fm.size != 0
                || fm.kind != MARKER_FOOTER
                || eos.value != 0
                || eos.size != 0
                || eos.kind != MARKER_EOS
            {
                return Err(invalid());
            }
            h = SparseHeader::parse(&f[512..1024]);
            if h.gd_offset == GD_AT_END {
                return Err(invalid());
            }
        }
        let compressed = h.compress == COMPRESSION_DEFLATE;
        if h.version > 3 {
            return Err(Error::unsupported(format!(
                "{name}: Unsupported VMDK version {}",
                h.version
            )));
        }
        if h.version == 3 && writable && !compressed {
            return Err(Error::unsupported(format!(
                "{name}: VMDK version 3 must be read only"
            )));
        }
        if h.gtes_per_gt > 512 {
            return Err(Error::invalid_image(format!(
                "{name}: L2 table size too big"
            )));
        }
        let l1 = validate_geometry(h.capacity, h.grain_sectors, h.gtes_per_gt)
            .map_err(|e| e.context(name))?;
        if h.grain_offset
            .checked_mul(SECTOR)
            .is_none_or(|b| b > file_len)
        {
            return Err(Error::invalid_image(format!(
                "{name}: File truncated, expecting at least {} bytes",
                h.grain_offset.saturating_mul(SECTOR)
            )));
        }
        let gd_off = h
            .gd_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt(format!("{name}: grain directory offset overflows")))?;
        let rgd_off = if h.flags & FLAG_RGD != 0 {
            h.rgd_offset.checked_mul(SECTOR)
        } else {
            None
        };
        let mut ext = SparseExtent {
            file: file.clone(),
            name: name.to_string(),
            capacity: h.capacity * SECTOR,
            grain: h.grain_sectors * SECTOR,
            gtes: h.gtes_per_gt,
            compressed,
            markers: h.flags & FLAG_MARKERS != 0,
            zero_grain: h.flags & FLAG_ZERO_GRAIN != 0,
            cowd: false,
            header: Some(h),
            gd_at_end,
            gd_offset: gd_off,
            rgd_offset: rgd_off,
            using_redundant: false,
            lenient,
            state: Mutex::new(State {
                gd: Vec::new(),
                rgd: None,
                gts: Default::default(),
                file_len,
                next_sector: 0,
                last: None,
            }),
        };
        ext.load_directories(l1, writable)?;
        Ok(ext)
    }

    /// Opens an ESX sparse (COWD) extent.
    pub fn open_cowd(
        file: Arc<HostFile>,
        name: &str,
        head: &[u8],
        writable: bool,
        lenient: bool,
    ) -> Result<SparseExtent> {
        let h = CowdHeader::parse(head);
        let file_len = file.len()?;
        let needed = validate_geometry(h.capacity, h.grain_sectors, COWD_GTES_PER_GT)
            .map_err(|e| e.context(name))?;
        if h.gd_entries < needed {
            return Err(Error::corrupt(format!(
                "{name}: grain directory of {} entries is too small for {} sectors",
                h.gd_entries, h.capacity
            )));
        }
        if h.gd_entries > 32 * 1024 * 1024 {
            return Err(Error::invalid_image(format!("{name}: L1 size too big")));
        }
        let mut ext = SparseExtent {
            file: file.clone(),
            name: name.to_string(),
            capacity: h.capacity * SECTOR,
            grain: h.grain_sectors * SECTOR,
            gtes: COWD_GTES_PER_GT,
            compressed: false,
            markers: false,
            zero_grain: false,
            cowd: true,
            header: None,
            gd_at_end: false,
            gd_offset: h.gd_offset * SECTOR,
            rgd_offset: None,
            using_redundant: false,
            lenient,
            state: Mutex::new(State {
                gd: Vec::new(),
                rgd: None,
                gts: Default::default(),
                file_len,
                next_sector: 0,
                last: None,
            }),
        };
        ext.load_directories(h.gd_entries, writable)?;
        Ok(ext)
    }

    fn load_directories(&mut self, n: u32, writable: bool) -> Result<()> {
        let primary = read_gd(
            &self.file,
            &self.name,
            "grain directory",
            self.gd_offset,
            n,
            self.gtes,
            self.lenient,
        );
        let redundant = self.rgd_offset.filter(|_| !self.lenient).map(|off| {
            read_gd(
                &self.file,
                &self.name,
                "redundant grain directory",
                off,
                n,
                self.gtes,
                false,
            )
        });
        let st = self.state.get_mut().unwrap();
        match (primary, redundant) {
            (Ok(gd), Some(Ok(rgd))) => {
                st.gd = gd;
                st.rgd = Some(rgd);
            }
            (Ok(gd), Some(Err(e))) => {
                crate::warn::emit(&format!(
                    "warning: {}; writes will only update the primary grain directory",
                    e.message()
                ));
                st.gd = gd;
                self.rgd_offset = None;
            }
            (Ok(gd), None) => st.gd = gd,
            (Err(e), Some(Ok(rgd))) => {
                if writable {
                    return Err(e.context("refusing to open for writing"));
                }
                crate::warn::emit(&format!(
                    "warning: {}; using the redundant grain directory",
                    e.message()
                ));
                st.gd = rgd;
                self.gd_offset = self.rgd_offset.take().unwrap_or(0);
                self.using_redundant = true;
            }
            (Err(e), _) => return Err(e),
        }
        st.next_sector = st.file_len.div_ceil(self.grain) * (self.grain / SECTOR);
        Ok(())
    }

    /// Locks the metadata.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load_gt<'a>(&self, st: &'a mut State, sector: u32) -> Result<&'a mut Vec<u32>> {
        if !st.gts.contains_key(&sector) {
            let len = gt_bytes(self.gtes);
            let off = sector as u64 * SECTOR;
            let mut buf = vec![0u8; len as usize];
            let read = if self.lenient {
                self.file.read_at(&mut buf, off)
            } else {
                self.file.read_exact_at(&mut buf, off)
            };
            read.map_err(|_| {
                Error::corrupt(format!(
                    "{}: grain table at offset {off:#x} lies beyond the end of the file",
                    self.name
                ))
            })?;
            let max = ((32u64 << 20) / len).max(16) as usize;
            if st.gts.len() >= max {
                st.gts.clear();
            }
            st.gts.insert(sector, decode_table(&buf));
        }
        Ok(st.gts.get_mut(&sector).unwrap())
    }

    /// The grain holding byte `rel` of the extent, and how many bytes from `rel` on share that
    /// answer (to the end of the grain, or of the grain table when the table is missing).
    pub fn lookup(&self, st: &mut State, rel: u64) -> Result<(Grain, u64)> {
        let idx = rel / self.grain;
        let l1 = (idx / self.gtes as u64) as usize;
        let l2 = (idx % self.gtes as u64) as usize;
        let grain_end = (idx + 1) * self.grain;
        let Some(&gt_sector) = st.gd.get(l1) else {
            return Err(Error::corrupt(format!(
                "{}: offset {rel:#x} is beyond the grain directory",
                self.name
            )));
        };
        if gt_sector == 0 {
            let gt_end = (l1 as u64 + 1) * self.gtes as u64 * self.grain;
            return Ok((Grain::Unallocated, gt_end - rel));
        }
        let e = self.load_gt(st, gt_sector)?[l2];
        let g = match e {
            0 => Grain::Unallocated,
            GTE_ZEROED if self.zero_grain => Grain::Zeroed,
            _ => {
                let off = e as u64 * SECTOR;
                if off >= st.file_len {
                    return Err(Error::corrupt(format!(
                        "{}: grain for offset {rel:#x} at {off:#x} lies beyond the end of the file ({} bytes)",
                        self.name, st.file_len
                    )));
                }
                if self.compressed {
                    Grain::Compressed(off)
                } else {
                    Grain::Data(off)
                }
            }
        };
        Ok((g, grain_end - rel))
    }

    /// The raw grain table entry for the grain holding byte `rel`, as `qemu-img check` sees
    /// it: `Ok(None)` when the directory names no table there (the whole table's range is
    /// unallocated), else the entry (0 unallocated; 1 zeroed where the header allows it).
    /// An error means the lookup itself failed (beyond the directory, unreadable table).
    pub fn raw_entry(&self, st: &mut State, rel: u64) -> Result<Option<u32>> {
        let idx = rel / self.grain;
        let l1 = idx / self.gtes as u64;
        let l2 = (idx % self.gtes as u64) as usize;
        let Some(&gt_sector) = usize::try_from(l1).ok().and_then(|i| st.gd.get(i)) else {
            return Err(Error::corrupt(format!(
                "{}: offset {rel:#x} is beyond the grain directory",
                self.name
            )));
        };
        if gt_sector == 0 {
            return Ok(None);
        }
        Ok(Some(self.load_gt(st, gt_sector)?[l2]))
    }

    /// The inflated content of a compressed grain starting at extent byte `grain_start`.
    pub fn read_compressed(&self, off: u64, grain_start: u64) -> Result<Arc<Vec<u8>>> {
        if let Some((o, data)) = &self.lock().last {
            if *o == off {
                return Ok(data.clone());
            }
        }
        let file_len = self.file.len()?;
        let input = if self.markers {
            let mut m = [0u8; 12];
            self.file.read_exact_at(&mut m, off)?;
            let size = u32::from_le_bytes(m[8..12].try_into().unwrap()) as u64;
            if size == 0 || size > 2 * self.grain {
                return Err(Error::corrupt(format!(
                    "{}: invalid grain marker at offset {off:#x} (compressed size {size})",
                    self.name
                )));
            }
            let mut b = vec![0u8; size as usize];
            self.file.read_exact_at(&mut b, off + 12)?;
            b
        } else {
            let n = (2 * self.grain).min(file_len.saturating_sub(off));
            let mut b = vec![0u8; n as usize];
            self.file.read_at(&mut b, off)?;
            b
        };
        let needed = self.grain.min(self.capacity - grain_start) as usize;
        let out = inflate_grain(&input, self.grain as usize).map_err(|m| {
            Error::corrupt(format!(
                "{}: compressed grain at offset {off:#x}: {m}",
                self.name
            ))
        })?;
        if out.len() < needed {
            return Err(Error::corrupt(format!(
                "{}: compressed grain at offset {off:#x} inflates to {} bytes, less than its grain",
                self.name,
                out.len()
            )));
        }
        let mut out = out;
        out.resize(self.grain as usize, 0);
        let data = Arc::new(out);
        self.lock().last = Some((off, data.clone()));
        Ok(data)
    }

    /// Appends a whole grain at the end of the file and returns its byte offset.
    pub fn append_grain(&self, st: &mut State, data: &[u8]) -> Result<u64> {
        let sector = st.next_sector;
        let gs = self.grain / SECTOR;
        if sector + gs > u32::MAX as u64 {
            return Err(Error::too_large(format!(
                "{}: the extent is full (grain offsets must stay below 2 TiB)",
                self.name
            )));
        }
        let off = sector * SECTOR;
        self.file.write_at(data, off)?;
        st.next_sector += gs;
        st.file_len = st.file_len.max(off + data.len() as u64);
        Ok(off)
    }

    fn new_gt(&self, st: &mut State) -> Result<u32> {
        let bytes = gt_bytes(self.gtes).div_ceil(SECTOR) * SECTOR;
        let sector = st.next_sector;
        if sector + bytes / SECTOR > u32::MAX as u64 {
            return Err(Error::too_large(format!(
                "{}: the extent is full",
                self.name
            )));
        }
        self.file
            .write_at(&vec![0u8; bytes as usize], sector * SECTOR)?;
        let gs = self.grain / SECTOR;
        st.next_sector = (sector + bytes / SECTOR).div_ceil(gs) * gs;
        st.file_len = st.file_len.max(sector * SECTOR + bytes);
        Ok(sector as u32)
    }

    /// Reserves `bytes` (rounded up to sectors) at the end of the file, zero-filled; the next
    /// grain goes to the following grain boundary.
    fn alloc_region(&self, st: &mut State, bytes: u64) -> Result<u64> {
        let sectors = bytes.div_ceil(SECTOR);
        let sector = st.next_sector;
        if sector + sectors > u32::MAX as u64 {
            return Err(Error::too_large(format!(
                "{}: the extent is full",
                self.name
            )));
        }
        self.file
            .write_at(&vec![0u8; (sectors * SECTOR) as usize], sector * SECTOR)?;
        let gs = self.grain / SECTOR;
        st.next_sector = (sector + sectors).div_ceil(gs) * gs;
        st.file_len = st.file_len.max((sector + sectors) * SECTOR);
        Ok(sector)
    }

    /// Grows the extent's tables to cover `new_capacity` bytes: new grain tables are
    /// preallocated for both directories, and a directory that outgrows its sectors moves
    /// to the end of the file. Returns the byte offsets of the directories to record in
    /// the header. (The header itself is the caller's.)
    pub fn grow(&self, new_capacity: u64) -> Result<(u64, Option<u64>)> {
        let mut st = self.lock();
        let new_n = new_capacity.div_ceil(self.grain).div_ceil(self.gtes as u64) as usize;
        let old_n = st.gd.len();
        if new_n > 32 * 1024 * 1024 {
            return Err(Error::too_large(format!("{}: L1 size too big", self.name)));
        }
        if new_n <= old_n {
            return Ok((self.gd_offset, self.rgd_offset));
        }
        let room = (old_n * 4).div_ceil(SECTOR as usize) * SECTOR as usize / 4;
        let gt_len = gt_bytes(self.gtes).div_ceil(SECTOR) * SECTOR;
        let mut gd_off = self.gd_offset;
        let mut rgd_off = self.rgd_offset;
        let dirs = if rgd_off.is_some() && st.rgd.is_some() {
            2
        } else {
            1
        };
        for d in 0..dirs {
            let add = (new_n - old_n) as u64;
            let first = self.alloc_region(&mut st, add * gt_len)?;
            let table = if d == 0 {
                &mut st.gd
            } else {
                st.rgd.as_mut().unwrap()
            };
            table.extend((0..add).map(|i| (first + i * gt_len / SECTOR) as u32));
            if new_n > room {
                let at = self.alloc_region(&mut st, new_n as u64 * 4)? * SECTOR;
                if d == 0 {
                    gd_off = at;
                } else {
                    rgd_off = Some(at);
                }
            }
            let (table, at) = if d == 0 {
                (&st.gd, gd_off)
            } else {
                (st.rgd.as_ref().unwrap(), rgd_off.unwrap_or(0))
            };
            let bytes = encode_table(
                table,
                (new_n * 4).div_ceil(SECTOR as usize) * SECTOR as usize,
            );
            self.file.write_at(&bytes, at)?;
        }
        Ok((gd_off, rgd_off))
    }

    /// Sets the grain table entry of the grain holding `rel` in both directories, creating a
    /// grain table where the directory has none.
    pub fn set_gte(&self, st: &mut State, rel: u64, value: u32) -> Result<()> {
        let idx = rel / self.grain;
        let l1 = (idx / self.gtes as u64) as usize;
        let l2 = idx % self.gtes as u64;
        if l1 >= st.gd.len() {
            return Err(Error::corrupt(format!(
                "{}: offset {rel:#x} is beyond the grain directory",
                self.name
            )));
        }
        let bytes = value.to_le_bytes();
        for redundant in [false, true] {
            let (dir_off, has) = if redundant {
                (
                    self.rgd_offset.unwrap_or(0),
                    self.rgd_offset.is_some() && st.rgd.is_some(),
                )
            } else {
                (self.gd_offset, true)
            };
            if !has {
                continue;
            }
            let cur = if redundant {
                st.rgd.as_ref().unwrap()[l1]
            } else {
                st.gd[l1]
            };
            let gt = if cur == 0 {
                let s = self.new_gt(st)?;
                self.file
                    .write_at(&s.to_le_bytes(), dir_off + l1 as u64 * 4)?;
                if redundant {
                    st.rgd.as_mut().unwrap()[l1] = s;
                } else {
                    st.gd[l1] = s;
                }
                s
            } else {
                cur
            };
            self.file.write_at(&bytes, gt as u64 * SECTOR + l2 * 4)?;
            if let Some(t) = st.gts.get_mut(&gt) {
                t[l2 as usize] = value;
            }
        }
        Ok(())
    }
}

/// Inflates one zlib-wrapped grain; more than `grain` bytes of output is an error.
pub fn inflate_grain(input: &[u8], grain: usize) -> std::result::Result<Vec<u8>, String> {
    let mut d = Decompress::new(true);
    let mut out = vec![0u8; grain + 1];
    loop {
        let before_in = d.total_in() as usize;
        let before_out = d.total_out() as usize;
        let status = d
            .decompress(
                &input[before_in..],
                &mut out[before_out..],
                FlushDecompress::Finish,
            )
            .map_err(|e| format!("invalid deflate data ({e})"))?;
        let produced = d.total_out() as usize;
        if produced > grain {
            return Err(format!("inflates beyond its grain size of {grain} bytes"));
        }
        match status {
            Status::StreamEnd => {
                out.truncate(produced);
                return Ok(out);
            }
            _ => {
                if d.total_in() as usize == before_in && produced == before_out {
                    return Err("truncated compressed data".to_string());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), true);
        let mut out = Vec::with_capacity(data.len() + 1024);
        c.compress_vec(data, &mut out, FlushCompress::Finish)
            .unwrap();
        out
    }

    #[test]
    fn inflate_limits() {
        let data = vec![7u8; 65536];
        let z = deflate(&data);
        assert_eq!(inflate_grain(&z, 65536).unwrap(), data);
        assert!(inflate_grain(&z, 4096).unwrap_err().contains("beyond"));
        assert!(inflate_grain(&z[..z.len() / 2], 65536).is_err());
        assert!(inflate_grain(b"garbage!", 65536).is_err());
    }
}
