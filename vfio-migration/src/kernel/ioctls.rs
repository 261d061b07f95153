//! The VFIO and iommufd ioctls of the kernel backend: the only home of `unsafe` in it.
//!
//! Three layers, top to bottom:
//! 1. the ioctl numbers, each declared once with vmm-sys-util's `ioctl_io_nr!` (VFIO and iommufd
//!    ioctls are all `_IO(';', n)`: the argument size is carried in the argument itself);
//! 2. safe functions, one per kernel operation, that build the uAPI argument from the
//!    vfio-bindings / iommufd-bindings structs, call the seam and decode the answer into plain
//!    values and [`io::Error`]s (the errno kept);
//! 3. the seam, `sys`: the raw `ioctl`, `read`, `write`, `pread`, `pwrite` and `poll` syscalls. Under
//!    `cfg(test)` it is replaced by a twin that records every request (fd, number, argument bytes)
//!    and answers from a script, so the glue is unit-tested on a machine without VFIO (`poll` alone
//!    really waits on the fd it is given, so a pipe can stand in for a data_fd that never answers).
//!
//! The dirty-tracking ioctls of the IOMMU backends (`VFIO_IOMMU_DIRTY_PAGES` on a type1 container,
//! `IOMMU_HWPT_SET_DIRTY_TRACKING` / `IOMMU_HWPT_GET_DIRTY_BITMAP` on `/dev/iommu`) live here too,
//! as plain functions taking a [`BorrowedFd`].

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::raw::{c_int, c_ulong};

use iommufd_bindings::{iommu_destroy, iommu_hw_info, iommu_hwpt_alloc, iommu_ioas_map, iommu_ioas_unmap};
use iommufd_bindings::{
    iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking, iommu_ioas_alloc,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE as IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_SET,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
    vfio_bitmap, vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_feature,
    vfio_device_feature_dma_logging_control, vfio_device_feature_dma_logging_range,
    vfio_device_feature_dma_logging_report, vfio_device_feature_mig_data_size, vfio_device_feature_mig_state,
    vfio_device_feature_migration, vfio_group_status, vfio_iommu_type1_dirty_bitmap, vfio_iommu_type1_dirty_bitmap_get,
    vfio_precopy_info, vfio_region_info,
};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2 as VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2, VFIO_DEVICE_FEATURE_PROBE,
    VFIO_PRECOPY_INFO_REINIT,
};
use vfio_bindings::bindings::vfio::{
    VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
    vfio_info_cap_header, vfio_iommu_type1_dma_map, vfio_iommu_type1_info, vfio_iommu_type1_info_cap_migration,
};

/// The ioctl numbers, each declared once. All are `_IO(type, nr)`.
#[allow(missing_docs)]
pub(crate) mod nr {
    use iommufd_bindings::{
        IOMMUFD_CMD_DESTROY, IOMMUFD_CMD_GET_HW_INFO, IOMMUFD_CMD_HWPT_ALLOC, IOMMUFD_CMD_IOAS_MAP,
        IOMMUFD_CMD_IOAS_UNMAP,
    };
    use iommufd_bindings::{
        IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_CMD_IOAS_ALLOC, IOMMUFD_TYPE,
    };
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    use vmm_sys_util::ioctl_io_nr;

    const VFIO: u32 = VFIO_TYPE as u32;
    const IOMMUFD: u32 = IOMMUFD_TYPE as u32;

    // Container (/dev/vfio/vfio).
    ioctl_io_nr!(VFIO_GET_API_VERSION, VFIO, VFIO_BASE);
    ioctl_io_nr!(VFIO_CHECK_EXTENSION, VFIO, VFIO_BASE + 1);
    ioctl_io_nr!(VFIO_SET_IOMMU, VFIO, VFIO_BASE + 2);
    ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO, VFIO_BASE + 12);
    ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO, VFIO_BASE + 13);
    ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO, VFIO_BASE + 14);
    // On the container fd; shares its number with `VFIO_DEVICE_FEATURE` (device fd).
    ioctl_io_nr!(VFIO_IOMMU_DIRTY_PAGES, VFIO, VFIO_BASE + 17);
    // Group (/dev/vfio/N).
    ioctl_io_nr!(VFIO_GROUP_GET_STATUS, VFIO, VFIO_BASE + 3);
    ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO, VFIO_BASE + 4);
    ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO, VFIO_BASE + 6);
    // Device.
    ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO, VFIO_BASE + 8);
    ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO, VFIO_BASE + 11);
    ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO, VFIO_BASE + 17);
    ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO, VFIO_BASE + 18);
    ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO, VFIO_BASE + 19);
    // Transfer session (the data_fd).
    ioctl_io_nr!(VFIO_MIG_GET_PRECOPY_INFO, VFIO, VFIO_BASE + 21);
    // iommufd (/dev/iommu).
    ioctl_io_nr!(IOMMU_DESTROY, IOMMUFD, IOMMUFD_CMD_DESTROY);
    ioctl_io_nr!(IOMMU_IOAS_ALLOC, IOMMUFD, IOMMUFD_CMD_IOAS_ALLOC);
    ioctl_io_nr!(IOMMU_IOAS_MAP, IOMMUFD, IOMMUFD_CMD_IOAS_MAP);
    ioctl_io_nr!(IOMMU_IOAS_UNMAP, IOMMUFD, IOMMUFD_CMD_IOAS_UNMAP);
    ioctl_io_nr!(IOMMU_HWPT_ALLOC, IOMMUFD, IOMMUFD_CMD_HWPT_ALLOC);
    ioctl_io_nr!(IOMMU_GET_HW_INFO, IOMMUFD, IOMMUFD_CMD_GET_HW_INFO);
    ioctl_io_nr!(
        IOMMU_HWPT_SET_DIRTY_TRACKING,
        IOMMUFD,
        IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING
    );
    ioctl_io_nr!(IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMUFD, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
}

/// Plain uAPI structs that can be viewed as bytes.
///
/// # Safety
///
/// Implementors are `#[repr(C)]` structs made only of integers (or raw pointers) with no padding
/// bytes, so every byte of them is initialised and every byte pattern is a valid value.
unsafe trait Pod: Copy + Sized {
    /// The struct's bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self: Pod` has no padding, so all `size_of::<Self>()` bytes behind `self` are
        // initialised; the slice borrows `self` and cannot outlive it.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// The struct's bytes, writable.
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`; and any byte pattern written through the slice is a valid
        // `Self` because `Self: Pod` consists of integers (or raw pointers) only.
        unsafe { std::slice::from_raw_parts_mut((self as *mut Self).cast::<u8>(), size_of::<Self>()) }
    }
}

// SAFETY (for every impl below): bindgen-generated `#[repr(C)]` structs of `__u32`/`__s32`/`__u64`
// fields whose offsets bindgen asserts are contiguous (no padding), or a raw pointer field.
// SAFETY: see above.
unsafe impl Pod for vfio_device_feature_mig_state {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_feature_migration {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_feature_mig_data_size {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_feature_dma_logging_control {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_feature_dma_logging_range {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_feature_dma_logging_report {}
// SAFETY: see above.
unsafe impl Pod for vfio_precopy_info {}
// SAFETY: see above.
unsafe impl Pod for vfio_region_info {}
// SAFETY: see above.
unsafe impl Pod for vfio_group_status {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_bind_iommufd {}
// SAFETY: see above.
unsafe impl Pod for vfio_device_attach_iommufd_pt {}
// SAFETY: see above (two u64 then a `vfio_bitmap` of u64, u64, `*mut u64`).
unsafe impl Pod for vfio_iommu_type1_dirty_bitmap_get {}
// SAFETY: see above.
unsafe impl Pod for iommu_ioas_alloc {}
// SAFETY: see above.
unsafe impl Pod for iommu_hwpt_set_dirty_tracking {}
// SAFETY: see above.
unsafe impl Pod for iommu_hwpt_get_dirty_bitmap {}
// SAFETY: see above.
unsafe impl Pod for iommu_hwpt_alloc {}
// SAFETY: see above (the union holds two u32 views of the same 4 bytes).
unsafe impl Pod for iommu_hw_info {}
// SAFETY: see above.
unsafe impl Pod for iommu_ioas_map {}
// SAFETY: see above.
unsafe impl Pod for iommu_ioas_unmap {}
// SAFETY: see above.
unsafe impl Pod for iommu_destroy {}
// SAFETY: see above.
unsafe impl Pod for vfio_iommu_type1_dma_map {}
// SAFETY: see above.
unsafe impl Pod for vfio_iommu_type1_info {}
// SAFETY: see above (u64, u64, `*mut u64`).
unsafe impl Pod for vfio_bitmap {}

/// Decode a `Pod + Default` struct from the start of `bytes` (missing bytes stay zero).
fn read_pod<T: Pod + Default>(bytes: &[u8]) -> T {
    let mut v = T::default();
    let dst = v.as_bytes_mut();
    let n = dst.len().min(bytes.len());
    dst[..n].copy_from_slice(&bytes[..n]);
    v
}

/// Size of the fixed header `{ u32 argsz; u32 flags; }` of an argsz/flags-prefixed argument
/// (`struct vfio_device_feature`, `struct vfio_iommu_type1_dirty_bitmap`).
const HEADER: usize = size_of::<vfio_device_feature>();
const _: () = assert!(HEADER == 8 && size_of::<vfio_iommu_type1_dirty_bitmap>() == HEADER);

/// A variable-size `{ u32 argsz; u32 flags; u8 data[]; }` argument, in a `u64`-aligned buffer so
/// the payload (at offset 8) is aligned for the u64 fields of every payload struct.
struct ArgBuf {
    words: Vec<u64>,
    len: usize,
}

impl ArgBuf {
    /// `argsz = 8 + payload size`, `flags`, then the payload bytes.
    fn new(flags: u32, payload: &[u8]) -> Self {
        let len = HEADER + payload.len();
        let mut buf = Self {
            words: vec![0u64; len.div_ceil(8)],
            len,
        };
        let bytes = buf.bytes_mut();
        // `len` is at most 8 + the size of one uAPI struct: it fits a u32.
        bytes[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        bytes[4..8].copy_from_slice(&flags.to_ne_bytes());
        bytes[HEADER..].copy_from_slice(payload);
        buf
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `words` holds at least `len` bytes (`len.div_ceil(8)` words); u8 has no alignment
        // requirement and every u64 bit pattern is valid bytes and vice versa. The slice borrows
        // `self` mutably, so nothing else aliases the buffer meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    fn payload<T: Pod + Default>(&mut self) -> T {
        read_pod(&self.bytes_mut()[HEADER..])
    }
}

fn feature_flags(op: u32, feature: u32) -> u32 {
    op | feature
}

/// Issue `VFIO_DEVICE_FEATURE` with an argsz/flags header and `payload`; returns the buffer with
/// whatever the kernel wrote back.
///
/// # Safety
///
/// Every pointer inside `payload` must be valid for what the kernel does with it for this feature.
unsafe fn device_feature(device: BorrowedFd<'_>, flags: u32, payload: &[u8]) -> io::Result<ArgBuf> {
    let mut buf = ArgBuf::new(flags, payload);
    // SAFETY: the buffer is a complete `struct vfio_device_feature` of `argsz` bytes, aligned for
    // its payload; pointers inside the payload are the caller's responsibility (see above).
    unsafe { sys::ioctl_buf(device, nr::VFIO_DEVICE_FEATURE(), buf.bytes_mut())? };
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Migration (device fd).
// ---------------------------------------------------------------------------------------------

/// `VFIO_DEVICE_FEATURE` GET `MIGRATION`: the device's migration flags (`u64`).
pub fn get_migration_flags(device: BorrowedFd<'_>) -> io::Result<u64> {
    let payload = vfio_device_feature_migration::default();
    let flags = feature_flags(VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION);
    // SAFETY: the payload holds no pointers.
    let mut buf = unsafe { device_feature(device, flags, payload.as_bytes())? };
    Ok(buf.payload::<vfio_device_feature_migration>().flags)
}

/// `VFIO_DEVICE_FEATURE` GET `MIG_DEVICE_STATE`: the raw device state number.
pub fn get_device_state(device: BorrowedFd<'_>) -> io::Result<u32> {
    let payload = vfio_device_feature_mig_state {
        device_state: 0,
        data_fd: -1,
    };
    let flags = feature_flags(VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
    // SAFETY: the payload holds no pointers.
    let mut buf = unsafe { device_feature(device, flags, payload.as_bytes())? };
    Ok(buf.payload::<vfio_device_feature_mig_state>().device_state)
}

/// `VFIO_DEVICE_FEATURE` SET `MIG_DEVICE_STATE` to the raw state `state`; the kernel walks the
/// whole path. Returns the new `data_fd` when the final arc opened a transfer session.
pub fn set_device_state(device: BorrowedFd<'_>, state: u32) -> io::Result<Option<OwnedFd>> {
    let payload = vfio_device_feature_mig_state {
        device_state: state,
        data_fd: -1,
    };
    let flags = feature_flags(VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE);
    // SAFETY: the payload holds no pointers.
    let mut buf = unsafe { device_feature(device, flags, payload.as_bytes())? };
    let answer: vfio_device_feature_mig_state = buf.payload();
    if answer.data_fd < 0 {
        return Ok(None);
    }
    // SAFETY: on success the kernel stored in `data_fd` a new file descriptor it installed for
    // this process and that nobody else owns: we take ownership and close it on drop.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(answer.data_fd) }))
}

/// `VFIO_DEVICE_FEATURE` GET `MIG_DATA_SIZE`: the estimated STOP_COPY data length in bytes.
pub fn get_mig_data_size(device: BorrowedFd<'_>) -> io::Result<u64> {
    let payload = vfio_device_feature_mig_data_size::default();
    let flags = feature_flags(VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
    // SAFETY: the payload holds no pointers.
    let mut buf = unsafe { device_feature(device, flags, payload.as_bytes())? };
    Ok(buf.payload::<vfio_device_feature_mig_data_size>().stop_copy_length)
}

/// `VFIO_DEVICE_RESET`.
pub fn device_reset(device: BorrowedFd<'_>) -> io::Result<()> {
    sys::ioctl_none(device, nr::VFIO_DEVICE_RESET()).map(drop)
}

/// `VFIO_DEVICE_FEATURE` PROBE | SET `MIG_PRECOPY_INFOv2` (feature 12, no data): whether the
/// device offers PRE_COPY info v2. `ENOTTY` and `EINVAL` (kernels and drivers without it) are
/// `Ok(false)`; any other errno is returned.
pub fn probe_precopy_info_v2(device: BorrowedFd<'_>) -> io::Result<bool> {
    let flags = feature_flags(
        VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET,
        VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2,
    );
    // SAFETY: no payload, so no pointers.
    match unsafe { device_feature(device, flags, &[]) } {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `VFIO_DEVICE_FEATURE` SET `MIG_PRECOPY_INFOv2` (no data): opt in, so that
/// `VFIO_MIG_GET_PRECOPY_INFO` reports [`PrecopyAnswer::reinit`].
pub fn enable_precopy_info_v2(device: BorrowedFd<'_>) -> io::Result<()> {
    let flags = feature_flags(VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2);
    // SAFETY: no payload, so no pointers.
    unsafe { device_feature(device, flags, &[]) }.map(drop)
}

/// What `VFIO_MIG_GET_PRECOPY_INFO` answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrecopyAnswer {
    /// `initial_bytes`.
    pub initial_bytes: u64,
    /// `dirty_bytes`.
    pub dirty_bytes: u64,
    /// `flags & VFIO_PRECOPY_INFO_REINIT`, counted only when `v2` was asked for (after the
    /// opt-in); without it drivers echo the flags userspace passed, so they mean nothing.
    pub reinit: bool,
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on a data_fd. Passes `flags = 0` (old drivers echo the flags
/// back) and `argsz = 24`. `v2`: the device was opted in to PRE_COPY info v2
/// ([`enable_precopy_info_v2`]), so the answer's `VFIO_PRECOPY_INFO_REINIT` flag is read;
/// otherwise the answer's flags are ignored.
pub fn get_precopy_info(data_fd: BorrowedFd<'_>, v2: bool) -> io::Result<PrecopyAnswer> {
    let mut info = vfio_precopy_info {
        argsz: size_of::<vfio_precopy_info>() as u32,
        flags: 0,
        initial_bytes: 0,
        dirty_bytes: 0,
    };
    // SAFETY: `info` is a complete `struct vfio_precopy_info` of `argsz` bytes without pointers.
    unsafe { sys::ioctl_buf(data_fd, nr::VFIO_MIG_GET_PRECOPY_INFO(), info.as_bytes_mut())? };
    Ok(PrecopyAnswer {
        initial_bytes: info.initial_bytes,
        dirty_bytes: info.dirty_bytes,
        reinit: v2 && info.flags & VFIO_PRECOPY_INFO_REINIT != 0,
    })
}

// ---------------------------------------------------------------------------------------------
// Device DMA logging (device fd).
// ---------------------------------------------------------------------------------------------

/// `VFIO_DEVICE_FEATURE` SET `DMA_LOGGING_START` over `ranges` (`(iova, length)` pairs) with the
/// requested `page_size`; returns the page size the device chose. The ranges are passed as given:
/// validate them first.
pub fn dma_logging_start(device: BorrowedFd<'_>, page_size: u64, ranges: &[(u64, u64)]) -> io::Result<u64> {
    let num_ranges = u32::try_from(ranges.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many DMA logging ranges"))?;
    let ranges: Vec<vfio_device_feature_dma_logging_range> = ranges
        .iter()
        .map(|&(iova, length)| vfio_device_feature_dma_logging_range { iova, length })
        .collect();
    let control = vfio_device_feature_dma_logging_control {
        page_size,
        num_ranges,
        __reserved: 0,
        ranges: ranges.as_ptr() as u64,
    };
    let flags = feature_flags(VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_DMA_LOGGING_START);
    // SAFETY: `control.ranges` points at `num_ranges` initialised range structs in `ranges`, which
    // lives until the end of this function; the kernel only reads them.
    let mut buf = unsafe { device_feature(device, flags, control.as_bytes())? };
    Ok(buf.payload::<vfio_device_feature_dma_logging_control>().page_size)
}

/// The number of `u64` bitmap words needed for one bit per `page_size` page of `length` bytes
/// (`None` when `page_size` is not a power of two).
pub fn bitmap_words(length: u64, page_size: u64) -> Option<u64> {
    if !page_size.is_power_of_two() {
        return None;
    }
    Some(length.div_ceil(page_size).div_ceil(64))
}

fn check_bitmap(length: u64, page_size: u64, bitmap: &[u64]) -> io::Result<()> {
    let words = bitmap_words(length, page_size)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "page size is not a power of two"))?;
    if (bitmap.len() as u64) < words {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "bitmap of {} words is too small for {length} bytes of {page_size}-byte pages ({words} words needed)",
                bitmap.len()
            ),
        ));
    }
    Ok(())
}

/// `VFIO_DEVICE_FEATURE` GET `DMA_LOGGING_REPORT`: read and clear the log of
/// `[iova, iova + length)` into `bitmap`. The kernel only sets bits: zero the bitmap first.
/// Fails with `InvalidInput` before the ioctl when the bitmap is too small.
pub fn dma_logging_report(
    device: BorrowedFd<'_>,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    check_bitmap(length, page_size, bitmap)?;
    let report = vfio_device_feature_dma_logging_report {
        iova,
        length,
        page_size,
        bitmap: bitmap.as_mut_ptr() as u64,
    };
    let flags = feature_flags(VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT);
    // SAFETY: `report.bitmap` points at `bitmap`, exclusively borrowed for this call and checked
    // above to hold one bit per page of `length` bytes, which is all the kernel writes.
    unsafe { device_feature(device, flags, report.as_bytes())? };
    Ok(())
}

/// `VFIO_DEVICE_FEATURE` SET `DMA_LOGGING_STOP` (no payload, `argsz = 8`).
pub fn dma_logging_stop(device: BorrowedFd<'_>) -> io::Result<()> {
    let flags = feature_flags(VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP);
    // SAFETY: there is no payload.
    unsafe { device_feature(device, flags, &[])? };
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Regions (device fd).
// ---------------------------------------------------------------------------------------------

/// What `VFIO_DEVICE_GET_REGION_INFO` tells about one region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// `VFIO_REGION_INFO_FLAG_*` (READ 1, WRITE 2, MMAP 4, CAPS 8).
    pub flags: u32,
    /// Size of the region in bytes.
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite).
    pub offset: u64,
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (`argsz = 32`, capabilities not read).
pub fn get_region_info(device: BorrowedFd<'_>, index: u32) -> io::Result<RegionInfo> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: `info` is a complete `struct vfio_region_info` of `argsz` bytes without pointers.
    unsafe { sys::ioctl_buf(device, nr::VFIO_DEVICE_GET_REGION_INFO(), info.as_bytes_mut())? };
    Ok(RegionInfo {
        flags: info.flags,
        size: info.size,
        offset: info.offset,
    })
}

// ---------------------------------------------------------------------------------------------
// Opening: container, group, cdev and iommufd.
// ---------------------------------------------------------------------------------------------

/// `VFIO_GET_API_VERSION` on the container.
pub fn get_api_version(container: BorrowedFd<'_>) -> io::Result<i32> {
    sys::ioctl_none(container, nr::VFIO_GET_API_VERSION())
}

/// `VFIO_CHECK_EXTENSION(ext)` on the container: whether the IOMMU type `ext` is supported.
pub fn check_extension(container: BorrowedFd<'_>, ext: u32) -> io::Result<bool> {
    sys::ioctl_val(container, nr::VFIO_CHECK_EXTENSION(), ext.into()).map(|r| r > 0)
}

/// `VFIO_SET_IOMMU(iommu_type)` on the container (after a group was added).
pub fn set_iommu(container: BorrowedFd<'_>, iommu_type: u32) -> io::Result<()> {
    sys::ioctl_val(container, nr::VFIO_SET_IOMMU(), iommu_type.into()).map(drop)
}

/// `VFIO_GROUP_GET_STATUS`: the group flags (`VFIO_GROUP_FLAGS_VIABLE` 1, `CONTAINER_SET` 2).
pub fn group_status(group: BorrowedFd<'_>) -> io::Result<u32> {
    let mut status = vfio_group_status {
        argsz: size_of::<vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: `status` is a complete `struct vfio_group_status` of `argsz` bytes without pointers.
    unsafe { sys::ioctl_buf(group, nr::VFIO_GROUP_GET_STATUS(), status.as_bytes_mut())? };
    Ok(status.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: add the group to the container.
pub fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> io::Result<()> {
    let mut bytes = c_int::to_ne_bytes(container.as_raw_fd());
    // SAFETY: the argument is a pointer to an `int` holding the container fd: 4 bytes the kernel
    // only reads.
    unsafe { sys::ioctl_buf(group, nr::VFIO_GROUP_SET_CONTAINER(), &mut bytes)? };
    Ok(())
}

/// `VFIO_GROUP_GET_DEVICE_FD(name)`: open the device `name` (PCI address or mdev UUID) of the group.
pub fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let mut bytes = name.to_bytes_with_nul().to_vec();
    // SAFETY: the argument is a NUL-terminated string the kernel only reads.
    let fd = unsafe { sys::ioctl_buf(group, nr::VFIO_GROUP_GET_DEVICE_FD(), &mut bytes)? };
    if fd < 0 {
        return Err(io::Error::other(format!("VFIO_GROUP_GET_DEVICE_FD returned {fd}")));
    }
    // SAFETY: on success the ioctl returns a new file descriptor installed for this process that
    // nobody else owns: we take ownership.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `VFIO_DEVICE_BIND_IOMMUFD` on a cdev device fd; returns the iommufd device id.
///
/// Passes `argsz = 16` (up to `out_devid`), which every kernel with the cdev accepts.
pub fn bind_iommufd(device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut bind = vfio_device_bind_iommufd {
        argsz: BIND_IOMMUFD_ARGSZ,
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: `bind` is a complete `struct vfio_device_bind_iommufd` (the kernel reads `argsz`
    // = 16 bytes of it and writes `out_devid`); no pointer is passed (no token flag).
    unsafe { sys::ioctl_buf(device, nr::VFIO_DEVICE_BIND_IOMMUFD(), bind.as_bytes_mut())? };
    Ok(bind.out_devid)
}

/// `offsetofend(struct vfio_device_bind_iommufd, out_devid)`.
const BIND_IOMMUFD_ARGSZ: u32 = 16;
/// `offsetofend(struct vfio_device_attach_iommufd_pt, pt_id)`.
const ATTACH_PT_ARGSZ: u32 = 12;

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` on a bound cdev device fd: attach to the IOAS or HWPT `pt_id`.
///
/// Passes `argsz = 12` (up to `pt_id`, no PASID), which every kernel with the cdev accepts.
pub fn attach_iommufd_pt(device: BorrowedFd<'_>, pt_id: u32) -> io::Result<()> {
    let mut attach = vfio_device_attach_iommufd_pt {
        argsz: ATTACH_PT_ARGSZ,
        flags: 0,
        pt_id,
        pasid: 0,
    };
    // SAFETY: `attach` is a complete `struct vfio_device_attach_iommufd_pt` without pointers.
    unsafe { sys::ioctl_buf(device, nr::VFIO_DEVICE_ATTACH_IOMMUFD_PT(), attach.as_bytes_mut())? };
    Ok(())
}

/// `IOMMU_IOAS_ALLOC` on `/dev/iommu`: a new IO address space; returns its id.
pub fn ioas_alloc(iommufd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut alloc = iommu_ioas_alloc {
        size: size_of::<iommu_ioas_alloc>() as u32,
        flags: 0,
        out_ioas_id: 0,
    };
    // SAFETY: `alloc` is a complete `struct iommu_ioas_alloc` of `size` bytes without pointers.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_IOAS_ALLOC(), alloc.as_bytes_mut())? };
    Ok(alloc.out_ioas_id)
}

// ---------------------------------------------------------------------------------------------
// IOMMU dirty tracking: type1 container and iommufd HWPT.
// ---------------------------------------------------------------------------------------------

fn type1_dirty_flags(container: BorrowedFd<'_>, flags: u32) -> io::Result<()> {
    let mut buf = ArgBuf::new(flags, &[]);
    // SAFETY: the buffer is a complete `struct vfio_iommu_type1_dirty_bitmap` without payload.
    unsafe { sys::ioctl_buf(container, nr::VFIO_IOMMU_DIRTY_PAGES(), buf.bytes_mut())? };
    Ok(())
}

/// `VFIO_IOMMU_DIRTY_PAGES` START on a type1v2 container (v1 answers EACCES).
pub fn type1_dirty_start(container: BorrowedFd<'_>) -> io::Result<()> {
    type1_dirty_flags(container, VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
}

/// `VFIO_IOMMU_DIRTY_PAGES` STOP on a type1v2 container.
pub fn type1_dirty_stop(container: BorrowedFd<'_>) -> io::Result<()> {
    type1_dirty_flags(container, VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP)
}

/// `VFIO_IOMMU_DIRTY_PAGES` GET_BITMAP on a type1v2 container: the dirty pages of
/// `[iova, iova + size)` (which must cover whole DMA mappings) at `pgsize` (the smallest IOMMU
/// page size) into `bitmap`, which the caller zeroes first. Fails with `InvalidInput` before the
/// ioctl when the bitmap is too small.
pub fn type1_dirty_get_bitmap(
    container: BorrowedFd<'_>,
    iova: u64,
    size: u64,
    pgsize: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    check_bitmap(size, pgsize, bitmap)?;
    let get = vfio_iommu_type1_dirty_bitmap_get {
        iova,
        size,
        bitmap: vfio_bitmap {
            pgsize,
            size: (bitmap.len() as u64) * 8,
            data: bitmap.as_mut_ptr(),
        },
    };
    let mut buf = ArgBuf::new(VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, get.as_bytes());
    // SAFETY: `bitmap.data` points at `bitmap` (`bitmap.size` bytes), exclusively borrowed for
    // this call and checked above to hold one bit per page of `size` bytes.
    unsafe { sys::ioctl_buf(container, nr::VFIO_IOMMU_DIRTY_PAGES(), buf.bytes_mut())? };
    Ok(())
}

/// `IOMMU_HWPT_SET_DIRTY_TRACKING` on `/dev/iommu`: enable or disable dirty tracking of the HWPT.
pub fn hwpt_set_dirty_tracking(iommufd: BorrowedFd<'_>, hwpt_id: u32, enable: bool) -> io::Result<()> {
    let mut set = iommu_hwpt_set_dirty_tracking {
        size: size_of::<iommu_hwpt_set_dirty_tracking>() as u32,
        flags: if enable { IOMMU_HWPT_DIRTY_TRACKING_ENABLE } else { 0 },
        hwpt_id,
        __reserved: 0,
    };
    // SAFETY: `set` is a complete `struct iommu_hwpt_set_dirty_tracking` without pointers.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_HWPT_SET_DIRTY_TRACKING(), set.as_bytes_mut())? };
    Ok(())
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP` on `/dev/iommu`: the dirty pages of `[iova, iova + length)` at
/// `page_size` into `bitmap` (bits only set: zero it first). `flags` may hold
/// `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR` (1). Fails with `InvalidInput` before the ioctl when the
/// bitmap is too small.
pub fn hwpt_get_dirty_bitmap(
    iommufd: BorrowedFd<'_>,
    hwpt_id: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    flags: u32,
    bitmap: &mut [u64],
) -> io::Result<()> {
    check_bitmap(length, page_size, bitmap)?;
    let mut get = iommu_hwpt_get_dirty_bitmap {
        size: size_of::<iommu_hwpt_get_dirty_bitmap>() as u32,
        hwpt_id,
        flags,
        __reserved: 0,
        iova,
        length,
        page_size,
        data: bitmap.as_mut_ptr() as u64,
    };
    // SAFETY: `get.data` points at `bitmap`, exclusively borrowed for this call and checked above
    // to hold one bit per page of `length` bytes, which is all the kernel writes.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_HWPT_GET_DIRTY_BITMAP(), get.as_bytes_mut())? };
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// IOMMU contexts for the trackers: HWPT allocation, IOAS and type1 mappings.
// ---------------------------------------------------------------------------------------------

/// `IOMMU_GET_HW_INFO` for the iommufd device `dev_id`: its `out_capabilities`
/// (`IOMMU_HW_CAP_DIRTY_TRACKING` is 1). No driver-specific data is requested.
pub fn get_hw_capabilities(iommufd: BorrowedFd<'_>, dev_id: u32) -> io::Result<u64> {
    let mut info = iommu_hw_info {
        size: size_of::<iommu_hw_info>() as u32,
        dev_id,
        ..Default::default()
    };
    // SAFETY: `info` is a complete `struct iommu_hw_info` of `size` bytes; `data_uptr` is 0 with
    // `data_len` 0, so the kernel writes no driver data anywhere.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_GET_HW_INFO(), info.as_bytes_mut())? };
    Ok(info.out_capabilities)
}

/// `IOMMU_HWPT_ALLOC`: a kernel-managed HW page table for device `dev_id` over the IOAS `pt_id`,
/// with `flags` (`IOMMU_HWPT_ALLOC_DIRTY_TRACKING` is 2); returns the HWPT id. Attach the device
/// to it with [`attach_iommufd_pt`].
pub fn hwpt_alloc(iommufd: BorrowedFd<'_>, dev_id: u32, pt_id: u32, flags: u32) -> io::Result<u32> {
    let mut alloc = iommu_hwpt_alloc {
        size: size_of::<iommu_hwpt_alloc>() as u32,
        flags,
        dev_id,
        pt_id,
        ..Default::default()
    };
    // SAFETY: `alloc` is a complete `struct iommu_hwpt_alloc` of `size` bytes; data type NONE with
    // no data pointer.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_HWPT_ALLOC(), alloc.as_bytes_mut())? };
    Ok(alloc.out_hwpt_id)
}

/// `IOMMU_DESTROY`: free the iommufd object `id` (IOAS, HWPT).
pub fn iommu_destroy(iommufd: BorrowedFd<'_>, id: u32) -> io::Result<()> {
    let mut destroy = iommu_destroy {
        size: size_of::<iommu_destroy>() as u32,
        id,
    };
    // SAFETY: `destroy` is a complete `struct iommu_destroy` without pointers.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_DESTROY(), destroy.as_bytes_mut())? };
    Ok(())
}

/// `IOMMU_IOAS_MAP` with `IOMMU_IOAS_MAP_FIXED_IOVA | WRITEABLE | READABLE`: map
/// `[user_va, user_va + length)` at `iova` in the IOAS.
///
/// # Safety
///
/// The memory must stay mapped in this process until it is unmapped from the IOAS, and the
/// devices attached may read and write it at any time (DMA): no Rust reference to it may rely
/// on its contents not changing.
pub unsafe fn ioas_map(
    iommufd: BorrowedFd<'_>,
    ioas_id: u32,
    iova: u64,
    user_va: *mut u8,
    length: u64,
) -> io::Result<()> {
    use iommufd_bindings::{
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA as FIXED, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE as R,
        iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE as W,
    };
    let mut map = iommu_ioas_map {
        size: size_of::<iommu_ioas_map>() as u32,
        flags: FIXED | W | R,
        ioas_id,
        __reserved: 0,
        user_va: user_va as u64,
        length,
        iova,
    };
    // SAFETY: `map` is a complete `struct iommu_ioas_map`; the kernel pins the user range, whose
    // validity for DMA is the caller's contract (see above).
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_IOAS_MAP(), map.as_bytes_mut())? };
    Ok(())
}

/// `IOMMU_IOAS_UNMAP` of `[iova, iova + length)`; returns the number of bytes unmapped.
pub fn ioas_unmap(iommufd: BorrowedFd<'_>, ioas_id: u32, iova: u64, length: u64) -> io::Result<u64> {
    let mut unmap = iommu_ioas_unmap {
        size: size_of::<iommu_ioas_unmap>() as u32,
        ioas_id,
        iova,
        length,
    };
    // SAFETY: `unmap` is a complete `struct iommu_ioas_unmap` without pointers.
    unsafe { sys::ioctl_buf(iommufd, nr::IOMMU_IOAS_UNMAP(), unmap.as_bytes_mut())? };
    Ok(unmap.length)
}

/// `VFIO_IOMMU_MAP_DMA` (read and write) of `[vaddr, vaddr + size)` at `iova` on a type1 container.
///
/// # Safety
///
/// As for [`ioas_map`]: the memory must stay mapped until unmapped from the container, and the
/// device may read and write it at any time.
pub unsafe fn type1_dma_map(container: BorrowedFd<'_>, iova: u64, vaddr: *mut u8, size: u64) -> io::Result<()> {
    use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
    let mut map = vfio_iommu_type1_dma_map {
        argsz: size_of::<vfio_iommu_type1_dma_map>() as u32,
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr: vaddr as u64,
        iova,
        size,
    };
    // SAFETY: `map` is a complete `struct vfio_iommu_type1_dma_map`; the kernel pins the user
    // range, whose validity for DMA is the caller's contract (see above).
    unsafe { sys::ioctl_buf(container, nr::VFIO_IOMMU_MAP_DMA(), map.as_bytes_mut())? };
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA` of `[iova, iova + size)` on a type1 container; returns the bytes
/// unmapped. With `dirty = Some((pgsize, bitmap))` the flag `GET_DIRTY_BITMAP` asks for the dirty
/// pages of the range too (dirty tracking must be on; `pgsize` the smallest IOMMU page size), so a
/// guest unmap during migration loses nothing. Fails with `InvalidInput` before the ioctl when the
/// bitmap is too small.
pub fn type1_dma_unmap(
    container: BorrowedFd<'_>,
    iova: u64,
    size: u64,
    dirty: Option<(u64, &mut [u64])>,
) -> io::Result<u64> {
    let mut payload = [iova.to_ne_bytes(), size.to_ne_bytes()].concat();
    let flags = match dirty {
        Some((pgsize, bitmap)) => {
            check_bitmap(size, pgsize, bitmap)?;
            let b = vfio_bitmap {
                pgsize,
                size: (bitmap.len() as u64) * 8,
                data: bitmap.as_mut_ptr(),
            };
            payload.extend_from_slice(b.as_bytes());
            VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
        }
        None => 0,
    };
    let mut buf = ArgBuf::new(flags, &payload);
    // SAFETY: the buffer is a complete `struct vfio_iommu_type1_dma_unmap` (plus a `vfio_bitmap`
    // whose `data` points at the caller's bitmap, exclusively borrowed for this call and checked
    // above to hold one bit per page of `size` bytes).
    unsafe { sys::ioctl_buf(container, nr::VFIO_IOMMU_UNMAP_DMA(), buf.bytes_mut())? };
    let answer = buf.bytes_mut();
    Ok(u64::from_ne_bytes(answer[16..24].try_into().unwrap_or([0; 8])))
}

/// The type1 migration capability (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Type1MigrationCap {
    /// Capability flags.
    pub flags: u32,
    /// The page sizes dirty bitmaps can be reported in (bit n = 2^n bytes).
    pub pgsize_bitmap: u64,
    /// The largest bitmap, in bytes, one GET_BITMAP may return.
    pub max_dirty_bitmap_size: u64,
}

/// Largest `VFIO_IOMMU_GET_INFO` answer read (the capability chain is a few dozen bytes).
const MAX_IOMMU_INFO: u32 = 64 * 1024;

/// `VFIO_IOMMU_GET_INFO` on a type1 container (after `VFIO_SET_IOMMU`), walking the capability
/// chain for the migration capability (`None` when the container has none).
pub fn type1_migration_cap(container: BorrowedFd<'_>) -> io::Result<Option<Type1MigrationCap>> {
    let head = size_of::<vfio_iommu_type1_info>();
    let mut info = vfio_iommu_type1_info {
        argsz: head as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a complete `struct vfio_iommu_type1_info` of `argsz` bytes without pointers.
    unsafe { sys::ioctl_buf(container, nr::VFIO_IOMMU_GET_INFO(), info.as_bytes_mut())? };
    let len = info.argsz as usize;
    if len <= head {
        return Ok(None);
    }
    if info.argsz > MAX_IOMMU_INFO {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("VFIO_IOMMU_GET_INFO wants {len} bytes"),
        ));
    }
    let mut buf = ArgBuf::new(0, &vec![0u8; len - HEADER]);
    let bytes = buf.bytes_mut();
    // SAFETY: the buffer is a complete `struct vfio_iommu_type1_info` (argsz, flags 0, the rest
    // zero) with room for `argsz` bytes of capabilities; no pointers.
    unsafe { sys::ioctl_buf(container, nr::VFIO_IOMMU_GET_INFO(), bytes)? };
    let info: vfio_iommu_type1_info = read_pod(bytes);
    if info.flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(None);
    }
    let hdr = size_of::<vfio_info_cap_header>();
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let mut off = info.cap_offset as usize;
    // Each hop must move forward, so the walk ends; the count caps a malformed chain anyway.
    for _ in 0..64 {
        if off < head || off + hdr > len {
            break;
        }
        if u16_at(off).map(u32::from) == Some(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION) {
            use std::mem::offset_of;
            type M = vfio_iommu_type1_info_cap_migration;
            let cap = u32_at(off + offset_of!(M, flags)).and_then(|flags| {
                Some(Type1MigrationCap {
                    flags,
                    pgsize_bitmap: u64_at(off + offset_of!(M, pgsize_bitmap))?,
                    max_dirty_bitmap_size: u64_at(off + offset_of!(M, max_dirty_bitmap_size))?,
                })
            });
            return cap
                .map(Some)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "truncated migration capability"));
        }
        let next = u32_at(off + 4).unwrap_or(0) as usize;
        if next <= off {
            break;
        }
        off = next;
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Plain I/O on a data_fd or a device fd, through the seam.
// ---------------------------------------------------------------------------------------------

/// `read(2)`; EINTR is returned as an error (the caller retries).
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    sys::read(fd, buf)
}

/// `write(2)`; EINTR is returned as an error (the caller retries).
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    sys::write(fd, buf)
}

/// What [`wait_readable`] (or [`wait_writable`]) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// A `read(2)` (a `write(2)`) will not block: data, end of data, room, or an error is waiting
    /// (or the driver has no `poll` method, which the kernel reports as always ready).
    Ready,
    /// Nothing arrived (no room appeared) within the timeout.
    TimedOut,
}

/// `poll(2)` for `POLLOUT` on `fd`, waiting at most `timeout` (rounded up to whole
/// milliseconds). EINTR is returned as an error (the caller decides whether to wait again).
///
/// `POLLHUP` and `POLLERR` count as ready: the following write reports what happened. `POLLNVAL`
/// (not an open descriptor) is an `EBADF` error.
pub fn wait_writable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<Readiness> {
    let ms = timeout.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int;
    match sys::poll(fd, libc::POLLOUT, ms)? {
        0 => Ok(Readiness::TimedOut),
        revents if revents & libc::POLLNVAL != 0 => Err(io::Error::from_raw_os_error(libc::EBADF)),
        _ => Ok(Readiness::Ready),
    }
}

/// Set `O_NONBLOCK` on `fd` (`fcntl(2)` `F_GETFL`, then `F_SETFL`): a `write(2)` then takes
/// what fits and never waits for room (`EAGAIN` when there is none). VFIO drivers' data_fd
/// writes ignore the flag; a pipe or socket standing in for a data_fd honours it.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    sys::set_nonblocking(fd)
}

/// The real `fcntl(2)` pair, shared by the seam and its twin (a test stands a pipe in for a
/// data_fd, and the flag changes what its writes do).
fn set_nonblocking_one(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and touches no memory; `fd` is an open descriptor
    // borrowed for the call.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an integer argument and touches no memory; `fd` is as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `poll(2)` for `POLLIN` on `fd`, waiting at most `timeout` (rounded up to whole milliseconds).
/// EINTR is returned as an error (the caller decides whether to wait again).
///
/// `POLLHUP` and `POLLERR` count as ready: the following read reports what happened. `POLLNVAL`
/// (not an open descriptor) is an `EBADF` error.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<Readiness> {
    let ms = timeout.as_micros().div_ceil(1000).min(c_int::MAX as u128) as c_int;
    match sys::poll(fd, libc::POLLIN, ms)? {
        0 => Ok(Readiness::TimedOut),
        revents if revents & libc::POLLNVAL != 0 => Err(io::Error::from_raw_os_error(libc::EBADF)),
        _ => Ok(Readiness::Ready),
    }
}

/// `pread(2)` at `offset`.
pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    sys::pread(fd, buf, offset)
}

/// `pwrite(2)` at `offset`.
pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], offset: u64) -> io::Result<usize> {
    sys::pwrite(fd, buf, offset)
}

// ---------------------------------------------------------------------------------------------
// The seam.
// ---------------------------------------------------------------------------------------------

/// The real `poll(2)` on one fd, shared by the seam and its twin (a test stands a pipe in for a
/// data_fd, and waiting on it is what is tested).
fn poll_one(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: c_int) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid, exclusively borrowed `struct pollfd` and the count passed is 1;
    // `fd` is an open descriptor borrowed for the call.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match ret {
        r if r < 0 => Err(io::Error::last_os_error()),
        0 => Ok(0),
        _ => Ok(pfd.revents),
    }
}

/// The raw syscalls.
#[cfg(not(test))]
mod sys {
    use super::*;
    use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ptr, ioctl_with_val};

    fn check(ret: c_int) -> io::Result<c_int> {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn check_len(ret: isize) -> io::Result<usize> {
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// An ioctl whose argument is the buffer `arg`.
    ///
    /// # Safety
    ///
    /// `arg` must be the complete argument of `req` (at least as many bytes as the kernel reads or
    /// writes for it), and every pointer inside it must be valid for what the kernel does with it.
    pub(super) unsafe fn ioctl_buf(fd: BorrowedFd<'_>, req: c_ulong, arg: &mut [u8]) -> io::Result<c_int> {
        // SAFETY: `fd` is an open descriptor borrowed for the call; `arg` is exclusively borrowed
        // and, by this function's contract, large enough with valid embedded pointers.
        check(unsafe { ioctl_with_mut_ptr(&fd, req, arg.as_mut_ptr()) })
    }

    /// An ioctl whose argument is the integer `val`.
    pub(super) fn ioctl_val(fd: BorrowedFd<'_>, req: c_ulong, val: c_ulong) -> io::Result<c_int> {
        // SAFETY: `req` takes an integer argument (callers pass only such requests), so no memory is
        // accessed; `fd` is an open descriptor borrowed for the call.
        check(unsafe { ioctl_with_val(&fd, req, val) })
    }

    /// An ioctl without argument.
    pub(super) fn ioctl_none(fd: BorrowedFd<'_>, req: c_ulong) -> io::Result<c_int> {
        // SAFETY: `req` takes no argument (callers pass only such requests), so no memory is
        // accessed; `fd` is an open descriptor borrowed for the call.
        check(unsafe { ioctl(&fd, req) })
    }

    pub(super) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is exclusively borrowed and valid for `buf.len()` bytes of writes.
        check_len(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    pub(super) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is borrowed and valid for `buf.len()` bytes of reads.
        check_len(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
    }

    fn offset(off: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(off).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
    }

    /// `poll(2)` on one fd; returns its `revents` (0 when the timeout passed).
    pub(super) fn poll(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: c_int) -> io::Result<libc::c_short> {
        poll_one(fd, events, timeout_ms)
    }

    /// `O_NONBLOCK` on one fd.
    pub(super) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
        set_nonblocking_one(fd)
    }

    pub(super) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let off = offset(off)?;
        // SAFETY: `buf` is exclusively borrowed and valid for `buf.len()` bytes of writes.
        check_len(unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), off) })
    }

    pub(super) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
        let off = offset(off)?;
        // SAFETY: `buf` is borrowed and valid for `buf.len()` bytes of reads.
        check_len(unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off) })
    }
}

/// The test twin of the seam: records every call and answers from a per-thread script.
#[cfg(test)]
pub(crate) mod sys {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::os::fd::RawFd;

    /// One recorded syscall.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub(crate) enum Call {
        /// An ioctl with a buffer argument, and the buffer's bytes as passed in.
        Ioctl { fd: RawFd, req: c_ulong, arg: Vec<u8> },
        /// An ioctl with an integer argument.
        Val { fd: RawFd, req: c_ulong, val: c_ulong },
        /// An ioctl without argument.
        None { fd: RawFd, req: c_ulong },
        /// read(2) of `len` bytes.
        Read { fd: RawFd, len: usize },
        /// write(2) of `data`.
        Write { fd: RawFd, data: Vec<u8> },
        /// pread(2) of `len` bytes at `off`.
        Pread { fd: RawFd, len: usize, off: u64 },
        /// pwrite(2) of `data` at `off`.
        Pwrite { fd: RawFd, data: Vec<u8>, off: u64 },
    }

    type Reply = Box<dyn FnOnce(&mut [u8]) -> io::Result<c_int>>;

    thread_local! {
        static REPLIES: RefCell<VecDeque<Reply>> = RefCell::new(VecDeque::new());
        static CALLS: RefCell<Vec<Call>> = const { RefCell::new(Vec::new()) };
        static POLLS: RefCell<Vec<(RawFd, c_int)>> = const { RefCell::new(Vec::new()) };
    }

    /// `poll(2)` is not scripted: the twin really waits on the fd (a pipe or socketpair stands in
    /// for a data_fd that never answers; `/dev/null` is always ready) and records (fd, timeout ms)
    /// apart from the other calls, so scripts of ioctls and reads need not list the waits.
    pub(crate) fn poll(fd: BorrowedFd<'_>, events: libc::c_short, timeout_ms: c_int) -> io::Result<libc::c_short> {
        POLLS.with(|p| p.borrow_mut().push((fd.as_raw_fd(), timeout_ms)));
        super::poll_one(fd, events, timeout_ms)
    }

    /// Take the recorded waits: (fd, timeout in ms).
    pub(crate) fn take_polls() -> Vec<(RawFd, c_int)> {
        POLLS.with(|p| std::mem::take(&mut *p.borrow_mut()))
    }

    /// Not scripted either: the twin really sets the flag on the fd (it changes what a real
    /// write on a pipe standing in for a data_fd does) and records nothing.
    pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
        super::set_nonblocking_one(fd)
    }

    /// Queue the answer to the next syscall: it may write into the argument (ioctl) or the
    /// buffer (read/pread) and returns the syscall's result.
    pub(crate) fn reply(f: impl FnOnce(&mut [u8]) -> io::Result<c_int> + 'static) {
        REPLIES.with(|r| r.borrow_mut().push_back(Box::new(f)));
    }

    /// Queue a plain success returning `ret`.
    pub(crate) fn reply_ok(ret: c_int) {
        reply(move |_| Ok(ret));
    }

    /// Queue a failure with `errno`.
    pub(crate) fn reply_errno(errno: i32) {
        reply(move |_| Err(io::Error::from_raw_os_error(errno)));
    }

    /// Take the recorded calls, and check that every queued reply was used.
    pub(crate) fn take_calls() -> Vec<Call> {
        let left = REPLIES.with(|r| r.borrow().len());
        assert_eq!(left, 0, "{left} scripted replies were not used");
        CALLS.with(|c| std::mem::take(&mut *c.borrow_mut()))
    }

    /// Forget every queued reply and recorded call.
    pub(crate) fn reset() {
        REPLIES.with(|r| r.borrow_mut().clear());
        CALLS.with(|c| c.borrow_mut().clear());
        POLLS.with(|p| p.borrow_mut().clear());
    }

    fn answer(call: Call, buf: &mut [u8]) -> io::Result<c_int> {
        let reply = REPLIES.with(|r| r.borrow_mut().pop_front());
        let reply = reply.unwrap_or_else(|| panic!("unscripted syscall {call:?}"));
        CALLS.with(|c| c.borrow_mut().push(call));
        reply(buf)
    }

    fn len(r: io::Result<c_int>) -> io::Result<usize> {
        r.map(|n| usize::try_from(n).expect("scripted lengths are not negative"))
    }

    pub(crate) unsafe fn ioctl_buf(fd: BorrowedFd<'_>, req: c_ulong, arg: &mut [u8]) -> io::Result<c_int> {
        let call = Call::Ioctl {
            fd: fd.as_raw_fd(),
            req,
            arg: arg.to_vec(),
        };
        answer(call, arg)
    }

    pub(crate) fn ioctl_val(fd: BorrowedFd<'_>, req: c_ulong, val: c_ulong) -> io::Result<c_int> {
        answer(
            Call::Val {
                fd: fd.as_raw_fd(),
                req,
                val,
            },
            &mut [],
        )
    }

    pub(crate) fn ioctl_none(fd: BorrowedFd<'_>, req: c_ulong) -> io::Result<c_int> {
        answer(
            Call::None {
                fd: fd.as_raw_fd(),
                req,
            },
            &mut [],
        )
    }

    pub(crate) fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        let call = Call::Read {
            fd: fd.as_raw_fd(),
            len: buf.len(),
        };
        len(answer(call, buf))
    }

    pub(crate) fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        let call = Call::Write {
            fd: fd.as_raw_fd(),
            data: buf.to_vec(),
        };
        len(answer(call, &mut buf.to_vec()))
    }

    pub(crate) fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let call = Call::Pread {
            fd: fd.as_raw_fd(),
            len: buf.len(),
            off,
        };
        len(answer(call, buf))
    }

    pub(crate) fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<usize> {
        let call = Call::Pwrite {
            fd: fd.as_raw_fd(),
            data: buf.to_vec(),
            off,
        };
        len(answer(call, &mut buf.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::sys::{Call, reply, reply_errno, reply_ok, take_calls};
    use super::*;
    use std::ffi::CString;
    use std::fs::File;
    use std::os::fd::{AsFd, AsRawFd, IntoRawFd};

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_ne_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn put_u32(b: &mut [u8], off: usize, v: u32) {
        b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn put_u64(b: &mut [u8], off: usize, v: u64) {
        b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn null() -> File {
        File::open("/dev/null").unwrap()
    }

    /// The single recorded ioctl: (fd, request, argument bytes).
    fn one_ioctl() -> (i32, c_ulong, Vec<u8>) {
        let calls = take_calls();
        assert_eq!(calls.len(), 1, "{calls:?}");
        match calls.into_iter().next().unwrap() {
            Call::Ioctl { fd, req, arg } => (fd, req, arg),
            other => panic!("expected an ioctl, got {other:?}"),
        }
    }

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(nr::VFIO_GET_API_VERSION(), 0x3B64);
        assert_eq!(nr::VFIO_CHECK_EXTENSION(), 0x3B65);
        assert_eq!(nr::VFIO_SET_IOMMU(), 0x3B66);
        assert_eq!(nr::VFIO_GROUP_GET_STATUS(), 0x3B67);
        assert_eq!(nr::VFIO_GROUP_SET_CONTAINER(), 0x3B68);
        assert_eq!(nr::VFIO_GROUP_GET_DEVICE_FD(), 0x3B6A);
        assert_eq!(nr::VFIO_DEVICE_GET_REGION_INFO(), 0x3B6C);
        assert_eq!(nr::VFIO_DEVICE_RESET(), 0x3B6F);
        assert_eq!(nr::VFIO_DEVICE_FEATURE(), 0x3B75);
        assert_eq!(nr::VFIO_IOMMU_DIRTY_PAGES(), 0x3B75);
        assert_eq!(nr::VFIO_DEVICE_BIND_IOMMUFD(), 0x3B76);
        assert_eq!(nr::VFIO_DEVICE_ATTACH_IOMMUFD_PT(), 0x3B77);
        assert_eq!(nr::VFIO_MIG_GET_PRECOPY_INFO(), 0x3B79);
        assert_eq!(nr::IOMMU_DESTROY(), 0x3B80);
        assert_eq!(nr::IOMMU_IOAS_ALLOC(), 0x3B81);
        assert_eq!(nr::IOMMU_IOAS_MAP(), 0x3B85);
        assert_eq!(nr::IOMMU_IOAS_UNMAP(), 0x3B86);
        assert_eq!(nr::IOMMU_HWPT_ALLOC(), 0x3B89);
        assert_eq!(nr::IOMMU_GET_HW_INFO(), 0x3B8A);
        assert_eq!(nr::VFIO_IOMMU_GET_INFO(), 0x3B70);
        assert_eq!(nr::VFIO_IOMMU_MAP_DMA(), 0x3B71);
        assert_eq!(nr::VFIO_IOMMU_UNMAP_DMA(), 0x3B72);
        assert_eq!(nr::IOMMU_HWPT_SET_DIRTY_TRACKING(), 0x3B8B);
        assert_eq!(nr::IOMMU_HWPT_GET_DIRTY_BITMAP(), 0x3B8C);
    }

    #[test]
    fn set_state_passes_argsz_flags_state_and_takes_the_data_fd() {
        let dev = null();
        let data = null().into_raw_fd();
        reply(move |arg| {
            put_u32(arg, 12, data as u32);
            Ok(0)
        });
        let fd = set_device_state(dev.as_fd(), 3).unwrap().expect("a data_fd");
        assert_eq!(fd.as_raw_fd(), data);
        let (on, req, arg) = one_ioctl();
        assert_eq!(on, dev.as_raw_fd());
        assert_eq!(req, 0x3B75);
        #[rustfmt::skip]
        let expect: Vec<u8> = [16u32.to_ne_bytes(), 0x0002_0002u32.to_ne_bytes(), 3u32.to_ne_bytes(), (-1i32).to_ne_bytes()].concat();
        assert_eq!(arg, expect);

        // data_fd -1: no session.
        reply(|arg| {
            put_u32(arg, 12, u32::MAX);
            Ok(0)
        });
        assert!(set_device_state(dev.as_fd(), 1).unwrap().is_none());
        let (_, _, arg) = one_ioctl();
        assert_eq!(u32_at(&arg, 8), 1);
    }

    #[test]
    fn get_feature_flags_and_answers() {
        let dev = null();
        reply(|arg| {
            put_u64(arg, 8, 7);
            Ok(0)
        });
        assert_eq!(get_migration_flags(dev.as_fd()).unwrap(), 7);
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B75);
        assert_eq!(arg.len(), 16);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (16, 0x0001_0001));

        reply(|arg| {
            put_u32(arg, 8, 6);
            Ok(0)
        });
        assert_eq!(get_device_state(dev.as_fd()).unwrap(), 6);
        let (_, _, arg) = one_ioctl();
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (16, 0x0001_0002));

        reply(|arg| {
            put_u64(arg, 8, 96);
            Ok(0)
        });
        assert_eq!(get_mig_data_size(dev.as_fd()).unwrap(), 96);
        let (_, _, arg) = one_ioctl();
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (16, 0x0001_0009));
    }

    #[test]
    fn errno_is_kept() {
        let dev = null();
        reply_errno(libc::ENOTTY);
        let e = get_migration_flags(dev.as_fd()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        take_calls();
        reply_errno(libc::EINVAL);
        assert_eq!(
            device_reset(dev.as_fd()).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert_eq!(
            take_calls(),
            vec![Call::None {
                fd: dev.as_raw_fd(),
                req: 0x3B6F
            }]
        );
    }

    #[test]
    fn precopy_info_is_24_bytes_with_zero_flags_on_the_data_fd() {
        let data = null();
        reply(|arg| {
            put_u32(arg, 4, 0xdead); // an old driver echoing garbage flags must not matter
            put_u64(arg, 8, 24);
            put_u64(arg, 16, 5);
            Ok(0)
        });
        let answer = get_precopy_info(data.as_fd(), false).unwrap();
        assert_eq!(
            answer,
            PrecopyAnswer {
                initial_bytes: 24,
                dirty_bytes: 5,
                reinit: false
            }
        );
        let (on, req, arg) = one_ioctl();
        assert_eq!((on, req), (data.as_raw_fd(), 0x3B79));
        assert_eq!(arg.len(), 24);
        assert_eq!(
            (u32_at(&arg, 0), u32_at(&arg, 4), u64_at(&arg, 8), u64_at(&arg, 16)),
            (24, 0, 0, 0)
        );
    }

    #[test]
    fn precopy_info_v2_probe_opt_in_and_reinit() {
        let dev = null();
        // PROBE | SET of feature 12, no data: offered.
        reply_ok(0);
        assert!(probe_precopy_info_v2(dev.as_fd()).unwrap());
        let (on, req, arg) = one_ioctl();
        assert_eq!((on, req), (dev.as_raw_fd(), 0x3B75));
        assert_eq!((arg.len(), u32_at(&arg, 0), u32_at(&arg, 4)), (8, 8, 0x0006_000c));
        // Kernels and drivers without it: not offered, not an error.
        for errno in [libc::ENOTTY, libc::EINVAL] {
            reply_errno(errno);
            assert!(!probe_precopy_info_v2(dev.as_fd()).unwrap());
            take_calls();
        }
        reply_errno(libc::EIO);
        assert_eq!(
            probe_precopy_info_v2(dev.as_fd()).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        take_calls();
        // The opt-in: SET of feature 12, no data.
        reply_ok(0);
        enable_precopy_info_v2(dev.as_fd()).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!(
            (req, arg.len(), u32_at(&arg, 0), u32_at(&arg, 4)),
            (0x3B75, 8, 8, 0x0002_000c)
        );
        // Opted in: REINIT counts; the flags passed are still 0.
        let data = null();
        reply(|arg| {
            put_u32(arg, 4, 1);
            put_u64(arg, 8, 4096);
            Ok(0)
        });
        assert!(get_precopy_info(data.as_fd(), true).unwrap().reinit);
        let (_, _, arg) = one_ioctl();
        assert_eq!(u32_at(&arg, 4), 0);
        reply(|arg| {
            put_u64(arg, 8, 4096);
            Ok(0)
        });
        assert!(!get_precopy_info(data.as_fd(), true).unwrap().reinit);
        take_calls();
    }

    #[test]
    fn dma_logging_start_passes_the_ranges() {
        let dev = null();
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let seen2 = seen.clone();
        reply(move |arg| {
            let ptr = u64_at(arg, 24) as *const vfio_device_feature_dma_logging_range;
            let n = u32_at(arg, 16) as usize;
            // SAFETY: the pointer is the ranges vector of `dma_logging_start`, alive during the call.
            let ranges = unsafe { std::slice::from_raw_parts(ptr, n) };
            *seen2.borrow_mut() = ranges.iter().map(|r| (r.iova, r.length)).collect();
            put_u64(arg, 8, 0x2000); // the device chose 8 KiB
            Ok(0)
        });
        let chosen = dma_logging_start(dev.as_fd(), 0x1000, &[(0, 0x10000), (0x100000, 0x1000)]).unwrap();
        assert_eq!(chosen, 0x2000);
        assert_eq!(*seen.borrow(), vec![(0, 0x10000), (0x100000, 0x1000)]);
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B75);
        assert_eq!(arg.len(), 32);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (32, 0x0002_0006));
        assert_eq!((u64_at(&arg, 8), u32_at(&arg, 16), u32_at(&arg, 20)), (0x1000, 2, 0));
    }

    #[test]
    fn dma_logging_report_and_stop() {
        let dev = null();
        let mut bitmap = vec![0u64; 2];
        let expect_ptr = bitmap.as_mut_ptr() as u64;
        reply(move |arg| {
            let ptr = u64_at(arg, 32) as *mut u64;
            // SAFETY: the pointer is the caller's bitmap of 2 words, exclusively lent for the call.
            unsafe { *ptr.add(1) = 1 << 3 };
            Ok(0)
        });
        // 100 pages of 4 KiB: 2 words.
        dma_logging_report(dev.as_fd(), 0x10000, 100 * 4096, 4096, &mut bitmap).unwrap();
        assert_eq!(bitmap, vec![0, 8]);
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B75);
        assert_eq!(arg.len(), 40);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (40, 0x0001_0008));
        assert_eq!(
            (u64_at(&arg, 8), u64_at(&arg, 16), u64_at(&arg, 24), u64_at(&arg, 32)),
            (0x10000, 100 * 4096, 4096, expect_ptr)
        );

        // 129 pages need 3 words: refused before any syscall.
        let e = dma_logging_report(dev.as_fd(), 0, 129 * 4096, 4096, &mut bitmap).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(take_calls().is_empty());

        reply_ok(0);
        dma_logging_stop(dev.as_fd()).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B75);
        assert_eq!(arg, [8u32.to_ne_bytes(), 0x0002_0007u32.to_ne_bytes()].concat());
    }

    #[test]
    fn region_info_request_and_answer() {
        let dev = null();
        reply(|arg| {
            put_u32(arg, 4, 3);
            put_u64(arg, 16, 8);
            put_u64(arg, 24, 1 << 40);
            Ok(0)
        });
        let info = get_region_info(dev.as_fd(), 1).unwrap();
        assert_eq!(
            info,
            RegionInfo {
                flags: 3,
                size: 8,
                offset: 1 << 40
            }
        );
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B6C);
        assert_eq!((arg.len(), u32_at(&arg, 0), u32_at(&arg, 8)), (32, 32, 1));
    }

    #[test]
    fn opening_ioctls() {
        let group = null();
        let container = null();
        reply(|arg| {
            put_u32(arg, 4, 1);
            Ok(0)
        });
        assert_eq!(group_status(group.as_fd()).unwrap(), 1);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg), (0x3B67, [8u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat()));

        reply_ok(0);
        group_set_container(group.as_fd(), container.as_fd()).unwrap();
        let (on, req, arg) = one_ioctl();
        assert_eq!((on, req), (group.as_raw_fd(), 0x3B68));
        assert_eq!(arg, container.as_raw_fd().to_ne_bytes());

        reply_ok(1);
        assert!(check_extension(container.as_fd(), 3).unwrap());
        reply_ok(0);
        set_iommu(container.as_fd(), 3).unwrap();
        let fd = container.as_raw_fd();
        assert_eq!(
            take_calls(),
            vec![
                Call::Val {
                    fd,
                    req: 0x3B65,
                    val: 3
                },
                Call::Val {
                    fd,
                    req: 0x3B66,
                    val: 3
                }
            ]
        );

        let devfd = null().into_raw_fd();
        reply_ok(devfd);
        let name = CString::new("0000:00:04.0").unwrap();
        let owned = group_get_device_fd(group.as_fd(), &name).unwrap();
        assert_eq!(owned.as_raw_fd(), devfd);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg), (0x3B6A, b"0000:00:04.0\0".to_vec()));

        let dev = null();
        let iommu = null();
        reply(|arg| {
            put_u32(arg, 12, 5);
            Ok(0)
        });
        assert_eq!(bind_iommufd(dev.as_fd(), iommu.as_fd()).unwrap(), 5);
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B76);
        assert_eq!(
            (u32_at(&arg, 0), u32_at(&arg, 4), u32_at(&arg, 8)),
            (16, 0, iommu.as_raw_fd() as u32)
        );

        reply(|arg| {
            put_u32(arg, 8, 2);
            Ok(0)
        });
        assert_eq!(ioas_alloc(iommu.as_fd()).unwrap(), 2);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len(), u32_at(&arg, 0), u32_at(&arg, 4)), (0x3B81, 12, 12, 0));

        reply_ok(0);
        attach_iommufd_pt(dev.as_fd(), 2).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B77);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4), u32_at(&arg, 8)), (12, 0, 2));
    }

    #[test]
    fn iommu_dirty_tracking_ioctls() {
        let container = null();
        reply_ok(0);
        type1_dirty_start(container.as_fd()).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg), (0x3B75, [8u32.to_ne_bytes(), 1u32.to_ne_bytes()].concat()));
        reply_ok(0);
        type1_dirty_stop(container.as_fd()).unwrap();
        let (_, _, arg) = one_ioctl();
        assert_eq!(u32_at(&arg, 4), 2);

        let mut bitmap = vec![0u64; 1];
        let ptr = bitmap.as_mut_ptr() as u64;
        reply_ok(0);
        type1_dirty_get_bitmap(container.as_fd(), 0x100000, 64 * 4096, 4096, &mut bitmap).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B75);
        assert_eq!(arg.len(), 48);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (48, 4));
        assert_eq!(
            (
                u64_at(&arg, 8),
                u64_at(&arg, 16),
                u64_at(&arg, 24),
                u64_at(&arg, 32),
                u64_at(&arg, 40)
            ),
            (0x100000, 64 * 4096, 4096, 8, ptr)
        );
        let e = type1_dirty_get_bitmap(container.as_fd(), 0, 65 * 4096, 4096, &mut bitmap).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(take_calls().is_empty());

        let iommu = null();
        reply_ok(0);
        hwpt_set_dirty_tracking(iommu.as_fd(), 9, true).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B8B);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4), u32_at(&arg, 8)), (16, 1, 9));

        reply_ok(0);
        hwpt_get_dirty_bitmap(iommu.as_fd(), 9, 1 << 24, 64 * 2048, 2048, 0, &mut bitmap).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!(req, 0x3B8C);
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4), u32_at(&arg, 8)), (48, 9, 0));
        assert_eq!(
            (u64_at(&arg, 16), u64_at(&arg, 24), u64_at(&arg, 32), u64_at(&arg, 40)),
            (1 << 24, 64 * 2048, 2048, ptr)
        );
        let e = hwpt_get_dirty_bitmap(iommu.as_fd(), 9, 0, 4096, 3000, 0, &mut bitmap).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(take_calls().is_empty());
    }

    #[test]
    fn iommufd_context_ioctls() {
        let iommu = null();
        reply(|arg| {
            put_u64(arg, 32, 1);
            Ok(0)
        });
        assert_eq!(get_hw_capabilities(iommu.as_fd(), 4).unwrap(), 1);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len()), (0x3B8A, 40));
        assert_eq!(
            (u32_at(&arg, 0), u32_at(&arg, 4), u32_at(&arg, 8), u32_at(&arg, 12)),
            (40, 0, 4, 0)
        );

        reply(|arg| {
            put_u32(arg, 16, 11);
            Ok(0)
        });
        assert_eq!(hwpt_alloc(iommu.as_fd(), 4, 2, 2).unwrap(), 11);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len()), (0x3B89, 48));
        assert_eq!(
            (
                u32_at(&arg, 0),
                u32_at(&arg, 4),
                u32_at(&arg, 8),
                u32_at(&arg, 12),
                u32_at(&arg, 24)
            ),
            (48, 2, 4, 2, 0)
        );

        let mut mem = vec![0u8; 8192];
        let va = mem.as_mut_ptr();
        reply_ok(0);
        // SAFETY: the syscall twin maps nothing.
        unsafe { ioas_map(iommu.as_fd(), 2, 1 << 24, va, 8192).unwrap() };
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len()), (0x3B85, 40));
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4), u32_at(&arg, 8)), (40, 7, 2));
        assert_eq!(
            (u64_at(&arg, 16), u64_at(&arg, 24), u64_at(&arg, 32)),
            (va as u64, 8192, 1 << 24)
        );

        reply_ok(0);
        assert_eq!(ioas_unmap(iommu.as_fd(), 2, 1 << 24, 8192).unwrap(), 8192);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len(), u32_at(&arg, 4)), (0x3B86, 24, 2));

        reply_ok(0);
        iommu_destroy(iommu.as_fd(), 11).unwrap();
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg), (0x3B80, [8u32.to_ne_bytes(), 11u32.to_ne_bytes()].concat()));
    }

    #[test]
    fn type1_mapping_ioctls() {
        let container = null();
        let mut mem = vec![0u8; 4096];
        let va = mem.as_mut_ptr();
        reply_ok(0);
        // SAFETY: the syscall twin maps nothing.
        unsafe { type1_dma_map(container.as_fd(), 0x10000, va, 4096).unwrap() };
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len()), (0x3B71, 32));
        assert_eq!((u32_at(&arg, 0), u32_at(&arg, 4)), (32, 3));
        assert_eq!(
            (u64_at(&arg, 8), u64_at(&arg, 16), u64_at(&arg, 24)),
            (va as u64, 0x10000, 4096)
        );

        reply_ok(0);
        assert_eq!(type1_dma_unmap(container.as_fd(), 0x10000, 4096, None).unwrap(), 4096);
        let (_, req, arg) = one_ioctl();
        assert_eq!((req, arg.len(), u32_at(&arg, 0), u32_at(&arg, 4)), (0x3B72, 24, 24, 0));

        let mut bitmap = vec![0u64; 1];
        let ptr = bitmap.as_mut_ptr() as u64;
        reply(|arg| {
            put_u64(arg, 16, 0x2000); // the kernel reports what it unmapped
            Ok(0)
        });
        let n = type1_dma_unmap(container.as_fd(), 0x10000, 0x4000, Some((4096, &mut bitmap))).unwrap();
        assert_eq!(n, 0x2000);
        let (_, _, arg) = one_ioctl();
        assert_eq!((arg.len(), u32_at(&arg, 0), u32_at(&arg, 4)), (48, 48, 1));
        assert_eq!((u64_at(&arg, 24), u64_at(&arg, 32), u64_at(&arg, 40)), (4096, 8, ptr));
        let e = type1_dma_unmap(container.as_fd(), 0, 65 * 4096, Some((4096, &mut bitmap))).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(take_calls().is_empty());
    }

    #[test]
    fn type1_migration_capability_is_found_in_the_chain() {
        let container = null();
        // First call: the kernel asks for 24 + 16 (iova-ranges-like cap) + 32 (migration cap).
        reply(|arg| {
            put_u32(arg, 0, 72);
            put_u32(arg, 4, VFIO_IOMMU_INFO_CAPS | 1);
            Ok(0)
        });
        reply(|arg| {
            assert_eq!(arg.len(), 72);
            put_u32(arg, 4, VFIO_IOMMU_INFO_CAPS | 1);
            put_u32(arg, 16, 24); // cap_offset
            put_u32(arg, 24, 4); // id 4 (some other cap), version 1, next 40
            put_u32(arg, 28, 40);
            put_u32(arg, 40, 2 | (1 << 16)); // migration cap, version 1, next 0
            put_u32(arg, 44, 0);
            put_u32(arg, 48, 0);
            put_u64(arg, 56, 0x1000);
            put_u64(arg, 64, 256 << 20);
            Ok(0)
        });
        let cap = type1_migration_cap(container.as_fd()).unwrap();
        assert_eq!(
            cap,
            Some(Type1MigrationCap {
                flags: 0,
                pgsize_bitmap: 0x1000,
                max_dirty_bitmap_size: 256 << 20
            })
        );
        let calls = take_calls();
        assert_eq!(calls.len(), 2);
        match &calls[0] {
            Call::Ioctl { req, arg, .. } => assert_eq!((*req, arg.len(), u32_at(arg, 0)), (0x3B70, 24, 24)),
            other => panic!("{other:?}"),
        }

        // No capabilities at all.
        reply_ok(0);
        assert_eq!(type1_migration_cap(container.as_fd()).unwrap(), None);
        take_calls();
        // An absurd size is refused without allocating it.
        reply(|arg| {
            put_u32(arg, 0, u32::MAX);
            Ok(0)
        });
        assert!(type1_migration_cap(container.as_fd()).is_err());
        take_calls();
    }

    #[test]
    fn bitmap_words_rounds_up() {
        assert_eq!(bitmap_words(4096, 4096), Some(1));
        assert_eq!(bitmap_words(64 * 4096, 4096), Some(1));
        assert_eq!(bitmap_words(64 * 4096 + 1, 4096), Some(2));
        assert_eq!(bitmap_words(0, 4096), Some(0));
        assert_eq!(bitmap_words(4096, 0), None);
        assert_eq!(bitmap_words(4096, 3000), None);
    }
}
