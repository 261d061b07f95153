//! Arbitrary bytes into the stream reader, the payload reader and `inspect`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::check_stream(data);
});
