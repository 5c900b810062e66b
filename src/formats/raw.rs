//! The raw format: the guest disk byte for byte in a host file.
//!
//! Holes in the file (SEEK_HOLE) are the only metadata; the virtual size is the file size
//! rounded up to a 512-byte sector, as QEMU reports it.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::formats::{
    BlockDriver, CreateOpts, Format, ImageInfo, Mapping, OpenCtx, OptDesc, OptKind,
};
use crate::io::{HostFile, HostOpenOptions};

/// `-o` options of raw, as `-o help` lists them.
pub static CREATE_OPTS: &[OptDesc] = &[OptDesc {
    name: "size",
    kind: OptKind::Size,
    help: "Virtual disk size",
}];

/// Options of the host-file layer that `create` accepts too.
pub static PROTOCOL_OPTS: &[OptDesc] = &[
    OptDesc {
        name: "size",
        kind: OptKind::Size,
        help: "Virtual disk size",
    },
    OptDesc {
        name: "preallocation",
        kind: OptKind::Str,
        help: "Preallocation mode (allowed values: off, falloc, full)",
    },
    OptDesc {
        name: "nocow",
        kind: OptKind::Bool,
        help: "Turn off copy-on-write (valid only on btrfs)",
    },
    OptDesc {
        name: "extent_size_hint",
        kind: OptKind::Size,
        help: "Extent size hint for the image file, 0 to disable",
    },
];

const SECTOR: u64 = 512;

/// An open raw image.
#[derive(Debug)]
pub struct RawDriver {
    file: HostFile,
    filename: String,
    size: AtomicU64,
    probed: bool,
}

/// Opens a raw image on an open host file.
pub fn open(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    let len = file.len()?;
    let size = len.div_ceil(SECTOR) * SECTOR;
    if ctx.probed && ctx.opts.write {
        crate::warn::emit(&format!(
            "WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
        ));
    }
    Ok(Box::new(RawDriver {
        file,
        filename: filename.to_string(),
        size: AtomicU64::new(size),
        probed: ctx.probed,
    }))
}

impl RawDriver {
    /// The host file.
    pub fn file(&self) -> &HostFile {
        &self.file
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(Error::out_of_bounds(format!(
                "{}: access at offset {} length {} is beyond the end of the image ({} bytes)",
                self.filename,
                offset,
                len,
                self.size()
            ))),
        }
    }

    fn check_sector0(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.probed && offset < SECTOR {
            let mut head = vec![0u8; SECTOR as usize];
            self.file.read_at(&mut head, 0)?;
            let end = (offset as usize + buf.len()).min(SECTOR as usize);
            head[offset as usize..end].copy_from_slice(&buf[..end - offset as usize]);
            if super::probe(&head, &self.filename) != Format::Raw {
                return Err(Error::unsupported(format!(
                    "{}: write to sector 0 of a probed raw image would change its format: Operation not permitted",
                    self.filename
                )));
            }
        }
        Ok(())
    }
}

impl BlockDriver for RawDriver {
    fn format(&self) -> Format {
        Format::Raw
    }
    fn filename(&self) -> &str {
        &self.filename
    }
    fn virtual_size(&self) -> u64 {
        self.size()
    }
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.check_range(offset, 0)?;
        let max_len = max_len.min(self.size() - offset);
        if max_len == 0 {
            return Ok((Mapping::Zero { explicit: false }, 0));
        }
        let end = offset + max_len;
        match self.file.seek_data(offset)? {
            Some(d) if d <= offset => {
                let hole = self.file.seek_hole(offset)?.max(offset + 1);
                Ok((
                    Mapping::Data {
                        host_offset: offset,
                    },
                    hole.min(end) - offset,
                ))
            }
            Some(d) => Ok((Mapping::Zero { explicit: false }, d.min(end) - offset)),
            None => Ok((Mapping::Zero { explicit: false }, max_len)),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.file.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.check_sector0(buf, offset)?;
        self.file.write_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_range(offset, len)?;
        if self.probed && offset < SECTOR {
            self.check_sector0(&vec![0u8; (SECTOR - offset).min(len) as usize], offset)?;
        }
        if unmap && self.file.punch_hole(offset, len)? {
            return Ok(());
        }
        self.file.write_zeroes(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.file.punch_hole(offset, len).map(|_| ())
    }

    fn flush(&self) -> Result<()> {
        if self.file.is_writable() {
            self.file.sync()?;
        }
        Ok(())
    }

    fn backing(&self) -> Option<&dyn BlockDriver> {
        None
    }

    fn info(&self) -> Result<ImageInfo> {
        let mut info = ImageInfo::new(&self.filename, Format::Raw, self.size());
        info.actual_size = Some(self.file.allocated_size()?);
        info.children
            .push(("file".to_string(), ImageInfo::file_node(&self.file)?));
        Ok(info)
    }

    fn resize(&self, new_size: u64, prealloc: Option<&str>) -> Result<()> {
        let mode = Prealloc::parse(prealloc, false)?.unwrap_or(Prealloc::Off);
        let old = self.file.len()?;
        if new_size < old {
            self.file.set_len(new_size)?;
        } else {
            preallocate(&self.file, old, new_size, mode)?;
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Preallocation of a host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// Sparse.
    Off,
    /// Space reserved with fallocate.
    Falloc,
    /// Zeroes written.
    Full,
}

impl Prealloc {
    /// Parses `preallocation=`.
    pub fn parse(v: Option<&str>, allow_metadata: bool) -> Result<Option<Prealloc>> {
        Ok(match v {
            None | Some("off") => Some(Prealloc::Off),
            Some("falloc") => Some(Prealloc::Falloc),
            Some("full") => Some(Prealloc::Full),
            Some("metadata") if allow_metadata => None,
            Some(other) => {
                return Err(Error::invalid_arg(format!(
                    "Parameter 'preallocation' does not accept value '{other}'"
                )))
            }
        })
    }
}

/// Sets a file to `size` bytes with the given preallocation (growing only the new part).
pub fn preallocate(file: &HostFile, from: u64, size: u64, mode: Prealloc) -> Result<()> {
    match mode {
        Prealloc::Off => {
            file.set_len(size)?;
            allocate_first_block(file, from, size)
        }
        Prealloc::Falloc => {
            file.set_len(size)?;
            if size > from {
                file.allocate(from, size - from)?;
            }
            allocate_first_block(file, from, size)
        }
        Prealloc::Full => {
            if size > from {
                let chunk = vec![0u8; 1 << 20];
                let mut off = from;
                while off < size {
                    let n = (size - off).min(chunk.len() as u64) as usize;
                    file.write_at(&chunk[..n], off)?;
                    off += n as u64;
                }
            }
            file.set_len(size)
        }
    }
}

/// A file grown from empty gets its first block written (zeros: 4 KiB, or one sector when
/// smaller), as QEMU does so that alignment probing finds real data there; `map` then shows
/// that block as data, in both tools' output. (QEMU ignores a failure there; diskit reports
/// it: a disk that cannot take 4 KiB will not take the image either.)
fn allocate_first_block(file: &HostFile, from: u64, size: u64) -> Result<()> {
    if from == 0 && size > 0 {
        let n = if size < 4096 { 512 } else { 4096 };
        file.write_at(&[0u8; 4096][..n], 0)?;
    }
    Ok(())
}

/// Creates a raw image.
pub fn create(filename: &str, opts: &CreateOpts) -> Result<()> {
    opts.check_known(PROTOCOL_OPTS, filename)?;
    let size = opts.get_size("size")?.ok_or_else(|| {
        Error::invalid_arg(format!("{filename}: Image creation needs a size parameter"))
    })?;
    let mode = Prealloc::parse(opts.get("preallocation"), false)?.unwrap_or(Prealloc::Off);
    // the file is a whole number of sectors, as QEMU makes it
    let size = size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::invalid_arg(format!("{filename}: Image size is too large")))?;
    let file =
        HostFile::open(filename, &HostOpenOptions::create()).map_err(|e| e.context(filename))?;
    preallocate(&file, 0, size, mode)?;
    file.sync()
}

/// The `fmt=raw key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    crate::formats::options::summary("raw", PROTOCOL_OPTS, opts)
}
