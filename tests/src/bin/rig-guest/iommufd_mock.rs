//! iommufd dirty tracking against the kernel's selftest mock domain (`CONFIG_IOMMUFD_TEST`).
//!
//! The mock domain is the only page-accurate IOMMU dirty source available under QEMU's software
//! emulation: `IOMMU_TEST_OP_DIRTY` marks chosen IOVA pages dirty in the mock page table, standing in
//! for device DMA, and `IOMMU_HWPT_GET_DIRTY_BITMAP` must then report exactly those pages.
//!
//! Only the selftest command is issued here; every other ioctl is the engine's own
//! ([`vfio_migration::kernel::ioctls`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;

use vfio_migration::kernel::ioctls;

use crate::sys::{Buffer, io, ioctl};
use crate::{Outcome, ensure};

/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`.
pub const HWPT_ALLOC_DIRTY: u32 = 2;
/// The selftest command, `IOMMUFD_CMD_BASE + 32`.
const IOMMU_TEST_CMD: libc::c_ulong = io(0x80 + 32);
/// `IOMMU_TEST_OP_MOCK_DOMAIN`.
const OP_MOCK_DOMAIN: u32 = 2;
/// `IOMMU_TEST_OP_DIRTY`.
const OP_DIRTY: u32 = 13;
/// The mock domain's aperture starts here.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`.
const NO_CLEAR: u32 = 1;
/// The page size the engine reports with.
pub const PAGE: u64 = 4096;
/// The mock domain's IO page size (half the CPU page); the test command marks in these units.
const MOCK_IO_PAGE: u64 = 2048;
/// Pages of the first mapped area.
pub const PAGES: u64 = 256;
/// Pages of the second mapped area, right after the first.
pub const EXTRA_PAGES: u64 = 16;

/// `struct iommu_test_cmd`: a 16-byte header then a union; passed as a zero-padded buffer larger
/// than the kernel's struct (the kernel accepts a larger size when the extra bytes are zero).
#[repr(C, align(8))]
struct TestCmd([u8; 256]);

impl TestCmd {
    fn new(op: u32, id: u32) -> Self {
        let mut c = TestCmd([0; 256]);
        c.put32(0, 256);
        c.put32(4, op);
        c.put32(8, id);
        c
    }
    fn put32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
    fn get32(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_ne_bytes(b)
    }
    fn get64(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_ne_bytes(b)
    }
}

/// The mock setup: an iommufd, a mock device, and a dirty-tracking HWPT over two mapped areas:
/// [`PAGES`] pages at the aperture start and [`EXTRA_PAGES`] right after (a separate area, so it
/// can be unmapped on its own).
pub struct Mock {
    /// `/dev/iommu`.
    pub iommufd: File,
    /// The dirty-tracking HWPT.
    pub hwpt: u32,
    /// The IOAS the HWPT translates.
    pub ioas: u32,
    _buffers: Vec<Buffer>,
}

fn step<T>(what: &str, r: io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

impl Mock {
    /// Set up the mock device, the IOAS, the mappings and the HWPT.
    pub fn new() -> Result<Self, String> {
        let iommufd = step(
            "open /dev/iommu",
            OpenOptions::new().read(true).write(true).open("/dev/iommu"),
        )?;
        let fd = iommufd.as_fd();
        let ioas1 = step("IOAS_ALLOC", ioctls::ioas_alloc(fd))?;
        let mut cmd = TestCmd::new(OP_MOCK_DOMAIN, ioas1);
        // SAFETY: `cmd` is a zero-padded `struct iommu_test_cmd` without pointers.
        step("TEST_OP_MOCK_DOMAIN", unsafe { ioctl(fd, IOMMU_TEST_CMD, &mut cmd) })?;
        let idev = cmd.get32(24);

        let ioas2 = step("IOAS_ALLOC", ioctls::ioas_alloc(fd))?;
        let mut buffers = Vec::new();
        for (iova, pages) in [
            (MOCK_APERTURE_START, PAGES),
            (MOCK_APERTURE_START + PAGES * PAGE, EXTRA_PAGES),
        ] {
            let len = (pages * PAGE) as usize;
            let buffer = step("mmap", Buffer::new(len))?;
            // SAFETY: the buffer stays mapped until after the iommufd is closed (`Mock` drops the
            // iommufd first); nothing in this process reads it, so device writes cannot surprise us.
            step("IOAS_MAP", unsafe {
                ioctls::ioas_map(fd, ioas2, iova, buffer.ptr.cast(), len as u64)
            })?;
            buffers.push(buffer);
        }
        let hwpt = step(
            "HWPT_ALLOC (dirty tracking)",
            ioctls::hwpt_alloc(fd, idev, ioas2, HWPT_ALLOC_DIRTY),
        )?;
        Ok(Self {
            hwpt,
            ioas: ioas2,
            iommufd,
            _buffers: buffers,
        })
    }

    /// Mark `pages` (4 KiB page indices from the aperture start) dirty, as device DMA would. The
    /// mock's IO pages are 2 KiB: only the first half of each page is marked, so a report at
    /// 4 KiB must round it up to the whole page.
    pub fn mark(&self, pages: &[u64]) -> Result<u64, String> {
        let io_pages = (PAGES + EXTRA_PAGES) * (PAGE / MOCK_IO_PAGE);
        let mut bitmap = vec![0u64; io_pages.div_ceil(64) as usize];
        for &p in pages {
            let io = p * (PAGE / MOCK_IO_PAGE);
            bitmap[(io / 64) as usize] |= 1 << (io % 64);
        }
        let mut cmd = TestCmd::new(OP_DIRTY, self.hwpt);
        cmd.put32(16, 0);
        cmd.put64(24, MOCK_APERTURE_START);
        cmd.put64(32, (PAGES + EXTRA_PAGES) * PAGE);
        cmd.put64(40, MOCK_IO_PAGE);
        cmd.put64(48, bitmap.as_mut_ptr() as u64);
        // SAFETY: `cmd` is a zero-padded `struct iommu_test_cmd`; its `uptr` points at `bitmap`,
        // which holds one bit per mock IO page of `length` and lives across the call.
        step("TEST_OP_DIRTY", unsafe {
            ioctl(self.iommufd.as_fd(), IOMMU_TEST_CMD, &mut cmd)
        })?;
        Ok(cmd.get64(56))
    }

    /// The dirty pages the engine's HWPT ioctl reports (indices from the aperture start).
    fn report(&self, flags: u32) -> Result<Vec<u64>, String> {
        let mut bitmap = vec![0u64; PAGES.div_ceil(64) as usize];
        step(
            "HWPT_GET_DIRTY_BITMAP",
            ioctls::hwpt_get_dirty_bitmap(
                self.iommufd.as_fd(),
                self.hwpt,
                MOCK_APERTURE_START,
                PAGES * PAGE,
                PAGE,
                flags,
                &mut bitmap,
            ),
        )?;
        Ok((0..PAGES)
            .filter(|p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect())
    }
}

/// Pages marked dirty through the mock are exactly the pages reported, NO_CLEAR keeps them, a
/// clearing report empties the log, and nothing is reported before tracking is enabled.
///
/// This checks the engine's HWPT ioctls; `trackers::hwpt_mock` checks its tracker on top.
pub fn mock_dirty() -> Outcome {
    let mock = Mock::new()?;
    let fd = mock.iommufd.as_fd();
    step(
        "HWPT_SET_DIRTY_TRACKING enable",
        ioctls::hwpt_set_dirty_tracking(fd, mock.hwpt, true),
    )?;
    let first = mock.report(0)?;
    ensure!(first.is_empty(), "pages dirty before any DMA: {first:?}");

    let marked = vec![0, 1, 63, 64, 100, 200, 255];
    let n = mock.mark(&marked)?;
    println!("rig-guest: iommufd-mock-dirty: marked {marked:?}, mock says {n} dirty IO pages");
    ensure!(
        n == marked.len() as u64,
        "the mock marked {n} IO pages, want {}",
        marked.len()
    );
    let kept = mock.report(NO_CLEAR)?;
    ensure!(kept == marked, "NO_CLEAR report {kept:?}, want {marked:?}");
    let got = mock.report(0)?;
    ensure!(got == marked, "report {got:?}, want {marked:?}");
    let again = mock.report(0)?;
    ensure!(again.is_empty(), "second report not empty: {again:?}");

    let second = vec![7, 128];
    mock.mark(&second)?;
    let got = mock.report(0)?;
    ensure!(got == second, "report after a second DMA {got:?}, want {second:?}");
    step(
        "HWPT_SET_DIRTY_TRACKING disable",
        ioctls::hwpt_set_dirty_tracking(fd, mock.hwpt, false),
    )?;
    Ok(())
}
