//! `measure`: the file size a conversion or a new image would need.

use crate::error::Result;
use crate::formats::measure::{self, Measure, MeasureSource};
use crate::formats::{self, BlockDriver, CreateOpts, Format, OpenOptions, SnapshotSel};
use crate::ops::map::block_status;
use crate::qjson::Json;

/// What `measure` takes.
#[derive(Debug, Clone)]
pub struct MeasureOptions {
    /// Target format (`-O`, default raw).
    pub target_format: Format,
    /// Target options (`-o`).
    pub opts: CreateOpts,
    /// `--size N` instead of a source.
    pub size: Option<u64>,
    /// Source image.
    pub source: Option<String>,
    /// Source format.
    pub source_format: Option<Format>,
    /// `-U`
    pub force_share: bool,
    /// `-l`: measure the guest view of this internal snapshot.
    pub snapshot: Option<SnapshotSel>,
}

/// Loads an internal snapshot read-only, with qemu-img's error prefix.
pub fn load_snapshot(img: &dyn BlockDriver, sel: &SnapshotSel) -> Result<()> {
    img.load_snapshot_tmp(sel).map_err(|e| {
        let msg = format!("Failed to load snapshot: {}", e.message());
        e.with_message(msg)
    })
}

/// Measures.
pub fn measure(o: &MeasureOptions) -> Result<Measure> {
    let Some(name) = &o.source else {
        return measure::measure(o.target_format, &o.opts, o.size.unwrap_or(0), None);
    };
    let img = formats::open(
        name,
        &OpenOptions {
            format: o.source_format,
            force_share: o.force_share,
            ..OpenOptions::default()
        },
    )?;
    if let Some(sel) = &o.snapshot {
        load_snapshot(img.as_ref(), sel)?;
    }
    let size = img.virtual_size();
    let data_bytes = |cluster: u64| -> Result<u64> {
        // qemu counts every cluster that a data run touches
        let mut required = 0u64;
        let mut off = 0u64;
        while off < size {
            let e = block_status(img.as_ref(), off, size - off)?;
            let mut n = e.length;
            if !e.zero && e.data && e.present {
                n = (off + n).div_ceil(cluster) * cluster - off;
                required += off % cluster + n;
            }
            off += n;
        }
        Ok(required)
    };
    let bitmaps = if img.format() == Format::Qcow2 {
        let info = img.info()?;
        let mut list = Vec::new();
        let supports = info
            .format_specific
            .as_ref()
            .and_then(|(_, d)| d.get("compat"))
            .is_some_and(|c| *c == Json::Str("1.1".into()));
        if let Some((_, data)) = &info.format_specific {
            if let Some(Json::Arr(bms)) = data.get("bitmaps") {
                for b in bms {
                    if let Json::Obj(b) = b {
                        let name = match b.get("name") {
                            Some(Json::Str(s)) => s.clone(),
                            _ => String::new(),
                        };
                        let gran = match b.get("granularity") {
                            Some(Json::UInt(g)) => *g,
                            Some(Json::Int(g)) => *g as u64,
                            _ => 65536,
                        };
                        list.push((name, gran));
                    }
                }
            }
        }
        supports.then_some(list)
    } else {
        None
    };
    let src = MeasureSource {
        size,
        data_bytes: &data_bytes,
        bitmaps,
    };
    measure::measure(o.target_format, &o.opts, size, Some(&src))
}
