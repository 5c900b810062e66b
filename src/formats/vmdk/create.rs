//! Creating vmdk images: the `-o` options of qemu-img, the sparse/flat/stream layouts and
//! the descriptor.

use super::header::*;
use super::stream::empty_trailer;
use crate::error::{Error, Result};
use crate::formats::options::{parse_bool, parse_size};
use crate::formats::{self, CreateOpts, Format, OpenOptions, OptDesc, OptKind};
use crate::io::{HostFile, HostOpenOptions};

/// `-o` options of vmdk, in the order `-o help` lists them (sorted by name).
pub static CREATE_OPTS: &[OptDesc] = &[
    OptDesc {
        name: "adapter_type",
        kind: OptKind::Str,
        help: "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX",
    },
    OptDesc {
        name: "backing_file",
        kind: OptKind::Str,
        help: "File name of a base image",
    },
    OptDesc {
        name: "backing_fmt",
        kind: OptKind::Str,
        help: "Must be 'vmdk' if present",
    },
    OptDesc {
        name: "compat6",
        kind: OptKind::Bool,
        help: "VMDK version 6 image",
    },
    OptDesc {
        name: "hwversion",
        kind: OptKind::Str,
        help: "VMDK hardware version",
    },
    OptDesc {
        name: "size",
        kind: OptKind::Size,
        help: "Virtual disk size",
    },
    OptDesc {
        name: "subformat",
        kind: OptKind::Str,
        help: "VMDK flat extent format, can be one of {monolithicSparse (default) | monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} ",
    },
    OptDesc {
        name: "toolsversion",
        kind: OptKind::Str,
        help: "VMware guest tools version",
    },
    OptDesc {
        name: "zeroed_grain",
        kind: OptKind::Bool,
        help: "Enable efficient zero writes using the zeroed-grain GTE feature",
    },
];

/// The order qemu-img prints the options in `Formatting ...` (the driver's list, then the
/// protocol's), with the defaults it prints when unset.
const SUMMARY_ORDER: &[(&str, OptKind, Option<&str>)] = &[
    ("size", OptKind::Size, None),
    ("adapter_type", OptKind::Str, None),
    ("backing_file", OptKind::Str, None),
    ("backing_fmt", OptKind::Str, None),
    ("compat6", OptKind::Bool, Some("off")),
    ("hwversion", OptKind::Str, Some("undefined")),
    ("toolsversion", OptKind::Str, None),
    ("subformat", OptKind::Str, None),
    ("zeroed_grain", OptKind::Bool, None),
    ("preallocation", OptKind::Str, None),
    ("nocow", OptKind::Bool, None),
    ("extent_size_hint", OptKind::Size, None),
];

/// The `fmt=vmdk key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    let mut s = "fmt=vmdk".to_string();
    for (name, kind, def) in SUMMARY_ORDER {
        let v = match opts.get(name) {
            Some(v) => match kind {
                OptKind::Size => parse_size(v)
                    .map(|n| n.to_string())
                    .unwrap_or(v.to_string()),
                OptKind::Str => v.replace(',', ",,"),
                _ => v.to_string(),
            },
            None => match def {
                Some(d) => d.to_string(),
                None => continue,
            },
        };
        s.push_str(&format!(" {name}={v}"));
    }
    s
}

/// The subformats qemu-img can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subformat {
    /// One sparse file with an embedded descriptor.
    MonolithicSparse,
    /// A descriptor and one flat file.
    MonolithicFlat,
    /// A descriptor and sparse files of at most 2 GiB.
    TwoGbMaxExtentSparse,
    /// A descriptor and flat files of at most 2 GiB.
    TwoGbMaxExtentFlat,
    /// One compressed, append-only sparse file.
    StreamOptimized,
}

impl Subformat {
    fn parse(s: &str) -> Option<Subformat> {
        Some(match s {
            "monolithicSparse" => Subformat::MonolithicSparse,
            "monolithicFlat" => Subformat::MonolithicFlat,
            "twoGbMaxExtentSparse" => Subformat::TwoGbMaxExtentSparse,
            "twoGbMaxExtentFlat" => Subformat::TwoGbMaxExtentFlat,
            "streamOptimized" => Subformat::StreamOptimized,
            _ => return None,
        })
    }
    fn name(self) -> &'static str {
        match self {
            Subformat::MonolithicSparse => "monolithicSparse",
            Subformat::MonolithicFlat => "monolithicFlat",
            Subformat::TwoGbMaxExtentSparse => "twoGbMaxExtentSparse",
            Subformat::TwoGbMaxExtentFlat => "twoGbMaxExtentFlat",
            Subformat::StreamOptimized => "streamOptimized",
        }
    }
    fn flat(self) -> bool {
        matches!(
            self,
            Subformat::MonolithicFlat | Subformat::TwoGbMaxExtentFlat
        )
    }
    fn split(self) -> bool {
        matches!(
            self,
            Subformat::TwoGbMaxExtentFlat | Subformat::TwoGbMaxExtentSparse
        )
    }
}

const SPLIT_SIZE: u64 = 0x8000_0000;

/// A random 32-bit content ID.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into a valid buffer.
    let r = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 4, 0) };
    if r != 4 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return (t ^ (t >> 32) ^ std::process::id() as u64) as u32;
    }
    u32::from_le_bytes(b)
}

/// Parameters of a new descriptor.
pub struct DescParams<'a> {
    /// Content ID.
    pub cid: u32,
    /// Parent content ID (ffffffff without parent).
    pub parent_cid: u32,
    /// createType.
    pub create_type: &'a str,
    /// parentFileNameHint.
    pub parent: Option<&'a str>,
    /// Extent lines, each ending in a newline.
    pub extents: &'a str,
    /// ddb.virtualHWVersion.
    pub hw_version: &'a str,
    /// Size in bytes (for the geometry).
    pub size: u64,
    /// ddb.adapterType.
    pub adapter: &'a str,
    /// ddb.toolsVersion.
    pub tools: &'a str,
}

/// The descriptor text qemu-img writes.
pub fn descriptor_text(p: &DescParams) -> String {
    let heads: u64 = if p.adapter == "ide" { 16 } else { 255 };
    let parent = p
        .parent
        .map(|b| format!("parentFileNameHint=\"{b}\""))
        .unwrap_or_default();
    let mut s = String::new();
    s.push_str("# Disk DescriptorFile\nversion=1\n");
    s.push_str(&format!("CID={:x}\nparentCID={:x}\n", p.cid, p.parent_cid));
    s.push_str(&format!("createType=\"{}\"\n{parent}\n", p.create_type));
    s.push_str("# Extent description\n");
    s.push_str(p.extents);
    s.push_str("\n# The Disk Data Base\n#DDB\n\n");
    s.push_str(&format!("ddb.virtualHWVersion = \"{}\"\n", p.hw_version));
    s.push_str(&format!(
        "ddb.geometry.cylinders = \"{}\"\n",
        p.size / (63 * heads * SECTOR)
    ));
    s.push_str(&format!("ddb.geometry.heads = \"{heads}\"\n"));
    s.push_str("ddb.geometry.sectors = \"63\"\n");
    s.push_str(&format!("ddb.adapterType = \"{}\"\n", p.adapter));
    s.push_str(&format!("ddb.toolsVersion = \"{}\"\n", p.tools));
    s
}

/// Layout of a new hosted sparse extent (as qemu lays it out: header, descriptor area of 20
/// sectors, redundant directory and tables, directory and tables, then grains).
pub fn sparse_layout(size: u64, zeroed_grain: bool) -> Result<(SparseHeader, u64, u64)> {
    let capacity = size / SECTOR;
    let grain_sectors = 128u64;
    let gtes = 512u64;
    let grains = capacity.div_ceil(grain_sectors);
    let gt_sectors = (gtes * 4).div_ceil(SECTOR);
    let gt_count = grains.div_ceil(gtes);
    let gd_sectors = (gt_count * 4).div_ceil(SECTOR);
    let rgd = 21u64;
    let gd = rgd + gd_sectors + gt_sectors * gt_count;
    let grain_offset =
        (gd + gd_sectors + gt_sectors * gt_count).div_ceil(grain_sectors) * grain_sectors;
    if grain_offset > u32::MAX as u64 {
        return Err(Error::too_large(
            "image size too large for a vmdk sparse extent",
        ));
    }
    let h = SparseHeader {
        version: if zeroed_grain { 2 } else { 1 },
        flags: FLAG_RGD | FLAG_NL_DETECT | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
        capacity,
        grain_sectors,
        desc_offset: 1,
        desc_size: 20,
        gtes_per_gt: gtes as u32,
        rgd_offset: rgd,
        gd_offset: gd,
        grain_offset,
        unclean: 0,
        compress: 0,
    };
    Ok((h, gt_count, gd_sectors))
}

/// Writes a sparse extent but its header, which it returns: the caller writes it last, so
/// that a crash leaves no file with the magic but without its tables (or descriptor).
fn write_sparse_extent(file: &HostFile, size: u64, zeroed_grain: bool) -> Result<Vec<u8>> {
    let (h, gt_count, gd_sectors) = sparse_layout(size, zeroed_grain)?;
    file.set_len(h.grain_offset * SECTOR)?;
    let gt_sectors = 4u64;
    for dir in [h.rgd_offset, h.gd_offset] {
        let table: Vec<u32> = (0..gt_count)
            .map(|i| (dir + gd_sectors + i * gt_sectors) as u32)
            .collect();
        file.write_at(
            &encode_table(&table, (gd_sectors * SECTOR) as usize),
            dir * SECTOR,
        )?;
    }
    Ok(h.to_bytes().to_vec())
}

/// Header of a new stream-optimized extent in VMware's layout.
pub fn stream_header(size: u64, zeroed_grain: bool) -> SparseHeader {
    SparseHeader {
        version: 3,
        flags: FLAG_NL_DETECT
            | FLAG_COMPRESSED
            | FLAG_MARKERS
            | if zeroed_grain { FLAG_ZERO_GRAIN } else { 0 },
        capacity: size / SECTOR,
        grain_sectors: 128,
        desc_offset: 1,
        desc_size: 20,
        gtes_per_gt: 512,
        rgd_offset: 0,
        gd_offset: GD_AT_END,
        grain_offset: 128,
        unclean: 0,
        compress: COMPRESSION_DEFLATE,
    }
}

/// Writes an empty stream-optimized extent but its header, which it returns (written last by
/// the caller, as for [`write_sparse_extent`]).
fn write_stream_extent(file: &HostFile, size: u64, zeroed_grain: bool) -> Result<Vec<u8>> {
    let h = stream_header(size, zeroed_grain);
    let gd_len = (h.capacity.div_ceil(h.grain_sectors)).div_ceil(h.gtes_per_gt as u64) as usize;
    let trailer = empty_trailer(&h, gd_len, h.grain_offset);
    file.write_at(&trailer, h.grain_offset * SECTOR)?;
    file.set_len(h.grain_offset * SECTOR + trailer.len() as u64)?;
    Ok(h.to_bytes().to_vec())
}

fn decompose(filename: &str) -> (String, String, String) {
    let (path, base) = match filename.rfind('/') {
        Some(p) => (&filename[..=p], &filename[p + 1..]),
        None => ("", filename),
    };
    match base.rfind('.') {
        Some(q) => (
            path.to_string(),
            base[..q].to_string(),
            base[q..].to_string(),
        ),
        None => (path.to_string(), base.to_string(), String::new()),
    }
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn create_file(name: &str) -> Result<HostFile> {
    HostFile::open(name, &HostOpenOptions::create()).map_err(|e| e.context(name))
}

/// The checked `-o` options of a new image.
struct Params<'a> {
    sub: Subformat,
    adapter: &'a str,
    hw: &'a str,
    tools: &'a str,
    zeroed_grain: bool,
    backing: Option<&'a str>,
    parent_cid: u32,
    size: u64,
}

fn params<'a>(filename: &str, opts: &'a CreateOpts) -> Result<Params<'a>> {
    let err = |m: &str| Error::invalid_arg(format!("{filename}: {m}"));
    let mut known: Vec<OptDesc> = CREATE_OPTS.to_vec();
    known.extend(formats::raw::PROTOCOL_OPTS.iter().skip(1).copied());
    opts.check_known(&known, filename)?;
    if let Some(f) = opts.get("backing_fmt") {
        if f != "vmdk" {
            return Err(err("backing_file must be a vmdk image"));
        }
    }
    if filename.is_empty() {
        return Err(err("No filename provided"));
    }
    let adapter = opts.get("adapter_type").unwrap_or("ide");
    if !matches!(adapter, "ide" | "lsilogic" | "buslogic" | "legacyESX") {
        return Err(err(&format!("invalid parameter value: {adapter}")));
    }
    let sub = match opts.get("subformat") {
        None => Subformat::MonolithicSparse,
        Some(s) => {
            Subformat::parse(s).ok_or_else(|| err(&format!("invalid parameter value: {s}")))?
        }
    };
    let compat6 = match opts.get("compat6") {
        Some(v) => parse_bool("compat6", v).map_err(|e| e.context(filename))?,
        None => false,
    };
    let zeroed_grain = match opts.get("zeroed_grain") {
        Some(v) => parse_bool("zeroed_grain", v).map_err(|e| e.context(filename))?,
        None => false,
    };
    let mut hw = opts.get("hwversion").filter(|h| *h != "undefined");
    if compat6 {
        if hw.is_some() {
            return Err(err("compat6 cannot be enabled with hwversion set"));
        }
        hw = Some("6");
    }
    let hw = hw.unwrap_or("4");
    let tools = opts.get("toolsversion").unwrap_or("2147483647");
    let backing = opts.get("backing_file").filter(|b| !b.is_empty());
    if sub.flat() && backing.is_some() {
        return Err(Error::unsupported(format!(
            "{filename}: Flat image can't have backing file"
        )));
    }
    if sub.flat() && zeroed_grain {
        return Err(Error::unsupported(format!(
            "{filename}: Flat image can't enable zeroed grain"
        )));
    }

    let mut parent_cid = 0xffff_ffffu32;
    let mut size = opts.get_size("size")?;
    if let Some(b) = backing {
        let full = formats::resolve_backing_name(filename, b);
        let mut o = OpenOptions::read_only();
        o.no_backing = true;
        let img = formats::open(&full, &o).map_err(|e| e.context(filename))?;
        if img.format() != Format::Vmdk {
            return Err(err(&format!(
                "Invalid backing file format: {}. Must be vmdk",
                img.format()
            )));
        }
        let v = img
            .as_any()
            .downcast_ref::<super::VmdkDriver>()
            .ok_or_else(|| err("Failed to read parent CID"))?;
        parent_cid = v.cid();
        if size.is_none() {
            size = Some(img.virtual_size());
        }
    }
    let size = size.ok_or_else(|| err("Image creation needs a size parameter"))?;
    let size = size
        .checked_add(SECTOR - 1)
        .map(|s| s / SECTOR * SECTOR)
        .filter(|s| *s <= i64::MAX as u64)
        .ok_or_else(|| err("Image size is too large"))?;
    Ok(Params {
        sub,
        adapter,
        hw,
        tools,
        zeroed_grain,
        backing,
        parent_cid,
        size,
    })
}

/// Creates a vmdk image.
pub fn create(filename: &str, opts: &CreateOpts) -> Result<()> {
    let err = |m: &str| Error::invalid_arg(format!("{filename}: {m}"));
    let Params {
        sub,
        adapter,
        hw,
        tools,
        zeroed_grain,
        backing,
        parent_cid,
        size,
    } = params(filename, opts)?;
    let (path, prefix, postfix) = decompose(filename);
    let mut extents = String::new();
    let desc_file = create_file(filename)?;
    let line = |sectors: u64, name: &str| {
        if sub.flat() {
            format!("RW {sectors} FLAT \"{}\" 0\n", basename(name))
        } else {
            format!("RW {sectors} SPARSE \"{}\"\n", basename(name))
        }
    };
    let mut monolithic_header = None;
    match sub {
        Subformat::MonolithicSparse => {
            monolithic_header = Some(write_sparse_extent(&desc_file, size, zeroed_grain)?);
            extents.push_str(&line(size / SECTOR, filename));
        }
        Subformat::StreamOptimized => {
            monolithic_header = Some(write_stream_extent(&desc_file, size, zeroed_grain)?);
            extents.push_str(&line(size / SECTOR, filename));
        }
        _ => {
            let chunk = if sub.split() { SPLIT_SIZE } else { size.max(1) };
            let mut done = 0u64;
            let mut idx = 1;
            while done < size {
                let cur = (size - done).min(chunk);
                let name = if sub.split() {
                    format!(
                        "{path}{prefix}-{}{idx:03}{postfix}",
                        if sub.flat() { 'f' } else { 's' }
                    )
                } else {
                    format!("{path}{prefix}-flat{postfix}")
                };
                let f = create_file(&name)?;
                if sub.flat() {
                    // sized as qemu-img makes a raw file: its first block written
                    crate::formats::raw::preallocate(
                        &f,
                        0,
                        cur,
                        crate::formats::raw::Prealloc::Off,
                    )?;
                } else {
                    let head = write_sparse_extent(&f, cur, zeroed_grain)?;
                    f.sync()?;
                    f.write_at(&head, 0)?;
                }
                f.sync()?;
                extents.push_str(&line(cur / SECTOR, &name));
                done += cur;
                idx += 1;
            }
        }
    }
    let text = descriptor_text(&DescParams {
        cid: random_u32(),
        parent_cid,
        create_type: sub.name(),
        parent: backing,
        extents: &extents,
        hw_version: hw,
        size,
        adapter,
        tools,
    });
    if matches!(
        sub,
        Subformat::MonolithicSparse | Subformat::StreamOptimized
    ) {
        if text.len() as u64 > 20 * SECTOR {
            return Err(err("descriptor too long"));
        }
        desc_file.write_at(text.as_bytes(), SECTOR)?;
        if let Some(head) = monolithic_header {
            desc_file.sync()?;
            desc_file.write_at(&head, 0)?;
        }
    } else {
        desc_file.write_at(text.as_bytes(), 0)?;
        desc_file.set_len(text.len() as u64)?;
    }
    desc_file.sync()
}

/// The name the descriptor of a stream written to a sequential sink gives its extent (the
/// file the stream will become is unknown; readers of a monolithic stream ignore it).
pub const SINK_EXTENT_NAME: &str = "disk.vmdk";

/// Starts a streamOptimized image on a sequential sink (standard output): writes the header
/// and the descriptor, and returns the driver that takes the guest data in increasing
/// offset order; its `close` writes the tables, footer and end-of-stream marker. The bytes
/// are those [`create`] and the vmdk driver write into a file named [`SINK_EXTENT_NAME`],
/// except for the random CID. A backing file is not supported.
pub fn create_on_sink(
    sink: std::sync::Arc<crate::io::SeqFile>,
    opts: &CreateOpts,
) -> Result<Box<dyn formats::BlockDriver>> {
    let name = sink.display().to_string();
    let p = params(&name, opts)?;
    if p.sub != Subformat::StreamOptimized {
        return Err(Error::unsupported(format!(
            "{name}: only the streamOptimized subformat can be written to a sequential output"
        )));
    }
    if p.backing.is_some() {
        return Err(Error::unsupported(format!(
            "{name}: a backing file is not supported when writing to a sequential output"
        )));
    }
    let h = stream_header(p.size, p.zeroed_grain);
    let extents = format!("RW {} SPARSE \"{SINK_EXTENT_NAME}\"\n", p.size / SECTOR);
    let text = descriptor_text(&DescParams {
        cid: random_u32(),
        parent_cid: p.parent_cid,
        create_type: p.sub.name(),
        parent: None,
        extents: &extents,
        hw_version: p.hw,
        size: p.size,
        adapter: p.adapter,
        tools: p.tools,
    });
    let room = (h.desc_size * SECTOR) as usize;
    if text.len() > room {
        return Err(Error::invalid_arg(format!("{name}: descriptor too long")));
    }
    let mut head = h.to_bytes().to_vec();
    head.extend_from_slice(text.as_bytes());
    head.resize(SECTOR as usize + room, 0);
    sink.write_at(&head, 0)?;
    let gd_len = h
        .capacity
        .div_ceil(h.grain_sectors)
        .div_ceil(h.gtes_per_gt as u64) as usize;
    Ok(Box::new(super::stream::StreamSink::new(
        sink, &name, h, gd_len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_matches_qemu() {
        let o =
            CreateOpts::parse("subformat=monolithicFlat,adapter_type=lsilogic,size=10M").unwrap();
        assert_eq!(
            create_summary(&o),
            "fmt=vmdk size=10485760 adapter_type=lsilogic compat6=off hwversion=undefined subformat=monolithicFlat"
        );
    }

    #[test]
    fn layout_matches_qemu() {
        let (h, gts, gds) = sparse_layout(10 << 20, false).unwrap();
        assert_eq!(
            (h.rgd_offset, h.gd_offset, h.grain_offset, gts, gds),
            (21, 26, 128, 1, 1)
        );
        assert_eq!(
            decompose("d/x.y.vmdk"),
            ("d/".into(), "x.y".into(), ".vmdk".into())
        );
    }
}
