//! The emulated device's parameters and their textual form.
//!
//! A device spec such as `emulated:size=64M,flags=stop-copy+p2p+pre-copy,seed=7` carries its
//! parameters after the colon; [`EmulatedConfig`] parses that part (`FromStr`) and prints it back
//! in a canonical form (`Display`) that parses to the same configuration.

use std::fmt;
use std::str::FromStr;

use crate::state::MigrationFlags;

use super::format::FORMAT_VERSION;

/// The largest device size: 1 TiB.
pub const MAX_SIZE: u64 = 1 << 40;
/// The largest block size: 16 MiB.
pub const MAX_BLOCK: u64 = 16 << 20;
/// The largest number of blocks (the version vector then takes 256 MiB).
pub const MAX_BLOCKS: u64 = 1 << 26;
/// The default number of DMA logging ranges the device accepts (the uAPI guarantees at least
/// PAGE_SIZE / 16 = 256 on 4 KiB pages).
pub const DEFAULT_MAX_RANGES: u32 = 256;

/// A bad emulated device parameter, naming the key and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A key that is not one of the known ones.
    #[error(
        "emulated device: unknown parameter {0:?} (expected size, flags, seed, block, dirty-rate, read-rate, max-ranges, reset, reinit-after or name)"
    )]
    UnknownKey(String),
    /// A `key` without `=value`.
    #[error("emulated device: parameter {0:?} needs a value ({0}=...)")]
    MissingValue(String),
    /// A key given twice.
    #[error("emulated device: parameter {0:?} given twice")]
    Duplicate(String),
    /// A value that does not parse or is out of range.
    #[error("emulated device: bad {key} {value:?}: {reason}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// What a reset (`VFIO_DEVICE_RESET`) does to the emulated device's content.
///
/// A reset always ends any session and returns the device to RUNNING; this chooses whether the
/// content survives it. On vfio-pci hardware a reset is usually a function-level reset (FLR),
/// which wipes the device state: [`ResetMode::Wipe`], the default, models that, so whatever a
/// recovery by reset costs is visible. mtty resets only its migration state and keeps its content:
/// [`ResetMode::Keep`] models that.
///
/// ```
/// use vfio_migration::emulated::{EmulatedConfig, ResetMode};
///
/// assert_eq!(EmulatedConfig::default().reset, ResetMode::Wipe);
/// let c: EmulatedConfig = "reset=keep".parse().unwrap();
/// assert_eq!(c.reset, ResetMode::Keep);
/// assert_eq!(c.to_string().parse::<EmulatedConfig>().unwrap(), c);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResetMode {
    /// Every block's content changes (a new seed-derived reset generation), as an FLR wipes a
    /// PCI function's state: the state held before the reset is lost.
    #[default]
    Wipe,
    /// The content is kept across the reset (like mtty); only the migration state is reset.
    Keep,
}

impl ResetMode {
    /// The spec value: `wipe` or `keep`.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetMode::Wipe => "wipe",
            ResetMode::Keep => "keep",
        }
    }
}

impl fmt::Display for ResetMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The parameters of an emulated migratable device.
///
/// Parsed from `size=64M,flags=stop-copy+p2p+pre-copy,seed=1,block=4K,dirty-rate=1M,name=gpu0`
/// (any subset, any order). Sizes take an optional `K`, `M`, `G` or `T` suffix (powers of 1024,
/// case-insensitive, an optional trailing `B` or `iB` accepted); `dirty-rate` is bytes per second
/// (`/s` accepted); `reset` is `wipe` or `keep` ([`ResetMode`]). Defaults: 64 MiB, all three
/// flags, seed 1, 4 KiB blocks, no dirtying, [`DEFAULT_MAX_RANGES`] DMA logging ranges, a reset
/// that wipes the content, no name.
///
/// PRE_COPY info v2: `flags=...+precopy-v2` makes the device offer
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` ([`EmulatedConfig::precopy_v2`]; needs `pre-copy`),
/// and `reinit-after=BYTES` makes new initial data appear once, after `BYTES` bytes of pre-copy
/// data were read in a saving session ([`EmulatedConfig::reinit_after`]). Neither is part of
/// the identity.
///
/// ```
/// use vfio_migration::emulated::EmulatedConfig;
///
/// let c: EmulatedConfig = "flags=stop-copy+pre-copy+precopy-v2,reinit-after=1M".parse().unwrap();
/// assert!(c.precopy_v2);
/// assert_eq!(c.reinit_after, Some(1 << 20));
/// assert_eq!(c.identity_params(), EmulatedConfig::default().identity_params());
/// assert!(c.to_string().contains("flags=stop-copy+pre-copy+precopy-v2,"));
/// assert_eq!(c.to_string().parse::<EmulatedConfig>().unwrap(), c);
/// assert!("flags=stop-copy+precopy-v2".parse::<EmulatedConfig>().is_err(), "v2 needs pre-copy");
/// ```
///
/// ```
/// use vfio_migration::emulated::EmulatedConfig;
///
/// let c: EmulatedConfig = "size=1G,block=64K,seed=7,dirty-rate=10M/s".parse().unwrap();
/// assert_eq!(c.size, 1 << 30);
/// assert_eq!(c.block_size, 64 << 10);
/// assert_eq!(c.blocks(), 16384);
/// assert_eq!(c.to_string().parse::<EmulatedConfig>().unwrap(), c);
/// assert!("size=12Q".parse::<EmulatedConfig>().unwrap_err().to_string().contains("size"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmulatedConfig {
    /// Device state size in bytes (the sum of all block lengths), `1..=MAX_SIZE`.
    pub size: u64,
    /// The migration flags the device reports; always includes STOP_COPY.
    pub flags: MigrationFlags,
    /// The content seed; source and destination must use the same one.
    pub seed: u64,
    /// Block size in bytes, `1..=MAX_BLOCK`; the last block may be shorter.
    pub block_size: u32,
    /// Bytes per second of content that change while RUNNING or PRE_COPY (0: none).
    pub dirty_rate: u64,
    /// How fast the device hands out its state, in bytes per second (0: as fast as the host
    /// can generate it). Models a device whose state reads are bounded by the device itself
    /// (firmware, PCIe), which is what parallel stop-copy overlaps.
    pub read_rate: u64,
    /// The most DMA logging ranges `dma_log_start` accepts (more gives E2BIG).
    pub max_ranges: u32,
    /// What a reset does to the content ([`ResetMode`]; default: wipe, as an FLR does). Not part
    /// of the identity: a stream carries every block's version, so a source and a destination
    /// that differ only in this agree on every byte of a transferred state.
    pub reset: ResetMode,
    /// Offer PRE_COPY info v2 (`flags=...+precopy-v2`): once the engine opts in
    /// ([`crate::device::MigrationDevice::enable_precopy_info_v2`]), a re-init is reported as
    /// [`crate::device::PrecopyInfo::reinit`] on the next pre-copy info query. Needs PRE_COPY.
    /// Not part of the identity: it changes what the device says about its stream, not the
    /// stream's meaning.
    pub precopy_v2: bool,
    /// New initial data appears once per saving session, at the first pre-copy read after this
    /// many bytes of pre-copy data were read (`reinit-after=BYTES`; see
    /// [`super::EmulatedHandle::trigger_reinit`]). Needs PRE_COPY; not part of the identity.
    pub reinit_after: Option<u64>,
    /// A name for messages (`emulated:<name>`).
    pub name: Option<String>,
}

impl Default for EmulatedConfig {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            flags: MigrationFlags::KNOWN,
            seed: 1,
            block_size: 4096,
            dirty_rate: 0,
            read_rate: 0,
            max_ranges: DEFAULT_MAX_RANGES,
            reset: ResetMode::Wipe,
            precopy_v2: false,
            reinit_after: None,
            name: None,
        }
    }
}

impl EmulatedConfig {
    /// A default configuration of `size` bytes.
    pub fn with_size(size: u64) -> Self {
        Self {
            size,
            ..Self::default()
        }
    }

    /// The number of blocks (the last one may be short).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size.max(1)))
    }

    /// The length of block `index` in bytes.
    pub fn block_len(&self, index: u64) -> u64 {
        let bs = u64::from(self.block_size);
        self.size.saturating_sub(index.saturating_mul(bs)).min(bs)
    }

    /// The parameters a destination must share with the source, in canonical form:
    /// `format=1,size=<bytes>,block=<bytes>,seed=<n>`. This is
    /// [`crate::device::DeviceIdentity::Emulated`]'s `params`, so a stream is refused before a
    /// device of another size, block size or seed is touched. The dirty rate, read rate, DMA
    /// logging ranges, reset mode and name are left out: they shape what the device does, not
    /// what a state's bytes mean.
    pub fn identity_params(&self) -> String {
        format!(
            "format={FORMAT_VERSION},size={},block={},seed={}",
            self.size, self.block_size, self.seed
        )
    }

    /// Check the ranges and invariants that parsing checks, for a configuration built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.size == 0 || self.size > MAX_SIZE {
            return Err(bad("size", self.size, format!("must be 1 byte to {}", human(MAX_SIZE))));
        }
        if self.block_size == 0 || u64::from(self.block_size) > MAX_BLOCK {
            return Err(bad(
                "block",
                self.block_size,
                format!("must be 1 byte to {}", human(MAX_BLOCK)),
            ));
        }
        if self.blocks() > MAX_BLOCKS {
            return Err(bad(
                "block",
                self.block_size,
                format!(
                    "size {} in blocks of {} gives {} blocks, more than {MAX_BLOCKS}: use larger blocks",
                    self.size,
                    self.block_size,
                    self.blocks()
                ),
            ));
        }
        if !self.flags.contains(MigrationFlags::STOP_COPY) {
            return Err(bad("flags", self.flags, "must include stop-copy".to_string()));
        }
        if self.flags.unknown_bits() != 0 {
            return Err(bad(
                "flags",
                self.flags,
                "only stop-copy, p2p and pre-copy are known".to_string(),
            ));
        }
        if self.max_ranges == 0 {
            return Err(bad("max-ranges", 0, "must be at least 1".to_string()));
        }
        if self.precopy_v2 && !self.flags.contains(MigrationFlags::PRE_COPY) {
            return Err(bad(
                "flags",
                format_args!("{}+{PRECOPY_V2}", self.flags),
                format!("{PRECOPY_V2} needs pre-copy"),
            ));
        }
        if let Some(n) = self.reinit_after {
            if n == 0 {
                return Err(bad("reinit-after", n, "must be at least 1 byte".to_string()));
            }
            if !self.flags.contains(MigrationFlags::PRE_COPY) {
                return Err(bad("reinit-after", n, "needs the pre-copy flag".to_string()));
            }
        }
        if let Some(name) = &self.name
            && (name.is_empty() || name.contains(','))
        {
            return Err(bad("name", name, "must be non-empty and contain no ','".to_string()));
        }
        Ok(())
    }
}

/// The `flags` token that makes the device offer PRE_COPY info v2.
const PRECOPY_V2: &str = "precopy-v2";

/// Split `precopy-v2` (also `pre-copy-v2`, `_` for `-`, any case) out of a `flags` value:
/// returns the migration flags text and whether it was there.
fn split_precopy_v2(value: &str) -> (String, bool) {
    let mut v2 = false;
    let rest: Vec<&str> = value
        .split([',', '+'])
        .map(str::trim)
        .filter(|p| {
            let norm = p.to_ascii_lowercase().replace('_', "-");
            let is_v2 = norm == PRECOPY_V2 || norm == "pre-copy-v2";
            v2 |= is_v2;
            !is_v2
        })
        .collect();
    (rest.join("+"), v2)
}

fn bad(key: &'static str, value: impl fmt::Display, reason: String) -> ConfigError {
    ConfigError::BadValue {
        key,
        value: value.to_string(),
        reason,
    }
}

/// Parse a byte count with an optional binary suffix.
/// Parse a size such as `64M`, `1GiB` or `4096` (suffixes K, M, G, T are powers of 1024); errors
/// name `key`.
pub fn parse_size(key: &'static str, value: &str) -> Result<u64, ConfigError> {
    let v = value.trim();
    let lower = v.to_ascii_lowercase();
    let lower = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 10),
        Some(b'm') => (&lower[..lower.len() - 1], 20),
        Some(b'g') => (&lower[..lower.len() - 1], 30),
        Some(b't') => (&lower[..lower.len() - 1], 40),
        _ => (lower, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| {
        bad(
            key,
            v,
            "expected a number of bytes with an optional K, M, G or T suffix".to_string(),
        )
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| bad(key, v, "too large".to_string()))
}

/// Print a byte count with the largest exact binary suffix.
fn human(n: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

impl FromStr for EmulatedConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        let mut seen: Vec<&str> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| ConfigError::MissingValue(part.to_string()))?;
            let key = key.trim();
            let value = value.trim();
            let canonical = match key.to_ascii_lowercase().replace('_', "-").as_str() {
                "size" => {
                    c.size = parse_size("size", value)?;
                    "size"
                }
                "flags" => {
                    let (flags, v2) = split_precopy_v2(value);
                    c.flags = flags.parse().map_err(|e: crate::state::StateError| {
                        bad("flags", value, format!("{e}; write them joined by '+'"))
                    })?;
                    c.precopy_v2 = v2;
                    "flags"
                }
                "reinit-after" => {
                    c.reinit_after = Some(parse_size("reinit-after", value)?);
                    "reinit-after"
                }
                "seed" => {
                    c.seed = value
                        .parse()
                        .map_err(|_| bad("seed", value, "expected an unsigned 64-bit number".to_string()))?;
                    "seed"
                }
                "block" | "block-size" => {
                    let b = parse_size("block", value)?;
                    c.block_size = u32::try_from(b)
                        .ok()
                        .filter(|b| u64::from(*b) <= MAX_BLOCK)
                        .ok_or_else(|| bad("block", value, format!("at most {}", human(MAX_BLOCK))))?;
                    "block"
                }
                "dirty-rate" => {
                    let v = value.strip_suffix("/s").unwrap_or(value);
                    c.dirty_rate = parse_size("dirty-rate", v)?;
                    "dirty-rate"
                }
                "read-rate" => {
                    let v = value.strip_suffix("/s").unwrap_or(value);
                    c.read_rate = parse_size("read-rate", v)?;
                    "read-rate"
                }
                "max-ranges" => {
                    c.max_ranges = value
                        .parse()
                        .map_err(|_| bad("max-ranges", value, "expected an unsigned 32-bit number".to_string()))?;
                    "max-ranges"
                }
                "reset" => {
                    c.reset = match value.to_ascii_lowercase().as_str() {
                        "wipe" => ResetMode::Wipe,
                        "keep" => ResetMode::Keep,
                        _ => {
                            return Err(bad(
                                "reset",
                                value,
                                "expected wipe (content lost, as an FLR) or keep (content kept, as mtty)".to_string(),
                            ));
                        }
                    };
                    "reset"
                }
                "name" => {
                    c.name = Some(value.to_string());
                    "name"
                }
                _ => return Err(ConfigError::UnknownKey(key.to_string())),
            };
            if seen.contains(&canonical) {
                return Err(ConfigError::Duplicate(canonical.to_string()));
            }
            seen.push(canonical);
        }
        c.validate()?;
        Ok(c)
    }
}

impl fmt::Display for EmulatedConfig {
    /// The canonical spec: every parameter, sizes with the largest exact suffix; `read-rate`,
    /// `reset`, `reinit-after` and `name` only when not the default; `+precopy-v2` ends the
    /// flags when offered.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "size={},flags={}{},seed={},block={},dirty-rate={},max-ranges={}",
            human(self.size),
            self.flags,
            if self.precopy_v2 { "+precopy-v2" } else { "" },
            self.seed,
            human(u64::from(self.block_size)),
            human(self.dirty_rate),
            self.max_ranges
        )?;
        if self.read_rate != 0 {
            write!(f, ",read-rate={}", human(self.read_rate))?;
        }
        if self.reset != ResetMode::default() {
            write!(f, ",reset={}", self.reset)?;
        }
        if let Some(n) = self.reinit_after {
            write!(f, ",reinit-after={}", human(n))?;
        }
        if let Some(name) = &self.name {
            write!(f, ",name={name}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c: EmulatedConfig = "".parse().unwrap();
        assert_eq!(c, EmulatedConfig::default());
        assert_eq!(c.size, 64 << 20);
        assert_eq!(c.flags, MigrationFlags::KNOWN);
        assert_eq!(c.seed, 1);
        assert_eq!(c.block_size, 4096);
        assert_eq!(c.dirty_rate, 0);
        assert_eq!(c.blocks(), 16384);
        assert_eq!(c.identity_params(), "format=1,size=67108864,block=4096,seed=1");
    }

    #[test]
    fn full_spec_and_round_trip() {
        let c: EmulatedConfig = "size=3G, flags=stop-copy+pre-copy ,seed=42,block=64KiB,dirty-rate=1M/s,name=gpu0"
            .parse()
            .unwrap();
        assert_eq!(c.size, 3 << 30);
        assert_eq!(c.flags, MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY);
        assert_eq!(c.seed, 42);
        assert_eq!(c.block_size, 65536);
        assert_eq!(c.dirty_rate, 1 << 20);
        assert_eq!(c.name.as_deref(), Some("gpu0"));
        let text = c.to_string();
        assert_eq!(
            text,
            "size=3G,flags=stop-copy+pre-copy,seed=42,block=64K,dirty-rate=1M,max-ranges=256,name=gpu0"
        );
        assert_eq!(text.parse::<EmulatedConfig>().unwrap(), c);
        let odd: EmulatedConfig = "size=1000003,block=7".parse().unwrap();
        assert_eq!(odd.to_string().parse::<EmulatedConfig>().unwrap(), odd);
        assert_eq!(odd.blocks(), 142858);
        assert_eq!(odd.block_len(142857), 1000003 - 142857 * 7);
        assert_eq!(odd.block_len(0), 7);
    }

    #[test]
    fn last_block_may_be_short() {
        let c: EmulatedConfig = "size=1,block=4K".parse().unwrap();
        assert_eq!(c.blocks(), 1);
        assert_eq!(c.block_len(0), 1);
        let c: EmulatedConfig = "size=5K,block=4K".parse().unwrap();
        assert_eq!(
            (c.blocks(), c.block_len(0), c.block_len(1), c.block_len(2)),
            (2, 4096, 1024, 0)
        );
    }

    #[test]
    fn every_bad_parameter_is_named() {
        let cases = [
            ("size=12Q", "size"),
            ("size=0", "size"),
            ("size=2T", "size"),
            ("size=99999999999999999999", "size"),
            ("block=0", "block"),
            ("block=32M", "block"),
            ("size=1T,block=1", "block"),
            ("flags=p2p", "flags"),
            ("flags=stop-copy+warp", "flags"),
            ("seed=-1", "seed"),
            ("dirty-rate=fast", "dirty-rate"),
            ("max-ranges=0", "max-ranges"),
            ("name=", "name"),
            ("colour=red", "colour"),
            ("size", "size"),
            ("seed=1,seed=2", "seed"),
            ("reset=flr", "reset"),
            ("reset=keep,reset=wipe", "reset"),
        ];
        for (spec, key) in cases {
            let err = spec.parse::<EmulatedConfig>().unwrap_err();
            assert!(err.to_string().contains(key), "{spec}: {err}");
        }
    }

    #[test]
    fn read_rate_parses_and_prints_only_when_set() {
        let c: EmulatedConfig = "size=1M,read-rate=100M/s".parse().unwrap();
        assert_eq!(c.read_rate, 100 << 20);
        assert!(c.to_string().contains("read-rate=100M"), "{c}");
        assert_eq!(c.to_string().parse::<EmulatedConfig>().unwrap(), c);
        assert!(!EmulatedConfig::default().to_string().contains("read-rate"));
        assert!(
            "read-rate=x"
                .parse::<EmulatedConfig>()
                .unwrap_err()
                .to_string()
                .contains("read-rate")
        );
    }

    #[test]
    fn reset_parses_and_prints_only_when_not_the_default() {
        assert_eq!(EmulatedConfig::default().reset, ResetMode::Wipe);
        assert!(!EmulatedConfig::default().to_string().contains("reset"));
        let wipe: EmulatedConfig = "reset=wipe".parse().unwrap();
        assert_eq!(wipe, EmulatedConfig::default());
        let keep: EmulatedConfig = "size=1M,reset=KEEP".parse().unwrap();
        assert_eq!(keep.reset, ResetMode::Keep);
        assert!(keep.to_string().ends_with(",reset=keep"), "{keep}");
        assert_eq!(keep.to_string().parse::<EmulatedConfig>().unwrap(), keep);
        // What a reset does is not what a state means: both load each other's streams.
        assert_eq!(
            keep.identity_params(),
            EmulatedConfig::with_size(1 << 20).identity_params()
        );
    }
}
