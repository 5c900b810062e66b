//! `dd`: copy a range of an image into a new image, dd(1) style, with qemu-img's sizing.

use crate::error::{Error, Result};
use crate::formats::{self, CreateOpts, Format, OpenOptions};
use crate::ops::engine::{self, CopyParams, Source};

/// What `qemu-img dd` takes.
#[derive(Debug, Clone)]
pub struct DdOptions {
    /// `if=`
    pub input: String,
    /// `of=`
    pub output: String,
    /// `-f`
    pub input_format: Option<Format>,
    /// `-O` (default raw)
    pub output_format: Format,
    /// `bs=` (default 512)
    pub block_size: u64,
    /// `count=` in blocks
    pub count: Option<u64>,
    /// `skip=` in blocks
    pub skip: Option<u64>,
    /// `-U`
    pub force_share: bool,
}

/// Outcome of `dd`: the output size, and whether `skip` was past the input's end.
#[derive(Debug, Clone, Copy)]
pub struct DdResult {
    /// Size of the new image.
    pub output_size: u64,
    /// `skip` pointed past the end: an empty image was made (qemu-img warns).
    pub skipped_past_end: bool,
}

/// Runs `dd`.
pub fn dd(o: &DdOptions) -> Result<DdResult> {
    let src = formats::open(
        &o.input,
        &OpenOptions {
            format: o.input_format,
            force_share: o.force_share,
            ..OpenOptions::default()
        },
    )?;
    let mut size = src.virtual_size();
    let bs = o.block_size;
    if let Some(c) = o.count {
        if c <= i64::MAX as u64 / bs && c * bs < size {
            size = c * bs;
        }
    }
    // qemu-img sizes the output as (size - skip) even when count is given
    let skip_bytes = o.skip.and_then(|s| s.checked_mul(bs));
    let past_end = o.skip.is_some() && skip_bytes.is_none_or(|s| s > size);
    let out_size = if past_end {
        0
    } else {
        size - skip_bytes.unwrap_or(0)
    };
    let mut copts = CreateOpts::new();
    copts.set("size", &out_size.to_string());
    formats::create(&o.output, o.output_format, &copts).map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "{}: error while creating output image: {}",
                o.output,
                e.message()
            ),
        )
    })?;
    let dst = formats::open(
        &o.output,
        &OpenOptions {
            format: Some(o.output_format),
            write: true,
            ..OpenOptions::default()
        },
    )?;
    let start = if past_end {
        size
    } else {
        skip_bytes.unwrap_or(0)
    };
    let params = CopyParams {
        progress_by_data: false,
        sources: vec![Source {
            img: src.as_ref(),
            start,
            len: size - start,
            target_offset: 0,
        }],
        target: dst.as_ref(),
        target_is_zero: true,
        top_only: false,
        target_has_backing: false,
        sparse_size: 0,
        compress: false,
        cluster_size: dst.cluster_size().unwrap_or(512),
        workers: crate::ops::convert::default_workers(),
        out_of_order: false,
        salvage: false,
        progress: None,
        rate: None,
        dense: true,
        copy_offload: false,
    };
    engine::copy(&params)?;
    dst.close()?;
    Ok(DdResult {
        output_size: out_size,
        skipped_past_end: past_end,
    })
}
