//! Opens the input as a vmdk image (format forced, read-only) and reads it back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskit_fuzz::exercise_image(data, Some(diskit::Format::Vmdk));
});
