//! A local TCP proxy that caps each connection's bytes from the sender to the receiver at a
//! fixed rate (a token bucket with a 64 KiB burst), as a real link with a per-flow cap would;
//! the other direction is copied as it comes. Shared by the transport tests and the transport
//! benchmark (`#[path]`-included, so not every item is used by every includer).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The largest burst a capped connection may send at once.
const BURST: f64 = 64.0 * 1024.0;

/// The rate cap of connection `i` (in accept order: 0 is the sender's control connection, then
/// its data connections), in bytes per second; `None`: uncapped.
pub type Caps = Arc<dyn Fn(usize) -> Option<u64> + Send + Sync>;

/// A running proxy; stops accepting when dropped (connections already open run to their end).
pub struct RateProxy {
    /// `tcp:127.0.0.1:PORT`, to give the sender.
    pub url: String,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RateProxy {
    /// Forward every connection to `target` (`HOST:PORT`), capping each as `caps` says.
    pub fn start(target: String, caps: Caps) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = l.local_addr().expect("proxy address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut i = 0;
            for a in l.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(a) = a else { continue };
                let Ok(b) = TcpStream::connect(&target) else { continue };
                let _ = (a.set_nodelay(true), b.set_nodelay(true));
                let cap = caps(i);
                i += 1;
                let (a2, b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
                std::thread::spawn(move || pump(a, b, cap));
                std::thread::spawn(move || pump(b2, a2, None));
            }
        });
        Self {
            url: format!("tcp:127.0.0.1:{port}"),
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Every connection capped at `rate` bytes per second.
    pub fn uniform(target: String, rate: u64) -> Self {
        Self::start(target, Arc::new(move |_| Some(rate)))
    }
}

impl Drop for RateProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copy `from` to `to` at most `cap` bytes per second, then pass the end on.
fn pump(mut from: TcpStream, mut to: TcpStream, cap: Option<u64>) {
    let mut buf = vec![0u8; 16 << 10];
    let mut tokens = BURST;
    let mut last = Instant::now();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(rate) = cap {
            let rate = rate as f64;
            let now = Instant::now();
            tokens = (tokens + now.duration_since(last).as_secs_f64() * rate).min(BURST);
            last = now;
            tokens -= n as f64;
            if tokens < 0.0 {
                std::thread::sleep(Duration::from_secs_f64(-tokens / rate));
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
