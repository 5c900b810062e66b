//! The vmdk format (work in progress).

use crate::error::{Error, Result};
use crate::formats::{BlockDriver, CreateOpts, OpenCtx, OptDesc};
use crate::io::HostFile;

/// Does this header (the first 2 KiB of the file, zero-padded) look like vmdk?
pub fn probe(_header: &[u8]) -> bool {
    false
}

/// `-o` options of vmdk, as `-o help` lists them.
pub static CREATE_OPTS: &[OptDesc] = &[];

/// Opens a vmdk image.
pub fn open(_file: HostFile, _filename: &str, _ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    Err(Error::unsupported("vmdk is not implemented yet"))
}

/// Creates a vmdk image.
pub fn create(_filename: &str, _opts: &CreateOpts) -> Result<()> {
    Err(Error::unsupported("vmdk creation is not implemented yet"))
}

/// The `fmt=vmdk key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    crate::formats::options::summary("vmdk", CREATE_OPTS, opts)
}
