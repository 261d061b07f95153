//! Arbitrary bytes as a control connection: preamble, hello and the control link's message framing.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::transport::check_control(data);
});
