//! The saving side of a live migration.
//!
//! Pre-copy works in *passes*: a pass is complete when every device in pre-copy has been read
//! until it had nothing more to give at that moment (a device cut short by the byte budget of
//! [`Source::iterate`] is not done yet). The device read first rotates from call to call, so a
//! device that dirties fast cannot starve the others of the budget.
//!
//! PRE_COPY info v2: [`Source::start`] opts every device that enters pre-copy in
//! ([`MigrationDevice::enable_precopy_info_v2`]). When a device reports a re-init
//! ([`crate::device::PrecopyInfo::reinit`]: new initial data appeared), its "initial data sent"
//! state starts over: [`Source::initial_drained`] is false again until the new initial bytes are
//! read, and then the initial-data marker ([`super::ChunkSink::initial_sent`]) is sent again, so
//! the destination acknowledges the switchover again only once it loaded the new initial data.
//! Before a switchover on convergence the engine looks once more ([`Source::check_reinit`]).
//!
//! Returning devices to RUNNING always takes two phases, as the destination does on resume:
//! every stopped device with P2P first goes to RUNNING_P2P, and only then does any device go to
//! RUNNING, so no running device can DMA into a peer that is still stopped ([`Source::abort`],
//! [`resume_source`]).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::free::free_buffers;
use super::{ChunkSink, LiveError, Phase};
use crate::device::{DeviceError, ErrorKind, MigrationDevice, Operation, ReadOutcome, TransferSession};
use crate::session::recovery::{reset_device, restore_to};
use crate::session::{MAX_BUFFER, Recovery, set_state_or_recover, stall_text};
use crate::state::{DeviceState, MigrationFlags};

/// Options of a [`Source`].
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Use PRE_COPY on devices that support it.
    pub precopy: bool,
    /// Allow several devices when some lack P2P (unsafe for peer-to-peer DMA between them).
    pub force_without_p2p: bool,
    /// Read the stop-copy remainders of several devices in parallel (one worker per device).
    pub parallel: bool,
    /// Size of each chunk read from a device.
    pub chunk_size: usize,
    /// Chunks queued between the stop-copy workers and the sink (bounds memory).
    pub queue_depth: usize,
    /// Consecutive "nothing now" reads (1 ms apart) a device may give in STOP_COPY before it is
    /// declared stalled. The uAPI has no such answer there; this guards against a broken device.
    pub max_idle_polls: u32,
    /// How long a device may give no data in STOP_COPY before it is declared stalled, whatever
    /// the number of polls (a kernel device's read waits up to [`crate::kernel::READ_WAIT`] per
    /// poll).
    pub max_idle_time: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            precopy: true,
            force_without_p2p: false,
            parallel: true,
            chunk_size: MAX_BUFFER,
            queue_depth: 4,
            max_idle_polls: 5000,
            max_idle_time: Duration::from_secs(5),
        }
    }
}

/// Bytes still to move, summed over the devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Initial pre-copy data not read yet.
    pub initial: u64,
    /// Pre-copy data that changed since it was read.
    pub dirty: u64,
    /// The devices' estimates of what STOP_COPY would produce now (read inside the downtime).
    pub stop_copy: u64,
}

impl Pending {
    /// Pre-copy initial + dirty + stop-copy estimate.
    pub fn total(&self) -> u64 {
        self.initial.saturating_add(self.dirty).saturating_add(self.stop_copy)
    }
}

/// What [`Source::stop_copy`] moved.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StopCopyReport {
    /// Stop-copy bytes per device.
    pub bytes: Vec<u64>,
    /// Wall time from the first STOP_COPY request to the last byte.
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    PreCopy,
    Quiesced,
    StopCopied,
    Finished,
    Aborted,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Idle => "not started",
            Stage::PreCopy => "in pre-copy",
            Stage::Quiesced => "quiesced",
            Stage::StopCopied => "stop-copied",
            Stage::Finished => "finished",
            Stage::Aborted => "aborted",
        }
    }
}

struct SrcDev<'a> {
    dev: Box<dyn MigrationDevice + 'a>,
    flags: MigrationFlags,
    session: Option<Box<dyn TransferSession>>,
    initial_sent: bool,
    /// Initial-data markers sent (one more per re-init whose new initial data was sent).
    markers: u64,
    /// Re-inits the device reported (PRE_COPY info v2).
    reinits: u64,
    /// Read until it had nothing more, in the current pass.
    drained: bool,
    /// The device was STOP when the migration started (a paused VM): it has no pre-copy, is
    /// already quiescent, and an abort returns it to STOP, not RUNNING.
    paused: bool,
    precopy_bytes: u64,
    stop_copy_bytes: u64,
}

impl SrcDev<'_> {
    /// Pre-copy info of the open session; a re-init starts the "initial data sent" state over.
    fn precopy_info(&mut self) -> Result<crate::device::PrecopyInfo, DeviceError> {
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| DeviceError::new(self.dev.name(), Operation::PrecopyInfo, ErrorKind::SessionClosed))?;
        let info = session.precopy_info()?;
        if info.reinit {
            log::info!(
                "{}: new initial data ({} bytes): switchover waits until the destination loaded it",
                self.dev.name(),
                info.initial_bytes
            );
            self.reinits += 1;
            self.initial_sent = false;
        }
        Ok(info)
    }
}

/// The saving side of a live migration of a group of devices.
pub struct Source<'a> {
    devs: Vec<SrcDev<'a>>,
    opts: SourceOptions,
    stage: Stage,
    buf: Vec<u8>,
    /// The device [`Source::iterate`] reads first next time.
    cursor: usize,
    /// Bytes read in the current, unfinished pass.
    pass_moved: u64,
    /// Bytes read in each complete pass that moved data.
    passes: Vec<u64>,
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("devices", &self.devs.iter().map(|d| d.dev.name()).collect::<Vec<_>>())
            .field("stage", &self.stage)
            .finish()
    }
}

impl<'a> Source<'a> {
    /// A source over `devices` (each must be RUNNING). Refuses, before touching any device, a
    /// group of several devices where one lacks P2P, unless `force_without_p2p`.
    pub fn new(devices: Vec<Box<dyn MigrationDevice + 'a>>, opts: SourceOptions) -> Result<Self, LiveError> {
        if devices.is_empty() {
            return Err(LiveError::Refused("no devices to migrate".into()));
        }
        let mut devs = Vec::with_capacity(devices.len());
        for dev in devices {
            let flags = dev.flags()?;
            if !flags.contains(MigrationFlags::STOP_COPY) {
                return Err(LiveError::Refused(format!(
                    "{}: migration flags {flags} lack STOP_COPY",
                    dev.name()
                )));
            }
            devs.push(SrcDev {
                dev,
                flags,
                session: None,
                initial_sent: false,
                markers: 0,
                reinits: 0,
                drained: false,
                paused: false,
                precopy_bytes: 0,
                stop_copy_bytes: 0,
            });
        }
        if devs.len() > 1 && !opts.force_without_p2p {
            let lacking: Vec<&str> = devs
                .iter()
                .filter(|d| !d.flags.contains(MigrationFlags::P2P))
                .map(|d| d.dev.name())
                .collect();
            if !lacking.is_empty() {
                return Err(LiveError::Refused(format!(
                    "{} devices, but {} lack P2P: stopping them one by one is unsafe for peer-to-peer DMA \
                     (force it only if the devices never DMA to each other)",
                    devs.len(),
                    lacking.join(", ")
                )));
            }
        }
        let chunk = opts.chunk_size.clamp(4096, MAX_BUFFER);
        Ok(Self {
            devs,
            opts,
            stage: Stage::Idle,
            buf: vec![0; chunk],
            cursor: 0,
            pass_moved: 0,
            passes: Vec::new(),
        })
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.devs.len()
    }

    /// Whether the group is empty (never: [`Source::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.devs.is_empty()
    }

    /// The devices' names, by index.
    pub fn names(&self) -> Vec<String> {
        self.devs.iter().map(|d| d.dev.name().to_string()).collect()
    }

    /// Whether any device is in pre-copy.
    pub fn precopy_active(&self) -> bool {
        self.devs.iter().any(|d| d.session.is_some())
    }

    /// Pre-copy bytes read so far, per device.
    pub fn precopy_bytes(&self) -> Vec<u64> {
        self.devs.iter().map(|d| d.precopy_bytes).collect()
    }

    fn expect(&self, step: &'static str, stages: &[Stage]) -> Result<(), LiveError> {
        if stages.contains(&self.stage) {
            Ok(())
        } else {
            Err(LiveError::WrongPhase {
                step,
                phase: self.stage.name(),
            })
        }
    }

    /// The check at a migration's first step: reads every device's state and marks a paused
    /// VM's devices (all STOP: they stay STOP, and an abort returns them to STOP). A STOP device
    /// beside one in another state is refused before any device is touched. At [`Source::start`]
    /// (`strict`) the first device decides whether the VM is paused, and otherwise every device
    /// must be RUNNING; straight from idle at [`Source::quiesce`] / [`Source::stop_copy`], any
    /// STOP device makes it a paused VM's, and otherwise the devices are read as they are
    /// (RUNNING, or already quiesced to RUNNING_P2P by the VMM's pause). Returns whether the
    /// devices are paused.
    fn note_paused(&mut self, strict: bool) -> Result<bool, LiveError> {
        let mut states = Vec::with_capacity(self.devs.len());
        for d in &self.devs {
            states.push(d.dev.state()?);
        }
        // The device whose STOP makes the VM a paused one.
        let stopped = if strict {
            (states.first() == Some(&DeviceState::Stop)).then_some(0)
        } else {
            states.iter().position(|s| *s == DeviceState::Stop)
        };
        let odd = |want: DeviceState| self.devs.iter().zip(&states).find(|(_, s)| **s != want);
        let why = match stopped {
            Some(r) => odd(DeviceState::Stop).map(|(d, state)| {
                format!(
                    "{}: is {state} while {} is STOP: a migration starts with every device RUNNING, or every device STOP (a paused VM)",
                    d.dev.name(),
                    self.devs[r].dev.name()
                )
            }),
            None if strict => odd(DeviceState::Running).map(|(d, state)| {
                format!(
                    "{}: is {state}, a migration starts from RUNNING (or, for a paused VM, STOP)",
                    d.dev.name()
                )
            }),
            None => None,
        };
        if let Some(why) = why {
            return Err(LiveError::Refused(why));
        }
        let paused = stopped.is_some();
        for d in &mut self.devs {
            d.paused = paused;
        }
        Ok(paused)
    }

    /// Start: every device that supports it (and when pre-copy is enabled) goes RUNNING -> PRE_COPY.
    ///
    /// The devices are all RUNNING, or all STOP (the VM they belong to is paused): stopped devices
    /// have no pre-copy (PRE_COPY is entered from RUNNING only), go STOP -> STOP_COPY at
    /// stop-copy, and an abort returns them to STOP (a paused VM's devices never start running
    /// because its migration failed). A mix, or any other state, is refused before any device is
    /// touched.
    pub fn start(&mut self) -> Result<(), LiveError> {
        self.expect("start", &[Stage::Idle])?;
        let paused = self.note_paused(true)?;
        if paused {
            self.stage = Stage::PreCopy;
            return Ok(());
        }
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            if self.opts.precopy && d.flags.contains(MigrationFlags::PRE_COPY) {
                // PRE_COPY info v2, when the device offers it (kernels without it: nothing asked).
                if let Err(e) = d.dev.enable_precopy_info_v2() {
                    return Err(self.fail(e.into()));
                }
                match set_state_or_recover(d.dev.as_mut(), DeviceState::PreCopy, DeviceState::Running) {
                    Ok(Some(s)) => d.session = Some(s),
                    Ok(None) => {
                        let e = DeviceError::no_session(d.dev.name(), DeviceState::Running, DeviceState::PreCopy);
                        return Err(self.fail(e.into()));
                    }
                    Err(e) => return Err(self.fail(e.into())),
                }
            }
        }
        self.stage = Stage::PreCopy;
        Ok(())
    }

    /// One pre-copy step: read what the devices have now, up to about `budget` bytes in all,
    /// into `sink`, starting with the device after the one read first last time. Returns the
    /// bytes read. Sends the initial-data marker for a device once its initial data is drained.
    /// See [`Source::passes`] for when a pass over all devices is complete.
    pub fn iterate(&mut self, sink: &mut dyn ChunkSink, budget: u64) -> Result<u64, LiveError> {
        self.expect("iterate", &[Stage::PreCopy])?;
        let n = self.devs.len();
        let mut total = 0u64;
        let mut visited = 0;
        while visited < n && total < budget {
            let i = (self.cursor + visited) % n;
            visited += 1;
            match self.iterate_one(i, sink, budget - total) {
                Ok((got, drained)) => {
                    total += got;
                    self.devs[i].drained |= drained;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        // The next call starts after the last device read (which the budget may have cut
        // short), and after the first one when every device was read.
        self.cursor = (self.cursor + if visited == n { 1 } else { visited.max(1) }) % n;
        self.pass_moved += total;
        if self.devs.iter().all(|d| d.session.is_none() || d.drained) {
            for d in &mut self.devs {
                d.drained = false;
            }
            // A pass that found nothing anywhere is a poll, not a pass.
            if self.pass_moved > 0 {
                self.passes.push(self.pass_moved);
            }
            self.pass_moved = 0;
        }
        Ok(total)
    }

    /// Complete pre-copy passes so far: passes in which every device in pre-copy was read until
    /// it had nothing more at that moment, and some device had data.
    pub fn passes(&self) -> u32 {
        self.passes.len().min(u32::MAX as usize) as u32
    }

    /// Bytes read in each complete pass (see [`Source::passes`]).
    pub fn pass_bytes(&self) -> &[u64] {
        &self.passes
    }

    /// Read device `i` up to `budget`; returns the bytes and whether it had nothing more.
    fn iterate_one(&mut self, i: usize, sink: &mut dyn ChunkSink, budget: u64) -> Result<(u64, bool), LiveError> {
        let d = &mut self.devs[i];
        let Some(session) = d.session.as_mut() else {
            return Ok((0, true));
        };
        let mut got = 0u64;
        let mut drained = false;
        while got < budget {
            let want = (budget - got).min(self.buf.len() as u64) as usize;
            match session.read(&mut self.buf[..want])? {
                ReadOutcome::Data(n) => {
                    let data = self.buf.get(..n).ok_or_else(|| {
                        DeviceError::new(
                            d.dev.name(),
                            Operation::Read,
                            ErrorKind::InvalidAnswer(format!("{n} bytes read into {want}")),
                        )
                    })?;
                    sink.chunk(i, Phase::PreCopy, data).map_err(LiveError::Sink)?;
                    got += n as u64;
                    d.precopy_bytes += n as u64;
                }
                ReadOutcome::NothingNow | ReadOutcome::End => {
                    drained = true;
                    break;
                }
            }
        }
        let info = d.precopy_info()?;
        if !d.initial_sent && info.initial_bytes == 0 {
            d.initial_sent = true;
            d.markers += 1;
            sink.initial_sent(i).map_err(LiveError::Sink)?;
        }
        Ok((got, drained))
    }

    /// Query every device in pre-copy for a re-init (PRE_COPY info v2) it has not reported yet;
    /// returns whether one had. Such a device's initial data is no longer drained
    /// ([`Source::initial_drained`]), so the caller must not switch over yet. Used right before
    /// a switchover on convergence, so a re-init that happened after the last pre-copy step
    /// (while the destination's acknowledgement travelled) is not missed. A failure aborts.
    pub fn check_reinit(&mut self) -> Result<bool, LiveError> {
        self.expect("check for a re-init", &[Stage::PreCopy])?;
        let mut found = false;
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            if d.session.is_none() {
                continue;
            }
            match d.precopy_info() {
                Ok(info) => found |= info.reinit,
                Err(e) => return Err(self.fail(e.into())),
            }
        }
        Ok(found)
    }

    /// Initial-data markers sent so far, per device: 1 once a device's initial data was sent,
    /// one more for each re-init whose new initial data was sent.
    pub fn initial_markers(&self) -> Vec<u64> {
        self.devs.iter().map(|d| d.markers).collect()
    }

    /// Initial-data markers sent so far, all devices.
    pub fn initial_markers_total(&self) -> u64 {
        self.devs.iter().map(|d| d.markers).sum()
    }

    /// Re-inits reported so far, per device (PRE_COPY info v2).
    pub fn reinits(&self) -> Vec<u64> {
        self.devs.iter().map(|d| d.reinits).collect()
    }

    /// Whether every device in pre-copy has had all its initial data read and sent.
    pub fn initial_drained(&self) -> bool {
        self.devs.iter().all(|d| d.session.is_none() || d.initial_sent)
    }

    /// What is still to move, summed over the devices.
    pub fn pending(&mut self) -> Result<Pending, LiveError> {
        let mut p = Pending::default();
        for d in &mut self.devs {
            if d.session.is_some() {
                let info = d.precopy_info()?;
                p.initial = p.initial.saturating_add(info.initial_bytes);
                p.dirty = p.dirty.saturating_add(info.dirty_bytes);
            }
            // QEMU assumes a huge state when the estimate fails; do the same, so the
            // convergence policy never switches over on a device that cannot say.
            let est = d.dev.stop_copy_size().unwrap_or(100 << 30);
            p.stop_copy = p.stop_copy.saturating_add(est);
        }
        Ok(p)
    }

    /// Quiesce: every device to RUNNING_P2P (or PRE_COPY_P2P) before any device stops.
    /// Devices without P2P (allowed alone or when forced) are left running until stop-copy.
    /// Straight from idle (no [`Source::start`]), the devices are checked as `start` checks them:
    /// a paused VM's devices (all STOP) are already quiescent and stay STOP.
    pub fn quiesce(&mut self) -> Result<(), LiveError> {
        self.expect("quiesce", &[Stage::Idle, Stage::PreCopy])?;
        if self.stage == Stage::Idle {
            self.note_paused(false)?;
        }
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            // A paused VM's device is STOP: already quiescent.
            if !d.flags.contains(MigrationFlags::P2P) || d.paused {
                continue;
            }
            let to = if d.session.is_some() {
                DeviceState::PreCopyP2p
            } else {
                DeviceState::RunningP2p
            };
            let recover = if d.session.is_some() {
                DeviceState::PreCopy
            } else {
                DeviceState::Running
            };
            if let Err(e) = set_state_or_recover(d.dev.as_mut(), to, recover) {
                return Err(self.fail(e.into()));
            }
        }
        self.stage = Stage::Quiesced;
        Ok(())
    }

    /// Stop-copy: every device to STOP_COPY, then the remainders read (in parallel when enabled,
    /// one worker per device, with a bounded queue) into `sink`.
    pub fn stop_copy(&mut self, sink: &mut dyn ChunkSink) -> Result<StopCopyReport, LiveError> {
        self.expect("stop-copy", &[Stage::Idle, Stage::PreCopy, Stage::Quiesced])?;
        if self.stage != Stage::Quiesced
            && let Err(e) = self.quiesce()
        {
            return Err(e);
        }
        let began = Instant::now();
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            // Never straight back to RUNNING while peers may be stopped: the abort that
            // follows resumes every device in two phases.
            let recover = if d.flags.contains(MigrationFlags::P2P) && !d.paused {
                DeviceState::RunningP2p
            } else {
                DeviceState::Stop
            };
            match set_state_or_recover(d.dev.as_mut(), DeviceState::StopCopy, recover) {
                Ok(Some(s)) => d.session = Some(s),
                Ok(None) if d.session.is_some() => {}
                Ok(None) => {
                    let e = DeviceError::no_session(d.dev.name(), DeviceState::Stop, DeviceState::StopCopy);
                    return Err(self.fail(e.into()));
                }
                Err(e) => return Err(self.fail(e.into())),
            }
        }
        let result = if self.opts.parallel && self.devs.len() > 1 {
            self.read_parallel(sink)
        } else {
            self.read_serial(sink)
        };
        if let Err(e) = result {
            return Err(self.fail(e));
        }
        self.stage = Stage::StopCopied;
        Ok(StopCopyReport {
            bytes: self.devs.iter().map(|d| d.stop_copy_bytes).collect(),
            duration: began.elapsed(),
        })
    }

    fn read_serial(&mut self, sink: &mut dyn ChunkSink) -> Result<(), LiveError> {
        let bound = IdleBound::of(&self.opts);
        let never = AtomicBool::new(false);
        for (i, d) in self.devs.iter_mut().enumerate() {
            let session = d.session.as_mut().expect("every device has a session in STOP_COPY");
            let bytes = &mut d.stop_copy_bytes;
            // Nothing stops this reader early: it always reads to the end (or fails).
            let _ = read_stop_copy(
                d.dev.name(),
                session.as_mut(),
                bound,
                &never,
                &mut self.buf,
                |buf, n| {
                    sink.chunk(i, Phase::StopCopy, &buf[..n]).map_err(LiveError::Sink)?;
                    *bytes += n as u64;
                    Ok(ControlFlow::Continue(()))
                },
            )?;
        }
        Ok(())
    }

    fn read_parallel(&mut self, sink: &mut dyn ChunkSink) -> Result<(), LiveError> {
        enum Msg {
            /// Device index, a full-size buffer, and how many bytes of it hold data.
            Chunk(usize, Vec<u8>, usize),
            Done,
            Failed(LiveError),
        }
        let chunk_size = self.buf.len();
        let depth = self.opts.queue_depth.max(1);
        let stop = AtomicBool::new(false);
        let bound = IdleBound::of(&self.opts);
        let (tx, rx) = mpsc::sync_channel::<Msg>(depth);
        let mut sink_result: Result<(), LiveError> = Ok(());
        let mut counts = vec![0u64; self.devs.len()];
        // The readers' buffers once done with, freed off the downtime (see `free`).
        let mut spent: Vec<Vec<u8>> = Vec::new();
        std::thread::scope(|scope| {
            let mut returns = Vec::new();
            let mut workers = Vec::new();
            for (i, d) in self.devs.iter_mut().enumerate() {
                let tx = tx.clone();
                let (ret_tx, ret_rx) = mpsc::channel::<Vec<u8>>();
                returns.push(ret_tx);
                let session = d.session.as_mut().expect("every device has a session in STOP_COPY");
                let name = d.dev.name().to_string();
                let stop = &stop;
                workers.push(scope.spawn(move || {
                    // Buffers keep their full length, so reuse costs no zeroing.
                    let mut buf = vec![0u8; chunk_size];
                    let sent = read_stop_copy(&name, session.as_mut(), bound, stop, &mut buf, |buf, n| {
                        let next = ret_rx.try_recv().unwrap_or_else(|_| vec![0u8; chunk_size]);
                        let full = std::mem::replace(buf, next);
                        Ok(match tx.send(Msg::Chunk(i, full, n)) {
                            Ok(()) => ControlFlow::Continue(()),
                            Err(_) => ControlFlow::Break(()),
                        })
                    });
                    // A send that fails means the collector has stopped listening: nothing to say.
                    let _ = match sent {
                        Ok(ControlFlow::Continue(())) => tx.send(Msg::Done),
                        Ok(ControlFlow::Break(())) => Ok(()),
                        Err(e) => tx.send(Msg::Failed(e)),
                    };
                    // This reader's buffers, for the collector to free.
                    let mut mine: Vec<Vec<u8>> = ret_rx.try_iter().collect();
                    mine.push(buf);
                    mine
                }));
            }
            drop(tx);
            let mut done = 0;
            while done < returns.len() {
                let Ok(msg) = rx.recv() else { break };
                match msg {
                    Msg::Chunk(i, buf, n) => {
                        if let Err(e) = sink.chunk(i, Phase::StopCopy, &buf[..n]) {
                            sink_result = Err(LiveError::Sink(e));
                            break;
                        }
                        counts[i] += n as u64;
                        // Hand the buffer back for reuse (kept to free when its reader is done).
                        if let Err(mpsc::SendError(buf)) = returns[i].send(buf) {
                            spent.push(buf);
                        }
                    }
                    Msg::Done => done += 1,
                    Msg::Failed(e) => {
                        sink_result = Err(e);
                        break;
                    }
                }
            }
            if sink_result.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            // Dropping the receiver wakes any worker blocked on a full queue (its send fails).
            drop(rx);
            // Each worker returns its buffers, those that came back to it included.
            for w in workers {
                match w.join() {
                    Ok(mine) => spent.extend(mine),
                    // As the scope would have (a worker's panic is a bug, not a device's error).
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        free_buffers(spent);
        for (d, c) in self.devs.iter_mut().zip(counts) {
            d.stop_copy_bytes += c;
        }
        sink_result?;
        Ok(())
    }

    /// Finish: every device STOP_COPY -> STOP (the sessions end).
    pub fn finish(&mut self) -> Result<(), LiveError> {
        self.expect("finish", &[Stage::StopCopied])?;
        for i in 0..self.devs.len() {
            let d = &mut self.devs[i];
            d.session = None;
            if let Err(e) = set_state_or_recover(d.dev.as_mut(), DeviceState::Stop, DeviceState::Error) {
                return Err(self.fail(e.into()));
            }
        }
        self.stage = Stage::Finished;
        Ok(())
    }

    /// Abort: every device back to RUNNING from wherever it is, in two phases (every stopped
    /// device with P2P to RUNNING_P2P first, then every device to RUNNING; a device that fails
    /// either step is reset). The devices of a paused VM (STOP at [`Source::start`]) go back to
    /// STOP instead (reset when that fails: RUNNING, with its state lost). Returns what was done per device
    /// (devices that needed nothing are not listed).
    pub fn abort(&mut self) -> Vec<(String, Recovery)> {
        if self.stage == Stage::Aborted {
            return Vec::new();
        }
        for d in &mut self.devs {
            d.session = None;
        }
        let mut out = Vec::new();
        for d in self.devs.iter_mut().filter(|d| d.paused) {
            let r = restore_to(d.dev.as_mut(), DeviceState::Stop);
            if !matches!(r, Recovery::NotNeeded(_)) {
                out.push((d.dev.name().to_string(), r));
            }
        }
        let mut devs: Vec<&mut dyn MigrationDevice> = self
            .devs
            .iter_mut()
            .filter(|d| !d.paused)
            .map(|d| d.dev.as_mut() as _)
            .collect();
        out.extend(
            to_running_in_two_phases(&mut devs)
                .into_iter()
                .filter(|(_, r, _)| !matches!(r, Recovery::NotNeeded(_)))
                .map(|(name, r, _)| (name, r)),
        );
        self.stage = Stage::Aborted;
        out
    }

    fn fail(&mut self, cause: LiveError) -> LiveError {
        let recoveries = self.abort();
        LiveError::Aborted {
            cause: Box::new(cause),
            recoveries,
        }
    }

    /// Give the devices back (an unfinished migration is aborted first).
    pub fn into_devices(mut self) -> Vec<Box<dyn MigrationDevice + 'a>> {
        if !matches!(self.stage, Stage::Finished | Stage::Aborted | Stage::Idle) {
            self.abort();
        }
        self.stage = Stage::Aborted;
        std::mem::take(&mut self.devs).into_iter().map(|d| d.dev).collect()
    }

    /// Borrow device `i`.
    pub fn device(&self, i: usize) -> Option<&(dyn MigrationDevice + 'a)> {
        self.devs.get(i).map(|d| d.dev.as_ref())
    }
}

impl Drop for Source<'_> {
    fn drop(&mut self) {
        if matches!(self.stage, Stage::PreCopy | Stage::Quiesced | Stage::StopCopied) {
            for (name, r) in self.abort() {
                log::warn!("{name}: unfinished migration dropped: {r}");
            }
        }
    }
}

/// Resume source devices that a migration left stopped after handing them over (see
/// [`crate::transport`]: after COMMIT the source never resumes on its own): the operator's
/// decision when the destination is known not to run them. Every device with P2P goes from
/// STOP (or any stopped state) to RUNNING_P2P first, then every device to RUNNING.
///
/// Refused before any device is touched when a device is RESUMING (a destination, not a
/// source). A device that fails a step is reset (its state is then lost): the error names it,
/// the operation, and what was done to every device.
///
/// ```
/// use vfio_migration::emulated::EmulatedDevice;
/// use vfio_migration::live::resume_source;
/// use vfio_migration::{DeviceState, MigrationDevice};
///
/// let mut devs = vec![EmulatedDevice::from_spec("size=64K").unwrap()];
/// devs[0].set_state(DeviceState::Stop).unwrap();
/// resume_source(&mut devs).unwrap();
/// assert_eq!(devs[0].state().unwrap(), DeviceState::Running);
/// ```
pub fn resume_source<D: MigrationDevice>(devices: &mut [D]) -> Result<(), LiveError> {
    for d in devices.iter() {
        if d.state()? == DeviceState::Resuming {
            return Err(LiveError::Refused(format!(
                "{}: is RESUMING (a destination); only source devices are resumed",
                d.name()
            )));
        }
    }
    let mut devs: Vec<&mut dyn MigrationDevice> = devices.iter_mut().map(|d| d as &mut dyn MigrationDevice).collect();
    let results = to_running_in_two_phases(&mut devs);
    let mut first = None;
    let mut recoveries = Vec::with_capacity(results.len());
    for (name, r, err) in results {
        if first.is_none()
            && let Some(error) = err
        {
            first = Some(error);
        }
        recoveries.push((name, r));
    }
    match first {
        None => Ok(()),
        Some(error) => Err(LiveError::Aborted {
            cause: Box::new(LiveError::Device(error)),
            recoveries,
        }),
    }
}

/// Bring every device to RUNNING in two phases: every device with P2P that is not running
/// (STOP, STOP_COPY, PRE_COPY_P2P, ...) to RUNNING_P2P, then every device to RUNNING. A device
/// whose step fails (or that is in ERROR) is reset. Returns, per device, what was done and the
/// error that made a reset necessary.
fn to_running_in_two_phases(devs: &mut [&mut dyn MigrationDevice]) -> Vec<(String, Recovery, Option<DeviceError>)> {
    let running = |s: DeviceState| matches!(s, DeviceState::Running | DeviceState::PreCopy);
    let mut out: Vec<Option<(Recovery, Option<DeviceError>)>> = (0..devs.len()).map(|_| None).collect();
    let mut started = Vec::with_capacity(devs.len());
    // Phase 1: quiesced, not stopped.
    for (i, d) in devs.iter_mut().enumerate() {
        let state = match d.state() {
            Ok(DeviceState::Error) => None,
            Ok(s) => Some(s),
            Err(e) => {
                out[i] = Some((reset_device(&mut **d), Some(e)));
                started.push(None);
                continue;
            }
        };
        started.push(state);
        let Some(state) = state else {
            out[i] = Some((reset_device(&mut **d), None));
            continue;
        };
        let p2p = d.flags().is_ok_and(|f| f.contains(MigrationFlags::P2P));
        if p2p
            && !running(state)
            && state != DeviceState::RunningP2p
            && let Err(e) = d.set_state(DeviceState::RunningP2p)
        {
            out[i] = Some((reset_device(&mut **d), Some(e)));
        }
    }
    // Phase 2: every device runs.
    for (i, d) in devs.iter_mut().enumerate() {
        if out[i].is_some() {
            continue;
        }
        if started[i] == Some(DeviceState::Running) {
            out[i] = Some((Recovery::NotNeeded(DeviceState::Running), None));
            continue;
        }
        out[i] = Some(match d.set_state(DeviceState::Running) {
            Ok(_) => (Recovery::MovedTo(DeviceState::Running), None),
            Err(e) => (reset_device(&mut **d), Some(e)),
        });
    }
    devs.iter()
        .zip(out)
        .map(|(d, r)| {
            let (r, e) = r.unwrap_or((Recovery::NotNeeded(DeviceState::Running), None));
            (d.name().to_string(), r, e)
        })
        .collect()
}

/// When a device that keeps answering "nothing now" in STOP_COPY is declared stalled.
#[derive(Clone, Copy, Debug)]
struct IdleBound {
    polls: u32,
    time: Duration,
}

impl IdleBound {
    fn of(opts: &SourceOptions) -> Self {
        Self {
            polls: opts.max_idle_polls,
            time: opts.max_idle_time,
        }
    }
}

/// Read one device's stop-copy remainder until its end, through `buf`: `deliver` gets the
/// buffer and how many bytes of it hold data (it may swap the buffer for another of the same
/// length) and says whether to go on. Stops early, with `Break`, when `stop` is set or
/// `deliver` says so. A device that gives nothing for more than `bound` (polls or time) is
/// declared stalled; the error names it, the state, how long it waited and the bytes before.
fn read_stop_copy(
    name: &str,
    session: &mut dyn TransferSession,
    bound: IdleBound,
    stop: &AtomicBool,
    buf: &mut Vec<u8>,
    mut deliver: impl FnMut(&mut Vec<u8>, usize) -> Result<ControlFlow<()>, LiveError>,
) -> Result<ControlFlow<()>, LiveError> {
    let mut bytes = 0u64;
    let mut idle = 0u32;
    let mut idle_since = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(ControlFlow::Break(()));
        }
        match session.read(buf)? {
            ReadOutcome::Data(n) if n <= buf.len() => {
                idle = 0;
                bytes += n as u64;
                if deliver(buf, n)?.is_break() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            ReadOutcome::Data(n) => return Err(too_long(name, n)),
            ReadOutcome::NothingNow => {
                if idle == 0 {
                    idle_since = Instant::now();
                }
                idle += 1;
                let waited = idle_since.elapsed();
                if idle > bound.polls || waited > bound.time {
                    return Err(stalled(name, idle, waited, bytes).into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            ReadOutcome::End => return Ok(ControlFlow::Continue(())),
        }
    }
}

fn stalled(name: &str, polls: u32, waited: Duration, bytes: u64) -> DeviceError {
    DeviceError::new(
        name,
        Operation::Read,
        ErrorKind::InvalidAnswer(stall_text(DeviceState::StopCopy, polls, waited, bytes)),
    )
}

fn too_long_err(name: &str, n: usize) -> DeviceError {
    DeviceError::new(
        name,
        Operation::Read,
        ErrorKind::InvalidAnswer(format!("device reported {n} bytes, more than the buffer")),
    )
}

fn too_long(name: &str, n: usize) -> LiveError {
    too_long_err(name, n).into()
}
