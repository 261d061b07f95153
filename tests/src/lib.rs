//! Integration tests for `vfio-migration` live in `tests/tests/`; the real-kernel rig lives in
//! `tests/kernel/`.
#![deny(missing_docs)]
