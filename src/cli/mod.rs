//! The `diskit` command line: qemu-img's verbs, flags, messages and exit codes.
//!
//! Each verb is a clap-derived struct; clap's parse errors are reworded the way qemu-img's
//! getopt reports them, and every error is printed as `PROG: message`, with PROG taken from
//! argv[0] as qemu-img does.

mod args;
mod chain;
pub mod human;
mod imgopts;
mod misc;
mod progress;
mod qverbs;
mod verbs;

use std::sync::OnceLock;

use crate::error::{Error, ErrorKind};

static PROG: OnceLock<String> = OnceLock::new();

/// The program name used as the prefix of messages (basename of argv[0]).
pub fn prog() -> &'static str {
    PROG.get().map(String::as_str).unwrap_or("diskit")
}

/// What a verb returns: its exit code, or an error to print.
pub type VerbResult = std::result::Result<i32, CliError>;

/// An error as the CLI prints it.
#[derive(Debug)]
pub enum CliError {
    /// `PROG: message`, exit 1.
    Msg(String),
    /// A usage error: `PROG: message` + `Try 'PROG VERB --help' for more info`.
    Usage(String, &'static str),
    /// A getopt-style error printed as `PROG VERB: message` + the Try line.
    Getopt(String, &'static str),
    /// A library error, `PROG: message`, exit 1.
    Lib(Error),
    /// Exit with this code and print nothing more.
    Exit(i32),
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError::Lib(e)
    }
}

pub(super) fn print_error(e: &CliError) -> i32 {
    let p = prog();
    match e {
        CliError::Msg(m) => {
            eprintln!("{p}: {m}");
            1
        }
        CliError::Usage(m, verb) => {
            eprintln!("{p}: {m}");
            if verb.is_empty() {
                eprintln!("Try '{p} --help' for more info");
            } else {
                eprintln!("Try '{p} {verb} --help' for more info");
            }
            1
        }
        CliError::Getopt(m, verb) => {
            eprintln!("{p} {verb}: {m}");
            eprintln!("Try '{p} {verb} --help' for more info");
            1
        }
        CliError::Lib(err) => {
            eprintln!("{p}: {}", err.message());
            exit_code(err.kind())
        }
        CliError::Exit(code) => *code,
    }
}

/// The exit code for an error kind (qemu-img exits 1 on every failure of a normal verb).
pub fn exit_code(kind: ErrorKind) -> i32 {
    let _ = kind;
    1
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let argv: Vec<String> = std::env::args().collect();
    let prog = argv
        .first()
        .map(|a| a.rsplit('/').next().unwrap_or(a).to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "diskit".to_string());
    let _ = PROG.set(prog);
    // A closed stdout (e.g. `| head`) must not make us panic.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match verbs::dispatch(&argv[1..]) {
        Ok(code) => code,
        Err(e) => print_error(&e),
    }
}
