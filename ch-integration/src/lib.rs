//! Cloud Hypervisor integration for `vfio-migration` (placeholder: the traits arrive with the
//! ch-integration work; see the workspace README).
#![deny(missing_docs)]
