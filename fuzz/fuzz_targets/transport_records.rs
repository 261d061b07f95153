//! Arbitrary bytes into the transport's record reader (as a data connection) and end-marker parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::transport::check_records(data);
});
