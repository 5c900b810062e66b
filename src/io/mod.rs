//! The host file: positional I/O, sync, sparse-file queries, allocation control, locks and a
//! fault-injection hook for crash tests.
//!
//! Every format driver does its I/O through [`HostFile`], so that locking, error messages
//! and fault injection are the same everywhere.

pub mod fault;
pub mod lock;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
pub use fault::FaultInjector;
pub use lock::{LockMode, LockSpec};

/// How to open a host file.
#[derive(Debug, Clone)]
pub struct HostOpenOptions {
    /// Open for writing.
    pub write: bool,
    /// Create the file (truncating it) instead of opening an existing one.
    pub create: bool,
    /// QEMU lock mode to apply.
    pub lock: LockMode,
    /// Keep the page cache out of it (`cache=none`). Done with fadvise(DONTNEED) after
    /// flushes rather than O_DIRECT, so that buffers need no alignment.
    pub direct: bool,
    /// `cache=unsafe`: flushes are skipped (what qemu-img convert does to its target).
    pub no_flush: bool,
    /// Optional fault injector (tests); when `None`, the one installed with
    /// [`fault::install_global`], if any.
    pub faults: Option<Arc<FaultInjector>>,
}

impl HostOpenOptions {
    /// Read-only with QEMU's read lock.
    pub fn read() -> Self {
        HostOpenOptions {
            write: false,
            create: false,
            lock: LockMode::Read,
            direct: false,
            no_flush: false,
            faults: None,
        }
    }
    /// Read-write with QEMU's write lock.
    pub fn write() -> Self {
        HostOpenOptions {
            write: true,
            lock: LockMode::Write,
            ..Self::read()
        }
    }
    /// Create (truncate) read-write with QEMU's write lock.
    pub fn create() -> Self {
        HostOpenOptions {
            create: true,
            ..Self::write()
        }
    }
}

/// A reusable I/O buffer whose bytes start on a page boundary, as QEMU's bounce buffers do.
///
/// The kernel copies between the page cache and user memory with `rep movsb`, which some
/// CPUs run slower when source and destination sit at a small distance modulo 4 KiB
/// (4K aliasing); a heap `Vec<u8>` lands at an arbitrary 16-byte offset, page-aligned data
/// never has that problem and keeps a 4 KiB block of the guest in one page.
#[derive(Debug, Default)]
pub struct IoBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl IoBuf {
    /// The alignment of the data.
    pub const ALIGN: usize = 4096;

    /// An empty buffer (no allocation until the first `resize`).
    pub fn new() -> IoBuf {
        IoBuf::default()
    }

    /// Makes the buffer `n` bytes long. Its contents are unspecified (initialised memory,
    /// left over from earlier use): callers fill it.
    pub fn resize(&mut self, n: usize) {
        if self.raw.len() < n + Self::ALIGN {
            self.raw = vec![0u8; n + Self::ALIGN];
            self.start = self.raw.as_ptr().align_offset(Self::ALIGN);
        }
        self.len = n;
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// An open host file, shared by reference between threads (all I/O is positional).
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: PathBuf,
    display: String,
    writable: bool,
    direct: bool,
    no_flush: bool,
    faults: Option<Arc<FaultInjector>>,
    /// Written to since the last successful sync: a sync with nothing to flush is skipped
    /// (so that closing twice, or dropping after a close, cannot fail).
    unsynced: std::sync::atomic::AtomicBool,
}

impl HostFile {
    /// Opens `path`. `display` is how the file is named in messages (as the user gave it).
    pub fn open(path: impl AsRef<Path>, opts: &HostOpenOptions) -> Result<HostFile> {
        let path = path.as_ref();
        let display = path.display().to_string();
        let mut oo = OpenOptions::new();
        oo.read(true);
        if opts.write || opts.create {
            oo.write(true);
        }
        if opts.create {
            // Truncate only once the lock is ours (below): an image another process holds
            // open must survive a failed create, as with qemu-img.
            oo.create(true).truncate(false);
        }
        let file = oo
            .open(path)
            .map_err(|e| Error::io(e, format!("Could not open '{display}'")))?;
        lock::lock_image(&file, opts.lock, &display)?;
        if opts.create {
            file.set_len(0)
                .map_err(|e| Error::io(e, format!("Could not truncate '{display}'")))?;
        }
        Ok(HostFile {
            file,
            path: path.to_path_buf(),
            display,
            writable: opts.write || opts.create,
            direct: opts.direct,
            no_flush: opts.no_flush,
            // the test hook of fault.rs reaches files opened inside library calls
            faults: opts.faults.clone().or_else(fault::global),
            unsynced: std::sync::atomic::AtomicBool::new(opts.create),
        })
    }

    /// The path this file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The name used in messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// Was the file opened for writing?
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The underlying std file.
    pub fn std_file(&self) -> &File {
        &self.file
    }

    /// The fault injector, if any (shared with files opened after this one).
    pub fn faults(&self) -> Option<&Arc<FaultInjector>> {
        self.faults.as_ref()
    }

    fn err(&self, e: std::io::Error, what: &str, offset: u64) -> Error {
        Error::io(
            e,
            format!("{}: {} at offset {:#x} failed", self.display, what, offset),
        )
    }

    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the file read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.err(e, "read", offset + done as u64)),
            }
        }
        if let Some(f) = &self.faults {
            f.on_read(offset, buf.len())
                .map_err(|e| self.err(e, "read", offset))?;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`, failing if the file ends before.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = self.len()?;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > len)
        {
            return Err(Error::new(
                ErrorKind::InvalidImage,
                format!(
                    "{}: unexpected end of file reading {} bytes at offset {:#x} (file size {})",
                    self.display,
                    buf.len(),
                    offset,
                    len
                ),
            ));
        }
        self.read_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let _unsynced = Unsynced(&self.unsynced);
        if let Some(f) = &self.faults {
            if !f
                .on_write(offset, buf.len())
                .map_err(|e| self.err(e, "write", offset))?
            {
                return Ok(());
            }
        }
        let mut done = 0usize;
        for piece in buf.chunks(crate::limits::HOST_WRITE_PIECE) {
            let at = offset + done as u64;
            self.file
                .write_all_at(piece, at)
                .map_err(|e| self.err(e, "write", at))?;
            done += piece.len();
        }
        Ok(())
    }

    /// Current size of the file in bytes.
    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(e, format!("{}: stat failed", self.display)))
    }

    /// Is the file empty?
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Takes QEMU's lock bytes for `spec` (after the format is known), refusing conflicts.
    pub fn lock(&self, spec: LockSpec) -> Result<()> {
        lock::lock_spec(&self.file, spec, &self.display)
    }

    /// Bytes actually allocated on the host (st_blocks * 512), like `du`.
    pub fn allocated_size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.blocks() * 512)
            .map_err(|e| Error::io(e, format!("{}: stat failed", self.display)))
    }

    /// Truncates or extends the file.
    pub fn set_len(&self, len: u64) -> Result<()> {
        let _unsynced = Unsynced(&self.unsynced);
        if let Some(f) = &self.faults {
            if !f
                .on_write(len, 0)
                .map_err(|e| self.err(e, "truncate", len))?
            {
                return Ok(());
            }
        }
        self.file
            .set_len(len)
            .map_err(|e| self.err(e, "truncate", len))
    }

    fn mark_unsynced(&self) {
        self.unsynced.store(true, Ordering::SeqCst);
    }

    /// fdatasync: data and the metadata needed to read it. Skipped when nothing was written
    /// through this file since the last successful sync.
    pub fn sync(&self) -> Result<()> {
        if self.no_flush {
            return Ok(());
        }
        if !self.unsynced.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let failed = |e| {
            self.mark_unsynced();
            Error::io(e, format!("{}: flush failed", self.display))
        };
        if let Some(f) = &self.faults {
            if !f.on_flush().map_err(failed)? {
                return Ok(());
            }
        }
        self.file.sync_data().map_err(failed)?;
        if self.direct {
            self.drop_cache();
        }
        Ok(())
    }

    /// Copies `len` bytes at `src_offset` of this file to `dst` at `dst_offset` inside the
    /// kernel (copy_file_range(2)). Any failure (EXDEV, ENOSYS, EOPNOTSUPP, the source ending
    /// early, ...) is returned for the caller to fall back to reading and writing; files with
    /// fault injection always fall back.
    pub fn copy_range_to(
        &self,
        src_offset: u64,
        dst: &HostFile,
        dst_offset: u64,
        len: u64,
    ) -> std::io::Result<()> {
        if self.faults.is_some() || dst.faults.is_some() {
            return Err(std::io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let _unsynced = Unsynced(&dst.unsynced);
        let (mut so, mut d_o, mut left) = (src_offset, dst_offset, len);
        while left > 0 {
            let mut a = libc::loff_t::try_from(so).map_err(|_| einval())?;
            let mut b = libc::loff_t::try_from(d_o).map_err(|_| einval())?;
            let n = left.min(1 << 30) as usize;
            // SAFETY: valid fds owned by `self` and `dst`; the offsets are our own locals.
            let r = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut a,
                    dst.file.as_raw_fd(),
                    &mut b,
                    n,
                    0,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                // the source ended early (a raw image's last partial sector)
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            let r = r as u64;
            so += r;
            d_o += r;
            left -= r.min(left);
        }
        Ok(())
    }

    /// Asks the kernel to drop this file's cached pages (best effort).
    pub fn drop_cache(&self) {
        // SAFETY: posix_fadvise on a valid fd.
        unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }

    fn lseek(&self, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a valid fd.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    /// The first offset at or after `offset` that holds data, or `None` past the last data.
    /// Falls back to "everything is data" where the filesystem cannot say.
    pub fn seek_data(&self, offset: u64) -> Result<Option<u64>> {
        match self.lseek(offset, libc::SEEK_DATA) {
            Ok(r) => Ok(r),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset)),
            Err(e) => Err(self.err(e, "SEEK_DATA", offset)),
        }
    }

    /// The first hole at or after `offset` (the end of the file counts as a hole).
    pub fn seek_hole(&self, offset: u64) -> Result<u64> {
        match self.lseek(offset, libc::SEEK_HOLE) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => self.len(),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.len(),
            Err(e) => Err(self.err(e, "SEEK_HOLE", offset)),
        }
    }

    /// Whether `[offset, offset+len)` starts in a hole (or past the end) of the host file,
    /// and for how many bytes that stays so (at least 1, at most `len`).
    pub fn hole_status(&self, offset: u64, len: u64) -> Result<(bool, u64)> {
        let flen = self.len()?;
        if offset >= flen {
            return Ok((true, len));
        }
        let end = offset.saturating_add(len);
        Ok(match self.seek_data(offset)? {
            Some(d) if d <= offset => {
                let hole = self.seek_hole(offset)?.min(flen).max(offset + 1);
                (false, hole.min(end) - offset)
            }
            Some(d) => (true, d.min(end) - offset),
            None => (true, len),
        })
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        loop {
            // SAFETY: fallocate on a valid fd.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Deallocates a range (it then reads as zero). Returns false where unsupported.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let _unsynced = Unsynced(&self.unsynced);
        if let Some(f) = &self.faults {
            if !f
                .on_write(offset, len as usize)
                .map_err(|e| self.err(e, "punch hole", offset))?
            {
                return Ok(true);
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => Ok(false),
            Err(e) => Err(self.err(e, "punch hole", offset)),
        }
    }

    /// Makes a range read as zero, keeping it allocated where possible; writes zeroes as a
    /// last resort.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _unsynced = Unsynced(&self.unsynced);
        if let Some(f) = &self.faults {
            if !f
                .on_write(offset, len as usize)
                .map_err(|e| self.err(e, "write zeroes", offset))?
            {
                return Ok(());
            }
        }
        match self.fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if is_unsupported(&e) => {}
            Err(e) => return Err(self.err(e, "write zeroes", offset)),
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file
                .write_all_at(&chunk[..n], offset + done)
                .map_err(|e| self.err(e, "write", offset + done))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Preallocates a range (posix_fallocate semantics, keeps data).
    pub fn allocate(&self, offset: u64, len: u64) -> Result<()> {
        let _unsynced = Unsynced(&self.unsynced);
        if len == 0 {
            return Ok(());
        }
        if let Some(f) = &self.faults {
            if !f
                .on_write(offset, len as usize)
                .map_err(|e| self.err(e, "preallocate", offset))?
            {
                return Ok(());
            }
        }
        self.fallocate(0, offset, len)
            .map_err(|e| self.err(e, "preallocate", offset))
    }
}

/// Marks a file as written to since its last sync when dropped, that is once the write is
/// done: a concurrent sync then never clears the mark of a write it may not cover.
struct Unsynced<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Unsynced<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// Is `buf` all zero bytes? (fast path for zero detection)
pub fn is_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = unsafe { buf.align_to::<u128>() };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
}

/// A write-only output that only grows at its end, such as standard output or a pipe: the
/// sink of formats that can be written as a stream (streamOptimized vmdk).
///
/// It offers the subset of [`HostFile`] a stream writer needs, with positional calls that
/// must land exactly at the current end: `write_at(buf, offset)` with `offset` equal to
/// [`SeqFile::len`], and `set_len` only to grow (the gap is written as zeroes). Anything
/// else fails with a clear error instead of seeking.
#[derive(Debug)]
pub struct SeqFile {
    display: String,
    state: std::sync::Mutex<SeqState>,
}

#[derive(Debug)]
struct SeqState {
    out: std::io::BufWriter<File>,
    pos: u64,
}

impl SeqFile {
    /// Writes to `file` from its current position on (counted as offset 0).
    pub fn new(file: File, display: &str) -> SeqFile {
        SeqFile {
            display: display.to_string(),
            state: std::sync::Mutex::new(SeqState {
                out: std::io::BufWriter::with_capacity(1 << 20, file),
                pos: 0,
            }),
        }
    }

    /// Standard output (a duplicate of descriptor 1, so Rust's own stdout stays untouched).
    pub fn stdout() -> Result<SeqFile> {
        use std::os::unix::io::FromRawFd;
        // SAFETY: dup returns a new descriptor we own, or -1.
        let fd = unsafe { libc::dup(1) };
        if fd < 0 {
            return Err(Error::io(
                std::io::Error::last_os_error(),
                "Could not open standard output",
            ));
        }
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(SeqFile::new(file, "standard output"))
    }

    /// The name used in messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SeqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write_err(&self, e: std::io::Error, offset: u64) -> Error {
        Error::io(
            e,
            format!("{}: write at offset {offset:#x} failed", self.display),
        )
    }

    /// Bytes written so far (the only offset `write_at` accepts).
    pub fn len(&self) -> u64 {
        self.lock().pos
    }

    /// Has nothing been written yet?
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes all of `buf`, which must start where the output ends.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        use std::io::Write;
        let mut st = self.lock();
        if offset != st.pos {
            return Err(Error::unsupported(format!(
                "{}: cannot write at offset {offset:#x}: the output is sequential and only accepts writes at its end ({:#x})",
                self.display, st.pos
            )));
        }
        st.out
            .write_all(buf)
            .map_err(|e| self.write_err(e, offset))?;
        st.pos += buf.len() as u64;
        Ok(())
    }

    /// Grows the output to `len` bytes by writing zeroes; it cannot shrink.
    pub fn set_len(&self, len: u64) -> Result<()> {
        use std::io::Write;
        let mut st = self.lock();
        if len < st.pos {
            return Err(Error::unsupported(format!(
                "{}: cannot truncate a sequential output to {len} bytes ({} are written)",
                self.display, st.pos
            )));
        }
        let zeros = [0u8; 64 * 1024];
        while st.pos < len {
            let n = (len - st.pos).min(zeros.len() as u64) as usize;
            let at = st.pos;
            st.out
                .write_all(&zeros[..n])
                .map_err(|e| self.write_err(e, at))?;
            st.pos += n as u64;
        }
        Ok(())
    }

    /// Hands everything written to the operating system (and to the disk, when the output
    /// is a regular file).
    pub fn sync(&self) -> Result<()> {
        use std::io::Write;
        let mut st = self.lock();
        let pos = st.pos;
        st.out.flush().map_err(|e| self.write_err(e, pos))?;
        let f = st.out.get_ref();
        if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
            f.sync_data()
                .map_err(|e| Error::io(e, format!("{}: sync failed", self.display)))?;
        }
        Ok(())
    }
}

fn einval() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EINVAL)
}
