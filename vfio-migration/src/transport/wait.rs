//! Waiting on one socket (until it is readable, or writable) with a wake-up, on rust-vmm's event-manager (and vmm-sys-util's
//! `EventFd` for the wake-up), so no `unsafe` and no hand-rolled epoll loop lives here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, EventSubscriber, Events, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// What a [`Waiter::wait`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ready {
    /// The socket is ready (readable, or writable for a [`Waiter::writable`]), closed or in
    /// error (the operation will not block for long).
    pub(crate) socket: bool,
    /// [`Waiter::wake`] was called (the wake-up is consumed).
    pub(crate) woken: bool,
}

/// One watched descriptor: an event-manager subscriber that records that it fired.
#[derive(Debug)]
struct Watch {
    fd: RawFd,
    events: EventSet,
    registered: AtomicBool,
    fired: AtomicBool,
}

impl Watch {
    fn new(fd: RawFd, events: EventSet) -> Arc<Self> {
        Arc::new(Self {
            fd,
            events,
            registered: AtomicBool::new(false),
            fired: AtomicBool::new(false),
        })
    }

    fn take(&self) -> bool {
        self.fired.swap(false, Ordering::AcqRel)
    }
}

impl EventSubscriber for Watch {
    fn init(&self, ops: &mut EventOps) {
        if ops.add(Events::new_raw(self.fd, self.events)).is_ok() {
            self.registered.store(true, Ordering::Release);
        }
    }

    fn process(&self, _events: Events, _ops: &mut EventOps) {
        self.fired.store(true, Ordering::Release);
    }
}

/// Waits until a socket is readable (or writable) or another thread wakes it.
pub(crate) struct Waiter {
    manager: Mutex<EventManager<Arc<Watch>>>,
    socket: Arc<Watch>,
    woken: Arc<Watch>,
    wake: EventFd,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter")
            .field("socket", &self.socket.fd)
            .finish_non_exhaustive()
    }
}

impl Waiter {
    /// A waiter until socket `fd` (which must outlive it) is readable.
    pub(crate) fn new(fd: RawFd) -> io::Result<Self> {
        Self::on(fd, EventSet::IN)
    }

    /// A waiter until socket `fd` (which must outlive it) is writable.
    pub(crate) fn writable(fd: RawFd) -> io::Result<Self> {
        Self::on(fd, EventSet::OUT)
    }

    fn on(fd: RawFd, events: EventSet) -> io::Result<Self> {
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let mut manager = EventManager::<Arc<Watch>>::new().map_err(|e| io::Error::other(e.to_string()))?;
        let socket = Watch::new(fd, events);
        let woken = Watch::new(wake.as_raw_fd(), EventSet::IN);
        manager.add_subscriber(Arc::clone(&socket));
        manager.add_subscriber(Arc::clone(&woken));
        if !socket.registered.load(Ordering::Acquire) || !woken.registered.load(Ordering::Acquire) {
            return Err(io::Error::other("could not watch the connection for readiness"));
        }
        Ok(Self {
            manager: Mutex::new(manager),
            socket,
            woken,
            wake,
        })
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

    /// Whether the socket is ready now (without waiting; a wake-up is left pending).
    pub(crate) fn ready_now(&self) -> bool {
        let ran = match self.manager.lock() {
            Ok(mut m) => m.run_with_timeout(0).is_ok(),
            Err(_) => false,
        };
        ran && self.socket.take()
    }

    /// Wait at most `timeout`.
    pub(crate) fn wait(&self, timeout: Duration) -> Ready {
        let ms = timeout.as_millis().clamp(1, 60_000) as i32;
        let ran = match self.manager.lock() {
            Ok(mut m) => m.run_with_timeout(ms).is_ok(),
            Err(_) => false,
        };
        // EINTR or a broken event loop: report nothing; callers loop on their own deadlines.
        let r = Ready {
            socket: ran && self.socket.take(),
            woken: ran && self.woken.take(),
        };
        if r.woken {
            self.clear();
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_readiness_wakeups_and_timeouts() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let w = Waiter::new(b.as_raw_fd()).unwrap();
        assert_eq!(w.wait(Duration::from_millis(5)), Ready::default());
        w.wake();
        assert_eq!(
            w.wait(Duration::from_millis(5)),
            Ready {
                socket: false,
                woken: true
            }
        );
        assert_eq!(
            w.wait(Duration::from_millis(5)),
            Ready::default(),
            "a wake-up is consumed"
        );
        let out = Waiter::writable(a.as_raw_fd()).unwrap();
        assert!(out.ready_now(), "an empty socket is writable");
        assert!(out.wait(Duration::from_millis(500)).socket);
        assert!(!w.ready_now(), "nothing to read yet");
        a.write_all(b"x").unwrap();
        assert_eq!(
            w.wait(Duration::from_millis(500)),
            Ready {
                socket: true,
                woken: false
            }
        );
    }
}
