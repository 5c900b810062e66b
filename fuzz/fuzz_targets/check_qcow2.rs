//! `check` then `check -r all` on the input as a qcow2 image, then a read-only open of the
//! repaired file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskit_fuzz::exercise_check(data);
});
