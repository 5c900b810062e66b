//! `qemu-img amend` for qcow2: compat level, refcount width, lazy refcounts, data file name,
//! data-file-raw, size. The backing file cannot be changed (qemu points to `rebase`).
//!
//! Each step works on a fresh open of the image, so that no step sees metadata another
//! step has rewritten under it.

use super::header::{self, Header};
use super::{Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_ZERO};
use crate::error::{Error, Result};
use crate::formats::{BlockDriver, CreateOpts, OpenCtx, OpenOptions, OptDesc, OptKind};
use crate::io::HostFile;

const fn opt(name: &'static str, kind: OptKind, help: &'static str) -> OptDesc {
    OptDesc { name, kind, help }
}

/// The options `amend -o help` lists for qcow2, in its order.
pub static AMEND_OPTS: &[OptDesc] = &[
    opt("backing_file", OptKind::Str, "File name of a base image"),
    opt(
        "backing_fmt",
        OptKind::Str,
        "Image format of the base image",
    ),
    opt(
        "compat",
        OptKind::Str,
        "Compatibility level (v2 [0.10] or v3 [1.1])",
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
        "encrypt.iter-time",
        OptKind::Number,
        "Time to spend in PBKDF in milliseconds",
    ),
    opt(
        "encrypt.keyslot",
        OptKind::Number,
        "Select a single keyslot to modify explicitly",
    ),
    opt(
        "encrypt.new-secret",
        OptKind::Str,
        "New secret to set in the matching keyslots. Empty string to erase",
    ),
    opt(
        "encrypt.old-secret",
        OptKind::Str,
        "Select all keyslots that match this password",
    ),
    opt(
        "encrypt.state",
        OptKind::Str,
        "Select new state of affected keyslots (active/inactive)",
    ),
    opt("lazy_refcounts", OptKind::Bool, "Postpone refcount updates"),
    opt(
        "refcount_bits",
        OptKind::Number,
        "Width of a reference count entry in bits",
    ),
    opt("size", OptKind::Size, "Virtual disk size"),
];

fn open_rw(filename: &str, base: &OpenOptions) -> Result<Qcow2> {
    let opts = OpenOptions {
        write: true,
        format: Some(crate::formats::Format::Qcow2),
        ..base.clone()
    };
    let file = HostFile::open(filename, &opts.host())
        .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
    file.lock(opts.lock_spec(crate::formats::Format::Qcow2))
        .map_err(|e| e.context(format!("Could not open '{filename}'")))?;
    let ctx = OpenCtx {
        opts,
        chain: Vec::new(),
        probed: false,
    };
    Qcow2::open(file, filename, &ctx).map_err(|e| e.context(format!("Could not open '{filename}'")))
}

/// Checks the option names and types the way qemu-img parses `-o` for amend.
pub fn check_opts(opts: &CreateOpts) -> Result<()> {
    for (k, v) in opts.iter() {
        let Some(d) = AMEND_OPTS.iter().find(|d| d.name == k) else {
            let create_only = super::CREATE_OPTS.iter().any(|d| d.name == k);
            return Err(Error::invalid_arg(if create_only {
                format!("Invalid parameter '{k}'\nThis option is only supported for image creation")
            } else {
                format!("Invalid parameter '{k}'")
            }));
        };
        match d.kind {
            OptKind::Bool => {
                crate::formats::options::parse_bool(k, v)?;
            }
            OptKind::Size => {
                opts.get_size(k)?;
            }
            OptKind::Number => {
                crate::formats::options::parse_number(k, v)?;
            }
            OptKind::Str => {}
        }
    }
    Ok(())
}

/// Progress over the operations of one amend, counted as qemu counts it: each operation
/// (upgrade, refcount width, downgrade) reports its own (offset, work size); the total is
/// projected from the operations seen so far, so that the callback's `done / total` gives
/// qemu-img's percentages.
struct AmendProgress<'a> {
    cb: &'a dyn Fn(u64, u64),
    total_ops: u64,
    ops_done: u64,
    offset_done: u64,
    current: u8,
    last: u8,
    last_size: u64,
}

impl<'a> AmendProgress<'a> {
    fn new(cb: &'a dyn Fn(u64, u64), total_ops: u64) -> Self {
        AmendProgress {
            cb,
            total_ops,
            ops_done: 0,
            offset_done: 0,
            current: 0,
            last: 0,
            last_size: 0,
        }
    }

    /// The next operation (a nonzero id) begins.
    fn begin(&mut self, op: u8) {
        self.current = op;
    }

    /// The current operation has done `offset` of `size`.
    fn report(&mut self, offset: u64, size: u64) {
        if self.current != self.last {
            if self.last != 0 {
                self.offset_done += self.last_size;
                self.ops_done += 1;
            }
            self.last = self.current;
        }
        if self.ops_done >= self.total_ops {
            return;
        }
        self.last_size = size;
        let cur = self.offset_done + size;
        let projected = cur * (self.total_ops - self.ops_done - 1) / (self.ops_done + 1);
        (self.cb)(self.offset_done + offset, cur + projected);
    }
}

const OP_UPGRADE: u8 = 1;
const OP_REFCOUNT: u8 = 2;
const OP_DOWNGRADE: u8 = 3;

/// Amends `filename` (a qcow2 image) with `opts`.
pub fn amend(filename: &str, opts: &CreateOpts, base: &OpenOptions) -> Result<()> {
    amend_with_progress(filename, opts, base, &|_, _| {})
}

/// [`amend`], reporting (done, total) work units to `progress` as it goes.
pub fn amend_with_progress(
    filename: &str,
    opts: &CreateOpts,
    base: &OpenOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    check_opts(opts)?;
    let q = open_rw(filename, base)?;
    // the options parse: qemu-img's progress starts (the driver checks them from here on)
    progress(0, 1);
    let h = Header::read(&q.file)?;
    let old_version = h.version;
    let mut new_version = old_version;
    if let Some(c) = opts.get("compat") {
        new_version = match c {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => {
                return Err(Error::invalid_arg(format!(
                    "Unknown compatibility level {c}"
                )))
            }
        };
    }
    if opts.get("encrypt.iter-time").is_some()
        || opts.iter().any(|(k, _)| k.starts_with("encrypt."))
    {
        return Err(Error::invalid_arg(
            "Can't amend encryption options - encryption not present",
        ));
    }
    let cur_bits = 1u64 << h.refcount_order;
    let mut refcount_bits = cur_bits;
    if let Some(v) = opts.get("refcount_bits") {
        let n = crate::formats::options::parse_number("refcount_bits", v).unwrap_or(0);
        if n == 0 || n > 64 || !n.is_power_of_two() {
            return Err(Error::invalid_arg(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        refcount_bits = n;
    }
    if let Some(df) = opts.get("data_file") {
        let _ = df;
        if !q.has_data_file {
            return Err(Error::invalid_arg(
                "data-file can only be set for images that use an external data file",
            ));
        }
    }
    let cur_raw = h.autoclear & header::AUTOCLEAR_DATA_FILE_RAW != 0;
    let data_file_raw = opts.get_bool("data_file_raw")?.unwrap_or(cur_raw);
    if data_file_raw && !cur_raw {
        return Err(Error::invalid_arg(
            "data-file-raw cannot be set on existing images",
        ));
    }
    let cur_lazy = h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0;
    let lazy = opts.get_bool("lazy_refcounts")?.unwrap_or(cur_lazy);
    let new_size = opts.get_size("size")?.unwrap_or(0);
    drop(q);

    let ops = (new_version != old_version) as u64 + (refcount_bits != cur_bits) as u64;
    let mut prog = AmendProgress::new(progress, ops);
    if new_version > old_version {
        prog.begin(OP_UPGRADE);
        prog.report(0, 2);
        upgrade(filename, base)?;
        // (qemu reports the snapshot table update and the header write)
        prog.report(1, 2);
        prog.report(2, 2);
    }
    if refcount_bits != cur_bits {
        if new_version < 3 && refcount_bits != 16 {
            return Err(Error::invalid_arg(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        prog.begin(OP_REFCOUNT);
        prog.report(0, 1);
        change_refcount_order(filename, base, refcount_bits.trailing_zeros())?;
        prog.report(1, 1);
    }
    {
        let q = open_rw(filename, base)?;
        let mut h = Header::read(&q.file)?;
        if !data_file_raw {
            h.autoclear &= !header::AUTOCLEAR_DATA_FILE_RAW;
        }
        if let Some(df) = opts.get("data_file") {
            h.data_file = if df.is_empty() {
                None
            } else {
                Some(df.to_string())
            };
        }
        write_header(&q, &h)?;
        let bf = opts.get("backing_file");
        let bfmt = opts.get("backing_fmt");
        if (bf.is_some() || bfmt.is_some())
            && (bf != h.backing_file.as_deref() || bfmt != h.backing_format.as_deref())
        {
            return Err(Error::invalid_arg(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
            ));
        }
        if lazy != cur_lazy {
            if lazy && new_version < 3 {
                return Err(Error::invalid_arg(
                    "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
                ));
            }
            if lazy {
                h.compatible |= header::COMPAT_LAZY_REFCOUNTS;
            } else {
                h.compatible &= !header::COMPAT_LAZY_REFCOUNTS;
            }
            write_header(&q, &h)?;
        }
        q.close()?;
    }
    if new_size != 0 {
        let q = open_rw(filename, base)?;
        let old = q.current_size()?;
        if new_size != old {
            q.resize(new_size, None)?;
        }
        q.close()?;
    }
    if new_version < old_version {
        prog.begin(OP_DOWNGRADE);
        downgrade(filename, base, &mut prog)?;
    }
    Ok(())
}

/// Writes the whole header cluster from `h`.
fn write_header(q: &Qcow2, h: &Header) -> Result<()> {
    let b = h.serialize()?;
    q.file.write_at(&b, 0)?;
    q.file.sync()
}

fn upgrade(filename: &str, base: &OpenOptions) -> Result<()> {
    let q = open_rw(filename, base)?;
    // snapshots get their v3 extra data (disk size) before the header says v3
    let list = super::snapshot::read_table(&q)?;
    if !list.is_empty() {
        let size = q.current_size()?;
        let mut m = q.meta.lock().unwrap();
        q.rewrite_snapshot_table(&mut m, &list, size)?;
        q.flush_meta(&mut m)?;
    }
    let mut h = Header::read(&q.file)?;
    h.version = 3;
    h.header_length = 112;
    if h.cluster_size() > 4096 && h.feature_names.is_empty() {
        h.feature_names = Header::default_feature_names();
    }
    write_header(&q, &h)?;
    q.close()
}

fn downgrade(filename: &str, base: &OpenOptions, prog: &mut AmendProgress) -> Result<()> {
    let q = open_rw(filename, base)?;
    let h = Header::read(&q.file)?;
    if h.refcount_order != 4 {
        return Err(Error::unsupported("compat=0.10 requires refcount_bits=16"));
    }
    if q.has_data_file {
        return Err(Error::unsupported(
            "Cannot downgrade an image with a data file",
        ));
    }
    let size = q.current_size()?;
    let list = super::snapshot::read_table(&q)?;
    if list
        .iter()
        .any(|s| s.vm_state_size > u32::MAX as u64 || s.disk_size.is_some_and(|d| d != size))
    {
        return Err(Error::unsupported(
            "Internal snapshots prevent downgrade of image",
        ));
    }
    let incompat = h.incompatible & !header::INCOMPAT_COMPRESSION & !header::INCOMPAT_DIRTY;
    if incompat != 0 {
        return Err(Error::unsupported(format!(
            "Cannot downgrade an image with incompatible features {incompat:#x} set"
        )));
    }
    {
        let mut m = q.meta.lock().unwrap();
        q.start_write(&mut m)?;
        let l1_len = m.l1.len() as u64;
        // progress: L1 entries visited, the active table's and every snapshot's
        let total = l1_len + list.iter().map(|s| s.l1_size as u64).sum::<u64>();
        let mut visited = 0;
        for i in 0..l1_len {
            visited += 1;
            let Some(l2) = q.l2_table_for_read(&mut m, i)? else {
                prog.report(visited, total);
                continue;
            };
            let entries = q.l2_entries_of(&mut m, l2)?;
            for (j, (w, _)) in entries.into_iter().enumerate() {
                if w & OFLAG_ZERO == 0 || w & OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let gcl = i * q.l2_entries + j as u64;
                if q.backing.is_none() {
                    let l2w = q.l2_table_for_write(&mut m, i)?;
                    if w & L2E_OFFSET_MASK != 0 {
                        q.free_entry(&mut m, w);
                    }
                    q.l2_set(&mut m, l2w, j as u64, 0, 0)?;
                } else {
                    let zeros = vec![0u8; q.cs as usize];
                    q.write_cluster(&mut m, gcl, 0, &zeros)?;
                }
            }
            prog.report(visited, total);
        }
        q.flush_meta(&mut m)?;
        for s in &list {
            if let Err(e) = s.validate_l1(q.cs) {
                crate::warn::emit(&format!("{}: {}", super::check::prog_name(), e.message()));
                let errno = super::snapshot::validate_errno(&e);
                return Err(
                    e.with_message(format!("Failed to turn zero into data clusters: {errno}"))
                );
            }
            let mut raw = vec![0u8; s.l1_size as usize * 8];
            q.file.read_at(&mut raw, s.l1_table_offset)?;
            for c in raw.chunks_exact(8) {
                visited += 1;
                let l2 = u64::from_be_bytes(c.try_into().unwrap()) & L1E_OFFSET_MASK;
                if l2 != 0 {
                    q.expand_snapshot_zeroes(&mut m, l2)?;
                }
                prog.report(visited, total);
            }
        }
        q.flush_meta(&mut m)?;
        if h.incompatible & header::INCOMPAT_COMPRESSION != 0 {
            for i in 0..l1_len {
                let Some(l2) = q.l2_table_for_read(&mut m, i)? else {
                    continue;
                };
                if q.l2_entries_of(&mut m, l2)?
                    .iter()
                    .any(|(w, _)| w & OFLAG_COMPRESSED != 0)
                {
                    return Err(Error::unsupported(
                        "Cannot downgrade an image with zstd compression type and existing compressed clusters",
                    ));
                }
            }
        }
    }
    q.close()?;
    let mut h = Header::read(&q.file)?;
    h.version = 2;
    h.incompatible = 0;
    h.compatible = 0;
    h.autoclear = 0;
    h.header_length = 72;
    h.unknown_fields.clear();
    h.feature_names.clear();
    h.compression = header::Compression::Zlib;
    h.bitmaps = None;
    h.data_file = None;
    h.unknown_exts.retain(|e| e.kind != header::EXT_BITMAPS);
    write_header(&q, &h)?;
    // closed already: dropping writes nothing more
    drop(q);
    Ok(())
}

impl Qcow2 {
    /// Makes the zero clusters of a snapshot's L2 table at `l2` plain ones, as qemu's
    /// downgrade does: without a backing file an unallocated zero cluster becomes
    /// unallocated; otherwise it gets a cluster of zeroes (with the table's refcount, as
    /// every image that shares the table references it), and a preallocated one gets zeroes
    /// written. The table is changed in place (it may be shared: it reads the same after).
    fn expand_snapshot_zeroes(&self, m: &mut super::tables::Meta, l2: u64) -> Result<()> {
        if l2 % self.cs != 0 {
            return Err(self.corrupt_err(format!("L2 table offset {l2:#x} unaligned")));
        }
        let l2_refs = self.refcount(m, l2 / self.cs)?;
        let zeros = vec![0u8; self.cs as usize];
        for (j, (w, _)) in self.l2_entries_of(m, l2)?.into_iter().enumerate() {
            if w & OFLAG_ZERO == 0 || w & OFLAG_COMPRESSED != 0 {
                continue;
            }
            let mut host = w & L2E_OFFSET_MASK;
            if host == 0 {
                if self.backing.is_none() {
                    self.l2_set(m, l2, j as u64, 0, 0)?;
                    continue;
                }
                host = self.alloc_clusters(m, 1)?;
                if l2_refs > 1 {
                    self.update_refcount(m, host / self.cs, l2_refs as i64 - 1)?;
                }
            }
            self.overlap_check(m, host, self.cs, "data")?;
            // the zeroes are on disk before any table points at them
            self.file.write_at(&zeros, host)?;
            let copied = if self.refcount(m, host / self.cs)? == 1 {
                super::OFLAG_COPIED
            } else {
                0
            };
            self.l2_set(m, l2, j as u64, host | copied, 0)?;
        }
        Ok(())
    }
}

fn set_rc(data: &mut [u8], order: u32, i: u64, v: u64) {
    if order < 3 {
        let bits = 1u64 << order;
        let bit = i * bits;
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        let b = &mut data[(bit / 8) as usize];
        *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
    } else {
        let w = 1usize << (order - 3);
        let s = i as usize * w;
        data[s..s + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
    }
}

/// Rewrites the refcount table and blocks with entries of `1 << order` bits, after the end
/// of the file; the header switches to them in one write.
fn change_refcount_order(filename: &str, base: &OpenOptions, order: u32) -> Result<()> {
    let q = open_rw(filename, base)?;
    let cs = q.cs;
    let mut m = q.meta.lock().unwrap();
    q.flush_meta(&mut m)?;
    let flen = q.file.len()?;
    let n = flen.div_ceil(cs);
    let mut counts = Vec::with_capacity(n as usize);
    for c in 0..n {
        counts.push(q.refcount(&mut m, c)?);
    }
    // the old structures go away
    for c in 0..m.rt_clusters {
        if let Some(x) = counts.get_mut(((m.rt_offset / cs) + c) as usize) {
            *x = 0;
        }
    }
    for &e in &m.rt {
        let off = e & super::REFT_OFFSET_MASK;
        if off != 0 {
            if let Some(x) = counts.get_mut((off / cs) as usize) {
                *x = 0;
            }
        }
    }
    let bits = 1u64 << order;
    let max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    if let Some((c, &v)) = counts.iter().enumerate().find(|(_, &v)| v > max) {
        return Err(Error::invalid_arg(format!(
            "Cannot decrease refcount entry width to {bits} bits: Cluster at offset {:#x} has a refcount of {v}",
            c as u64 * cs
        )));
    }
    let rbe = cs * 8 / bits;
    let (mut k, mut t) = (0u64, 0u64);
    loop {
        let total = n + k + t;
        let nk = total.div_ceil(rbe);
        let nt = (nk * 8).div_ceil(cs).max(1);
        if nk == k && nt == t {
            break;
        }
        k = nk;
        t = nt;
    }
    if t * cs > header::MAX_REFTABLE_BYTES {
        return Err(Error::too_large("Refcount table too large"));
    }
    counts.resize((n + k + t) as usize, 1);
    let mut table = vec![0u8; (t * cs) as usize];
    for b in 0..k {
        let mut data = vec![0u8; cs as usize];
        for i in 0..rbe {
            let c = b * rbe + i;
            if c as usize >= counts.len() {
                break;
            }
            set_rc(&mut data, order, i, counts[c as usize]);
        }
        let off = (n + b) * cs;
        q.file.write_at(&data, off)?;
        table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    q.file.write_at(&table, (n + k) * cs)?;
    q.file.sync()?;
    let mut h = Header::read(&q.file)?;
    h.refcount_table_offset = (n + k) * cs;
    h.refcount_table_clusters = t as u32;
    h.refcount_order = order;
    write_header(&q, &h)?;
    drop(m);
    // nothing is cached dirty, so dropping the (now stale) driver writes nothing
    drop(q);
    Ok(())
}
