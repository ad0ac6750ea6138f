//! `VmSpec`: what the cluster stores about a VM (serde, `deny_unknown_fields`) and its
//! validation. `vmhost::spec` translates it into vmm-node's `VmConfig`.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use csv_volume::DiskName;
use serde::{Deserialize, Serialize};
use vmm_node::config::{CMDLINE_BYTES_MAX, VCPUS_MAX, VIRTIO_BLK_SLOTS};

/// Longest VM name.
pub const VM_NAME_BYTES_MAX: usize = 64;
/// Smallest guest memory accepted (vmm-node's own floor).
pub const MEMORY_MIB_MIN: u64 = 16;
/// Largest guest memory a spec may ask for (the host check in vmm-node comes on top).
pub const MEMORY_MIB_MAX: u64 = 1 << 20;
/// Most anti-affinity classes per VM.
pub const ANTI_AFFINITY_CLASSES_MAX: usize = 16;
/// Longest anti-affinity class name.
pub const CLASS_NAME_BYTES_MAX: usize = 64;
/// Most preferred owners per VM.
pub const PREFERRED_OWNERS_MAX: usize = 64;

/// A VM as the cluster defines it. Disk `i` of `disks` sits in virtio-blk slot `i`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: BootSpec,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub restart_priority: scheduler::RestartPriority,
    #[serde(default)]
    pub anti_affinity: BTreeSet<String>,
    /// Most preferred first.
    #[serde(default)]
    pub preferred_owners: Vec<scheduler::NodeId>,
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum BootSpec {
    /// The project's PVH test guest (`vmm_node::test_guest::PATH`) with a workload.
    TestGuest(TestWorkload),
    /// A Linux kernel (vmlinux/bzImage/PVH ELF) with a command line and optional initrd.
    Kernel {
        kernel: PathBuf,
        #[serde(default)]
        cmdline: String,
        #[serde(default)]
        initrd: Option<PathBuf>,
    },
}

/// The test guest's workload parameters (see `vmm_node::guest_protocol`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestWorkload {
    pub kind: WorkloadName,
    #[serde(default = "default_wss_mib")]
    pub wss_mib: u64,
    #[serde(default = "default_rate_mbps")]
    pub rate_mbps: u64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_hb_ms")]
    pub hb_ms: u64,
}

fn default_wss_mib() -> u64 {
    16
}
fn default_rate_mbps() -> u64 {
    100
}
fn default_seed() -> u64 {
    1
}
fn default_hb_ms() -> u64 {
    100
}

impl TestWorkload {
    /// A workload with the guest's default sizes.
    pub fn new(kind: WorkloadName) -> Self {
        TestWorkload {
            kind,
            wss_mib: default_wss_mib(),
            rate_mbps: default_rate_mbps(),
            seed: default_seed(),
            hb_ms: default_hb_ms(),
        }
    }
}

/// Test guest workloads a cluster VM may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadName {
    Idle,
    Dirty,
    Mem,
    Disk,
}

/// One disk of a VM: a CSV image named `volume/dir/disk.img`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub name: DiskName,
    /// Attached read-only (needs a shared lock); read-write needs the exclusive lock.
    #[serde(default)]
    pub read_only: bool,
}

/// Why a spec is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("VM name {0:?} must be 1..={VM_NAME_BYTES_MAX} bytes of letters, digits, '.', '_' or '-', not starting with '.'")]
    Name(String),
    #[error("vcpus must be between 1 and {VCPUS_MAX}, got {0}")]
    Vcpus(u8),
    #[error("memory_mib must be between {MEMORY_MIB_MIN} and {MEMORY_MIB_MAX}, got {0}")]
    Memory(u64),
    #[error("a VM has at most {VIRTIO_BLK_SLOTS} disks, got {0}")]
    TooManyDisks(usize),
    #[error("disk {0} is listed twice")]
    DuplicateDisk(String),
    #[error(
        "kernel command line must be at most {CMDLINE_BYTES_MAX} bytes without NUL characters"
    )]
    Cmdline,
    #[error("kernel path must be absolute, got {0:?}")]
    KernelPath(PathBuf),
    #[error("test guest parameter {field} must be between 1 and {max}, got {got}")]
    Workload {
        field: &'static str,
        max: u64,
        got: u64,
    },
    #[error("anti-affinity class {0:?} must be 1..={CLASS_NAME_BYTES_MAX} printable bytes; at most {ANTI_AFFINITY_CLASSES_MAX} classes")]
    AntiAffinity(String),
    #[error("preferred owners: at most {PREFERRED_OWNERS_MAX}, no repeats (node {0} repeated or list too long)")]
    PreferredOwners(u64),
}

/// True for names a VM may have (also used for the quick-migration directory).
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= VM_NAME_BYTES_MAX
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl VmSpec {
    /// A spec running the test guest with `workload`, no disks, default policy.
    pub fn test_guest(name: &str, vcpus: u8, memory_mib: u64, workload: TestWorkload) -> Self {
        VmSpec {
            name: name.to_owned(),
            vcpus,
            memory_mib,
            boot: BootSpec::TestGuest(workload),
            disks: Vec::new(),
            restart_priority: scheduler::RestartPriority::default(),
            anti_affinity: BTreeSet::new(),
            preferred_owners: Vec::new(),
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_vm_name(&self.name) {
            return Err(SpecError::Name(self.name.clone()));
        }
        if self.vcpus == 0 || self.vcpus > VCPUS_MAX {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&self.memory_mib) {
            return Err(SpecError::Memory(self.memory_mib));
        }
        if self.disks.len() > VIRTIO_BLK_SLOTS {
            return Err(SpecError::TooManyDisks(self.disks.len()));
        }
        let mut seen = HashSet::new();
        for d in &self.disks {
            if !seen.insert(d.name.as_str()) {
                return Err(SpecError::DuplicateDisk(d.name.to_string()));
            }
        }
        match &self.boot {
            BootSpec::TestGuest(w) => {
                let mib = self.memory_mib;
                for (field, max, got) in [
                    ("wss_mib", mib, w.wss_mib),
                    ("rate_mbps", 100_000, w.rate_mbps),
                    ("hb_ms", 60_000, w.hb_ms),
                ] {
                    if got == 0 || got > max {
                        return Err(SpecError::Workload { field, max, got });
                    }
                }
            }
            BootSpec::Kernel {
                kernel,
                cmdline,
                initrd,
            } => {
                if !kernel.is_absolute() {
                    return Err(SpecError::KernelPath(kernel.clone()));
                }
                if let Some(i) = initrd.as_ref().filter(|i| !i.is_absolute()) {
                    return Err(SpecError::KernelPath(i.clone()));
                }
                if cmdline.len() > CMDLINE_BYTES_MAX || cmdline.contains('\0') {
                    return Err(SpecError::Cmdline);
                }
            }
        }
        if self.anti_affinity.len() > ANTI_AFFINITY_CLASSES_MAX {
            let first = self
                .anti_affinity
                .iter()
                .next()
                .cloned()
                .unwrap_or_default();
            return Err(SpecError::AntiAffinity(first));
        }
        for c in &self.anti_affinity {
            if c.is_empty()
                || c.len() > CLASS_NAME_BYTES_MAX
                || c.chars().any(|ch| ch.is_control() || ch.is_whitespace())
            {
                return Err(SpecError::AntiAffinity(c.clone()));
            }
        }
        let mut owners = HashSet::new();
        for n in &self.preferred_owners {
            if !owners.insert(n.0) || owners.len() > PREFERRED_OWNERS_MAX {
                return Err(SpecError::PreferredOwners(n.0));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec::test_guest("web-1", 2, 64, TestWorkload::new(WorkloadName::Disk))
    }

    #[test]
    fn good_spec_validates_and_round_trips_json() {
        let mut s = spec();
        s.disks.push(DiskSpec {
            name: DiskName::parse("vol/vms/web-1.img").unwrap(),
            read_only: false,
        });
        s.anti_affinity.insert("web".into());
        s.preferred_owners.push(scheduler::NodeId(2));
        s.validate().unwrap();
        let j = serde_json::to_string(&s).unwrap();
        let back: VmSpec = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn bad_specs_name_the_problem() {
        let mut s = spec();
        s.name = "../x".into();
        assert!(matches!(s.validate(), Err(SpecError::Name(_))));
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(SpecError::Vcpus(0)));
        let mut s = spec();
        s.memory_mib = 8;
        assert_eq!(s.validate(), Err(SpecError::Memory(8)));
        let mut s = spec();
        let d = DiskSpec {
            name: DiskName::parse("vol/a.img").unwrap(),
            read_only: false,
        };
        s.disks = vec![d.clone(), d];
        assert_eq!(
            s.validate(),
            Err(SpecError::DuplicateDisk("vol/a.img".into()))
        );
        let mut s = spec();
        s.boot = BootSpec::Kernel {
            kernel: "vmlinux".into(),
            cmdline: String::new(),
            initrd: None,
        };
        assert!(matches!(s.validate(), Err(SpecError::KernelPath(_))));
        let mut s = spec();
        if let BootSpec::TestGuest(w) = &mut s.boot {
            w.wss_mib = 1000;
        }
        assert!(matches!(
            s.validate(),
            Err(SpecError::Workload {
                field: "wss_mib",
                ..
            })
        ));
        let mut s = spec();
        s.preferred_owners = vec![scheduler::NodeId(1), scheduler::NodeId(1)];
        assert_eq!(s.validate(), Err(SpecError::PreferredOwners(1)));
    }

    #[test]
    fn json_rejects_unknown_fields_and_bad_disk_names() {
        let e = serde_json::from_str::<VmSpec>(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"boot":{"test_guest":{"kind":"idle"}},"bogus":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = serde_json::from_str::<VmSpec>(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"boot":{"test_guest":{"kind":"idle"}},"disks":[{"name":"/abs/x.img"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("abs"), "{e}");
    }
}
