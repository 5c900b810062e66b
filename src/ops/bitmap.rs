//! `bitmap`: add, remove, clear, enable, disable and merge persistent dirty bitmaps.

use crate::error::{Error, ErrorKind, Result};
use crate::formats::qcow2::bitmap::{node_name, BitmapAction, BitmapData, MergeSource};
use crate::formats::qcow2::Qcow2;
use crate::formats::{self, BlockDriver, Format, OpenOptions};

/// One operation as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapOp {
    /// `--add`
    Add,
    /// `--remove`
    Remove,
    /// `--clear`
    Clear,
    /// `--enable`
    Enable,
    /// `--disable`
    Disable,
    /// `--merge SOURCE`
    Merge(String),
}

/// Options of `bitmap`.
#[derive(Debug, Clone, Default)]
pub struct BitmapOptions {
    /// `-f`
    pub format: Option<Format>,
    /// `-g`: granularity for `--add` (0 = the default).
    pub granularity: u64,
    /// `-b`: the image `--merge` reads its source bitmap from.
    pub source_file: Option<String>,
    /// `-F`
    pub source_format: Option<Format>,
}

fn op_name(op: &BitmapOp) -> &'static str {
    match op {
        BitmapOp::Add => "add",
        BitmapOp::Remove => "remove",
        BitmapOp::Clear => "clear",
        BitmapOp::Enable => "enable",
        BitmapOp::Disable => "disable",
        BitmapOp::Merge(_) => "merge",
    }
}

fn failed(op: &BitmapOp, bitmap: &str, e: Error) -> Error {
    let msg = format!(
        "Operation {} on bitmap {bitmap} failed: {}",
        op_name(op),
        e.message()
    );
    e.with_message(msg)
}

/// Reads bitmap `name` of another image (`None` where it has none).
fn external_bitmap(src: &dyn BlockDriver, name: &str) -> Result<Option<BitmapData>> {
    match src.as_any().downcast_ref::<Qcow2>() {
        Some(q) => q.read_bitmap(name),
        None => Ok(None),
    }
}

/// Applies `ops` in order to bitmap `bitmap` of `filename`. As qemu-img, the operations
/// done before a failing one are kept.
pub fn bitmap(filename: &str, bitmap: &str, ops: &[BitmapOp], opts: &BitmapOptions) -> Result<()> {
    let img = formats::open(
        filename,
        &OpenOptions {
            format: opts.format,
            write: true,
            no_backing: true,
            ..OpenOptions::default()
        },
    )?;
    let src = match &opts.source_file {
        Some(f) => Some(formats::open(
            f,
            &OpenOptions {
                format: opts.source_format,
                no_backing: true,
                ..OpenOptions::default()
            },
        )?),
        None => None,
    };
    let Some(q) = img.as_any().downcast_ref::<Qcow2>() else {
        // formats without persistent bitmaps: nothing to find, nothing can be stored
        let op = &ops[0];
        let e = match op {
            BitmapOp::Add => Error::new(
                ErrorKind::Unsupported,
                format!(
                    "Can't store persistent bitmaps to {}: Operation not supported",
                    node_name()
                ),
            ),
            _ => Error::invalid_arg(format!("Dirty bitmap '{bitmap}' not found")),
        };
        return Err(failed(op, bitmap, e));
    };
    let mut ed = q.bitmap_editor()?;
    let mut result = Ok(());
    for op in ops {
        let action = match op {
            BitmapOp::Add => BitmapAction::Add {
                granularity: (opts.granularity != 0).then_some(opts.granularity),
            },
            BitmapOp::Remove => BitmapAction::Remove,
            BitmapOp::Clear => BitmapAction::Clear,
            BitmapOp::Enable => BitmapAction::Enable,
            BitmapOp::Disable => BitmapAction::Disable,
            BitmapOp::Merge(s) => BitmapAction::Merge {
                source: s.clone(),
                from: match &src {
                    None => MergeSource::Same,
                    Some(d) => MergeSource::Other(external_bitmap(d.as_ref(), s)?),
                },
            },
        };
        if let Err(e) = ed.apply(bitmap, &action) {
            result = Err(failed(op, bitmap, e));
            break;
        }
    }
    let stored = ed.commit();
    let closed = img.close();
    result?;
    stored?;
    closed
}
