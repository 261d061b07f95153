//! Cloud Hypervisor's own vfio-user client (the crates.io `vfio_user` crate at the version Cloud
//! Hypervisor pins, 0.1.5) against our server: it attaches the served emulated device as Cloud
//! Hypervisor's `VfioUserPciDevice` does (regions, config space, BAR sizing, BAR0 accesses), maps
//! guest memory (a memfd) for DMA and sees the device write there, unmaps it, sets IRQs, resets
//! and shuts down; then our own migration client moves the device to another server and the
//! state a driver wrote through BAR0 is there.

#[path = "support/serve.rs"]
mod serve;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use vfio_migration::live::{Convergence, LocalMigration};
use vfio_migration::vfio_user::{VfioUserDevice, pci, regs};
use vfio_migration::{DeviceState, MigrationDevice};

use serve::serve;

const CONFIG: u32 = 7;
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const PAGE: u64 = 4096;
const IOVA: u64 = 0x1_0000_0000;
/// `VFIO_PCI_MSIX_IRQ_INDEX`, `VFIO_IRQ_SET_DATA_NONE`, `_DATA_EVENTFD`, `_ACTION_TRIGGER`.
const MSIX: u32 = 2;
const DATA_NONE: u32 = 1;
const DATA_EVENTFD: u32 = 4;
const ACTION_TRIGGER: u32 = 32;

fn read(c: &mut vfio_user::Client, region: u32, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    c.region_read(region, offset, &mut b).unwrap();
    b
}

fn dword(c: &mut vfio_user::Client, region: u32, offset: u64) -> u32 {
    u32::from_le_bytes(read(c, region, offset, 4).try_into().unwrap())
}

fn qword(c: &mut vfio_user::Client, region: u32, offset: u64) -> u64 {
    u64::from_le_bytes(read(c, region, offset, 8).try_into().unwrap())
}

fn write_dword(c: &mut vfio_user::Client, region: u32, offset: u64, v: u32) {
    c.region_write(region, offset, &v.to_le_bytes()).unwrap();
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

/// A pipe: (read end, write end).
fn pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; the result is checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn pages(f: &File, n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|p| {
            let mut b = vec![0u8; PAGE as usize];
            f.read_exact_at(&mut b, p * PAGE).unwrap();
            b
        })
        .collect()
}

/// What Cloud Hypervisor's `VfioCommon::allocate_bars` does to find the BARs: for BAR0..BAR5 and
/// the ROM, read the flags, write all-ones, read the size mask back. Returns the BARs found as
/// `(index, size, is_64bit, is_io)`.
fn size_bars(c: &mut vfio_user::Client) -> Vec<(u32, u64, bool, bool)> {
    let mut found = Vec::new();
    let mut bar = 0;
    while bar < 7 {
        let offset = if bar == 6 { 0x30 } else { 0x10 + u64::from(bar) * 4 };
        let flags = dword(c, CONFIG, offset);
        let is_io = bar != 6 && flags & 1 == 1;
        let is_64 = bar != 6 && !is_io && flags & 0b110 == 0b100;
        write_dword(c, CONFIG, offset, u32::MAX);
        let lower = dword(c, CONFIG, offset);
        let size = if is_io {
            let lower = lower & !0b11;
            (lower != 0).then(|| u64::from(!lower) + 1)
        } else if is_64 {
            write_dword(c, CONFIG, offset + 4, u32::MAX);
            let upper = dword(c, CONFIG, offset + 4);
            let combined = ((u64::from(upper) << 32) | u64::from(lower)) & !0b1111;
            (combined != 0).then(|| (!combined).wrapping_add(1))
        } else {
            let lower = lower & !0b1111;
            (lower != 0).then(|| u64::from(!lower) + 1)
        };
        if let Some(size) = size {
            found.push((bar, size, is_64, is_io));
        }
        bar += if is_64 && size.is_some() { 2 } else { 1 };
    }
    found
}

#[test]
fn cloud_hypervisor_client_attaches_maps_memory_and_the_state_then_migrates() {
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB/s of device activity: about a thousand DMA page writes a second.
    let (src_h, src_id, src) = serve(dir.path(), "src.sock", "size=1M,seed=4,dirty-rate=4M,reset=keep");
    let (dst_h, dst_id, dst) = serve(dir.path(), "dst.sock", "size=1M,seed=4");
    assert_eq!(src_id, dst_id);

    let mut c = vfio_user::Client::new(&src).expect("Cloud Hypervisor's client attaches");
    // Regions: BAR0, BAR2 and config space, read/write, not mmappable; the others empty.
    for index in 0..9 {
        let r = c.region(index).expect("nine regions");
        let want = match index {
            0 => 4096,
            2 => 64,
            7 => 256,
            _ => 0,
        };
        assert_eq!(r.size, want, "region {index}");
        if want > 0 {
            assert_eq!(r.flags & 7, 3, "region {index}: read/write, no mmap");
            assert!(r.file_offset.is_none() && r.sparse_areas.is_empty());
        }
    }
    // Config space: the IDs of the identity our server tells (our client derives the same ones
    // from config space), class "other", no capabilities, no INTx pin.
    let cfg = read(&mut c, CONFIG, 0, 0x40);
    let word = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    assert_eq!((word(0), word(2), word(0x2c), word(0x2e)), pci::pci_ids(&src_id));
    assert_eq!(word(0), pci::VENDOR_ID);
    assert_eq!((cfg[0x0b], cfg[0x0e], word(6) & 0x10, cfg[0x3d]), (0xff, 0, 0, 0));
    // BAR sizing as Cloud Hypervisor does it: a 64-bit BAR0 of 4 KiB and an I/O BAR2 of 64
    // ports, nothing else.
    assert_eq!(size_bars(&mut c), vec![(0, 4096, true, false), (2, 64, false, true)]);
    write_dword(&mut c, CONFIG, 0x10, 0xc000_0000);
    write_dword(&mut c, CONFIG, 0x14, 0);
    assert_eq!(dword(&mut c, CONFIG, 0x10), 0xc000_0004);
    c.region_write(
        CONFIG,
        4,
        &(pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER).to_le_bytes(),
    )
    .unwrap();
    assert_eq!(dword(&mut c, CONFIG, 4) & 0xffff, 6);
    for index in 0..5 {
        assert_eq!(c.get_irq_info(index).unwrap().count, 0, "IRQ index {index}");
    }

    // BAR0 registers.
    assert_eq!(read(&mut c, BAR0, regs::REG_MAGIC, 4), b"VMIG");
    assert_eq!(dword(&mut c, BAR0, regs::REG_LAYOUT), regs::LAYOUT_VERSION);
    assert_eq!(qword(&mut c, BAR0, regs::REG_STATE_SIZE), 1 << 20);
    assert_eq!(
        dword(&mut c, BAR0, regs::REG_DEVICE_STATE),
        DeviceState::Running.as_raw()
    );
    let d1 = qword(&mut c, BAR0, regs::REG_DIGEST);
    std::thread::sleep(Duration::from_millis(20));
    assert_ne!(
        qword(&mut c, BAR0, regs::REG_DIGEST),
        d1,
        "the running device changes its state"
    );
    write_dword(&mut c, BAR0, regs::REG_SCRATCH, 0xc0ff_ee01);
    assert_eq!(dword(&mut c, BAR0, regs::REG_SCRATCH), 0xc0ff_ee01);
    assert_eq!(src_h.version(0), Some(0xc0ff_ee01), "SCRATCH is device state");
    // BAR2 shows the same registers as I/O ports; a guest's byte-wide port access works.
    assert_eq!(read(&mut c, BAR2, regs::REG_MAGIC, 4), b"VMIG");
    c.region_write(BAR2, regs::REG_SCRATCH, &[0x42]).unwrap();
    assert_eq!(read(&mut c, BAR2, regs::REG_SCRATCH, 1), [0x42]);
    assert_eq!(dword(&mut c, BAR0, regs::REG_SCRATCH), 0xc0ff_ee42);
    c.region_write(BAR2, regs::REG_SCRATCH, &[0x01]).unwrap();

    // Guest memory: a memfd of 64 pages mapped at IOVA; the device writes pages 16..48.
    let ram = memfd(64 * PAGE);
    c.dma_map(0, IOVA, 64 * PAGE, ram.as_raw_fd()).unwrap();
    c.region_write(BAR0, regs::REG_DMA_ADDR, &(IOVA + 16 * PAGE).to_le_bytes())
        .unwrap();
    c.region_write(BAR0, regs::REG_DMA_LEN, &(32 * PAGE).to_le_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let writes = qword(&mut c, BAR0, regs::REG_DMA_WRITES);
    assert!(writes > 10, "{writes} DMA writes in 100 ms at ~1000/s");
    let seen = pages(&ram, 64);
    let written: Vec<u64> = (0..64).filter(|&p| seen[p as usize].iter().any(|&b| b != 0)).collect();
    assert!(!written.is_empty());
    assert!(written.iter().all(|p| (16..48).contains(p)), "{written:?}");
    for &p in &written {
        let b = &seen[p as usize];
        let seq = u64::from_le_bytes(b[..8].try_into().unwrap());
        let iova = u64::from_le_bytes(b[8..16].try_into().unwrap());
        assert!(seq >= 1 && seq <= writes && iova == IOVA + p * PAGE, "page {p}");
        assert!(b[16..].iter().all(|&x| x == 0), "16 bytes per write");
    }
    c.dma_unmap(IOVA, 64 * PAGE).unwrap();
    let after_unmap = qword(&mut c, BAR0, regs::REG_DMA_WRITES);
    let frozen = pages(&ram, 64);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        qword(&mut c, BAR0, regs::REG_DMA_WRITES),
        after_unmap,
        "no DMA after unmap"
    );
    assert!(pages(&ram, 64) == frozen, "no DMA after unmap");

    // Interrupts: none, but SET_IRQS is accepted and the eventfds it carries are closed.
    let (mut r1, w1) = pipe();
    let (mut r2, w2) = pipe();
    c.set_irqs(
        MSIX,
        DATA_EVENTFD | ACTION_TRIGGER,
        0,
        2,
        &[w1.as_raw_fd(), w2.as_raw_fd()],
    )
    .unwrap();
    drop((w1, w2));
    let mut b = [0u8; 1];
    assert_eq!(r1.read(&mut b).unwrap(), 0, "the server closed the first eventfd");
    assert_eq!(r2.read(&mut b).unwrap(), 0, "the server closed the second eventfd");
    c.set_irqs(MSIX, DATA_NONE | ACTION_TRIGGER, 0, 0, &[]).unwrap();

    // Reset: config space and the DMA window start over; with reset=keep the state stays.
    c.reset().unwrap();
    assert_eq!(dword(&mut c, CONFIG, 4) & 0xffff, 0);
    assert_eq!(qword(&mut c, BAR0, regs::REG_DMA_LEN), 0);
    assert_eq!(dword(&mut c, BAR0, regs::REG_SCRATCH), 0xc0ff_ee01);
    c.shutdown().unwrap();
    drop(c);

    // Our migration client moves the device to the other server.
    let a = VfioUserDevice::connect(&src).unwrap();
    let b = VfioUserDevice::connect(&dst).unwrap();
    assert_eq!(a.identity(), src_id);
    let m = LocalMigration {
        convergence: Convergence {
            max_iterations: 5,
            ..Default::default()
        },
        ..Default::default()
    };
    let report = m.run(vec![Box::new(a)], vec![Box::new(b)], &mut |_| {}).unwrap();
    assert!(report.precopy_bytes[0] > 1 << 20, "{report:?}");
    assert_eq!(src_h.digest(), dst_h.digest());
    assert_eq!(dst_h.version(0), Some(0xc0ff_ee01));

    // What a driver reads through BAR0 on the destination: the state moved.
    let mut c = vfio_user::Client::new(&dst).unwrap();
    assert_eq!(dword(&mut c, BAR0, regs::REG_SCRATCH), 0xc0ff_ee01, "SCRATCH moved");
    let digest = dst_h.digest();
    assert_eq!(
        qword(&mut c, BAR0, regs::REG_DIGEST),
        digest,
        "DIGEST is the content digest"
    );
    let lo = dword(&mut c, BAR0, regs::REG_DIGEST);
    let hi = dword(&mut c, BAR0, regs::REG_DIGEST + 4);
    assert_eq!((u64::from(hi) << 32) | u64::from(lo), digest);
    assert_eq!(
        dword(&mut c, BAR0, regs::REG_DEVICE_STATE),
        DeviceState::Running.as_raw()
    );
    let cfg_dst = read(&mut c, CONFIG, 0, 0x30);
    assert_eq!(cfg_dst, cfg[..0x30], "the same device, the same IDs");
    c.shutdown().unwrap();
}
