//! Entry points for the fuzz targets in `fuzz/` (not a stable API): the receiver's parsers and
//! record state machine, fed from memory instead of sockets.
//!
//! What runs is the receiver's own code: [`Preamble::decode`], the hello's stream header and
//! its check against the devices, the control connection's message framing, the data
//! connections' record reader and the per-record state machine (`State::on_record`, the end
//! markers, `State::on_control`, [`Destination`]). Only the orchestration around them (threads,
//! sockets, timeouts) is replaced by a sequential loop over in-memory connections.

use std::io::{BufReader, Read};
use std::sync::OnceLock;

use super::super::control::take_message;
use super::super::pool::BufPool;
use super::super::wire::{self, PREAMBLE_LEN, Preamble, Record};
use super::load::{self, Acks, DeviceLoad, Item, Load, Offer, Tally, Window};
use super::{Commit, ReceiveReport, check_header};
use crate::device::{DeviceIdentity, MigrationDevice};
use crate::live::{Destination, DestinationOptions, LiveError};
use crate::state::MigrationFlags;
use crate::stream::{Header, MAX_CHUNK_LEN, StreamReader};
use crate::transport::TransportError;

/// The peer name in errors.
const PEER: &str = "memory";

/// The control connection's message framing, as its reading thread runs it: `bytes` arrive in
/// reads of `step` bytes (1 to 4096, as a socket may deliver them) and each complete message is
/// taken from the front of the buffer. Returns the messages (keepalives included) and how many
/// bytes of an incomplete message were left, or the error that would end the link.
pub fn control_messages(bytes: &[u8], step: usize) -> Result<(Vec<Record>, usize), String> {
    let step = step.clamp(1, 4096);
    let mut inbuf = Vec::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(step) {
        inbuf.extend_from_slice(piece);
        while let Some(rec) = take_message(&mut inbuf, PEER).map_err(|e| e.to_string())? {
            out.push(rec);
        }
    }
    Ok((out, inbuf.len()))
}

/// One migration through the receiver's record state machine, from memory: `control` is the
/// control connection (preamble, hello, then the sender's control messages) and `data` the
/// data connections (each a preamble, then records). The hello is checked against `devices`
/// before they are touched; the data connections are read round-robin, one record at a time,
/// into the devices' reorder windows (a connection whose chunk finds its window full waits, as
/// its reader thread would) until each has its end marker; then the load completes, the
/// control messages are read and a COMMIT resumes the devices. On any failure the devices are
/// reset (RUNNING), as [`super::Receiver::receive`] does.
pub fn receive<'a>(
    devices: Vec<Box<dyn MigrationDevice + 'a>>,
    opts: &DestinationOptions,
    control: &[u8],
    data: &[&[u8]],
) -> Result<ReceiveReport, TransportError> {
    let mut ctl = control;
    let (header, mine, conns) = accept(&devices, opts, &mut ctl, data)?;
    let names: Vec<String> = mine.iter().map(|m| m.0.clone()).collect();
    let flags: Vec<MigrationFlags> = mine.iter().map(|m| m.2).collect();
    let mut report = Commit::report(PEER.into(), names.clone(), conns.len(), false);
    let mut dst = Destination::new(devices, opts.clone())?;
    dst.start()?;
    let result = load_all(
        &mut dst,
        &header,
        &names,
        &flags,
        opts.max_reorder_bytes,
        conns,
        &mut report,
    )
    .and_then(|expected| {
        dst.complete(Some(&expected))?;
        let (messages, _) = control_messages(ctl, 4096).map_err(|why| TransportError::protocol(PEER, why))?;
        for rec in messages {
            if rec.kind != wire::KIND_KEEPALIVE && Commit::on_control(&mut report, PEER, rec)? {
                dst.resume()?;
                return Ok(());
            }
        }
        Err(TransportError::Closed {
            peer: PEER.into(),
            when: "before its COMMIT",
        })
    });
    match result {
        Ok(()) => Ok(report),
        Err(e) => {
            dst.abort();
            Err(e)
        }
    }
}

/// The destination devices' names, identities and flags.
type Mine = Vec<(String, DeviceIdentity, MigrationFlags)>;

/// The control connection's preamble and hello (checked against `devices`) from the front of
/// `ctl`, and the data connections' preambles.
fn accept<'d>(
    devices: &[Box<dyn MigrationDevice + '_>],
    opts: &DestinationOptions,
    ctl: &mut &[u8],
    data: &[&'d [u8]],
) -> Result<(Header, Mine, Vec<MemConn<'d>>), TransportError> {
    let proto = |why: String| TransportError::protocol(PEER, why);
    let pre = preamble(ctl)?;
    if pre.role != wire::ROLE_CONTROL {
        return Err(proto("data connection without a migration".into()));
    }
    let header = StreamReader::new(&mut *ctl)
        .map(|r| r.header().clone())
        .map_err(|e| proto(format!("bad stream header: {e}")))?;
    let mut mine = Vec::with_capacity(devices.len());
    for d in devices {
        mine.push((d.name().to_string(), d.identity(), d.flags().map_err(LiveError::from)?));
    }
    check_header(&header, &mine, opts.force_unknown_identity).map_err(|reason| TransportError::Mismatch {
        peer: PEER.into(),
        reason,
    })?;
    let n_conns = usize::from(pre.connections);
    if data.len() != n_conns {
        return Err(proto(format!(
            "{} data connections, the preamble announces {n_conns}",
            data.len()
        )));
    }
    let mut conns = Vec::with_capacity(n_conns);
    let mut seen = vec![false; n_conns];
    for mut d in data.iter().copied() {
        let p = preamble(&mut d)?;
        if p.role != wire::ROLE_DATA || p.session != pre.session || p.connections != pre.connections {
            return Err(proto("data connection of another migration".into()));
        }
        let i = usize::from(p.index);
        if std::mem::replace(&mut seen[i], true) {
            return Err(proto(format!("data connection {i} opened twice")));
        }
        conns.push(MemConn {
            r: BufReader::with_capacity(16 << 10, d),
            tally: Tally::new(format!("{PEER} (data connection {i})"), mine.len()),
            held: None,
            ended: false,
        });
    }
    Ok((header, mine, conns))
}

/// A data connection from memory.
struct MemConn<'d> {
    r: BufReader<&'d [u8]>,
    tally: Tally,
    /// A chunk its device's window had no room for: (device, sequence, bytes).
    held: Option<(usize, u64, Vec<u8>)>,
    ended: bool,
}

/// The devices' windows and loads, sequentially.
struct Devices<'l> {
    windows: Vec<Window>,
    loads: Vec<DeviceLoad<'l>>,
    names: Vec<String>,
    acks: Acks,
    pool: BufPool,
}

impl Devices<'_> {
    /// Offer a chunk to its window and load what that makes ready; the chunk back when the
    /// window is full.
    fn chunk(&mut self, device: usize, seq: u64, data: Vec<u8>) -> Result<Option<Vec<u8>>, TransportError> {
        let offer = self.windows[device]
            .offer(seq, data)
            .map_err(|why| LiveError::Sequence {
                device,
                reason: format!("{}: {why}", self.names[device]),
            })?;
        match offer {
            Offer::Full(d) => Ok(Some(d)),
            Offer::Taken(ready) => {
                for (s, d) in ready {
                    self.apply(device, Load::Chunk(s, d))?;
                }
                Ok(None)
            }
        }
    }

    fn apply(&mut self, device: usize, msg: Load) -> Result<(), TransportError> {
        self.loads[device].apply(msg, &self.pool)?;
        self.acks.update(device, self.loads[device].status());
        Ok(())
    }
}

/// Read every data connection round-robin, one record at a time, into the devices; returns
/// the chunks the end markers announce per device.
fn load_all(
    dst: &mut Destination<'_>,
    header: &Header,
    names: &[String],
    flags: &[MigrationFlags],
    max_reorder: u64,
    mut conns: Vec<MemConn<'_>>,
    report: &mut ReceiveReport,
) -> Result<Vec<u64>, TransportError> {
    let loads: Vec<DeviceLoad<'_>> = dst
        .loaders()
        .into_iter()
        .enumerate()
        .map(|(i, l)| DeviceLoad::new(i, l, flags[i]))
        .collect();
    let mut devs = Devices {
        windows: names.iter().map(|_| Window::new(max_reorder)).collect(),
        loads,
        names: names.to_vec(),
        acks: Acks::new(flags),
        pool: BufPool::new(8),
    };
    for (i, l) in devs.loads.iter().enumerate() {
        devs.acks.update(i, l.status());
    }
    let stop_began = OnceLock::new();
    while conns.iter().any(|c| !c.ended) {
        let mut moved = false;
        for c in conns.iter_mut().filter(|c| !c.ended) {
            if let Some((device, seq, data)) = c.held.take()
                && let Some(back) = devs.chunk(device, seq, data)?
            {
                c.held = Some((device, seq, back));
                continue;
            }
            let rec = wire::read_record(&mut c.r, devs.pool.take(), MAX_CHUNK_LEN)
                .map_err(|e| load::read_error(PEER, e, std::time::Duration::ZERO))?;
            moved = true;
            match c.tally.on_record(rec, header, &stop_began)? {
                Item::Chunk { device, seq, data } => {
                    c.held = devs.chunk(device, seq, data)?.map(|back| (device, seq, back));
                }
                Item::Marker { device, chunks } => devs.apply(device, Load::Marker(chunks))?,
                Item::Other(buf) => devs.pool.give(buf),
                Item::End(buf) => {
                    devs.pool.give(buf);
                    c.ended = true;
                }
            }
        }
        if !moved {
            // Every connection still open waits on a full window: what they wait for never comes.
            let (device, seq) = conns
                .iter()
                .find_map(|c| c.held.as_ref().map(|h| (h.0, h.1)))
                .unwrap_or((0, 0));
            return Err(LiveError::Sequence {
                device,
                reason: devs.windows[device].stall_reason(&names[device], seq),
            }
            .into());
        }
    }
    if let Some(e) = devs
        .windows
        .iter()
        .enumerate()
        .find_map(|(i, w)| w.missing(i, &names[i]))
    {
        return Err(e.into());
    }
    (report.switchover_acks, report.acked_markers) = devs.acks.report();
    let tallies: Vec<Tally> = conns.into_iter().map(|c| c.tally).collect();
    Ok(Commit::add_tallies(report, &tallies))
}

/// A connection's preamble, read from the front of `c`.
fn preamble(c: &mut &[u8]) -> Result<Preamble, TransportError> {
    let mut b = [0u8; PREAMBLE_LEN];
    c.read_exact(&mut b).map_err(|_| TransportError::Closed {
        peer: PEER.into(),
        when: "before its preamble",
    })?;
    Preamble::decode(&b).map_err(|why| TransportError::protocol(PEER, why))
}
