//! Source and destination in one process: `vfio-mig migrate` and `demo`.

use std::io;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::destination::Loader;
use super::precopy_loop::{self, PrecopyPeer};
use super::{
    ChunkSink, Convergence, Destination, DestinationOptions, LiveError, SeqSink, SinkEvent, Source, SourceOptions,
};
use crate::device::MigrationDevice;

/// A live migration between devices of one process.
#[derive(Clone, Debug, Default)]
pub struct LocalMigration {
    /// Source options.
    pub source: SourceOptions,
    /// Destination options.
    pub destination: DestinationOptions,
    /// Convergence policy.
    pub convergence: Convergence,
}

/// What a live migration did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrationReport {
    /// Device names, source side.
    pub devices: Vec<String>,
    /// Pre-copy bytes per device.
    pub precopy_bytes: Vec<u64>,
    /// Stop-copy bytes per device.
    pub stop_copy_bytes: Vec<u64>,
    /// Bytes moved in each complete pre-copy pass over all devices (see
    /// [`super::Source::passes`]).
    pub iteration_bytes: Vec<u64>,
    /// Downtime estimated at switchover, when there was a measurement.
    pub est_downtime: Option<Duration>,
    /// Downtime: from quiescing the source to the destination running.
    pub downtime: Duration,
    /// Total time.
    pub total: Duration,
    /// Why it switched over ([`super::SwitchReason::name`]): `converged`, `converged-without-ack`,
    /// `no-precopy`, `pass-limit` or `time-limit`.
    pub switch_reason: &'static str,
    /// Initial-data markers sent per device: 1 once its initial data was sent, one more for
    /// each re-init (PRE_COPY info v2) whose new initial data was sent before the switchover.
    pub initial_markers: Vec<u64>,
}

impl MigrationReport {
    /// Number of complete pre-copy passes.
    pub fn iterations(&self) -> usize {
        self.iteration_bytes.len()
    }
}

/// Events a [`LocalMigration`] reports while it runs.
#[derive(Clone, Debug)]
pub enum LiveProgress {
    /// A pre-copy iteration ended.
    Iteration {
        /// The pass under way, from 1.
        n: u32,
        /// Bytes moved in it.
        bytes: u64,
        /// Bytes still pending (pre-copy + stop-copy estimate).
        pending: u64,
        /// Current downtime estimate.
        est_downtime: Option<Duration>,
    },
    /// Stop-copy bytes moved so far.
    StopCopy {
        /// Bytes so far.
        bytes: u64,
    },
}

impl LocalMigration {
    /// Migrate `sources[i]` into `destinations[i]` for every i.
    pub fn run<'a>(
        &self,
        sources: Vec<Box<dyn MigrationDevice + 'a>>,
        destinations: Vec<Box<dyn MigrationDevice + 'a>>,
        progress: &mut dyn FnMut(&LiveProgress),
    ) -> Result<MigrationReport, LiveError> {
        if sources.len() != destinations.len() {
            return Err(LiveError::Refused(format!(
                "{} source devices but {} destination devices",
                sources.len(),
                destinations.len()
            )));
        }
        // Refuse pairs of different devices, or of devices whose identity is unknown (unless
        // forced), before touching any of them.
        for (s, d) in sources.iter().zip(&destinations) {
            s.identity()
                .check_compatible(&d.identity(), self.destination.force_unknown_identity)
                .map_err(|e| LiveError::Refused(format!("{} cannot migrate into {}: {e}", s.name(), d.name())))?;
        }
        let began = Instant::now();
        let mut src = Source::new(sources, self.source.clone())?;
        let mut dst = Destination::new(destinations, self.destination.clone())?;
        let mut report = MigrationReport {
            devices: src.names(),
            ..MigrationReport::default()
        };
        dst.start()?;
        if let Err(e) = src.start() {
            dst.abort();
            return Err(e);
        }

        // Pre-copy: read and load on this thread, measuring throughput.
        let mut counters = vec![0u64; src.len()];
        let mut peer = InProcess {
            src: &mut src,
            dst: &mut dst,
            counters: &mut counters,
        };
        if let Err(e) = precopy_loop::run(&mut peer, &self.convergence, &mut report, progress) {
            src.abort();
            dst.abort();
            return Err(e);
        }

        // Downtime: quiesce, stop-copy into per-device loader threads, complete, resume.
        let down = Instant::now();
        let stop_copy_bytes = match stop_copy_into(&mut src, &mut dst, &mut counters, progress) {
            Ok(b) => b,
            Err(e) => {
                src.abort();
                dst.abort();
                return Err(e);
            }
        };
        report.stop_copy_bytes = stop_copy_bytes;
        if let Err(e) = dst.complete(Some(&counters)) {
            src.abort();
            return Err(e);
        }
        if let Err(e) = src.finish() {
            dst.abort();
            return Err(e);
        }
        // Until the destination runs, the migration can still fail: the source (stopped, its
        // state intact) then goes back to RUNNING.
        if let Err(e) = dst.resume() {
            src.abort();
            return Err(e);
        }
        report.downtime = down.elapsed();
        report.total = began.elapsed();
        Ok(report)
    }
}

/// Pre-copy in one process: chunks go straight into the destination's devices, and the
/// acknowledgement is the destination's own.
struct InProcess<'s, 'a> {
    src: &'s mut Source<'a>,
    dst: &'s mut Destination<'a>,
    counters: &'s mut [u64],
}

impl<'a> PrecopyPeer<'a> for InProcess<'_, 'a> {
    type Error = LiveError;

    fn source(&mut self) -> &mut Source<'a> {
        self.src
    }

    fn step(&mut self, budget: u64) -> Result<u64, LiveError> {
        let dst = &mut *self.dst;
        let mut sink = SeqSink::new(self.counters, |ev: SinkEvent<'_>| match ev {
            SinkEvent::Chunk { device, seq, data, .. } => dst.load(device, seq, data).map_err(io::Error::other),
            SinkEvent::InitialSent { device, chunks } => dst.initial_sent(device, chunks).map_err(io::Error::other),
        });
        self.src.iterate(&mut sink, budget)
    }

    fn acked(&mut self) -> bool {
        self.dst.switchover_ready()
    }
}

/// Stop-copy from `src` into `dst`, one loader thread per destination device fed through a
/// bounded queue, so devices load in parallel as they are read in parallel.
fn stop_copy_into(
    src: &mut Source<'_>,
    dst: &mut Destination<'_>,
    counters: &mut [u64],
    progress: &mut dyn FnMut(&LiveProgress),
) -> Result<Vec<u64>, LiveError> {
    const QUEUE: usize = 4;
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for (i, loader) in dst.loaders().into_iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(QUEUE);
            senders.push(tx);
            handles.push(scope.spawn(move || -> Result<(), LiveError> {
                load_from(loader, rx).map_err(|e| match e {
                    LiveError::Sequence { reason, .. } => LiveError::Sequence { device: i, reason },
                    e => e,
                })
            }));
        }
        let mut total = 0u64;
        let result = {
            let mut sink = SeqSink::new(counters, |ev: SinkEvent<'_>| match ev {
                SinkEvent::Chunk { device, seq, data, .. } => {
                    total += data.len() as u64;
                    progress(&LiveProgress::StopCopy { bytes: total });
                    senders
                        .get(device)
                        .ok_or_else(|| io::Error::other(format!("no destination device {device}")))?
                        .send((seq, data.to_vec()))
                        .map_err(|_| io::Error::other(format!("the loader of destination device {device} stopped")))
                }
                SinkEvent::InitialSent { .. } => Ok(()),
            });
            src.stop_copy(&mut sink as &mut dyn ChunkSink)
        };
        drop(senders);
        let mut loader_error = None;
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    loader_error.get_or_insert(e);
                }
                Err(_) => {
                    loader_error.get_or_insert(LiveError::Refused("a loader thread panicked".into()));
                }
            }
        }
        // A loader's own error explains a failed send better than the send error does.
        if let Some(e) = loader_error {
            return Err(e);
        }
        result.map(|r| r.bytes)
    })
}

fn load_from(loader: &mut Loader, rx: mpsc::Receiver<(u64, Vec<u8>)>) -> Result<(), LiveError> {
    for (seq, data) in rx {
        loader.load(seq, &data)?;
    }
    Ok(())
}
