//! `info`: what an image (or its whole backing chain) is.

use crate::error::{Error, Result};
use crate::formats::{self, Format, ImageInfo, OpenOptions};

/// Options of `info`.
#[derive(Debug, Clone, Default)]
pub struct InfoOptions {
    /// Format of the top image (`-f`), probed when `None`.
    pub format: Option<Format>,
    /// Follow the backing chain (`--backing-chain`).
    pub backing_chain: bool,
    /// `-U`: open without conflicting locks.
    pub force_share: bool,
}

/// Collects the info of `filename` and, with `backing_chain`, of each image below it
/// (top first). Each image is opened on its own, read-only and without its backing file, the
/// way qemu-img does it.
pub fn info(filename: &str, opts: &InfoOptions) -> Result<Vec<ImageInfo>> {
    let mut list: Vec<ImageInfo> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut next = Some((filename.to_string(), opts.format));
    while let Some((name, format)) = next.take() {
        if seen.contains(&name) {
            return Err(Error::invalid_image(format!(
                "Backing file '{name}' creates an infinite loop."
            )));
        }
        if seen.len() > formats::MAX_BACKING_DEPTH {
            return Err(Error::too_large(format!(
                "Backing chain of '{filename}' is deeper than {} images",
                formats::MAX_BACKING_DEPTH
            )));
        }
        seen.push(name.clone());
        let open_opts = OpenOptions {
            format,
            force_share: opts.force_share,
            no_backing: true,
            no_io: true,
            ..OpenOptions::default()
        };
        if seen.len() > 1 {
            formats::check_named_file(&name, formats::NamedBy::Backing)
                .map_err(|e| e.context(format!("Could not open '{name}'")))?;
        }
        let img = formats::open(&name, &open_opts)?;
        let info = img.info()?;
        if opts.backing_chain {
            if let Some(full) = &info.full_backing_filename {
                let fmt = match &info.backing_filename_format {
                    Some(f) => Some(Format::from_name(f).map_err(|_| {
                        Error::invalid_image(format!(
                            "Could not open '{full}': Unknown driver '{f}'"
                        ))
                    })?),
                    None => None,
                };
                next = Some((full.clone(), fmt));
            }
        }
        list.push(info);
    }
    Ok(list)
}
