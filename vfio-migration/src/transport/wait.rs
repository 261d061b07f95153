//! Waiting on one socket with a wake-up: rust-vmm's epoll and eventfd wrappers
//! (`vmm-sys-util`), so no `unsafe` lives here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

const SOCKET: u64 = 0;
const WAKE: u64 = 1;

/// What a [`Waiter::wait`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ready {
    /// The socket is readable, closed or in error (a read will not block for long).
    pub(crate) socket: bool,
    /// [`Waiter::wake`] was called (the wake-up is consumed).
    pub(crate) woken: bool,
}

/// Waits until a socket is readable or another thread wakes it.
pub(crate) struct Waiter {
    epoll: Epoll,
    wake: EventFd,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").finish_non_exhaustive()
    }
}

impl Waiter {
    /// A waiter on socket `fd` (which must outlive it).
    pub(crate) fn new(fd: RawFd) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, SOCKET))?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE),
        )?;
        Ok(Self { epoll, wake })
    }

    /// Wake the thread in [`Waiter::wait`] (or the next call to it).
    pub(crate) fn wake(&self) {
        // Fails only when the counter is saturated: a wake-up is pending anyway.
        let _ = self.wake.write(1);
    }

    /// Forget pending wake-ups.
    pub(crate) fn clear(&self) {
        let _ = self.wake.read();
    }

    /// Wait at most `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) -> Ready {
        let mut events = [EpollEvent::default(); 2];
        let ms = timeout.as_millis().clamp(1, 60_000) as i32;
        let n = match self.epoll.wait(ms, &mut events) {
            Ok(n) => n,
            // EINTR or a broken epoll: report nothing; callers loop on their own deadlines.
            Err(_) => return Ready::default(),
        };
        let mut r = Ready::default();
        for e in events.iter().take(n) {
            match e.data() {
                SOCKET => r.socket = true,
                _ => {
                    self.clear();
                    r.woken = true;
                }
            }
        }
        r
    }
}
