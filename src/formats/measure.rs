//! How large a new image would be (`qemu-img measure`), per target format.
//!
//! The qcow2 figures follow QEMU's own accounting (header cluster, L1 and L2 tables for
//! the whole disk, refcount structures found as a fixed point) so that the numbers match
//! qemu-img's exactly.

use crate::error::{Error, Result};
use crate::formats::{CreateOpts, Format};

/// Sizes in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measure {
    /// File size needed for the data the source has.
    pub required: u64,
    /// File size if every cluster were allocated.
    pub fully_allocated: u64,
    /// Space for persistent bitmaps, where both formats support them.
    pub bitmaps: Option<u64>,
}

/// What is known of the source.
pub struct MeasureSource<'a> {
    /// Virtual size.
    pub size: u64,
    /// Bytes of data (clusters touched by data), given a cluster size.
    pub data_bytes: &'a dyn Fn(u64) -> Result<u64>,
    /// Persistent bitmaps of the source: (name, granularity).
    pub bitmaps: Option<Vec<(String, u64)>>,
}

/// The refcount table and blocks needed to count `clusters` clusters (and themselves).
pub fn qcow2_refcount_metadata_size(clusters: u64, cluster_size: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cluster_size / 8;
    let per_block = cluster_size * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            break;
        }
    }
    (blocks + table) * cluster_size
}

/// Bytes of a fully allocated qcow2 image of `size` (metadata and data).
pub fn qcow2_prealloc_size(
    size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let aligned = size.div_ceil(cluster_size) * cluster_size;
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).div_ceil(cluster_size / l2e) * (cluster_size / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cluster_size).div_ceil(cluster_size / 8) * (cluster_size / 8);
    meta += nl1e * 8;
    meta += qcow2_refcount_metadata_size(
        (meta + aligned) / cluster_size,
        cluster_size,
        refcount_order,
    );
    meta + aligned
}

fn qcow2(opts: &CreateOpts, size: u64, src: Option<&MeasureSource>) -> Result<Measure> {
    let ext_l2 = opts.get_bool("extended_l2")?.unwrap_or(false);
    // 64 KiB with subclusters too, as create and qemu's measure have it
    let cluster = opts.get_size("cluster_size")?.unwrap_or(64 << 10);
    if !cluster.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster) {
        return Err(Error::invalid_arg(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if ext_l2 && cluster < 16384 {
        return Err(Error::invalid_arg(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let v3 = match opts.get("compat") {
        None | Some("1.1") | Some("v3") => true,
        Some("0.10") | Some("v2") => false,
        Some(o) => return Err(Error::invalid_arg(format!("Invalid parameter '{o}'"))),
    };
    let refbits = opts.get_number("refcount_bits")?.unwrap_or(16);
    if !refbits.is_power_of_two() || refbits > 64 {
        return Err(Error::invalid_arg(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if !v3 && refbits != 16 {
        return Err(Error::invalid_arg(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    let prealloc = opts.get("preallocation").unwrap_or("off");
    let mut vsize = size.div_ceil(cluster) * cluster;
    let l2e = if ext_l2 { 16 } else { 8 };
    let l2_tables = (vsize / cluster).div_ceil(cluster / l2e);
    if l2_tables * 8 > 32 << 20 {
        return Err(Error::invalid_arg(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    let mut required = 0;
    if let Some(s) = src {
        vsize = s.size.div_ceil(cluster) * cluster;
        required = if opts.get("backing_file").is_some() {
            vsize
        } else {
            (s.data_bytes)(cluster)?
        };
    }
    if prealloc == "full" || prealloc == "falloc" {
        required = vsize;
    }
    let fully = qcow2_prealloc_size(vsize, cluster, refbits.trailing_zeros(), ext_l2);
    let bitmaps = match src.and_then(|s| s.bitmaps.as_ref()) {
        Some(list) if v3 => {
            let mut total = 0u64;
            let mut dir = 0u64;
            for (name, gran) in list {
                let bytes = s_size(src).div_ceil((*gran).max(1)).div_ceil(8);
                let clusters = bytes.div_ceil(cluster);
                total += clusters * cluster;
                total += (clusters * 8).div_ceil(cluster) * cluster;
                dir += (24 + name.len() as u64).div_ceil(8) * 8;
            }
            Some(total + dir.div_ceil(cluster) * cluster)
        }
        _ => None,
    };
    Ok(Measure {
        required: fully - vsize + required,
        fully_allocated: fully,
        bitmaps,
    })
}

fn s_size(src: Option<&MeasureSource>) -> u64 {
    src.map(|s| s.size).unwrap_or(0)
}

/// Measures an image of `format` with options `opts`, either of `size` bytes or holding the
/// data of `src`.
pub fn measure(
    format: Format,
    opts: &CreateOpts,
    size: u64,
    src: Option<&MeasureSource>,
) -> Result<Measure> {
    match format {
        Format::Raw => {
            let required = match src {
                Some(s) => s.size,
                None => size.div_ceil(512) * 512,
            };
            Ok(Measure {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        Format::Qcow2 => qcow2(opts, size, src),
        other => Err(Error::unsupported(format!(
            "Block driver '{}' does not support size measurement",
            other.name()
        ))),
    }
}
