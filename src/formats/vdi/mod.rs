//! The VDI (VirtualBox Disk Image) format.
//!
//! A VDI file is a pre-header (text, signature 0xbeda107f, version 1.1), a header, a block
//! map (one little-endian u32 per block: a physical block number, 0xffffffff for a block
//! never written, 0xfffffffe for a block that reads as zero) and the data blocks (1 MiB as
//! a rule) in any order. See [`header`] for the layout.
//!
//! Beyond what qemu does, this driver reads block sizes other than 1 MiB and block "extra"
//! data, differencing images (their parent is found by UUID next to the image, see
//! [`parent`]), releases whole blocks on discard/write-zeroes, and has
//! [`VdiDriver::check`] (with repair), [`VdiDriver::resize`] and [`VdiDriver::compact`].
//!
//! Invariant kept by every operation: the physical blocks in use are `0..blocks_allocated`
//! (qemu allocates the next block at index `blocks_allocated`, so holes would make it
//! overwrite live data).

mod check;
mod create;
mod driver;
pub mod header;
mod maint;
pub mod parent;

use std::sync::RwLock;

pub use check::VdiCheckReport;
pub use driver::{VdiDriver, VdiHeaderInfo};
pub use header::{Geometry, ImageType, Uuid};
pub use maint::CompactStats;

use crate::error::{Error, Result};
use crate::formats::{BlockDriver, CreateOpts, OpenCtx, OptDesc, OptKind};
use crate::io::HostFile;
use driver::{SlotSet, State};
use header::Header;

/// Does this header (the first 2 KiB of the file, zero-padded) look like vdi?
pub fn probe(head: &[u8]) -> bool {
    header::probe(head)
}

/// `-o` options of vdi, as `-o help` lists them.
pub static CREATE_OPTS: &[OptDesc] = &[
    OptDesc {
        name: "size",
        kind: OptKind::Size,
        help: "Virtual disk size",
    },
    OptDesc {
        name: "static",
        kind: OptKind::Bool,
        help: "VDI static (pre-allocated) image",
    },
];

/// Opens a vdi image.
pub fn open(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    Ok(Box::new(open_vdi(file, filename, ctx)?))
}

/// Opens a vdi image, returning the concrete driver.
pub fn open_vdi(file: HostFile, filename: &str, ctx: &OpenCtx) -> Result<VdiDriver> {
    let file_len = file.len()?;
    let mut raw = [0u8; 512];
    file.read_at(&mut raw, 0)?;
    let hdr = Header::parse(&raw, file_len)?;
    let map = read_map(&file, &hdr)?;
    let mut st = State {
        used: SlotSet::default(),
        hdr,
        map,
        count: 0,
        hint: 0,
        problem: None,
    };
    st.rebuild()?;
    let (parent, parent_name) = if st.hdr.has_parent() && !ctx.opts.no_backing {
        let name = parent::find_parent(filename, &st.hdr)?;
        let p = crate::formats::open_backing(filename, &name, Some("vdi"), ctx)?;
        (Some(p), Some(name))
    } else {
        (None, None)
    };
    Ok(VdiDriver {
        file,
        filename: filename.to_string(),
        state: RwLock::new(st),
        parent,
        parent_name,
    })
}

/// Reads the block map (bounded: the header checks limit it to the file and to qemu's
/// maximum block count).
fn read_map(file: &HostFile, hdr: &Header) -> Result<Vec<u32>> {
    let n = hdr.blocks_in_image as usize;
    let mut map = Vec::new();
    map.try_reserve_exact(n)
        .map_err(|_| Error::too_large(format!("cannot allocate a block map of {n} entries")))?;
    let mut buf = vec![0u8; (n * 4).min(1 << 20)];
    let mut off = hdr.offset_bmap as u64;
    while map.len() < n {
        let k = (n - map.len()).min(buf.len() / 4);
        let b = &mut buf[..k * 4];
        file.read_exact_at(b, off)?;
        map.extend(
            b.chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
        );
        off += k as u64 * 4;
    }
    Ok(map)
}

/// Creates a vdi image.
pub fn create(filename: &str, opts: &CreateOpts) -> Result<()> {
    create::create(filename, opts)
}

/// The `fmt=vdi key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    create::summary(opts)
}
