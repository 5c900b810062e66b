//! The VDI pre-header and header (version 1.1), parsed and validated.
//!
//! Layout of the first sector (all integers little endian):
//!
//! | offset | field                                   |
//! |--------|-----------------------------------------|
//! | 0x000  | text (64 bytes, for eyes only)           |
//! | 0x040  | signature 0xbeda107f                     |
//! | 0x044  | version (major << 16 \| minor), 1.1      |
//! | 0x048  | header size (counted from 0x48)          |
//! | 0x04c  | image type (1 dynamic, 2 static, 3 undo, 4 diff) |
//! | 0x050  | image flags                              |
//! | 0x054  | description (256 bytes)                  |
//! | 0x154  | block map offset                         |
//! | 0x158  | data offset                              |
//! | 0x15c  | legacy geometry: cylinders, heads, sectors, sector size |
//! | 0x16c  | unused                                   |
//! | 0x170  | disk size (u64)                          |
//! | 0x178  | block size                               |
//! | 0x17c  | block extra (bytes before each block's data) |
//! | 0x180  | blocks in image                          |
//! | 0x184  | blocks allocated                         |
//! | 0x188  | UUIDs: image, last modification, link (parent image), parent modification |
//! | 0x1c8  | LCHS geometry (only when the header size is at least 0x190) |

use std::fmt;

use crate::error::{Error, Result};

/// Size of a sector; VDI offsets and sizes are in bytes but aligned to it.
pub const SECTOR: u64 = 512;
/// The signature at offset 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// The standard block size (VirtualBox and qemu).
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Header size qemu writes (VirtualBox's own header is 0x190 with the LCHS geometry).
pub const HEADER_SIZE_V1_1: u32 = 0x180;
/// Header size with the LCHS geometry.
pub const HEADER_SIZE_V1_1_PLUS: u32 = 0x190;
/// Where the header (after the pre-header) starts.
pub const PRE_HEADER_SIZE: u32 = 0x48;
/// The text qemu writes (VirtualBox writes its own; the value does not matter).
pub const QEMU_TEXT: &str = "<<< QEMU VM Virtual Disk Image >>>\n";

/// Block map entry: never allocated (reads from the parent, else zero).
pub const BLOCK_FREE: u32 = 0xffff_ffff;
/// Block map entry: reads as zero.
pub const BLOCK_ZERO: u32 = 0xffff_fffe;

/// The largest block count (qemu's limit: the map must stay below 2 GiB).
pub const BLOCKS_IN_IMAGE_MAX: u32 = ((1u64 << 31) - SECTOR) as u32 / 4;
/// The largest disk size (qemu's limit: the block count limit times 1 MiB).
pub const DISK_SIZE_MAX: u64 = BLOCKS_IN_IMAGE_MAX as u64 * DEFAULT_BLOCK_SIZE as u64;
/// The largest block size accepted when reading.
pub const BLOCK_SIZE_MAX: u32 = 1 << 30;

/// Is a block map entry a data block?
pub fn is_allocated(entry: u32) -> bool {
    entry < BLOCK_ZERO
}

/// Image types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// Dynamically growing (1).
    Dynamic,
    /// Fixed size, all blocks preallocated (2).
    Static,
    /// Undo image (3).
    Undo,
    /// Differencing image (4).
    Diff,
}

impl ImageType {
    fn from_u32(v: u32) -> Option<ImageType> {
        Some(match v {
            1 => ImageType::Dynamic,
            2 => ImageType::Static,
            3 => ImageType::Undo,
            4 => ImageType::Diff,
            _ => return None,
        })
    }
    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            ImageType::Dynamic => 1,
            ImageType::Static => 2,
            ImageType::Undo => 3,
            ImageType::Diff => 4,
        }
    }
}

/// A UUID as stored in VDI: the Microsoft GUID layout (first three fields little endian).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Uuid(pub [u8; 16]);

impl Uuid {
    /// The nil UUID.
    pub const NIL: Uuid = Uuid([0; 16]);

    /// Is it all zero?
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A fresh random (version 4) UUID, from /dev/urandom, in on-disk layout.
    pub fn random() -> Result<Uuid> {
        use std::io::Read;
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .map_err(|e| Error::io(e, "/dev/urandom"))?;
        // RFC 4122 version 4 and variant bits, in big-endian (text) order ...
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        // ... then stored as a GUID: the first three fields little endian, like qemu does.
        Ok(Uuid::from_text_order(b))
    }

    /// Converts from text (big-endian) byte order to the on-disk layout.
    pub fn from_text_order(b: [u8; 16]) -> Uuid {
        let mut d = b;
        d[0..4].reverse();
        d[4..6].reverse();
        d[6..8].reverse();
        Uuid(d)
    }

    /// The bytes in text (big-endian) order.
    pub fn text_order(&self) -> [u8; 16] {
        let mut d = self.0;
        d[0..4].reverse();
        d[4..6].reverse();
        d[6..8].reverse();
        d
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.text_order();
        for (i, x) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A disk geometry as VDI stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Bytes per sector.
    pub sector_size: u32,
}

/// The parsed header. `raw` keeps the first sector so rewriting it preserves unknown bytes.
#[derive(Debug, Clone)]
pub struct Header {
    /// The first sector as read (or built).
    pub raw: [u8; 512],
    /// Header size from the file (counted from offset 0x48).
    pub header_size: u32,
    /// Image type (raw value).
    pub image_type_raw: u32,
    /// Image flags.
    pub image_flags: u32,
    /// Block map offset.
    pub offset_bmap: u32,
    /// Data offset.
    pub offset_data: u32,
    /// Legacy (physical) geometry; its sector size must be 512.
    pub legacy_geometry: Geometry,
    /// LCHS geometry (header size >= 0x190).
    pub lchs_geometry: Option<Geometry>,
    /// Disk size as recorded (not rounded).
    pub disk_size: u64,
    /// Block size (a power of two).
    pub block_size: u32,
    /// Extra bytes stored before each block's data.
    pub block_extra: u32,
    /// Entries in the block map.
    pub blocks_in_image: u32,
    /// Allocated blocks as recorded.
    pub blocks_allocated: u32,
    /// Image UUID.
    pub uuid_image: Uuid,
    /// UUID of the last modification (qemu: last snapshot).
    pub uuid_last_snap: Uuid,
    /// Differencing images: UUID of the parent image.
    pub uuid_link: Uuid,
    /// Differencing images: UUID of the parent's last modification.
    pub uuid_parent: Uuid,
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
fn uuid_at(b: &[u8], off: usize) -> Uuid {
    Uuid(b[off..off + 16].try_into().unwrap())
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Is this the start of a VDI image (signature at 0x40)?
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 512 && le32(head, 0x40) == SIGNATURE
}

impl Header {
    /// Parses and validates the first 512 bytes (and, for LCHS, bytes up to 0x1d8) against the
    /// file size. Error messages follow qemu's where qemu has one.
    pub fn parse(raw: &[u8; 512], file_len: u64) -> Result<Header> {
        let b = &raw[..];
        let signature = le32(b, 0x40);
        let version = le32(b, 0x44);
        let disk_size = le64(b, 0x170);
        if disk_size > DISK_SIZE_MAX {
            return Err(Error::unsupported(format!(
                "Unsupported VDI image size (size is {disk_size:#x}, max supported is {DISK_SIZE_MAX:#x})"
            )));
        }
        if signature != SIGNATURE {
            return Err(Error::invalid_image(format!(
                "Image not in VDI format (bad signature {signature:08x})"
            )));
        }
        if version != VERSION_1_1 {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (version {}.{})",
                version >> 16,
                version & 0xffff
            )));
        }
        let header_size = le32(b, 0x48);
        let image_type_raw = le32(b, 0x4c);
        let offset_bmap = le32(b, 0x154);
        let offset_data = le32(b, 0x158);
        let legacy_geometry = Geometry {
            cylinders: le32(b, 0x15c),
            heads: le32(b, 0x160),
            sectors: le32(b, 0x164),
            sector_size: le32(b, 0x168),
        };
        let block_size = le32(b, 0x178);
        let block_extra = le32(b, 0x17c);
        let blocks_in_image = le32(b, 0x180);
        if offset_bmap as u64 % SECTOR != 0 {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (unaligned block map offset {offset_bmap:#x})"
            )));
        }
        if offset_data as u64 % SECTOR != 0 {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (unaligned data offset {offset_data:#x})"
            )));
        }
        if legacy_geometry.sector_size as u64 != SECTOR {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (sector size {} is not 512)",
                legacy_geometry.sector_size
            )));
        }
        if !block_size.is_power_of_two()
            || (block_size as u64) < SECTOR
            || block_size > BLOCK_SIZE_MAX
        {
            // in qemu's words (qemu takes 1 MiB only; diskit any power of two up to 1 GiB)
            return Err(Error::unsupported(format!(
                "unsupported VDI image (block size {block_size} is not 1048576)"
            )));
        }
        if block_extra as u64 % SECTOR != 0 || block_extra > BLOCK_SIZE_MAX {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (block extra size {block_extra} is not a multiple of 512 up to {BLOCK_SIZE_MAX})"
            )));
        }
        let rounded = disk_size.div_ceil(SECTOR) * SECTOR;
        let room = blocks_in_image as u64 * block_size as u64;
        if rounded > room {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (disk size {rounded}, image bitmap has room for {room})"
            )));
        }
        if blocks_in_image > BLOCKS_IN_IMAGE_MAX {
            return Err(Error::unsupported(format!(
                "unsupported VDI image (too many blocks {blocks_in_image}, max is {BLOCKS_IN_IMAGE_MAX})"
            )));
        }
        let image_type = ImageType::from_u32(image_type_raw).ok_or_else(|| {
            Error::unsupported(format!(
                "unsupported VDI image (image type {image_type_raw})"
            ))
        })?;
        let _ = image_type;
        // The header must fit before the block map, which must fit before the data.
        let header_end = PRE_HEADER_SIZE as u64 + header_size as u64;
        if header_size < HEADER_SIZE_V1_1 || header_end > offset_bmap as u64 {
            return Err(Error::invalid_image(format!(
                "invalid VDI header size {header_size:#x} (must be at least {HEADER_SIZE_V1_1:#x} and end before the block map at {offset_bmap:#x})"
            )));
        }
        let map_end = offset_bmap as u64 + blocks_in_image as u64 * 4;
        if map_end > offset_data as u64 {
            return Err(Error::invalid_image(format!(
                "VDI block map ({} entries at {offset_bmap:#x}) overlaps the data area at {offset_data:#x}",
                blocks_in_image
            )));
        }
        if map_end > file_len {
            return Err(Error::invalid_image(format!(
                "VDI block map ({} entries at {offset_bmap:#x}) extends past the end of the file (size {file_len})",
                blocks_in_image
            )));
        }
        let lchs_geometry = if header_size >= HEADER_SIZE_V1_1_PLUS {
            Some(Geometry {
                cylinders: le32(b, 0x1c8),
                heads: le32(b, 0x1cc),
                sectors: le32(b, 0x1d0),
                sector_size: le32(b, 0x1d4),
            })
        } else {
            None
        };
        Ok(Header {
            raw: *raw,
            header_size,
            image_type_raw,
            image_flags: le32(b, 0x50),
            offset_bmap,
            offset_data,
            legacy_geometry,
            lchs_geometry,
            disk_size,
            block_size,
            block_extra,
            blocks_in_image,
            blocks_allocated: le32(b, 0x184),
            uuid_image: uuid_at(b, 0x188),
            uuid_last_snap: uuid_at(b, 0x198),
            uuid_link: uuid_at(b, 0x1a8),
            uuid_parent: uuid_at(b, 0x1b8),
        })
    }

    /// A new header the way qemu-img creates one.
    pub fn new_qemu(disk_size: u64, block_size: u32, blocks: u32, fixed: bool) -> Result<Header> {
        let bmap_size = (blocks as u64 * 4).div_ceil(SECTOR) * SECTOR;
        let mut raw = [0u8; 512];
        raw[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT.as_bytes());
        put32(&mut raw, 0x40, SIGNATURE);
        put32(&mut raw, 0x44, VERSION_1_1);
        let mut h = Header {
            raw,
            header_size: HEADER_SIZE_V1_1,
            image_type_raw: if fixed { 2 } else { 1 },
            image_flags: 0,
            offset_bmap: 0x200,
            offset_data: (0x200 + bmap_size) as u32,
            legacy_geometry: Geometry {
                sector_size: SECTOR as u32,
                ..Geometry::default()
            },
            lchs_geometry: None,
            disk_size,
            block_size,
            block_extra: 0,
            blocks_in_image: blocks,
            blocks_allocated: if fixed { blocks } else { 0 },
            uuid_image: Uuid::random()?,
            uuid_last_snap: Uuid::random()?,
            uuid_link: Uuid::NIL,
            uuid_parent: Uuid::NIL,
        };
        h.store();
        Ok(h)
    }

    /// Writes the fields back into `raw` (bytes this module does not know stay as they were).
    pub fn store(&mut self) {
        let b = &mut self.raw;
        put32(b, 0x48, self.header_size);
        put32(b, 0x4c, self.image_type_raw);
        put32(b, 0x50, self.image_flags);
        put32(b, 0x154, self.offset_bmap);
        put32(b, 0x158, self.offset_data);
        put32(b, 0x15c, self.legacy_geometry.cylinders);
        put32(b, 0x160, self.legacy_geometry.heads);
        put32(b, 0x164, self.legacy_geometry.sectors);
        put32(b, 0x168, self.legacy_geometry.sector_size);
        put64(b, 0x170, self.disk_size);
        put32(b, 0x178, self.block_size);
        put32(b, 0x17c, self.block_extra);
        put32(b, 0x180, self.blocks_in_image);
        put32(b, 0x184, self.blocks_allocated);
        b[0x188..0x198].copy_from_slice(&self.uuid_image.0);
        b[0x198..0x1a8].copy_from_slice(&self.uuid_last_snap.0);
        b[0x1a8..0x1b8].copy_from_slice(&self.uuid_link.0);
        b[0x1b8..0x1c8].copy_from_slice(&self.uuid_parent.0);
        if let Some(g) = self.lchs_geometry {
            put32(b, 0x1c8, g.cylinders);
            put32(b, 0x1cc, g.heads);
            put32(b, 0x1d0, g.sectors);
            put32(b, 0x1d4, g.sector_size);
        }
    }

    /// The image type.
    pub fn image_type(&self) -> ImageType {
        ImageType::from_u32(self.image_type_raw).unwrap_or(ImageType::Dynamic)
    }

    /// The text of the pre-header, up to the first NUL.
    pub fn text(&self) -> String {
        cstr(&self.raw[..0x40])
    }

    /// The description (comment), up to the first NUL.
    pub fn description(&self) -> String {
        cstr(&self.raw[0x54..0x154])
    }

    /// The guest size: the disk size rounded up to a sector, as qemu does.
    pub fn virtual_size(&self) -> u64 {
        self.disk_size.div_ceil(SECTOR) * SECTOR
    }

    /// Bytes one block takes in the file (extra data plus block data).
    pub fn slot_size(&self) -> u64 {
        self.block_size as u64 + self.block_extra as u64
    }

    /// Host offset of the data of physical block `slot`.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.offset_data as u64 + slot as u64 * self.slot_size() + self.block_extra as u64
    }

    /// Is this a differencing image (a parent is named)?
    pub fn has_parent(&self) -> bool {
        !self.uuid_link.is_nil() || !self.uuid_parent.is_nil()
    }
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> [u8; 512] {
        let mut h = Header::new_qemu(3 << 20, DEFAULT_BLOCK_SIZE, 3, false).unwrap();
        h.store();
        h.raw
    }

    #[test]
    fn roundtrip() {
        let raw = sample();
        let h = Header::parse(&raw, 1024).unwrap();
        assert_eq!(h.disk_size, 3 << 20);
        assert_eq!(h.blocks_in_image, 3);
        assert_eq!(h.offset_data, 0x400);
        assert_eq!(h.text(), QEMU_TEXT);
        assert!(!h.uuid_image.is_nil());
        assert_eq!(h.uuid_image.to_string().as_bytes()[14], b'4');
        assert!(!h.has_parent());
    }

    #[test]
    fn bad_fields() {
        let mut raw = sample();
        raw[0x40] = 0;
        assert!(Header::parse(&raw, 1024)
            .unwrap_err()
            .message()
            .contains("bad signature"));
        let mut raw = sample();
        put32(&mut raw, 0x48, 0x4000_0000);
        assert!(Header::parse(&raw, 1024)
            .unwrap_err()
            .message()
            .contains("header size"));
        let mut raw = sample();
        put32(&mut raw, 0x178, 3000);
        assert!(Header::parse(&raw, 1024).is_err());
        let raw = sample();
        assert!(Header::parse(&raw, 0x205)
            .unwrap_err()
            .message()
            .contains("past the end"));
    }

    #[test]
    fn uuid_text() {
        let u = Uuid::from_text_order([
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e,
            0x0f, 0x10,
        ]);
        assert_eq!(u.0[0], 0x04);
        assert_eq!(u.to_string(), "01020304-0506-0708-090a-0b0c0d0e0f10");
    }
}
