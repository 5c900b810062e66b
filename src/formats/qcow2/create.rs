//! `qemu-img create -f qcow2`: options, their summary line and image creation.

use super::header::{self, Compression, Header};
use super::{Qcow2, OFLAG_COPIED};
use crate::error::{Error, Result};
use crate::formats::options::{parse_bool, parse_size};
use crate::formats::{BlockDriver, CreateOpts, Format, OpenCtx, OpenOptions, OptDesc, OptKind};
use crate::io::{HostFile, HostOpenOptions};

const fn opt(name: &'static str, kind: OptKind, help: &'static str) -> OptDesc {
    OptDesc { name, kind, help }
}

/// `-o` options of qcow2, in the order `-o help` lists them.
pub static CREATE_OPTS: &[OptDesc] = &[
    opt("backing_file", OptKind::Str, "File name of a base image"),
    opt(
        "backing_fmt",
        OptKind::Str,
        "Image format of the base image",
    ),
    opt("cluster_size", OptKind::Size, "qcow2 cluster size"),
    opt(
        "compat",
        OptKind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
    ),
    opt(
        "compression_type",
        OptKind::Str,
        "Compression method used for image cluster compression",
    ),
    opt(
        "data_file",
        OptKind::Str,
        "File name of an external data file",
    ),
    opt(
        "data_file_raw",
        OptKind::Bool,
        "The external data file must stay valid as a raw image",
    ),
    opt(
        "encrypt.cipher-alg",
        OptKind::Str,
        "Name of encryption cipher algorithm",
    ),
    opt(
        "encrypt.cipher-mode",
        OptKind::Str,
        "Name of encryption cipher mode",
    ),
    opt(
        "encrypt.format",
        OptKind::Str,
        "Encrypt the image, format choices: 'aes', 'luks'",
    ),
    opt(
        "encrypt.hash-alg",
        OptKind::Str,
        "Name of encryption hash algorithm",
    ),
    opt(
        "encrypt.iter-time",
        OptKind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "encrypt.ivgen-alg",
        OptKind::Str,
        "Name of IV generator algorithm",
    ),
    opt(
        "encrypt.ivgen-hash-alg",
        OptKind::Str,
        "Name of IV generator hash algorithm",
    ),
    opt(
        "encrypt.key-secret",
        OptKind::Str,
        "ID of secret providing qcow AES key or LUKS passphrase",
    ),
    opt(
        "encryption",
        OptKind::Bool,
        "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)",
    ),
    opt("extended_l2", OptKind::Bool, "Extended L2 tables"),
    opt("lazy_refcounts", OptKind::Bool, "Postpone refcount updates"),
    opt(
        "preallocation",
        OptKind::Str,
        "Preallocation mode (allowed values: off, metadata, falloc, full)",
    ),
    opt(
        "refcount_bits",
        OptKind::Number,
        "Width of a reference count entry in bits",
    ),
    opt("size", OptKind::Size, "Virtual disk size"),
];

/// Options of the protocol (file) layer that qemu-img accepts along with qcow2's.
static PROTOCOL_EXTRA: &[&str] = &["nocow", "extent_size_hint"];

/// qemu's option list order (the order of the `Formatting` line), with default values.
static PRINT_ORDER: &[(&str, Option<&str>)] = &[
    ("encryption", None),
    ("encrypt.format", None),
    ("encrypt.key-secret", None),
    ("encrypt.cipher-alg", None),
    ("encrypt.cipher-mode", None),
    ("encrypt.ivgen-alg", None),
    ("encrypt.ivgen-hash-alg", None),
    ("encrypt.hash-alg", None),
    ("encrypt.iter-time", None),
    ("cluster_size", Some("65536")),
    ("extended_l2", Some("off")),
    ("preallocation", None),
    ("compression_type", Some("zlib")),
    ("size", None),
    ("compat", None),
    ("backing_file", None),
    ("backing_fmt", None),
    ("data_file", None),
    ("data_file_raw", None),
    ("lazy_refcounts", Some("off")),
    ("refcount_bits", Some("16")),
];

fn kind_of(name: &str) -> OptKind {
    CREATE_OPTS
        .iter()
        .find(|d| d.name == name)
        .map(|d| d.kind)
        .unwrap_or(OptKind::Str)
}

/// The `fmt=qcow2 key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(opts: &CreateOpts) -> String {
    let mut s = String::from("fmt=qcow2");
    for &(name, def) in PRINT_ORDER {
        let given = opts.get(name);
        let Some(v) = given.or(def) else { continue };
        let kind = kind_of(name);
        let text = match (kind, given) {
            (OptKind::Str, _) => v.replace(',', ",,"),
            (OptKind::Size, Some(v)) => parse_size(v)
                .map(|n| n.to_string())
                .unwrap_or_else(|_| v.to_string()),
            // printed signed, as qemu-img does (-1 stays -1)
            (OptKind::Number, Some(v)) => crate::formats::options::parse_number(name, v)
                .map(|n| (n as i64).to_string())
                .unwrap_or_else(|_| v.to_string()),
            _ => v.to_string(),
        };
        s.push_str(&format!(" {name}={text}"));
    }
    s
}

/// Preallocation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prealloc {
    /// None.
    Off,
    /// L2 tables and data cluster offsets.
    Metadata,
    /// Metadata, and the file space reserved.
    Falloc,
    /// Metadata, and zeroes written.
    Full,
}

/// Everything `create` needs, validated.
#[derive(Debug, Clone)]
pub struct Qcow2CreateParams {
    /// Guest size.
    pub size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Cluster size.
    pub cluster_size: u64,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Refcount width.
    pub refcount_bits: u64,
    /// Compression type.
    pub compression: Compression,
    /// Preallocation.
    pub prealloc: Prealloc,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format.
    pub backing_fmt: Option<String>,
    /// External data file.
    pub data_file: Option<String>,
    /// data_file_raw.
    pub data_file_raw: bool,
}

fn type_check(opts: &CreateOpts, filename: &str) -> Result<()> {
    for (k, v) in opts.iter() {
        if PROTOCOL_EXTRA.contains(&k) {
            continue;
        }
        let Some(d) = CREATE_OPTS.iter().find(|d| d.name == k) else {
            return Err(Error::invalid_arg(format!(
                "{filename}: Invalid parameter '{k}'"
            )));
        };
        match d.kind {
            OptKind::Bool => {
                parse_bool(k, v).map_err(|e| e.context(filename))?;
            }
            OptKind::Size => {
                opts.get_size(k).map_err(|e| e.context(filename))?;
            }
            OptKind::Number => {
                crate::formats::options::parse_number(k, v).map_err(|e| e.context(filename))?;
            }
            OptKind::Str => {}
        }
    }
    Ok(())
}

/// What qemu-img does before printing `Formatting ...`: checks option types, requires a
/// backing format, and takes the size from the backing file when `size` is absent.
/// Returns the options with `size` filled in.
pub fn resolve_create_opts(filename: &str, opts: &CreateOpts) -> Result<CreateOpts> {
    type_check(opts, filename)?;
    let mut out = opts.clone();
    let skip =
        opts.unsafe_backing() && opts.get("size").is_some() && opts.get("backing_fmt").is_some();
    if let (Some(b), false) = (opts.get("backing_file"), skip) {
        let full = crate::formats::resolve_backing_name(filename, b);
        let fmt = opts.get("backing_fmt");
        let format = match fmt {
            Some(f) => Some(Format::from_name(f).map_err(|e| e.context(filename))?),
            None => None,
        };
        let img = crate::formats::open(
            &full,
            &OpenOptions {
                format,
                no_backing: true,
                force_share: true,
                ..OpenOptions::default()
            },
        )
        .map_err(|e| {
            let mut msg = e.message().to_string();
            // the generic open prefixes "Could not open 'x': " to the host error, which
            // already says so; qemu-img create prints it once
            let prefix = format!("Could not open '{full}': ");
            if msg.starts_with(&prefix) && msg[prefix.len()..].starts_with(&prefix) {
                msg = msg[prefix.len()..].to_string();
            }
            e.with_message(format!("{filename}: {msg}\nCould not open backing image."))
        })?;
        if fmt.is_none() {
            return Err(Error::invalid_arg(format!(
                "{filename}: Backing file specified without backing format\nDetected format of {}.",
                img.format()
            )));
        }
        if opts.get("size").is_none() {
            out.set("size", &img.virtual_size().to_string());
        }
    }
    Ok(out)
}

/// Validates the options in qemu's order with qemu's messages (without the filename).
pub fn params(opts: &CreateOpts) -> Result<Qcow2CreateParams> {
    let size = opts.get_size("size")?;
    let compat = opts.get("compat");
    let version = match compat {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => {
            return Err(Error::invalid_arg(format!(
                "Parameter 'version' does not accept value '{other}'"
            )))
        }
    };
    let compression = match opts.get("compression_type") {
        None | Some("zlib") => Compression::Zlib,
        Some("zstd") => Compression::Zstd,
        Some(other) => {
            return Err(Error::invalid_arg(format!(
                "Parameter 'compression-type' does not accept value '{other}'"
            )))
        }
    };
    let prealloc = match opts.get("preallocation") {
        None | Some("off") => Prealloc::Off,
        Some("metadata") => Prealloc::Metadata,
        Some("falloc") => Prealloc::Falloc,
        Some("full") => Prealloc::Full,
        Some(other) => {
            return Err(Error::invalid_arg(format!(
                "Parameter 'preallocation' does not accept value '{other}'"
            )))
        }
    };
    let encrypt =
        opts.get_bool("encryption")?.unwrap_or(false) || opts.get("encrypt.format").is_some();
    if encrypt {
        // diskit has no encryption (nor QEMU's secret objects): fail as qemu-img does without
        // a `--object secret` for the key
        let format = opts.get("encrypt.format").unwrap_or("aes");
        if format != "luks" && format != "aes" {
            return Err(Error::invalid_arg(format!(
                "Parameter 'format' does not accept value '{format}'"
            )));
        }
        return Err(match opts.get("encrypt.key-secret") {
            None => Error::invalid_arg("Parameter 'encrypt.key-secret' is required for cipher"),
            Some(id) => Error::unsupported(format!("No secret with id '{id}'")),
        });
    }
    let size = size.ok_or_else(|| Error::invalid_arg("Image creation needs a size parameter"))?;
    let size = size.div_ceil(512) * 512;
    let cluster_size = opts.get_size("cluster_size")?.unwrap_or(65536);
    let extended_l2 = opts.get_bool("extended_l2")?.unwrap_or(false);
    if extended_l2 && version < 3 {
        return Err(Error::invalid_arg(
            "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        return Err(Error::invalid_arg(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cluster_size < 16384 {
        return Err(Error::invalid_arg(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let backing_file = opts.get("backing_file").map(str::to_string);
    let backing_fmt = opts.get("backing_fmt").map(str::to_string);
    if backing_file.is_some() && prealloc != Prealloc::Off && !extended_l2 {
        return Err(Error::invalid_arg(
            "Backing file and preallocation can only be used at the same time if extended_l2 is on",
        ));
    }
    if backing_fmt.is_some() && backing_file.is_none() {
        return Err(Error::invalid_arg(
            "Backing format cannot be used without backing file",
        ));
    }
    let lazy_refcounts = opts.get_bool("lazy_refcounts")?.unwrap_or(false);
    if version < 3 && lazy_refcounts {
        return Err(Error::invalid_arg(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    let refcount_bits = match opts.get("refcount_bits") {
        None => 16,
        Some(v) => crate::formats::options::parse_number("refcount_bits", v)?,
    };
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(Error::invalid_arg(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(Error::invalid_arg(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
        ));
    }
    let data_file = opts.get("data_file").map(str::to_string);
    let data_file_raw = opts.get_bool("data_file_raw")?.unwrap_or(false);
    if data_file_raw && data_file.is_none() {
        return Err(Error::invalid_arg("data-file-raw requires data-file"));
    }
    if data_file_raw && backing_file.is_some() {
        return Err(Error::invalid_arg(
            "Backing file and data-file-raw cannot be used at the same time",
        ));
    }
    let prealloc = if data_file_raw && prealloc == Prealloc::Off {
        Prealloc::Metadata
    } else {
        prealloc
    };
    if data_file.is_some() && version < 3 {
        return Err(Error::invalid_arg(
            "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    if compression != Compression::Zlib && version < 3 {
        return Err(Error::invalid_arg(
            "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
        ));
    }
    let l2e = cluster_size / if extended_l2 { 16 } else { 8 };
    let l1 = size.div_ceil(cluster_size).div_ceil(l2e);
    if l1 * 8 > header::MAX_L1_BYTES {
        return Err(Error::too_large(
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)",
        ));
    }
    Ok(Qcow2CreateParams {
        size,
        version,
        cluster_size,
        extended_l2,
        lazy_refcounts,
        refcount_bits,
        compression,
        prealloc,
        backing_file,
        backing_fmt,
        data_file,
        data_file_raw,
    })
}

/// Creates a qcow2 image.
pub fn create(filename: &str, opts: &CreateOpts) -> Result<()> {
    let opts = resolve_create_opts(filename, opts)?;
    let p = params(&opts).map_err(|e| {
        let m = e.message().to_string();
        e.with_message(format!("{filename}: {m}"))
    })?;
    create_with(filename, &p)
}

/// Creates a qcow2 image from validated parameters.
pub fn create_with(filename: &str, p: &Qcow2CreateParams) -> Result<()> {
    let cs = p.cluster_size;
    let file =
        HostFile::open(filename, &HostOpenOptions::create()).map_err(|e| e.context(filename))?;
    if let Some(df) = &p.data_file {
        let d = HostFile::open(df, &HostOpenOptions::create()).map_err(|e| e.context(filename))?;
        drop(d);
    }
    let mut incompat = 0;
    if p.data_file.is_some() {
        incompat |= header::INCOMPAT_DATA_FILE;
    }
    if p.compression != Compression::Zlib {
        incompat |= header::INCOMPAT_COMPRESSION;
    }
    if p.extended_l2 {
        incompat |= header::INCOMPAT_EXTL2;
    }
    let h = Header {
        version: p.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: cs.trailing_zeros(),
        size: 0,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: incompat,
        compatible: if p.lazy_refcounts {
            header::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear: if p.data_file_raw {
            header::AUTOCLEAR_DATA_FILE_RAW
        } else {
            0
        },
        refcount_order: p.refcount_bits.trailing_zeros(),
        header_length: if p.version >= 3 { 112 } else { 72 },
        compression: p.compression,
        unknown_fields: Vec::new(),
        backing_format: p.backing_file.as_ref().and(p.backing_fmt.clone()),
        data_file: p.data_file.clone(),
        // qemu leaves the feature name table out of images with clusters of 4k or less
        feature_names: if p.version >= 3 && cs > 4096 {
            Header::default_feature_names()
        } else {
            Vec::new()
        },
        bitmaps: None,
        has_crypto_ext: false,
        crypto_ext: None,
        unknown_exts: Vec::new(),
        backing_file: p.backing_file.clone(),
    };
    // The magic is written last, once the image is complete: until then a crash leaves a
    // file that is not taken for a qcow2 image (rather than one without its tables or size).
    let mut hb = h.serialize().map_err(|e| e.context(filename))?;
    hb[..4].fill(0);
    file.write_at(&hb, 0)?;
    // refcount table (cluster 1) with one block (cluster 2) counting clusters 0..=2
    let mut rt = vec![0u8; cs as usize];
    rt[..8].copy_from_slice(&(2 * cs).to_be_bytes());
    file.write_at(&rt, cs)?;
    let mut rb = vec![0u8; cs as usize];
    let order = p.refcount_bits.trailing_zeros();
    for i in 0..3u64 {
        set_refcount_raw(&mut rb, order, i, 1);
    }
    file.write_at(&rb, 2 * cs)?;
    file.sync()?;

    // Open it (on the same file description: no second lock) and give it its size.
    let ctx = OpenCtx {
        opts: OpenOptions {
            write: true,
            no_backing: true,
            format: Some(Format::Qcow2),
            ..OpenOptions::default()
        },
        chain: Vec::new(),
        probed: false,
    };
    let q = Qcow2::open_unstamped(file, filename, &ctx).map_err(|e| e.context(filename))?;
    q.set_size_new(p.size)?;
    if p.prealloc != Prealloc::Off {
        q.preallocate(p.prealloc, p.size)?;
    }
    if let (Some(_), Some(df)) = (&p.data_file, &q.data_file) {
        let cur = df.len()?;
        if cur < p.size {
            match p.prealloc {
                Prealloc::Full => crate::formats::raw::preallocate(
                    df,
                    cur,
                    p.size,
                    crate::formats::raw::Prealloc::Full,
                )?,
                Prealloc::Falloc => crate::formats::raw::preallocate(
                    df,
                    cur,
                    p.size,
                    crate::formats::raw::Prealloc::Falloc,
                )?,
                _ => df.set_len(p.size)?,
            }
        }
    }
    q.close()?;
    q.file.write_at(&header::QCOW_MAGIC.to_be_bytes(), 0)?;
    q.file.sync()?;
    Ok(())
}

fn set_refcount_raw(data: &mut [u8], order: u32, i: u64, v: u64) {
    if order < 3 {
        let bits = 1u64 << order;
        let bit = i * bits;
        data[(bit / 8) as usize] |= (v as u8) << (bit % 8);
    } else {
        let w = 1usize << (order - 3);
        let s = i as usize * w;
        data[s..s + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
    }
}

impl Qcow2 {
    /// Grows the L1 table to cover `size` and records the new guest size (used by create;
    /// also the base of a future resize).
    pub(crate) fn set_size_new(&self, size: u64) -> Result<()> {
        let mut m = self.meta.lock().unwrap();
        let need = size.div_ceil(self.cs).div_ceil(self.l2_entries);
        if need > m.l1.len() as u64 {
            self.grow_l1(&mut m, need)?;
        }
        self.file.write_at(&size.to_be_bytes(), 24)?;
        self.file.sync()?;
        Ok(())
    }

    /// Moves the L1 table to a new one of `entries` entries.
    pub(crate) fn grow_l1(&self, m: &mut super::tables::Meta, entries: u64) -> Result<()> {
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(Error::too_large(format!(
                "{}: L1 table too large",
                self.filename
            )));
        }
        self.flush_meta(m)?;
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(self.cs);
        let new = self.alloc_clusters(m, clusters)?;
        self.flush_meta(m)?;
        // exactly the table: the file then ends where qemu-img's does
        let mut raw = vec![0u8; bytes as usize];
        for (i, &v) in m.l1.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        self.overlap_check(m, new, raw.len() as u64, "L1 table")?;
        self.file.write_at(&raw, new)?;
        self.file.sync()?;
        let mut hb = [0u8; 12];
        hb[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hb[4..].copy_from_slice(&new.to_be_bytes());
        self.file.write_at(&hb, 36)?;
        self.file.sync()?;
        let (old_off, old_len) = (m.l1_offset, m.l1.len() as u64);
        m.l1.resize(entries as usize, 0);
        m.l1_offset = new;
        if old_len > 0 {
            let oc = (old_len * 8).div_ceil(self.cs);
            for c in 0..oc {
                m.pending_free.push((old_off >> self.cluster_bits) + c);
            }
            m.changed = true;
        }
        Ok(())
    }

    /// Allocates L2 tables and data clusters for the whole guest (the data in one
    /// contiguous run, like qemu).
    fn preallocate(&self, mode: Prealloc, size: u64) -> Result<()> {
        let mut m = self.meta.lock().unwrap();
        self.start_write(&mut m)?;
        let clusters = size.div_ceil(self.cs);
        if clusters == 0 {
            return Ok(());
        }
        self.l2_table_for_write(&mut m, 0)?;
        let data_start = if self.has_data_file {
            0
        } else {
            self.alloc_clusters(&mut m, clusters)?
        };
        for gcl in 0..clusters {
            let l2 = self.l2_table_for_write(&mut m, gcl / self.l2_entries)?;
            self.l2_set(
                &mut m,
                l2,
                gcl % self.l2_entries,
                (data_start + gcl * self.cs) | OFLAG_COPIED,
                0,
            )?;
        }
        self.flush_meta(&mut m)?;
        if !self.has_data_file {
            let end = data_start + clusters * self.cs;
            match mode {
                Prealloc::Full => {
                    let zeros = vec![0u8; (1 << 20).min(clusters * self.cs) as usize];
                    let mut off = data_start;
                    while off < end {
                        let n = (end - off).min(zeros.len() as u64) as usize;
                        self.file.write_at(&zeros[..n], off)?;
                        off += n as u64;
                    }
                }
                Prealloc::Falloc => {
                    if self.file.len()? < end {
                        self.file.set_len(end)?;
                    }
                    self.file.allocate(data_start, end - data_start)?;
                }
                _ => {
                    if self.file.len()? < end {
                        self.file.set_len(end)?;
                    }
                }
            }
            self.file.sync()?;
        }
        Ok(())
    }
}
