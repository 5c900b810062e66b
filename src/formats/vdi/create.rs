//! Creating VDI images the way `qemu-img create -f vdi` does.

use super::header::{Header, DEFAULT_BLOCK_SIZE, DISK_SIZE_MAX, SECTOR};
use crate::error::{Error, Result};
use crate::formats::options::{parse_bool, parse_size};
use crate::formats::{CreateOpts, OptDesc, OptKind};
use crate::io::{HostFile, HostOpenOptions};

/// Every option `create` accepts: vdi's own, then the host-file protocol's (in the order of
/// qemu's merged option list, which is the order of the summary line).
pub(crate) static ALL_OPTS: &[(OptDesc, Option<&str>)] = &[
    (
        OptDesc {
            name: "size",
            kind: OptKind::Size,
            help: "Virtual disk size",
        },
        None,
    ),
    (
        OptDesc {
            name: "static",
            kind: OptKind::Bool,
            help: "VDI static (pre-allocated) image",
        },
        Some("off"),
    ),
    (
        OptDesc {
            name: "nocow",
            kind: OptKind::Bool,
            help: "Turn off copy-on-write (valid only on btrfs)",
        },
        None,
    ),
    (
        OptDesc {
            name: "preallocation",
            kind: OptKind::Str,
            help: "Preallocation mode (allowed values: off, falloc, full)",
        },
        None,
    ),
    (
        OptDesc {
            name: "extent_size_hint",
            kind: OptKind::Size,
            help: "Extent size hint for the image file, 0 to disable",
        },
        None,
    ),
];

/// `fmt=vdi size=N static=off ...` as qemu's `qemu_opts_print` prints it: every option of
/// the merged list that is set or has a default; sizes as numbers, others as given.
pub(crate) fn summary(opts: &CreateOpts) -> String {
    let mut s = String::from("fmt=vdi");
    for (d, def) in ALL_OPTS {
        let given = opts.get(d.name);
        let Some(v) = given.or(*def) else { continue };
        let v = match d.kind {
            OptKind::Size if given.is_some() => match parse_size(v) {
                Ok(n) => (n as i64).to_string(),
                Err(_) => v.to_string(),
            },
            OptKind::Str => v.replace(',', ",,"),
            _ => v.to_string(),
        };
        s.push_str(&format!(" {}={}", d.name, v));
    }
    s
}

/// Creates a VDI image: header, block map (all unallocated, or 0..n for a static image),
/// and for static images the data area as a sparse tail.
pub(crate) fn create(filename: &str, opts: &CreateOpts) -> Result<()> {
    let known: Vec<OptDesc> = ALL_OPTS.iter().map(|(d, _)| *d).collect();
    opts.check_known(&known, filename)?;
    let size = opts
        .get_size("size")
        .map_err(|e| e.context(filename))?
        .ok_or_else(|| {
            Error::invalid_arg(format!("{filename}: Image creation needs a size parameter"))
        })?;
    let fixed = match opts.get("static") {
        None => false,
        Some(v) => parse_bool("static", v).map_err(|e| e.context(filename))?,
    };
    if let Some(v) = opts.get("nocow") {
        parse_bool("nocow", v).map_err(|e| e.context(filename))?;
    }
    opts.get_size("extent_size_hint")
        .map_err(|e| e.context(filename))?;
    let prealloc = opts.get("preallocation").unwrap_or("off");
    if !matches!(prealloc, "off" | "falloc" | "full" | "metadata") {
        return Err(Error::invalid_arg(format!(
            "{filename}: invalid parameter value: {prealloc}"
        )));
    }
    // qemu creates the host file first (empty), then checks the rest.
    let file =
        HostFile::open(filename, &HostOpenOptions::create()).map_err(|e| e.context(filename))?;
    if prealloc == "metadata" {
        return Err(Error::unsupported(format!(
            "{filename}: Unsupported preallocation mode: metadata"
        )));
    }
    // Silently rounded up to a sector, like qemu.
    let size = size.checked_next_multiple_of(SECTOR).unwrap_or(u64::MAX);
    if size > DISK_SIZE_MAX {
        return Err(Error::unsupported(format!(
            "{filename}: Unsupported VDI image size (size is {size:#x}, max supported is {DISK_SIZE_MAX:#x})"
        )));
    }
    let bs = DEFAULT_BLOCK_SIZE as u64;
    let blocks = size.div_ceil(bs) as u32;
    let mut hdr = Header::new_qemu(size, DEFAULT_BLOCK_SIZE, blocks, fixed)?;
    hdr.store();
    // The header (and its signature) goes last: a crash before leaves no VDI image that
    // lacks its block map.
    // The map, written in pieces (up to 2 GiB for the largest image).
    let bmap_size = hdr.offset_data as u64 - hdr.offset_bmap as u64;
    let mut off = 0u64;
    let per = 1u64 << 18; // entries per piece (1 MiB)
    while off < bmap_size {
        let n = (bmap_size - off).min(per * 4);
        let first = off / 4;
        let mut buf = Vec::with_capacity(n as usize);
        for i in first..first + n / 4 {
            let e = if i >= blocks as u64 {
                0
            } else if fixed {
                i as u32
            } else {
                u32::MAX
            };
            buf.extend_from_slice(&e.to_le_bytes());
        }
        file.write_at(&buf, hdr.offset_bmap as u64 + off)?;
        off += n;
    }
    if fixed {
        file.set_len(hdr.offset_data as u64 + blocks as u64 * bs)?;
    }
    file.sync()?;
    file.write_at(&hdr.raw, 0)?;
    file.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let o = CreateOpts::parse("size=1.5M").unwrap();
        assert_eq!(summary(&o), "fmt=vdi size=1572864 static=off");
        let o = CreateOpts::parse("size=1M,static=yes,preallocation=off,nocow=off").unwrap();
        assert_eq!(
            summary(&o),
            "fmt=vdi size=1048576 static=yes nocow=off preallocation=off"
        );
        let o = CreateOpts::parse("size=1M,extent_size_hint=1M,preallocation=falloc").unwrap();
        assert_eq!(
            summary(&o),
            "fmt=vdi size=1048576 static=off preallocation=falloc extent_size_hint=1048576"
        );
    }
}
