//! Arbitrary bytes as a vfio-user client's messages to our server.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::vfio_user::check_server(data);
});
