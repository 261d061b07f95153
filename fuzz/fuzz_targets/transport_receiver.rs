//! Arbitrary bytes as one migration (control and data connections, from memory) into the receiver's
//! record state machine, as they are and with every checksum fixed up.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vfio_migration_fuzz_common::transport::check_receiver(data);
});
