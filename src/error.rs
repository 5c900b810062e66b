//! The one public error type of diskit.
//!
//! An [`Error`] carries a small matchable [`ErrorKind`] (which decides the exit code of the
//! command line tool), a human message that already names the file and the problem, and the
//! underlying I/O error where there is one.

use std::fmt;
use std::io;

/// What went wrong, coarsely: enough for a caller to decide what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An I/O error from the host (read, write, open, ...).
    Io,
    /// The file is not an image of the expected format, or its header is malformed.
    InvalidImage,
    /// The image is of the right format but its metadata is inconsistent.
    Corrupt,
    /// The operation or feature is not supported by this format or by diskit.
    Unsupported,
    /// A guest range outside the image.
    OutOfBounds,
    /// The image is locked by another process (a running QEMU).
    Locked,
    /// A user-supplied argument or option is invalid.
    InvalidArgument,
    /// The host ran out of space.
    NoSpace,
    /// A resource limit (memory, chain depth, table size) would be exceeded.
    TooLarge,
}

/// The error type of every fallible diskit call.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<io::Error>,
}

/// Shorthand used throughout the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with a complete message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Wraps an I/O error; the message becomes `context: <os error text>`.
    pub fn io(err: io::Error, context: impl fmt::Display) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            _ => ErrorKind::Io,
        };
        Error {
            kind,
            message: format!("{}: {}", context, os_error_text(&err)),
            source: Some(err),
        }
    }

    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without any program-name prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The underlying I/O error, if any.
    pub fn io_error(&self) -> Option<&io::Error> {
        self.source.as_ref()
    }

    /// Prepends `prefix: ` to the message, keeping kind and source.
    pub fn context(mut self, prefix: impl fmt::Display) -> Self {
        self.message = format!("{}: {}", prefix, self.message);
        self
    }

    /// Replaces the message, keeping kind and source.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// Shorthand constructors.
    pub fn invalid_image(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidImage, msg)
    }
    /// Inconsistent metadata.
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, msg)
    }
    /// Not supported.
    pub fn unsupported(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, msg)
    }
    /// Invalid argument.
    pub fn invalid_arg(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, msg)
    }
    /// Out of bounds guest access.
    pub fn out_of_bounds(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfBounds, msg)
    }
    /// A resource limit.
    pub fn too_large(msg: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, msg)
    }
}

/// The text of an OS error the way QEMU prints it (`strerror`), without Rust's
/// ` (os error N)` suffix.
pub fn os_error_text(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(code) => {
            // SAFETY: strerror returns a pointer to a static or thread-local NUL-terminated string.
            let s = unsafe { std::ffi::CStr::from_ptr(libc::strerror(code)) };
            s.to_string_lossy().into_owned()
        }
        None => err.to_string(),
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Returns early with an [`Error`] of the given kind and a formatted message.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::Error::new($crate::ErrorKind::$kind, format!($($arg)*)))
    };
}

/// Like `assert!` for untrusted input: returns an error instead of panicking.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $kind:ident, $($arg:tt)*) => {
        if !$cond {
            $crate::bail!($kind, $($arg)*);
        }
    };
}
