//! `convert`: copy one or more images (concatenated) into a new image of any format.

use crate::error::{Error, Result};
use crate::formats::qcow2::bitmap::{BitmapAction, MergeSource};
use crate::formats::qcow2::Qcow2;
use crate::formats::{self, BlockDriver, CreateOpts, Format, OpenOptions, SnapshotSel};
use crate::ops::engine::{self, CopyParams, CopyStats, Source};

/// Everything `qemu-img convert` takes.
#[derive(Clone)]
pub struct ConvertOptions {
    /// Source images, concatenated.
    pub sources: Vec<String>,
    /// Source format (`-f`), probed when `None`.
    pub source_format: Option<Format>,
    /// Per-source formats (`--image-opts` specifications name one each); where given, they
    /// replace `source_format` (`None` probes).
    pub source_formats: Vec<Option<Format>>,
    /// Target image; `-` writes a streamOptimized vmdk to standard output (the only format
    /// that can be written sequentially).
    pub target: String,
    /// Target format name (`-O`, default raw); checked after the sources are open, as
    /// qemu-img does.
    pub target_format: String,
    /// With `no_create`: probe the target's format when opening it (a `--target-image-opts`
    /// specification without a driver; `target_format` names what the caller probed).
    pub target_probe: bool,
    /// Target `-o` options.
    pub target_opts: CreateOpts,
    /// `-c`
    pub compress: bool,
    /// `-n`: the target exists already.
    pub no_create: bool,
    /// `--target-is-zero`
    pub target_is_zero: bool,
    /// `-S` in bytes (default 4096).
    pub sparse_size: u64,
    /// `-B`
    pub backing: Option<String>,
    /// `-F`
    pub backing_format: Option<String>,
    /// `-U`
    pub force_share: bool,
    /// `-m` (default: the number of cores, at most 16).
    pub workers: usize,
    /// `-W`
    pub out_of_order: bool,
    /// `--salvage`
    pub salvage: bool,
    /// `-r` in bytes per second.
    pub rate: Option<u64>,
    /// `-C`: copy offloading; like qemu-img, every byte is copied (no sparse detection).
    pub copy_range: bool,
    /// `-T none`
    pub src_direct: bool,
    /// `-t none`
    pub tgt_direct: bool,
    /// Flush the target to stable storage (any `-t` but `unsafe`, qemu-img's default).
    pub tgt_flush: bool,
    /// `-l`: convert from this internal snapshot of the (first) source, read-only.
    pub snapshot: Option<SnapshotSel>,
    /// `--bitmaps`: copy the persistent bitmaps of the (single) qcow2 source.
    pub bitmaps: bool,
    /// `--skip-broken-bitmaps`: skip inconsistent bitmaps instead of failing.
    pub skip_broken_bitmaps: bool,
    /// Called with each warning (e.g. a skipped bitmap) as it happens.
    pub warn: Option<fn(&str)>,
}

impl ConvertOptions {
    /// Defaults for copying `sources` to `target` as raw.
    pub fn new(sources: Vec<String>, target: String) -> Self {
        ConvertOptions {
            sources,
            source_format: None,
            source_formats: Vec::new(),
            target,
            target_format: "raw".to_string(),
            target_probe: false,
            target_opts: CreateOpts::new(),
            compress: false,
            no_create: false,
            target_is_zero: false,
            sparse_size: 4096,
            backing: None,
            backing_format: None,
            force_share: false,
            workers: default_workers(),
            out_of_order: false,
            salvage: false,
            rate: None,
            copy_range: false,
            src_direct: false,
            tgt_direct: false,
            tgt_flush: false,
            snapshot: None,
            bitmaps: false,
            skip_broken_bitmaps: false,
            warn: None,
        }
    }
}

/// Worker threads by default: the machine's cores (at least 2: reads overlap writes).
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 16)
}

/// Runs a conversion; `progress` is called with (done, total) bytes.
pub fn convert(
    opts: &ConvertOptions,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<CopyStats> {
    if opts.sources.is_empty() {
        return Err(Error::invalid_arg("Must specify image file name"));
    }
    let mut srcs: Vec<Box<dyn BlockDriver>> = Vec::new();
    for (i, name) in opts.sources.iter().enumerate() {
        let o = OpenOptions {
            format: opts
                .source_formats
                .get(i)
                .copied()
                .unwrap_or(opts.source_format),
            force_share: opts.force_share,
            direct: opts.src_direct,
            exclusive: true,
            ..OpenOptions::default()
        };
        srcs.push(formats::open(name, &o)?);
    }
    // qemu sizes the target before loading the snapshot: the image's size, not the snapshot's
    let total: u64 = srcs.iter().map(|s| s.virtual_size()).sum();
    if let Some(sel) = &opts.snapshot {
        if matches!(sel, SnapshotSel::IdOrName(_)) && srcs.len() > 1 {
            return Err(Error::invalid_arg(
                "No support for concatenating multiple snapshot",
            ));
        }
        srcs[0].load_snapshot_tmp(sel).map_err(|e| {
            let msg = format!("Failed to load snapshot: {}", e.message());
            e.with_message(msg)
        })?;
    }
    let target_format = Format::from_name(&opts.target_format)
        .map_err(|_| Error::invalid_arg(format!("Unknown file format '{}'", opts.target_format)))?;
    let mut topts = opts.target_opts.clone();
    let accepted = |k: &str| {
        formats::create_options(target_format)
            .iter()
            .chain(formats::raw::PROTOCOL_OPTS)
            .any(|d| d.name == k)
    };
    if !opts.no_create {
        for (k, _) in topts.iter() {
            if !accepted(k) {
                return Err(Error::invalid_arg(format!("Invalid parameter '{k}'")));
            }
        }
        topts.set("size", &total.to_string());
        if let Some(b) = &opts.backing {
            if !accepted("backing_file") {
                return Err(Error::invalid_arg(format!(
                    "Backing file not supported for file format '{target_format}'"
                )));
            }
            topts.set("backing_file", b);
        }
        if let Some(f) = &opts.backing_format {
            if !accepted("backing_fmt") {
                return Err(Error::invalid_arg(format!(
                    "Backing file format not supported for file format '{target_format}'"
                )));
            }
            topts.set("backing_fmt", f);
        }
    }
    let backing = topts.get("backing_file").map(str::to_string);
    if opts.target_is_zero && backing.is_some() {
        return Err(Error::invalid_arg(
            "Cannot use --target-is-zero when the destination image has a backing file",
        ));
    }
    if srcs.len() > 1 && backing.is_some() {
        return Err(Error::invalid_arg(
            "Having a backing file for the target makes no sense when concatenating multiple input images",
        ));
    }
    if backing.is_some() && topts.get("backing_fmt").is_none() {
        return Err(Error::invalid_arg(
            "Use of backing file requires explicit backing format",
        ));
    }
    if opts.compress {
        if !matches!(target_format, Format::Qcow2 | Format::Vmdk) {
            return Err(Error::unsupported(
                "Compression not supported for this file format",
            ));
        }
        if topts.get("preallocation").is_some_and(|p| p != "off") {
            return Err(Error::invalid_arg(
                "Compression and preallocation not supported at the same time",
            ));
        }
    }
    if opts.bitmaps {
        if srcs.len() > 1 {
            return Err(Error::invalid_arg(
                "Copying bitmaps only possible with single source",
            ));
        }
        check_bitmaps(srcs[0].as_ref(), opts.skip_broken_bitmaps)?;
    }
    let to_stdout = opts.target == "-";
    if to_stdout {
        let stream =
            target_format == Format::Vmdk && topts.get("subformat") == Some("streamOptimized");
        if !stream || opts.no_create {
            return Err(Error::invalid_arg(
                "'-' (standard output) as the target needs -O vmdk -o subformat=streamOptimized and image creation (no -n)",
            ));
        }
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            return Err(Error::invalid_arg(
                "refusing to write an image to a terminal; redirect or pipe standard output",
            ));
        }
        if opts.out_of_order {
            return Err(Error::invalid_arg(
                "-W cannot be used when writing to standard output (the stream is written in order)",
            ));
        }
    }
    if !opts.no_create && !to_stdout {
        formats::create(&opts.target, target_format, &topts).map_err(|e| {
            let msg = e
                .message()
                .strip_prefix(&format!("{}: ", opts.target))
                .unwrap_or(e.message())
                .to_string();
            e.with_message(format!(
                "{}: error while converting {}: {msg}",
                opts.target, target_format
            ))
        })?;
    }
    let tgt = if to_stdout {
        let sink = std::sync::Arc::new(crate::io::SeqFile::stdout()?);
        formats::vmdk::create_on_sink(sink, &topts)?
    } else {
        formats::open(
            &opts.target,
            &OpenOptions {
                format: (!(opts.target_probe && opts.no_create)).then_some(target_format),
                write: true,
                direct: opts.tgt_direct,
                no_flush: !opts.tgt_flush,
                // With a backing file (-B, or -n onto an overlay), a write of part of a
                // target cluster copies the rest from the backing, as in qemu-img, which
                // opens the target with its backing chain.
                no_backing: backing.is_none(),
                ..OpenOptions::default()
            },
        )?
    };
    if opts.bitmaps && !supports_bitmaps(tgt.as_ref()) {
        return Err(Error::unsupported(format!(
            "Format driver '{}' does not support bitmaps",
            tgt.format()
        )));
    }
    if opts.no_create && tgt.virtual_size() < total {
        return Err(Error::invalid_arg("output file is smaller than input file"));
    }
    let mut sources = Vec::new();
    let mut off = 0u64;
    for s in &srcs {
        sources.push(Source::whole(s.as_ref(), off));
        off += s.virtual_size();
    }
    let params = CopyParams {
        progress_by_data: true,
        sources,
        target: tgt.as_ref(),
        target_is_zero: !opts.no_create || opts.target_is_zero,
        top_only: backing.is_some(),
        target_has_backing: backing.is_some(),
        sparse_size: opts.sparse_size,
        compress: opts.compress,
        cluster_size: tgt.cluster_size().unwrap_or(512),
        workers: opts.workers,
        out_of_order: opts.out_of_order,
        salvage: opts.salvage,
        progress,
        rate: opts.rate,
        // -S 0 copies every byte, holes included, as qemu-img does
        dense: opts.sparse_size == 0,
        copy_offload: opts.copy_range && offload_capable(&srcs, tgt.as_ref()),
    };
    let stats = engine::copy(&params)?;
    if opts.bitmaps {
        let r = copy_bitmaps(srcs[0].as_ref(), tgt.as_ref(), opts);
        let closed = tgt.close();
        r?;
        closed?;
    } else {
        tgt.close()?;
    }
    Ok(stats)
}

/// Can a `-C` copy range go through every layer, as qemu's drivers allow (raw and qcow2
/// implement copy offloading; the others make qemu fall back to reading and writing)?
fn offload_capable(srcs: &[Box<dyn BlockDriver>], tgt: &dyn BlockDriver) -> bool {
    let ok = |f: Format| matches!(f, Format::Raw | Format::Qcow2);
    srcs.iter().all(|s| {
        let mut cur: Option<&dyn BlockDriver> = Some(s.as_ref());
        while let Some(c) = cur {
            if !ok(c.format()) {
                return false;
            }
            cur = c.backing();
        }
        true
    }) && ok(tgt.format())
}

/// Does the image store persistent bitmaps (qcow2 v3)?
fn supports_bitmaps(img: &dyn BlockDriver) -> bool {
    img.as_any()
        .downcast_ref::<Qcow2>()
        .is_some_and(|q| q.header().version >= 3)
}

/// qemu-img's `convert_check_bitmaps`.
fn check_bitmaps(src: &dyn BlockDriver, skip_broken: bool) -> Result<()> {
    if !supports_bitmaps(src) {
        return Err(Error::unsupported("Source lacks bitmap support"));
    }
    let q = src.as_any().downcast_ref::<Qcow2>().expect("qcow2");
    if !skip_broken {
        // qemu-img walks the bitmaps last to first
        if let Some(b) = q.bitmap_list().iter().rev().find(|b| b.flags & 1 != 0) {
            return Err(Error::invalid_arg(format!(
                "Cannot copy inconsistent bitmap '{}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it",
                b.name
            )));
        }
    }
    Ok(())
}

/// qemu-img's `convert_copy_bitmaps`: each persistent bitmap of the source is added to the
/// target (same granularity, same enabled state) and filled from the source's bits.
fn copy_bitmaps(src: &dyn BlockDriver, tgt: &dyn BlockDriver, opts: &ConvertOptions) -> Result<()> {
    let (Some(sq), Some(tq)) = (
        src.as_any().downcast_ref::<Qcow2>(),
        tgt.as_any().downcast_ref::<Qcow2>(),
    ) else {
        return Ok(());
    };
    if sq.bitmap_list().is_empty() {
        return Ok(());
    }
    // qemu-img walks the bitmaps last to first (its warnings come in that order) and its
    // target lists them in the source's order
    if let Some(w) = opts.warn {
        for b in sq.bitmap_list().iter().rev().filter(|b| b.flags & 1 != 0) {
            w(&format!("Skipping inconsistent bitmap '{}'", b.name));
        }
    }
    let mut ed = tq.bitmap_editor()?;
    let mut result = Ok(());
    for b in sq.bitmap_list() {
        let name = &b.name;
        if b.flags & 1 != 0 {
            continue;
        }
        let add = BitmapAction::Add {
            granularity: Some(b.granularity),
        };
        let disable = b.flags & 2 == 0;
        let created = ed.apply(name, &add).and_then(|()| {
            if disable {
                ed.apply(name, &BitmapAction::Disable)
            } else {
                Ok(())
            }
        });
        if let Err(e) = created {
            let msg = format!("Failed to create bitmap {name}: {}", e.message());
            result = Err(e.with_message(msg));
            break;
        }
        let merged = sq.read_bitmap(name).and_then(|data| {
            ed.apply(
                name,
                &BitmapAction::Merge {
                    source: name.clone(),
                    from: MergeSource::Other(data),
                },
            )
        });
        if let Err(e) = merged {
            let _ = ed.apply(name, &BitmapAction::Remove);
            let msg = format!("Failed to populate bitmap {name}: {}", e.message());
            result = Err(e.with_message(msg));
            break;
        }
    }
    let stored = ed.commit();
    result?;
    stored
}
