//! One module per command. Each works on `dyn BlockDriver` and is a library call.

pub mod convert;
pub mod create;
pub mod engine;
pub mod info;
