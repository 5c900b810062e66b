//! `rebase`: change the backing file of an image.
//!
//! Safe mode keeps the guest view: every range the overlay does not hold itself and where
//! the old backing chain and the new one read differently gets the old view's data written
//! into the overlay (compressed with `-c`); then the header names the new backing file.
//! Unsafe mode (`-u`) only rewrites the header. Reads and comparisons run on several
//! threads; writes happen in guest order, so the overlay is laid out as qemu-img lays it.

use crate::error::{Error, ErrorKind, Result};
use crate::formats::{self, BlockDriver, Format, Mapping, OpenOptions, Prepared};
use crate::io::is_zero;
use crate::ops::commit::{find_in_chain, layers, AboveBase};

/// What `rebase` takes.
#[derive(Debug, Clone)]
pub struct RebaseOptions {
    /// Format of the overlay (`-f`), probed when `None`.
    pub format: Option<Format>,
    /// `-b`: the new backing file; `Some("")` removes the backing file. `None` is only
    /// allowed in unsafe mode (and removes the backing file too).
    pub backing: Option<String>,
    /// `-F`: the format of the new backing file.
    pub backing_format: Option<String>,
    /// `-u`: only rewrite the header.
    pub unsafe_mode: bool,
    /// `-c`: write copied clusters compressed.
    pub compress: bool,
    /// `-U`: open the new backing file without conflicting locks.
    pub force_share: bool,
    /// Worker threads that read and compare.
    pub workers: usize,
}

impl Default for RebaseOptions {
    fn default() -> Self {
        RebaseOptions {
            format: None,
            backing: None,
            backing_format: None,
            unsafe_mode: false,
            compress: false,
            force_share: false,
            workers: crate::ops::convert::default_workers(),
        }
    }
}

/// The unit of work: qemu-img's buffer size.
const WINDOW: u64 = 2 << 20;

/// A write prepared by a worker: ranges are offsets into its window's `old` buffer.
enum Op {
    Data(u64, std::ops::Range<usize>),
    Zero(u64, u64),
    Compressed(u64, std::ops::Range<usize>),
    Prepared(u64, Vec<u8>),
}

/// The buffers of one window in flight (reused from batch to batch).
#[derive(Default)]
struct Slot {
    old: Vec<u8>,
    new: Vec<u8>,
    ops: Vec<Op>,
}

struct Ctx<'a> {
    img: &'a dyn BlockDriver,
    old: Option<&'a dyn BlockDriver>,
    new: Option<&'a dyn BlockDriver>,
    /// When the new backing file is in the old chain: the layers between them.
    between: Option<AboveBase<'a>>,
    size: u64,
    old_size: u64,
    new_size: u64,
    align: u64,
    compress: bool,
}

fn change_err(name: Option<&str>, why: &str) -> Error {
    Error::invalid_arg(format!(
        "Could not change the backing file to '{}': {why}",
        name.unwrap_or("(null)")
    ))
}

fn is_compress_capable(f: Format) -> bool {
    matches!(f, Format::Qcow2 | Format::Vmdk)
}

/// Rebases `filename`. `progress` gets (bytes done, total).
pub fn rebase(
    filename: &str,
    o: &RebaseOptions,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<()> {
    let img = formats::open(
        filename,
        &OpenOptions {
            format: o.format,
            write: true,
            no_backing: o.unsafe_mode,
            ..OpenOptions::default()
        },
    )?;
    if o.compress && !is_compress_capable(img.format()) {
        return Err(Error::unsupported(
            "Compression not supported for this file format",
        ));
    }
    if let Some(f) = &o.backing_format {
        // with -u the name is only recorded: any driver qemu knows will do
        let recorded = o.unsafe_mode && formats::QEMU_DRIVER_NAMES.contains(&f.as_str());
        if Format::from_name(f).is_err() && !recorded {
            return Err(Error::invalid_arg(format!("Invalid format name: '{f}'")));
        }
    }
    let name = o.backing.as_deref().filter(|n| !n.is_empty());
    // Checks qemu makes when it changes the header, made before any data is copied.
    let header_check = || -> Result<()> {
        if name.is_some() && o.backing_format.is_none() {
            return Err(change_err(name, "backing format must be specified"));
        }
        if name.is_some_and(|n| n.len() > 1023) {
            return Err(change_err(name, "Invalid argument"));
        }
        Ok(())
    };

    if !o.unsafe_mode {
        let old = img.backing();
        let mut new_owned: Option<Box<dyn BlockDriver>> = None;
        let mut new_depth: Option<usize> = None;
        if let Some(n) = name {
            let real = formats::resolve_backing_name(filename, n);
            new_depth = find_in_chain(img.as_ref(), &real);
            if new_depth.is_none() {
                let fmt = o
                    .backing_format
                    .as_deref()
                    .map(Format::from_name)
                    .transpose()?;
                let b = formats::open(
                    &real,
                    &OpenOptions {
                        format: fmt,
                        force_share: o.force_share,
                        ..OpenOptions::default()
                    },
                )
                .map_err(|e| {
                    // qemu names the file once here: "Could not open 'x': why".
                    let twice = format!("Could not open '{real}': Could not open '{real}': ");
                    let inner = match e.message().strip_prefix(twice.as_str()) {
                        Some(why) => format!("Could not open '{real}': {why}"),
                        None => e.message().to_string(),
                    };
                    let msg = format!("Could not open new backing file '{n}': {inner}");
                    e.with_message(msg)
                })?;
                new_owned = Some(b);
            }
        }
        header_check()?;
        let chain = new_depth.map(|d| layers(img.as_ref(), d));
        let new: Option<&dyn BlockDriver> = match (&chain, &new_owned) {
            (Some(ls), _) => ls.last().copied(),
            (None, Some(b)) => Some(b.as_ref()),
            _ => None,
        };
        let between = chain
            .as_ref()
            .filter(|ls| ls.len() > 2)
            .map(|ls| AboveBase::new(ls[1..ls.len() - 1].to_vec()));
        let cs = img.cluster_size().unwrap_or(512).max(1);
        let sub = img
            .as_any()
            .downcast_ref::<crate::formats::qcow2::Qcow2>()
            .map(|q| q.sc)
            .unwrap_or(cs);
        let ctx = Ctx {
            img: img.as_ref(),
            old,
            new,
            between,
            size: img.virtual_size(),
            old_size: old.map(|b| b.virtual_size()).unwrap_or(0),
            new_size: new.map(|b| b.virtual_size()).unwrap_or(0),
            align: if o.compress { cs } else { sub },
            compress: o.compress,
        };
        copy_differences(&ctx, o.workers.clamp(1, 64), progress)?;
        img.flush()?;
    } else {
        header_check()?;
    }
    match img.set_backing_file(name, name.and(o.backing_format.as_deref())) {
        Ok(()) => {}
        Err(e) => {
            let why = match e.kind() {
                ErrorKind::Unsupported => "Operation not supported".to_string(),
                _ => e.message().to_string(),
            };
            return Err(change_err(o.backing.as_deref(), &why));
        }
    }
    if let Some(cb) = progress {
        cb(1, 1);
    }
    img.close()
}

/// The ranges of `[off, end)` that need a comparison: unallocated in the overlay (and,
/// when the new backing file is in the old chain, allocated between the two), widened to
/// the write alignment.
fn candidates(c: &Ctx, off: u64, end: u64) -> Result<Vec<(u64, u64)>> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = off;
    while pos < end {
        let (m, n) = c.img.map(pos, end - pos)?;
        if n == 0 {
            return Err(Error::corrupt(format!(
                "{}: no progress mapping offset {pos}",
                c.img.filename()
            )));
        }
        let n = n.min(end - pos);
        if m == Mapping::Unallocated {
            let mut sub: Vec<(u64, u64)> = Vec::new();
            match &c.between {
                None => sub.push((pos, pos + n)),
                Some(view) => {
                    let mut p = pos;
                    while p < pos + n {
                        let (bm, bn) = view.map(p, pos + n - p)?;
                        if bn == 0 {
                            return Err(Error::corrupt(format!(
                                "{}: no progress mapping offset {p}",
                                c.img.filename()
                            )));
                        }
                        let bn = bn.min(pos + n - p);
                        if bm != Mapping::Unallocated {
                            sub.push((p, p + bn));
                        }
                        p += bn;
                    }
                }
            }
            for (a, b) in sub {
                let a = a / c.align * c.align;
                let b = b.div_ceil(c.align).saturating_mul(c.align).min(c.size);
                match out.last_mut() {
                    Some(last) if last.1 >= a => last.1 = last.1.max(b),
                    _ => out.push((a, b)),
                }
            }
        }
        pos += n;
    }
    Ok(out)
}

fn read_clamped(b: Option<&dyn BlockDriver>, bsize: u64, buf: &mut [u8], off: u64) -> Result<()> {
    let avail = bsize.saturating_sub(off).min(buf.len() as u64) as usize;
    buf[avail..].fill(0);
    if avail > 0 {
        if let Some(b) = b {
            b.read_at(&mut buf[..avail], off)?;
        }
    }
    Ok(())
}

/// Compares the old and new views over the window `[off, end)` and leaves the writes it
/// needs in `slot.ops` (their data in `slot.old`).
fn process_window(c: &Ctx, off: u64, end: u64, slot: &mut Slot) -> Result<()> {
    slot.ops.clear();
    let cands = candidates(c, off, end)?;
    let Some(&(_, last)) = cands.last() else {
        return Ok(());
    };
    let span = (last - off) as usize;
    if slot.old.len() < span {
        slot.old.resize(span, 0);
    }
    if c.new.is_some() && slot.new.len() < span {
        slot.new.resize(span, 0);
    }
    for (a, b) in cands {
        let r = (a - off) as usize..(b - off) as usize;
        let old = &mut slot.old[r.clone()];
        read_clamped(c.old, c.old_size, old, a).map_err(|e| {
            let m = format!("error while reading from old backing file: {}", e.message());
            e.with_message(m)
        })?;
        let old = &slot.old[r.clone()];
        let new: Option<&[u8]> = match c.new {
            Some(_) => {
                let nb = &mut slot.new[r.clone()];
                read_clamped(c.new, c.new_size, nb, a).map_err(|e| {
                    let m = format!("error while reading from new backing file: {}", e.message());
                    e.with_message(m)
                })?;
                Some(&slot.new[r.clone()])
            }
            None => None,
        };
        // Without a new backing file, the new view reads as zero.
        let differs = |x: usize, y: usize| match new {
            Some(nb) => old[x..y] != nb[x..y],
            None => !is_zero(&old[x..y]),
        };
        let n = r.end - r.start;
        let align = c.align as usize;
        let mut i = 0usize;
        while i < n {
            // Runs of chunks (aligned to the write alignment) with the same verdict.
            let first = align.min(n - i);
            let differ = differs(i, i + first);
            let mut j = i + first;
            while j < n {
                let len = align.min(n - j);
                if differs(j, j + len) != differ {
                    break;
                }
                j += len;
            }
            if differ {
                let start = a + i as u64;
                if start >= c.old_size {
                    slot.ops.push(Op::Zero(start, (j - i) as u64));
                } else if c.compress {
                    let mut k = i;
                    while k < j {
                        let len = align.min(j - k);
                        let goff = a + k as u64;
                        let br = r.start + k..r.start + k + len;
                        match c.img.compress_cluster(&slot.old[br.clone()], goff)? {
                            Prepared::Data(d) => slot.ops.push(Op::Prepared(goff, d)),
                            Prepared::Plain => slot.ops.push(Op::Data(goff, br)),
                            Prepared::Unsupported => slot.ops.push(Op::Compressed(goff, br)),
                        }
                        k += len;
                    }
                } else {
                    slot.ops.push(Op::Data(start, r.start + i..r.start + j));
                }
            }
            i = j;
        }
    }
    Ok(())
}

fn apply(img: &dyn BlockDriver, slot: &mut Slot) -> Result<()> {
    for op in slot.ops.drain(..) {
        match op {
            Op::Data(off, r) => img.write_at(&slot.old[r], off),
            Op::Zero(off, len) => img.write_zeroes(off, len, false),
            Op::Compressed(off, r) => img.write_compressed(&slot.old[r], off),
            Op::Prepared(off, d) => img.write_compressed_data(&d, off),
        }
        .map_err(|e| {
            let m = format!("Error while writing to COW image: {}", e.message());
            e.with_message(m)
        })?;
    }
    Ok(())
}

fn copy_differences(
    c: &Ctx,
    workers: usize,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<()> {
    let windows: Vec<(u64, u64)> = (0..c.size.div_ceil(WINDOW))
        .map(|i| (i * WINDOW, ((i + 1) * WINDOW).min(c.size)))
        .collect();
    if let Some(cb) = progress {
        cb(0, c.size);
    }
    let batch_len = workers * 2;
    let mut slots: Vec<Slot> = (0..batch_len).map(|_| Slot::default()).collect();
    // Batches of windows are compared in parallel and written in order.
    for batch in windows.chunks(batch_len) {
        let slots = &mut slots[..batch.len()];
        let per = batch.len().div_ceil(workers);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = batch
                .chunks(per)
                .zip(slots.chunks_mut(per))
                .map(|(part, sl)| {
                    s.spawn(move || -> Result<()> {
                        for (&(a, b), slot) in part.iter().zip(sl.iter_mut()) {
                            process_window(c, a, b, slot)?;
                        }
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::corrupt("rebase worker panicked")))
                })
                .collect()
        });
        for r in results {
            r?;
        }
        for slot in slots.iter_mut() {
            apply(c.img, slot)?;
        }
        if let (Some(cb), Some(&(_, end))) = (progress, batch.last()) {
            cb(end, c.size);
        }
    }
    Ok(())
}
