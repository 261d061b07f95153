//! Arbitrary (from, to, flags) requests into the state model's `next_step` and `path`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_migration_fuzz_common::{PathInput, check_path};

fuzz_target!(|input: PathInput| {
    check_path(&input);
});
