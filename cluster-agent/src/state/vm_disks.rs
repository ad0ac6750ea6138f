//! Hot add / remove of shared-volume disks on VMs.
//!
//! The operator's change is committed first: a [`VmDiskCommand`] (inside
//! `Command::VmDisk`) edits the disk list of the VM's record, deterministically, on every
//! replica. The owner's reconciler then brings the running VM in line
//! (`control::vm_disks`): a
//! disk listed but not attached is locked (committed `Acquire`) and attached through
//! vmhost; a disk attached but no longer listed is detached (flushed, closed) and its lock
//! released (committed `Release`). A stopped VM just has its disk list edited.
//!
//! **Architecture Invariant:** the disk list in the committed record is the only input of
//! the owner's attach/detach; the pure part ([`check`]/[`apply`]) does no I/O and reads no
//! clock.

use std::collections::BTreeSet;

use csv_volume::DiskName;
use serde::{Deserialize, Serialize};

use crate::state::vm_spec::DiskSpec;
use crate::state::vms::{DesiredState, RuntimeState, VmRecord};
use crate::state::{ClusterState, EventKind, StateKey};
use vmm_node::config::VIRTIO_BLK_SLOTS;

/// A change of a VM's disk list, carried by the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "disk_cmd", rename_all = "snake_case")]
pub enum VmDiskCommand {
    Attach {
        vm: String,
        disk: DiskSpec,
        at_unix_ms: u64,
    },
    Detach {
        vm: String,
        disk: DiskName,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for VmDiskCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmDiskCommand::Attach { vm, disk, .. } => write!(f, "attach_disk({vm}, {})", disk.name),
            VmDiskCommand::Detach { vm, disk, .. } => write!(f, "detach_disk({vm}, {disk})"),
        }
    }
}

/// Why a disk change is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmDiskError {
    #[error("no VM named {0:?}; `clusterctl vm list` shows the VMs")]
    UnknownVm(String),
    #[error("disk {disk} is already attached to VM {vm:?}")]
    AlreadyAttached { vm: String, disk: String },
    #[error("disk {disk} is not attached to VM {vm:?}")]
    NotAttached { vm: String, disk: String },
    #[error("VM {vm:?} already has {VIRTIO_BLK_SLOTS} disks, the most a VM can have")]
    NoFreeSlot { vm: String },
    #[error("disk {disk} is used by VM(s) {users:?}; a disk written by one VM cannot be attached to another")]
    InUse { disk: String, users: Vec<String> },
    #[error("VM {vm:?} is migrating to node {to}; attach or detach disks once it has moved")]
    Migrating { vm: String, to: u64 },
    #[error("VM {vm:?} is {runtime}; wait until it is running or stopped")]
    InTransition { vm: String, runtime: RuntimeState },
}

impl VmDiskError {
    /// The class of this refusal (the API layer maps it onto a status code).
    pub fn class(&self) -> crate::state::vms::ErrorClass {
        match self {
            VmDiskError::UnknownVm(_) => crate::state::vms::ErrorClass::NotFound,
            _ => crate::state::vms::ErrorClass::FailedPrecondition,
        }
    }
}

/// Would `cmd` be accepted now? (The leader asks before proposing; apply asks again.)
pub fn check(state: &ClusterState, cmd: &VmDiskCommand) -> Result<(), VmDiskError> {
    let name = match cmd {
        VmDiskCommand::Attach { vm, .. } | VmDiskCommand::Detach { vm, .. } => vm,
    };
    let vm =
        crate::state::vms::find(state, name).ok_or_else(|| VmDiskError::UnknownVm(name.clone()))?;
    if let Some(to) = vm.migrating_to {
        return Err(VmDiskError::Migrating {
            vm: name.clone(),
            to,
        });
    }
    let settled = match vm.desired {
        DesiredState::Running => vm.runtime == RuntimeState::Running,
        DesiredState::Stopped => vm.runtime != RuntimeState::Stopping,
    };
    if !settled {
        return Err(VmDiskError::InTransition {
            vm: name.clone(),
            runtime: vm.runtime,
        });
    }
    match cmd {
        VmDiskCommand::Attach { disk, .. } => {
            if vm.spec.disks.iter().any(|d| d.name == disk.name) {
                return Err(VmDiskError::AlreadyAttached {
                    vm: name.clone(),
                    disk: disk.name.to_string(),
                });
            }
            if vm.spec.disks.len() >= VIRTIO_BLK_SLOTS {
                return Err(VmDiskError::NoFreeSlot { vm: name.clone() });
            }
            let users = conflicting_users(state, name, disk);
            if !users.is_empty() {
                return Err(VmDiskError::InUse {
                    disk: disk.name.to_string(),
                    users,
                });
            }
        }
        VmDiskCommand::Detach { disk, .. } => {
            if !vm.spec.disks.iter().any(|d| &d.name == disk) {
                return Err(VmDiskError::NotAttached {
                    vm: name.clone(),
                    disk: disk.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// Other VMs whose use of `disk` conflicts with `vm` using it: any writer, or any user
/// when `disk` is to be written. Read-only users may share a disk.
pub fn conflicting_users(state: &ClusterState, vm: &str, disk: &DiskSpec) -> Vec<String> {
    state
        .vms
        .values()
        .filter(|v| v.spec.name != vm)
        .filter(|v| {
            v.spec
                .disks
                .iter()
                .any(|d| d.name == disk.name && !(d.read_only && disk.read_only))
        })
        .map(|v| v.spec.name.clone())
        .collect()
}

/// Apply `cmd`; on refusal nothing changes and nothing is touched.
pub fn apply(
    state: &mut ClusterState,
    cmd: &VmDiskCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), VmDiskError> {
    check(state, cmd)?;
    let (name, at) = match cmd {
        VmDiskCommand::Attach { vm, at_unix_ms, .. }
        | VmDiskCommand::Detach { vm, at_unix_ms, .. } => (vm, *at_unix_ms),
    };
    let Some((id, vm)) = state.vms.iter_mut().find(|(_, v)| &v.spec.name == name) else {
        return Err(VmDiskError::UnknownVm(name.clone()));
    };
    let message = match cmd {
        VmDiskCommand::Attach { disk, .. } => {
            vm.spec.disks.push(disk.clone());
            format!("disk {} attached to VM {name}", disk.name)
        }
        VmDiskCommand::Detach { disk, .. } => {
            vm.spec.disks.retain(|d| &d.name != disk);
            format!("disk {disk} detached from VM {name}")
        }
    };
    vm.updated_unix_ms = at;
    let node = vm.owner.unwrap_or(0);
    touched.push(StateKey::Vm(*id));
    state.record_event(at, EventKind::Disk, node, message, touched);
    Ok(())
}

/// What the owner must do for one running VM: disks to attach, disks to detach.
pub fn plan(record: &VmRecord, attached: &[DiskName]) -> (Vec<DiskSpec>, Vec<DiskName>) {
    let want: BTreeSet<&DiskName> = record.spec.disks.iter().map(|d| &d.name).collect();
    let have: BTreeSet<&DiskName> = attached.iter().collect();
    let attach = record
        .spec
        .disks
        .iter()
        .filter(|d| !have.contains(&d.name))
        .cloned()
        .collect();
    let detach = attached
        .iter()
        .filter(|d| !want.contains(d))
        .cloned()
        .collect();
    (attach, detach)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use crate::state::vms::VmCommand;
    use crate::state::{Command, CommandResult, NodeFacts, NodeRegistration};

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode {
            registration: NodeRegistration {
                trust: Default::default(),
                node_id: 1,
                name: "n1".into(),
                mgmt_addr: "127.0.1.1:7001".into(),
                raft_addr: "127.0.1.1:7002".into(),
                migration_addr: "127.0.2.1:7003".into(),
                mgmt_subnet: "127.0.1.0/24".into(),
                migration_subnet: "127.0.2.0/24".into(),
                facts: NodeFacts {
                    memory_bytes: 4 << 30,
                    logical_cpus: 4,
                    ..NodeFacts::default()
                },
                networks: Default::default(),
                power: Default::default(),
            },
            at_unix_ms: 1,
        });
        for name in ["a", "b"] {
            s.apply(&Command::Vm(VmCommand::CreateVm {
                spec: VmSpec::test_guest(name, 1, 64, TestWorkload::new(WorkloadName::Disk)),
                owner: None,
                at_unix_ms: 2,
            }));
        }
        s
    }

    fn disk(name: &str, read_only: bool) -> DiskSpec {
        DiskSpec {
            name: DiskName::parse(name).unwrap_or_else(|e| panic!("{e}")),
            read_only,
        }
    }

    fn attach(s: &mut ClusterState, vm: &str, d: DiskSpec) -> CommandResult {
        s.apply(&Command::VmDisk(VmDiskCommand::Attach {
            vm: vm.into(),
            disk: d,
            at_unix_ms: 3,
        }))
        .0
    }

    #[test]
    fn attach_detach_edit_the_record_and_refusals_change_nothing() {
        let mut s = state();
        assert_eq!(
            attach(&mut s, "a", disk("vol/x.img", false)),
            CommandResult::Ok
        );
        let before = s.clone();
        for (vm, d, needle) in [
            ("a", disk("vol/x.img", false), "already attached"),
            ("b", disk("vol/x.img", true), "used by VM(s) [\"a\"]"),
            ("zz", disk("vol/y.img", false), "no VM named"),
        ] {
            let r = attach(&mut s, vm, d);
            assert!(
                matches!(&r, CommandResult::Rejected { reason } if reason.contains(needle)),
                "{r:?} lacks {needle}"
            );
            assert_eq!(s, before);
        }
        let r = s
            .apply(&Command::VmDisk(VmDiskCommand::Detach {
                vm: "b".into(),
                disk: DiskName::parse("vol/x.img").unwrap_or_else(|e| panic!("{e}")),
                at_unix_ms: 4,
            }))
            .0;
        assert!(matches!(r, CommandResult::Rejected { .. }));
        let rec = crate::state::vms::find(&s, "a").cloned();
        let rec = rec.unwrap_or_else(|| panic!("vm a"));
        let (add, remove) = plan(
            &rec,
            &[DiskName::parse("vol/old.img").unwrap_or_else(|e| panic!("{e}"))],
        );
        assert_eq!(add, vec![disk("vol/x.img", false)]);
        assert_eq!(remove.len(), 1);
        // Read-only users may share a disk.
        assert_eq!(
            attach(&mut s, "a", disk("vol/ro.img", true)),
            CommandResult::Ok
        );
        assert_eq!(
            attach(&mut s, "b", disk("vol/ro.img", true)),
            CommandResult::Ok
        );
    }
}
