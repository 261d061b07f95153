//! Every fault the emulated device can inject, through stop-copy save/load and live migration:
//! the source always ends RUNNING. Its state is intact when recovery did not reset it; when
//! recovery reset it, the documented outcome holds: the content is lost (the emulated default,
//! `reset=wipe`, wipes it as an FLR does) and the error says "device state lost by reset". With
//! `reset=keep` (mtty's behaviour) the state survives even a reset. The destination ends reset
//! and usable (a good load into it afterwards verifies).

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use vfio_migration::DeviceState::{self, *};
use vfio_migration::emulated::{ArcFault, Burst, EmulatedConfig, EmulatedDevice, Faults, ResetMode, WriteFault};
use vfio_migration::live::{LiveError, LocalMigration};
use vfio_migration::session::{After, LoadOptions, STATE_LOST_BY_RESET, SaveOptions, SessionError, load, save};
use vfio_migration::{MigrationDevice, MigrationFlags};

const SIZE: u64 = 256 << 10;

fn device(seed: u64, flags: MigrationFlags) -> EmulatedDevice {
    named(seed, flags, None, ResetMode::default())
}

fn named(seed: u64, flags: MigrationFlags, name: Option<&str>, reset: ResetMode) -> EmulatedDevice {
    let cfg = EmulatedConfig {
        size: SIZE,
        seed,
        flags,
        reset,
        name: name.map(str::to_string),
        ..EmulatedConfig::default()
    };
    EmulatedDevice::new(cfg).expect("valid config")
}

fn all() -> MigrationFlags {
    MigrationFlags::KNOWN
}

/// A source whose state differs from the default (some blocks at newer versions).
fn busy_source(flags: MigrationFlags) -> EmulatedDevice {
    busy_named(flags, None, ResetMode::default())
}

fn busy_named(flags: MigrationFlags, name: Option<&str>, reset: ResetMode) -> EmulatedDevice {
    let d = named(7, flags, name, reset);
    d.touch_blocks(20).unwrap();
    d
}

/// The source after a failure whose error is `msg` and whose recovery did (`reset`) or did not
/// reset it: RUNNING either way; intact without a reset (or with `reset=keep`); after a wiping
/// reset its content is lost and the error says so, naming the device.
fn assert_source_after_recovery(src: &EmulatedDevice, digest: u64, reset: bool, msg: &str) {
    let name = src.name();
    assert_eq!(src.device_state(), Running, "source {name} must end RUNNING: {msg}");
    assert_eq!(
        src.reset_generation() > 0,
        reset && src.config().reset == ResetMode::Wipe,
        "{name}: the engine's report of a reset must match the device: {msg}"
    );
    if reset {
        assert!(
            msg.contains(STATE_LOST_BY_RESET),
            "{name}: the error must say the state was lost: {msg}"
        );
        assert!(msg.contains(name), "the error names the device: {msg}");
    }
    if reset && src.config().reset == ResetMode::Wipe {
        assert_ne!(
            src.digest(),
            digest,
            "source {name}: a wiping reset loses the state: {msg}"
        );
    } else {
        assert_eq!(src.digest(), digest, "source {name} state must be intact: {msg}");
    }
}

fn save_ok(src: &mut EmulatedDevice) -> Vec<u8> {
    let mut out = Vec::new();
    save(src, &mut out, SaveOptions::default()).expect("save");
    out
}

/// The destination is RUNNING and usable: a good state loads into it and verifies.
fn assert_usable_destination(dst: &mut EmulatedDevice, flags: MigrationFlags) {
    assert_eq!(dst.state().unwrap(), Running, "destination must end RUNNING");
    let mut src = busy_source(flags);
    let state = save_ok(&mut src);
    load(dst, &mut state.as_slice(), LoadOptions::default()).expect("a good load after the failure works");
    assert_eq!(dst.digest(), src.digest());
}

/// Every arc on the way to STOP_COPY and back, for P2P and non-P2P devices.
fn save_arcs(flags: MigrationFlags) -> Vec<(DeviceState, DeviceState)> {
    let mut arcs = Vec::new();
    for (from, to) in [(Running, StopCopy), (StopCopy, Running)] {
        let p = vfio_migration::state::path(from, to, flags).unwrap();
        arcs.extend(p.windows(2).map(|w| (w[0], w[1])));
    }
    arcs
}

#[test]
fn save_survives_a_failed_arc_anywhere() {
    let mut resets = 0;
    for (flags, mode) in [all(), MigrationFlags::STOP_COPY]
        .into_iter()
        .flat_map(|f| [(f, ResetMode::Wipe), (f, ResetMode::Keep)])
    {
        for (from, to) in save_arcs(flags) {
            for to_error in [false, true] {
                let mut src = busy_named(flags, None, mode);
                let digest = src.digest();
                src.set_faults(Faults {
                    fail_arc: Some(ArcFault {
                        from,
                        to,
                        errno: libc::EIO,
                        to_error,
                        once: true,
                    }),
                    ..Faults::default()
                });
                let mut out = Vec::new();
                let err = save(&mut src, &mut out, SaveOptions::default())
                    .expect_err(&format!("{from}->{to} must fail the save"));
                let msg = err.to_string();
                assert!(msg.contains(src.name()), "error names the device: {msg}");
                assert!(err.recovery().is_some_and(|r| r.succeeded()), "{msg}");
                let reset = err.recovery().is_some_and(|r| r.reset());
                // A fall into ERROR leaves only a reset.
                assert!(reset || !to_error, "{from}->{to} into ERROR: {msg}");
                resets += usize::from(reset);
                assert_source_after_recovery(&src, digest, reset, &msg);
                // And a save then works and verifies (the state the source holds now).
                let now = src.digest();
                let state = save_ok(&mut src);
                let mut dst = device(7, flags);
                load(&mut dst, &mut state.as_slice(), LoadOptions::default()).unwrap();
                assert_eq!(dst.digest(), now);
            }
        }
    }
    assert!(resets > 0, "some of these recoveries must reset");
}

#[test]
fn short_reads_bursts_and_missing_estimates_still_save_correctly() {
    let faults = [
        Faults {
            short_read: Some(7),
            ..Faults::default()
        },
        Faults {
            nothing_now: Some(Burst { count: 3, every: 5 }),
            ..Faults::default()
        },
        Faults {
            stop_copy_size_errno: Some(libc::ENOTTY),
            ..Faults::default()
        },
    ];
    for f in faults {
        let mut src = busy_source(all());
        src.set_faults(f.clone());
        let state = save_ok(&mut src);
        let mut dst = device(7, all());
        load(&mut dst, &mut state.as_slice(), LoadOptions::default()).unwrap_or_else(|e| panic!("{f:?}: {e}"));
        assert_eq!(dst.digest(), src.digest(), "{f:?}");
        assert_eq!(src.device_state(), Running);
    }
}

#[test]
fn an_early_end_is_refused_by_the_destination() {
    let mut src = busy_source(all());
    src.set_faults(Faults {
        early_end: Some(1000),
        ..Faults::default()
    });
    let short = save_ok(&mut src);
    assert_eq!(src.device_state(), Running);
    let mut dst = device(7, all());
    let err = load(&mut dst, &mut short.as_slice(), LoadOptions::default()).expect_err("short state");
    assert!(matches!(err, SessionError::Transition(_)), "{err}");
    assert_usable_destination(&mut dst, all());
}

#[test]
fn load_survives_a_failed_arc_anywhere() {
    for flags in [all(), MigrationFlags::STOP_COPY] {
        let mut src = busy_source(flags);
        let state = save_ok(&mut src);
        let mut arcs = Vec::new();
        for (from, to) in [(Running, Resuming), (Resuming, Running)] {
            let p = vfio_migration::state::path(from, to, flags).unwrap();
            arcs.extend(p.windows(2).map(|w| (w[0], w[1])));
        }
        for (from, to) in arcs {
            for to_error in [false, true] {
                let mut dst = device(7, flags);
                dst.set_faults(Faults {
                    fail_arc: Some(ArcFault {
                        from,
                        to,
                        errno: libc::EIO,
                        to_error,
                        once: true,
                    }),
                    ..Faults::default()
                });
                let err = load(&mut dst, &mut state.as_slice(), LoadOptions::default())
                    .expect_err(&format!("{from}->{to} must fail the load"));
                assert!(err.recovery().is_some_and(|r| r.succeeded()), "{err}");
                assert_usable_destination(&mut dst, flags);
            }
        }
    }
}

#[test]
fn refused_writes_and_corrupt_or_truncated_states_reset_the_destination() {
    let mut src = busy_source(all());
    let state = save_ok(&mut src);
    // A write refused at byte N.
    let mut dst = device(7, all());
    dst.set_faults(Faults {
        write_fail: Some(WriteFault {
            at: 5000,
            errno: libc::EFAULT,
        }),
        ..Faults::default()
    });
    let err = load(&mut dst, &mut state.as_slice(), LoadOptions::default()).expect_err("refused write");
    assert!(matches!(err, SessionError::Transfer { bytes: 5000, .. }), "{err}");
    dst.set_faults(Faults::default());
    assert_usable_destination(&mut dst, all());
    // Every kind of damage: a flipped byte, a cut, trailing garbage, another seed.
    let mut flipped = state.clone();
    flipped[state.len() / 2] ^= 0x40;
    let mut extra = state.clone();
    extra.extend_from_slice(b"garbage");
    let other_seed = save_ok(&mut device(8, all()));
    for (what, bad) in [
        ("flipped", flipped),
        ("truncated", state[..state.len() - 1].to_vec()),
        ("extra", extra),
        ("other seed", other_seed),
        ("empty", Vec::new()),
    ] {
        let mut dst = device(7, all());
        let err = load(&mut dst, &mut bad.as_slice(), LoadOptions::default()).expect_err(what);
        assert!(err.recovery().is_some_and(|r| r.succeeded()), "{what}: {err}");
        assert_usable_destination(&mut dst, all());
    }
}

#[test]
fn a_failing_reset_is_retried() {
    let mut src = busy_source(all());
    let state = save_ok(&mut src);
    let mut dst = device(7, all());
    dst.set_faults(Faults {
        fail_arc: Some(ArcFault {
            from: Resuming,
            to: Stop,
            errno: libc::EIO,
            to_error: true,
            once: true,
        }),
        reset_fails_once: Some(libc::EIO),
        ..Faults::default()
    });
    let err = load(&mut dst, &mut state.as_slice(), LoadOptions::default()).expect_err("fails");
    assert!(err.recovery().is_some_and(|r| r.succeeded()), "{err}");
    assert_usable_destination(&mut dst, all());
}

struct FailingWriter {
    left: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer went away"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failed_output_or_cancel_returns_the_source_to_running() {
    let mut src = busy_source(all());
    let digest = src.digest();
    let err = save(&mut src, &mut FailingWriter { left: 10_000 }, SaveOptions::default()).expect_err("output fails");
    assert!(matches!(err, SessionError::Io { .. }), "{err}");
    assert!(err.to_string().contains("peer went away"), "{err}");
    // Returning to RUNNING from STOP_COPY needs no reset: nothing is lost.
    assert_source_after_recovery(&src, digest, false, &err.to_string());

    let cancel = AtomicBool::new(false);
    let mut seen = 0u64;
    let mut progress = |bytes: u64, _total: Option<u64>| {
        seen = bytes;
        if bytes > 50_000 {
            cancel.store(true, Ordering::Relaxed);
        }
    };
    let opts = SaveOptions {
        buffer_size: 4096,
        cancel: Some(&cancel),
        progress: Some(&mut progress),
        ..SaveOptions::default()
    };
    let err = save(&mut src, &mut Vec::new(), opts).expect_err("cancelled");
    assert!(matches!(err, SessionError::Cancelled { .. }), "{err}");
    assert!(seen > 50_000);
    assert_source_after_recovery(&src, digest, false, &err.to_string());
}

#[test]
fn save_with_after_stop_leaves_the_source_stopped() {
    let mut src = busy_source(all());
    let opts = SaveOptions {
        after: After::Stop,
        ..SaveOptions::default()
    };
    save(&mut src, &mut Vec::new(), opts).unwrap();
    assert_eq!(src.device_state(), Stop);
}

/// Whether the error of a live migration reports a reset of the device named `name`.
fn live_reset(err: &LiveError, name: &str) -> bool {
    match err {
        LiveError::Aborted { cause, recoveries } => {
            recoveries.iter().any(|(n, r)| n == name && r.reset()) || live_reset(cause, name)
        }
        LiveError::Transition(t) => t.error.device == name && t.recovery.reset(),
        _ => false,
    }
}

/// Live migration: a fault on any arc either side, at any phase, leaves the sources RUNNING
/// (intact unless a recovery had to reset them and the reset wipes) and the destinations reset
/// and usable.
#[test]
fn live_migration_survives_a_failed_arc_anywhere() {
    let arcs_src = [
        (Running, PreCopy),
        (PreCopy, PreCopyP2p),
        (PreCopyP2p, StopCopy),
        (StopCopy, Stop),
    ];
    let arcs_dst = [
        (Running, RunningP2p),
        (Stop, Resuming),
        (Resuming, Stop),
        (Stop, RunningP2p),
        (RunningP2p, Running),
    ];
    let mut source_resets = 0;
    for (side, (from, to)) in arcs_src
        .iter()
        .map(|a| ("source", *a))
        .chain(arcs_dst.iter().map(|a| ("dest", *a)))
    {
        for (faulty, mode, to_error) in [0, 1].into_iter().flat_map(|f| {
            [ResetMode::Wipe, ResetMode::Keep]
                .into_iter()
                .flat_map(move |m| [(f, m, false), (f, m, true)])
        }) {
            let mut srcs = [
                busy_named(all(), Some("src0"), mode),
                busy_named(all(), Some("src1"), mode),
            ];
            let digests: Vec<u64> = srcs.iter().map(|d| d.digest()).collect();
            let mut dsts = [device(7, all()), device(7, all())];
            let fault = Faults {
                fail_arc: Some(ArcFault {
                    from,
                    to,
                    errno: libc::EIO,
                    to_error,
                    once: true,
                }),
                ..Faults::default()
            };
            if side == "source" {
                srcs[faulty].set_faults(fault);
            } else {
                dsts[faulty].set_faults(fault);
            }
            let [s0, s1] = &mut srcs;
            let [d0, d1] = &mut dsts;
            let result = LocalMigration::default().run(
                vec![Box::new(&mut *s0), Box::new(&mut *s1)],
                vec![Box::new(&mut *d0), Box::new(&mut *d1)],
                &mut |_| {},
            );
            let label = format!("{side} device {faulty} arc {from}->{to} to_error={to_error} reset={mode}");
            let err = result.expect_err(&label);
            assert!(err.devices_recovered(), "{label}: {err}");
            for (s, digest) in srcs.iter().zip(&digests) {
                let reset = live_reset(&err, s.name());
                source_resets += usize::from(reset);
                assert_source_after_recovery(s, *digest, reset, &format!("{label}: {err}"));
            }
            for d in &mut dsts {
                d.set_faults(Faults::default());
                assert_usable_destination(d, all());
            }
        }
    }
    assert!(source_resets > 0, "a source fallen into ERROR must be reset");
}

#[test]
fn live_migration_verifies_with_and_without_precopy() {
    for precopy in [true, false] {
        let mut srcs: Vec<EmulatedDevice> = (0..3).map(|_| busy_source(all())).collect();
        let mut dsts: Vec<EmulatedDevice> = (0..3).map(|_| device(7, all())).collect();
        let mut m = LocalMigration::default();
        m.source.precopy = precopy;
        m.source.chunk_size = 4096;
        let report = m
            .run(
                srcs.iter_mut()
                    .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
                    .collect(),
                dsts.iter_mut()
                    .map(|d| Box::new(d) as Box<dyn MigrationDevice>)
                    .collect(),
                &mut |_| {},
            )
            .unwrap();
        for (s, d) in srcs.iter().zip(&dsts) {
            assert_eq!(s.digest(), d.digest());
            assert_eq!(s.device_state(), Stop);
            assert_eq!(d.device_state(), Running);
        }
        let pre: u64 = report.precopy_bytes.iter().sum();
        assert_eq!(pre > 0, precopy, "{report:?}");
        assert_eq!(report.switch_reason, if precopy { "converged" } else { "no-precopy" });
    }
}

#[test]
fn several_devices_without_p2p_are_refused_unless_forced() {
    let mut a = busy_source(MigrationFlags::STOP_COPY);
    let mut b = busy_source(all());
    let mut c = device(7, MigrationFlags::STOP_COPY);
    let mut d = device(7, all());
    let err = LocalMigration::default()
        .run(
            vec![Box::new(&mut a), Box::new(&mut b)],
            vec![Box::new(&mut c), Box::new(&mut d)],
            &mut |_| {},
        )
        .expect_err("refused");
    assert!(err.to_string().contains("lack P2P"), "{err}");
    assert_eq!(a.device_state(), Running);
    let mut m = LocalMigration::default();
    m.source.force_without_p2p = true;
    m.run(
        vec![Box::new(&mut a), Box::new(&mut b)],
        vec![Box::new(&mut c), Box::new(&mut d)],
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(a.digest(), c.digest());
    assert_eq!(b.digest(), d.digest());
}

#[test]
fn a_read_rate_bounds_how_fast_the_state_comes_out() {
    let cfg: EmulatedConfig = "size=1M,read-rate=8M".parse().unwrap();
    let mut src = EmulatedDevice::new(cfg).unwrap();
    let t = std::time::Instant::now();
    let state = save_ok(&mut src);
    let took = t.elapsed();
    // 1 MiB at 8 MiB/s takes at least 125 ms (the first chunk is free, so allow a little).
    assert!(took >= std::time::Duration::from_millis(100), "{took:?}");
    let mut dst = EmulatedDevice::new("size=1M".parse().unwrap()).unwrap();
    load(&mut dst, &mut state.as_slice(), LoadOptions::default()).unwrap();
    assert_eq!(dst.digest(), src.digest());
}

/// A device whose stop-copy never produces data nor ends ("nothing now" forever), each read
/// first waiting the given time (as a kernel data_fd read waits up to `kernel::READ_WAIT`).
struct Stalling(EmulatedDevice, std::time::Duration);

#[derive(Debug)]
struct StallingSession(std::time::Duration);

impl vfio_migration::TransferSession for StallingSession {
    fn kind(&self) -> vfio_migration::state::SessionKind {
        vfio_migration::state::SessionKind::Saving
    }
    fn read(&mut self, _: &mut [u8]) -> Result<vfio_migration::device::ReadOutcome, vfio_migration::DeviceError> {
        std::thread::sleep(self.0);
        Ok(vfio_migration::device::ReadOutcome::NothingNow)
    }
    fn write(&mut self, _: &[u8]) -> Result<usize, vfio_migration::DeviceError> {
        unreachable!("saving session")
    }
    fn precopy_info(&mut self) -> Result<vfio_migration::device::PrecopyInfo, vfio_migration::DeviceError> {
        Ok(Default::default())
    }
}

impl MigrationDevice for Stalling {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn identity(&self) -> vfio_migration::device::DeviceIdentity {
        self.0.identity()
    }
    fn flags(&self) -> Result<MigrationFlags, vfio_migration::DeviceError> {
        self.0.flags()
    }
    fn state(&self) -> Result<DeviceState, vfio_migration::DeviceError> {
        self.0.state()
    }
    fn set_state(
        &mut self,
        to: DeviceState,
    ) -> Result<Option<Box<dyn vfio_migration::TransferSession>>, vfio_migration::DeviceError> {
        let s = self.0.set_state(to)?;
        Ok(s.map(|s| {
            if to == StopCopy {
                Box::new(StallingSession(self.1)) as _
            } else {
                s
            }
        }))
    }
    fn stop_copy_size(&self) -> Result<u64, vfio_migration::DeviceError> {
        self.0.stop_copy_size()
    }
    fn reset(&mut self) -> Result<(), vfio_migration::DeviceError> {
        self.0.reset()
    }
    fn dma_log_start(
        &mut self,
        r: &[vfio_migration::device::DmaRange],
        p: u64,
    ) -> Result<u64, vfio_migration::DeviceError> {
        self.0.dma_log_start(r, p)
    }
    fn dma_log_report(&mut self, i: u64, l: u64, p: u64, b: &mut [u64]) -> Result<(), vfio_migration::DeviceError> {
        self.0.dma_log_report(i, l, p, b)
    }
    fn dma_log_stop(&mut self) -> Result<(), vfio_migration::DeviceError> {
        self.0.dma_log_stop()
    }
}

#[test]
fn a_device_that_stalls_in_stop_copy_is_abandoned_not_waited_for_forever() {
    for parallel in [false, true] {
        let mut a = Stalling(busy_source(all()), std::time::Duration::ZERO);
        let mut b = busy_source(all());
        let digest = a.0.digest();
        let mut m = LocalMigration::default();
        m.source.precopy = false;
        m.source.parallel = parallel;
        m.source.max_idle_polls = 20;
        let mut da = device(7, all());
        let mut db = device(7, all());
        let err = m
            .run(
                vec![Box::new(&mut a), Box::new(&mut b)],
                vec![Box::new(&mut da), Box::new(&mut db)],
                &mut |_| {},
            )
            .expect_err("stalled");
        let (_, polls) = stall_of(&err, a.0.name());
        assert_eq!(polls, 21, "the poll bound trips first: {err}");
        assert_source_after_recovery(&a.0, digest, live_reset(&err, a.0.name()), &err.to_string());
        assert_eq!(b.device_state(), Running);
        assert_eq!(da.device_state(), Running);
    }
}

/// The stall a live migration failed with: how long (ms) and how many polls `name` gave
/// nothing in STOP_COPY, checked to be that device's read in that state, before any byte.
fn stall_of(err: &LiveError, name: &str) -> (u64, u32) {
    let LiveError::Aborted { cause, .. } = err else {
        panic!("want an aborted migration, got {err}");
    };
    let LiveError::Device(e) = cause.as_ref() else {
        panic!("want a device error, got {cause}");
    };
    assert_eq!(e.device, name, "{err}");
    assert_eq!(e.op, vfio_migration::device::Operation::Read, "{err}");
    let vfio_migration::device::ErrorKind::InvalidAnswer(text) = &e.kind else {
        panic!("want an invalid answer, got {err}");
    };
    let rest = text
        .strip_prefix("no device state in STOP_COPY for ")
        .unwrap_or_else(|| panic!("{err}"));
    let (ms, rest) = rest.split_once(" ms (").unwrap_or_else(|| panic!("{err}"));
    let (polls, rest) = rest.split_once(" polls)").unwrap_or_else(|| panic!("{err}"));
    assert_eq!(rest, " after 0 bytes", "{err}");
    (ms.parse().unwrap(), polls.parse().unwrap())
}

#[test]
fn a_device_that_waits_on_every_read_in_stop_copy_stalls_within_the_time_bound() {
    let wait = vfio_migration::kernel::READ_WAIT;
    for parallel in [false, true] {
        let mut a = Stalling(busy_source(all()), wait);
        let mut b = busy_source(all());
        let digest = a.0.digest();
        let mut m = LocalMigration::default();
        m.source.precopy = false;
        m.source.parallel = parallel;
        m.source.max_idle_time = std::time::Duration::from_millis(50);
        let max_polls = m.source.max_idle_polls;
        let mut da = device(7, all());
        let mut db = device(7, all());
        let err = m
            .run(
                vec![Box::new(&mut a), Box::new(&mut b)],
                vec![Box::new(&mut da), Box::new(&mut db)],
                &mut |_| {},
            )
            .expect_err("stalled");
        let (ms, polls) = stall_of(&err, a.0.name());
        assert!(ms >= 50, "it waited the time bound: {err}");
        // Each poll waited READ_WAIT, so the time bound trips after a handful of polls.
        let most = 50 / wait.as_millis() as u32 + 1;
        assert!((2..=most).contains(&polls), "{err}");
        assert!(polls < max_polls / 100, "far below max_idle_polls {max_polls}: {err}");
        assert_source_after_recovery(&a.0, digest, live_reset(&err, a.0.name()), &err.to_string());
        assert_eq!(b.device_state(), Running);
        assert_eq!(da.device_state(), Running);
        assert_eq!(db.device_state(), Running);
    }
}
