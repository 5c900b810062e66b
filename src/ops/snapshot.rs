//! `snapshot`: list, create, apply and delete internal snapshots.

use crate::error::{Error, Result};
use crate::formats::qcow2::Qcow2;
use crate::formats::{self, Format, OpenOptions, SnapshotInfo};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotAction {
    /// `-l`
    List,
    /// `-c NAME`
    Create(String),
    /// `-a NAME` (ID or name)
    Apply(String),
    /// `-d NAME`
    Delete(String),
}

/// Options of `snapshot`.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// `-f`
    pub format: Option<Format>,
    /// `-U`
    pub force_share: bool,
}

/// Runs one snapshot action; `List` returns the snapshots (empty for formats without any).
pub fn snapshot(
    filename: &str,
    action: &SnapshotAction,
    opts: &SnapshotOptions,
) -> Result<Vec<SnapshotInfo>> {
    let write = *action != SnapshotAction::List;
    let img = formats::open(
        filename,
        &OpenOptions {
            format: opts.format,
            write,
            force_share: opts.force_share,
            ..OpenOptions::default()
        },
    )?;
    let q = img.as_any().downcast_ref::<Qcow2>();
    let out = match (action, q) {
        (SnapshotAction::List, Some(q)) => crate::formats::qcow2::snapshot::list(q)?,
        (SnapshotAction::List, None) => Vec::new(),
        (SnapshotAction::Create(name), Some(q)) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            let micros = now.as_micros();
            let sec = (micros / 1_000_000) as u32;
            let nsec = ((micros % 1_000_000) * 1000) as u32;
            q.snapshot_create(name, sec, nsec)?;
            Vec::new()
        }
        (SnapshotAction::Create(name), None) => {
            return Err(Error::unsupported(format!(
                "Could not create snapshot '{name}': Operation not supported"
            )))
        }
        (SnapshotAction::Apply(name), Some(q)) => {
            q.snapshot_apply(name)?;
            Vec::new()
        }
        (SnapshotAction::Apply(name), None) => {
            return Err(Error::unsupported(format!(
                "Could not apply snapshot '{name}': Block driver does not support snapshots"
            )))
        }
        (SnapshotAction::Delete(name), Some(q)) => {
            q.snapshot_delete(name)?;
            Vec::new()
        }
        (SnapshotAction::Delete(name), None) => {
            return Err(Error::invalid_arg(format!(
                "Could not delete snapshot '{name}': snapshot not found"
            )))
        }
    };
    img.close()?;
    Ok(out)
}
