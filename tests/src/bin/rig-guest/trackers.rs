//! The engine's dirty trackers on the real kernel: the iommufd HWPT tracker against the selftest
//! mock domain, the type1 tracker on an mdev-only container and on edu behind the Intel IOMMU,
//! device DMA logging on mtty, and the choice between them (`dirty::select`).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use vfio_migration::MigrationDevice;
use vfio_migration::dirty::{
    Candidates, DeviceLogConfig, DeviceLogTracker, DirtyRange, DirtyTracker, HwptConfig, HwptTracker, KernelHwpt,
    KernelType1, Method, Policy, RangeTable, SelectOptions, Type1Config, Type1Tracker, select,
};
use vfio_migration::kernel::{KernelDevice, OpenMode, OpenedDevice, ioctls, open_device};

use crate::iommufd_mock::{EXTRA_PAGES, MOCK_APERTURE_START, Mock, PAGE, PAGES};
use crate::mtty::Mtty;
use crate::sys::Buffer;
use crate::{Outcome, ensure};

/// The ranges of the 4 KiB pages `pages` (indices from `base`), coalesced.
fn pages_table(base: u64, pages: &[u64]) -> RangeTable {
    RangeTable::from_ranges(pages.iter().map(|p| DirtyRange::new(base + p * PAGE, PAGE)))
}

fn show(t: &RangeTable) -> String {
    t.iter()
        .map(|r| format!("{:#x}+{:#x}", r.gpa, r.length))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The HWPT tracker on the mock domain: exactly the pages marked, nothing twice, and the dirty
/// pages of an area unmapped while tracking are kept for the next report.
pub fn hwpt_mock() -> Outcome {
    let mock = Mock::new()?;
    let first = DirtyRange::new(MOCK_APERTURE_START, PAGES * PAGE);
    let second = DirtyRange::new(first.end(), EXTRA_PAGES * PAGE);
    let memory = RangeTable::from_ranges([first, second]);
    let ops = KernelHwpt::new(mock.iommufd.as_fd(), mock.hwpt, mock.ioas);
    let mut t = HwptTracker::new(ops, HwptConfig::default());
    t.start(&memory).map_err(|e| format!("start: {e}"))?;
    let r = t.report().map_err(|e| format!("report: {e}"))?;
    ensure!(r.is_empty(), "dirty before any DMA: {}", show(&r));

    let marked = [3, 4, 5, 90, 255, 256, 270];
    mock.mark(&marked)?;
    let r = t.report().map_err(|e| format!("report: {e}"))?;
    let want = pages_table(MOCK_APERTURE_START, &marked);
    ensure!(r == want, "report {}, want {}", show(&r), show(&want));
    ensure!(
        r.effective_size() == marked.len() as u64 * PAGE,
        "size {}",
        r.effective_size()
    );
    let r = t.report().map_err(|e| format!("report: {e}"))?;
    ensure!(r.is_empty(), "second report not empty: {}", show(&r));

    // A page of the second area is written, then the area is unmapped: the page is not lost.
    mock.mark(&[260, 7])?;
    t.unmap(second).map_err(|e| format!("unmap while tracking: {e}"))?;
    let r = t.report().map_err(|e| format!("report after unmap: {e}"))?;
    let want = pages_table(MOCK_APERTURE_START, &[7, 260]);
    ensure!(r == want, "report after unmap {}, want {}", show(&r), show(&want));
    t.stop().map_err(|e| format!("stop: {e}"))?;
    Ok(())
}

/// A buffer mapped at `iova` in a device's type1 container.
struct Mapped {
    opened: OpenedDevice,
    _buf: Buffer,
    range: DirtyRange,
}

/// Open `sysfs` through its group and map `pages` pages at `iova` in its container.
fn map_type1(sysfs: &Path, iova: u64, pages: u64) -> Result<Mapped, String> {
    let buf = Buffer::new((pages * PAGE) as usize).map_err(|e| format!("mmap: {e}"))?;
    let opened = open_device(sysfs, OpenMode::Group).map_err(|e| format!("open: {e}"))?;
    let container = opened.handles.container_fd().ok_or("no container on the group path")?;
    // SAFETY: `buf` outlives the container (`Mapped` drops `opened` first) and nothing here reads
    // it while the device may write it.
    unsafe { ioctls::type1_dma_map(container, iova, buf.ptr.cast(), pages * PAGE) }
        .map_err(|e| format!("VFIO_IOMMU_MAP_DMA: {e}"))?;
    Ok(Mapped {
        opened,
        _buf: buf,
        range: DirtyRange::new(iova, pages * PAGE),
    })
}

fn type1_tracker(m: &Mapped) -> Result<Type1Tracker<KernelType1<std::os::fd::BorrowedFd<'_>>>, String> {
    let container = m
        .opened
        .handles
        .container_fd()
        .ok_or("no container on the group path")?;
    let mut t = Type1Tracker::new(KernelType1::new(container, "/dev/vfio/vfio"), Type1Config::default());
    t.set_mappings([m.range]);
    Ok(t)
}

fn env_path(var: &str) -> Result<PathBuf, String> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{var} is not set"))
}

fn edu() -> Result<PathBuf, String> {
    let bdf = std::env::var("EDU_BDF").map_err(|_| "EDU_BDF is not set".to_string())?;
    Ok(PathBuf::from("/sys/bus/pci/devices").join(bdf))
}

/// The type1 tracker on an mdev-only container: nothing dirty, before or after an unmap.
pub fn type1_mdev() -> Outcome {
    let m = map_type1(&env_path("MTTY_A")?, 1 << 20, 32)?;
    let mut t = type1_tracker(&m)?;
    let memory = RangeTable::from_ranges([m.range]);
    t.start(&memory).map_err(|e| format!("start: {e}"))?;
    for round in 1..=2 {
        let r = t.report().map_err(|e| format!("report {round}: {e}"))?;
        ensure!(r.is_empty(), "report {round}: {}", show(&r));
    }
    t.unmap(m.range).map_err(|e| format!("unmap while tracking: {e}"))?;
    let r = t.report().map_err(|e| format!("report after unmap: {e}"))?;
    ensure!(r.is_empty(), "report after unmap: {}", show(&r));
    t.stop().map_err(|e| format!("stop: {e}"))
}

/// The type1 tracker on edu behind the Intel IOMMU: all mapped memory, every round, and again
/// for a mapping removed while tracking.
pub fn type1_edu() -> Outcome {
    let m = map_type1(&edu()?, 1 << 20, 16)?;
    let mut t = type1_tracker(&m)?;
    let memory = RangeTable::from_ranges([m.range]);
    t.start(&memory).map_err(|e| format!("start: {e}"))?;
    for round in 1..=2 {
        let r = t.report().map_err(|e| format!("report {round}: {e}"))?;
        ensure!(
            r == memory,
            "report {round}: {}, want all of {}",
            show(&r),
            show(&memory)
        );
    }
    t.unmap(m.range).map_err(|e| format!("unmap while tracking: {e}"))?;
    let r = t.report().map_err(|e| format!("report after unmap: {e}"))?;
    ensure!(r == memory, "report after unmap: {}, want {}", show(&r), show(&memory));
    t.stop().map_err(|e| format!("stop: {e}"))
}

/// mtty's DMA logging is chosen over type1 (every device supports it) and reports nothing: mtty
/// never writes guest memory. On kernels where mtty's REPORT fails (EOPNOTSUPP), the policy
/// decides: fail the migration or degrade to all-dirty, never an empty report.
pub fn select_mtty() -> Outcome {
    let mut a = Mtty::open("MTTY_A", OpenMode::Group)?;
    let memory = RangeTable::from_ranges([DirtyRange::new(1 << 20, 32 * PAGE)]);
    let devices: Vec<&mut KernelDevice> = vec![a.dev()];
    let candidates = Candidates {
        device_log: Ok(Box::new(DeviceLogTracker::new(devices, DeviceLogConfig::default()))),
        iommu: Err("not offered in this scenario".into()),
    };
    let options = SelectOptions {
        allow_all_dirty: false,
        policy: Policy::DegradeToAllDirty,
    };
    let mut chosen = select(candidates, &memory, options).map_err(|e| format!("select: {e}"))?;
    ensure!(chosen.method == Method::DeviceLog, "chose {:?}", chosen.method);
    let r = chosen.tracker.report().map_err(|e| format!("report: {e}"))?;
    match chosen.tracker.degraded() {
        None => ensure!(r.is_empty(), "mtty's DMA log reported {}", show(&r)),
        Some(why) => {
            println!("rig-guest: tracker-select-mtty: degraded to all-dirty: {why}");
            ensure!(
                r == memory,
                "degraded report {}, want all of {}",
                show(&r),
                show(&memory)
            );
        }
    }
    chosen.tracker.stop().map_err(|e| format!("stop: {e}"))?;
    drop(chosen);
    a.expect_state(vfio_migration::DeviceState::Running)
}

/// edu (vfio-pci) has no DMA logging: select rules it out naming the device, and takes type1.
pub fn select_edu_type1() -> Outcome {
    let path = edu()?;
    let mut m = map_type1(&path, 1 << 20, 16)?;
    let memory = RangeTable::from_ranges([m.range]);
    let range = m.range;
    let (device, handles) = (&mut m.opened.device, &m.opened.handles);
    let name = device.name().to_string();
    let container = handles.container_fd().ok_or("no container on the group path")?;
    let mut type1 = Type1Tracker::new(KernelType1::new(container, "/dev/vfio/vfio"), Type1Config::default());
    type1.set_mappings([range]);
    let candidates = Candidates {
        device_log: Ok(Box::new(DeviceLogTracker::new(
            vec![device],
            DeviceLogConfig::default(),
        ))),
        iommu: Ok(Box::new(type1)),
    };
    let mut chosen = select(candidates, &memory, SelectOptions::default()).map_err(|e| format!("select: {e}"))?;
    ensure!(chosen.method == Method::Iommu, "chose {:?}", chosen.method);
    println!("rig-guest: tracker-select-edu: rejected {:?}", chosen.rejected);
    ensure!(
        chosen.rejected.iter().any(|r| r.who.contains(&name)),
        "the rejection does not name {name}: {:?}",
        chosen.rejected
    );
    let r = chosen.tracker.report().map_err(|e| format!("report: {e}"))?;
    ensure!(r == memory, "report {}, want all of {}", show(&r), show(&memory));
    chosen.tracker.stop().map_err(|e| format!("stop: {e}"))
}

/// edu through iommufd: no DMA logging and no dirty-tracking HWPT (QEMU 7.2's vIOMMU): select
/// refuses unless all-dirty is allowed, and then reports everything.
pub fn select_edu_none() -> Outcome {
    const EOPNOTSUPP: i32 = 95;
    let path = edu()?;
    let mut opened = open_device(&path, OpenMode::Cdev).map_err(|e| format!("open (cdev): {e}"))?;
    let name = opened.device.name().to_string();
    let iommufd = opened.handles.iommufd().ok_or("no iommufd")?;
    let dev_id = opened.handles.dev_id().ok_or("no device id")?;
    let ioas = opened.handles.ioas_id().ok_or("no IOAS")?;
    let why_no_hwpt = match ioctls::hwpt_alloc(iommufd, dev_id, ioas, crate::iommufd_mock::HWPT_ALLOC_DIRTY) {
        Ok(id) => return Err(format!("a dirty-tracking HWPT ({id}) was allocated")),
        Err(e) if e.raw_os_error() == Some(EOPNOTSUPP) => format!("no dirty-tracking HWPT: {e}"),
        Err(e) => return Err(format!("HWPT_ALLOC: want EOPNOTSUPP, got {e}")),
    };
    let memory = RangeTable::from_ranges([DirtyRange::new(1 << 20, 16 * PAGE)]);
    for allow_all_dirty in [false, true] {
        let candidates = Candidates {
            device_log: Ok(Box::new(DeviceLogTracker::new(
                vec![&mut opened.device],
                DeviceLogConfig::default(),
            ))),
            iommu: Err(why_no_hwpt.clone()),
        };
        let options = SelectOptions {
            allow_all_dirty,
            policy: Policy::FailMigration,
        };
        match select(candidates, &memory, options) {
            Err(e) if !allow_all_dirty => {
                println!("rig-guest: tracker-select-edu-none: refused as expected: {e}");
                ensure!(e.to_string().contains(&name), "the refusal does not name {name}: {e}");
            }
            Ok(s) if !allow_all_dirty => return Err(format!("chose {:?} without permission", s.method)),
            Ok(mut s) => {
                ensure!(s.method == Method::AllDirty, "chose {:?}", s.method);
                let r = s.tracker.report().map_err(|e| format!("report: {e}"))?;
                ensure!(r == memory, "all-dirty report {}", show(&r));
            }
            Err(e) => return Err(format!("all-dirty allowed, yet: {e}")),
        }
    }
    Ok(())
}
