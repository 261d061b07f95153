//! Transport bench.
fn main() {}
