//! An mtty mediated device opened through the engine, and its observable UART state.
//!
//! mtty emulates 16550-style serial ports: BAR n is port n, 8 one-byte registers. The state that
//! survives a migration and can be seen from outside: the scratch register (SCR, offset 7), the
//! line control register (LCR, 3), the modem control register (MCR, 4), and bytes written to the
//! transmit register (THR, 0) which land in the loopback FIFO: the line status register (LSR, 5)
//! bit 0 then says data is ready, and reading offset 0 pops them.

use std::path::PathBuf;

use vfio_migration::device::DeviceIdentity;
use vfio_migration::kernel::{KernelDevice, OpenMode, OpenedDevice, open_device};
use vfio_migration::{DeviceState, MigrationDevice};

/// Transmit (write) / receive (read) register.
const THR: u64 = 0;
/// Line control register.
const LCR: u64 = 3;
/// Modem control register.
const MCR: u64 = 4;
/// Line status register.
const LSR: u64 = 5;
/// Scratch register.
const SCR: u64 = 7;
/// LSR bit 0: data ready.
const LSR_DR: u8 = 1;
/// The loopback FIFO holds 16 bytes; never pop more than this many times.
const MAX_POPS: usize = 64;

/// What one port shows from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortState {
    /// Scratch register.
    pub scr: u8,
    /// Line control register.
    pub lcr: u8,
    /// Modem control register.
    pub mcr: u8,
    /// The bytes waiting in the loopback FIFO.
    pub fifo: Vec<u8>,
}

/// An opened mtty device.
#[derive(Debug)]
pub struct Mtty {
    /// The device and the handles keeping its IOMMU context alive.
    pub opened: OpenedDevice,
    /// Which environment variable named it (for messages).
    pub label: &'static str,
    /// 1 (mtty-1) or 2 (mtty-2).
    pub ports: u32,
}

impl Mtty {
    /// Open the device named by environment variable `var` (`MTTY_A`, `MTTY_B`, `MTTY_C`) the way
    /// `mode` says, and reset it when an earlier scenario left it outside RUNNING.
    pub fn open(var: &'static str, mode: OpenMode) -> Result<Self, String> {
        let path = std::env::var_os(var)
            .map(PathBuf::from)
            .ok_or_else(|| format!("environment variable {var} is not set"))?;
        let mut opened = open_device(&path, mode).map_err(|e| format!("{var}: open ({mode}): {e}"))?;
        if mode != OpenMode::Auto && opened.handles.mode() != mode {
            return Err(format!(
                "{var}: asked for {mode}, opened through {}",
                opened.handles.mode()
            ));
        }
        let ports = match opened.device.identity() {
            DeviceIdentity::Mdev { mdev_type } if mdev_type == "mtty-2" => 2,
            DeviceIdentity::Mdev { mdev_type } if mdev_type == "mtty-1" => 1,
            other => return Err(format!("{var}: identity {other}, want mdev mtty-1 or mtty-2")),
        };
        opened
            .device
            .reset_if_not_running()
            .map_err(|e| format!("{var}: reset after open: {e}"))?;
        Ok(Self {
            opened,
            label: var,
            ports,
        })
    }

    /// Open the device named by `var` through its group without resetting it, to look at the
    /// state something else left it in.
    pub fn open_keep_state(var: &'static str) -> Result<Self, String> {
        let path = std::env::var_os(var)
            .map(PathBuf::from)
            .ok_or_else(|| format!("environment variable {var} is not set"))?;
        let opened = open_device(&path, OpenMode::Group).map_err(|e| format!("{var}: open: {e}"))?;
        let ports = match opened.device.identity() {
            DeviceIdentity::Mdev { mdev_type } if mdev_type == "mtty-1" => 1,
            _ => 2,
        };
        Ok(Self {
            opened,
            label: var,
            ports,
        })
    }

    /// The engine's device.
    pub fn dev(&mut self) -> &mut KernelDevice {
        &mut self.opened.device
    }

    /// The device state as the kernel reports it.
    pub fn state(&self) -> Result<DeviceState, String> {
        self.opened.device.state().map_err(|e| format!("{}: {e}", self.label))
    }

    /// Fail unless the kernel reports `want`.
    pub fn expect_state(&self, want: DeviceState) -> Result<(), String> {
        let got = self.state()?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{}: state is {got}, want {want}", self.label))
        }
    }

    fn read8(&self, port: u32, offset: u64) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.opened
            .device
            .region_read(port, offset, &mut b)
            .map_err(|e| format!("{}: {e}", self.label))?;
        Ok(b[0])
    }

    fn write8(&self, port: u32, offset: u64, value: u8) -> Result<(), String> {
        self.opened
            .device
            .region_write(port, offset, &[value])
            .map_err(|e| format!("{}: {e}", self.label))
    }

    /// Pop every byte waiting in a port's loopback FIFO.
    fn drain(&self, port: u32) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for _ in 0..MAX_POPS {
            if self.read8(port, LSR)? & LSR_DR == 0 {
                return Ok(out);
            }
            out.push(self.read8(port, THR)?);
        }
        Err(format!(
            "{}: port {port}: LSR still says data ready after {MAX_POPS} pops",
            self.label
        ))
    }

    /// Give every port a distinctive state derived from `seed` and return what was written.
    /// The FIFO is emptied first, so it then holds exactly the pushed bytes.
    pub fn imprint(&self, seed: u8) -> Result<Vec<PortState>, String> {
        let mut want = Vec::new();
        for port in 0..self.ports {
            self.write8(port, LCR, 0x03)?; // DLAB clear: offset 0 is THR/RBR
            self.drain(port)?;
            let p = port as u8;
            let state = PortState {
                scr: seed ^ (0x5a + p),
                // 5..8 data bits, stop bits, parity; never DLAB (bit 7) or break (bit 6).
                lcr: (seed.wrapping_add(p)) & 0x3f,
                // DTR, RTS, OUT1, OUT2; loopback (bit 4) stays clear.
                mcr: (seed.wrapping_add(3 * p)) & 0x0f,
                fifo: format!("rig{seed:02x}p{p}").into_bytes(),
            };
            self.write8(port, SCR, state.scr)?;
            self.write8(port, MCR, state.mcr)?;
            for &b in &state.fifo {
                self.write8(port, THR, b)?;
            }
            self.write8(port, LCR, state.lcr)?;
            want.push(state);
        }
        Ok(want)
    }

    /// Read every port's observable state. Destructive: the FIFO is popped.
    pub fn observe(&self) -> Result<Vec<PortState>, String> {
        let mut got = Vec::new();
        for port in 0..self.ports {
            let lcr = self.read8(port, LCR)?;
            // Reading offset 0 pops the FIFO only with DLAB clear.
            self.write8(port, LCR, lcr & 0x7f)?;
            let state = PortState {
                scr: self.read8(port, SCR)?,
                lcr,
                mcr: self.read8(port, MCR)?,
                fifo: self.drain(port)?,
            };
            self.write8(port, LCR, lcr)?;
            got.push(state);
        }
        Ok(got)
    }

    /// Fail unless the observable state is `want`.
    pub fn expect_observed(&self, want: &[PortState]) -> Result<(), String> {
        let got = self.observe()?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{}: observed {got:?}, want {want:?}", self.label))
        }
    }
}
