//! A shared device's transfer sessions forward `write_within`, the bounded write of the engine's
//! load path (poll for room, cancel checks between waits), instead of falling back to the
//! default (a plain `write`, which may wait longer and answers every call with some bytes).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ch_integration::shared::SharedDevice;
use vfio_migration::DeviceError;
use vfio_migration::device::{
    DeviceIdentity, DmaRange, MigrationDevice, Operation, PrecopyInfo, ReadOutcome, TransferSession,
};
use vfio_migration::state::{DeviceState, MigrationFlags, SessionKind};

const ALL: MigrationFlags = MigrationFlags::from_bits(7);
const WAIT: Duration = Duration::from_millis(7);

/// What a probe's sessions were asked: `write_within` (bytes offered, wait) and `write` (bytes).
#[derive(Debug, Default)]
struct Writes {
    within: Vec<(usize, Duration)>,
    plain: Vec<usize>,
}

/// A session whose `write_within` answers from a script (`None`: took nothing in time; `Some(n)`:
/// took at most `n` bytes), which the default `write_within` (a plain `write`) never would.
#[derive(Debug)]
struct ProbeSession {
    kind: SessionKind,
    writes: Arc<Mutex<Writes>>,
    script: Arc<Mutex<VecDeque<Option<usize>>>>,
}

impl TransferSession for ProbeSession {
    fn kind(&self) -> SessionKind {
        self.kind
    }
    fn read(&mut self, _buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        Ok(ReadOutcome::End)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        self.writes.lock().unwrap().plain.push(buf.len());
        Ok(buf.len())
    }
    fn write_within(&mut self, buf: &[u8], wait: Duration) -> Result<Option<usize>, DeviceError> {
        self.writes.lock().unwrap().within.push((buf.len(), wait));
        let answer = self.script.lock().unwrap().pop_front().unwrap_or(Some(buf.len()));
        Ok(answer.map(|n| n.min(buf.len())))
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        Ok(PrecopyInfo::default())
    }
}

/// A device whose sessions are [`ProbeSession`]s (any transition is taken in one step).
struct ProbeDevice {
    state: DeviceState,
    writes: Arc<Mutex<Writes>>,
    script: Arc<Mutex<VecDeque<Option<usize>>>>,
}

impl MigrationDevice for ProbeDevice {
    fn name(&self) -> &str {
        "probe"
    }
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity::Unknown
    }
    fn flags(&self) -> Result<MigrationFlags, DeviceError> {
        Ok(ALL)
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        Ok(self.state)
    }
    fn set_state(&mut self, to: DeviceState) -> Result<Option<Box<dyn TransferSession>>, DeviceError> {
        self.state = to;
        Ok(to.session_kind().map(|kind| {
            Box::new(ProbeSession {
                kind,
                writes: self.writes.clone(),
                script: self.script.clone(),
            }) as Box<dyn TransferSession>
        }))
    }
    fn stop_copy_size(&self) -> Result<u64, DeviceError> {
        Ok(0)
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.state = DeviceState::Running;
        Ok(())
    }
    fn dma_log_start(&mut self, _ranges: &[DmaRange], _page_size: u64) -> Result<u64, DeviceError> {
        Err(DeviceError::errno("probe", Operation::DmaLogStart, libc::ENOTTY))
    }
    fn dma_log_report(&mut self, _: u64, _: u64, _: u64, _: &mut [u64]) -> Result<(), DeviceError> {
        Err(DeviceError::errno("probe", Operation::DmaLogReport, libc::ENOTTY))
    }
    fn dma_log_stop(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[test]
fn a_shared_devices_session_forwards_write_within_and_write() {
    let writes = Arc::new(Mutex::new(Writes::default()));
    let script = Arc::new(Mutex::new(VecDeque::from([None, Some(2)])));
    let shared = SharedDevice::new(Box::new(ProbeDevice {
        state: DeviceState::Running,
        writes: writes.clone(),
        script,
    }));
    let mut s = shared.clone().set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(s.kind(), SessionKind::Resuming);
    // The device's own answers: nothing within the wait, then a short write.
    assert_eq!(
        s.write_within(b"abcd", WAIT).unwrap(),
        None,
        "no room: the caller waits and checks cancel"
    );
    assert_eq!(s.write_within(b"abcd", WAIT).unwrap(), Some(2));
    assert_eq!(s.write(b"xyz").unwrap(), 3);
    {
        let w = writes.lock().unwrap();
        assert_eq!(
            w.within,
            [(4, WAIT), (4, WAIT)],
            "the wait reaches the device's session"
        );
        assert_eq!(w.plain, [3], "write_within is not turned into write");
    }
    // The device leaves: its session ends, what is written is dropped without touching it.
    assert!(shared.detach().is_some());
    assert_eq!(s.write_within(b"abcdef", WAIT).unwrap(), Some(6));
    assert_eq!(s.write(b"ab").unwrap(), 2);
    let w = writes.lock().unwrap();
    assert_eq!(
        (w.within.len(), w.plain.len()),
        (2, 1),
        "nothing reached the departed device"
    );
}

#[test]
fn a_detached_devices_new_session_takes_everything_within_the_wait() {
    let shared = SharedDevice::new(Box::new(ProbeDevice {
        state: DeviceState::Running,
        writes: Arc::default(),
        script: Arc::default(),
    }));
    shared.detach().unwrap();
    let mut s = shared.clone().set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(s.write_within(b"abcd", WAIT).unwrap(), Some(4));
}
