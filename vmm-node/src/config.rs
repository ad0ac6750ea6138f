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
