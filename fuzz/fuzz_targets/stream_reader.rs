//! Arbitrary bytes into the stream reader, the payload reader and `inspect`, both as raw bytes and
//! decoded as a structured stream with valid checksums (to reach the checks behind the CRCs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::check_stream_input(data);
});
