//! VM configuration (serde, `deny_unknown_fields`) and its validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM may have.
pub const VCPUS_MAX: u8 = 32;
/// Number of virtio-blk slots (see `ARCHITECTURE.md` (vmm-node: internal seams)).
pub const VIRTIO_BLK_SLOTS: usize = 8;
/// MMIO base of virtio-blk slot 0; slot `i` is at `+ i * VIRTIO_MMIO_SLOT_BYTES`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SLOT_BYTES: u64 = 0x1000;
/// GSI of virtio-blk slot 0; slot `i` uses `+ i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Longest kernel command line accepted.
pub const CMDLINE_BYTES_MAX: usize = 4096;
/// Most NICs (virtio-net devices) a VM may have.
pub const NICS_MAX: usize = 4;
/// Smallest NIC MTU (the IPv4 minimum).
pub const NIC_MTU_MIN: u16 = 68;
/// Largest NIC MTU (jumbo frames).
pub const NIC_MTU_MAX: u16 = 9000;
/// NIC MTU when the config gives none.
pub const NIC_MTU_DEFAULT: u16 = 1500;
/// Longest TAP device name (`IFNAMSIZ` - 1).
pub const TAP_NAME_BYTES_MAX: usize = 15;

/// How the kernel image is booted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootProtocol {
    /// Detect: ELF with a PVH note → PVH; other ELF → Linux 64-bit boot; bzImage → Linux.
    #[default]
    Auto,
    /// Xen PVH entry (32-bit protected mode, `start_info` in `%ebx`).
    Pvh,
    /// Linux 64-bit boot protocol (boot_params in `%rsi`).
    Linux,
}

/// A disk in a virtio-blk slot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSlotConfig {
    /// Slot number, `0..VIRTIO_BLK_SLOTS`.
    pub slot: u8,
    /// Raw image file.
    pub path: PathBuf,
    /// Attach read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A NIC: a virtio-net device backed by an existing TAP device of the VMM's network
/// namespace. NIC `i` of the list is virtio-net slot `i` (see `devices::virtio::net`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicConfig {
    /// Name of the TAP device (it must exist; the VMM does not create it).
    pub tap_name: String,
    /// MAC address the guest sees, `52:54:00:12:34:56` (unicast, not all zero).
    pub mac: String,
    /// MTU offered to the guest (`VIRTIO_NET_F_MTU`), 68..=9000.
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// virtio-net slot (`0..NICS_MAX`); `None`: its index in `nics` at boot, the lowest
    /// free slot on hot add.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
}

fn default_mtu() -> u16 {
    NIC_MTU_DEFAULT
}

impl NicConfig {
    /// A NIC on `tap_name` with `mac` and the default MTU.
    pub fn new(tap_name: impl Into<String>, mac: impl Into<String>) -> Self {
        Self {
            tap_name: tap_name.into(),
            mac: mac.into(),
            mtu: NIC_MTU_DEFAULT,
            slot: None,
        }
    }

    /// The MAC as bytes (`None` if it is not six `:`-separated hex bytes).
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        parse_mac(&self.mac)
    }
}

/// Parse `aa:bb:cc:dd:ee:ff` (hex, either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Format a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Everything needed to create a VM; sent to a migration target as is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM name (for logs).
    #[serde(default = "default_name")]
    pub name: String,
    /// Number of vCPUs, 1..=32.
    pub vcpus: u8,
    /// Guest RAM in MiB (at least 16).
    pub memory_mib: u64,
    /// Kernel image: PVH ELF, vmlinux ELF or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (Linux boot only).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Boot protocol.
    #[serde(default)]
    pub boot: BootProtocol,
    /// Disks attached at start.
    #[serde(default)]
    pub disks: Vec<DiskSlotConfig>,
    /// NICs, in virtio-net slot order.
    #[serde(default)]
    pub nics: Vec<NicConfig>,
}

fn default_name() -> String {
    "vm".to_string()
}

/// Invalid configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("vcpus must be between 1 and {VCPUS_MAX}, got {0}")]
    Vcpus(u8),
    /// Memory size out of range.
    #[error("memory_mib must be at least {min} and at most the host's {host_mib} MiB, got {got}")]
    Memory { got: u64, min: u64, host_mib: u64 },
    /// Command line too long or containing NUL.
    #[error("cmdline must be at most {CMDLINE_BYTES_MAX} bytes without NUL characters")]
    Cmdline,
    /// Disk slot out of range or duplicated.
    #[error("disk slot {0} is out of range (0..{VIRTIO_BLK_SLOTS}) or used twice")]
    DiskSlot(u8),
    /// initramfs with the PVH protocol.
    #[error("an initramfs needs the Linux boot protocol")]
    InitramfsWithPvh,
    /// More NICs than the VMM has virtio-net slots.
    #[error("nics lists {0} NICs, at most {NICS_MAX} are allowed")]
    NicCount(usize),
    /// A MAC that does not parse.
    #[error("nics[{index}].mac {mac:?} is not a MAC address (six hex bytes separated by ':', e.g. 52:54:00:12:34:56)")]
    NicMacFormat { index: usize, mac: String },
    /// A multicast/broadcast or all-zero MAC.
    #[error("nics[{index}].mac {mac} must be a unicast address (lowest bit of the first byte clear) and not all zero")]
    NicMacNotUnicast { index: usize, mac: String },
    /// Two NICs with one MAC.
    #[error("nics[{index}].mac {mac} is already used by nics[{first}]")]
    NicMacDuplicate {
        index: usize,
        first: usize,
        mac: String,
    },
    /// MTU out of range.
    #[error("nics[{index}].mtu {mtu} is out of range ({NIC_MTU_MIN}..={NIC_MTU_MAX})")]
    NicMtu { index: usize, mtu: u16 },
    /// A TAP name the kernel cannot have.
    #[error("nics[{index}].tap_name {name:?} is not a valid interface name (1..={TAP_NAME_BYTES_MAX} bytes, no '/', ':', whitespace or NUL, not \".\" or \"..\")")]
    NicTapName { index: usize, name: String },
    /// More TAP names given than the VM has NICs.
    #[error("{given} TAP names given (--nic-tap) but the VM has {nics} NICs")]
    NicTapOverrides { given: usize, nics: usize },
    /// Two NICs on one TAP.
    #[error("nics[{index}].tap_name {name} is already used by nics[{first}]")]
    NicTapDuplicate {
        index: usize,
        first: usize,
        name: String,
    },
    /// A NIC slot out of range or used twice.
    #[error("nics[{index}].slot {slot} is out of range (0..{NICS_MAX}) or used by another NIC")]
    NicSlot { index: usize, slot: u8 },
}

/// Whether the kernel accepts `name` as an interface name (`dev_valid_name`).
pub fn valid_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TAP_NAME_BYTES_MAX
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

impl VmConfig {
    /// A config with defaults for everything but the essentials.
    pub fn new(vcpus: u8, memory_mib: u64, kernel: impl Into<PathBuf>) -> Self {
        Self {
            name: default_name(),
            vcpus,
            memory_mib,
            kernel: kernel.into(),
            initramfs: None,
            cmdline: String::new(),
            boot: BootProtocol::Auto,
            disks: Vec::new(),
            nics: Vec::new(),
        }
    }

    /// Check ranges against this host's memory size.
    pub fn validate(&self, host_memory_mib: u64) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > VCPUS_MAX {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.memory_mib < crate::memory::MEMORY_MIB_MIN || self.memory_mib > host_memory_mib {
            return Err(ConfigError::Memory {
                got: self.memory_mib,
                min: crate::memory::MEMORY_MIB_MIN,
                host_mib: host_memory_mib,
            });
        }
        if self.cmdline.len() > CMDLINE_BYTES_MAX || self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline);
        }
        let mut used = [false; VIRTIO_BLK_SLOTS];
        for d in &self.disks {
            let i = d.slot as usize;
            if i >= VIRTIO_BLK_SLOTS || used[i] {
                return Err(ConfigError::DiskSlot(d.slot));
            }
            used[i] = true;
        }
        if self.boot == BootProtocol::Pvh && self.initramfs.is_some() {
            return Err(ConfigError::InitramfsWithPvh);
        }
        self.validate_nics()
    }

    /// Put NIC `i` on TAP `taps[i]` (a VM restored or received on another host, whose
    /// TAPs have other names). Fewer names than NICs leave the rest unchanged; more are an
    /// error.
    pub fn set_nic_taps(&mut self, taps: &[String]) -> Result<(), ConfigError> {
        if taps.len() > self.nics.len() {
            return Err(ConfigError::NicTapOverrides {
                given: taps.len(),
                nics: self.nics.len(),
            });
        }
        for (n, t) in self.nics.iter_mut().zip(taps) {
            n.tap_name = t.clone();
        }
        self.validate_nics()
    }

    /// The slot of NIC `index` (its `slot`, else its index).
    pub fn nic_slot(&self, index: usize) -> u8 {
        self.nics
            .get(index)
            .and_then(|n| n.slot)
            .unwrap_or(index as u8)
    }

    /// Check the NICs (also used for a NIC about to be hot-added, appended to the VM's
    /// current NICs).
    pub fn validate_nics(&self) -> Result<(), ConfigError> {
        if self.nics.len() > NICS_MAX {
            return Err(ConfigError::NicCount(self.nics.len()));
        }
        for (index, n) in self.nics.iter().enumerate() {
            if !valid_interface_name(&n.tap_name) {
                return Err(ConfigError::NicTapName {
                    index,
                    name: n.tap_name.clone(),
                });
            }
            let Some(mac) = n.mac_bytes() else {
                return Err(ConfigError::NicMacFormat {
                    index,
                    mac: n.mac.clone(),
                });
            };
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(ConfigError::NicMacNotUnicast {
                    index,
                    mac: n.mac.clone(),
                });
            }
            if !(NIC_MTU_MIN..=NIC_MTU_MAX).contains(&n.mtu) {
                return Err(ConfigError::NicMtu { index, mtu: n.mtu });
            }
            let slot = self.nic_slot(index);
            if usize::from(slot) >= NICS_MAX || (0..index).any(|first| self.nic_slot(first) == slot)
            {
                return Err(ConfigError::NicSlot { index, slot });
            }
            for (first, other) in self.nics[..index].iter().enumerate() {
                if other.mac_bytes() == Some(mac) {
                    return Err(ConfigError::NicMacDuplicate {
                        index,
                        first,
                        mac: n.mac.clone(),
                    });
                }
                if other.tap_name == n.tap_name {
                    return Err(ConfigError::NicTapDuplicate {
                        index,
                        first,
                        name: n.tap_name.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_rejects_bad_values() {
        let ok = VmConfig::new(2, 64, "/k");
        ok.validate(1024).unwrap();
        assert_eq!(
            VmConfig::new(0, 64, "/k").validate(1024),
            Err(ConfigError::Vcpus(0))
        );
        assert_eq!(
            VmConfig::new(33, 64, "/k").validate(1024),
            Err(ConfigError::Vcpus(33))
        );
        assert!(matches!(
            VmConfig::new(1, 8, "/k").validate(1024),
            Err(ConfigError::Memory { .. })
        ));
        assert!(matches!(
            VmConfig::new(1, 4096, "/k").validate(1024),
            Err(ConfigError::Memory { .. })
        ));
        let mut c = ok.clone();
        c.disks = vec![
            DiskSlotConfig {
                slot: 1,
                path: "/a".into(),
                read_only: false,
            },
            DiskSlotConfig {
                slot: 1,
                path: "/b".into(),
                read_only: false,
            },
        ];
        assert_eq!(c.validate(1024), Err(ConfigError::DiskSlot(1)));
        let mut c = ok.clone();
        c.cmdline = "a\0b".into();
        assert_eq!(c.validate(1024), Err(ConfigError::Cmdline));
    }

    #[test]
    fn nics_are_validated_with_the_field_named() {
        let mut c = VmConfig::new(1, 64, "/k");
        c.nics = vec![NicConfig::new("tap0", "52:54:00:12:34:56")];
        c.validate(1024).unwrap();
        assert_eq!(
            c.nics[0].mac_bytes(),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "52:54:00:12:34:56"
        );
        let check = |f: &dyn Fn(&mut VmConfig)| {
            let mut c = c.clone();
            f(&mut c);
            let e = c.validate(1024).unwrap_err();
            (e.to_string(), e)
        };
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "5254.0012.3456",
            "",
            "52:54:00:12:34:5",
        ] {
            let (msg, e) = check(&|c| c.nics[0].mac = bad.into());
            assert!(
                matches!(e, ConfigError::NicMacFormat { index: 0, .. }),
                "{bad}: {e}"
            );
            assert!(msg.contains("nics[0].mac"), "{msg}");
        }
        for bad in [
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            let (msg, e) = check(&|c| c.nics[0].mac = bad.into());
            assert!(
                matches!(e, ConfigError::NicMacNotUnicast { .. }),
                "{bad}: {e}"
            );
            assert!(msg.contains("unicast"), "{msg}");
        }
        let (msg, e) = check(&|c| c.nics[0].mtu = 10000);
        assert_eq!(
            e,
            ConfigError::NicMtu {
                index: 0,
                mtu: 10000
            }
        );
        assert!(msg.contains("nics[0].mtu 10000"), "{msg}");
        assert!(matches!(
            check(&|c| c.nics[0].mtu = 67).1,
            ConfigError::NicMtu { .. }
        ));
        let mut ok = c.clone();
        ok.nics[0].mtu = 9000;
        ok.validate(1024).unwrap();
        for bad in ["", "a/b", "a b", "0123456789abcdef", "..", "eth0:1"] {
            let (msg, e) = check(&|c| c.nics[0].tap_name = bad.into());
            assert!(matches!(e, ConfigError::NicTapName { .. }), "{bad:?}: {e}");
            assert!(msg.contains("nics[0].tap_name"), "{msg}");
        }
        let (msg, e) = check(&|c| c.nics.push(NicConfig::new("tap1", "52:54:00:12:34:56")));
        assert!(
            matches!(
                e,
                ConfigError::NicMacDuplicate {
                    index: 1,
                    first: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(msg.contains("nics[1].mac"), "{msg}");
        let (_, e) = check(&|c| c.nics.push(NicConfig::new("tap0", "52:54:00:12:34:57")));
        assert!(
            matches!(
                e,
                ConfigError::NicTapDuplicate {
                    index: 1,
                    first: 0,
                    ..
                }
            ),
            "{e}"
        );
        let (_, e) = check(&|c| {
            c.nics = (0..=NICS_MAX)
                .map(|i| NicConfig::new(format!("tap{i}"), format!("52:54:00:00:00:{i:02x}")))
                .collect()
        });
        assert_eq!(e, ConfigError::NicCount(NICS_MAX + 1));
        // JSON: mtu defaults, nics may be absent (configs from before NICs existed).
        let c: VmConfig = serde_json::from_str(
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","nics":[{"tap_name":"t","mac":"52:54:00:00:00:01"}]}"#,
        )
        .unwrap();
        assert_eq!(c.nics[0].mtu, NIC_MTU_DEFAULT);
        let c: VmConfig =
            serde_json::from_str(r#"{"vcpus":1,"memory_mib":64,"kernel":"/k"}"#).unwrap();
        assert!(c.nics.is_empty());
    }

    #[test]
    fn json_rejects_unknown_fields() {
        let e = serde_json::from_str::<VmConfig>(
            r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","bogus":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let c: VmConfig =
            serde_json::from_str(r#"{"vcpus":1,"memory_mib":64,"kernel":"/k","boot":"pvh"}"#)
                .unwrap();
        assert_eq!(c.boot, BootProtocol::Pvh);
    }
}
