//! Dirty tracking on the legacy type1 container, through the engine's ioctls: an mdev-only
//! container (mtty pins nothing: no page is dirty) and the edu PCI device behind the emulated
//! Intel IOMMU (type1 cannot see device writes there: every mapped page is dirty on every query).
//! And iommufd on edu: QEMU's vIOMMU has no dirty tracking, so a dirty-tracking HWPT is refused.

use std::path::{Path, PathBuf};

use vfio_migration::kernel::{OpenMode, ioctls, open_device};

use crate::iommufd_mock::HWPT_ALLOC_DIRTY;
use crate::sys::Buffer;
use crate::{Outcome, ensure};

/// Where the test buffer is mapped (clear of the x86 MSI window).
const IOVA: u64 = 1 << 20;
/// The smallest IOMMU page size here.
const PAGE: u64 = 4096;
/// Pages mapped.
const PAGES: u64 = 16;

/// What type1 dirty tracking reported over one mapping.
struct Type1Counts {
    /// Dirty pages of the first and second GET_BITMAP.
    queries: [u64; 2],
    /// Dirty pages returned by the unmap with GET_DIRTY_BITMAP.
    unmap: u64,
}

fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| w.count_ones() as u64).sum()
}

/// Check the migration capability, map a buffer, start type1 dirty tracking, query twice, and
/// unmap with the dirty bitmap.
fn type1_queries(sysfs: &Path) -> Result<Type1Counts, String> {
    let buf = Buffer::new((PAGES * PAGE) as usize).map_err(|e| format!("mmap: {e}"))?;
    let opened = open_device(sysfs, OpenMode::Group).map_err(|e| format!("open: {e}"))?;
    let container = opened.handles.container_fd().ok_or("no container on the group path")?;
    let cap = ioctls::type1_migration_cap(container)
        .map_err(|e| format!("VFIO_IOMMU_GET_INFO: {e}"))?
        .ok_or("the type1 container has no migration capability")?;
    ensure!(
        cap.pgsize_bitmap & PAGE != 0 && cap.max_dirty_bitmap_size > 0,
        "migration capability {cap:?} lacks 4 KiB pages"
    );
    // SAFETY: `buf` stays mapped until after the container is closed (`opened` drops first) and
    // nothing in this process reads it.
    unsafe { ioctls::type1_dma_map(container, IOVA, buf.ptr.cast(), PAGES * PAGE) }
        .map_err(|e| format!("VFIO_IOMMU_MAP_DMA: {e}"))?;
    ioctls::type1_dirty_start(container).map_err(|e| format!("dirty START: {e}"))?;
    let mut queries = [0u64; 2];
    for q in &mut queries {
        let mut bitmap = vec![0u64; PAGES.div_ceil(64) as usize];
        ioctls::type1_dirty_get_bitmap(container, IOVA, PAGES * PAGE, PAGE, &mut bitmap)
            .map_err(|e| format!("dirty GET_BITMAP: {e}"))?;
        *q = count(&bitmap);
    }
    let mut bitmap = vec![0u64; PAGES.div_ceil(64) as usize];
    let unmapped = ioctls::type1_dma_unmap(container, IOVA, PAGES * PAGE, Some((PAGE, &mut bitmap)))
        .map_err(|e| format!("VFIO_IOMMU_UNMAP_DMA with the dirty bitmap: {e}"))?;
    ensure!(
        unmapped == PAGES * PAGE,
        "unmapped {unmapped} bytes, want {}",
        PAGES * PAGE
    );
    ioctls::type1_dirty_stop(container).map_err(|e| format!("dirty STOP: {e}"))?;
    drop(opened);
    drop(buf);
    Ok(Type1Counts {
        queries,
        unmap: count(&bitmap),
    })
}

/// mdev-only container: START works, nothing is dirty.
pub fn mdev_clean() -> Outcome {
    let path = PathBuf::from(std::env::var_os("MTTY_A").ok_or("MTTY_A is not set")?);
    let c = type1_queries(&path)?;
    ensure!(
        c.queries == [0, 0] && c.unmap == 0,
        "mdev-only container reported {:?} then {} at unmap; want none",
        c.queries,
        c.unmap
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
    let c = type1_queries(&path)?;
    ensure!(
        c.queries == [PAGES, PAGES] && c.unmap == PAGES,
        "edu container reported {:?} then {} at unmap; want {PAGES} every time",
        c.queries,
        c.unmap
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
    let caps = ioctls::get_hw_capabilities(iommufd, dev_id).map_err(|e| format!("IOMMU_GET_HW_INFO: {e}"))?;
    ensure!(
        caps & 1 == 0,
        "{bdf}: the vIOMMU claims dirty tracking (capabilities {caps:#x})"
    );
    match ioctls::hwpt_alloc(iommufd, dev_id, ioas, HWPT_ALLOC_DIRTY) {
        Ok(id) => Err(format!("a dirty-tracking HWPT ({id}) was allocated for {bdf}")),
        Err(e) => {
            println!("rig-guest: edu-iommufd-no-dirty: HWPT_ALLOC refused as expected: {e}");
            ensure!(e.raw_os_error() == Some(EOPNOTSUPP), "want EOPNOTSUPP, got {e}");
            Ok(())
        }
    }
}
