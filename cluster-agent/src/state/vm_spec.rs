//! `VmSpec`: what the cluster stores about a VM (serde, `deny_unknown_fields`) and its
//! validation. `vmhost::spec` translates it into vmm-node's `VmConfig`.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use csv_volume::DiskName;
use serde::{Deserialize, Serialize};
use vmm_node::config::{parse_mac, CMDLINE_BYTES_MAX, NICS_MAX, VCPUS_MAX, VIRTIO_BLK_SLOTS};
pub use vmm_node::config::{NIC_MTU_DEFAULT, NIC_MTU_MAX, NIC_MTU_MIN};

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
/// Longest VM network name (a name in the nodes' `[[networks]]` config).
pub const NETWORK_NAME_BYTES_MAX: usize = 32;
/// The OUI of MACs the cluster generates (QEMU/KVM's locally used `52:54:00`).
pub const GENERATED_MAC_PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

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
    /// What the owner does when the VM fails while running (records stored before the
    /// field existed load with the default: restart on failure, 3 within 10 min).
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    #[serde(default)]
    pub anti_affinity: BTreeSet<String>,
    /// Most preferred first.
    #[serde(default)]
    pub preferred_owners: Vec<scheduler::NodeId>,
    /// Network interfaces; NIC `i` in virtio-net slot `nics[i].slot`, else `i`
    /// ([`VmSpec::nic_slot`]).
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

/// Most automatic restarts a restart policy may allow within its window.
pub const RESTARTS_MAX: u32 = 100;
/// Longest restart-policy window (one day).
pub const RESTART_WINDOW_S_MAX: u64 = 86_400;

/// Whether a VM that fails while running is restarted on its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartMode {
    /// Restart it, at most `max_restarts` times within `window_s` (a crash loop stops at
    /// the bound and leaves the VM `failed`).
    #[default]
    OnFailure,
    /// Leave it `failed` until an operator starts it.
    Never,
}

impl RestartMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartMode::OnFailure => "on_failure",
            RestartMode::Never => "never",
        }
    }
}

/// The VM's restart policy. A failure is the VM ending while it was running without being
/// asked to: its worker process died, a vCPU failed, the guest reset or triple-faulted.
/// A guest that powers itself off (the exit port) is not a failure the policy restarts,
/// and neither is a start that fails (nothing would change on a second try).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    /// Restarts allowed within `window_s`, 1..=[`RESTARTS_MAX`].
    pub max_restarts: u32,
    /// The crash-loop window in seconds, 1..=[`RESTART_WINDOW_S_MAX`].
    pub window_s: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            max_restarts: 3,
            window_s: 600,
        }
    }
}

impl RestartPolicy {
    /// `on_failure (3 in 600 s)` or `never`.
    pub fn describe(&self) -> String {
        match self.mode {
            RestartMode::OnFailure => {
                format!("on_failure ({} in {} s)", self.max_restarts, self.window_s)
            }
            RestartMode::Never => "never".into(),
        }
    }
}

/// One NIC of a VM: the network it is on and its MAC.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// A network name that nodes map to a host bridge in their config.
    pub network: String,
    /// `aa:bb:cc:dd:ee:ff`, lower case. Empty in a create request: the cluster generates
    /// one when it applies the create ([`generated_mac`]); never empty once stored.
    #[serde(default)]
    pub mac: String,
    /// The virtio-net slot. `None`: the NIC's index in the list (NICs given at create).
    /// A hot add or remove pins every NIC's slot, so the others keep theirs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u8>,
    /// The NIC's MTU (`VIRTIO_NET_F_MTU` to the guest, and its TAP's MTU on the host),
    /// [`NIC_MTU_MIN`]..=[`NIC_MTU_MAX`]. `None`: [`NIC_MTU_DEFAULT`] (records stored
    /// before the field existed load so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

impl NicSpec {
    /// The MTU in effect: the one given, else [`NIC_MTU_DEFAULT`]. Only meaningful on a
    /// validated spec (out-of-range values are refused by [`VmSpec::validate`]).
    pub fn mtu(&self) -> u16 {
        self.mtu
            .and_then(|m| u16::try_from(m).ok())
            .unwrap_or(NIC_MTU_DEFAULT)
    }
}

/// The host TAP device of the NIC with `mac` on node `node_id`: the MAC's 12 hex digits,
/// a dot and the node id in hex (`525400000004.2`, at most 15 bytes as Linux requires). The
/// MAC is unique in the cluster; the node is part of the name so a migration between two
/// agents sharing a network namespace (tests) has two TAPs. Node ids are taken modulo 256.
pub fn nic_tap_name(node_id: u64, mac: &str) -> String {
    let hex: String = mac.chars().filter(|c| *c != ':').collect();
    format!("{}.{:x}", hex.to_ascii_lowercase(), node_id & 0xff)
}

/// True for network names (`lan`, `dmz-2`, `vlan_10`).
pub fn valid_network_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NETWORK_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `mac` in canonical form (lower case) if it is a unicast, non-zero MAC.
pub fn canonical_mac(mac: &str) -> Option<String> {
    let b = parse_mac(mac)?;
    (b[0] & 1 == 0 && b != [0; 6]).then(|| vmm_node::config::format_mac(&b))
}

/// The `attempt`-th candidate MAC for NIC `slot` of VM `vm_id`: `52:54:00` (locally used by
/// KVM hosts, unicast) followed by 24 bits from the id, the slot and the attempt. The state
/// machine takes the first candidate no other NIC has, so the choice is the same on every
/// replica and needs no randomness.
pub fn generated_mac(vm_id: u64, slot: usize, attempt: u64) -> String {
    let n = (vm_id.wrapping_mul(NICS_MAX as u64) + slot as u64)
        .wrapping_add(attempt.wrapping_mul(0x9e_3779))
        & 0xff_ffff;
    let [p0, p1, p2] = GENERATED_MAC_PREFIX;
    vmm_node::config::format_mac(&[p0, p1, p2, (n >> 16) as u8, (n >> 8) as u8, n as u8])
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
    /// `net` workload: the guest's IPv4 address on its first NIC.
    #[serde(default)]
    pub net_ip: Option<std::net::Ipv4Addr>,
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
            net_ip: None,
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
    /// Answers ARP, UDP echo (port 7) and ICMP echo on `net_ip` through its first NIC.
    Net,
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
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
    #[error("a VM has at most {NICS_MAX} NICs, got {0}")]
    TooManyNics(usize),
    #[error("network name {0:?} must be 1..={NETWORK_NAME_BYTES_MAX} bytes of letters, digits, '.', '_' or '-'")]
    NetworkName(String),
    #[error("MAC {0:?} must be six ':'-separated hex bytes, unicast and not all zero (e.g. 52:54:00:12:34:56)")]
    Mac(String),
    #[error("MAC {0} is given to two NICs of the VM")]
    DuplicateMac(String),
    #[error("NIC slot {0} is out of range (0..{NICS_MAX}) or given to two NICs")]
    NicSlot(u8),
    #[error("NIC {nic}: MTU {mtu} is out of range ({NIC_MTU_MIN}..={NIC_MTU_MAX})")]
    NicMtu { nic: String, mtu: u32 },
    #[error("restart policy: max_restarts must be 1..={RESTARTS_MAX} and window_s 1..={RESTART_WINDOW_S_MAX}, got {max_restarts} in {window_s} s")]
    RestartPolicy { max_restarts: u32, window_s: u64 },
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
            restart_policy: RestartPolicy::default(),
            anti_affinity: BTreeSet::new(),
            preferred_owners: Vec::new(),
            nics: Vec::new(),
        }
    }

    /// The virtio-net slot of NIC `index` (its `slot`, else its index).
    pub fn nic_slot(&self, index: usize) -> u8 {
        self.nics
            .get(index)
            .and_then(|n| n.slot)
            .unwrap_or(index as u8)
    }

    /// Give every NIC its slot explicitly (before the list is edited).
    pub fn pin_nic_slots(&mut self) {
        for i in 0..self.nics.len() {
            self.nics[i].slot = Some(self.nic_slot(i));
        }
    }

    /// The lowest virtio-net slot no NIC is in.
    pub fn free_nic_slot(&self) -> Option<u8> {
        (0..NICS_MAX as u8).find(|s| (0..self.nics.len()).all(|i| self.nic_slot(i) != *s))
    }

    /// The networks the VM's NICs are on.
    pub fn networks(&self) -> BTreeSet<String> {
        self.nics.iter().map(|n| n.network.clone()).collect()
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
        let RestartPolicy {
            max_restarts,
            window_s,
            ..
        } = self.restart_policy;
        if !(1..=RESTARTS_MAX).contains(&max_restarts)
            || !(1..=RESTART_WINDOW_S_MAX).contains(&window_s)
        {
            return Err(SpecError::RestartPolicy {
                max_restarts,
                window_s,
            });
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
        if self.nics.len() > NICS_MAX {
            return Err(SpecError::TooManyNics(self.nics.len()));
        }
        let mut slots = HashSet::new();
        for i in 0..self.nics.len() {
            let slot = self.nic_slot(i);
            if usize::from(slot) >= NICS_MAX || !slots.insert(slot) {
                return Err(SpecError::NicSlot(slot));
            }
        }
        let mut macs = HashSet::new();
        for (i, nic) in self.nics.iter().enumerate() {
            if !valid_network_name(&nic.network) {
                return Err(SpecError::NetworkName(nic.network.clone()));
            }
            if let Some(mtu) = nic.mtu {
                if !(u32::from(NIC_MTU_MIN)..=u32::from(NIC_MTU_MAX)).contains(&mtu) {
                    let who = if nic.mac.is_empty() {
                        String::new()
                    } else {
                        format!(" {}", nic.mac)
                    };
                    return Err(SpecError::NicMtu {
                        nic: format!("{i}{who} on network {}", nic.network),
                        mtu,
                    });
                }
            }
            if nic.mac.is_empty() {
                continue;
            }
            let mac = canonical_mac(&nic.mac).ok_or_else(|| SpecError::Mac(nic.mac.clone()))?;
            if !macs.insert(mac.clone()) {
                return Err(SpecError::DuplicateMac(mac));
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
    fn nics_are_validated_and_old_records_load() {
        let mut s = spec();
        s.nics = vec![
            NicSpec {
                network: "lan".into(),
                mac: String::new(),
                ..Default::default()
            },
            NicSpec {
                network: "dmz".into(),
                mac: "52:54:00:AA:00:01".into(),
                ..Default::default()
            },
        ];
        s.validate().unwrap();
        assert_eq!(s.networks().len(), 2);
        let bad = |f: &dyn Fn(&mut VmSpec)| {
            let mut t = s.clone();
            f(&mut t);
            t.validate().unwrap_err()
        };
        assert_eq!(
            bad(&|t| t.nics[0].network = "no spaces".into()),
            SpecError::NetworkName("no spaces".into())
        );
        assert_eq!(
            bad(&|t| t.nics[1].mac = "01:00:5e:00:00:01".into()),
            SpecError::Mac("01:00:5e:00:00:01".into())
        );
        assert_eq!(
            bad(&|t| t.nics[0].mac = "52:54:00:aa:00:01".into()),
            SpecError::DuplicateMac("52:54:00:aa:00:01".into())
        );
        assert_eq!(
            bad(&|t| t.nics = vec![t.nics[0].clone(); NICS_MAX + 1]),
            SpecError::TooManyNics(NICS_MAX + 1)
        );
        // MTU: default 1500, 68..=9000 accepted, the NIC and the value named otherwise.
        assert_eq!(s.nics[0].mtu(), 1500);
        for ok in [68, 1500, 9000] {
            let mut t = s.clone();
            t.nics[1].mtu = Some(ok);
            t.validate().unwrap();
            assert_eq!(u32::from(t.nics[1].mtu()), ok);
        }
        for mtu in [0, 67, 9001, 70_000] {
            let e = bad(&|t| t.nics[1].mtu = Some(mtu));
            assert_eq!(
                e.to_string(),
                format!(
                    "NIC 1 52:54:00:AA:00:01 on network dmz: MTU {mtu} is out of range (68..=9000)"
                )
            );
        }
        assert_eq!(
            bad(&|t| t.nics[0].mtu = Some(10)).to_string(),
            "NIC 0 on network lan: MTU 10 is out of range (68..=9000)"
        );
        // A record stored before NICs existed loads with none.
        let old: VmSpec = serde_json::from_str(
            r#"{"name":"a","vcpus":1,"memory_mib":64,"boot":{"test_guest":{"kind":"idle"}}}"#,
        )
        .unwrap();
        assert!(old.nics.is_empty());
        // A NIC stored before the MTU existed loads with the default; a set MTU round-trips.
        let old: NicSpec =
            serde_json::from_str(r#"{"network":"lan","mac":"52:54:00:00:00:01"}"#).unwrap();
        assert_eq!((old.mtu, old.mtu()), (None, 1500));
        let jumbo = NicSpec {
            mtu: Some(9000),
            ..old
        };
        let back: NicSpec = serde_json::from_str(&serde_json::to_string(&jumbo).unwrap()).unwrap();
        assert_eq!(back, jumbo);
    }

    #[test]
    fn generated_macs_are_unicast_local_and_differ_by_vm_and_slot() {
        let a = generated_mac(1, 0, 0);
        assert_eq!(canonical_mac(&a).as_deref(), Some(a.as_str()));
        assert!(a.starts_with("52:54:00:"));
        assert_ne!(a, generated_mac(1, 1, 0));
        assert_ne!(a, generated_mac(2, 0, 0));
        assert_ne!(a, generated_mac(1, 0, 1));
        assert_eq!(a, generated_mac(1, 0, 0));
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
