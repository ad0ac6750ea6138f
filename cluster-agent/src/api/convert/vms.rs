//! Conversion between the VM API's protobuf types (`cluster.vms.v1`) and the replicated
//! [`VmRecord`] / [`VmSpec`]. Bad client input becomes a [`ConvertError`] naming the field.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cluster_proto::vms as pb;
use csv_volume::DiskName;
use scheduler::RestartPriority;

use crate::state::vm_spec::{BootSpec, DiskSpec, NicSpec, TestWorkload, VmSpec, WorkloadName};
use crate::state::vms::{DesiredState, RuntimeState, VmRecord};
use crate::state::ClusterState;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("spec is missing")]
    MissingSpec,
    #[error("spec.boot is missing: give a test_guest workload or a kernel")]
    MissingBoot,
    #[error("spec.vcpus {0} is out of range (1..=32)")]
    Vcpus(u32),
    #[error("spec.test_guest.workload {0:?} is not one of idle, dirty, mem, disk, net")]
    Workload(String),
    #[error("spec.test_guest.net_ip {0:?} is not an IPv4 address")]
    NetIp(String),
    #[error("spec.restart_priority {0:?} is not one of high, medium, low, none")]
    RestartPriority(String),
    #[error("spec.disks: {0:?} is not a disk name of the form volume/dir/disk.img")]
    DiskName(String),
}

pub fn workload_name(text: &str) -> Result<WorkloadName, ConvertError> {
    match text {
        "idle" => Ok(WorkloadName::Idle),
        "dirty" => Ok(WorkloadName::Dirty),
        "mem" => Ok(WorkloadName::Mem),
        "disk" => Ok(WorkloadName::Disk),
        "net" => Ok(WorkloadName::Net),
        other => Err(ConvertError::Workload(other.to_owned())),
    }
}

fn workload_str(w: WorkloadName) -> &'static str {
    match w {
        WorkloadName::Idle => "idle",
        WorkloadName::Dirty => "dirty",
        WorkloadName::Mem => "mem",
        WorkloadName::Disk => "disk",
        WorkloadName::Net => "net",
    }
}

pub fn restart_priority(text: &str) -> Result<RestartPriority, ConvertError> {
    match text {
        "" | "medium" => Ok(RestartPriority::Medium),
        "high" => Ok(RestartPriority::High),
        "low" => Ok(RestartPriority::Low),
        "none" => Ok(RestartPriority::None),
        other => Err(ConvertError::RestartPriority(other.to_owned())),
    }
}

fn restart_priority_str(p: RestartPriority) -> &'static str {
    match p {
        RestartPriority::High => "high",
        RestartPriority::Medium => "medium",
        RestartPriority::Low => "low",
        RestartPriority::None => "none",
    }
}

/// A protobuf spec as the cluster's [`VmSpec`] (not yet validated: `VmSpec::validate`).
pub fn spec_from_pb(spec: Option<pb::VmSpec>) -> Result<VmSpec, ConvertError> {
    let s = spec.ok_or(ConvertError::MissingSpec)?;
    let vcpus = u8::try_from(s.vcpus).map_err(|_| ConvertError::Vcpus(s.vcpus))?;
    let boot = match s.boot.ok_or(ConvertError::MissingBoot)? {
        pb::vm_spec::Boot::TestGuest(t) => {
            let mut w = TestWorkload::new(workload_name(&t.workload)?);
            if t.wss_mib != 0 {
                w.wss_mib = t.wss_mib;
            }
            if t.rate_mbps != 0 {
                w.rate_mbps = t.rate_mbps;
            }
            if t.seed != 0 {
                w.seed = t.seed;
            }
            if t.hb_ms != 0 {
                w.hb_ms = t.hb_ms;
            }
            if !t.net_ip.is_empty() {
                w.net_ip = Some(
                    t.net_ip
                        .parse()
                        .map_err(|_| ConvertError::NetIp(t.net_ip.clone()))?,
                );
            }
            BootSpec::TestGuest(w)
        }
        pb::vm_spec::Boot::Kernel(k) => BootSpec::Kernel {
            kernel: PathBuf::from(k.kernel),
            cmdline: k.cmdline,
            initrd: (!k.initrd.is_empty()).then(|| PathBuf::from(k.initrd)),
        },
    };
    let mut disks = Vec::with_capacity(s.disks.len());
    for d in s.disks {
        let name: DiskName = d
            .name
            .parse()
            .map_err(|_| ConvertError::DiskName(d.name.clone()))?;
        disks.push(DiskSpec {
            name,
            read_only: d.read_only,
        });
    }
    Ok(VmSpec {
        name: s.name,
        vcpus,
        memory_mib: s.memory_mib,
        boot,
        disks,
        restart_priority: restart_priority(&s.restart_priority)?,
        anti_affinity: s.anti_affinity.into_iter().collect::<BTreeSet<_>>(),
        preferred_owners: s
            .preferred_owners
            .into_iter()
            .map(scheduler::NodeId)
            .collect(),
        nics: s
            .nics
            .into_iter()
            .map(|n| NicSpec {
                network: n.network,
                mac: n.mac,
                mtu: n.mtu,
                ..Default::default()
            })
            .collect(),
    })
}

pub fn spec_to_pb(s: &VmSpec) -> pb::VmSpec {
    let boot = match &s.boot {
        BootSpec::TestGuest(w) => pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
            workload: workload_str(w.kind).into(),
            wss_mib: w.wss_mib,
            rate_mbps: w.rate_mbps,
            seed: w.seed,
            hb_ms: w.hb_ms,
            net_ip: w.net_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        }),
        BootSpec::Kernel {
            kernel,
            cmdline,
            initrd,
        } => pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: kernel.display().to_string(),
            cmdline: cmdline.clone(),
            initrd: initrd
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }),
    };
    pb::VmSpec {
        name: s.name.clone(),
        vcpus: u32::from(s.vcpus),
        memory_mib: s.memory_mib,
        boot: Some(boot),
        disks: s
            .disks
            .iter()
            .map(|d| pb::DiskSpec {
                name: d.name.to_string(),
                read_only: d.read_only,
            })
            .collect(),
        restart_priority: restart_priority_str(s.restart_priority).into(),
        anti_affinity: s.anti_affinity.iter().cloned().collect(),
        preferred_owners: s.preferred_owners.iter().map(|n| n.0).collect(),
        nics: s
            .nics
            .iter()
            .map(|n| pb::NicSpec {
                network: n.network.clone(),
                mac: n.mac.clone(),
                slot: n.slot.map(u32::from),
                mtu: n.mtu,
            })
            .collect(),
    }
}

pub fn record_to_pb(state: &ClusterState, r: &VmRecord) -> pb::VmInfo {
    pb::VmInfo {
        id: r.id,
        spec: Some(spec_to_pb(&r.spec)),
        desired: match r.desired {
            DesiredState::Running => pb::DesiredState::Running,
            DesiredState::Stopped => pb::DesiredState::Stopped,
        } as i32,
        owner_id: r.owner.unwrap_or(0),
        owner_name: r
            .owner
            .and_then(|o| state.nodes.get(&o))
            .map(|n| n.registration.name.clone())
            .unwrap_or_default(),
        runtime: match r.runtime {
            RuntimeState::Pending => pb::RuntimeState::Pending,
            RuntimeState::Starting => pb::RuntimeState::Starting,
            RuntimeState::Running => pb::RuntimeState::Running,
            RuntimeState::Stopping => pb::RuntimeState::Stopping,
            RuntimeState::Stopped => pb::RuntimeState::Stopped,
            RuntimeState::Failed => pb::RuntimeState::Failed,
        } as i32,
        reason: r.reason.clone(),
        generation: r.generation,
        created_unix_ms: r.created_unix_ms,
        updated_unix_ms: r.updated_unix_ms,
        migrating_to: r.migrating_to.unwrap_or(0),
        nic_taps: match r.owner {
            Some(node) => r
                .spec
                .nics
                .iter()
                .map(|n| crate::state::vm_spec::nic_tap_name(node, &n.mac))
                .collect(),
            None => Vec::new(),
        },
        demand: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pb_spec() -> pb::VmSpec {
        pb::VmSpec {
            name: "web1".into(),
            vcpus: 2,
            memory_mib: 128,
            boot: Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
                workload: "mem".into(),
                wss_mib: 8,
                ..Default::default()
            })),
            disks: vec![],
            restart_priority: "high".into(),
            anti_affinity: vec!["web".into()],
            preferred_owners: vec![2, 1],
            nics: vec![pb::NicSpec {
                network: "lan".into(),
                mac: "52:54:00:00:00:07".into(),
                slot: None,
                mtu: Some(9000),
            }],
        }
    }

    #[test]
    fn spec_round_trips_and_defaults_apply() {
        let s = spec_from_pb(Some(pb_spec())).expect("valid");
        assert_eq!(s.restart_priority, RestartPriority::High);
        match &s.boot {
            BootSpec::TestGuest(w) => {
                assert_eq!((w.kind, w.wss_mib, w.hb_ms), (WorkloadName::Mem, 8, 100))
            }
            other => panic!("boot {other:?}"),
        }
        assert_eq!(spec_from_pb(Some(spec_to_pb(&s))), Ok(s));
    }

    #[test]
    fn bad_fields_are_named() {
        let mut p = pb_spec();
        p.vcpus = 300;
        assert_eq!(spec_from_pb(Some(p)), Err(ConvertError::Vcpus(300)));
        let mut p = pb_spec();
        p.boot = None;
        assert_eq!(spec_from_pb(Some(p)), Err(ConvertError::MissingBoot));
        let mut p = pb_spec();
        p.restart_priority = "urgent".into();
        assert!(matches!(
            spec_from_pb(Some(p)),
            Err(ConvertError::RestartPriority(_))
        ));
        let mut p = pb_spec();
        p.boot = Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
            workload: "spin".into(),
            ..Default::default()
        }));
        let e = spec_from_pb(Some(p)).expect_err("bad workload");
        assert!(e.to_string().contains("spec.test_guest.workload \"spin\""));
        assert_eq!(spec_from_pb(None), Err(ConvertError::MissingSpec));
    }
}
