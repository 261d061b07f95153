//! vfio-user: arbitrary bytes as a client's messages to the server, and as a server's replies to
//! the client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vfio_migration::device::{DmaRange, MigrationDevice, ReadOutcome};
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::state::DeviceState;
use vfio_migration::vfio_user::codec::{self, Capabilities, Header};
use vfio_migration::vfio_user::{Server, ServerOptions, VfioUserDevice};

/// A client's `VFIO_USER_VERSION` command (id 0).
pub fn version_command() -> Vec<u8> {
    let mut out = Vec::new();
    let h = Header {
        command: codec::CMD_VERSION,
        ..Default::default()
    };
    codec::write_message(&mut out, h, &[&codec::encode_version(&Capabilities::default())]).unwrap();
    out
}

/// A server's reply to the client's `VFIO_USER_VERSION` (id 0), announcing `max_data_xfer_size`.
pub fn version_reply(max_data_xfer_size: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let h = Header {
        command: codec::CMD_VERSION,
        flags: codec::FLAG_TYPE_REPLY,
        ..Default::default()
    };
    let caps = Capabilities {
        max_data_xfer_size,
        ..Default::default()
    };
    codec::write_message(&mut out, h, &[&codec::encode_version(&caps)]).unwrap();
    out
}

/// Serve an emulated device to a client that sends `data` (after a valid version command when
/// the first byte is even).
///
/// Invariants: the server never panics, ends the connection when the input ends, and everything
/// it sent is a sequence of well-framed replies within its cap.
pub fn check_server(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if first % 2 == 0 {
        input.extend_from_slice(&version_command());
    }
    input.extend_from_slice(rest);
    let (mut client, server_end) = UnixStream::pair().unwrap();
    client.write_all(&input).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let drain = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = client.read_to_end(&mut out);
        out
    });
    let dev = EmulatedDevice::from_spec("size=64K,block=4K").unwrap();
    let max = 4096;
    let mut server = Server::with_options(
        dev,
        ServerOptions {
            max_data_xfer_size: max,
            message_timeout: Duration::from_millis(100),
            stop_copy_wait: Duration::from_millis(100),
            pad_short_reads: first % 3 == 0,
            no_migration: first % 7 == 6,
        },
    );
    let _ = server.serve_connection(server_end);
    drop(server);
    let out = drain.join().unwrap();
    let mut r = &out[..];
    while let Some(h) = codec::read_header(&mut r).expect("the server's replies are well framed") {
        assert_eq!(h.msg_type(), codec::FLAG_TYPE_REPLY, "{h:?}");
        codec::read_payload(&mut r, &h, max + 4096).expect("a reply within the cap");
    }
}

/// Connect a client to a "server" that answers with `data` (after a valid version reply when the
/// first byte is even), then use every operation.
///
/// Invariants: the client never panics, and a read never claims more bytes than its buffer.
pub fn check_client(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if first % 2 == 0 {
        input.extend_from_slice(&version_reply(64 << u32::from(first % 8)));
    }
    input.extend_from_slice(rest);
    let (client_end, mut server) = UnixStream::pair().unwrap();
    server.write_all(&input).unwrap();
    server.shutdown(std::net::Shutdown::Write).unwrap();
    let Ok(mut dev) = VfioUserDevice::from_stream("fuzz", client_end) else {
        return;
    };
    let _ = dev.identity();
    let _ = dev.flags();
    let _ = dev.state();
    let _ = dev.stop_copy_size();
    if let Ok(Some(mut s)) = dev.set_state(DeviceState::PreCopy) {
        let mut buf = vec![0u8; 8192];
        for _ in 0..4 {
            if let Ok(ReadOutcome::Data(n)) = s.read(&mut buf) {
                assert!(n <= buf.len());
            }
        }
        let _ = s.precopy_info();
    }
    if let Ok(Some(mut s)) = dev.set_state(DeviceState::Resuming) {
        let _ = s.write(&[0u8; 300]);
    }
    let _ = dev.dma_log_start(
        &[DmaRange {
            iova: 0,
            length: 1 << 20,
        }],
        4096,
    );
    let mut bitmap = vec![0u64; 4];
    let _ = dev.dma_log_report(0, 1 << 20, 4096, &mut bitmap);
    let _ = dev.dma_log_stop();
    let _ = dev.reset();
    drop(server);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_clients_survive_seeds_and_garbage() {
        check_server(&[]);
        check_server(&[0]);
        check_server(&[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        let mut feature = vec![0u8];
        let h = Header {
            msg_id: 1,
            command: codec::CMD_DEVICE_FEATURE,
            ..Default::default()
        };
        codec::write_message(&mut feature, h, &[&[16, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]]).unwrap();
        check_server(&feature);
        check_client(&[]);
        check_client(&[0]);
        check_client(&[2, 1, 2, 3]);
        check_client(&[3; 40]);
    }
}
