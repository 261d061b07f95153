//! Dirty tracking on the legacy type1 container, through the engine's ioctls: an mdev-only
//! container (mtty pins nothing: no page is dirty) and the edu PCI device behind the emulated
//! Intel IOMMU (type1 cannot see device writes there: every mapped page is dirty on every query).
//! And iommufd on edu: QEMU's vIOMMU has no dirty tracking, so a dirty-tracking HWPT is refused.

use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, vfio_iommu_type1_dma_map};
use vfio_migration::kernel::{OpenMode, ioctls, open_device};

use crate::iommufd_mock::hwpt_alloc_dirty;
use crate::sys::{Buffer, io as io_nr, ioctl};
use crate::{Outcome, ensure};

/// `VFIO_IOMMU_MAP_DMA`.
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = io_nr(100 + 13);
/// Where the test buffer is mapped (clear of the x86 MSI window).
const IOVA: u64 = 1 << 20;
/// The smallest IOMMU page size here.
const PAGE: u64 = 4096;
/// Pages mapped.
const PAGES: u64 = 16;

/// Map `buf` at `iova` in a type1 container.
fn map_dma(container: BorrowedFd<'_>, buf: &Buffer, iova: u64) -> io::Result<()> {
    let mut map = vfio_iommu_type1_dma_map {
        argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: buf.ptr as u64,
        iova,
        size: buf.len as u64,
    };
    // SAFETY: `map` is a complete `struct vfio_iommu_type1_dma_map`; `vaddr` is our live mapping
    // of `size` bytes, which the callers keep until the container is closed.
    unsafe { ioctl(container, VFIO_IOMMU_MAP_DMA, &mut map) }
}

/// Start type1 dirty tracking over one mapping and return the dirty page count of two queries.
fn type1_queries(sysfs: &Path) -> Result<(u64, u64), String> {
    let buf = Buffer::new((PAGES * PAGE) as usize).map_err(|e| format!("mmap: {e}"))?;
    let opened = open_device(sysfs, OpenMode::Group).map_err(|e| format!("open: {e}"))?;
    let container = opened.handles.container_fd().ok_or("no container on the group path")?;
    map_dma(container, &buf, IOVA).map_err(|e| format!("VFIO_IOMMU_MAP_DMA: {e}"))?;
    ioctls::type1_dirty_start(container).map_err(|e| format!("dirty START: {e}"))?;
    let mut counts = [0u64; 2];
    for c in &mut counts {
        let mut bitmap = vec![0u64; PAGES.div_ceil(64) as usize];
        ioctls::type1_dirty_get_bitmap(container, IOVA, PAGES * PAGE, PAGE, &mut bitmap)
            .map_err(|e| format!("dirty GET_BITMAP: {e}"))?;
        *c = bitmap.iter().map(|w| w.count_ones() as u64).sum();
    }
    ioctls::type1_dirty_stop(container).map_err(|e| format!("dirty STOP: {e}"))?;
    drop(opened);
    drop(buf);
    Ok((counts[0], counts[1]))
}

/// mdev-only container: START works, nothing is dirty.
pub fn mdev_clean() -> Outcome {
    let path = PathBuf::from(std::env::var_os("MTTY_A").ok_or("MTTY_A is not set")?);
    let (first, second) = type1_queries(&path)?;
    ensure!(
        first == 0 && second == 0,
        "mdev-only container reported {first} then {second} dirty pages"
    );
    Ok(())
}

fn edu_path() -> Result<(String, PathBuf), String> {
    let bdf = std::env::var("EDU_BDF").map_err(|_| "EDU_BDF is not set".to_string())?;
    let path = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
    Ok((bdf, path))
}

/// edu behind the Intel IOMMU: every mapped page is dirty, on every query.
pub fn edu_all_dirty() -> Outcome {
    let (_, path) = edu_path()?;
    let (first, second) = type1_queries(&path)?;
    ensure!(
        first == PAGES && second == PAGES,
        "edu container reported {first} then {second} dirty pages, want {PAGES} both times"
    );
    Ok(())
}

/// edu through the cdev: a dirty-tracking HWPT is refused (EOPNOTSUPP) by QEMU 7.2's vIOMMU.
pub fn edu_iommufd_no_dirty() -> Outcome {
    const EOPNOTSUPP: i32 = 95;
    let (bdf, path) = edu_path()?;
    let opened = open_device(&path, OpenMode::Cdev).map_err(|e| format!("open {bdf} (cdev): {e}"))?;
    let iommufd = opened.handles.iommufd().ok_or("no iommufd on the cdev path")?;
    let dev_id = opened.handles.dev_id().ok_or("no iommufd device id")?;
    let ioas = opened.handles.ioas_id().ok_or("no IOAS")?;
    match hwpt_alloc_dirty(iommufd, dev_id, ioas) {
        Ok(id) => Err(format!("a dirty-tracking HWPT ({id}) was allocated for {bdf}")),
        Err(e) => {
            println!("rig-guest: edu-iommufd-no-dirty: HWPT_ALLOC refused as expected: {e}");
            ensure!(e.raw_os_error() == Some(EOPNOTSUPP), "want EOPNOTSUPP, got {e}");
            Ok(())
        }
    }
}
