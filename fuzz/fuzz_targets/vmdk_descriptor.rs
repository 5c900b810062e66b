//! VMDK descriptor text: the input is a descriptor file whose extents may name the sparse,
//! flat and foreign files the harness provides next to it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskit_fuzz::exercise_vmdk_descriptor(data);
});
