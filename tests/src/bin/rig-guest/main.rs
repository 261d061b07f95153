//! `rig-guest`: the guest test program of the real-kernel test rig (`tests/kernel/run`).
//!
//! It runs inside a small Linux kernel booted under QEMU, after `/init` created the mtty mediated
//! devices, and exercises real VFIO devices through the engine's public API. Every scenario prints
//! one line `RIG <name> PASS` or `RIG <name> FAIL: <reason>`; before them it prints
//! `RIG-PLAN <n>`, the number of scenarios it is about to run, so the host notices a scenario that
//! never reported. The exit status is non-zero when a scenario failed.
//!
//! Environment (set by `/init`): `RIG_BOOT` (`plain` or `iommu`), `MTTY_A`, `MTTY_B` (sysfs paths
//! of two mtty-2 devices), `MTTY_C`, `MTTY_D` (two mtty-1 devices), `EDU_BDF` (the iommu boot's edu
//! device, bound to vfio-pci).
//!
//! A VFIO group can be open in one place at a time, and mtty keeps its migration state across
//! close and open: every scenario opens the devices it needs and closes them when it ends, and
//! [`mtty::Mtty::open`] resets a device an earlier scenario left outside RUNNING.

mod ch;
mod cli;
mod edu;
mod iommufd_mock;
mod live;
mod migration;
mod mtty;
mod stream;
mod sys;
mod trackers;
mod type1;

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vfio_migration::kernel::OpenMode;

/// What a scenario returns: `Err` carries the reason of the failure.
type Outcome = Result<(), String>;

/// A named scenario.
struct Scenario {
    name: String,
    run: Box<dyn Fn() -> Outcome>,
}

impl Scenario {
    fn new(name: impl Into<String>, run: impl Fn() -> Outcome + 'static) -> Self {
        Self {
            name: name.into(),
            run: Box::new(run),
        }
    }
}

/// Fail the scenario with a formatted reason unless the condition holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}
pub(crate) use ensure;

/// The value of an environment variable the rig's `/init` sets.
fn env_path(name: &str) -> Result<PathBuf, String> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("environment variable {name} is not set"))
}

/// The mdev type name of a mediated device (the last component of its `mdev_type` link).
fn mdev_type(dev: &Path) -> Result<String, String> {
    let link = std::fs::read_link(dev.join("mdev_type")).map_err(|e| format!("{}/mdev_type: {e}", dev.display()))?;
    link.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{}/mdev_type has no name", dev.display()))
}

/// The IOMMU group number of a device (the last component of its `iommu_group` link).
fn iommu_group(dev: &Path) -> Result<String, String> {
    let link =
        std::fs::read_link(dev.join("iommu_group")).map_err(|e| format!("{}/iommu_group: {e}", dev.display()))?;
    link.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{}/iommu_group has no name", dev.display()))
}

/// The plain boot came up: VFIO, iommufd and the three mtty mdevs with their group and cdev nodes.
fn boot_plain() -> Outcome {
    for node in ["/dev/vfio/vfio", "/dev/iommu"] {
        ensure!(Path::new(node).exists(), "{node} is missing");
    }
    for (var, want) in [("MTTY_A", "mtty-2"), ("MTTY_B", "mtty-2"), ("MTTY_C", "mtty-1")] {
        let dev = env_path(var)?;
        ensure!(dev.is_dir(), "{var}={} is not a directory", dev.display());
        let ty = mdev_type(&dev)?;
        ensure!(ty == want, "{var} has mdev type {ty}, want {want}");
        let group = iommu_group(&dev)?;
        let node = Path::new("/dev/vfio").join(&group);
        ensure!(node.exists(), "{var}: group node {} is missing", node.display());
        let cdevs: Vec<_> = std::fs::read_dir(dev.join("vfio-dev"))
            .map_err(|e| format!("{var}: {}/vfio-dev: {e}", dev.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        ensure!(cdevs.len() == 1, "{var}: want one vfio-dev entry, found {cdevs:?}");
        let cdev = Path::new("/dev/vfio/devices").join(&cdevs[0]);
        ensure!(cdev.exists(), "{var}: cdev node {} is missing", cdev.display());
    }
    Ok(())
}

/// The iommu boot came up: the edu device is bound to vfio-pci and its group node exists.
fn boot_iommu() -> Outcome {
    let bdf = std::env::var("EDU_BDF").map_err(|_| "EDU_BDF is not set".to_string())?;
    let dev = Path::new("/sys/bus/pci/devices").join(&bdf);
    let driver = std::fs::read_link(dev.join("driver")).map_err(|e| format!("{bdf}: driver link: {e}"))?;
    ensure!(
        driver.ends_with("vfio-pci"),
        "{bdf} is bound to {}, want vfio-pci",
        driver.display()
    );
    let group = iommu_group(&dev)?;
    let node = Path::new("/dev/vfio").join(&group);
    ensure!(node.exists(), "{bdf}: group node {} is missing", node.display());
    ensure!(Path::new("/dev/vfio/vfio").exists(), "/dev/vfio/vfio is missing");
    Ok(())
}

/// The scenarios of one boot, in order.
fn scenarios(boot: &str) -> Vec<Scenario> {
    use OpenMode::{Cdev, Group};
    if boot == "iommu" {
        return vec![
            Scenario::new("boot-iommu", boot_iommu),
            Scenario::new("edu-no-migration", edu::no_migration),
            // mdevs with type1 while a real (emulated) IOMMU is present.
            Scenario::new("iommu-stop-copy", || migration::stop_copy(Group, Group)),
            Scenario::new("type1-edu-all-dirty", type1::edu_all_dirty),
            Scenario::new("edu-iommufd-no-dirty", type1::edu_iommufd_no_dirty),
            Scenario::new("tracker-type1-edu", trackers::type1_edu),
            Scenario::new("tracker-select-edu-type1", trackers::select_edu_type1),
            Scenario::new("tracker-select-edu-none", trackers::select_edu_none),
        ];
    }
    let mut list = vec![
        Scenario::new("boot", boot_plain),
        Scenario::new("probe", migration::probe),
        Scenario::new("stop-copy", || migration::stop_copy(Group, Group)),
        Scenario::new("pre-copy", || migration::pre_copy(Group, Group)),
    ];
    for (from, to) in migration::arcs() {
        list.push(Scenario::new(format!("arc-{from}-{to}"), move || {
            migration::arc(from, to)
        }));
    }
    list.extend([
        Scenario::new("small-io", migration::small_io),
        Scenario::new("bad-input-raw", migration::bad_input_raw),
        Scenario::new("bad-input-load", migration::bad_input_load),
        Scenario::new("wrong-type", migration::wrong_type),
        Scenario::new("cancel-save", migration::cancel_save),
        Scenario::new("cancel-save-before-read", migration::cancel_save_before_read),
        Scenario::new("stream-round-trip", stream::round_trip),
        Scenario::new("stream-wrong-type", stream::wrong_type),
        Scenario::new("stream-corrupt", stream::corrupt),
        Scenario::new("cdev-stop-copy", || migration::stop_copy(Cdev, Cdev)),
        Scenario::new("cdev-pre-copy", || migration::pre_copy(Cdev, Cdev)),
        Scenario::new("cross-group-to-cdev", || migration::stop_copy(Group, Cdev)),
        Scenario::new("cross-cdev-to-group", || migration::pre_copy(Cdev, Group)),
        Scenario::new("dma-log-stub", migration::dma_log_stub),
        Scenario::new("iommufd-mock-dirty", iommufd_mock::mock_dirty),
        Scenario::new("type1-mdev-clean", type1::mdev_clean),
        Scenario::new("tracker-hwpt-mock", trackers::hwpt_mock),
        Scenario::new("tracker-type1-mdev", trackers::type1_mdev),
        Scenario::new("tracker-select-mtty", trackers::select_mtty),
        Scenario::new("live-one", live::one),
        Scenario::new("live-multi-cdev", live::multi),
        Scenario::new("live-wrong-pair", live::wrong_pair),
        Scenario::new("ch-migrate", ch::migrate),
        Scenario::new("cli-probe", cli::probe),
        Scenario::new("cli-migrate", || cli::migrate("group")),
        Scenario::new("cli-migrate-cdev", || cli::migrate("cdev")),
        Scenario::new("cli-migrate-multi", cli::migrate_multi),
        Scenario::new("cli-migrate-wrong-type", cli::migrate_wrong_type),
        Scenario::new("cli-save-inspect-load", cli::save_inspect_load),
        Scenario::new("cli-save-stop-probe", cli::save_stop_probe),
        Scenario::new("cli-load-mismatch-keeps-state", cli::load_mismatch_keeps_state),
        Scenario::new("cli-reset-first", cli::reset_first),
    ]);
    list
}

fn main() -> ExitCode {
    let boot = std::env::var("RIG_BOOT").unwrap_or_else(|_| "plain".to_string());
    let list = scenarios(&boot);
    println!("RIG-PLAN {}", list.len());
    // A panicking scenario is reported as a failure; keep the default message off the console
    // lines the host parses by printing it ourselves.
    panic::set_hook(Box::new(|info| eprintln!("rig-guest: panic: {info}")));
    let mut failed = 0;
    for s in list {
        let outcome = panic::catch_unwind(AssertUnwindSafe(&s.run)).unwrap_or_else(|_| Err("panicked".to_string()));
        match outcome {
            Ok(()) => println!("RIG {} PASS", s.name),
            Err(reason) => {
                failed += 1;
                println!("RIG {} FAIL: {}", s.name, reason.replace('\n', " | "));
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
