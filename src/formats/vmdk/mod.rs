//! The vmdk format (VMware virtual disk).
//!
//! Supported for reading: monolithicSparse, monolithicFlat, twoGbMaxExtentSparse,
//! twoGbMaxExtentFlat, streamOptimized (VMware's layout with the directory at the end, and
//! QEMU's layout), vmfs, vmfsSparse, and text descriptors listing FLAT, SPARSE, ZERO, VMFS and
//! VMFSSPARSE extents (paths relative to the descriptor's directory), with delta chains
//! through `parentFileNameHint`.
//!
//! Writing: flat extents in place, hosted sparse extents by allocating grains (grain tables
//! are preallocated by `create` as QEMU does; both directories are kept in step), and
//! streamOptimized images created by [`create`] as an append-only stream: writes must come in
//! increasing offset order and [`BlockDriver::close`] writes the final tables and footer.
//! The same stream can go to a sequential sink (standard output, `convert ... -`) through
//! [`create_on_sink`]: the bytes are those of a file named [`SINK_EXTENT_NAME`] but for
//! the random CID. Grains are deflated at level 9 (see `stream.rs`).
//!
//! Files and sources of truth:
//! - `header.rs`: on-disk headers and markers;
//! - `descriptor.rs`: the text descriptor;
//! - `sparse.rs`: grain directory/table lookups, allocation, compressed grains;
//! - `stream.rs`: the stream-optimized writer;
//! - `create.rs`: `-o` options and image creation.
//!
//! Differences from QEMU, on purpose:
//! - `ZERO` extents and `RDONLY` extent lines are understood (QEMU skips such lines).
//! - Extent files that are not regular files (devices, FIFOs, sockets) are refused unless
//!   the environment variable `DISKIT_ALLOW_DEVICES=1` is set: a descriptor from an
//!   untrusted source could otherwise read the host's disks (`formats::check_named_file`).
//! - A text descriptor larger than 1 MiB is refused (QEMU silently reads the first MiB).
//! - A parent whose CID does not match `parentCID` gives a warning, not a read error.
//! - A missing CID/parentCID reads as ffffffff instead of failing the open.
//! - `map` returns `Data { host_offset }` for grains and flat extents in other extent
//!   files too; the offset is then in that extent's file, not in the descriptor.
//!
//! `check` does what QEMU's does, to print the same: it walks every grain in guest order
//! and stops at the first grain (or flat extent start) at or past the end of its file,
//! printing `ERROR: cluster offset for sector N points after EOF` and failing with
//! "Check failed: Invalid argument"; `-r` is unsupported. For that walk the image is opened
//! leniently, like QEMU reads it: grain directories and tables past the end of the file
//! read as zero (empty), the redundant directory is ignored, and nothing is written.
//! Grains referenced twice are not reported (QEMU does not look for them either).

mod create;
mod descriptor;
mod header;
mod sparse;
mod stream;

use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::formats::{
    self, BlockDriver, CheckReport, Format, ImageInfo, Mapping, OpenCtx, RepairMode,
};
use crate::io::{is_zero, HostFile};
use crate::qjson::{Json, Obj};

pub use create::{create, create_on_sink, create_summary, CREATE_OPTS, SINK_EXTENT_NAME};
use descriptor::{Access, Descriptor, MAX_DESC_SIZE};
use header::*;
use sparse::{Grain, SparseExtent};
use stream::StreamWriter;

/// Does this header (the first 2 KiB of the file, zero-padded) look like vmdk?
pub fn probe(header: &[u8]) -> bool {
    if header.len() >= 4 && (&header[..4] == MAGIC_KDMV || &header[..4] == MAGIC_COWD) {
        return true;
    }
    descriptor::probe_text(header)
}

/// Opens a vmdk image.
pub fn open(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    Ok(Box::new(VmdkDriver::open(file, filename, ctx)?))
}

#[derive(Debug)]
enum ExtentKind {
    Flat { file: Arc<HostFile>, offset: u64 },
    Zero,
    Sparse(Box<SparseExtent>),
}

#[derive(Debug)]
struct Extent {
    start: u64,
    len: u64,
    kind: ExtentKind,
    /// The type word of the descriptor ("" for the extent of a monolithic sparse file).
    type_name: String,
    /// Index into `files`, none for ZERO.
    file_idx: Option<usize>,
    read_only: bool,
}

impl Extent {
    fn is_flat(&self) -> bool {
        !matches!(self.kind, ExtentKind::Sparse(_))
    }
    fn compressed(&self) -> bool {
        matches!(&self.kind, ExtentKind::Sparse(s) if s.compressed)
    }
    fn grain(&self) -> Option<u64> {
        match &self.kind {
            ExtentKind::Sparse(s) => Some(s.grain),
            _ => None,
        }
    }
}

/// Where the descriptor lives, for rewriting the CID.
#[derive(Debug)]
enum DescLoc {
    /// Embedded in the sparse file at this byte offset, with this much room.
    Embedded(u64, u64),
    /// The whole main file.
    File,
    /// No descriptor (a bare COWD file).
    None,
}

/// An open vmdk image.
pub struct VmdkDriver {
    filename: String,
    main: Arc<HostFile>,
    /// Display name and file of every distinct file; index 0 is the main file.
    files: Vec<(String, Arc<HostFile>)>,
    extents: Vec<Extent>,
    size: u64,
    create_type: String,
    cid: AtomicU32,
    parent_cid: u32,
    parent_hint: Option<String>,
    desc_text: Mutex<String>,
    desc_loc: DescLoc,
    cid_updated: AtomicBool,
    backing: Option<Box<dyn BlockDriver>>,
    writable: bool,
    stream: Option<Mutex<StreamWriter>>,
}

const TEXT_TYPES: &[&str] = &[
    "monolithicFlat",
    "vmfs",
    "vmfsSparse",
    "seSparse",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
];

struct FileSet<'a> {
    files: Vec<(String, Arc<HostFile>)>,
    by_path: HashMap<PathBuf, usize>,
    ctx: &'a OpenCtx,
}

impl FileSet<'_> {
    fn open(&mut self, path: &str) -> Result<usize> {
        std::fs::metadata(path).map_err(|e| Error::io(e, format!("Could not open '{path}'")))?;
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| PathBuf::from(path));
        if let Some(&i) = self.by_path.get(&canon) {
            return Ok(i);
        }
        formats::check_named_file(path, formats::NamedBy::Extent)?;
        let f = HostFile::open(path, &self.ctx.opts.host())?;
        self.files.push((path.to_string(), Arc::new(f)));
        self.by_path.insert(canon, self.files.len() - 1);
        Ok(self.files.len() - 1)
    }
}

fn read_head(file: &HostFile) -> Result<[u8; 512]> {
    let mut head = [0u8; 512];
    file.read_at(&mut head, 0)?;
    Ok(head)
}

impl VmdkDriver {
    fn open(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<VmdkDriver> {
        // `check` never writes a vmdk (QEMU has no repair for it) and reads its tables
        // leniently, as QEMU does.
        let lenient = ctx.opts.check;
        let writable = ctx.opts.write && !lenient;
        let len = file.len()?;
        if len < 4 {
            return Err(Error::invalid_image("File is too small, not a valid image"));
        }
        let main = Arc::new(file);
        let head = read_head(&main)?;
        let mut set = FileSet {
            files: vec![(filename.to_string(), main.clone())],
            by_path: HashMap::new(),
            ctx,
        };
        if let Ok(c) = std::fs::canonicalize(filename) {
            set.by_path.insert(c, 0);
        }
        let mut extents = Vec::new();
        let desc;
        let desc_loc;
        let create_type;
        let is_kdmv = &head[..4] == MAGIC_KDMV;
        let desc_only = is_kdmv && {
            let h = SparseHeader::parse(&head);
            h.capacity == 0 && h.desc_offset != 0
        };
        if (is_kdmv && !desc_only) || &head[..4] == MAGIC_COWD {
            if len < SECTOR {
                return Err(Error::invalid_image(format!(
                    "header is truncated (the file has only {len} bytes)"
                )));
            }
            let ext = if is_kdmv {
                SparseExtent::open_vmdk4(main.clone(), filename, &head, writable, lenient)
            } else {
                SparseExtent::open_cowd(main.clone(), filename, &head, writable, lenient)
            };
            // The caller names the file already ("Could not open 'x': ...").
            let prefix = format!("{filename}: ");
            let ext = ext.map_err(|e| match e.message().strip_prefix(&prefix) {
                Some(rest) => {
                    let rest = rest.to_string();
                    e.with_message(rest)
                }
                None => e,
            })?;
            create_type = if ext.cowd {
                "vmfsSparse"
            } else if ext.compressed {
                "streamOptimized"
            } else {
                "monolithicSparse"
            }
            .to_string();
            let (doff, dsize) = match &ext.header {
                Some(h) => (h.desc_offset, h.desc_size),
                None => (0, 0),
            };
            if doff != 0 && dsize != 0 {
                let off = doff.saturating_mul(SECTOR);
                let room = dsize.saturating_mul(SECTOR).min(MAX_DESC_SIZE);
                let mut buf = vec![0u8; room as usize];
                main.read_at(&mut buf, off)?;
                desc = Descriptor::parse(&buf)?;
                desc_loc = DescLoc::Embedded(off, room);
            } else {
                desc = Descriptor::default();
                desc_loc = DescLoc::None;
            }
            extents.push(Extent {
                start: 0,
                len: ext.capacity,
                kind: ExtentKind::Sparse(Box::new(ext)),
                type_name: String::new(),
                file_idx: Some(0),
                read_only: false,
            });
        } else {
            let (off, max) = if desc_only {
                let h = SparseHeader::parse(&head);
                (
                    h.desc_offset.saturating_mul(SECTOR),
                    h.desc_size.saturating_mul(SECTOR),
                )
            } else {
                // a descriptor file is read up to 1 MiB, as QEMU reads it (a larger file is
                // then not a descriptor: createType is missing from what was read)
                (0, len.min(MAX_DESC_SIZE - 1))
            };
            if max > MAX_DESC_SIZE {
                return Err(Error::invalid_image(format!(
                    "descriptor is too large ({max} bytes; at most {MAX_DESC_SIZE} are accepted)"
                )));
            }
            let mut buf = vec![0u8; max as usize];
            main.read_at(&mut buf, off)?;
            desc = Descriptor::parse(&buf)?;
            desc_loc = if desc_only {
                DescLoc::Embedded(off, max)
            } else {
                DescLoc::File
            };
            let ct = desc
                .create_type
                .clone()
                .ok_or_else(|| Error::invalid_image("invalid VMDK image descriptor"))?;
            if !TEXT_TYPES.contains(&ct.as_str()) {
                return Err(Error::unsupported(format!("Unsupported image type '{ct}'")));
            }
            create_type = ct;
            let mut start = 0u64;
            for line in &desc.extents {
                let ext = Self::open_extent(&mut set, filename, line, writable, start)?;
                start = start
                    .checked_add(ext.len)
                    .filter(|s| *s <= i64::MAX as u64)
                    .ok_or_else(|| Error::invalid_image("the extents add up to an absurd size"))?;
                extents.push(ext);
            }
            if extents.is_empty() {
                let read = if !desc_only && len > max {
                    format!(" (in its first {max} bytes, all that is read of a descriptor)")
                } else {
                    String::new()
                };
                return Err(Error::invalid_image(format!(
                    "the descriptor lists no extents{read}"
                )));
            }
        }
        let size = extents.last().map(|e| e.start + e.len).unwrap_or(0);
        let cid = desc.cid.unwrap_or(0xffff_ffff);
        let parent_cid = desc.parent_cid.unwrap_or(0xffff_ffff);
        let parent_hint = desc.parent_hint.clone().filter(|p| !p.is_empty());
        let backing = match &parent_hint {
            Some(hint) if !ctx.opts.no_backing => {
                let b = formats::open_backing(filename, hint, Some("vmdk"), ctx)?;
                if let Some(v) = b.as_any().downcast_ref::<VmdkDriver>() {
                    if v.cid() != parent_cid {
                        crate::warn::emit(&format!(
                            "warning: {filename}: parent CID {parent_cid:08x} does not match the CID {:08x} of '{}'; the parent may have changed since this image was made",
                            v.cid(),
                            b.filename()
                        ));
                    }
                }
                Some(b)
            }
            _ => None,
        };
        let mut stream = None;
        if writable && extents.len() == 1 {
            if let ExtentKind::Sparse(s) = &extents[0].kind {
                if s.compressed {
                    let empty = s.lock().gd.iter().all(|&e| e == 0);
                    if let (Some(h), true) = (s.header, s.gd_at_end && s.markers && empty) {
                        let gd_len = s.lock().gd.len();
                        stream = Some(Mutex::new(StreamWriter::new(
                            stream::StreamOut::File(main.clone()),
                            filename,
                            h,
                            gd_len,
                            parent_hint.is_some(),
                        )));
                    }
                }
            }
        }
        Ok(VmdkDriver {
            filename: filename.to_string(),
            main,
            files: set.files,
            extents,
            size,
            create_type,
            cid: AtomicU32::new(cid),
            parent_cid,
            parent_hint,
            desc_text: Mutex::new(desc.text),
            desc_loc,
            cid_updated: AtomicBool::new(false),
            backing,
            writable,
            stream,
        })
    }

    fn open_extent(
        set: &mut FileSet,
        desc_name: &str,
        line: &descriptor::ExtentLine,
        writable: bool,
        start: u64,
    ) -> Result<Extent> {
        if line.access == Access::NoAccess {
            return Err(Error::unsupported(format!(
                "NOACCESS extents are not supported ({} sectors of type {})",
                line.sectors, line.kind
            )));
        }
        let read_only = line.access == Access::RdOnly;
        let mk = |kind: ExtentKind, len: u64, file_idx: Option<usize>| Extent {
            start,
            len,
            kind,
            type_name: line.kind.clone(),
            file_idx,
            read_only,
        };
        let open_file = |set: &mut FileSet| -> Result<usize> {
            let fname = line.file.as_deref().unwrap_or("");
            let path = formats::resolve_backing_name(desc_name, fname);
            set.open(&path)
        };
        match line.kind.as_str() {
            "ZERO" => Ok(mk(ExtentKind::Zero, line.sectors * SECTOR, None)),
            "FLAT" | "VMFS" => {
                let i = open_file(set)?;
                let file = set.files[i].1.clone();
                Ok(mk(
                    ExtentKind::Flat {
                        file,
                        offset: line.offset * SECTOR,
                    },
                    line.sectors * SECTOR,
                    Some(i),
                ))
            }
            "SPARSE" | "VMFSSPARSE" => {
                let i = open_file(set)?;
                let (name, file) = set.files[i].clone();
                let lenient = set.ctx.opts.check;
                let head = read_head(&file)?;
                let ext = if &head[..4] == MAGIC_KDMV {
                    let h = SparseHeader::parse(&head);
                    if h.capacity == 0 && h.desc_offset != 0 {
                        return Err(Error::unsupported(format!(
                            "{name}: a sparse extent holding another descriptor is not supported"
                        )));
                    }
                    SparseExtent::open_vmdk4(file, &name, &head, writable && !read_only, lenient)?
                } else if &head[..4] == MAGIC_COWD {
                    SparseExtent::open_cowd(file, &name, &head, writable && !read_only, lenient)?
                } else {
                    return Err(Error::invalid_image(format!(
                        "{name}: Image not in VMDK format"
                    )));
                };
                let len = ext.capacity;
                Ok(mk(ExtentKind::Sparse(Box::new(ext)), len, Some(i)))
            }
            "SESPARSE" => Err(Error::unsupported("SESPARSE extents are not supported")),
            other => Err(Error::unsupported(format!(
                "Unsupported extent type '{other}'"
            ))),
        }
    }

    /// The content ID of this image.
    pub fn cid(&self) -> u32 {
        self.cid.load(Ordering::Relaxed)
    }

    /// The parent content ID recorded in this image.
    pub fn parent_cid(&self) -> u32 {
        self.parent_cid
    }

    /// The createType of the image.
    pub fn create_type(&self) -> &str {
        &self.create_type
    }

    fn find(&self, offset: u64) -> Result<&Extent> {
        let i = self.extents.partition_point(|e| e.start + e.len <= offset);
        self.extents.get(i).ok_or_else(|| {
            Error::out_of_bounds(format!(
                "{}: offset {offset:#x} is beyond the end of the image ({} bytes)",
                self.filename, self.size
            ))
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::out_of_bounds(format!(
                "{}: access at offset {offset} length {len} is beyond the end of the image ({} bytes)",
                self.filename, self.size
            ))),
        }
    }

    fn stream_busy(&self) -> Result<()> {
        if let Some(s) = &self.stream {
            if s.lock().unwrap_or_else(|p| p.into_inner()).started() {
                return Err(Error::unsupported(format!(
                    "{}: a streamOptimized image cannot be read while it is being written",
                    self.filename
                )));
            }
        }
        Ok(())
    }

    /// One piece of the guest range: its mapping and length (within one extent and grain).
    fn map_piece(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64, &Extent)> {
        let ext = self.find(offset)?;
        let rel = offset - ext.start;
        let left = (ext.len - rel).min(max_len);
        match &ext.kind {
            ExtentKind::Zero => Ok((Mapping::Zero { explicit: true }, left, ext)),
            ExtentKind::Flat { file, offset: base } => {
                let host = base + rel;
                let m = match file.seek_data(host)? {
                    Some(d) if d <= host => {
                        let hole = file.seek_hole(host)?.max(host + 1);
                        (Mapping::Data { host_offset: host }, (hole - host).min(left))
                    }
                    Some(d) => (Mapping::Zero { explicit: false }, (d - host).min(left)),
                    None => (Mapping::Zero { explicit: false }, left),
                };
                Ok((m.0, m.1, ext))
            }
            ExtentKind::Sparse(s) => {
                let (g, run) = {
                    let mut st = s.lock();
                    s.lookup(&mut st, rel)?
                };
                let n = run.min(left);
                let m = match g {
                    Grain::Unallocated => Mapping::Unallocated,
                    Grain::Zeroed => Mapping::Zero { explicit: true },
                    Grain::Data(off) => Mapping::Data {
                        host_offset: off + rel % s.grain,
                    },
                    Grain::Compressed(_) => Mapping::Compressed,
                };
                Ok((m, n, ext))
            }
        }
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) => {
                let bsize = b.virtual_size();
                let n = if offset >= bsize {
                    0
                } else {
                    ((bsize - offset).min(buf.len() as u64)) as usize
                };
                if n > 0 {
                    b.read_at(&mut buf[..n], offset)?;
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

    fn update_cid(&self) -> Result<()> {
        if self.cid_updated.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let new = create::random_u32();
        let mut text = self.desc_text.lock().unwrap_or_else(|p| p.into_inner());
        let updated = descriptor::replace_cid(&text, new);
        match self.desc_loc {
            DescLoc::Embedded(off, room) => {
                if updated.len() as u64 > room {
                    return Ok(());
                }
                let mut b = updated.clone().into_bytes();
                b.resize(room as usize, 0);
                self.main.write_at(&b, off)?;
            }
            DescLoc::File => {
                self.main.write_at(updated.as_bytes(), 0)?;
                self.main.set_len(updated.len() as u64)?;
            }
            DescLoc::None => return Ok(()),
        }
        *text = updated;
        self.cid.store(new, Ordering::Relaxed);
        Ok(())
    }

    fn ensure_writable(&self, ext: &Extent) -> Result<()> {
        if !self.writable {
            return Err(Error::unsupported(format!(
                "{}: image is read-only",
                self.filename
            )));
        }
        if ext.read_only {
            return Err(Error::unsupported(format!(
                "{}: the extent at offset {:#x} is read-only",
                self.filename, ext.start
            )));
        }
        Ok(())
    }

    /// Writes `len` bytes (`None`: zeroes) at `offset`; `zero_grains` allows zeroed-grain
    /// entries for whole grains.
    fn write_impl(
        &self,
        data: Option<&[u8]>,
        offset: u64,
        len: u64,
        zero_grains: bool,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        if let Some(s) = &self.stream {
            if !self.writable {
                return Err(Error::unsupported(format!(
                    "{}: image is read-only",
                    self.filename
                )));
            }
            return s
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write(data, offset, len);
        }
        let mut done = 0u64;
        while done < len {
            let off = offset + done;
            let ext = self.find(off)?;
            self.ensure_writable(ext)?;
            let rel = off - ext.start;
            let n_ext = (ext.len - rel).min(len - done);
            let piece = data.map(|d| &d[done as usize..]);
            match &ext.kind {
                ExtentKind::Zero => {
                    if piece.is_some_and(|p| !is_zero(&p[..n_ext as usize])) {
                        return Err(Error::unsupported(format!(
                            "{}: cannot write data into a ZERO extent",
                            self.filename
                        )));
                    }
                    done += n_ext;
                }
                ExtentKind::Flat { file, offset: base } => {
                    self.update_cid()?;
                    match piece {
                        Some(p) => file.write_at(&p[..n_ext as usize], base + rel)?,
                        None => file.write_zeroes(base + rel, n_ext)?,
                    }
                    done += n_ext;
                }
                ExtentKind::Sparse(s) => {
                    let in_grain = rel % s.grain;
                    let n = (s.grain - in_grain).min(n_ext);
                    self.write_grain(s, ext, rel, piece.map(|p| &p[..n as usize]), n, zero_grains)?;
                    done += n;
                }
            }
        }
        Ok(())
    }

    fn write_grain(
        &self,
        s: &SparseExtent,
        ext: &Extent,
        rel: u64,
        data: Option<&[u8]>,
        n: u64,
        zero_grains: bool,
    ) -> Result<()> {
        if s.compressed || s.cowd {
            return Err(Error::unsupported(format!(
                "{}: writing to this {} extent is not supported",
                s.name,
                if s.cowd { "ESX sparse" } else { "compressed" }
            )));
        }
        let in_grain = rel % s.grain;
        let mut st = s.lock();
        let (g, _) = s.lookup(&mut st, rel)?;
        if data.is_none() {
            let whole = in_grain == 0 && n == s.grain;
            if s.zero_grain && whole && zero_grains {
                if g != Grain::Zeroed {
                    self.update_cid()?;
                    s.set_gte(&mut st, rel, GTE_ZEROED)?;
                }
                return Ok(());
            }
            match g {
                Grain::Zeroed => return Ok(()),
                Grain::Unallocated if self.backing.is_none() => return Ok(()),
                _ => {}
            }
        }
        self.update_cid()?;
        if let Grain::Data(off) = g {
            match data {
                Some(d) => s.file.write_at(d, off + in_grain)?,
                None => s.file.write_at(&vec![0u8; n as usize], off + in_grain)?,
            }
            return Ok(());
        }
        // Allocate: the whole grain, with what the parent (or zero) holds around the write.
        let grain_start = rel - in_grain;
        let mut buf = vec![0u8; s.grain as usize];
        if g == Grain::Unallocated && self.backing.is_some() && !(in_grain == 0 && n == s.grain) {
            let abs = ext.start + grain_start;
            let valid = (ext.len - grain_start).min(s.grain) as usize;
            self.read_backing(&mut buf[..valid], abs)?;
        }
        match data {
            Some(d) => buf[in_grain as usize..(in_grain + n) as usize].copy_from_slice(d),
            None => buf[in_grain as usize..(in_grain + n) as usize].fill(0),
        }
        let off = s.append_grain(&mut st, &buf)?;
        s.set_gte(&mut st, rel, (off / SECTOR) as u32)
    }

    /// Walks the image as `qemu-img check` does: every grain of every sparse extent and the
    /// start of every flat extent, in guest order, stopping at the first problem: a grain (or
    /// flat extent start) at or past the end of its file, or a lookup that fails. Returns
    /// the line qemu prints and the errno text of its "Check failed" line.
    fn check_walk(&self) -> std::result::Result<(), (String, &'static str)> {
        let total = self.size / SECTOR;
        let mut sector = 0u64;
        while sector < total {
            let Ok(ext) = self.find(sector * SECTOR) else {
                return Err((
                    format!("ERROR: could not find extent for sector {sector}"),
                    "Invalid argument",
                ));
            };
            let ext_end = (ext.start + ext.len) / SECTOR;
            let after_eof = |sector: u64| {
                (
                    format!("ERROR: cluster offset for sector {sector} points after EOF"),
                    "Invalid argument",
                )
            };
            let no_len = |sector: u64| {
                (
                    format!("ERROR: could not get extent file length for sector {sector}"),
                    "Input/output error",
                )
            };
            match &ext.kind {
                // QEMU has no ZERO extents (it drops such lines); nothing to check.
                ExtentKind::Zero => sector = ext_end.max(sector + 1),
                ExtentKind::Flat { file, offset } => {
                    let len = file.len().map_err(|_| no_len(sector))?;
                    if *offset >= len {
                        return Err(after_eof(sector));
                    }
                    // QEMU steps over a flat extent in one "cluster" of its whole size.
                    sector += (ext.len / SECTOR).max(1);
                }
                ExtentKind::Sparse(s) => {
                    let gs = (s.grain / SECTOR).max(1);
                    let flen = s.file.len().map_err(|_| no_len(sector))?;
                    let gt_span = s.gtes as u64 * s.grain;
                    let mut st = s.lock();
                    while sector < total && sector < ext_end {
                        let rel = sector * SECTOR - ext.start;
                        match s.raw_entry(&mut st, rel) {
                            Err(_) => {
                                return Err((
                                    format!(
                                        "ERROR: could not get cluster_offset for sector {sector}"
                                    ),
                                    "Operation not permitted",
                                ))
                            }
                            Ok(None) => {
                                // No grain table: every grain up to its end is unallocated.
                                let gt_end = (rel / gt_span + 1) * gt_span;
                                sector += (gt_end - rel).div_ceil(s.grain) * gs;
                                continue;
                            }
                            Ok(Some(e)) => {
                                let zeroed = s.zero_grain && e == GTE_ZEROED;
                                if e != 0 && !zeroed && e as u64 * SECTOR >= flen {
                                    return Err(after_eof(sector));
                                }
                            }
                        }
                        sector += gs;
                    }
                }
            }
        }
        Ok(())
    }

    fn extent_info(&self, e: &Extent) -> Json {
        let name = match e.file_idx {
            Some(i) => self.files[i].0.clone(),
            None => String::new(),
        };
        Obj::new()
            .with("filename", name)
            .with("format", e.type_name.as_str())
            .with("virtual-size", e.len)
            .with_opt("cluster-size", e.grain())
            .with_opt("compressed", e.compressed().then_some(true))
            .into()
    }

    fn file_node(file: &HostFile, name: &str) -> Result<ImageInfo> {
        let mut n = ImageInfo::file_node(file)?;
        n.filename = name.to_string();
        n.virtual_size = n.virtual_size.div_ceil(SECTOR) * SECTOR;
        Ok(n)
    }
}

/// The descriptor text with the first extent line's size and the geometry updated for
/// `size` bytes.
fn resized_descriptor(text: &str, size: u64) -> String {
    let heads = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == "ddb.geometry.heads")
                .then(|| v.trim().trim_matches('"').parse::<u64>().ok())?
        })
        .filter(|h| *h > 0)
        .unwrap_or(16);
    let mut out = String::with_capacity(text.len() + 16);
    let mut extent_done = false;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if !extent_done && (t.starts_with("RW ") || t.starts_with("RDONLY ")) {
            let mut parts = t.splitn(3, ' ');
            let (a, _, rest) = (parts.next(), parts.next(), parts.next());
            out.push_str(&format!(
                "{} {} {}",
                a.unwrap_or("RW"),
                size / SECTOR,
                rest.unwrap_or("\n")
            ));
            extent_done = true;
        } else if t.starts_with("ddb.geometry.cylinders") {
            out.push_str(&format!(
                "ddb.geometry.cylinders = \"{}\"\n",
                size / (63 * heads * SECTOR)
            ));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Grows a monolithicSparse or monolithicFlat image to `new_size` bytes (rounded up to a
/// sector). Shrinking and other subformats are refused. QEMU has no vmdk resize; images
/// grown here read back in qemu-img with the new size.
pub fn resize(filename: &str, new_size: u64) -> Result<()> {
    let size = new_size
        .checked_add(SECTOR - 1)
        .map(|s| s / SECTOR * SECTOR)
        .ok_or_else(|| Error::invalid_arg("Image size is too large"))?;
    let mut o = formats::OpenOptions::read_write().with_format(Some(Format::Vmdk));
    o.no_backing = true;
    let img = formats::open(filename, &o)?;
    let v = img
        .as_any()
        .downcast_ref::<VmdkDriver>()
        .ok_or_else(|| Error::unsupported("not a vmdk image"))?;
    if size < v.size {
        return Err(Error::unsupported(format!(
            "{filename}: shrinking a vmdk image is not supported"
        )));
    }
    if size == v.size {
        return Ok(());
    }
    let text = v
        .desc_text
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let new_text = resized_descriptor(&text, size);
    match (v.create_type.as_str(), &v.extents[..], &v.desc_loc) {
        ("monolithicFlat", [e], DescLoc::File) if matches!(e.kind, ExtentKind::Flat { .. }) => {
            let ExtentKind::Flat { file, offset } = &e.kind else {
                unreachable!()
            };
            if file.len()? < offset + size {
                file.set_len(offset + size)?;
            }
            v.main.write_at(new_text.as_bytes(), 0)?;
            v.main.set_len(new_text.len() as u64)?;
        }
        ("monolithicSparse", [e], DescLoc::Embedded(off, room)) => {
            let ExtentKind::Sparse(s) = &e.kind else {
                return Err(Error::unsupported("unexpected extent kind"));
            };
            let Some(mut h) = s.header else {
                return Err(Error::unsupported("unexpected extent kind"));
            };
            if new_text.len() as u64 > *room {
                return Err(Error::unsupported(format!(
                    "{filename}: descriptor would not fit"
                )));
            }
            let (gd, rgd) = s.grow(size)?;
            h.capacity = size / SECTOR;
            h.gd_offset = gd / SECTOR;
            if let Some(r) = rgd {
                h.rgd_offset = r / SECTOR;
            }
            v.main.write_at(&h.to_bytes(), 0)?;
            let mut b = new_text.into_bytes();
            b.resize(*room as usize, 0);
            v.main.write_at(&b, *off)?;
        }
        (ct, _, _) => {
            return Err(Error::unsupported(format!(
                "{filename}: resizing vmdk images of type {ct} is not supported"
            )))
        }
    }
    img.flush()
}

impl BlockDriver for VmdkDriver {
    fn format(&self) -> Format {
        Format::Vmdk
    }
    fn filename(&self) -> &str {
        &self.filename
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        let first = self.extents.first()?;
        let same = self.extents.iter().all(|e| {
            e.is_flat() == first.is_flat()
                && e.compressed() == first.compressed()
                && (e.is_flat() || e.grain() == first.grain())
        });
        if same {
            first.grain()
        } else {
            None
        }
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.check_range(offset, 0)?;
        self.stream_busy()?;
        let max_len = max_len.min(self.size - offset);
        if max_len == 0 {
            return Ok((Mapping::Zero { explicit: false }, 0));
        }
        let (m, mut n, _) = self.map_piece(offset, max_len)?;
        // Extend over following pieces of the same kind (contiguous for data).
        let mut pieces = 0;
        while n < max_len && pieces < 4096 {
            let (m2, n2, _) = self.map_piece(offset + n, max_len - n)?;
            let same = match (m, m2) {
                (Mapping::Data { host_offset: a }, Mapping::Data { host_offset: b }) => {
                    a + n == b && std::ptr::eq(self.find(offset)?, self.find(offset + n)?)
                }
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            n += n2;
            pieces += 1;
        }
        Ok((m, n))
    }

    fn map_reported(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.check_range(offset, 0)?;
        let ext = self.find(offset)?;
        let rel = offset - ext.start;
        let left = (ext.len - rel).min(max_len);
        match &ext.kind {
            ExtentKind::Flat { offset: base, .. } if left > 0 => Ok((
                Mapping::Data {
                    host_offset: base + rel,
                },
                left,
            )),
            _ => self.map(offset, left),
        }
    }

    fn host_zero_status(
        &self,
        offset: u64,
        host_offset: u64,
        len: u64,
    ) -> Result<Option<(bool, u64)>> {
        match &self.find(offset)?.kind {
            ExtentKind::Flat { file, .. } => Ok(Some(file.hole_status(host_offset, len)?)),
            _ => Ok(None),
        }
    }

    fn data_filename(&self, offset: u64) -> Option<&str> {
        let i = self.find(offset).ok()?.file_idx?;
        Some(self.files[i].0.as_str())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.stream_busy()?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let ext = self.find(off)?;
            if let ExtentKind::Flat { file, offset: base } = &ext.kind {
                // Flat extents need no mapping (holes read as zero anyway).
                let rel = off - ext.start;
                let n = ((ext.len - rel) as usize).min(buf.len() - done);
                file.read_at(&mut buf[done..done + n], base + rel)?;
                done += n;
                continue;
            }
            let (m, n, ext) = self.map_piece(off, (buf.len() - done) as u64)?;
            let n = n as usize;
            let dst = &mut buf[done..done + n];
            match (m, &ext.kind) {
                (Mapping::Data { host_offset }, ExtentKind::Flat { file, .. }) => {
                    file.read_at(dst, host_offset)?
                }
                (Mapping::Data { host_offset }, ExtentKind::Sparse(s)) => {
                    s.file.read_at(dst, host_offset)?
                }
                (Mapping::Compressed, ExtentKind::Sparse(s)) => {
                    let rel = off - ext.start;
                    let gstart = rel - rel % s.grain;
                    let g = {
                        let mut st = s.lock();
                        s.lookup(&mut st, rel)?.0
                    };
                    let Grain::Compressed(at) = g else {
                        return Err(Error::corrupt(format!(
                            "{}: grain changed while reading",
                            s.name
                        )));
                    };
                    let data = s.read_compressed(at, gstart)?;
                    let from = (rel - gstart) as usize;
                    dst.copy_from_slice(&data[from..from + n]);
                }
                (Mapping::Unallocated, _) => self.read_backing(dst, off)?,
                _ => dst.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_impl(Some(buf), offset, buf.len() as u64, false)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<()> {
        self.write_impl(None, offset, len, true)
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_at(buf, offset)
    }

    fn compresses_writes(&self) -> bool {
        self.stream.is_some()
    }

    fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<crate::formats::Prepared> {
        if self.stream.is_none() {
            return Ok(crate::formats::Prepared::Unsupported);
        }
        self.check_range(offset, buf.len() as u64)?;
        let grain = self.cluster_size().unwrap_or(buf.len() as u64) as usize;
        let valid = buf.len().min(grain);
        stream::encode_grain(&self.filename, offset, &buf[..valid])
            .map(crate::formats::Prepared::Data)
    }

    fn write_compressed_data(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, 1)?;
        match &self.stream {
            Some(s) if self.writable => s
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_encoded(data, offset),
            _ => Err(Error::unsupported(format!(
                "{}: image is read-only or not streamOptimized",
                self.filename
            ))),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // vmdk has no way to give space back; the contents stay as they are.
        self.check_range(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if self.writable {
            for (_, f) in &self.files {
                f.sync()?;
            }
        }
        Ok(())
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(&self.filename, Format::Vmdk, self.size);
        let mut actual = self.main.allocated_size()?;
        for (_, f) in self.files.iter().skip(1) {
            actual += f.allocated_size()?;
        }
        info.actual_size = Some(actual);
        info.cluster_size = self.cluster_size();
        if let Some(hint) = &self.parent_hint {
            info.backing_filename = Some(hint.clone());
            info.full_backing_filename = Some(formats::resolve_backing_name(&self.filename, hint));
            info.backing_filename_format = Some("vmdk".to_string());
        }
        let extents: Vec<Json> = self.extents.iter().map(|e| self.extent_info(e)).collect();
        info.format_specific = Some((
            "vmdk".to_string(),
            Obj::new()
                .with("create-type", self.create_type.as_str())
                .with("cid", self.cid())
                .with("parent-cid", self.parent_cid)
                .with("extents", extents),
        ));
        let mut children = vec![(
            "file".to_string(),
            Self::file_node(&self.main, &self.filename)?,
        )];
        for (i, e) in self.extents.iter().enumerate() {
            if let Some(fi) = e.file_idx.filter(|&fi| fi != 0) {
                let (name, f) = &self.files[fi];
                children.push((format!("extents.{i}"), Self::file_node(f, name)?));
            }
        }
        children.reverse();
        info.children = children;
        Ok(info)
    }

    /// `qemu-img check` for vmdk: QEMU has no repair (`-r` answers Unsupported) and reports
    /// the first grain found at or past the end of its file (see `check_walk`) as a failed
    /// check: the line is printed, and the error reads "Check failed: Invalid argument".
    /// Like QEMU, grain tables past the end of the file read as empty, and grains used
    /// twice are not looked for.
    fn check(&self, repair: Option<RepairMode>) -> Result<CheckReport> {
        if repair.is_some() {
            return Err(Error::unsupported(
                "This image format does not support checks",
            ));
        }
        match self.check_walk() {
            Ok(()) => Ok(CheckReport::default()),
            Err((line, errno)) => {
                crate::warn::emit(&line);
                Err(Error::corrupt(format!("Check failed: {errno}")))
            }
        }
    }

    fn close(&self) -> Result<()> {
        if let Some(s) = &self.stream {
            s.lock().unwrap_or_else(|p| p.into_inner()).finish()?;
        }
        self.flush()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl std::fmt::Debug for VmdkDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmdkDriver")
            .field("filename", &self.filename)
            .field("create_type", &self.create_type)
            .field("size", &self.size)
            .field("extents", &self.extents)
            .finish()
    }
}

impl Drop for VmdkDriver {
    fn drop(&mut self) {
        if let Some(s) = &self.stream {
            let mut w = s.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = w.finish() {
                crate::warn::emit(&format!(
                    "warning: {}: could not finish the stream: {e}",
                    self.filename
                ));
            }
        }
    }
}
