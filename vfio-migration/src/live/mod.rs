//! Live migration of one or more devices: pre-copy, P2P quiescing, parallel stop-copy.
//!
//! [`Source`] drives the saving side of a group of devices through QEMU's sequence:
//! RUNNING -> PRE_COPY where supported ([`Source::start`]), pre-copy iterations within a byte
//! budget ([`Source::iterate`]), every device to RUNNING_P2P / PRE_COPY_P2P before any device stops
//! ([`Source::quiesce`]), every device to STOP_COPY with the remainders read in parallel, one worker
//! per device ([`Source::stop_copy`]), and STOP at the end ([`Source::finish`]). [`Source::abort`]
//! returns every device to RUNNING from any point, and dropping an unfinished `Source` aborts.
//!
//! [`Destination`] is the loading side: every device enters RESUMING ([`Destination::start`]),
//! chunks are loaded per device in sequence order whatever order they arrive in
//! ([`Destination::load`]), the initial pre-copy data is acknowledged ([`Destination::switchover_ready`]),
//! RESUMING -> STOP validates ([`Destination::complete`]), and the devices resume in two phases:
//! every device to RUNNING_P2P, then every device to RUNNING ([`Destination::resume`]). Dropping an
//! unfinished `Destination` resets its devices.
//!
//! Chunks travel through a [`ChunkSink`]; [`LocalMigration`] connects a source and a destination
//! in one process (the `vfio-mig migrate` and `demo` commands) with a [`Convergence`] policy.

mod convergence;
mod destination;
mod error;
pub(crate) mod free;
mod local;
pub(crate) mod precopy_loop;
mod source;

pub use convergence::{Convergence, DowntimeEstimator, Precopy, SwitchReason};
pub use destination::{Destination, DestinationOptions, Loader};
pub use error::LiveError;
pub use local::{LiveProgress, LocalMigration, MigrationReport};
pub use source::{Pending, Source, SourceOptions, StopCopyReport, resume_source};

use std::io;

/// Which phase a chunk of device state belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Read while the device was running (PRE_COPY / PRE_COPY_P2P).
    PreCopy,
    /// Read while the device was stopped (STOP_COPY).
    StopCopy,
}

/// Where a [`Source`] sends device state.
pub trait ChunkSink {
    /// One chunk of the state of device `device` (its index in the group).
    fn chunk(&mut self, device: usize, phase: Phase, data: &[u8]) -> io::Result<()>;

    /// Every byte of `device`'s initial pre-copy data has been passed to [`ChunkSink::chunk`].
    /// Called again for a device whose initial data started over (a re-init, PRE_COPY info v2)
    /// once the new initial data was passed: the destination must acknowledge again.
    fn initial_sent(&mut self, _device: usize) -> io::Result<()> {
        Ok(())
    }
}

/// A sink that numbers chunks per device (0, 1, 2, ... continuing across uses of the same
/// counters) and hands them to a closure; used by local migration and tests.
pub struct SeqSink<'c, F> {
    next: &'c mut [u64],
    f: F,
}

impl<F> std::fmt::Debug for SeqSink<'_, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqSink")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl<'c, F: FnMut(SinkEvent<'_>) -> io::Result<()>> SeqSink<'c, F> {
    /// A sink numbering from `counters` (one per device, updated as chunks pass) and calling `f`.
    pub fn new(counters: &'c mut [u64], f: F) -> Self {
        Self { next: counters, f }
    }
}

/// What a [`SeqSink`] passes to its closure.
#[derive(Debug)]
pub enum SinkEvent<'a> {
    /// A chunk with its per-device sequence number.
    Chunk {
        /// The device index.
        device: usize,
        /// The sequence number (0, 1, 2, ... per device).
        seq: u64,
        /// The phase.
        phase: Phase,
        /// The bytes.
        data: &'a [u8],
    },
    /// The initial pre-copy data of `device` is complete after `chunks` chunks.
    InitialSent {
        /// The device index.
        device: usize,
        /// How many chunks of this device were sent before the marker.
        chunks: u64,
    },
}

impl<F: FnMut(SinkEvent<'_>) -> io::Result<()>> ChunkSink for SeqSink<'_, F> {
    fn chunk(&mut self, device: usize, phase: Phase, data: &[u8]) -> io::Result<()> {
        let slot = self
            .next
            .get_mut(device)
            .ok_or_else(|| io::Error::other(format!("chunk for unknown device index {device}")))?;
        let seq = *slot;
        *slot += 1;
        (self.f)(SinkEvent::Chunk {
            device,
            seq,
            phase,
            data,
        })
    }

    fn initial_sent(&mut self, device: usize) -> io::Result<()> {
        let chunks = *self
            .next
            .get(device)
            .ok_or_else(|| io::Error::other(format!("marker for unknown device index {device}")))?;
        (self.f)(SinkEvent::InitialSent { device, chunks })
    }
}
