//! QEMU-compatible image locking.
//!
//! QEMU (file-posix) locks single bytes of the image file with Linux open-file-description
//! (OFD) locks: byte `100 + n` is read-locked by every user that holds permission `n`, byte
//! `200 + n` by every user that does *not* share permission `n` with others. Before using an
//! image, a user tests the opposite bytes: anyone holding `200 + n` forbids us permission `n`,
//! anyone holding `100 + n` forbids us from unsharing `n`. Doing the same here makes diskit
//! and a running QEMU respect each other.

use std::fs::File;
use std::os::unix::io::AsRawFd;

use crate::error::{Error, ErrorKind, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// QEMU's permission bits, in the order of their lock bytes.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// Permission: read data that others keep consistent.
pub const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// Permission: change guest-visible data.
pub const PERM_WRITE: u32 = 1 << 1;
/// Permission: write without changing guest-visible data.
pub const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// Permission: change the image size.
pub const PERM_RESIZE: u32 = 1 << 3;

/// How an image is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// No locking at all.
    None,
    /// `-U` / force-share: read, and let anybody else do anything.
    ForceShare,
    /// A read-only user: consistent read, refusing writers (QEMU's default for read-only).
    Read,
    /// A writer: consistent read, write and resize, refusing other writers.
    Write,
}

/// The permissions a user holds and those it refuses to share, as QEMU computes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockSpec {
    /// Permissions held (lock bytes 100+n).
    pub held: u32,
    /// Permissions not shared with others (lock bytes 200+n).
    pub unshared: u32,
}

impl LockMode {
    /// The lock bytes of this mode.
    pub fn spec(self) -> LockSpec {
        let (held, unshared) = self.perms();
        LockSpec { held, unshared }
    }

    fn perms(self) -> (u32, u32) {
        // (held, not shared)
        match self {
            LockMode::None => (0, 0),
            LockMode::ForceShare => (PERM_CONSISTENT_READ, 0),
            LockMode::Read => (PERM_CONSISTENT_READ, PERM_WRITE | PERM_RESIZE),
            LockMode::Write => (
                PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                PERM_WRITE | PERM_RESIZE,
            ),
        }
    }
}

fn flock_struct(kind: i16, start: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

/// Takes a shared OFD lock on one byte. Returns false where the filesystem has no OFD locks.
fn set_read_lock(file: &File, byte: i64) -> std::io::Result<bool> {
    let mut fl = flock_struct(libc::F_RDLCK as i16, byte);
    // SAFETY: valid fd and flock pointer.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOTSUP) | Some(libc::ENOLCK) => Ok(false),
        _ => Err(e),
    }
}

/// Is a lock held on this byte by another open file description?
fn is_locked_by_other(file: &File, byte: i64) -> bool {
    let mut fl = flock_struct(libc::F_WRLCK as i16, byte);
    // SAFETY: valid fd and flock pointer.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    r == 0 && fl.l_type != libc::F_UNLCK as i16
}

/// Applies QEMU's lock bytes for `mode` on `file` and checks that nobody conflicts.
/// `display` is the file name used in the error message.
pub fn lock_image(file: &File, mode: LockMode, display: &str) -> Result<()> {
    lock_spec(file, mode.spec(), display)
}

/// Applies QEMU's lock bytes for `spec` on `file` and checks that nobody conflicts.
pub fn lock_spec(file: &File, spec: LockSpec, display: &str) -> Result<()> {
    let LockSpec { held, unshared } = spec;
    if held == 0 && unshared == 0 {
        return Ok(());
    }
    for bit in 0..PERM_NAMES.len() as i64 {
        let lock =
            |byte| set_read_lock(file, byte).map_err(|e| Error::io(e, "Failed to lock byte"));
        if held & (1 << bit) != 0 && !lock(PERM_BASE + bit)? {
            return Ok(()); // no OFD locks on this filesystem: nothing to honour
        }
        if unshared & (1 << bit) != 0 && !lock(SHARED_BASE + bit)? {
            return Ok(());
        }
    }
    // A conflicting lock can be held for an instant by a child process that a
    // multi-threaded program is forking (the child shares our open file descriptions
    // until it execs): look again a few times before calling it a conflict.
    for _ in 0..10 {
        if first_conflict(file, held, unshared).is_none() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    match first_conflict(file, held, unshared) {
        None => Ok(()),
        Some(what) => Err(Error::new(
            ErrorKind::Locked,
            format!("Failed to get {what} lock\nIs another process using the image [{display}]?"),
        )),
    }
}

/// The first conflicting permission, worded as in QEMU's message.
fn first_conflict(file: &File, held: u32, unshared: u32) -> Option<String> {
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        if held & (1 << bit) != 0 && is_locked_by_other(file, SHARED_BASE + bit as i64) {
            return Some(format!("\"{name}\""));
        }
    }
    for (bit, name) in PERM_NAMES.iter().enumerate() {
        if unshared & (1 << bit) != 0 && is_locked_by_other(file, PERM_BASE + bit as i64) {
            return Some(format!("shared \"{name}\""));
        }
    }
    None
}
