//! `-o` option strings and sizes: CreateOpts::parse, typed getters, parse_size, summaries.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskit_fuzz::exercise_options(data);
});
