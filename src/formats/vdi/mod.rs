//! The vdi format (work in progress).

use crate::error::{Error, Result};
use crate::formats::{BlockDriver, CreateOpts, OpenCtx, OptDesc};
use crate::io::HostFile;

/// Does this header (the first 2 KiB of the file, zero-padded) look like vdi?
pub fn probe(_header: &[u8]) -> bool {
    false
}

/// `-o` options of vdi, as `-o help` lists them.
pub static CREATE_OPTS: &[OptDesc] = &[];

/// Opens a vdi image.
pub fn open(_file: HostFile, _filename: &str, _ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    Err(Error::unsupported("vdi is not implemented yet"))
}

/// Creates a vdi image.
pub fn create(_filename: &str, _opts: &CreateOpts) -> Result<()> {
    Err(Error::unsupported("vdi creation is not implemented yet"))
}

/// The `fmt=vdi key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    crate::formats::options::summary("vdi", CREATE_OPTS, opts)
}
