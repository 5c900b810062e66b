//! The `diskit` command line: qemu-img's verbs, flags, messages and exit codes.

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    0
}
