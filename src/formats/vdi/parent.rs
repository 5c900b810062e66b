//! Finding the parent of a differencing VDI image.
//!
//! A VDI differencing image names its parent only by UUID (`uuid_link` is the parent's
//! image UUID, `uuid_parent` the parent's last-modification UUID); VirtualBox keeps the
//! paths in its media registry. diskit looks in the directory of the image for `*.vdi`
//! files (at most [`MAX_CANDIDATES`] entries, reading only their first sector) whose image
//! UUID equals `uuid_link` (or, when the link UUID is nil, whose modification UUID equals
//! `uuid_parent`). The match is opened with the ordinary backing-file helpers (read-only,
//! loop and depth checks). The parent's modification UUID is not required to match
//! `uuid_parent` (VirtualBox updates it on every write session).

use std::io::Read;
use std::path::Path;

use super::header::{probe, Header, Uuid};

use crate::error::{Error, Result};

/// Directory entries looked at, at most.
pub const MAX_CANDIDATES: usize = crate::limits::VDI_MAX_PARENT_CANDIDATES;

/// Returns the file name (relative to the image's directory) of the parent.
pub fn find_parent(filename: &str, hdr: &Header) -> Result<String> {
    let dir = match Path::new(filename).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let me = std::fs::canonicalize(filename).ok();
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        Error::io(
            e,
            format!(
                "{filename}: cannot list {} to find the parent image",
                dir.display()
            ),
        )
    })?;
    let mut names: Vec<String> = entries
        .take(MAX_CANDIDATES)
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.to_ascii_lowercase().ends_with(".vdi"))
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        if me.is_some() && std::fs::canonicalize(&path).ok() == me {
            continue;
        }
        let Some((image, modified)) = uuids_of(&path) else {
            continue;
        };
        let hit = if !hdr.uuid_link.is_nil() {
            image == hdr.uuid_link
        } else {
            modified == hdr.uuid_parent
        };
        if hit {
            return Ok(name);
        }
    }
    let want = if hdr.uuid_link.is_nil() {
        hdr.uuid_parent
    } else {
        hdr.uuid_link
    };
    Err(Error::invalid_image(format!(
        "{filename}: parent image with UUID {want} not found in {}",
        dir.display()
    )))
}

/// Image and modification UUIDs of a VDI file, if it is one.
fn uuids_of(path: &Path) -> Option<(Uuid, Uuid)> {
    // only regular files: opening a FIFO named *.vdi would block
    if !std::fs::metadata(path).ok()?.is_file() {
        return None;
    }
    let mut f = std::fs::File::open(path).ok()?;
    let mut raw = [0u8; 512];
    f.read_exact(&mut raw).ok()?;
    if !probe(&raw) {
        return None;
    }
    let u = |o: usize| Uuid(raw[o..o + 16].try_into().unwrap());
    Some((u(0x188), u(0x198)))
}
