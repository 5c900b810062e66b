//! Opens the input with the format probed (as `qemu-img info` without -f) and reads it back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskit_fuzz::exercise_image(data, None);
});
