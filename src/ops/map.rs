//! `map`: where each guest range of an image lives, through the backing chain, in
//! qemu-img's terms (depth, present, zero, data, compressed, offset).

use crate::error::{Error, Result};
use crate::formats::{BlockDriver, Format, Mapping};

/// One run of guest bytes with the same status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// The layer that decides (0 = the image itself, 1 = its backing, ...).
    pub depth: u64,
    /// Allocated in some layer.
    pub present: bool,
    /// Reads as zero.
    pub zero: bool,
    /// Holds data.
    pub data: bool,
    /// Compressed.
    pub compressed: bool,
    /// Host offset of the data, where it has one.
    pub offset: Option<u64>,
    /// The file holding the data at `offset`.
    pub filename: Option<String>,
}

/// The status of the guest range at `offset` (at most `max_len` bytes), resolved through the
/// backing chain the way QEMU's block-status does.
pub fn block_status(img: &dyn BlockDriver, offset: u64, max_len: u64) -> Result<MapEntry> {
    let mut layer: &dyn BlockDriver = img;
    let mut depth = 0u64;
    let mut len = max_len;
    loop {
        let (m, n) = layer.map_reported(offset, len)?;
        if n == 0 {
            return Err(Error::corrupt(format!(
                "{}: no progress in the allocation map at offset {offset}",
                layer.filename()
            )));
        }
        len = n.min(len);
        let raw = layer.format() == Format::Raw;
        let mut e = MapEntry {
            start: offset,
            length: len,
            depth,
            present: true,
            zero: false,
            data: false,
            compressed: false,
            offset: None,
            filename: None,
        };
        match m {
            Mapping::Data { host_offset } => {
                e.data = true;
                if let Some((zero, n)) = layer.host_zero_status(offset, host_offset, len)? {
                    e.zero = zero;
                    e.length = n.clamp(1, len);
                }
                e.offset = Some(host_offset);
                let file = layer.data_filename(offset).unwrap_or(layer.filename());
                e.filename = Some(file.to_string());
                return Ok(e);
            }
            Mapping::Compressed => {
                e.data = true;
                e.compressed = true;
                return Ok(e);
            }
            Mapping::Zero { .. } => {
                e.zero = true;
                if raw {
                    e.offset = Some(offset);
                    e.filename = Some(layer.filename().to_string());
                } else if let Some(h) = layer.reserved_host_offset(offset)? {
                    e.offset = Some(h);
                    e.filename = Some(layer.filename().to_string());
                }
                return Ok(e);
            }
            Mapping::Unallocated => match layer.backing() {
                Some(b) if offset < b.virtual_size() => {
                    len = len.min(b.virtual_size() - offset);
                    layer = b;
                    depth += 1;
                }
                _ => {
                    e.present = false;
                    e.zero = true;
                    if let Some(h) = layer.reserved_host_offset(offset)? {
                        e.offset = Some(h);
                        e.filename = Some(layer.filename().to_string());
                    }
                    return Ok(e);
                }
            },
        }
    }
}

fn mergeable(a: &MapEntry, b: &MapEntry) -> bool {
    a.length > 0
        && a.zero == b.zero
        && a.data == b.data
        && a.compressed == b.compressed
        && a.depth == b.depth
        && a.present == b.present
        && a.filename == b.filename
        && match (a.offset, b.offset) {
            (Some(x), Some(y)) => x + a.length == y,
            (None, None) => true,
            _ => false,
        }
}

/// Walks `[start, start+max_len)` (clamped to the image) and calls `emit` with each merged
/// entry, in order. Memory stays constant whatever the image size.
pub fn map(
    img: &dyn BlockDriver,
    start: u64,
    max_len: Option<u64>,
    mut emit: impl FnMut(&MapEntry) -> Result<()>,
) -> Result<()> {
    let size = img.virtual_size();
    let end = match max_len {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let mut cur: Option<MapEntry> = None;
    let mut pos = start;
    while pos < end {
        let next = block_status(img, pos, end - pos)?;
        pos += next.length;
        match &mut cur {
            Some(c) if mergeable(c, &next) => c.length += next.length,
            _ => {
                if let Some(c) = cur.take() {
                    emit(&c)?;
                }
                cur = Some(next);
            }
        }
    }
    if let Some(c) = cur {
        emit(&c)?;
    }
    Ok(())
}

impl MapEntry {
    /// qemu-img's JSON line for this entry (without the trailing comma).
    pub fn to_json_line(&self) -> String {
        let mut s = format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            self.start, self.length, self.depth, self.present, self.zero, self.data, self.compressed
        );
        if let Some(o) = self.offset {
            s.push_str(&format!(", \"offset\": {o}"));
        }
        s.push('}');
        s
    }
}
