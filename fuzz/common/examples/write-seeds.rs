//! Write the seed corpus of the `stream_reader` fuzz target.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p vfio-migration-fuzz-common --example write-seeds -- DIR`
//! (default `fuzz/seeds/stream_reader`).

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds/stream_reader".to_string());
    let n = vfio_migration_fuzz_common::write_seeds(std::path::Path::new(&dir))?;
    println!("wrote {n} seed streams into {dir}");
    Ok(())
}
