//! The parallel copy engine: convert, commit and dd move data with it.
//!
//! A planner walks the source's allocation (never reading holes or known zeroes) and cuts it
//! into work items aligned to the target's clusters. Worker threads read, detect zero blocks
//! and write; writes are committed in order (so a qcow2 target is laid out sequentially) or,
//! with `out_of_order`, as soon as they are ready. Memory is bounded by the items in flight:
//! `workers × chunk_size`, whatever the image size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};
use crate::formats::{BlockDriver, Mapping, Prepared};
use crate::io::is_zero;

/// What the guest sees in a range, with the backing chain resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Data that must be read.
    Data,
    /// Reads as zero.
    Zero,
    /// Not allocated in the top layer (only reported when asked not to descend).
    Backing,
}

/// The status of `[offset, offset+max_len)` through the chain of `img`; with `top_only`,
/// unallocated ranges of the top layer are reported as [`Status::Backing`].
pub fn chain_status(
    img: &dyn BlockDriver,
    offset: u64,
    max_len: u64,
    top_only: bool,
) -> Result<(Status, u64)> {
    let (m, len) = img.map(offset, max_len)?;
    if len == 0 {
        return Err(Error::corrupt(format!(
            "{}: no progress mapping offset {offset}",
            img.filename()
        )));
    }
    match m {
        Mapping::Data { .. } | Mapping::Compressed => Ok((Status::Data, len)),
        Mapping::Zero { .. } => Ok((Status::Zero, len)),
        Mapping::Unallocated => {
            if top_only {
                return Ok((Status::Backing, len));
            }
            match img.backing() {
                Some(b) if offset < b.virtual_size() => {
                    let blen = len.min(b.virtual_size() - offset);
                    chain_status(b, offset, blen, false)
                }
                _ => Ok((Status::Zero, len)),
            }
        }
    }
}

/// One source of a copy: a range of an image and where it lands in the target.
pub struct Source<'a> {
    /// The image.
    pub img: &'a dyn BlockDriver,
    /// First byte of the image to copy.
    pub start: u64,
    /// Bytes to copy.
    pub len: u64,
    /// Offset in the target of the source's byte `start`.
    pub target_offset: u64,
}

impl<'a> Source<'a> {
    /// The whole image, landing at `target_offset`.
    pub fn whole(img: &'a dyn BlockDriver, target_offset: u64) -> Self {
        Source {
            img,
            start: 0,
            len: img.virtual_size(),
            target_offset,
        }
    }
}

/// How to copy.
pub struct CopyParams<'a> {
    /// Sources, concatenated in order.
    pub sources: Vec<Source<'a>>,
    /// The target.
    pub target: &'a dyn BlockDriver,
    /// The target reads as zero where not written (fresh image, `--target-is-zero`).
    pub target_is_zero: bool,
    /// Copy only what the top layer of each source holds (`-B`: the target has a backing).
    pub top_only: bool,
    /// The target has a backing file: zeroes must be written explicitly.
    pub target_has_backing: bool,
    /// Zero-detection granularity (`-S`); 0 writes everything that is read.
    pub sparse_size: u64,
    /// Write compressed clusters (always done for a target that compresses every write).
    pub compress: bool,
    /// Target cluster size (chunks are aligned to it).
    pub cluster_size: u64,
    /// Worker threads.
    pub workers: usize,
    /// Commit writes as soon as they are ready (never for a target that compresses every
    /// write: such a stream is written in order; qemu-img accepts -W there too).
    pub out_of_order: bool,
    /// Read errors become zeroes (counted).
    pub salvage: bool,
    /// Called with (bytes done, total) as work completes.
    pub progress: Option<&'a (dyn Fn(u64, u64) + Sync)>,
    /// Progress counts the data to copy only, as qemu-img convert's does (the data runs of
    /// the sources, everything with `-S 0`, measured before the copy starts); otherwise
    /// every guest byte.
    pub progress_by_data: bool,
    /// Bytes per second limit, if any.
    pub rate: Option<u64>,
    /// Read and write every byte, zeroes and holes included (`dd`).
    pub dense: bool,
    /// `convert -C`: data runs are copied as they are, without zero detection, and between
    /// two raw files on the host inside the kernel (copy_file_range(2)); after the first
    /// failure of the kernel copy, reading and writing with zero detection, as qemu-img does.
    pub copy_offload: bool,
}

impl CopyParams<'_> {
    /// Clusters are compressed: asked for, or the target compresses every write (a
    /// streamOptimized VMDK), so that the workers compress rather than the in-order writer.
    fn compressing(&self) -> bool {
        self.compress || self.target.compresses_writes()
    }
    /// Writes are committed in the planner's order.
    fn in_order(&self) -> bool {
        !self.out_of_order || self.target.compresses_writes()
    }
}

/// What a copy did.
#[derive(Debug, Default, Clone)]
pub struct CopyStats {
    /// Bytes read from sources.
    pub bytes_read: u64,
    /// Bytes written as data.
    pub bytes_written: u64,
    /// Bytes written as explicit zeroes.
    pub bytes_zeroed: u64,
    /// Read errors turned into zeroes (`--salvage`).
    pub salvaged_errors: u64,
}

/// A unit of work: consecutive runs of one source, written in one turn. Small runs of a chunk
/// window travel together (a `-B` overlay's scattered clusters between backing ranges would
/// otherwise cost a channel message and an in-order turn each).
struct Item {
    seq: u64,
    src: usize,
    /// Guest bytes covered, for progress.
    len: u64,
    /// Bytes of it that the source's map calls data (progress by data).
    data: u64,
    /// (source offset, length, status), consecutive, in order.
    runs: Vec<(u64, u64, Status)>,
}

/// The default chunk size of a work item.
pub const CHUNK: u64 = crate::limits::ENGINE_CHUNK;
/// Most runs in one grouped item.
const GROUP_RUNS: usize = 1024;
/// Most guest bytes one grouped item spans (progress moves at least this often).
const GROUP_SPAN: u64 = 256 * CHUNK;

/// Copies the sources into the target.
pub fn copy(p: &CopyParams) -> Result<CopyStats> {
    let cluster = p.cluster_size.max(512);
    let chunk = CHUNK.max(cluster).div_ceil(cluster) * cluster;
    let total: u64 = if p.progress.is_some() && p.progress_by_data {
        data_total(p)?
    } else {
        p.sources.iter().map(|s| s.len).sum()
    };
    if p.progress_by_data && total > 0 {
        // the real total before any data moves (a caller's first report cannot know it)
        if let Some(cb) = p.progress {
            cb(0, total);
        }
    }
    let workers = p.workers.clamp(1, crate::limits::ENGINE_MAX_WORKERS);

    let next_write = Mutex::new(0u64);
    let turn = Condvar::new();
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    // bytes done; counted and reported under one lock, so that reports arrive in order
    let done = Mutex::new(0u64);
    let stats = Mutex::new(CopyStats::default());
    let start = std::time::Instant::now();
    let offload = AtomicBool::new(p.copy_offload);

    let (tx, rx) = sync_channel::<Item>(workers * 2);
    let rx = Mutex::new(rx);

    let fail = |e: Error| {
        failed.store(true, Ordering::SeqCst);
        let mut g = first_error.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        drop(g);
        // Take the turn lock so that no waiter misses the wake-up.
        let _turn = next_write.lock().unwrap_or_else(|e| e.into_inner());
        turn.notify_all();
    };

    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buf = crate::io::IoBuf::new();
                loop {
                    let item = {
                        let r = rx.lock().unwrap_or_else(|e| e.into_inner());
                        r.recv()
                    };
                    let Ok(item) = item else { break };
                    if failed.load(Ordering::SeqCst) {
                        continue;
                    }
                    let r = process(
                        p,
                        &item,
                        &mut buf,
                        &next_write,
                        &turn,
                        &failed,
                        &stats,
                        &offload,
                    );
                    match r {
                        Ok(()) => {
                            let n = if p.progress_by_data {
                                item.data
                            } else {
                                item.len
                            };
                            let d = {
                                let mut g = done.lock().unwrap_or_else(|e| e.into_inner());
                                *g += n;
                                if let Some(cb) = p.progress {
                                    // by data, only where some was copied (qemu-img prints
                                    // 100% once when the data is done, and once at the end)
                                    if n > 0 || !p.progress_by_data {
                                        cb(*g, total);
                                    }
                                }
                                *g
                            };
                            if let Some(rate) = p.rate {
                                throttle(d, rate, start);
                            }
                        }
                        Err(e) => fail(e),
                    }
                }
            });
        }
        // The planner runs on this thread.
        let plan = || -> Result<()> {
            let mut seq = 0u64;
            let mut emit = |si: usize, runs: Vec<(u64, u64, Status)>, data: u64| -> bool {
                let (offset, end) = match (runs.first(), runs.last()) {
                    (Some(a), Some(b)) => (a.0, b.0 + b.1),
                    _ => return true,
                };
                let item = Item {
                    seq,
                    src: si,
                    len: end - offset,
                    data,
                    runs,
                };
                seq += 1;
                tx.send(item).is_ok()
            };
            for (si, s) in p.sources.iter().enumerate() {
                let size = s.start + s.len;
                // target offset -> source offset of the next chunk boundary
                let window_end = |pos: u64| {
                    let t = s.target_offset + (pos - s.start);
                    (pos + (chunk - t % chunk)).min(size)
                };
                let mut off = s.start;
                // Windows that are not copied whole (a -B overlay's scattered clusters between
                // backing ranges, zeroes and holes) are grouped into one item until it holds a
                // chunk of data, GROUP_RUNS runs or GROUP_SPAN bytes: one in-order turn per
                // chunk of data rather than per window.
                let mut group: Vec<(u64, u64, Status)> = Vec::new();
                let mut group_data = 0u64;
                // what progress counts of the group (see `counts`)
                let mut group_counted = 0u64;
                while off < size {
                    if failed.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    if !p.dense {
                        // One work item per chunk window holding data: small runs of data,
                        // zeroes and holes travel together (zero blocks are still detected and
                        // skipped), and a compressed cluster is written once, padding included.
                        let wend = window_end(off);
                        let mut runs: Vec<(u64, u64, Status)> = Vec::new();
                        let mut pos = off;
                        while pos < wend {
                            let (st, n) = chain_status(s.img, pos, size - pos, p.top_only)?;
                            let n = n.min(size - pos);
                            runs.push((pos, n, st));
                            pos += n;
                        }
                        let has_data = runs.iter().any(|r| r.2 == Status::Data);
                        let has_backing = runs.iter().any(|r| r.2 == Status::Backing);
                        // Without zero detection (-S 0) a zero run must stay a zero run.
                        // Nor may it with copy offloading (data runs are copied as they are).
                        let mergeable = (p.sparse_size > 0 || p.compressing())
                            && !offload.load(Ordering::SeqCst);
                        if has_data && !has_backing && mergeable {
                            if !group.is_empty()
                                && !emit(si, std::mem::take(&mut group), group_counted)
                            {
                                return Ok(());
                            }
                            group_data = 0;
                            group_counted = 0;
                            let data: u64 = runs
                                .iter()
                                .filter(|r| counts(p, r.2))
                                .map(|r| r.1.min(wend - r.0))
                                .sum();
                            if !emit(si, vec![(off, wend - off, Status::Data)], data) {
                                return Ok(());
                            }
                            off = wend;
                            continue;
                        }
                        // The runs as they are, the last one reaching as far as it goes (whole
                        // chunks for zeroes and holes).
                        let last = runs.len().saturating_sub(1);
                        for (i, r) in runs.iter_mut().enumerate() {
                            let mut rend = r.0 + r.1;
                            if i == last && rend > wend && r.2 != Status::Data {
                                let t = s.target_offset + (rend - s.start);
                                rend = if rend >= size { size } else { rend - t % chunk };
                                rend = rend.max(wend);
                            } else {
                                rend = rend.min(wend);
                            }
                            r.1 = rend - r.0;
                            off = rend;
                        }
                        if has_backing && p.compressing() {
                            let to_target = |pos: u64| s.target_offset + (pos - s.start);
                            runs = whole_clusters(&runs, cluster, to_target);
                        }
                        let (mut data, mut counted) = (0u64, 0u64);
                        for r in &runs {
                            data += if r.2 == Status::Data { r.1 } else { 0 };
                            counted += if counts(p, r.2) { r.1 } else { 0 };
                        }
                        let span = group.first().map_or(0, |f| off - f.0);
                        if group_data + data > chunk
                            || group.len() + runs.len() > GROUP_RUNS
                            || span > GROUP_SPAN
                        {
                            if !emit(si, std::mem::take(&mut group), group_counted) {
                                return Ok(());
                            }
                            group_data = 0;
                            group_counted = 0;
                        }
                        group.extend(runs);
                        group_data += data;
                        group_counted += counted;
                        continue;
                    }
                    // dense (`dd`, -S 0): everything is data, in items cut at the chunk
                    // boundaries of the target offset
                    let n = window_end(off) - off;
                    if !emit(si, vec![(off, n, Status::Data)], n) {
                        return Ok(());
                    }
                    off += n;
                }
                if !emit(si, group, group_counted) {
                    return Ok(());
                }
            }
            Ok(())
        };
        if let Err(e) = plan() {
            fail(e);
        }
        drop(tx);
    });

    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    if let Some(cb) = p.progress {
        cb(total, total);
    }
    Ok(stats.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// Whether progress by data counts a run of this status: data, and with `-c` everything
/// (qemu-img counts every cluster of a compressed copy).
fn counts(p: &CopyParams, st: Status) -> bool {
    st == Status::Data || p.compress
}

/// The bytes a copy's progress counts with `progress_by_data`: the data runs of the sources
/// (with `dense`, everything).
fn data_total(p: &CopyParams) -> Result<u64> {
    if p.dense {
        return Ok(p.sources.iter().map(|s| s.len).sum());
    }
    let mut total = 0u64;
    for s in &p.sources {
        let end = s.start + s.len;
        let mut pos = s.start;
        while pos < end {
            let (st, n) = chain_status(s.img, pos, end - pos, p.top_only)?;
            let n = n.clamp(1, end - pos);
            if counts(p, st) {
                total += n;
            }
            pos += n;
        }
    }
    Ok(total)
}

/// Compressed output over a backing file: a target cluster whose runs differ is copied whole
/// as data (read through the source's chain), as qemu-img does, since a compressed cluster is
/// written once and whole; clusters of one status keep it. `runs` are consecutive.
fn whole_clusters(
    runs: &[(u64, u64, Status)],
    cluster: u64,
    to_target: impl Fn(u64) -> u64,
) -> Vec<(u64, u64, Status)> {
    let mut out: Vec<(u64, u64, Status)> = Vec::new();
    let mut push = |pos: u64, len: u64, st: Status| match out.last_mut() {
        Some(l) if l.2 == st && l.0 + l.1 == pos => l.1 += len,
        _ => out.push((pos, len, st)),
    };
    let (Some(first), Some(last)) = (runs.first(), runs.last()) else {
        return Vec::new();
    };
    let end = last.0 + last.1;
    let mut pos = first.0;
    let mut i = 0;
    while pos < end {
        while runs[i].0 + runs[i].1 <= pos {
            i += 1;
        }
        let (_, _, st) = runs[i];
        let rend = runs[i].0 + runs[i].1;
        let cend = (pos + (cluster - to_target(pos) % cluster)).min(end);
        if rend >= cend {
            // this run reaches the end of the cluster: it goes on as far as whole clusters do
            let upto = if rend >= end {
                end
            } else {
                (rend - to_target(rend) % cluster).max(cend)
            };
            push(pos, upto - pos, st);
            pos = upto;
        } else {
            push(pos, cend - pos, Status::Data);
            pos = cend;
        }
    }
    out
}

fn throttle(done: u64, rate: u64, start: std::time::Instant) {
    if rate == 0 {
        return;
    }
    let due = std::time::Duration::from_secs_f64(done as f64 / rate as f64);
    let el = start.elapsed();
    if due > el {
        std::thread::sleep(due - el);
    }
}

/// A write operation prepared by a worker.
enum Op {
    Write(u64, std::ops::Range<usize>),
    Zero(u64, u64),
    Compressed(u64, std::ops::Range<usize>),
    /// Compressed by the worker already (the driver's `compress_cluster`).
    Prepared(u64, Vec<u8>, u64),
}

#[allow(clippy::too_many_arguments)]
fn process(
    p: &CopyParams,
    item: &Item,
    buf: &mut crate::io::IoBuf,
    next_write: &Mutex<u64>,
    turn: &Condvar,
    failed: &AtomicBool,
    stats: &Mutex<CopyStats>,
    offload: &AtomicBool,
) -> Result<()> {
    let src = &p.sources[item.src];
    let mut ops: Vec<Op> = Vec::new();
    let mut st = CopyStats::default();
    let need_zero_writes = !p.target_is_zero || p.target_has_backing;
    // The buffer holds the item's data runs back to back (at most a chunk).
    let need: u64 = item
        .runs
        .iter()
        .filter(|r| r.2 == Status::Data)
        .map(|r| r.1)
        .sum();
    buf.resize(need as usize);
    let mut base = 0usize;
    for &(offset, len, status) in &item.runs {
        let toff = src.target_offset + (offset - src.start);
        let run = Run {
            offset,
            len,
            base,
            toff,
        };
        if status == Status::Data {
            base += len as usize;
        }
        match status {
            Status::Backing => {}
            Status::Zero => {
                if need_zero_writes {
                    ops.push(Op::Zero(toff, len));
                }
            }
            Status::Data if offload.load(Ordering::SeqCst) => {
                match raw_files(src.img, p.target) {
                    // the kernel copies between two raw files; any failure falls back for good
                    Some((sf, tf)) => {
                        if sf.copy_range_to(offset, tf, toff, len).is_ok() {
                            st.bytes_read += len;
                            st.bytes_written += len;
                        } else {
                            offload.store(false, Ordering::SeqCst);
                            read_and_plan(p, &run, src, buf, need_zero_writes, &mut ops, &mut st)?;
                        }
                    }
                    // through the drivers: the data as it is, zeroes included
                    None => {
                        let r = run.base..run.base + len as usize;
                        src.img.read_at(&mut buf[r.clone()], offset)?;
                        st.bytes_read += len;
                        ops.push(Op::Write(toff, r));
                    }
                }
            }
            Status::Data => {
                read_and_plan(p, &run, src, buf, need_zero_writes, &mut ops, &mut st)?;
            }
        }
    }
    finish(p, item, buf, ops, st, next_write, turn, failed, stats)
}

/// The host files of a raw source and a raw target, for copy offloading.
fn raw_files<'a>(
    src: &'a dyn BlockDriver,
    tgt: &'a dyn BlockDriver,
) -> Option<(&'a crate::io::HostFile, &'a crate::io::HostFile)> {
    use crate::formats::raw::RawDriver;
    let s = src.as_any().downcast_ref::<RawDriver>()?;
    let t = tgt.as_any().downcast_ref::<RawDriver>()?;
    Some((s.file(), t.file()))
}

/// A data run of an item: where it is in the source, in the worker's buffer and in the target.
struct Run {
    offset: u64,
    len: u64,
    base: usize,
    toff: u64,
}

/// Reads a data run and plans its writes (zero detection, compression).
fn read_and_plan(
    p: &CopyParams,
    run: &Run,
    src: &Source,
    buf: &mut crate::io::IoBuf,
    need_zero_writes: bool,
    ops: &mut Vec<Op>,
    st: &mut CopyStats,
) -> Result<()> {
    let n = run.len as usize;
    let toff = run.toff;
    let b = run.base;
    let buf = &mut buf[b..b + n];
    match src.img.read_at(buf, run.offset) {
        Ok(()) => st.bytes_read += run.len,
        Err(e) if p.salvage => {
            let _ = e;
            // Retry sector by sector; unreadable sectors become zero.
            for (i, sec) in buf.chunks_mut(512).enumerate() {
                if src.img.read_at(sec, run.offset + i as u64 * 512).is_err() {
                    sec.fill(0);
                    st.salvaged_errors += 1;
                }
            }
        }
        Err(e) => return Err(e),
    }
    if p.compressing() {
        let cs = p.cluster_size as usize;
        let mut pos = 0usize;
        while pos < n {
            // clusters are aligned in the target; chunk starts are cluster-aligned
            let in_cluster = ((toff + pos as u64) % cs as u64) as usize;
            let len = (cs - in_cluster).min(n - pos);
            let part = &buf[pos..pos + len];
            // -S 0 compresses zero clusters too (qemu-img allocates everything)
            if p.sparse_size > 0 && is_zero(part) {
                if need_zero_writes {
                    ops.push(Op::Zero(toff + pos as u64, len as u64));
                }
            } else if in_cluster == 0
                && (len == cs || toff + (pos + len) as u64 >= p.target.virtual_size())
            {
                let off = toff + pos as u64;
                let r = b + pos..b + pos + len;
                match p.target.compress_cluster(part, off)? {
                    Prepared::Data(data) => ops.push(Op::Prepared(off, data, len as u64)),
                    Prepared::Plain => ops.push(Op::Write(off, r)),
                    Prepared::Unsupported => ops.push(Op::Compressed(off, r)),
                }
            } else {
                ops.push(Op::Write(toff + pos as u64, b + pos..b + pos + len));
            }
            pos += len;
        }
    } else {
        plan_sparse(buf, b, toff, p.sparse_size as usize, need_zero_writes, ops);
    }
    Ok(())
}

/// Waits for the item's turn (in order) and performs its writes.
#[allow(clippy::too_many_arguments)]
fn finish(
    p: &CopyParams,
    item: &Item,
    buf: &[u8],
    ops: Vec<Op>,
    mut st: CopyStats,
    next_write: &Mutex<u64>,
    turn: &Condvar,
    failed: &AtomicBool,
    stats: &Mutex<CopyStats>,
) -> Result<()> {
    // Wait for our turn (in-order mode).
    if p.in_order() {
        let mut g = next_write.lock().unwrap_or_else(|e| e.into_inner());
        while *g != item.seq {
            if failed.load(Ordering::SeqCst) {
                return Ok(());
            }
            g = turn.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
    let r = (|| -> Result<()> {
        for op in &ops {
            match op {
                Op::Write(off, r) => {
                    p.target.write_at(&buf[r.clone()], *off)?;
                    st.bytes_written += (r.end - r.start) as u64;
                }
                Op::Compressed(off, r) => {
                    p.target.write_compressed(&buf[r.clone()], *off)?;
                    st.bytes_written += (r.end - r.start) as u64;
                }
                Op::Prepared(off, data, len) => {
                    p.target.write_compressed_data(data, *off)?;
                    st.bytes_written += len;
                }
                Op::Zero(off, len) => {
                    p.target.write_zeroes(*off, *len, !p.target_has_backing)?;
                    st.bytes_zeroed += len;
                }
            }
        }
        Ok(())
    })();
    if p.in_order() {
        let mut g = next_write.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        turn.notify_all();
    }
    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
    s.bytes_read += st.bytes_read;
    s.bytes_written += st.bytes_written;
    s.bytes_zeroed += st.bytes_zeroed;
    s.salvaged_errors += st.salvaged_errors;
    r
}

/// Splits a data buffer into writes and zero runs at `sparse`-byte granularity; `buf` sits at
/// `base` in the worker's buffer, which the write ranges refer to.
fn plan_sparse(
    buf: &[u8],
    base: usize,
    toff: u64,
    sparse: usize,
    zero_writes: bool,
    ops: &mut Vec<Op>,
) {
    let n = buf.len();
    if sparse == 0 {
        ops.push(Op::Write(toff, base..base + n));
        return;
    }
    let mut pos = 0usize;
    let mut run_start = 0usize;
    let mut run_zero: Option<bool> = None;
    let flush = |ops: &mut Vec<Op>, zero: bool, a: usize, b: usize| {
        if a == b {
            return;
        }
        if zero {
            if zero_writes {
                ops.push(Op::Zero(toff + a as u64, (b - a) as u64));
            }
        } else {
            ops.push(Op::Write(toff + a as u64, base + a..base + b));
        }
    };
    while pos < n {
        // blocks aligned to the target offset
        let in_blk = ((toff + pos as u64) % sparse as u64) as usize;
        let len = (sparse - in_blk).min(n - pos);
        let z = is_zero(&buf[pos..pos + len]);
        match run_zero {
            Some(cur) if cur == z => {}
            Some(cur) => {
                flush(ops, cur, run_start, pos);
                run_start = pos;
                run_zero = Some(z);
            }
            None => run_zero = Some(z),
        }
        pos += len;
    }
    if let Some(cur) = run_zero {
        flush(ops, cur, run_start, n);
    }
}
