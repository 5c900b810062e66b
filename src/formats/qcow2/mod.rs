//! The qcow2 format (QEMU copy-on-write, versions 2 and 3).
//!
//! Layout of this driver:
//! - `header`: header, extensions, snapshot table, bitmap directory;
//! - `tables`: the metadata state (L1, L2 cache, refcounts, allocator, ordered flush);
//! - `write`: guest writes, zero writes, discards, compressed writes;
//! - `compress`: deflate/zstd cluster codecs;
//! - `create`: `qemu-img create` options and image creation.

pub mod amend;
pub mod bitmap;
mod chain;
mod check;
pub mod compress;
pub mod create;
pub mod header;
mod luks;
mod resize;
pub mod snapshot;
mod status;
mod tables;
mod write;

use std::any::Any;
use std::sync::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::formats::{BlockDriver, Format, ImageInfo, Mapping, OpenCtx, SnapshotInfo};
use crate::io::HostFile;
use crate::qjson::{Json, Obj};

pub use create::{create, create_summary, CREATE_OPTS};
use header::{BitmapInfo, Compression, Header, Snapshot};
use tables::Meta;

/// The magic number at offset 0: `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Does this header look like qcow2?
pub fn probe(header: &[u8]) -> bool {
    header.len() >= 8
        && header[..4] == MAGIC
        && u32::from_be_bytes([header[4], header[5], header[6], header[7]]) >= 2
}

pub(crate) const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
pub(crate) const OFLAG_ZERO: u64 = 1;
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// What one (sub)cluster of the guest is, as the L2 entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Data at this host offset (of the (sub)cluster start).
    Data(u64),
    /// Compressed cluster; the raw L2 word.
    Compressed(u64),
    /// Reads as zero (explicitly).
    Zero,
    /// Not allocated here.
    Unalloc,
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(crate) file: HostFile,
    pub(crate) data_file: Option<HostFile>,
    pub(crate) filename: String,
    pub(crate) hdr: Header,
    pub(crate) cluster_bits: u32,
    pub(crate) cs: u64,
    pub(crate) ext_l2: bool,
    /// Subcluster size (== cluster size without extended L2).
    pub(crate) sc: u64,
    pub(crate) l2_entries: u64,
    pub(crate) size: u64,
    pub(crate) backing: Option<Box<dyn BlockDriver>>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) bitmaps: Vec<BitmapInfo>,
    pub(crate) meta: Mutex<Meta>,
    /// The last decompressed cluster: (L2 word, data).
    ccache: Mutex<Option<(u64, Vec<u8>)>>,
    /// Does the image look metadata-preallocated (see `status.rs`)? Decided on first use.
    pub(crate) prealloc_meta: std::sync::OnceLock<bool>,
    pub(crate) writable: bool,
    pub(crate) has_data_file: bool,
    pub(crate) data_file_name: Option<String>,
    /// The external data file as opened (the name `map` prints).
    data_file_path: Option<String>,
    /// What `info` shows of the encryption (an image opened without I/O only).
    encrypt: Option<Obj>,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("filename", &self.filename)
            .finish()
    }
}

/// Opens a qcow2 image.
pub fn open(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    Ok(Box::new(Qcow2::open(file, filename, ctx)?))
}

impl Qcow2 {
    /// Opens a qcow2 image on an open host file.
    pub fn open(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<Qcow2> {
        Qcow2::open_impl(file, filename, ctx, false)
    }

    /// Opens an image being created, whose magic is not written yet.
    pub(crate) fn open_unstamped(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<Qcow2> {
        Qcow2::open_impl(file, filename, ctx, true)
    }

    fn open_impl(file: HostFile, filename: &str, ctx: &OpenCtx, unstamped: bool) -> Result<Qcow2> {
        let check_mode = ctx.opts.check;
        let hdr = if unstamped {
            Header::read_unstamped(&file)?
        } else {
            Header::read_mode(&file, check_mode)?
        };
        if hdr.crypt_method == header::CRYPT_LUKS && hdr.crypto_ext.is_none() {
            return Err(Error::invalid_image(
                "Missing CRYPTO header for crypt method 2",
            ));
        }
        if hdr.crypt_method != 0 && !ctx.opts.no_io {
            // diskit does not decrypt: it fails as qemu-img does when not given the key (a
            // `--object secret`); `info` (no I/O) still shows the image
            return Err(Error::invalid_arg(
                "Parameter 'encrypt.key-secret' is required for cipher",
            ));
        }
        let encrypt = match hdr.crypt_method {
            0 => None,
            header::CRYPT_AES => Some(Obj::new().with("format", "aes")),
            _ => match hdr.crypto_ext {
                Some(at) => Some(luks::info(&file, at)?),
                None => None,
            },
        };
        let writable = ctx.opts.write;
        if hdr.incompatible & header::INCOMPAT_CORRUPT != 0 && writable && !check_mode {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        let cs = hdr.cluster_size();
        let ext_l2 = hdr.extended_l2();
        let l2_entries = cs / if ext_l2 { 16 } else { 8 };
        let sc = if ext_l2 { cs / 32 } else { cs };
        // In check mode a broken snapshot table is for the check to report.
        let snapshots = match header::read_snapshots(&file, &hdr) {
            Err(_) if check_mode => Vec::new(),
            r => r?,
        };
        let bitmaps = match &hdr.bitmaps {
            Some(b) => header::read_bitmaps(&file, b)?.0,
            None => Vec::new(),
        };
        let has_data_file = hdr.incompatible & header::INCOMPAT_DATA_FILE != 0;
        let mut data_file = None;
        let mut data_file_path = None;
        if has_data_file {
            let name = hdr
                .data_file
                .clone()
                .ok_or_else(|| Error::invalid_image("'data-file' is required for this image"))?;
            let full = crate::formats::resolve_backing_name(filename, &name);
            crate::formats::check_named_file(&full, crate::formats::NamedBy::Backing)?;
            match HostFile::open(&full, &ctx.opts.host()) {
                Ok(f) => {
                    data_file = Some(f);
                    data_file_path = Some(full.clone());
                }
                Err(e) => {
                    if !ctx.opts.no_backing {
                        let why = e
                            .io_error()
                            .map(crate::error::os_error_text)
                            .unwrap_or_else(|| e.message().to_string());
                        return Err(e.with_message(format!("Could not open '{full}': {why}")));
                    }
                }
            }
        } else if hdr.data_file.is_some() {
            // qemu ignores the name without the feature bit
        }
        let meta = Meta::load(&file, &hdr)?;
        let mut backing = None;
        if let Some(b) = &hdr.backing_file {
            if !ctx.opts.no_backing && !b.is_empty() {
                backing = Some(crate::formats::open_backing(
                    filename,
                    b,
                    hdr.backing_format.as_deref(),
                    ctx,
                )?);
            }
        }
        let q = Qcow2 {
            cluster_bits: hdr.cluster_bits,
            cs,
            ext_l2,
            sc,
            l2_entries,
            size: hdr.size,
            data_file_name: if has_data_file {
                hdr.data_file.clone()
            } else {
                None
            },
            hdr,
            file,
            data_file,
            data_file_path,
            encrypt,
            filename: filename.to_string(),
            backing,
            snapshots,
            bitmaps,
            meta: Mutex::new(meta),
            ccache: Mutex::new(None),
            prealloc_meta: std::sync::OnceLock::new(),
            writable,
            has_data_file,
        };
        if writable && q.hdr.version >= 3 {
            // qemu clears the autoclear bits it does not know on every writable open
            let mut m = q.meta.lock().unwrap();
            if m.autoclear & !header::AUTOCLEAR_MASK != 0 {
                m.autoclear &= header::AUTOCLEAR_MASK;
                q.file.write_at(&m.autoclear.to_be_bytes(), 88)?;
                q.file.sync()?;
            }
        }
        if writable && !check_mode && q.hdr.incompatible & header::INCOMPAT_DIRTY != 0 {
            // qemu repairs a dirty (lazy refcounts) image before writing to it, and says
            // what it repairs as its check does
            let res = q.check_image(Some(crate::formats::RepairMode::All));
            if let Ok(r) = &res {
                r.findings
                    .iter()
                    .for_each(|f| crate::warn::emit(&f.message));
            }
            match res {
                Ok(r) if r.check_errors == 0 => {}
                Ok(_) => {
                    return Err(Error::corrupt(format!(
                        "{filename}: Could not repair dirty image: Input/output error"
                    )))
                }
                Err(e) => {
                    let msg = format!("{filename}: Could not repair dirty image: {}", e.message());
                    return Err(e.with_message(msg));
                }
            }
        }
        if writable && !check_mode {
            q.prepare_write()?;
        }
        Ok(q)
    }

    /// The image file.
    pub fn file(&self) -> &HostFile {
        &self.file
    }

    /// The parsed header (as read at open time).
    pub fn header(&self) -> &Header {
        &self.hdr
    }

    /// Internal snapshots.
    pub fn snapshot_table(&self) -> &[Snapshot] {
        &self.snapshots
    }

    /// Persistent bitmaps.
    pub fn bitmap_list(&self) -> &[BitmapInfo] {
        &self.bitmaps
    }

    pub(crate) fn data(&self) -> Result<&HostFile> {
        if self.has_data_file {
            self.data_file.as_ref().ok_or_else(|| {
                Error::invalid_image(format!(
                    "{}: the external data file is not open",
                    self.filename
                ))
            })
        } else {
            Ok(&self.file)
        }
    }

    pub(crate) fn compression(&self) -> Compression {
        self.hdr.compression
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::out_of_bounds(format!(
                "{}: access at offset {} length {} is beyond the end of the image ({} bytes)",
                self.filename, offset, len, self.size
            ))),
        }
    }

    /// Classifies subcluster `sub` of a cluster with entry (`w`, `bm`).
    pub(crate) fn classify(&self, w: u64, bm: u64, sub: u64, gcl: u64) -> Result<Kind> {
        if w & OFLAG_COMPRESSED != 0 {
            if self.has_data_file {
                return Err(self.corrupt_err(format!(
                    "Compressed cluster entry found in image with external data file (guest cluster {gcl:#x})"
                )));
            }
            return Ok(Kind::Compressed(w));
        }
        let host = w & L2E_OFFSET_MASK;
        let allocated = host != 0 || (self.has_data_file && w & OFLAG_COPIED != 0);
        if allocated {
            if host & (self.cs - 1) != 0 {
                return Err(self.corrupt_err(format!(
                    "Cluster allocation offset {host:#x} unaligned (guest cluster {gcl:#x})"
                )));
            }
            if self.has_data_file && host != gcl * self.cs {
                return Err(self.corrupt_err(format!(
                    "External data file host cluster offset {host:#x} does not match guest cluster offset: {:#x}",
                    gcl * self.cs
                )));
            }
        }
        if self.ext_l2 {
            let a = (bm >> sub) & 1;
            let z = (bm >> (32 + sub)) & 1;
            if a == 1 && z == 1 {
                return Err(self.corrupt_err(format!(
                    "Invalid subcluster bitmap {bm:#x} (guest cluster {gcl:#x})"
                )));
            }
            if a == 1 {
                if !allocated {
                    return Err(self.corrupt_err(format!(
                        "Allocated subcluster without host offset (guest cluster {gcl:#x})"
                    )));
                }
                return Ok(Kind::Data(host + sub * self.sc));
            }
            if z == 1 {
                return Ok(Kind::Zero);
            }
            return Ok(Kind::Unalloc);
        }
        if w & OFLAG_ZERO != 0 {
            return Ok(Kind::Zero);
        }
        if allocated {
            Ok(Kind::Data(host))
        } else {
            Ok(Kind::Unalloc)
        }
    }

    /// The host offset behind byte `in_cl` of a cluster with L2 word `w`, where the cluster
    /// has one (allocated, not compressed): what QEMU reports as the offset of preallocated
    /// zero clusters and unallocated subclusters.
    pub(crate) fn alloc_host(&self, w: u64, in_cl: u64) -> Option<u64> {
        if w & OFLAG_COMPRESSED != 0 {
            return None;
        }
        let host = w & L2E_OFFSET_MASK;
        (host != 0).then_some(host + in_cl)
    }

    /// `alloc_host` for a guest offset.
    fn alloc_host_at(&self, offset: u64) -> Result<Option<u64>> {
        let mut m = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        let gcl = offset >> self.cluster_bits;
        match self.l2_table_for_read(&mut m, gcl / self.l2_entries)? {
            None => Ok(None),
            Some(l2_off) => {
                let (w, _) = self.l2_get(&mut m, l2_off, gcl % self.l2_entries)?;
                Ok(self.alloc_host(w, offset & (self.cs - 1)))
            }
        }
    }

    pub(crate) fn corrupt_err(&self, msg: String) -> Error {
        Error::corrupt(format!("{}: {}", self.filename, msg))
    }

    /// Walks the guest range, calling `f(kind, len)` for each run of same-kind
    /// (sub)clusters; contiguous data runs are merged. `f` returns false to stop.
    pub(crate) fn walk(
        &self,
        m: &mut Meta,
        offset: u64,
        len: u64,
        mut f: impl FnMut(Kind, u64) -> bool,
    ) -> Result<()> {
        let end = offset + len;
        let mut pos = offset;
        let mut cur: Option<(Kind, u64)> = None;
        // Host offset behind the current zero/unallocated run (preallocated clusters), so that
        // runs with and without one are not merged.
        let mut cur_host: Option<u64> = None;
        let l2_span = self.l2_entries * self.cs;
        while pos < end {
            let gcl = pos >> self.cluster_bits;
            let l1_idx = gcl / self.l2_entries;
            let mut host_here: Option<u64> = None;
            let (kind, n) = match self.l2_table_for_read(m, l1_idx)? {
                None => {
                    let span_end = ((l1_idx + 1) * l2_span).min(end);
                    (Kind::Unalloc, span_end - pos)
                }
                Some(l2_off) => {
                    let (w, bm) = self.l2_get(m, l2_off, gcl % self.l2_entries)?;
                    let in_cl = pos & (self.cs - 1);
                    let sub = in_cl / self.sc;
                    let k = self.classify(w, bm, sub, gcl)?;
                    host_here = self.alloc_host(w, in_cl);
                    let unit_end = if matches!(k, Kind::Compressed(_)) {
                        self.cs
                    } else {
                        (sub + 1) * self.sc
                    };
                    let n = (unit_end - in_cl).min(end - pos);
                    let k = match k {
                        Kind::Data(h) => Kind::Data(h + (in_cl - sub * self.sc)),
                        k => k,
                    };
                    (k, n)
                }
            };
            cur = match cur {
                None => {
                    cur_host = host_here;
                    Some((kind, n))
                }
                Some((ck, cn)) => {
                    let same_host = match (cur_host, host_here) {
                        (None, None) => true,
                        (Some(a), Some(b)) => a + cn == b,
                        _ => false,
                    };
                    let merged = match (ck, kind) {
                        (Kind::Data(a), Kind::Data(b)) => a + cn == b,
                        (Kind::Zero, Kind::Zero) | (Kind::Unalloc, Kind::Unalloc) => same_host,
                        _ => false,
                    };
                    if merged {
                        Some((ck, cn + n))
                    } else {
                        if !f(ck, cn) {
                            return Ok(());
                        }
                        cur_host = host_here;
                        Some((kind, n))
                    }
                }
            };
            pos += n;
        }
        if let Some((k, n)) = cur {
            f(k, n);
        }
        Ok(())
    }

    /// Reads a compressed cluster (whole) into `out`.
    pub(crate) fn read_compressed(&self, w: u64, out: &mut [u8]) -> Result<()> {
        {
            let c = self.ccache.lock().unwrap();
            if let Some((cw, data)) = c.as_ref() {
                if *cw == w {
                    out.copy_from_slice(data);
                    return Ok(());
                }
            }
        }
        let shift = 62 - (self.cluster_bits - 8);
        let mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let coff = w & ((1u64 << shift) - 1);
        let nsec = ((w >> shift) & mask) + 1;
        let csize = nsec * 512 - (coff & 511);
        if coff > header::MAX_CLUSTER_OFFSET {
            return Err(self.corrupt_err(format!("Compressed cluster offset {coff:#x} is invalid")));
        }
        let mut input = vec![0u8; csize as usize];
        self.file.read_at(&mut input, coff)?;
        compress::decompress(self.compression(), &input, out).map_err(|e| {
            let msg = format!(
                "{}: compressed cluster at host offset {coff:#x}: {}",
                self.filename,
                e.message()
            );
            e.with_message(msg)
        })?;
        *self.ccache.lock().unwrap() = Some((w, out.to_vec()));
        Ok(())
    }

    pub(crate) fn invalidate_ccache(&self) {
        *self.ccache.lock().unwrap() = None;
    }

    /// Reads from the backing file; past its end reads zero.
    pub(crate) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            None => {
                buf.fill(0);
                Ok(())
            }
            Some(b) => {
                let bsize = b.virtual_size();
                if offset >= bsize {
                    buf.fill(0);
                    return Ok(());
                }
                let n = ((bsize - offset) as usize).min(buf.len());
                b.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
        }
    }

    /// Reads guest data for one segment of kind `k` (the segment lies within one
    /// cluster if compressed).
    pub(crate) fn read_segment(&self, k: Kind, buf: &mut [u8], guest: u64) -> Result<()> {
        match k {
            Kind::Data(h) => self.data()?.read_at(buf, h),
            Kind::Zero => {
                buf.fill(0);
                Ok(())
            }
            Kind::Unalloc => self.read_backing(buf, guest),
            Kind::Compressed(w) => {
                let mut tmp = vec![0u8; self.cs as usize];
                self.read_compressed(w, &mut tmp)?;
                let in_cl = (guest & (self.cs - 1)) as usize;
                buf.copy_from_slice(&tmp[in_cl..in_cl + buf.len()]);
                Ok(())
            }
        }
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut segs = Vec::new();
        {
            let mut m = self.meta.lock().unwrap();
            self.walk(&mut m, offset, buf.len() as u64, |k, n| {
                segs.push((k, n));
                true
            })?;
        }
        let mut pos = 0usize;
        for (k, n) in segs {
            let n = n as usize;
            // compressed runs are not merged, so each lies within one cluster
            self.read_segment(k, &mut buf[pos..pos + n], offset + pos as u64)?;
            pos += n;
        }
        Ok(())
    }

    fn specific_info(&self) -> Result<Obj> {
        let m = self.meta.lock().unwrap();
        let h = &self.hdr;
        if h.version == 2 {
            let mut o = Obj::new()
                .with("compat", "0.10")
                .with("compression-type", h.compression.name())
                .with("refcount-bits", 1u64 << h.refcount_order);
            if let Some(e) = &self.encrypt {
                o.push("encrypt", Json::Obj(e.clone()));
            }
            return Ok(o);
        }
        let mut o = Obj::new().with("compat", "1.1");
        if let Some(df) = &self.data_file_name {
            o.push("data-file", df.as_str());
        }
        if self.has_data_file {
            o.push(
                "data-file-raw",
                m.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0,
            );
        }
        o.push("extended-l2", self.ext_l2);
        o.push(
            "lazy-refcounts",
            h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
        );
        o.push("corrupt", m.incompat & header::INCOMPAT_CORRUPT != 0);
        o.push("refcount-bits", 1u64 << h.refcount_order);
        o.push("compression-type", h.compression.name());
        if let Some(e) = &self.encrypt {
            o.push("encrypt", Json::Obj(e.clone()));
        }
        if !self.bitmaps.is_empty() {
            let list: Vec<Json> = self
                .bitmaps
                .iter()
                .map(|b| {
                    let mut flags = Vec::new();
                    if b.flags & 1 != 0 {
                        flags.push(Json::from("in-use"));
                    }
                    if b.flags & 2 != 0 {
                        flags.push(Json::from("auto"));
                    }
                    Json::Obj(
                        Obj::new()
                            .with("name", b.name.as_str())
                            .with("granularity", b.granularity)
                            .with("flags", flags),
                    )
                })
                .collect();
            o.push("bitmaps", list);
        }
        Ok(o)
    }
}

impl BlockDriver for Qcow2 {
    fn format(&self) -> Format {
        Format::Qcow2
    }
    fn filename(&self) -> &str {
        &self.filename
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.check_range(offset, 0)?;
        let max_len = max_len.min(self.size - offset);
        if max_len == 0 {
            return Ok((Mapping::Zero { explicit: false }, 0));
        }
        let mut first: Option<(Kind, u64)> = None;
        let mut m = self.meta.lock().unwrap();
        self.walk(&mut m, offset, max_len, |k, n| match &mut first {
            None => {
                first = Some((k, n));
                true
            }
            Some((Kind::Compressed(_), cn)) if matches!(k, Kind::Compressed(_)) => {
                *cn += n;
                true
            }
            _ => false,
        })?;
        let (k, n) = first.unwrap_or((Kind::Unalloc, max_len));
        let mapping = match k {
            Kind::Data(h) => Mapping::Data { host_offset: h },
            Kind::Compressed(_) => Mapping::Compressed,
            Kind::Zero => Mapping::Zero { explicit: true },
            Kind::Unalloc => Mapping::Unallocated,
        };
        Ok((mapping, n))
    }

    fn host_zero_status(
        &self,
        _offset: u64,
        host_offset: u64,
        len: u64,
    ) -> Result<Option<(bool, u64)>> {
        self.host_status(host_offset, len)
    }

    fn data_filename(&self, _offset: u64) -> Option<&str> {
        self.data_file_path.as_deref()
    }

    fn reserved_host_offset(&self, offset: u64) -> Result<Option<u64>> {
        self.alloc_host_at(offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.read_inner(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.write_impl(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        self.write_zeroes_impl(offset, len, unmap)
    }

    fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<crate::formats::Prepared> {
        self.check_range(offset, buf.len() as u64)?;
        self.compress_blob(buf, offset)
    }

    fn write_compressed_data(&self, data: &[u8], offset: u64) -> Result<()> {
        self.store_compressed_blob(data, offset)
    }

    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.write_compressed_impl(buf, offset)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.discard_impl(offset, len)
    }

    fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.meta.lock().unwrap();
        self.flush_meta(&mut m)
    }

    fn close(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let mut m = self.meta.lock().unwrap();
        self.close_meta(&mut m)
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        self.backing.as_deref()
    }

    fn check(
        &self,
        repair: Option<crate::formats::RepairMode>,
    ) -> Result<crate::formats::CheckReport> {
        self.check_image(repair)
    }

    fn resize(&self, new_size: u64, prealloc: Option<&str>) -> Result<()> {
        self.resize_impl(new_size, prealloc)
    }

    fn make_empty(&self) -> Result<()> {
        self.make_empty_impl()
    }

    fn set_backing_file(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.set_backing_file_impl(name, format)
    }

    fn load_snapshot_tmp(&self, sel: &crate::formats::SnapshotSel) -> Result<()> {
        self.load_snapshot_tmp_impl(sel)
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(&self.filename, Format::Qcow2, self.size);
        info.cluster_size = Some(self.cs);
        {
            let m = self.meta.lock().unwrap();
            info.dirty_flag = m.incompat & header::INCOMPAT_DIRTY != 0;
        }
        info.actual_size = Some(self.file.allocated_size()?);
        if self.hdr.crypt_method != 0 {
            info.encrypted = Some(true);
        }
        if let Some(b) = &self.hdr.backing_file {
            info.backing_filename = Some(b.clone());
            info.full_backing_filename =
                Some(crate::formats::resolve_backing_name(&self.filename, b));
            info.backing_filename_format = self.hdr.backing_format.clone();
        }
        info.snapshots = self
            .snapshots
            .iter()
            .map(|s| SnapshotInfo {
                id: s.id.clone(),
                name: s.name.clone(),
                vm_state_size: s.vm_state_size,
                date_sec: s.date_sec as u64,
                date_nsec: s.date_nsec,
                vm_clock_nsec: s.vm_clock_nsec,
                icount: s.icount,
            })
            .collect();
        info.format_specific = Some(("qcow2".to_string(), self.specific_info()?));
        info.children
            .push(("file".to_string(), ImageInfo::file_node(&self.file)?));
        Ok(info)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.writable {
            if let Ok(mut m) = self.meta.lock() {
                let _ = self.close_meta(&mut m);
            }
        }
    }
}
