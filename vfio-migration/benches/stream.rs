//! Stream benchmark (placeholder).
fn main() {}
