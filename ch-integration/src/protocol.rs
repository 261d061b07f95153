//! Cloud Hypervisor migration protocol version 1: the bytes that negotiate it and that carry
//! VFIO device state while the VM runs.
//!
//! Cloud Hypervisor's protocol (`vm-migration`'s `protocol.rs`) frames every message as a 16-byte
//! request (`command: u16`, `command_headers: [u8; 6]`, `length: u64`, little-endian, then
//! `length` payload bytes) answered by a 16-byte response (`status: u16`, `padding: [u8; 6]`,
//! `length: u64`). Version 0 (every Cloud Hypervisor) moves device state only in `State`, inside
//! the downtime. Version 1 adds one command, `DeviceState`, and negotiates itself in bytes that
//! version 0 ignores, so that either side may be an unpatched Cloud Hypervisor:
//!
//! - **`Start` request**: `command_headers[0..2]` = 0 (the version the sender starts with, which
//!   every destination accepts), `[2..4]` = the highest version the sender speaks (1, LE), with
//!   bit 15 ([`OFFER_PREPARABLE`]) set when every device of the VM can be prepared from the
//!   configuration alone (no VFIO PCI device, whose destination needs `vfio_fds`: only vfio-user
//!   devices, or none), `[4..6]` = [`MAGIC`]. An unpatched sender leaves `[2..6]` zero.
//! - **`Start` response** (`Ok`): `padding[0..2]` = the version the destination chose (LE),
//!   `padding[2..4]` = [`MAGIC`]. An unpatched destination sends zero padding: the source then
//!   knows its peer reads only Cloud Hypervisor's in-tree device state (`{"blob": base64}`) and
//!   sends that, in `State`.
//! - **`DeviceState` request** (command [`DEVICE_STATE_COMMAND`], version 1 only, between `Config`
//!   and `State`, while the VM runs): headers zero, payload = one [`crate::PrecopyItem`]
//!   ([`crate::PrecopyItem::encode`]): a chunk of one device's pre-copy data, numbered per device,
//!   or the marker saying the device's initial data is all sent.
//! - **`DeviceState` response**: `Ok` once the destination loaded the item into the device
//!   (`Error` aborts the migration, the source's devices return to RUNNING);
//!   `padding[0]` = 1 when every device whose initial data was announced has loaded it
//!   ([`crate::VfioMigrationGroup::switchover_ready`]): the switchover acknowledgement.
//! - **`State`**: each device's part holds only the data not sent ahead, after a record saying how
//!   many chunks and bytes went ahead; the destination checks it loaded exactly that.

/// The newest protocol version this crate speaks.
pub const VERSION: u16 = 1;

/// The command number of `DeviceState` (Cloud Hypervisor's `Command` ends at 9, `PageFault`).
pub const DEVICE_STATE_COMMAND: u16 = 10;

/// Marks the version-1 fields of `Start` and its response ("vm").
pub const MAGIC: [u8; 2] = *b"vm";

/// Largest `DeviceState` payload a destination accepts: one chunk plus its header.
pub const MAX_DEVICE_STATE_PAYLOAD: u64 = crate::iterative::MAX_CHUNK + 20 + crate::iterative::MAX_ID as u64;

/// Set in the version a `Start` offers when every device of the source's VM can be prepared at
/// `Config` from the configuration alone (vfio-user devices: the destination connects to the
/// socket the configuration names), so the destination may choose version 1 without being given
/// VFIO device fds.
pub const OFFER_PREPARABLE: u16 = 0x8000;

/// The `command_headers` of the source's `Start`: starts at version 0, offers up to [`VERSION`].
pub fn start_headers() -> [u8; 6] {
    start_headers_with(false)
}

/// [`start_headers`], saying whether every device can be prepared from the configuration alone
/// ([`OFFER_PREPARABLE`]).
pub fn start_headers_with(preparable: bool) -> [u8; 6] {
    let offer = if preparable {
        VERSION | OFFER_PREPARABLE
    } else {
        VERSION
    };
    let v = offer.to_le_bytes();
    [0, 0, v[0], v[1], MAGIC[0], MAGIC[1]]
}

/// Destination: whether the source said every device can be prepared from the configuration
/// alone ([`OFFER_PREPARABLE`]).
pub fn offered_preparable(headers: &[u8; 6]) -> bool {
    headers[4..6] == MAGIC && u16::from_le_bytes([headers[2], headers[3]]) & OFFER_PREPARABLE != 0
}

/// Destination: the highest version the source offers in its `Start` headers (`None`: an
/// unpatched source, version 0 only).
pub fn offered_version(headers: &[u8; 6]) -> Option<u16> {
    (headers[4..6] == MAGIC).then(|| u16::from_le_bytes([headers[2], headers[3]]) & !OFFER_PREPARABLE)
}

/// Destination: the version to speak when the source offers `offered` and this destination can
/// take device state ahead (`can_load_ahead`: it prepared its VFIO devices at `Config`).
pub fn choose_version(offered: Option<u16>, can_load_ahead: bool) -> u16 {
    match offered {
        Some(v) if v >= 1 && can_load_ahead => 1,
        _ => 0,
    }
}

/// Destination: the `padding` of its `Start` response, naming `version`.
pub fn start_response_padding(version: u16) -> [u8; 6] {
    let v = version.to_le_bytes();
    [v[0], v[1], MAGIC[0], MAGIC[1], 0, 0]
}

/// What the source learns from the `Start` response's padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// An unpatched Cloud Hypervisor: version 0, in-tree device state only.
    Upstream,
    /// This integration, speaking the version it chose.
    Ours(u16),
}

impl Peer {
    /// Read the `Start` response's padding.
    pub fn from_start_response(padding: &[u8; 6]) -> Self {
        if padding[2..4] == MAGIC {
            Peer::Ours(u16::from_le_bytes([padding[0], padding[1]]))
        } else {
            Peer::Upstream
        }
    }

    /// Whether `DeviceState` messages may be sent.
    pub fn device_state(self) -> bool {
        matches!(self, Peer::Ours(v) if v >= 1)
    }
}

/// Destination: the `padding` of a `DeviceState` response.
pub fn device_state_response_padding(switchover_ready: bool) -> [u8; 6] {
    [u8::from(switchover_ready), 0, 0, 0, 0, 0]
}

/// Source: whether a `DeviceState` response acknowledges switchover.
pub fn switchover_acknowledged(padding: &[u8; 6]) -> bool {
    padding[0] == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_with_each_kind_of_peer() {
        // Ours -> ours: version 1 when the destination can load ahead, else 0, and it says so.
        let offered = offered_version(&start_headers());
        assert_eq!(offered, Some(1));
        assert_eq!(choose_version(offered, true), 1);
        assert_eq!(choose_version(offered, false), 0);
        assert_eq!(Peer::from_start_response(&start_response_padding(1)), Peer::Ours(1));
        assert!(Peer::Ours(1).device_state());
        assert!(!Peer::Ours(0).device_state());
        // Upstream -> ours: zero headers past the version (Cloud Hypervisor's Request::start()).
        assert_eq!(offered_version(&[0; 6]), None);
        assert_eq!(choose_version(None, true), 0);
        // Ours -> upstream: Response::ok() has zero padding.
        assert_eq!(Peer::from_start_response(&[0; 6]), Peer::Upstream);
        assert!(!Peer::Upstream.device_state());
        // The version field every destination checks stays 0.
        assert_eq!(&start_headers()[0..2], &[0, 0]);
    }

    #[test]
    fn a_source_says_whether_every_device_can_be_prepared_from_the_configuration() {
        assert!(!offered_preparable(&start_headers()));
        let h = start_headers_with(true);
        assert!(offered_preparable(&h));
        assert_eq!(
            offered_version(&h),
            Some(VERSION),
            "the flag is not part of the version"
        );
        assert_eq!(&h[0..2], &[0, 0], "version 0 destinations still accept it");
        assert!(!offered_preparable(&[0, 0, 1, 0x80, 0, 0]), "only with the magic");
    }

    #[test]
    fn switchover_acknowledgement_round_trips() {
        assert!(switchover_acknowledged(&device_state_response_padding(true)));
        assert!(!switchover_acknowledged(&device_state_response_padding(false)));
        assert!(!switchover_acknowledged(&[0; 6]));
    }
}
