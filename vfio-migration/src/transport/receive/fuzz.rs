//! Entry points for the fuzz targets in `fuzz/` (not a stable API): the receiver's parsers and
//! record state machine, fed from memory instead of sockets.
//!
//! What runs is the receiver's own code: [`Preamble::decode`], the hello's stream header and
//! its check against the devices, the control connection's message framing, the data
//! connections' record reader and the per-record state machine (`State::on_record`, the end
//! markers, `State::on_control`, [`Destination`]). Only the orchestration around them (threads,
//! sockets, timeouts) is replaced by a sequential loop over in-memory connections.

use std::io::{BufReader, Read};
use std::time::Duration;

use super::super::control::take_message;
use super::super::wire::{self, PREAMBLE_LEN, Preamble, ReadError, Record};
use super::{ReceiveReport, State, check_header};
use crate::device::MigrationDevice;
use crate::live::{Destination, DestinationOptions, LiveError};
use crate::stream::{MAX_CHUNK_LEN, StreamReader};
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
/// until each has its end marker; then the load completes, the control messages are read and a
/// COMMIT resumes the devices. On any failure the devices are reset (RUNNING), as
/// [`super::Receiver::receive`] does.
pub fn receive<'a>(
    devices: Vec<Box<dyn MigrationDevice + 'a>>,
    opts: &DestinationOptions,
    control: &[u8],
    data: &[&[u8]],
) -> Result<ReceiveReport, TransportError> {
    let proto = |why: String| TransportError::protocol(PEER, why);
    let mut ctl = control;
    let pre = preamble(&mut ctl)?;
    if pre.role != wire::ROLE_CONTROL {
        return Err(proto("data connection without a migration".into()));
    }
    let header = StreamReader::new(&mut ctl)
        .map(|r| r.header().clone())
        .map_err(|e| proto(format!("bad stream header: {e}")))?;
    let mut mine = Vec::with_capacity(devices.len());
    for d in &devices {
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
    let mut readers = Vec::with_capacity(n_conns);
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
        readers.push((i, BufReader::with_capacity(16 << 10, d), Vec::new()));
    }
    let mut dst = Destination::new(devices, opts.clone())?;
    dst.start()?;
    let names = mine.iter().map(|m| m.0.clone()).collect();
    let mut st = State::new(PEER.into(), names, header, n_conns, false, Duration::from_secs(30));
    let result = (|| {
        while !readers.is_empty() {
            let mut k = 0;
            while k < readers.len() {
                let (i, r, buf) = &mut readers[k];
                let rec = match wire::read_record(r, std::mem::take(buf), MAX_CHUNK_LEN) {
                    Ok(rec) => rec,
                    Err(ReadError::Eof) => {
                        return Err(TransportError::Closed {
                            peer: PEER.into(),
                            when: "before its end marker",
                        });
                    }
                    Err(ReadError::Io(e)) => return Err(TransportError::io(PEER, "read", e)),
                    Err(ReadError::Bad(why)) => return Err(proto(why)),
                };
                if rec.kind != wire::KIND_KEEPALIVE {
                    st.on_record(*i, &rec, &mut dst)?;
                    if !st.acked && dst.switchover_ready() {
                        st.acked = true;
                    }
                    if rec.kind == wire::KIND_END {
                        readers.remove(k);
                        continue;
                    }
                }
                *buf = rec.payload;
                k += 1;
            }
        }
        dst.complete(Some(&st.expected))?;
        let (messages, _) = control_messages(ctl, 4096).map_err(proto)?;
        for rec in messages {
            if rec.kind != wire::KIND_KEEPALIVE && st.on_control(rec, true)? {
                dst.resume()?;
                return Ok(());
            }
        }
        Err(TransportError::Closed {
            peer: PEER.into(),
            when: "before its COMMIT",
        })
    })();
    match result {
        Ok(()) => Ok(st.report),
        Err(e) => {
            dst.abort();
            Err(e)
        }
    }
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
