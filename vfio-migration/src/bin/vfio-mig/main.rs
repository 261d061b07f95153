//! `vfio-mig`: the command-line tool of vfio-migration.
fn main() {}
