//! Conversion between the VM API's protobuf types (`cluster.vms.v1`) and the replicated
//! [`VmRecord`] / [`VmSpec`]. Bad client input becomes a [`ConvertError`] naming the field.

use std::collections::BTreeSet;
use std::path::PathBuf;

use cluster_proto::times;
use cluster_proto::vms as pb;
use csv_volume::DiskName;
use scheduler::RestartPriority;

use crate::state::vm_spec::{
    BootSpec, DiskSpec, NicSpec, RestartMode, RestartPolicy, TestWorkload, VmSpec, WorkloadName,
};
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
    #[error("spec.test_guest.workload {0} is not one of idle, dirty, mem, disk, net")]
    Workload(i32),
    #[error("spec.test_guest.heartbeat_interval: {0}")]
    HeartbeatInterval(cluster_proto::times::DurationError),
    #[error("spec.test_guest.net_ip {0:?} is not an IPv4 address")]
    NetIp(String),
    #[error("spec.restart_priority {0} is not one of high, medium, low, none")]
    RestartPriority(i32),
    #[error("spec.restart_policy.mode {0} is not one of on_failure, never")]
    RestartMode(i32),
    #[error("spec.restart_policy.window: {0}")]
    RestartWindow(cluster_proto::times::DurationError),
    #[error("spec.disks: {0:?} is not a disk name of the form volume/dir/disk.img")]
    DiskName(String),
}

/// The test guest's workload of an API value (unspecified or unknown: refused).
pub fn workload_name(v: i32) -> Result<WorkloadName, ConvertError> {
    match pb::Workload::try_from(v) {
        Ok(pb::Workload::Idle) => Ok(WorkloadName::Idle),
        Ok(pb::Workload::Dirty) => Ok(WorkloadName::Dirty),
        Ok(pb::Workload::Mem) => Ok(WorkloadName::Mem),
        Ok(pb::Workload::Disk) => Ok(WorkloadName::Disk),
        Ok(pb::Workload::Net) => Ok(WorkloadName::Net),
        Ok(pb::Workload::Unspecified) | Err(_) => Err(ConvertError::Workload(v)),
    }
}

fn workload_to_pb(w: WorkloadName) -> pb::Workload {
    match w {
        WorkloadName::Idle => pb::Workload::Idle,
        WorkloadName::Dirty => pb::Workload::Dirty,
        WorkloadName::Mem => pb::Workload::Mem,
        WorkloadName::Disk => pb::Workload::Disk,
        WorkloadName::Net => pb::Workload::Net,
    }
}

/// The restart priority of an API value (unspecified: medium; unknown: refused).
pub fn restart_priority(v: i32) -> Result<RestartPriority, ConvertError> {
    match pb::RestartPriority::try_from(v) {
        Ok(pb::RestartPriority::Unspecified | pb::RestartPriority::Medium) => {
            Ok(RestartPriority::Medium)
        }
        Ok(pb::RestartPriority::High) => Ok(RestartPriority::High),
        Ok(pb::RestartPriority::Low) => Ok(RestartPriority::Low),
        Ok(pb::RestartPriority::None) => Ok(RestartPriority::None),
        Err(_) => Err(ConvertError::RestartPriority(v)),
    }
}

fn restart_priority_to_pb(p: RestartPriority) -> pb::RestartPriority {
    match p {
        RestartPriority::High => pb::RestartPriority::High,
        RestartPriority::Medium => pb::RestartPriority::Medium,
        RestartPriority::Low => pb::RestartPriority::Low,
        RestartPriority::None => pb::RestartPriority::None,
    }
}

/// The restart policy of an API value: unset fields take the default's (on failure, 3
/// within 10 min); an unknown mode or a bad window is refused. Ranges are checked by
/// `VmSpec::validate`.
pub fn restart_policy(p: Option<pb::RestartPolicy>) -> Result<RestartPolicy, ConvertError> {
    let mut out = RestartPolicy::default();
    let Some(p) = p else { return Ok(out) };
    out.mode = match pb::RestartMode::try_from(p.mode) {
        Ok(pb::RestartMode::Unspecified | pb::RestartMode::OnFailure) => RestartMode::OnFailure,
        Ok(pb::RestartMode::Never) => RestartMode::Never,
        Err(_) => return Err(ConvertError::RestartMode(p.mode)),
    };
    if p.max_restarts != 0 {
        out.max_restarts = p.max_restarts;
    }
    if let Some(w) = &p.window {
        let ms = times::duration_ms(w).map_err(ConvertError::RestartWindow)?;
        if ms != 0 {
            // Whole seconds; a part second rounds up so a tiny window is not 0.
            out.window_s = ms.div_ceil(1000);
        }
    }
    Ok(out)
}

fn restart_policy_to_pb(p: &RestartPolicy) -> pb::RestartPolicy {
    pb::RestartPolicy {
        mode: match p.mode {
            RestartMode::OnFailure => pb::RestartMode::OnFailure,
            RestartMode::Never => pb::RestartMode::Never,
        } as i32,
        max_restarts: p.max_restarts,
        window: Some(times::duration_from_ms(p.window_s.saturating_mul(1000))),
    }
}

/// A protobuf spec as the cluster's [`VmSpec`] (not yet validated: `VmSpec::validate`).
pub fn spec_from_pb(spec: Option<pb::VmSpec>) -> Result<VmSpec, ConvertError> {
    let s = spec.ok_or(ConvertError::MissingSpec)?;
    let vcpus = u8::try_from(s.vcpus).map_err(|_| ConvertError::Vcpus(s.vcpus))?;
    let boot = match s.boot.ok_or(ConvertError::MissingBoot)? {
        pb::vm_spec::Boot::TestGuest(t) => {
            let mut w = TestWorkload::new(workload_name(t.workload)?);
            if t.wss_mib != 0 {
                w.wss_mib = t.wss_mib;
            }
            if t.rate_mbps != 0 {
                w.rate_mbps = t.rate_mbps;
            }
            if t.seed != 0 {
                w.seed = t.seed;
            }
            if let Some(hb) = &t.heartbeat_interval {
                let ms = times::duration_ms(hb).map_err(ConvertError::HeartbeatInterval)?;
                if ms != 0 {
                    w.hb_ms = ms;
                }
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
        restart_priority: restart_priority(s.restart_priority)?,
        restart_policy: restart_policy(s.restart_policy)?,
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
            workload: workload_to_pb(w.kind) as i32,
            wss_mib: w.wss_mib,
            rate_mbps: w.rate_mbps,
            seed: w.seed,
            heartbeat_interval: Some(times::duration_from_ms(w.hb_ms)),
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
        restart_priority: restart_priority_to_pb(s.restart_priority) as i32,
        restart_policy: Some(restart_policy_to_pb(&s.restart_policy)),
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
        created_at: times::timestamp_from_unix_ms(r.created_unix_ms),
        updated_at: times::timestamp_from_unix_ms(r.updated_unix_ms),
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
        restarts: r
            .restarts_unix_ms
            .iter()
            .filter_map(|t| times::timestamp_from_unix_ms(*t))
            .collect(),
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
                workload: pb::Workload::Mem as i32,
                wss_mib: 8,
                ..Default::default()
            })),
            disks: vec![],
            restart_priority: pb::RestartPriority::High as i32,
            anti_affinity: vec!["web".into()],
            preferred_owners: vec![2, 1],
            nics: vec![pb::NicSpec {
                network: "lan".into(),
                mac: "52:54:00:00:00:07".into(),
                slot: None,
                mtu: Some(9000),
            }],
            restart_policy: Some(pb::RestartPolicy {
                mode: pb::RestartMode::OnFailure as i32,
                max_restarts: 5,
                window: Some(cluster_proto::times::duration_from_ms(60_000)),
            }),
        }
    }

    #[test]
    fn spec_round_trips_and_defaults_apply() {
        let s = spec_from_pb(Some(pb_spec())).expect("valid");
        assert_eq!(s.restart_priority, RestartPriority::High);
        let mut unset = pb_spec();
        unset.restart_priority = pb::RestartPriority::Unspecified as i32;
        let unset = spec_from_pb(Some(unset)).expect("valid");
        assert_eq!(unset.restart_priority, RestartPriority::Medium);
        assert_eq!(
            (s.restart_policy.max_restarts, s.restart_policy.window_s),
            (5, 60)
        );
        let mut no_policy = pb_spec();
        no_policy.restart_policy = None;
        let no_policy = spec_from_pb(Some(no_policy)).expect("valid");
        assert_eq!(no_policy.restart_policy, RestartPolicy::default());
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
        p.restart_priority = 99;
        assert!(matches!(
            spec_from_pb(Some(p)),
            Err(ConvertError::RestartPriority(_))
        ));
        let mut p = pb_spec();
        p.restart_policy = Some(pb::RestartPolicy {
            mode: 7,
            ..Default::default()
        });
        let e = spec_from_pb(Some(p)).expect_err("bad restart mode");
        assert!(e.to_string().contains("spec.restart_policy.mode 7"), "{e}");
        let mut p = pb_spec();
        p.boot = Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
            workload: 42,
            ..Default::default()
        }));
        let e = spec_from_pb(Some(p)).expect_err("bad workload");
        assert!(e.to_string().contains("spec.test_guest.workload 42"));
        let mut p = pb_spec();
        p.boot = Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
            workload: pb::Workload::Idle as i32,
            heartbeat_interval: Some(cluster_proto::prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..Default::default()
        }));
        assert!(matches!(
            spec_from_pb(Some(p)),
            Err(ConvertError::HeartbeatInterval(_))
        ));
        assert_eq!(spec_from_pb(None), Err(ConvertError::MissingSpec));
    }
}
