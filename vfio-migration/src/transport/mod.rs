//! Live migration between two processes over TCP or unix sockets, optionally with mutual TLS.
//!
//! The sender ([`send`]) runs [`crate::live::Source`] with the same convergence policy as
//! [`crate::live::LocalMigration`]; the receiver ([`Receiver::receive`]) runs
//! [`crate::live::Destination`]. URLs are written as Cloud Hypervisor writes them:
//! `tcp:HOST:PORT` and `unix:PATH` ([`MigrationUrl`]). `--tls-dir` style mutual TLS uses
//! Cloud Hypervisor's layout ([`client_config`], [`server_config`]).
//!
//! ```
//! use vfio_migration::MigrationDevice;
//! use vfio_migration::emulated::EmulatedDevice;
//! use vfio_migration::transport::{self, ReceiveOptions, Receiver, SendOptions};
//!
//! let src = EmulatedDevice::from_spec("size=1M,seed=7").unwrap();
//! let dst = EmulatedDevice::from_spec("size=1M,seed=7").unwrap();
//! let (src_view, dst_view) = (src.handle(), dst.handle());
//! // The receiver listens (port 0: any free port) and serves one sender.
//! let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
//! let url = receiver.url().clone();
//! let destination = std::thread::spawn(move || {
//!     let devices: Vec<Box<dyn MigrationDevice>> = vec![Box::new(dst)];
//!     receiver.receive(devices, &ReceiveOptions::default(), &mut |_| {})
//! });
//! let devices: Vec<Box<dyn MigrationDevice>> = vec![Box::new(src)];
//! let report = transport::send(&url, devices, &SendOptions::default(), &mut |_| {}).unwrap();
//! destination.join().unwrap().unwrap();
//! assert_eq!(src_view.digest(), dst_view.digest());
//! assert!(report.precopy_bytes[0] >= 1 << 20);
//! ```
//!
//! # Protocol (transport version 1)
//!
//! All integers are little-endian; the records reuse the stream format's 24-byte record header
//! (kind, flags = 0, device index, sequence number, payload length, CRC32C over the header
//! fields and the payload; see [`crate::stream`]).
//!
//! ## Connections
//!
//! The sender opens a **control connection**, then `N` **data connections** (`--connections N`,
//! 1 to [`MAX_CONNECTIONS`]), each with its own TLS session when TLS is on. Every connection
//! starts with a 32-byte preamble from the sender:
//!
//! | offset | size | field |
//! |--------|------|-------|
//! | 0  | 8 | magic `VFIOMIGT` ([`PREAMBLE_MAGIC`]) |
//! | 8  | 4 | transport version, 1 |
//! | 12 | 2 | role: 0 control, 1 data |
//! | 14 | 2 | data connection index, `0 .. N` (0 on the control connection) |
//! | 16 | 2 | `N` |
//! | 18 | 2 | reserved, 0 |
//! | 20 | 8 | session identifier (the same on all connections of one migration) |
//! | 28 | 4 | CRC32C of bytes 0 .. 28 |
//!
//! ## Hello
//!
//! After its preamble the control connection carries a stream-format header (magic `VFIOMIGS`,
//! writer version, every device's identity and migration flags; [`crate::stream::Header`]).
//! The receiver checks it against the devices it was started for (same count, then
//! [`crate::stream::Header::check_compatible`] per device) **before touching them**, and answers
//! `ACCEPT`, or `REFUSE` with the reason and closes. Only then does the sender open the data
//! connections; the receiver accepts those whose preamble carries the session identifier, and
//! answers a second control connection meanwhile with `REFUSE` (one sender at a time).
//!
//! ## Data connections (sender to receiver only)
//!
//! | kind | record |
//! |------|--------|
//! | 1 | pre-copy chunk: device index, per-device sequence number, the bytes read from the device |
//! | 2 | stop-copy chunk: the same |
//! | `0x0101` | initial pre-copy data of the device sent: the sequence field holds its number of chunks (sent again after a re-init, see below) |
//! | `0x0102` | check value of the device after stop-copy (8 bytes, e.g. an emulated device's digest) |
//! | `0x0103` | keepalive (sent after 0.5 s without traffic) |
//! | `0x00ff` | end marker: the stream format's end-marker payload with this connection's totals |
//!
//! Sequence numbers count a device's chunks over all connections (0, 1, 2, ...). The sender
//! runs one writer thread per connection (TLS in parallel) and puts each chunk on the
//! connection given the fewest bytes among those that take it at once, the device's own (its
//! index modulo `N`) among equals; on a plain connection that is idle it writes the chunk
//! itself, without a copy or a thread hand-off. The data connections are opened at once (their
//! handshakes overlap). With several connections chunks may arrive out of order. The receiver
//! runs one reader per connection and one loader per device (a lone device's reader loads the
//! chunks it has next itself while it keeps up with its connection); each device's reorder
//! window puts its chunks back in order, holding at most
//! `max_reorder_bytes` of early chunks ([`crate::live::DestinationOptions`]). When a chunk
//! arrives early and its window is full, the receiver stops reading that connection until the
//! window moves (backpressure) instead of failing: a correct sender never deadlocks it (the
//! chunk it sent first among those not yet taken is always the next of its device), and when
//! every open connection waits on a full window with nothing moving, the migration fails
//! (a chunk that never comes). Each connection's end marker must match what arrived on it,
//! and the sum of the markers' per-device counts must equal what was loaded: a lost or
//! duplicated chunk fails the migration.
//!
//! ## Control messages (after the hello, both ways)
//!
//! Records with device index `0xffff_ffff`, sequence 0:
//!
//! | kind | direction | meaning |
//! |------|-----------|---------|
//! | `0x0201` ACCEPT | R to S | the header matches |
//! | `0x0202` REFUSE | R to S | refused; payload: reason (UTF-8, at most 4 KiB) |
//! | `0x0203` SWITCHOVER_ACK | R to S | every device's initial pre-copy data is loaded; payload: the number of initial-data markers (`u64`, all devices) received when it was sent (empty from older receivers: covers every marker) |
//! | `0x0204` LOADED | R to S | every end marker arrived, every device loaded and validated (RESUMING to STOP) |
//! | `0x0205` COMMIT | S to R | resume the devices; payload: pre-copy iterations (`u64`), estimated downtime in µs (`u64`, all ones when unknown) |
//! | `0x0206` RESUMED | R to S | the devices run |
//! | `0x0207` FAILED | both | the migration failed on this side; payload: reason |
//! | `0x0103` keepalive | both | sent after 0.5 s of silence |
//!
//! The sender switches over when the convergence policy says so ([`crate::live::Convergence`]):
//! estimated downtime (pending stop-copy bytes at the measured throughput) within the limit and
//! every device's initial data drained and acknowledged (SWITCHOVER_ACK), or an explicit bound
//! (full passes over the devices without converging, or pre-copy time); its report says which.
//!
//! After stop-copy it sends the end markers, waits for LOADED, stops its devices
//! (STOP_COPY -> STOP), sends COMMIT and waits for RESUMED.
//!
//! ## Re-init (PRE_COPY info v2)
//!
//! A source device opted in to PRE_COPY info v2 may report `VFIO_PRECOPY_INFO_REINIT`: new
//! initial data appeared. The sender then reads the new initial data and sends the device's
//! initial-data marker (`0x0101`) **again**, with the device's chunk count at that point; a
//! marker may come any number of times per device, never with a smaller count than the one
//! before (a sequence error). A later marker means "re-acknowledge": the receiver's
//! acknowledgement now waits until the chunks it counts are loaded, and then it sends another
//! SWITCHOVER_ACK carrying the new marker total. The sender counts the markers it sent and takes
//! an acknowledgement as current only when its marker total covers them, so an acknowledgement
//! of the old initial data that crosses the new marker does not let it switch over; before a
//! switchover on convergence it queries its devices once more for a re-init.
//!
//! ## The commit point
//!
//! COMMIT is the commit point. Before the sender hands COMMIT to a live control connection,
//! every failure returns the source devices to RUNNING (two phases: every stopped device with
//! P2P to RUNNING_P2P, then every device to RUNNING) and the destination resets its devices.
//! Once COMMIT may have left, the sender **never resumes its devices on its own**: if RESUMED
//! does not arrive (cut link, timeout, dead peer) the destination may be running them, so the
//! result is [`TransportError::Unconfirmed`] ("handed over, not confirmed"), the source
//! devices stay STOP with their state, and the operator (or the VMM's management) decides:
//! [`resume_source`] brings them back when the destination is known not to run them. The one
//! exception is an explicit FAILED from the receiver after COMMIT: it reset its devices, so the
//! source returns to RUNNING. The receiver resumes its devices only after COMMIT arrived.
//!
//! ## Failures
//!
//! Every socket has a connect timeout and an idle timeout (keepalives keep a live but quiet
//! peer from tripping it). A closed or silent connection, a bad record, a checksum or sequence
//! error, a FAILED message or a device error ends the migration on both sides: the sender
//! aborts its [`crate::live::Source`] (devices back to RUNNING, state intact) and the receiver
//! aborts its [`crate::live::Destination`] (devices reset, RUNNING); the error names the peer,
//! the connection and what happened, and lists what recovery did to each device. The one
//! window that cannot be closed (the two generals' problem) is after COMMIT: see
//! [the commit point](#the-commit-point).

mod conn;
mod control;
mod crc;
mod error;
mod pool;
mod receive;
mod send;
mod tls;
mod url;
mod wait;
pub mod wire;
mod writer;

pub use error::TransportError;
/// Entry points for the fuzz targets in `fuzz/`: the receiver's parsers and record state
/// machine fed from memory. Not a stable API.
#[doc(hidden)]
pub use receive::fuzz;
pub use receive::{ReceiveOptions, ReceiveProgress, ReceiveReport, Receiver};
pub use send::{CheckFn, SendOptions, send};
pub use tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY, client_config, server_config};
pub use url::MigrationUrl;
pub use wire::{MAX_CONNECTIONS, PREAMBLE_MAGIC};

/// Resume source devices left stopped by [`TransportError::Unconfirmed`] (the operator's
/// decision): see [`crate::live::resume_source`].
pub use crate::live::resume_source;
