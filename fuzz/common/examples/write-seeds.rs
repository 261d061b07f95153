//! Write the seed corpora of the fuzz targets into `DIR/TARGET/`.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml -p vfio-migration-fuzz-common --example write-seeds -- DIR`
//! (default `fuzz/seeds`).

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".to_string());
    let n = vfio_migration_fuzz_common::write_seeds(std::path::Path::new(&dir))?;
    println!("wrote {n} seed streams into {dir}/");
    Ok(())
}
