//! streamOptimized VMDK: the input is opened as vmdk (its corpus is stream images: grain
//! markers, compressed grains, footers) and read back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskit_fuzz::exercise_image(data, Some(diskit::Format::Vmdk));
});
