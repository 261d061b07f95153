//! Arbitrary bytes loaded as a stream into a fresh emulated device.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::check_stream_load(data);
});
