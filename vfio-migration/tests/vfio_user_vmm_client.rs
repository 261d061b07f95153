//! `vfio_user::VfioUserClient`, the client a VMM attaches a vfio-user device with, sharing its one
//! connection with the device's migration (`migration_device()`):
//!
//! - against our own server serving the emulated device: regions and config space, BAR0
//!   registers, a migration between two servers with the VMM's client connected on both sides
//!   (and reading BAR0 while the state moves) that carries the `SCRATCH` register, guest memory (a
//!   memfd) mapped for DMA with the device's writes seen there and in the DMA log started through
//!   `migration_device()`, SET_IRQS with eventfds (split when they exceed the server's
//!   `max_msg_fds`), reset and shutdown;
//! - against a scripted server: a mappable region's file descriptor and sparse mmap areas, a
//!   non-PCI device, a reply with a huge length, a server that leaves in the middle of a request;
//! - against the libvfio-user peer (`tests/vfio-user-peer/migr-device`, skipped unless it builds
//!   or `VFIO_USER_PEER_REQUIRED=1`): regions, config space, BAR0, and a migration through
//!   `migration_device()` verified byte for byte by the destination peer.

#[path = "support/peer.rs"]
mod peer;
#[path = "support/serve.rs"]
mod serve;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use vfio_migration::device::{DeviceIdentity, DmaRange, ErrorKind, Operation};
use vfio_migration::emulated::EmulatedDevice;
use vfio_migration::live::{Convergence, LocalMigration};
use vfio_migration::vfio_user::codec::{self, HEADER_LEN, Header};
use vfio_migration::vfio_user::{EmulatedModel, Server, ServerOptions, VfioUserClient, pci, regs};
use vfio_migration::{DeviceState, MigrationDevice};

use peer::{Peer, crc_of, device_bin};
use serve::serve;

const CONFIG: u32 = 7;
const BAR0: u32 = 0;
const PAGE: u64 = 4096;
const IOVA: u64 = 0x1_0000_0000;
/// `VFIO_PCI_MSIX_IRQ_INDEX`, `VFIO_IRQ_SET_DATA_NONE`, `_DATA_EVENTFD`, `_ACTION_TRIGGER`.
const MSIX: u32 = 2;
const DATA_NONE: u32 = 1;
const DATA_EVENTFD: u32 = 4;
const ACTION_TRIGGER: u32 = 32;

fn read(c: &VfioUserClient, region: u32, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    c.region_read(region, offset, &mut b)
        .unwrap_or_else(|e| panic!("region {region} read at {offset:#x}: {e}"));
    b
}

fn dword(c: &VfioUserClient, region: u32, offset: u64) -> u32 {
    u32::from_le_bytes(read(c, region, offset, 4).try_into().unwrap())
}

fn qword(c: &VfioUserClient, region: u32, offset: u64) -> u64 {
    u64::from_le_bytes(read(c, region, offset, 8).try_into().unwrap())
}

/// A memfd of `len` bytes.
fn memfd(len: u64) -> File {
    // SAFETY: a NUL-terminated name and valid flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// A pipe: (read end, write end). The server closing its copy of the write end shows as EOF on
/// the read end once ours is closed too.
fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; the result is checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// The pages of `f` (of `n` pages) that hold anything.
fn written_pages(f: &File, n: u64) -> Vec<u64> {
    (0..n)
        .filter(|&p| {
            let mut b = vec![0u8; PAGE as usize];
            f.read_exact_at(&mut b, p * PAGE).unwrap();
            b.iter().any(|&x| x != 0)
        })
        .collect()
}

#[test]
fn attaches_reads_config_and_bar0_and_migrates_scratch_with_the_vmm_connected_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (src_h, src_id, src) = serve(dir.path(), "src.sock", "size=1M,seed=4,dirty-rate=1M");
    let (dst_h, dst_id, dst) = serve(dir.path(), "dst.sock", "size=1M,seed=4");
    assert_eq!(src_id, dst_id);

    let a = Arc::new(VfioUserClient::connect(&src).unwrap());
    assert_eq!(a.name(), format!("vfio-user:{}", src.display()));
    assert!(a.resettable(), "our server's device info has VFIO_DEVICE_FLAGS_RESET");
    assert_eq!(a.device_info().flags & codec::DEVICE_FLAGS_PCI, codec::DEVICE_FLAGS_PCI);
    assert_eq!((a.regions().len(), a.num_irqs()), (9, 5));
    for r in a.regions() {
        let want = match r.index {
            0 => 4096,
            2 => 64,
            7 => 256,
            _ => 0,
        };
        assert_eq!(r.size, want, "region {}", r.index);
        assert!(r.file.is_none() && r.sparse_areas.is_empty(), "region {}", r.index);
        if want > 0 {
            assert_eq!(r.flags & 7, 3, "region {}: read/write, no mmap", r.index);
        }
    }
    assert!(a.region(9).is_none());
    for index in 0..5 {
        assert_eq!(a.get_irq_info(index).unwrap().count, 0, "IRQ index {index}");
    }
    // Config space: the IDs of the device's identity.
    let cfg = read(&a, CONFIG, 0, 0x30);
    let word = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    assert_eq!((word(0), word(2), word(0x2c), word(0x2e)), pci::pci_ids(&src_id));
    assert_eq!(word(0), pci::VENDOR_ID);
    // BAR0 registers; a driver writes SCRATCH.
    assert_eq!(read(&a, BAR0, regs::REG_MAGIC, 4), b"VMIG");
    assert_eq!(qword(&a, BAR0, regs::REG_STATE_SIZE), 1 << 20);
    a.region_write(BAR0, regs::REG_SCRATCH, &0x5eed_f00du32.to_le_bytes())
        .unwrap();
    assert_eq!(dword(&a, BAR0, regs::REG_SCRATCH), 0x5eed_f00d);
    // BAR2 (I/O) shows the same registers and ends after 64 ports.
    assert_eq!(read(&a, 2, regs::REG_SCRATCH, 4), 0x5eed_f00du32.to_le_bytes());
    assert!(a.region_read(2, 60, &mut [0u8; 8]).is_err(), "past BAR2's 64 ports");
    assert_eq!(src_h.version(0), Some(0x5eed_f00d));
    // A read larger than one message's data is chunked (our server takes 1 MiB; BAR0 is 4 KiB,
    // so this is one chunk, but the whole BAR reads back the registers and zeros).
    let bar = read(&a, BAR0, 0, 4096);
    assert_eq!(&bar[..4], b"VMIG");
    assert!(bar[0x38..].iter().all(|&b| b == 0));

    // The destination's VMM attaches too; both hand out their migration devices.
    let b = VfioUserClient::connect(&dst).unwrap();
    let src_mig = a.migration_device();
    let dst_mig = b.migration_device();
    assert_eq!(src_mig.identity(), src_id);
    assert_eq!(dst_mig.identity(), dst_id);
    assert_eq!(src_mig.state().unwrap(), DeviceState::Running);

    // The VMM keeps reading BAR0 on the source connection while the state moves over it.
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (a, stop, reads) = (Arc::clone(&a), Arc::clone(&stop), Arc::clone(&reads));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(read(&a, BAR0, regs::REG_MAGIC, 4), b"VMIG");
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let m = LocalMigration {
        convergence: Convergence {
            max_iterations: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let report = m
        .run(vec![Box::new(src_mig)], vec![Box::new(dst_mig)], &mut |_| {})
        .unwrap_or_else(|e| panic!("migration failed: {e}"));
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the BAR0 reader saw a wrong answer");
    assert!(reads.load(Ordering::Relaxed) > 0);
    assert!(report.precopy_bytes[0] > 1 << 20, "{report:?}");
    assert_eq!(src_h.digest(), dst_h.digest());

    // What the destination's driver reads through BAR0: SCRATCH moved, the device runs.
    assert_eq!(dword(&b, BAR0, regs::REG_SCRATCH), 0x5eed_f00d, "SCRATCH moved");
    assert_eq!(dword(&b, BAR0, regs::REG_DEVICE_STATE), DeviceState::Running.as_raw());
    assert_eq!(qword(&b, BAR0, regs::REG_DIGEST), dst_h.digest());
    assert_eq!(
        dword(&a, BAR0, regs::REG_DEVICE_STATE),
        DeviceState::Stop.as_raw(),
        "the source is stopped after the switchover"
    );
}

#[test]
fn dma_map_a_memfd_and_the_device_writes_show_in_memory_and_in_the_dma_log() {
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB/s: about a thousand DMA page writes a second.
    let (_h, _id, path) = serve(dir.path(), "dma.sock", "size=1M,seed=5,dirty-rate=4M");
    let c = VfioUserClient::connect(&path).unwrap();
    let ram = memfd(64 * PAGE);
    c.dma_map(0, IOVA, 64 * PAGE, ram.as_raw_fd()).unwrap();
    c.region_write(
        CONFIG,
        4,
        &(pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER).to_le_bytes(),
    )
    .unwrap();
    // Logging starts (through the migration device, on the same connection) before the device
    // gets its DMA window: every write it makes is logged.
    let mut mig = c.migration_device();
    let page_size = mig
        .dma_log_start(
            &[DmaRange {
                iova: IOVA,
                length: 64 * PAGE,
            }],
            PAGE,
        )
        .unwrap();
    assert_eq!(page_size, PAGE);
    c.region_write(BAR0, regs::REG_DMA_ADDR, &(IOVA + 16 * PAGE).to_le_bytes())
        .unwrap();
    c.region_write(BAR0, regs::REG_DMA_LEN, &(32 * PAGE).to_le_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let writes = qword(&c, BAR0, regs::REG_DMA_WRITES);
    assert!(writes > 10, "{writes} DMA writes in 100 ms at ~1000/s");
    let before = written_pages(&ram, 64);
    let mut bitmap = [0u64; 1];
    mig.dma_log_report(IOVA, 64 * PAGE, PAGE, &mut bitmap).unwrap();
    let after = written_pages(&ram, 64);
    let logged: Vec<u64> = (0..64).filter(|&p| bitmap[0] & (1 << p) != 0).collect();
    assert!(!before.is_empty());
    assert!(before.iter().all(|p| (16..48).contains(p)), "{before:?}");
    assert!(
        before.iter().all(|p| logged.contains(p)),
        "written {before:?}, logged {logged:?}"
    );
    assert!(
        logged.iter().all(|p| after.contains(p)),
        "logged {logged:?}, written {after:?}"
    );
    for &p in &after {
        let mut b = [0u8; 16];
        ram.read_exact_at(&mut b, p * PAGE).unwrap();
        assert_eq!(u64::from_le_bytes(b[8..].try_into().unwrap()), IOVA + p * PAGE);
    }
    mig.dma_log_stop().unwrap();
    c.dma_unmap(IOVA, 64 * PAGE).unwrap();
    let frozen = qword(&c, BAR0, regs::REG_DMA_WRITES);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(qword(&c, BAR0, regs::REG_DMA_WRITES), frozen, "no DMA after unmap");
    // A wrapping range is refused before sending.
    let e = c.dma_map(0, u64::MAX, 2 * PAGE, ram.as_raw_fd()).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
    // The connection is still good after error replies.
    assert_eq!(read(&c, BAR0, regs::REG_MAGIC, 4), b"VMIG");
}

#[test]
fn set_irqs_reset_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _id, path) = serve(dir.path(), "irq.sock", "size=64K,seed=6,reset=keep");
    let c = VfioUserClient::connect(&path).unwrap();
    let max_fds = c.capabilities().max_msg_fds as usize;
    assert_eq!(max_fds, codec::MAX_MSG_FDS);

    // Two eventfds (pipes here, to see the server close its copies), then more than the server
    // takes in one message: they go in several.
    for n in [2, max_fds + 4] {
        let (mut readers, writers): (Vec<File>, Vec<OwnedFd>) = (0..n).map(|_| pipe()).unzip();
        let raw: Vec<RawFd> = writers.iter().map(|w| w.as_raw_fd()).collect();
        c.set_irqs(MSIX, DATA_EVENTFD | ACTION_TRIGGER, 0, n as u32, &raw)
            .unwrap_or_else(|e| panic!("{n} eventfds: {e}"));
        drop(writers);
        for (i, r) in readers.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            assert_eq!(r.read(&mut b).unwrap(), 0, "{n} eventfds: the server closed #{i}");
        }
    }
    c.set_irqs(MSIX, DATA_NONE | ACTION_TRIGGER, 0, 0, &[]).unwrap();
    // Too many descriptors that are not one per vector: refused before sending.
    let (_r, w) = pipe();
    let many = vec![w.as_raw_fd(); max_fds + 1];
    let e = c.set_irqs(MSIX, DATA_NONE | ACTION_TRIGGER, 0, 1, &many).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
    assert_eq!(e.op, Operation::SetIrqs { index: MSIX });

    // Reset: config space and the DMA window start over; with reset=keep SCRATCH stays.
    c.region_write(CONFIG, 4, &pci::COMMAND_MEMORY.to_le_bytes()).unwrap();
    c.region_write(BAR0, regs::REG_DMA_LEN, &PAGE.to_le_bytes()).unwrap();
    c.region_write(BAR0, regs::REG_SCRATCH, &7u32.to_le_bytes()).unwrap();
    c.reset().unwrap();
    assert_eq!(dword(&c, CONFIG, 4) & 0xffff, 0);
    assert_eq!(qword(&c, BAR0, regs::REG_DMA_LEN), 0);
    assert_eq!(dword(&c, BAR0, regs::REG_SCRATCH), 7);
    assert_eq!(h.version(0), Some(7));

    // Shutdown: the server sees the client leave; this client and its migration device fail.
    let mig = c.migration_device();
    c.shutdown().unwrap();
    let mut b = [0u8; 4];
    let e = c.region_read(BAR0, 0, &mut b).unwrap_err();
    assert!(e.to_string().contains("irq.sock"), "{e}");
    let e = mig.state().unwrap_err();
    assert!(e.to_string().contains("irq.sock"), "{e}");
    // The server serves the next client.
    let again = VfioUserClient::connect(&path).unwrap();
    assert_eq!(dword(&again, BAR0, regs::REG_SCRATCH), 7);
}

#[test]
fn whole_bar0_reads_and_writes_with_a_small_max_data_xfer_size() {
    let dir = tempfile::tempdir().unwrap();
    let dev = EmulatedDevice::from_spec("size=64K,seed=9").unwrap();
    let h = dev.handle();
    let path = dir.path().join("chunks.sock");
    let listener = vfio_migration::vfio_user::bind(&path).unwrap();
    let model = EmulatedModel::new(h.clone());
    std::thread::spawn(move || {
        let opts = ServerOptions {
            max_data_xfer_size: 1024,
            ..Default::default()
        };
        let mut server = Server::with_options(dev, opts).with_model(model);
        let _ = server.serve(&listener);
    });
    let c = VfioUserClient::connect(&path).unwrap();
    assert_eq!(c.max_data_xfer_size(), 1024);
    // The whole BAR0 (4 KiB, four messages of 1 KiB): the registers, then zeros.
    let bar = read(&c, BAR0, 0, 4096);
    assert_eq!(&bar[..4], b"VMIG");
    assert_eq!(bar[..0x38], read(&c, BAR0, 0, 0x38)[..]);
    assert!(bar[0x38..].iter().all(|&b| b == 0));
    // A write of the whole BAR0 (four messages): SCRATCH takes its bytes.
    let mut image = vec![0u8; 4096];
    image[0x18..0x1c].copy_from_slice(&0xabcd_0123u32.to_le_bytes());
    c.region_write(BAR0, 0, &image).unwrap();
    assert_eq!(dword(&c, BAR0, regs::REG_SCRATCH), 0xabcd_0123);
    assert_eq!(h.version(0), Some(0xabcd_0123));
}

#[test]
fn accesses_outside_a_region_are_refused_without_asking_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (_h, _id, path) = serve(dir.path(), "oob.sock", "size=64K,seed=8");
    let c = VfioUserClient::connect(&path).unwrap();
    let mut b = [0u8; 8];
    for (index, offset) in [(BAR0, 4090), (BAR0, u64::MAX - 2), (CONFIG, 256), (3, 0), (42, 0)] {
        let e = c.region_read(index, offset, &mut b).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
        assert_eq!(e.op, Operation::RegionRead { index, offset });
        assert!(e.to_string().contains("oob.sock"), "{e}");
        let e = c.region_write(index, offset, &b).unwrap_err();
        assert!(matches!(e.kind, ErrorKind::InvalidRequest(_)), "{e}");
    }
    c.region_read(BAR0, 4088, &mut b).unwrap();
    assert_eq!(read(&c, BAR0, regs::REG_MAGIC, 4), b"VMIG");
}

// ---- a scripted server ----

/// What the scripted server does after the handshake and the region infos.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Script {
    /// Answer REGION_READ of region 0 with the bytes `offset..offset + count` (as `u8`), forever;
    /// more than [`SCRIPT_MAX_XFER`] bytes at once get `EINVAL`.
    Serve,
    /// Answer the first REGION_READ with a header claiming `u32::MAX` bytes.
    HugeReply,
    /// Close the connection on the first REGION_READ, without a reply.
    HangUp,
    /// Tell a device without `VFIO_DEVICE_FLAGS_PCI`.
    NotPci,
}

/// The `max_data_xfer_size` the scripted server announces.
const SCRIPT_MAX_XFER: u32 = 16;

/// Region 2 of the scripted device: mappable, 16 KiB at offset 4 KiB of a memfd, with two sparse
/// mmap areas.
const MMAP_SIZE: u64 = 0x4000;
const MMAP_OFFSET: u64 = 0x1000;
const AREAS: [(u64, u64); 2] = [(0, 0x1000), (0x2000, 0x1000)];

fn reply(s: &UnixStream, h: &Header, payload: &[u8], fds: &[RawFd]) {
    let out = Header {
        msg_id: h.msg_id,
        command: h.command,
        size: 0,
        flags: codec::FLAG_TYPE_REPLY,
        error_no: 0,
    };
    codec::write_message_with_fds(s, out, &[payload], fds).unwrap();
}

/// Serve one connection at `path` following `script`; `mem` is region 2's file.
fn scripted(path: &Path, script: Script, mem: File) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        loop {
            let Ok(Some((h, _fds))) = codec::read_header_with_fds(&s) else {
                return;
            };
            let Ok(payload) = codec::read_payload(&mut s, &h, 1 << 20) else {
                return;
            };
            match h.command {
                codec::CMD_VERSION => {
                    let caps = codec::Capabilities {
                        max_data_xfer_size: SCRIPT_MAX_XFER,
                        ..Default::default()
                    };
                    reply(&s, &h, &codec::encode_version(&caps), &[]);
                }
                codec::CMD_DEVICE_GET_INFO => {
                    let flags = if script == Script::NotPci {
                        0
                    } else {
                        codec::DEVICE_FLAGS_PCI
                    };
                    let mut p = Vec::new();
                    for v in [16, flags, 3, 0] {
                        codec::put_u32(&mut p, v);
                    }
                    reply(&s, &h, &p, &[]);
                }
                codec::CMD_DEVICE_GET_REGION_INFO => {
                    let argsz = u32::from_le_bytes(payload[..4].try_into().unwrap());
                    let index = u32::from_le_bytes(payload[8..12].try_into().unwrap());
                    let rw = codec::REGION_INFO_FLAG_READ | codec::REGION_INFO_FLAG_WRITE;
                    let mut p = Vec::new();
                    if index == 2 {
                        // As libvfio-user: the capabilities and the fd only when they fit.
                        let full = 32 + 16 + 16 * AREAS.len() as u32;
                        let fits = argsz >= full;
                        let flags =
                            rw | codec::REGION_INFO_FLAG_MMAP | if fits { codec::REGION_INFO_FLAG_CAPS } else { 0 };
                        for v in [full, flags, index, if fits { 32 } else { 0 }] {
                            codec::put_u32(&mut p, v);
                        }
                        codec::put_u64(&mut p, MMAP_SIZE);
                        codec::put_u64(&mut p, MMAP_OFFSET);
                        if fits {
                            codec::put_u32(&mut p, u32::from(codec::REGION_INFO_CAP_SPARSE_MMAP) | (1 << 16));
                            codec::put_u32(&mut p, 0);
                            codec::put_u32(&mut p, AREAS.len() as u32);
                            codec::put_u32(&mut p, 0);
                            for (o, l) in AREAS {
                                codec::put_u64(&mut p, o);
                                codec::put_u64(&mut p, l);
                            }
                            reply(&s, &h, &p, &[mem.as_raw_fd()]);
                            continue;
                        }
                    } else {
                        for v in [32, if index == 0 { rw } else { 0 }, index, 0] {
                            codec::put_u32(&mut p, v);
                        }
                        codec::put_u64(&mut p, if index == 0 { 0x100 } else { 0 });
                        codec::put_u64(&mut p, 0);
                    }
                    reply(&s, &h, &p, &[]);
                }
                codec::CMD_REGION_READ => match script {
                    Script::HangUp => return,
                    Script::HugeReply => {
                        let out = Header {
                            msg_id: h.msg_id,
                            command: h.command,
                            size: u32::MAX,
                            flags: codec::FLAG_TYPE_REPLY,
                            error_no: 0,
                        };
                        use std::io::Write;
                        let _ = s.write_all(&out.to_bytes());
                        std::thread::sleep(Duration::from_millis(200));
                        return;
                    }
                    _ => {
                        let offset = u64::from_le_bytes(payload[..8].try_into().unwrap());
                        let count = u32::from_le_bytes(payload[12..16].try_into().unwrap());
                        if count > SCRIPT_MAX_XFER {
                            let out = Header {
                                msg_id: h.msg_id,
                                command: h.command,
                                size: HEADER_LEN as u32,
                                flags: codec::FLAG_TYPE_REPLY | codec::FLAG_ERROR,
                                error_no: libc::EINVAL as u32,
                            };
                            codec::write_message(&mut s, out, &[]).unwrap();
                            continue;
                        }
                        let mut p = payload[..16].to_vec();
                        p.extend((0..u64::from(count)).map(|i| (offset + i) as u8));
                        reply(&s, &h, &p, &[]);
                    }
                },
                _ => {
                    let out = Header {
                        msg_id: h.msg_id,
                        command: h.command,
                        size: HEADER_LEN as u32,
                        flags: codec::FLAG_TYPE_REPLY | codec::FLAG_ERROR,
                        error_no: libc::ENOSYS as u32,
                    };
                    codec::write_message(&mut s, out, &[]).unwrap();
                }
            }
        }
    })
}

#[test]
fn a_mappable_region_brings_its_file_and_sparse_areas() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mmap.sock");
    let mem = memfd(MMAP_OFFSET + MMAP_SIZE);
    mem.write_all_at(b"region two", MMAP_OFFSET).unwrap();
    let server = scripted(&path, Script::Serve, mem.try_clone().unwrap());
    let c = VfioUserClient::connect(&path).unwrap();
    assert_eq!(c.regions().len(), 3);
    assert!(!c.resettable(), "no VFIO_DEVICE_FLAGS_RESET");
    let r = c.region(2).unwrap();
    assert_eq!((r.index, r.size), (2, MMAP_SIZE));
    assert_ne!(r.flags & codec::REGION_INFO_FLAG_MMAP, 0);
    let got: Vec<(u64, u64)> = r.sparse_areas.iter().map(|a| (a.offset, a.size)).collect();
    assert_eq!(got, AREAS);
    let (file, offset) = r.file.as_ref().expect("the region's file descriptor");
    assert_eq!(*offset, MMAP_OFFSET);
    let mut b = [0u8; 10];
    file.read_exact_at(&mut b, *offset).unwrap();
    assert_eq!(&b, b"region two", "the server's memfd");
    assert!(c.region(0).unwrap().file.is_none());
    // Region 0 reads: the whole region goes in chunks of the server's 16 bytes.
    assert_eq!(read(&c, 0, 0x10, 4), [0x10, 0x11, 0x12, 0x13]);
    assert_eq!(read(&c, 0, 0, 0x100), (0..=255u8).collect::<Vec<_>>());
    assert_eq!(read(&c, 0, 0xf7, 9), (0xf7..=0xffu8).collect::<Vec<_>>());
    drop(c);
    server.join().unwrap();
}

#[test]
fn a_huge_reply_length_is_refused_and_the_connection_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.sock");
    let server = scripted(&path, Script::HugeReply, memfd(MMAP_OFFSET + MMAP_SIZE));
    let c = VfioUserClient::connect(&path).unwrap();
    let mut b = [0u8; 4];
    let e = c.region_read(0, 0, &mut b).unwrap_err();
    assert!(matches!(e.kind, ErrorKind::InvalidAnswer(_)), "{e}");
    assert!(
        e.to_string().contains("huge.sock") && e.to_string().contains("exceeds"),
        "{e}"
    );
    let e = c.region_read(0, 0, &mut b).unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
    server.join().unwrap();
}

#[test]
fn a_server_that_leaves_mid_request_gives_an_error_naming_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gone.sock");
    let server = scripted(&path, Script::HangUp, memfd(MMAP_OFFSET + MMAP_SIZE));
    let c = VfioUserClient::connect(&path).unwrap();
    let mut b = [0u8; 4];
    let e = c.region_read(0, 8, &mut b).unwrap_err();
    assert_eq!(e.op, Operation::RegionRead { index: 0, offset: 8 });
    assert!(
        e.to_string().contains("vfio-user:") && e.to_string().contains("gone.sock"),
        "{e}"
    );
    assert!(c.migration_device().state().is_err());
    server.join().unwrap();
}

#[test]
fn a_device_that_is_not_pci_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notpci.sock");
    let server = scripted(&path, Script::NotPci, memfd(PAGE));
    let e = VfioUserClient::connect(&path).unwrap_err();
    assert_eq!(e.op, Operation::DeviceInfo);
    assert!(e.to_string().contains("not a PCI device"), "{e}");
    assert!(e.to_string().contains("notpci.sock"), "{e}");
    server.join().unwrap();
}

// ---- the libvfio-user peer ----

const PEER_SIZE: u64 = 4 << 20;

#[test]
fn libvfio_user_peer_attaches_and_migrates_through_the_shared_connection() {
    let Some(bin) = device_bin() else { return };
    let mut src = Peer::start(bin, 23, PEER_SIZE, false);
    let source_crc = crc_of(&src.wait_for("PEER-READY"));
    let mut dst = Peer::start(bin, 23, PEER_SIZE, true);

    let a = VfioUserClient::connect(src.socket()).unwrap_or_else(|e| panic!("attaching the source peer: {e}"));
    let b = VfioUserClient::connect(dst.socket()).unwrap_or_else(|e| panic!("attaching the destination peer: {e}"));
    assert!(a.resettable(), "libvfio-user devices can be reset");
    assert!(a.regions().len() >= 9, "{:?}", a.regions());
    assert_eq!(a.region(0).unwrap().size, 4096);
    assert!(a.region(CONFIG).unwrap().size >= 256);
    // Config space: migr-device's vendor and device IDs; BAR0's magic ("DPUV").
    assert_eq!(read(&a, CONFIG, 0, 4), [0x36, 0x1b, 0xff, 0x10]);
    assert_eq!(dword(&a, BAR0, 0), 0x5655_5044);
    assert_eq!(dword(&b, BAR0, 4), 0, "the destination holds no verdict yet");

    let src_mig = a.migration_device();
    let dst_mig = b.migration_device();
    let id = DeviceIdentity::Pci {
        vendor: 0x1b36,
        device: 0x10ff,
        subsystem_vendor: 0x1b36,
        subsystem_device: 0x0001,
    };
    assert_eq!((src_mig.identity(), dst_mig.identity()), (id.clone(), id));
    let report = LocalMigration::default()
        .run(vec![Box::new(src_mig)], vec![Box::new(dst_mig)], &mut |_| {})
        .unwrap_or_else(|e| panic!("migration failed: {e}"));
    assert_eq!(
        report.precopy_bytes[0] + report.stop_copy_bytes[0],
        32 + PEER_SIZE + 8,
        "{report:?}"
    );
    // The destination's verdict through its BAR0 (1: every byte checked), on the VMM's side of
    // the shared connection.
    assert_eq!(dword(&b, BAR0, 4), 1, "destination verdict");
    assert!(dst.wait_for("PEER-STATE").starts_with("PEER-STATE ok"));
    drop((a, b));
    let (exit, _, status) = dst.finish();
    assert_eq!(exit, format!("PEER-EXIT verdict=ok crc={source_crc}"));
    assert_eq!(status, 0);
    let (exit, _, status) = src.finish();
    assert!(exit.starts_with("PEER-EXIT verdict=none"), "{exit}");
    assert_eq!(status, 0);
}

/// A reply header for request `msg_id` of `command` with `payload`.
fn reply_bytes(msg_id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let h = Header {
        msg_id,
        command,
        size: 0,
        flags: codec::FLAG_TYPE_REPLY,
        error_no: 0,
    };
    codec::write_message(&mut out, h, &[payload]).unwrap();
    out
}

#[test]
fn random_server_replies_never_panic_the_client() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // splitmix64
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for round in 0..400 {
        // Well-framed replies in request order (so parsing is reached), with random payloads:
        // the version, the device info (PCI, a few regions), then random region infos and
        // answers to whatever comes next.
        let mut input = reply_bytes(0, codec::CMD_VERSION, &codec::encode_version(&Default::default()));
        let mut info = Vec::new();
        for v in [
            16,
            codec::DEVICE_FLAGS_PCI | (next() as u32 & 1),
            (next() % 4) as u32,
            5,
        ] {
            codec::put_u32(&mut info, v);
        }
        input.extend(reply_bytes(1, codec::CMD_DEVICE_GET_INFO, &info));
        for id in 2..12u16 {
            let len = (next() % 96) as usize;
            let mut p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if p.len() >= 32 && round % 2 == 0 {
                // A plausible region info header, random caps.
                p[..4].copy_from_slice(&(len as u32).to_le_bytes());
                p[8..12].copy_from_slice(&u32::from(id - 2).to_le_bytes());
            }
            let command = if round % 3 == 0 {
                codec::CMD_REGION_READ
            } else {
                codec::CMD_DEVICE_GET_REGION_INFO
            };
            input.extend(reply_bytes(id, command, &p));
        }
        let (client_end, mut server) = UnixStream::pair().unwrap();
        use std::io::Write;
        server.write_all(&input).unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let Ok(c) = VfioUserClient::from_stream("fuzz", client_end) else {
            continue;
        };
        let mut b = [0u8; 8];
        let _ = c.region_read(0, 0, &mut b);
        let _ = c.region_write(0, 0, &b);
        let _ = c.get_irq_info(1);
        let _ = c.dma_unmap(0, PAGE);
        let _ = c.reset();
        let _ = c.migration_device().state();
        drop(server);
    }
}
