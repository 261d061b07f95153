//! Demonstrations built on several layers at once, for the `vfio-mig demo` and for tests.
//!
//! This module sits above the engine's layers: it may use the emulated device together with the
//! dirty trackers, which the library's own layers never combine (`dirty` does not know the
//! emulated device).
//!
//! - [`dma_demo`]: simulated guest memory, emulated DMA into it, and an iterative copy checked
//!   byte for byte ([`dma_demo::run_dma_demo`]).

pub mod dma_demo;
