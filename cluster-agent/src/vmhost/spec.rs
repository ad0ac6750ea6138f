//! Translation of the stored [`VmSpec`] into vmm-node's [`VmConfig`].

use std::path::PathBuf;

use csv_volume::VolumeRegistry;
use vmm_node::guest_protocol::{Workload, WorkloadKind};
use vmm_node::{BootProtocol, VmConfig};

pub use crate::state::vm_spec::{
    valid_vm_name, BootSpec, DiskSpec, SpecError, TestWorkload, VmSpec, WorkloadName,
};

use super::VmHostError;

/// The guest-side workload of a test-guest VM.
pub fn workload(w: TestWorkload) -> Workload {
    Workload {
        kind: match w.kind {
            WorkloadName::Idle => WorkloadKind::Idle,
            WorkloadName::Dirty => WorkloadKind::Dirty,
            WorkloadName::Mem => WorkloadKind::Mem,
            WorkloadName::Disk => WorkloadKind::Disk,
            WorkloadName::Net => WorkloadKind::Net,
        },
        wss_mib: w.wss_mib,
        rate_mbps: w.rate_mbps,
        seed: w.seed,
        hb_ms: w.hb_ms,
    }
}

/// The vmm-node configuration. It lists no disks: vmhost opens them through their
/// lock grants into the slots it owns (disk `i` in slot `i`); each name must resolve
/// on `registry`.
/// The NICs are on this node's TAPs (`nics::tap_names(node, spec)`), which must exist.
pub fn to_config(
    spec: &VmSpec,
    registry: &VolumeRegistry,
    node: u64,
) -> Result<VmConfig, VmHostError> {
    spec.validate().map_err(VmHostError::Spec)?;
    let (kernel, cmdline, initramfs, boot) = match &spec.boot {
        BootSpec::TestGuest(w) => (
            PathBuf::from(vmm_node::test_guest::PATH),
            match w.net_ip {
                Some(ip) => format!(
                    "{} {}",
                    workload(*w).cmdline(),
                    vmm_node::guest_protocol::net_cmdline(ip)
                ),
                None => workload(*w).cmdline(),
            },
            None,
            BootProtocol::Pvh,
        ),
        BootSpec::Kernel {
            kernel,
            cmdline,
            initrd,
        } => (
            kernel.clone(),
            cmdline.clone(),
            initrd.clone(),
            BootProtocol::Auto,
        ),
    };
    // The disks are opened by vmhost through their grants and put in slots vmhost
    // owns, so the VMM config lists none (vmm-node refuses to start a config with disks
    // unless its own `DiskSlots` is installed). Their names must still resolve.
    for d in &spec.disks {
        registry
            .disk_path(&d.name)
            .map_err(|source| VmHostError::Volume {
                disk: d.name.to_string(),
                source,
            })?;
    }
    Ok(VmConfig {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel,
        initramfs,
        cmdline,
        boot,
        disks: Vec::new(),
        nics: spec
            .nics
            .iter()
            .zip(super::nics::tap_names(node, spec))
            .map(|(n, tap)| vmm_node::config::NicConfig::new(tap, n.mac.clone()))
            .collect(),
    })
}
