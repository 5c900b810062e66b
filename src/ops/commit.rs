//! `commit`: copy what the layers above a base image hold into the base, then (unless asked
//! not to) empty the top image.
//!
//! The chain is opened once, with the base opened read-write inside it
//! ([`OpenOptions::rw_backing_depth`]), so that no image is opened twice (QEMU's locks are
//! per open file description). The copy goes through the parallel copy engine on a view of
//! the chain that reports as allocated only what some layer above the base holds.

use std::any::Any;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::formats::{self, BlockDriver, Format, ImageInfo, Mapping, OpenOptions};
use crate::ops::engine::{self, CopyParams, Source};

/// What `commit` takes.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// Format of the top image (`-f`), probed when `None`.
    pub format: Option<Format>,
    /// `-b`: the base, as named in the chain (default: the immediate backing file).
    pub base: Option<String>,
    /// `-d` (implied by `-b`): leave the top image as it is.
    pub drop: bool,
    /// `-r`: bytes per second.
    pub rate: Option<u64>,
    /// Worker threads of the copy.
    pub workers: usize,
}

impl Default for CommitOptions {
    fn default() -> Self {
        CommitOptions {
            format: None,
            base: None,
            drop: false,
            rate: None,
            workers: crate::ops::convert::default_workers(),
        }
    }
}

/// Is `name` a `protocol:` name (kept as it is, never resolved)?
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

fn canonical(path: &str) -> Option<PathBuf> {
    std::fs::canonicalize(path).ok()
}

/// The depth (1 = the immediate backing file) of the image named `name` in the backing chain
/// of `top`, found as QEMU does: a relative name is taken relative to the directory of each
/// overlay, and canonical paths are compared.
pub fn find_in_chain(top: &dyn BlockDriver, name: &str) -> Option<usize> {
    let mut cur = top;
    let mut depth = 0usize;
    while let Some(b) = cur.backing() {
        depth += 1;
        if has_protocol(name) || has_protocol(b.filename()) {
            if name == b.filename() {
                return Some(depth);
            }
        } else {
            let cand = formats::resolve_backing_name(cur.filename(), name);
            if let (Some(a), Some(c)) = (canonical(&cand), canonical(b.filename())) {
                if a == c {
                    return Some(depth);
                }
            }
        }
        cur = b;
    }
    None
}

/// The layers `top` (depth 0) down to depth `depth`.
pub fn layers(top: &dyn BlockDriver, depth: usize) -> Vec<&dyn BlockDriver> {
    let mut v = vec![top];
    let mut cur = top;
    while v.len() <= depth {
        match cur.backing() {
            Some(b) => {
                v.push(b);
                cur = b;
            }
            None => break,
        }
    }
    v
}

/// A read-only view of the top image in which only what the layers above the base hold is
/// allocated (`Unallocated` elsewhere); reads see the whole chain.
pub struct AboveBase<'a> {
    /// The layers above the base, top first.
    layers: Vec<&'a dyn BlockDriver>,
}

impl<'a> AboveBase<'a> {
    /// The view of `layers` (top first, base excluded).
    pub fn new(layers: Vec<&'a dyn BlockDriver>) -> Self {
        assert!(!layers.is_empty());
        AboveBase { layers }
    }

    fn top(&self) -> &dyn BlockDriver {
        self.layers[0]
    }
}

fn read_only() -> Error {
    Error::unsupported("the chain view is read-only")
}

impl BlockDriver for AboveBase<'_> {
    fn format(&self) -> Format {
        self.top().format()
    }
    fn filename(&self) -> &str {
        self.top().filename()
    }
    fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }
    fn cluster_size(&self) -> Option<u64> {
        self.top().cluster_size()
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<(Mapping, u64)> {
        if max_len == 0 {
            return Ok((Mapping::Zero { explicit: false }, 0));
        }
        let mut len = max_len;
        for l in &self.layers {
            let size = l.virtual_size();
            if offset >= size {
                // Past the end of a layer: reads as zero from here down.
                return Ok((Mapping::Zero { explicit: false }, len));
            }
            len = len.min(size - offset);
            let (m, n) = l.map(offset, len)?;
            if n == 0 {
                return Err(Error::corrupt(format!(
                    "{}: no progress mapping offset {offset}",
                    l.filename()
                )));
            }
            len = len.min(n);
            if m != Mapping::Unallocated {
                return Ok((m, len));
            }
        }
        Ok((Mapping::Unallocated, len))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.top().read_at(buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(read_only())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(read_only())
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn backing(&self) -> Option<&dyn BlockDriver> {
        None
    }
    fn info(&self) -> Result<ImageInfo> {
        self.top().info()
    }
    fn as_any(&self) -> &dyn Any {
        &()
    }
}

fn open_chain(filename: &str, o: &CommitOptions, depth: usize) -> Result<Box<dyn BlockDriver>> {
    formats::open(
        filename,
        &OpenOptions {
            format: o.format,
            write: true,
            rw_backing_depth: Some(depth),
            ..OpenOptions::default()
        },
    )
}

/// Commits `filename` into its base. `progress` gets (bytes done, total).
pub fn commit(
    filename: &str,
    o: &CommitOptions,
    progress: Option<&(dyn Fn(u64, u64) + Sync)>,
) -> Result<()> {
    let depth = match &o.base {
        None => 1,
        Some(name) => {
            let img = formats::open(
                filename,
                &OpenOptions {
                    format: o.format,
                    write: true,
                    ..OpenOptions::default()
                },
            )?;
            let d = find_in_chain(img.as_ref(), name);
            drop(img);
            d.ok_or_else(|| {
                Error::invalid_arg(format!(
                    "Did not find '{name}' in the backing chain of '{filename}'"
                ))
            })?
        }
    };
    let mut img = open_chain(filename, o, depth)?;
    if img.backing().is_none() {
        return Err(Error::invalid_arg("Image does not have a backing file"));
    }
    // A smaller base grows to the size of the top image first.
    {
        let ls = layers(img.as_ref(), depth);
        if ls.len() != depth + 1 {
            return Err(Error::invalid_image(format!(
                "{filename}: the backing chain changed while it was opened"
            )));
        }
        let top_size = img.virtual_size();
        let base = ls[depth];
        if base.virtual_size() < top_size {
            base.resize(top_size, None)?;
            base.close()?;
            drop(ls);
            drop(img);
            img = open_chain(filename, o, depth)?;
        }
    }
    let ls = layers(img.as_ref(), depth);
    if ls.len() != depth + 1 || ls[depth].virtual_size() < img.virtual_size() {
        return Err(Error::invalid_image(format!(
            "{filename}: the backing chain changed while it was opened"
        )));
    }
    let base = ls[depth];
    let view = AboveBase::new(ls[..depth].to_vec());
    let params = CopyParams {
        progress_by_data: false,
        sources: vec![Source::whole(&view, 0)],
        target: base,
        target_is_zero: false,
        top_only: true,
        target_has_backing: base.backing().is_some(),
        sparse_size: 0,
        compress: false,
        cluster_size: base.cluster_size().unwrap_or(65536),
        workers: o.workers,
        out_of_order: false,
        salvage: false,
        progress,
        rate: o.rate.filter(|&r| r > 0),
        dense: false,
        copy_offload: false,
    };
    engine::copy(&params)?;
    base.close()?;
    if !o.drop {
        match img.make_empty() {
            Ok(()) => {}
            Err(e) if e.kind() == crate::error::ErrorKind::Unsupported => {}
            Err(e) => return Err(e),
        }
    }
    img.close()?;
    Ok(())
}
