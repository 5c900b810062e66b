//! One module per command. Each works on `dyn BlockDriver` and is a library call.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compact;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod engine;
pub mod info;
pub mod map;
pub mod measure;
pub mod rebase;
pub mod resize;
pub mod snapshot;
