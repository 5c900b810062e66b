//! The qcow2 header, its extensions, the snapshot table and the bitmap directory.

use crate::error::{Error, Result};
use crate::io::HostFile;

/// `QFI\xfb`
pub const QCOW_MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// The image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// An external data file holds the guest data.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// The compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// 128-bit L2 entries with subclusters.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit we implement.
pub const INCOMPAT_MASK: u64 = 0x1f;

/// Compatible bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear bit: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bit: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;
/// Autoclear bits we know.
pub const AUTOCLEAR_MASK: u64 = 0x3;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// `crypt_method`: the legacy AES-CBC encryption.
pub const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS, its header in the image file (the crypto extension points at it).
pub const CRYPT_LUKS: u32 = 2;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// qemu's limit on the size of the L1 table in bytes.
pub const MAX_L1_BYTES: u64 = crate::limits::QCOW2_MAX_L1_BYTES;
/// qemu's limit on the size of the refcount table in bytes.
pub const MAX_REFTABLE_BYTES: u64 = crate::limits::QCOW2_MAX_REFTABLE_BYTES;
/// qemu's limit on snapshots.
pub const MAX_SNAPSHOTS: u64 = crate::limits::QCOW2_MAX_SNAPSHOTS;
/// Highest host offset a cluster may have.
pub const MAX_CLUSTER_OFFSET: u64 = (1 << 56) - 1;

/// Compression types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate with a 4 KiB window.
    Zlib,
    /// Zstandard.
    Zstd,
}

impl Compression {
    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (up to 46 bytes).
    pub name: String,
}

/// A header extension we do not interpret (kept to be written back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    /// Type.
    pub kind: u32,
    /// Payload.
    pub data: Vec<u8>,
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the directory in bytes.
    pub directory_size: u64,
    /// Offset of the directory.
    pub directory_offset: u64,
}

/// The parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name, or 0.
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Number of snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible features.
    pub incompatible: u64,
    /// Compatible features.
    pub compatible: u64,
    /// Autoclear features.
    pub autoclear: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Header length.
    pub header_length: u32,
    /// Compression type.
    pub compression: Compression,
    /// Header bytes past the fields we know (kept for rewrites).
    pub unknown_fields: Vec<u8>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Feature name table.
    pub feature_names: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Crypto header extension present.
    pub has_crypto_ext: bool,
    /// The LUKS header's place in the image file (offset, length), from the crypto extension.
    pub crypto_ext: Option<(u64, u64)>,
    /// Unknown extensions, in file order.
    pub unknown_exts: Vec<RawExtension>,
    /// Backing file name.
    pub backing_file: Option<String>,
}

/// The big-endian u32 at `o` of `b`.
pub(crate) fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// The big-endian u64 at `o` of `b`.
pub(crate) fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Checks a table's offset and size the way qemu does (`qcow2_validate_table`).
pub fn validate_table(
    name: &str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
    cluster_size: u64,
) -> Result<()> {
    if entries > max_bytes / entry_len {
        return Err(Error::too_large(format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || offset % cluster_size != 0 {
        return Err(Error::invalid_image(format!("{name} offset invalid")));
    }
    Ok(())
}

impl Header {
    /// Size of the cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Does the image use 128-bit L2 entries?
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }

    /// Reads and validates the header and its extensions.
    pub fn read(file: &HostFile) -> Result<Header> {
        Header::read_mode(file, false)
    }

    /// Reads the header; `check_mode` leaves the snapshot table fields unvalidated (the
    /// check reports them), as qemu does for `qemu-img check`.
    pub fn read_mode(file: &HostFile, check_mode: bool) -> Result<Header> {
        Header::read_impl(file, check_mode, false)
    }

    /// Reads the header of an image being created, whose magic is written last (until then
    /// a crash leaves a file nobody takes for a qcow2 image).
    pub(crate) fn read_unstamped(file: &HostFile) -> Result<Header> {
        Header::read_impl(file, false, true)
    }

    fn read_impl(file: &HostFile, check_mode: bool, unstamped: bool) -> Result<Header> {
        let mut b = [0u8; 112];
        file.read_at(&mut b, 0)?;
        let flen = file.len()?;
        let magic_ok = be32(&b, 0) == QCOW_MAGIC || (unstamped && be32(&b, 0) == 0);
        if flen < 72 || !magic_ok {
            return Err(Error::invalid_image("Image is not in qcow2 format"));
        }
        let version = be32(&b, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(&b, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::invalid_image(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(&b, 8),
            backing_file_size: be32(&b, 16),
            cluster_bits,
            size: be64(&b, 24),
            crypt_method: be32(&b, 32),
            l1_size: be32(&b, 36),
            l1_table_offset: be64(&b, 40),
            refcount_table_offset: be64(&b, 48),
            refcount_table_clusters: be32(&b, 56),
            nb_snapshots: be32(&b, 60),
            snapshots_offset: be64(&b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: Compression::Zlib,
            unknown_fields: Vec::new(),
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            has_crypto_ext: false,
            crypto_ext: None,
            unknown_exts: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            h.incompatible = be64(&b, 72);
            h.compatible = be64(&b, 80);
            h.autoclear = be64(&b, 88);
            h.refcount_order = be32(&b, 96);
            h.header_length = be32(&b, 100);
            if h.header_length < 104 {
                return Err(Error::invalid_image("qcow2 header too short"));
            }
        }
        if h.header_length as u64 > cs {
            return Err(Error::invalid_image("qcow2 header exceeds cluster size"));
        }
        if h.header_length > 112 {
            let mut extra = vec![0u8; h.header_length as usize - 112];
            file.read_at(&mut extra, 112)?;
            h.unknown_fields = extra;
        }
        if h.backing_file_offset > cs {
            return Err(Error::invalid_image("Invalid backing file offset"));
        }
        if h.header_length > 104 {
            h.compression = match b[104] {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                n => {
                    return Err(Error::unsupported(format!(
                        "qcow2: unknown compression type: {n}"
                    )))
                }
            };
        }
        let compression_bit = h.incompatible & INCOMPAT_COMPRESSION != 0;
        if h.compression != Compression::Zlib && !compression_bit {
            return Err(Error::invalid_image(
                "qcow2: Compression type incompatible feature bit must be set",
            ));
        }
        if h.compression == Compression::Zlib && compression_bit {
            return Err(Error::invalid_image(
                "qcow2: Compression type incompatible feature bit must not be set",
            ));
        }
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cs
        };
        // Extensions are needed for the feature names of an unsupported-feature error.
        let ext_result = h.read_extensions(file, ext_end);
        if h.incompatible & !INCOMPAT_MASK != 0 {
            return Err(Error::unsupported(h.unsupported_message()));
        }
        ext_result?;
        if h.extended_l2() && cs / 32 < 512 {
            return Err(Error::invalid_image(format!(
                "Unsupported subcluster size: {}",
                cs / 32
            )));
        }
        if h.refcount_order > 6 {
            return Err(Error::invalid_image(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if h.crypt_method > CRYPT_LUKS {
            return Err(Error::invalid_image(format!(
                "Unsupported encryption method {}",
                h.crypt_method
            )));
        }
        if h.refcount_table_clusters == 0 {
            return Err(Error::invalid_image(
                "Image does not contain a reference count table",
            ));
        }
        validate_table(
            "Reference count table",
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
            cs,
            MAX_REFTABLE_BYTES,
            cs,
        )?;
        if !check_mode {
            validate_table(
                "Snapshot table",
                h.snapshots_offset,
                h.nb_snapshots as u64,
                40,
                40 * MAX_SNAPSHOTS,
                cs,
            )?;
        }
        validate_table(
            "Active L1 table",
            h.l1_table_offset,
            h.l1_size as u64,
            8,
            MAX_L1_BYTES,
            cs,
        )?;
        let l2_entries = cs / if h.extended_l2() { 16 } else { 8 };
        let needed_l1 = h.size.div_ceil(cs).div_ceil(l2_entries);
        if needed_l1 > i32::MAX as u64 {
            return Err(Error::too_large("Image is too big"));
        }
        if (h.l1_size as u64) < needed_l1 {
            return Err(Error::invalid_image("L1 table is too small"));
        }
        for (what, off, len) in [
            (
                "refcount table",
                h.refcount_table_offset,
                h.refcount_table_clusters as u64 * cs,
            ),
            ("L1 table", h.l1_table_offset, h.l1_size as u64 * 8),
        ] {
            if len > 0 && off + len > flen {
                return Err(Error::invalid_image(format!(
                    "{}: {what} at offset {off:#x} (length {len}) is beyond the end of the file ({flen} bytes)",
                    file.display()
                )));
            }
        }
        if h.backing_file_offset != 0 {
            let len = h.backing_file_size as u64;
            if len > 1023.min(cs - h.backing_file_offset) {
                return Err(Error::invalid_image("Backing file name too long"));
            }
            let mut name = vec![0u8; len as usize];
            file.read_at(&mut name, h.backing_file_offset)?;
            h.backing_file = Some(String::from_utf8_lossy(&name).into_owned());
        }
        if h.incompatible & INCOMPAT_DATA_FILE == 0 && h.autoclear & AUTOCLEAR_DATA_FILE_RAW != 0 {
            return Err(Error::invalid_image("data-file-raw requires a data file"));
        }
        Ok(h)
    }

    fn read_extensions(&mut self, file: &HostFile, end: u64) -> Result<()> {
        let mut off = self.header_length as u64;
        loop {
            if off + 8 > end {
                // qemu stops at the end of the area too
                break;
            }
            let mut hd = [0u8; 8];
            file.read_at(&mut hd, off)?;
            let kind = be32(&hd, 0);
            let len = be32(&hd, 4) as u64;
            off += 8;
            if kind == EXT_END {
                break;
            }
            if len > end - off {
                return Err(Error::invalid_image("Header extension too large"));
            }
            let mut data = vec![0u8; len as usize];
            file.read_at(&mut data, off)?;
            off += len.div_ceil(8) * 8;
            match kind {
                EXT_BACKING_FORMAT => {
                    if len > 1023 {
                        return Err(Error::invalid_image(format!(
                            "ERROR: ext_backing_format: len={len} too large"
                        )));
                    }
                    self.backing_format = Some(cstr(&data));
                }
                EXT_FEATURE_TABLE => {
                    // as qemu reads it: 48-byte entries, a short last one padded with
                    // zeroes, up to the first without a name
                    let mut padded = data.clone();
                    padded.resize(data.len().div_ceil(48) * 48, 0);
                    for e in padded.chunks_exact(48) {
                        if e[2] == 0 {
                            break;
                        }
                        self.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: cstr(&e[2..48]),
                        });
                    }
                }
                EXT_DATA_FILE => {
                    self.data_file = Some(cstr(&data));
                }
                EXT_CRYPTO => {
                    self.has_crypto_ext = true;
                    if data.len() >= 16 {
                        self.crypto_ext = Some((be64(&data, 0), be64(&data, 8)));
                    }
                    self.unknown_exts.push(RawExtension { kind, data });
                }
                EXT_BITMAPS => {
                    if len != 24 {
                        return Err(Error::invalid_image(
                            "bitmaps_ext: Invalid extension length",
                        ));
                    }
                    if self.autoclear & AUTOCLEAR_BITMAPS == 0 {
                        // qemu ignores (and later drops) an inconsistent bitmaps extension
                        self.unknown_exts.push(RawExtension { kind, data });
                        continue;
                    }
                    let nb = be32(&data, 0);
                    let reserved = be32(&data, 4);
                    let ds = be64(&data, 8);
                    let doff = be64(&data, 16);
                    if reserved != 0 {
                        return Err(Error::invalid_image(
                            "bitmaps_ext: Reserved field is not zero",
                        ));
                    }
                    if nb > 65535 {
                        return Err(Error::invalid_image(format!(
                            "bitmaps_ext: File {} has {nb} bitmaps, exceeding the QEMU supported maximum of 65535",
                            file.display()
                        )));
                    }
                    if nb == 0 {
                        return Err(Error::invalid_image(
                            "found bitmaps extension with zero bitmaps",
                        ));
                    }
                    if doff % self.cluster_size() != 0 {
                        return Err(Error::invalid_image(
                            "bitmaps_ext: invalid bitmap directory offset",
                        ));
                    }
                    if ds > 1024 * 65535 {
                        return Err(Error::invalid_image(
                            "bitmaps_ext: bitmap directory size is too big",
                        ));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: nb,
                        directory_size: ds,
                        directory_offset: doff,
                    });
                }
                _ => self.unknown_exts.push(RawExtension { kind, data }),
            }
        }
        Ok(())
    }

    /// qemu's message for unknown incompatible features.
    pub fn unsupported_message(&self) -> String {
        let mut mask = self.incompatible & !INCOMPAT_MASK;
        let mut parts = Vec::new();
        for f in &self.feature_names {
            if f.kind == 0 && f.bit < 64 && mask & (1u64 << f.bit) != 0 {
                parts.push(f.name.chars().take(46).collect::<String>());
                mask &= !(1u64 << f.bit);
            }
        }
        if mask != 0 {
            parts.push(format!("Unknown incompatible feature: {mask:x}"));
        }
        format!("Unsupported qcow2 feature(s): {}", parts.join(", "))
    }

    /// Serializes the header and its extensions into one cluster-sized buffer.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
        let put64 = |b: &mut [u8], o: usize, v: u64| b[o..o + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut b, 0, QCOW_MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        let mut off = 72usize;
        if self.version >= 3 {
            put64(&mut b, 72, self.incompatible);
            put64(&mut b, 80, self.compatible);
            put64(&mut b, 88, self.autoclear);
            put32(&mut b, 96, self.refcount_order);
            let hl = 112 + self.unknown_fields.len();
            put32(&mut b, 100, hl as u32);
            b[104] = match self.compression {
                Compression::Zlib => 0,
                Compression::Zstd => 1,
            };
            b[112..hl].copy_from_slice(&self.unknown_fields);
            off = hl;
        }
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(f) = &self.backing_format {
            exts.push((EXT_BACKING_FORMAT, f.as_bytes().to_vec()));
        }
        if let Some(d) = &self.data_file {
            exts.push((EXT_DATA_FILE, d.as_bytes().to_vec()));
        }
        // in qemu's order: backing format, data file, crypto header, feature table, bitmaps,
        // then the extensions it does not know
        for e in self.unknown_exts.iter().filter(|e| e.kind == EXT_CRYPTO) {
            exts.push((e.kind, e.data.clone()));
        }
        if self.version >= 3 && !self.feature_names.is_empty() {
            let mut d = Vec::new();
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.as_bytes();
                let l = n.len().min(46);
                e[2..2 + l].copy_from_slice(&n[..l]);
                d.extend_from_slice(&e);
            }
            exts.push((EXT_FEATURE_TABLE, d));
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = vec![0u8; 24];
            d[0..4].copy_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d[8..16].copy_from_slice(&bm.directory_size.to_be_bytes());
            d[16..24].copy_from_slice(&bm.directory_offset.to_be_bytes());
            exts.push((EXT_BITMAPS, d));
        }
        for e in self.unknown_exts.iter().filter(|e| e.kind != EXT_CRYPTO) {
            exts.push((e.kind, e.data.clone()));
        }
        for (kind, data) in exts {
            let need = 8 + data.len().div_ceil(8) * 8;
            if off + need + 8 > cs {
                return Err(Error::invalid_arg(
                    "Header extensions do not fit in a cluster",
                ));
            }
            put32(&mut b, off, kind);
            put32(&mut b, off + 4, data.len() as u32);
            b[off + 8..off + 8 + data.len()].copy_from_slice(&data);
            off += need;
        }
        off += 8; // end marker (zeroes)
        if let Some(name) = &self.backing_file {
            let n = name.as_bytes();
            if n.len() > 1023 || off + n.len() > cs {
                return Err(Error::invalid_arg("Backing file name too long"));
            }
            put64(&mut b, 8, off as u64);
            put32(&mut b, 16, n.len() as u32);
            b[off..off + n.len()].copy_from_slice(n);
        }
        Ok(b)
    }

    /// The feature name table qemu writes into new v3 images.
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind: u8, bit: u8, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

/// A string as C reads it: up to the first NUL (qemu keeps snapshot IDs and names so).
pub(crate) fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One snapshot table entry.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of the snapshot's L1 table.
    pub l1_size: u32,
    /// ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds.
    pub date_sec: u32,
    /// Nanoseconds.
    pub date_nsec: u32,
    /// Guest clock.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Guest size at snapshot time, if recorded.
    pub disk_size: Option<u64>,
    /// icount, if recorded.
    pub icount: Option<u64>,
}

/// Reads the snapshot table.
pub fn read_snapshots(file: &HostFile, h: &Header) -> Result<Vec<Snapshot>> {
    let mut out = Vec::new();
    if h.nb_snapshots == 0 {
        return Ok(out);
    }
    let mut off = h.snapshots_offset;
    let limit = 1024 * MAX_SNAPSHOTS;
    // what lies beyond the end of the file reads as zeroes, as in qemu (the table's size is
    // bounded by the limits below)
    for i in 0..h.nb_snapshots {
        let mut e = [0u8; 40];
        file.read_at(&mut e, off)?;
        let id_len = u16::from_be_bytes([e[12], e[13]]) as u64;
        let name_len = u16::from_be_bytes([e[14], e[15]]) as u64;
        let extra_len = be32(&e, 36) as u64;
        if extra_len > 1024 {
            return Err(Error::too_large(snapshot_extra_message(i)));
        }
        if off + 40 + extra_len + id_len + name_len - h.snapshots_offset > limit {
            return Err(Error::too_large(snapshot_table_message(h.nb_snapshots - i)));
        }
        let mut extra = vec![0u8; extra_len as usize];
        file.read_at(&mut extra, off + 40)?;
        let mut strs = vec![0u8; (id_len + name_len) as usize];
        file.read_at(&mut strs, off + 40 + extra_len)?;
        // their L1 tables are checked where they are used, as qemu does: an image with one
        // broken snapshot still opens
        let l1_table_offset = be64(&e, 0);
        let l1_size = be32(&e, 8);
        let mut s = Snapshot {
            l1_table_offset,
            l1_size,
            id: cstr(&strs[..id_len as usize]),
            name: cstr(&strs[id_len as usize..]),
            date_sec: be32(&e, 16),
            date_nsec: be32(&e, 20),
            vm_clock_nsec: be64(&e, 24),
            vm_state_size: be32(&e, 32) as u64,
            disk_size: None,
            icount: None,
        };
        if extra_len >= 8 {
            s.vm_state_size = be64(&extra, 0);
        }
        if extra_len >= 16 {
            s.disk_size = Some(be64(&extra, 8));
        }
        if extra_len >= 24 {
            let ic = be64(&extra, 16);
            if ic != u64::MAX {
                s.icount = Some(ic);
            }
        }
        off += (40 + extra_len + id_len + name_len).div_ceil(8) * 8;
        out.push(s);
    }
    Ok(out)
}

/// qemu's message for a snapshot table entry with more than 1 KiB of extra data.
pub(crate) fn snapshot_extra_message(i: u32) -> String {
    format!(
        "Too much extra metadata in snapshot table entry {i}\nYou can force-remove this extra metadata with qemu-img check -r all"
    )
}

/// qemu's message for a snapshot table reaching past 64 MiB (`overhanging` entries).
pub(crate) fn snapshot_table_message(overhanging: u32) -> String {
    format!(
        "Snapshot table is too big\nYou can force-remove all {overhanging} overhanging snapshots with qemu-img check -r all"
    )
}

/// A persistent bitmap as `info` reports it.
#[derive(Debug, Clone)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Granularity in bytes.
    pub granularity: u64,
    /// Flags word.
    pub flags: u32,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
}

/// Reads the bitmap directory.
pub fn read_bitmaps(file: &HostFile, ext: &BitmapsExt) -> Result<(Vec<BitmapInfo>, Vec<u8>)> {
    let flen = file.len()?;
    if ext.directory_offset + ext.directory_size > flen {
        return Err(Error::invalid_image(
            "bitmaps_ext: bitmap directory is beyond the end of the file",
        ));
    }
    let mut dir = vec![0u8; ext.directory_size as usize];
    file.read_at(&mut dir, ext.directory_offset)?;
    let mut out = Vec::new();
    let mut off = 0usize;
    for _ in 0..ext.nb_bitmaps {
        if off + 24 > dir.len() {
            return Err(Error::invalid_image("Bitmap directory is corrupted"));
        }
        let e = &dir[off..];
        let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
        let extra = be32(e, 20) as usize;
        let total = 24 + extra + name_size;
        if off + total > dir.len() || e[17] > 63 {
            return Err(Error::invalid_image("Bitmap directory is corrupted"));
        }
        out.push(BitmapInfo {
            table_offset: be64(e, 0),
            table_size: be32(e, 8),
            flags: be32(e, 12),
            granularity: 1u64 << e[17],
            name: String::from_utf8_lossy(&e[24 + extra..24 + extra + name_size]).into_owned(),
        });
        off += total.div_ceil(8) * 8;
    }
    Ok((out, dir))
}
