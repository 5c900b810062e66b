//! Every resource bound diskit enforces on what it reads, in one place.
//!
//! Images come from untrusted places; every size, count and offset read from a file is
//! checked against these before memory is allocated or a loop is entered. Where QEMU has a
//! limit, diskit uses the same one (an image QEMU opens, diskit opens) or a tighter one where
//! it says so. The drivers refer to these constants; `README.md` ("Safety") lists them for
//! users. Every metadata walk is bounded by a count derived from these (table entries,
//! directory entries, chain depth), so a loop over metadata always ends.
//!
//! Not a constant but a rule: a compressed qcow2 cluster or VMDK grain never decodes to more
//! than one cluster or grain (the decoders write into a buffer of that size and fail on
//! anything beyond it).

/// Images in a backing chain, the top one included (QEMU: 1000 too).
pub const MAX_BACKING_DEPTH: usize = 1000;

/// qcow2: bytes of an L1 table (QEMU's `QCOW_MAX_L1_SIZE`, 32 MiB).
pub const QCOW2_MAX_L1_BYTES: u64 = 32 << 20;
/// qcow2: bytes of the refcount table (QEMU's `QCOW_MAX_REFTABLE_SIZE`, 8 MiB).
pub const QCOW2_MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qcow2: internal snapshots (QEMU's `QCOW_MAX_SNAPSHOTS`).
pub const QCOW2_MAX_SNAPSHOTS: u64 = 65536;
/// qcow2: bytes of the whole snapshot table (QEMU's `QCOW_MAX_SNAPSHOTS_SIZE`, 64 MiB).
pub const QCOW2_MAX_SNAPSHOT_TABLE_BYTES: u64 = 1024 * 65536;
/// qcow2: bytes of one snapshot's extra data (QEMU: 1 KiB).
pub const QCOW2_MAX_SNAPSHOT_EXTRA: u64 = 1024;
/// qcow2: bytes of a backing file name (QEMU: 1023).
pub const QCOW2_MAX_BACKING_NAME: usize = 1023;
/// qcow2: persistent bitmaps in one image (QEMU: 65535).
pub const QCOW2_MAX_BITMAPS: usize = 65535;
/// qcow2: bytes of the bitmap directory (QEMU: 1 KiB per bitmap).
pub const QCOW2_MAX_BITMAP_DIRECTORY: u64 = 1024 * 65535;
/// qcow2: bytes of a bitmap name (QEMU: 1023).
pub const QCOW2_MAX_BITMAP_NAME: usize = 1023;
/// qcow2: bytes of one bitmap's cluster table (QEMU's `BME_MAX_TABLE_SIZE`).
pub const QCOW2_MAX_BITMAP_TABLE: u64 = 0x800_0000;
/// qcow2: bytes of one bitmap's data (QEMU's `BME_MAX_PHYS_SIZE`, 512 MiB).
pub const QCOW2_MAX_BITMAP_DATA: u64 = 0x2000_0000;
/// qcow2: bytes of L2 tables kept in the metadata cache (per open image).
pub const QCOW2_L2_CACHE_BYTES: u64 = 8 << 20;
/// qcow2: bytes of refcount blocks kept in the metadata cache (per open image).
pub const QCOW2_REFCOUNT_CACHE_BYTES: u64 = 4 << 20;
/// qcow2 `check`: clusters it counts (32-bit counters: 256 MiB at most); larger images are
/// refused with a clear error. (QEMU has no such limit and allocates what it needs.)
pub const QCOW2_MAX_CHECK_CLUSTERS: u64 = 64 << 20;

/// VMDK: bytes of a descriptor, text file or embedded (QEMU reads the first 1 MiB and
/// ignores the rest; diskit refuses a larger one).
pub const VMDK_MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;
/// VMDK: extents listed in one descriptor.
pub const VMDK_MAX_EXTENTS: usize = 4096;

/// VDI: directory entries looked at when searching a differencing image's parent.
pub const VDI_MAX_PARENT_CANDIDATES: usize = 4096;

/// The copy engine: bytes of one work item. Memory in flight is at most
/// `(2 × workers + workers) × ENGINE_CHUNK` (queued items plus the ones being worked on),
/// whatever the image size: 96 MiB with `-m 16`.
pub const ENGINE_CHUNK: u64 = 2 << 20;
/// The copy engine: at most this many workers (`-m` accepts 1 to 16, as qemu-img).
pub const ENGINE_MAX_WORKERS: usize = 64;

/// Largest single buffered write(2) to a host file; longer writes are issued in pieces.
///
/// A buffered write of 1 MiB or more at an aligned offset makes the kernel allocate page-cache
/// folios of order 8 or 9, which come from the buddy allocator's highest-order free blocks. In
/// a virtual machine with free page reporting (virtio-balloon) exactly those blocks have been
/// handed back to the host, so every page of them faults in the host on first touch: copying
/// 2.5 GB with 2 MiB writes took 2.4-5 s here against 0.9 s with 256 KiB writes (`dd`, same
/// file). Pieces of 256 KiB cost one extra syscall per 256 KiB elsewhere.
pub const HOST_WRITE_PIECE: usize = 256 << 10;
