//! Format drivers and the block-layer trait they share.
//!
//! Every image format implements [`BlockDriver`]; every command works on `dyn BlockDriver`.
//! [`open`] probes the format (like qemu-img) and opens backing chains; [`create`] makes a new
//! image from `-o` options.

pub mod entropy;
pub mod measure;
pub mod options;
pub mod qcow2;
pub mod raw;
pub mod vdi;
pub mod vmdk;

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::{FaultInjector, HostFile, HostOpenOptions, LockMode, LockSpec};
use crate::qjson::{Json, Obj};
pub use options::{CreateOpts, OptDesc, OptKind};

/// The maximum depth of a backing chain (qemu's limit is 1000 too).
pub const MAX_BACKING_DEPTH: usize = crate::limits::MAX_BACKING_DEPTH;

/// Every block driver qemu-img 10 knows (its `--help`): names it takes as a backing format
/// to record (`rebase -u -F host_device`), though diskit opens only its four formats.
pub const QEMU_DRIVER_NAMES: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "iser",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "snapshot-access",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// The image formats diskit knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VMware virtual disk.
    Vmdk,
    /// VirtualBox disk image.
    Vdi,
}

impl Format {
    /// qemu-img's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
        }
    }

    /// Parses qemu-img's format name.
    pub fn from_name(name: &str) -> Result<Format> {
        match name {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            "vmdk" => Ok(Format::Vmdk),
            "vdi" => Ok(Format::Vdi),
            _ => Err(Error::invalid_arg(format!("Unknown file format '{name}'"))),
        }
    }

    /// Formats that have a driver in this build.
    pub fn supported() -> &'static [Format] {
        &[Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vdi]
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a guest range lives in one layer of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Plain data in this image's file (or its data file) at `host_offset`.
    Data {
        /// Offset in the host file holding the data.
        host_offset: u64,
    },
    /// Data that must be decoded (qcow2 compressed clusters, stream-optimized grains).
    Compressed,
    /// Reads as zero. `explicit`: the image says so (qcow2 zero flag, vdi zero block).
    Zero {
        /// Recorded as zero in the metadata, as opposed to a hole in a raw file.
        explicit: bool,
    },
    /// Not in this layer: the backing file decides, else zero.
    Unallocated,
}

/// Hashes table offsets and indices for the drivers' metadata caches: the keys are integers
/// (cluster-aligned host offsets, table indices), a lookup happens per cluster walked, and a
/// multiply-fold beats SipHash by an order of magnitude (1 TiB sparse qcow2 convert: 0.12 s ->
/// 0.06 s). The fold brings the well-mixed high
/// bits of the product down to the low bits the table indexes with.
#[derive(Default, Clone, Copy)]
pub struct OffsetHasher(u64);

impl std::hash::Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29) ^ (h >> 47)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
    fn write_u32(&mut self, n: u32) {
        self.0 ^= u64::from(n);
    }
}

/// A map keyed by integers, hashed with [`OffsetHasher`].
pub type OffsetMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<OffsetHasher>>;

/// A cluster made ready for writing by [`BlockDriver::compress_cluster`].
#[derive(Debug)]
pub enum Prepared {
    /// The driver compresses only inside [`BlockDriver::write_compressed`].
    Unsupported,
    /// Hand this to [`BlockDriver::write_compressed_data`].
    Data(Vec<u8>),
    /// The cluster does not shrink: the format stores it as plain data, written with
    /// [`BlockDriver::write_at`].
    Plain,
}

/// The block-layer trait: what every format driver does.
///
/// All methods take `&self`: drivers are shared by the copy engine's worker threads.
pub trait BlockDriver: Send + Sync {
    /// The format of this image.
    fn format(&self) -> Format;
    /// The file name as the user (or the overlay's backing reference) gave it.
    fn filename(&self) -> &str;
    /// The guest-visible size in bytes.
    fn virtual_size(&self) -> u64;
    /// The allocation unit, where the format has one.
    fn cluster_size(&self) -> Option<u64>;
    /// Where the guest range starting at `offset` lives, for as long as it stays the same
    /// kind: returns the mapping and its length (at least 1, at most `max_len`).
    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)>;
    /// [`map`](Self::map) as `qemu-img map` reports it, where that differs from what a copy
    /// needs to know: a flat VMDK extent is data all along, its holes included (QEMU asks the
    /// extent file, see [`host_zero_status`](Self::host_zero_status)), where `map` calls the
    /// holes zero so that nothing reads them.
    fn map_reported(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        self.map(offset, max_len)
    }
    /// For a `Data` run at guest `offset`, mapped to `host_offset`, what the host file says
    /// where QEMU would ask it (qcow2 with preallocated metadata, a hole in a flat VMDK
    /// extent): `Some((reads_as_zero, length))`, else `None`.
    fn host_zero_status(
        &self,
        _offset: u64,
        _host_offset: u64,
        _len: u64,
    ) -> Result<Option<(bool, u64)>> {
        Ok(None)
    }
    /// The file holding the data mapped at guest `offset` when it is not the image's own
    /// file (a VMDK extent file, qcow2's external data file), as `qemu-img map` names it.
    fn data_filename(&self, _offset: u64) -> Option<&str> {
        None
    }
    /// For `Zero`/`Unallocated` runs: the host offset reserved for `offset` where there is
    /// one (a preallocated qcow2 zero cluster, an unallocated subcluster of an allocated
    /// cluster), which `qemu-img map` prints.
    fn reserved_host_offset(&self, _offset: u64) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Reads the guest view: holes read as zero, backing resolved.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Writes guest data.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes a range read as zero; `unmap` allows deallocation.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Writes one compressed cluster (cluster-aligned `buf` of one cluster, or the tail).
    fn write_compressed(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported(format!(
            "Compression is not supported for image format '{}'",
            self.format()
        )))
    }
    /// Compresses one cluster ahead of [`BlockDriver::write_compressed_data`], on any thread
    /// and without taking the driver's locks, so that the copy engine compresses on every
    /// core while it writes in order.
    fn compress_cluster(&self, _buf: &[u8], _offset: u64) -> Result<Prepared> {
        Ok(Prepared::Unsupported)
    }
    /// Every write is compressed anyway (a streamOptimized VMDK): the copy engine then takes
    /// its compressing path, which spreads the compression over its workers.
    fn compresses_writes(&self) -> bool {
        false
    }
    /// Stores a cluster prepared by [`BlockDriver::compress_cluster`] for guest `offset`.
    fn write_compressed_data(&self, _data: &[u8], _offset: u64) -> Result<()> {
        Err(Error::unsupported(format!(
            "Compression is not supported for image format '{}'",
            self.format()
        )))
    }
    /// Deallocates a range (contents become unspecified but readable).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<()>;
    /// The backing image, if any is open.
    fn backing(&self) -> Option<&dyn BlockDriver>;
    /// What `qemu-img info` reports of this image.
    fn info(&self) -> Result<ImageInfo>;
    /// Changes the guest size. `prealloc` is `off`, `metadata`, `falloc` or `full` for the
    /// new part. Shrinking drops everything past the new end (the caller asks for consent).
    fn resize(&self, _new_size: u64, _prealloc: Option<&str>) -> Result<()> {
        Err(Error::unsupported(
            "Image format driver does not support resize",
        ))
    }
    /// Checks the image's metadata (`qemu-img check`); with `repair`, fixes what it can.
    /// Formats without checks answer `Unsupported`.
    fn check(&self, _repair: Option<RepairMode>) -> Result<CheckReport> {
        Err(Error::unsupported(
            "This image format does not support checks",
        ))
    }
    /// Drops everything this layer holds, so that it reads through to its backing file
    /// (`qemu-img commit` empties the top image afterwards). Crash-safe: an interruption
    /// leaves at worst leaked clusters. Formats that cannot answer `Unsupported`.
    fn make_empty(&self) -> Result<()> {
        Err(Error::unsupported(format!(
            "Image format '{}' cannot be emptied",
            self.format()
        )))
    }
    /// Rewrites the backing file reference in the image's metadata (`qemu-img rebase`):
    /// `None` removes the backing file (and its format). The open backing chain is not
    /// changed; close the image afterwards. Formats without backing files answer
    /// `Unsupported`.
    fn set_backing_file(&self, _name: Option<&str>, _format: Option<&str>) -> Result<()> {
        Err(Error::unsupported("Operation not supported"))
    }
    /// Switches a read-only image to the guest view of one of its internal snapshots, for as
    /// long as it stays open (qemu's `bdrv_snapshot_load_tmp`, used by `convert -l` and
    /// `measure -l`). Nothing is written; the virtual size stays the image's. Formats
    /// without internal snapshots answer qemu's `Unsupported` text.
    fn load_snapshot_tmp(&self, _sel: &SnapshotSel) -> Result<()> {
        Err(Error::unsupported(format!(
            "Block format '{}' used by device '' does not support temporarily loading internal snapshots",
            self.format()
        )))
    }
    /// Flushes and marks the image clean (the last call before dropping a written image).
    fn close(&self) -> Result<()> {
        self.flush()
    }
    /// Downcasting to the concrete driver for format-specific extras.
    fn as_any(&self) -> &dyn Any;
}

/// Which internal snapshot to load read-only ([`BlockDriver::load_snapshot_tmp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSel {
    /// `-l NAME`: an ID, else a name (qemu's `bdrv_snapshot_load_tmp_by_id_or_name`).
    IdOrName(String),
    /// `-l snapshot.id=ID,snapshot.name=NAME`: each given part must match.
    Exact {
        /// `snapshot.id`
        id: Option<String>,
        /// `snapshot.name`
        name: Option<String>,
    },
}

/// What `check -r` may repair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairMode {
    /// Only leaked clusters (`-r leaks`).
    Leaks,
    /// Leaks and corruptions (`-r all`).
    All,
}

/// One problem found by a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// A short kind: `leak`, `refcount-too-low`, `copied-flag`, `overlap`, ...
    pub kind: String,
    /// The host cluster concerned, where there is one.
    pub cluster: Option<u64>,
    /// A host or guest offset concerned, where there is one.
    pub offset: Option<u64>,
    /// The line qemu-img prints for it (e.g. `Leaked cluster 7 refcount=1 reference=0`).
    pub message: String,
    /// Was it repaired?
    pub repaired: bool,
}

/// The result of a check, with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Internal errors during the check.
    pub check_errors: u64,
    /// Corruptions found (after a repair: the ones left).
    pub corruptions: u64,
    /// Leaked clusters found.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// The end of the last used host cluster.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters.
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed clusters.
    pub compressed_clusters: u64,
    /// Each problem, in the order found.
    pub findings: Vec<Finding>,
}

/// A snapshot as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    /// Snapshot ID (decimal string in qcow2).
    pub id: String,
    /// Name.
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: u64,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Instruction count, if recorded (icount).
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    /// qemu's JSON for one snapshot.
    pub fn to_json(&self) -> Json {
        Obj::new()
            .with("id", self.id.as_str())
            .with("name", self.name.as_str())
            .with("vm-state-size", self.vm_state_size)
            .with("date-sec", self.date_sec)
            .with("date-nsec", self.date_nsec)
            .with("vm-clock-sec", self.vm_clock_nsec / 1_000_000_000)
            .with("vm-clock-nsec", self.vm_clock_nsec % 1_000_000_000)
            .with_opt("icount", self.icount)
            .into()
    }
}

/// What `qemu-img info` reports of one image (one node of the chain).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// The file name.
    pub filename: String,
    /// Format name (`qcow2`, ..., or `file` for the protocol child).
    pub format: String,
    /// Dirty (lazy refcounts) flag.
    pub dirty_flag: bool,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// Guest size.
    pub virtual_size: u64,
    /// Cluster size, if the format has one.
    pub cluster_size: Option<u64>,
    /// Encrypted?
    pub encrypted: Option<bool>,
    /// Backing file name as recorded in the image.
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// Backing format recorded in the image.
    pub backing_filename_format: Option<String>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
    /// `format-specific` as `{ "type": ..., "data": ... }`, and the human dump of it.
    pub format_specific: Option<(String, Obj)>,
    /// Child nodes (`file`, data file, extents), each `(name, info)`.
    pub children: Vec<(String, ImageInfo)>,
    /// For the protocol node: the `file` format-specific payload.
    pub protocol: bool,
}

impl ImageInfo {
    /// A node for a format driver with everything optional left empty.
    pub fn new(filename: &str, format: Format, virtual_size: u64) -> ImageInfo {
        ImageInfo {
            filename: filename.to_string(),
            format: format.name().to_string(),
            dirty_flag: false,
            actual_size: None,
            virtual_size,
            cluster_size: None,
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: Vec::new(),
            format_specific: None,
            children: Vec::new(),
            protocol: false,
        }
    }

    /// The protocol-layer node (`"format": "file"`) of a host file.
    pub fn file_node(file: &HostFile) -> Result<ImageInfo> {
        // QEMU reports lengths in whole sectors.
        let len = file.len()?.div_ceil(512) * 512;
        Ok(ImageInfo {
            filename: file.display().to_string(),
            format: "file".to_string(),
            dirty_flag: false,
            actual_size: Some(file.allocated_size()?),
            virtual_size: len,
            cluster_size: None,
            encrypted: None,
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            snapshots: Vec::new(),
            format_specific: Some(("file".to_string(), Obj::new())),
            children: Vec::new(),
            protocol: true,
        })
    }

    /// qemu-img's JSON object for this node (QAPI `ImageInfo`).
    pub fn to_json(&self) -> Json {
        let mut o = Obj::new()
            .with("filename", self.filename.as_str())
            .with("format", self.format.as_str())
            .with("dirty-flag", self.dirty_flag)
            .with_opt("actual-size", self.actual_size)
            .with("virtual-size", self.virtual_size)
            .with_opt("cluster-size", self.cluster_size)
            .with_opt("encrypted", self.encrypted)
            .with_opt("backing-filename", self.backing_filename.clone())
            .with_opt("full-backing-filename", self.full_backing_filename.clone())
            .with_opt(
                "backing-filename-format",
                self.backing_filename_format.clone(),
            );
        if !self.snapshots.is_empty() {
            o.push(
                "snapshots",
                self.snapshots
                    .iter()
                    .map(|s| s.to_json())
                    .collect::<Vec<_>>(),
            );
        }
        if let Some((ty, data)) = &self.format_specific {
            o.push(
                "format-specific",
                Obj::new()
                    .with("type", ty.as_str())
                    .with("data", data.clone()),
            );
        }
        o.push(
            "children",
            self.children
                .iter()
                .map(|(name, info)| {
                    Json::Obj(
                        Obj::new()
                            .with("name", name.as_str())
                            .with("info", info.to_json()),
                    )
                })
                .collect::<Vec<_>>(),
        );
        Json::Obj(o)
    }
}

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The format, or `None` to probe.
    pub format: Option<Format>,
    /// Open for writing.
    pub write: bool,
    /// `-U`: do not take QEMU's locks that would conflict with a running QEMU.
    pub force_share: bool,
    /// Do not open the backing chain (info, `-u` operations).
    pub no_backing: bool,
    /// Open files with O_DIRECT.
    pub direct: bool,
    /// Metadata only (`info`): take no read permission, as qemu-img's `BDRV_O_NO_IO`.
    pub no_io: bool,
    /// Refuse other writers even on raw images (a consistent source for convert/commit).
    pub exclusive: bool,
    /// The size will change (resize): take QEMU's resize permission.
    pub resize: bool,
    /// `cache=unsafe`: never flush to stable storage (qemu-img convert's default target).
    pub no_flush: bool,
    /// Fault injection for tests.
    pub faults: Option<Arc<FaultInjector>>,
    /// Opened by `check` (qemu's `BDRV_O_CHECK`): a corrupt image may be opened for
    /// repair, a dirty one is not repaired at open, a broken snapshot table is left to the
    /// check to report.
    pub check: bool,
    /// Open the backing layer at this depth (1 = the immediate backing file) read-write and
    /// resizable, the others read-only (`commit` writes into its base inside the chain, so
    /// that the base is opened only once).
    pub rw_backing_depth: Option<usize>,
}

impl OpenOptions {
    /// Read-only open, probing the format.
    pub fn read_only() -> Self {
        Self::default()
    }
    /// Read-write open.
    pub fn read_write() -> Self {
        OpenOptions {
            write: true,
            ..Self::default()
        }
    }
    /// Sets the format.
    pub fn with_format(mut self, format: Option<Format>) -> Self {
        self.format = format;
        self
    }

    /// The host-file options for the image file itself (locks come once the format is known).
    pub fn host(&self) -> HostOpenOptions {
        HostOpenOptions {
            write: self.write,
            create: false,
            lock: LockMode::None,
            direct: self.direct,
            no_flush: self.no_flush,
            faults: self.faults.clone(),
        }
    }

    /// QEMU's lock bytes for an image of `format` opened this way: what qemu-img holds
    /// (consistent read unless metadata only, write and resize for writers) and refuses to
    /// share (formats with metadata never share write and resize of their file; raw does
    /// only for an exclusive user).
    pub fn lock_spec(&self, format: Format) -> LockSpec {
        use crate::io::lock::{PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE};
        let metadata = format != Format::Raw;
        let mut held = if self.no_io { 0 } else { PERM_CONSISTENT_READ };
        if self.write {
            held |= PERM_WRITE;
            if metadata || self.resize {
                held |= PERM_RESIZE;
            }
        }
        let unshared = if self.force_share {
            0
        } else if metadata || self.exclusive {
            PERM_WRITE | PERM_RESIZE
        } else {
            0
        };
        LockSpec { held, unshared }
    }
}

/// State carried while opening a backing chain: depth and the files already open.
#[derive(Debug, Clone)]
pub struct OpenCtx {
    /// Options of the whole open.
    pub opts: OpenOptions,
    /// Canonical paths of the images opened so far, top first.
    pub chain: Vec<PathBuf>,
    /// The format was probed (not given by the user).
    pub probed: bool,
}

impl OpenCtx {
    /// The context for a backing file: read-only (qemu opens backing files read-only).
    pub fn for_backing(&self) -> OpenCtx {
        // `chain` holds the overlays opened so far: the backing file about to be opened
        // lies at depth `chain.len()`.
        let rw = self.opts.rw_backing_depth == Some(self.chain.len());
        OpenCtx {
            opts: OpenOptions {
                write: rw,
                format: None,
                exclusive: false,
                resize: rw,
                ..self.opts.clone()
            },
            chain: self.chain.clone(),
            probed: false,
        }
    }
}

/// Probes the format from the first bytes of a file (at least 512 bytes where available).
pub fn probe(header: &[u8], filename: &str) -> Format {
    if qcow2::probe(header) {
        return Format::Qcow2;
    }
    if vmdk::probe(header) {
        return Format::Vmdk;
    }
    if vdi::probe(header) {
        return Format::Vdi;
    }
    let _ = filename;
    Format::Raw
}

const PROBE_LEN: usize = 2048;

/// The format of an existing file as probing finds it (raw when it cannot be read: the
/// open that follows reports why). FIFOs and character devices are not read (a read would
/// block or never end).
pub fn probe_path(path: &str) -> Format {
    use std::io::Read;
    use std::os::unix::fs::FileTypeExt;
    let mut head = Vec::new();
    let plain = std::fs::metadata(path)
        .map(|m| m.is_file() || m.file_type().is_block_device())
        .unwrap_or(false);
    if let Some(Ok(f)) = plain.then(|| std::fs::File::open(path)) {
        let _ = f.take(PROBE_LEN as u64).read_to_end(&mut head);
    }
    probe(&head, path)
}

/// Opens an image by name.
pub fn open(filename: &str, opts: &OpenOptions) -> Result<Box<dyn BlockDriver>> {
    let ctx = OpenCtx {
        opts: opts.clone(),
        chain: Vec::new(),
        probed: false,
    };
    open_with_ctx(filename, &ctx)
}

/// What kind of file an image names (the user did not name it on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamedBy {
    /// A backing file name in an image header (or a qcow2 external data file).
    Backing,
    /// An extent file in a VMDK descriptor.
    Extent,
}

/// Is `DISKIT_ALLOW_DEVICES=1` (or the older `DISKIT_VMDK_ALLOW_DEVICES=1`) set?
pub fn devices_allowed() -> bool {
    ["DISKIT_ALLOW_DEVICES", "DISKIT_VMDK_ALLOW_DEVICES"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
}

/// The one policy for files an image names, checked before they are opened (opening a FIFO
/// would block). Backing files may be regular files or block devices, as with qemu-img
/// (chains of qcow2 volumes on LVM rely on it); VMDK extents only regular files. Character
/// devices, FIFOs and sockets are refused in both roles: they would hang a reader or feed it
/// endless data. `DISKIT_ALLOW_DEVICES=1` lifts the refusal. A missing file is left to the
/// open that follows, which reports it.
pub fn check_named_file(path: &str, role: NamedBy) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        return Ok(());
    } else if ft.is_block_device() {
        if role == NamedBy::Backing {
            return Ok(());
        }
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_dir() {
        return Ok(()); // the open fails with the usual message
    } else {
        "not a regular file"
    };
    if devices_allowed() {
        return Ok(());
    }
    let what = match role {
        NamedBy::Backing => "backing file",
        NamedBy::Extent => "extent file",
    };
    Err(Error::unsupported(format!(
        "{what} '{path}' is {kind}; diskit refuses special files named by an image (set DISKIT_ALLOW_DEVICES=1 to allow them)"
    )))
}

/// Opens an image inside a chain (used by drivers to open their backing files).
pub fn open_with_ctx(filename: &str, ctx: &OpenCtx) -> Result<Box<dyn BlockDriver>> {
    let opts = &ctx.opts;
    let file = HostFile::open(filename, &opts.host())
        .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
    let canonical = std::fs::canonicalize(filename).unwrap_or_else(|_| PathBuf::from(filename));
    if ctx.chain.contains(&canonical) {
        return Err(Error::invalid_image(format!(
            "Backing file '{filename}' creates an infinite loop."
        )));
    }
    if ctx.chain.len() >= MAX_BACKING_DEPTH {
        return Err(Error::too_large(format!(
            "Backing chain of '{filename}' is deeper than {MAX_BACKING_DEPTH} images"
        )));
    }
    let mut ctx = ctx.clone();
    ctx.chain.push(canonical);
    let (format, probed) = match opts.format {
        Some(f) => (f, false),
        None => {
            let mut head = vec![0u8; PROBE_LEN];
            file.read_at(&mut head, 0)
                .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
            (probe(&head, filename), true)
        }
    };
    ctx.probed = probed;
    file.lock(opts.lock_spec(format))
        .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
    let r = match format {
        Format::Raw => raw::open(file, filename, &ctx),
        Format::Qcow2 => qcow2::open(file, filename, &ctx),
        Format::Vmdk => vmdk::open(file, filename, &ctx),
        Format::Vdi => vdi::open(file, filename, &ctx),
    };
    r.map_err(|e| {
        if e.message().starts_with("Could not open") {
            e
        } else {
            e.context(format!("Could not open '{filename}'"))
        }
    })
}

/// Resolves a backing file name against the directory of the image that names it, as QEMU
/// does (`bdrv_get_full_backing_filename`): absolute names and protocol names stay as they are.
pub fn resolve_backing_name(image: &str, backing: &str) -> String {
    if backing.starts_with('/') || has_protocol(backing) {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(pos) => format!("{}{}", &image[..=pos], backing),
        None => backing.to_string(),
    }
}

fn has_protocol(name: &str) -> bool {
    match name.find(':') {
        Some(p) => {
            let before = &name[..p];
            !before.is_empty()
                && !before.contains('/')
                && before
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '+')
        }
        None => false,
    }
}

/// Opens a backing file named by `image`'s metadata.
pub fn open_backing(
    image: &str,
    backing: &str,
    backing_format: Option<&str>,
    ctx: &OpenCtx,
) -> Result<Box<dyn BlockDriver>> {
    let full = resolve_backing_name(image, backing);
    check_named_file(&full, NamedBy::Backing)
        .map_err(|e| e.context("Could not open backing file"))?;
    let mut bctx = ctx.for_backing();
    if let Some(fmt) = backing_format {
        bctx.opts.format = Some(Format::from_name(fmt).map_err(|_| {
            Error::invalid_image(format!("Unknown driver '{fmt}'"))
                .context("Could not open backing file")
        })?);
    }
    open_with_ctx(&full, &bctx).map_err(|e| {
        if e.message().contains("creates an infinite loop") {
            e
        } else {
            e.context("Could not open backing file")
        }
    })
}

/// Creates a new image of `format` at `filename`.
pub fn create(filename: &str, format: Format, opts: &CreateOpts) -> Result<()> {
    match format {
        Format::Raw => raw::create(filename, opts),
        Format::Qcow2 => qcow2::create(filename, opts),
        Format::Vmdk => vmdk::create(filename, opts),
        Format::Vdi => vdi::create(filename, opts),
    }
}

/// Resizes an open image and closes it. VMDK grows by rewriting its descriptor and grain
/// directory, which it does on a fresh open of its own.
pub fn resize_image(
    img: Box<dyn BlockDriver>,
    new_size: u64,
    prealloc: Option<&str>,
) -> Result<()> {
    if img.format() == Format::Vmdk {
        if prealloc.is_some_and(|p| p != "off") {
            return Err(Error::unsupported(
                "Preallocation is not supported for vmdk images",
            ));
        }
        let name = img.filename().to_string();
        drop(img);
        return vmdk::resize(&name, new_size);
    }
    img.resize(new_size, prealloc)?;
    img.close()
}

/// The `-o` options a format accepts when creating, in the order `-o help` lists them.
pub fn create_options(format: Format) -> &'static [OptDesc] {
    match format {
        Format::Raw => raw::CREATE_OPTS,
        Format::Qcow2 => qcow2::CREATE_OPTS,
        Format::Vmdk => vmdk::CREATE_OPTS,
        Format::Vdi => vdi::CREATE_OPTS,
    }
}

/// The `fmt=... key=value ...` text qemu-img prints after `Formatting 'x', `.
pub fn create_summary(format: Format, opts: &CreateOpts) -> String {
    match format {
        Format::Raw => raw::create_summary(opts),
        Format::Qcow2 => qcow2::create_summary(opts),
        Format::Vmdk => vmdk::create_summary(opts),
        Format::Vdi => vdi::create_summary(opts),
    }
}

/// Path helper: does `path` exist?
pub fn exists(path: &str) -> bool {
    Path::new(path).exists()
}

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, BuildHasherDefault};

    /// Cluster-aligned offsets (low 16 bits zero) and small indices still spread over the low
    /// bits a hash table indexes with.
    #[test]
    fn offset_hasher_spreads_aligned_keys() {
        let b = BuildHasherDefault::<super::OffsetHasher>::default();
        for step in [1u64, 512, 65536, 2 << 20] {
            let mut seen = std::collections::HashSet::new();
            for i in 0..4096u64 {
                seen.insert(b.hash_one(i * step) & 0xfff);
            }
            assert!(
                seen.len() > 2000,
                "step {step}: {} buckets of 4096",
                seen.len()
            );
        }
    }
}
