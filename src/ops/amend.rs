//! `amend`: change format options of an existing image (qcow2 only, like qemu-img).

use crate::error::{Error, Result};
use crate::formats::{self, CreateOpts, Format, OpenOptions};

/// Options of `amend`.
#[derive(Debug, Clone, Default)]
pub struct AmendOptions {
    /// `-f`
    pub format: Option<Format>,
    /// `--force`
    pub force: bool,
}

/// Amends `filename` with the `-o` options `opts`.
pub fn amend(filename: &str, opts: &CreateOpts, o: &AmendOptions) -> Result<()> {
    amend_with_progress(filename, opts, o, &|_, _| {})
}

/// [`amend`], reporting (done, total) work units to `progress` as qemu counts them.
pub fn amend_with_progress(
    filename: &str,
    opts: &CreateOpts,
    o: &AmendOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let img = formats::open(
        filename,
        &OpenOptions {
            format: o.format,
            write: true,
            ..OpenOptions::default()
        },
    )?;
    let fmt = img.format();
    drop(img);
    if fmt != Format::Qcow2 {
        return Err(Error::unsupported(format!(
            "Format driver '{fmt}' does not support option amendment"
        )));
    }
    formats::qcow2::amend::amend_with_progress(filename, opts, &OpenOptions::default(), progress)
}

/// Does `fmt` support amend? (`Format driver '...' does not support option amendment`)
pub fn supported(fmt: Format) -> bool {
    fmt == Format::Qcow2
}
