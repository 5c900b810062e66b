//! On-disk structures of sparse extents: the VMDK4 ("KDMV") header, the older VMDK3
//! ("COWD") header of vmfsSparse extents, and the stream markers.
//!
//! Layout facts follow VMware's "Virtual Disk Format 1.1" specification.

use crate::error::{Error, Result};

/// Bytes per sector: every offset in a sparse header counts sectors.
pub const SECTOR: u64 = 512;
/// Magic of a hosted sparse extent, as the first four bytes of the file.
pub const MAGIC_KDMV: &[u8; 4] = b"KDMV";
/// Magic of an ESX (VMDK3) sparse extent.
pub const MAGIC_COWD: &[u8; 4] = b"COWD";
/// `gdOffset` value meaning "read the footer near the end of the file".
pub const GD_AT_END: u64 = u64::MAX;

/// Header flag: the newline-detection bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Header flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Header flag: grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: grains and metadata carry markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `compressAlgorithm` value for deflate.
pub const COMPRESSION_DEFLATE: u16 = 1;

/// Marker types of a stream-optimized extent.
pub const MARKER_EOS: u32 = 0;
/// Grain table marker.
pub const MARKER_GT: u32 = 1;
/// Grain directory marker.
pub const MARKER_GD: u32 = 2;
/// Footer marker.
pub const MARKER_FOOTER: u32 = 3;

/// A grain table entry meaning "this grain reads as zero" (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The header of a hosted sparse extent (also used as the stream footer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SparseHeader {
    /// Format version (1, 2 or 3).
    pub version: u32,
    /// Flags (`FLAG_*`).
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Embedded descriptor offset in sectors (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor size in sectors.
    pub desc_size: u64,
    /// Entries per grain table.
    pub gtes_per_gt: u32,
    /// Redundant grain directory, in sectors.
    pub rgd_offset: u64,
    /// Grain directory, in sectors ([`GD_AT_END`] for streams).
    pub gd_offset: u64,
    /// Sectors of metadata before the first grain (`overHead`).
    pub grain_offset: u64,
    /// Unclean shutdown byte.
    pub unclean: u8,
    /// Compression algorithm.
    pub compress: u16,
}

impl SparseHeader {
    /// Parses the 512-byte header (magic included; the caller checked it).
    pub fn parse(b: &[u8]) -> SparseHeader {
        SparseHeader {
            version: le32(b, 4),
            flags: le32(b, 8),
            capacity: le64(b, 12),
            grain_sectors: le64(b, 20),
            desc_offset: le64(b, 28),
            desc_size: le64(b, 36),
            gtes_per_gt: le32(b, 44),
            rgd_offset: le64(b, 48),
            gd_offset: le64(b, 56),
            grain_offset: le64(b, 64),
            unclean: b[72],
            compress: u16::from_le_bytes([b[77], b[78]]),
        }
    }

    /// The 512-byte sector holding this header.
    pub fn to_bytes(self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(MAGIC_KDMV);
        put32(&mut b, 4, self.version);
        put32(&mut b, 8, self.flags);
        put64(&mut b, 12, self.capacity);
        put64(&mut b, 20, self.grain_sectors);
        put64(&mut b, 28, self.desc_offset);
        put64(&mut b, 36, self.desc_size);
        put32(&mut b, 44, self.gtes_per_gt);
        put64(&mut b, 48, self.rgd_offset);
        put64(&mut b, 56, self.gd_offset);
        put64(&mut b, 64, self.grain_offset);
        b[72] = self.unclean;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress.to_le_bytes());
        b
    }
}

/// The header of an ESX sparse (VMDK3, "COWD") extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowdHeader {
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_sectors: u64,
    /// Grain directory offset in sectors.
    pub gd_offset: u64,
    /// Grain directory entries.
    pub gd_entries: u32,
}

/// Grain table entries per table in a COWD extent.
pub const COWD_GTES_PER_GT: u32 = 4096;

impl CowdHeader {
    /// Parses the header (the first 512 bytes, magic included).
    pub fn parse(b: &[u8]) -> CowdHeader {
        CowdHeader {
            capacity: le32(b, 12) as u64,
            grain_sectors: le32(b, 16) as u64,
            gd_offset: le32(b, 20) as u64,
            gd_entries: le32(b, 24),
        }
    }
}

/// A marker of a stream-optimized extent (the first 16 bytes of a sector).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// LBA of a grain, or the size in sectors of the metadata that follows.
    pub value: u64,
    /// Compressed size of a grain; 0 for metadata markers.
    pub size: u32,
    /// Metadata type (meaningful when `size` is 0).
    pub kind: u32,
}

impl Marker {
    /// Parses the first 16 bytes of `b`.
    pub fn parse(b: &[u8]) -> Marker {
        Marker {
            value: le64(b, 0),
            size: le32(b, 8),
            kind: le32(b, 12),
        }
    }

    /// A metadata marker sector.
    pub fn meta(kind: u32, sectors: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        put64(&mut b, 0, sectors);
        put32(&mut b, 12, kind);
        b
    }
}

/// Decodes a little-endian table of 32-bit entries.
pub fn decode_table(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| le32(c, 0)).collect()
}

/// Encodes a table of 32-bit entries, padded with zeroes to `len` bytes.
pub fn encode_table(t: &[u32], len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len.max(t.len() * 4)];
    for (i, v) in t.iter().enumerate() {
        put32(&mut b, i * 4, *v);
    }
    b
}

/// Checks the values of a sparse header that bound allocations and arithmetic, with the
/// messages QEMU uses where it has one.
pub fn validate_geometry(capacity: u64, grain_sectors: u64, gtes_per_gt: u32) -> Result<u32> {
    // qemu's checks in its order and words
    // (a product that wraps, as in qemu's C; the granularity check below refuses it then)
    let l1_entry_sectors = (gtes_per_gt as u64).wrapping_mul(grain_sectors);
    if l1_entry_sectors == 0 {
        return Err(Error::invalid_image("L1 entry size is invalid"));
    }
    if grain_sectors > 0x20_0000 {
        return Err(Error::invalid_image(
            "Invalid granularity, image may be corrupt",
        ));
    }
    let l1_size = capacity.div_ceil(l1_entry_sectors);
    if l1_size > 32 * 1024 * 1024 {
        return Err(Error::invalid_image("L1 size too big"));
    }
    // diskit's own bounds: 128 MiB per grain is far beyond anything VMware writes (64 KiB)
    // and bounds the buffers a compressed grain needs; the size in bytes must fit an i64
    if grain_sectors > (128 << 20) / SECTOR {
        return Err(Error::invalid_image(format!(
            "Invalid granularity: grain size of {grain_sectors} sectors exceeds 128 MiB, image may be corrupt"
        )));
    }
    if capacity
        .checked_mul(SECTOR)
        .is_none_or(|b| b > i64::MAX as u64)
    {
        return Err(Error::invalid_image(format!(
            "Invalid capacity of {capacity} sectors"
        )));
    }
    Ok(l1_size as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let h = SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 20480,
            grain_sectors: 128,
            desc_offset: 1,
            desc_size: 20,
            gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            grain_offset: 128,
            unclean: 0,
            compress: 0,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..4], MAGIC_KDMV);
        assert_eq!(SparseHeader::parse(&b), h);
    }

    #[test]
    fn geometry_limits() {
        assert!(validate_geometry(1 << 20, 0, 512).is_err());
        assert!(validate_geometry(1 << 20, 1 << 20, 512).is_err());
        assert!(validate_geometry(u64::MAX, 128, 512).is_err());
        assert!(validate_geometry(1 << 50, 1, 1).is_err());
        // a grain size whose product with the table length overflows (found by fuzzing)
        assert!(validate_geometry(4096, 0xffff_ffff_ff1e_0080, 512).is_err());
        assert_eq!(validate_geometry(20480, 128, 512).unwrap(), 1);
    }
}
