//! The qcow2 format (QEMU copy-on-write, versions 2 and 3).

use crate::error::{Error, Result};
use crate::formats::{BlockDriver, CreateOpts, OpenCtx, OptDesc};
use crate::io::HostFile;

/// The magic number at offset 0: `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Does this header look like qcow2?
pub fn probe(header: &[u8]) -> bool {
    header.len() >= 8
        && header[..4] == MAGIC
        && u32::from_be_bytes([header[4], header[5], header[6], header[7]]) >= 2
}

/// `-o` options of qcow2, as `-o help` lists them.
pub static CREATE_OPTS: &[OptDesc] = &[];

/// Opens a qcow2 image.
pub fn open(_file: HostFile, _filename: &str, _ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    Err(Error::unsupported("qcow2 is not implemented yet"))
}

/// Creates a qcow2 image.
pub fn create(_filename: &str, _opts: &CreateOpts) -> Result<()> {
    Err(Error::unsupported("qcow2 creation is not implemented yet"))
}

/// The `fmt=qcow2 key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    crate::formats::options::summary("qcow2", CREATE_OPTS, opts)
}
