//! What migration needs from a VM, a node and the cluster: small traits so the engine is
//! independent of how the VM is built (the adapter for [`crate::vm::Vm`] lives in
//! `adapter.rs`), plus the pure compatibility check done at setup.

use super::transport::{DirtyPages, PageMap};
use crate::GuestMem;

/// Error of an operation on the VM, the node or the storage hook.
pub type OpError = Box<dyn std::error::Error + Send + Sync>;

/// The running VM on the source.
pub trait SourceVm: Send + Sync {
    fn memory(&self) -> &GuestMem;
    /// Serialized configuration, sent to the target as is.
    fn config_blob(&self) -> Result<Vec<u8>, OpError>;
    /// What the target must offer.
    fn requirements(&self) -> Requirements;
    fn start_dirty_log(&self) -> Result<(), OpError>;
    /// Pages written since the previous call (guest and device writes), then cleared.
    fn dirty_pages(&self, map: &PageMap) -> Result<DirtyPages, OpError>;
    fn stop_dirty_log(&self) -> Result<(), OpError>;
    fn pause(&self) -> Result<(), OpError>;
    fn resume(&self) -> Result<(), OpError>;
    fn set_throttle(&self, percent: u8);
    /// vCPU, VM-wide (clock/TSC) and device state of the paused VM, serialized.
    fn save_state(&self) -> Result<Vec<u8>, OpError>;
    /// Flushes and closes every disk (the guest sees nothing: it is paused).
    fn detach_disks(&self) -> Result<(), OpError>;
    /// Just before the pause: make the disks' writes so far durable while the guest
    /// still runs, so that the flush inside the blackout ([`SourceVm::detach_disks`])
    /// has little or nothing left to do.
    fn flush_disks(&self) -> Result<(), OpError> {
        Ok(())
    }
    /// Re-opens the disks closed by [`SourceVm::detach_disks`] (rollback).
    fn reattach_disks(&self) -> Result<(), OpError>;
    /// Runs the vCPU threads at nice `nice` (if higher than theirs) for at most
    /// `for_at_most` or until [`SourceVm::end_vcpu_boost`] (see
    /// [`crate::vm::Vm::boost_vcpus`]). Default: nothing.
    fn boost_vcpus(&self, _nice: i32, _for_at_most: std::time::Duration) {}
    /// Gives the vCPU threads their own priority back. Default: nothing.
    fn end_vcpu_boost(&self) {}
}

/// The VM being built on the target.
pub trait TargetVm: Send + Sync {
    fn memory(&self) -> &GuestMem;
    /// Loads the state and opens the disks (after [`StorageHandoff::acquire`]); stays paused.
    fn restore(&self, state: &[u8]) -> Result<(), OpError>;
    fn resume(&self) -> Result<(), OpError>;
    /// The source is paused and its state arrived: announce the VM's NICs on this host now
    /// (best effort), so their frames wait here for the resume. Default: nothing (the
    /// resume announces them).
    fn announce_nics(&self) {}
    /// Runs the resumed vCPU threads at nice `nice` (if higher than theirs) for
    /// `for_at_most` (see [`crate::vm::Vm::boost_vcpus`]). Default: nothing.
    fn boost_vcpus(&self, _nice: i32, _for_at_most: std::time::Duration) {}
}

/// Builds target VMs and knows this node's facts.
pub trait TargetFactory: Send + Sync {
    fn facts(&self) -> NodeFacts;
    /// A paused VM with memory allocated and devices created, no disk open yet.
    fn create_paused(&self, config_blob: &[u8]) -> Result<Box<dyn TargetVm>, OpError>;
}

/// Hook the cluster-agent implements to move shared-volume locks between nodes.
pub trait StorageHandoff: Send + Sync {
    /// Source, after the disks were flushed and closed.
    fn release(&self, vm: &str, disks: &[String]) -> Result<(), OpError>;
    /// Source, when a migration is rolled back after `release`.
    fn reclaim(&self, vm: &str, disks: &[String]) -> Result<(), OpError>;
    /// Target, before it opens the disks.
    fn acquire(&self, vm: &str, disks: &[String]) -> Result<(), OpError>;
}

/// Handoff for disks that need no lock moves (local tests, quick migration on one host).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHandoff;

impl StorageHandoff for NoHandoff {
    fn release(&self, _: &str, _: &[String]) -> Result<(), OpError> {
        Ok(())
    }
    fn reclaim(&self, _: &str, _: &[String]) -> Result<(), OpError> {
        Ok(())
    }
    fn acquire(&self, _: &str, _: &[String]) -> Result<(), OpError> {
        Ok(())
    }
}

/// What a VM needs from the node it runs on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Requirements {
    pub vm_name: String,
    pub cpu_vendor: String,
    /// CPU feature flags the guest may use (it sees the source host's CPUID).
    pub cpu_features: Vec<String>,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// Disk identities handed over through [`StorageHandoff`].
    pub disks: Vec<String>,
}

/// What a node offers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFacts {
    pub cpu_vendor: String,
    pub cpu_features: Vec<String>,
    pub memory_available_bytes: u64,
}

/// Why a VM cannot run on a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incompatibility {
    #[error("CPU vendor differs: the VM runs on {vm} and this node has {node}")]
    CpuVendor { vm: String, node: String },
    #[error("this node's CPU lacks features the guest may use: {}", missing.join(" "))]
    CpuFeatures { missing: Vec<String> },
    #[error(
        "the VM needs {needed_bytes} bytes of memory and this node has {available_bytes} available"
    )]
    Memory {
        needed_bytes: u64,
        available_bytes: u64,
    },
}

/// Checks `req` against `facts` (pure).
pub fn check_compatibility(req: &Requirements, facts: &NodeFacts) -> Result<(), Incompatibility> {
    if req.cpu_vendor != facts.cpu_vendor {
        return Err(Incompatibility::CpuVendor {
            vm: req.cpu_vendor.clone(),
            node: facts.cpu_vendor.clone(),
        });
    }
    let have: std::collections::HashSet<&str> =
        facts.cpu_features.iter().map(String::as_str).collect();
    let missing: Vec<String> = req
        .cpu_features
        .iter()
        .filter(|f| !have.contains(f.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Incompatibility::CpuFeatures { missing });
    }
    if req.memory_bytes > facts.memory_available_bytes {
        return Err(Incompatibility::Memory {
            needed_bytes: req.memory_bytes,
            available_bytes: facts.memory_available_bytes,
        });
    }
    Ok(())
}

/// CPU feature flags of this host (`flags` line of /proc/cpuinfo), sorted.
pub fn host_cpu_features() -> Vec<String> {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| parse_cpu_flags(&t))
        .unwrap_or_default()
}

/// Parses the first `flags` line of /proc/cpuinfo text.
pub fn parse_cpu_flags(cpuinfo: &str) -> Vec<String> {
    let mut v: Vec<String> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    v.sort();
    v.dedup();
    v
}

/// Available memory from /proc/meminfo (`MemAvailable`), in bytes.
pub fn host_memory_available_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Requirements {
        Requirements {
            vm_name: "vm".into(),
            cpu_vendor: "AuthenticAMD".into(),
            cpu_features: vec!["sse2".into(), "avx2".into()],
            memory_bytes: 64 << 20,
            vcpus: 2,
            disks: vec![],
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            cpu_vendor: "AuthenticAMD".into(),
            cpu_features: vec!["avx2".into(), "sse2".into(), "aes".into()],
            memory_available_bytes: 1 << 30,
        }
    }

    #[test]
    fn compatible_node_is_accepted() {
        assert_eq!(check_compatibility(&req(), &facts()), Ok(()));
    }

    #[test]
    fn incompatibilities_name_the_reason() {
        let mut f = facts();
        f.cpu_vendor = "GenuineIntel".into();
        let e = check_compatibility(&req(), &f).unwrap_err();
        assert!(e.to_string().contains("GenuineIntel") && e.to_string().contains("AuthenticAMD"));

        let mut f = facts();
        f.cpu_features.retain(|x| x != "avx2");
        let e = check_compatibility(&req(), &f).unwrap_err();
        assert_eq!(
            e,
            Incompatibility::CpuFeatures {
                missing: vec!["avx2".into()]
            }
        );

        let mut f = facts();
        f.memory_available_bytes = 1 << 20;
        assert!(matches!(
            check_compatibility(&req(), &f),
            Err(Incompatibility::Memory { .. })
        ));
    }

    #[test]
    fn cpu_flags_parse() {
        let t = "processor : 0\nflags\t\t: fpu sse2 avx2 sse2\nbugs : x\n";
        assert_eq!(parse_cpu_flags(t), vec!["avx2", "fpu", "sse2"]);
        assert!(parse_cpu_flags("nothing").is_empty());
    }
}
