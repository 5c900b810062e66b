//! diskit: a fast, safe, drop-in equivalent of `qemu-img`.
//!
//! The crate has four layers (see the README): `io` (the host file), `formats` (one driver
//! per image format behind the [`BlockDriver`] trait), `ops` (one module per command, each a
//! library call) and `cli` (the `diskit` command line).
//!
//! ```no_run
//! let img = diskit::open("disk.qcow2", &diskit::OpenOptions::read_only())?;
//! let mut buf = vec![0u8; 4096];
//! img.read_at(&mut buf, 0)?;
//! # Ok::<(), diskit::Error>(())
//! ```

pub mod cli;
pub mod error;
pub mod formats;
pub mod io;
pub mod limits;
pub mod ops;
pub mod qjson;
pub mod warn;

pub use error::{Error, ErrorKind, Result};
pub use formats::{create, open, BlockDriver, CreateOpts, Format, ImageInfo, Mapping, OpenOptions};
