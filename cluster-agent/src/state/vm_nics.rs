//! Hot add / remove of a VM's NICs.
//!
//! Like disks (`state::vm_disks`): the operator's change is committed first, a
//! [`VmNicCommand`] (inside `Command::VmNic`) edits the NIC list of the VM's record on every
//! replica, deterministically (a missing MAC is generated as at create, unique in the
//! cluster; the NIC takes the lowest free slot and every other NIC's slot is pinned). The
//! owner's reconciler then brings the running VM in line (`control::vm_nics`): a NIC listed
//! but not present gets its TAP on the network's bridge and is hot-added; a NIC present but
//! no longer listed is hot-removed and its TAP deleted. A stopped VM just has its list
//! edited.
//!
//! **Architecture Invariant:** the NIC list in the committed record is the only input of
//! the owner's attach/detach; [`check`]/[`apply`] do no I/O and read no clock.

use serde::{Deserialize, Serialize};

use crate::state::vm_spec::{canonical_mac, generated_mac, NicSpec, SpecError};
use crate::state::vms::{mac_user, DesiredState, RuntimeState, VmRecord};
use crate::state::{ClusterState, EventKind, StateKey};
use vmm_node::config::NICS_MAX;

/// A change of a VM's NIC list, carried by the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "nic_cmd", rename_all = "snake_case")]
pub enum VmNicCommand {
    Attach {
        vm: String,
        nic: NicSpec,
        at_unix_ms: u64,
    },
    Detach {
        vm: String,
        mac: String,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for VmNicCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmNicCommand::Attach { vm, nic, .. } => {
                write!(f, "attach_nic({vm}, {}, {})", nic.network, nic.mac)
            }
            VmNicCommand::Detach { vm, mac, .. } => write!(f, "detach_nic({vm}, {mac})"),
        }
    }
}

/// Why a NIC change is refused (nothing changes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmNicError {
    #[error("no VM named {0:?}; `clusterctl vm list` shows the VMs")]
    UnknownVm(String),
    #[error("VM {vm:?} has no NIC with MAC {mac}; `clusterctl vm show {vm}` lists its NICs")]
    UnknownMac { vm: String, mac: String },
    #[error(
        "VM {vm:?} already has {NICS_MAX} NICs, the most a VM can have (every NIC slot is taken)"
    )]
    NoFreeSlot { vm: String },
    #[error("MAC {mac} is already used by VM {vm:?}; MACs are unique in the cluster")]
    MacInUse { mac: String, vm: String },
    #[error("network {network:?} is not configured on node {node}, where VM {vm:?} runs (its [[networks]] are: {known}); move the VM or configure the network there")]
    NetworkMissing {
        vm: String,
        network: String,
        node: u64,
        known: String,
    },
    #[error("invalid NIC: {0}")]
    Spec(SpecError),
    #[error("VM {vm:?} is migrating to node {to}; attach or detach NICs once it has moved")]
    Migrating { vm: String, to: u64 },
    #[error("VM {vm:?} is {runtime}; wait until it is running or stopped")]
    InTransition { vm: String, runtime: RuntimeState },
}

impl VmNicError {
    /// The class of this refusal (the API layer maps it onto a status code).
    pub fn class(&self) -> crate::state::vms::ErrorClass {
        match self {
            VmNicError::UnknownVm(_) | VmNicError::UnknownMac { .. } => {
                crate::state::vms::ErrorClass::NotFound
            }
            VmNicError::Spec(_) => crate::state::vms::ErrorClass::InvalidArgument,
            VmNicError::MacInUse { .. } => crate::state::vms::ErrorClass::AlreadyExists,
            _ => crate::state::vms::ErrorClass::FailedPrecondition,
        }
    }
}

/// Would `cmd` be accepted now? (The leader asks before proposing; apply asks again.)
pub fn check(state: &ClusterState, cmd: &VmNicCommand) -> Result<(), VmNicError> {
    let name = match cmd {
        VmNicCommand::Attach { vm, .. } | VmNicCommand::Detach { vm, .. } => vm,
    };
    let vm =
        crate::state::vms::find(state, name).ok_or_else(|| VmNicError::UnknownVm(name.clone()))?;
    if let Some(to) = vm.migrating_to {
        return Err(VmNicError::Migrating {
            vm: name.clone(),
            to,
        });
    }
    let settled = match vm.desired {
        DesiredState::Running => vm.runtime == RuntimeState::Running,
        DesiredState::Stopped => vm.runtime != RuntimeState::Stopping,
    };
    if !settled {
        return Err(VmNicError::InTransition {
            vm: name.clone(),
            runtime: vm.runtime,
        });
    }
    match cmd {
        VmNicCommand::Attach { nic, .. } => {
            let mut spec = vm.spec.clone();
            if spec.nics.len() >= NICS_MAX || spec.free_nic_slot().is_none() {
                return Err(VmNicError::NoFreeSlot { vm: name.clone() });
            }
            spec.nics.push(NicSpec {
                slot: spec.free_nic_slot(),
                ..nic.clone()
            });
            spec.validate().map_err(VmNicError::Spec)?;
            if !nic.mac.is_empty() {
                let mac = canonical_mac(&nic.mac)
                    .ok_or_else(|| VmNicError::Spec(SpecError::Mac(nic.mac.clone())))?;
                if let Some(user) = mac_user(state, &mac) {
                    return Err(VmNicError::MacInUse {
                        mac,
                        vm: user.to_owned(),
                    });
                }
            }
            // The NIC must be able to exist where the VM is (or would start: the owner).
            if let Some(node) = vm.owner {
                let networks = state
                    .nodes
                    .get(&node)
                    .map(|n| n.registration.networks.clone())
                    .unwrap_or_default();
                if !networks.contains_key(&nic.network) {
                    return Err(VmNicError::NetworkMissing {
                        vm: name.clone(),
                        network: nic.network.clone(),
                        node,
                        known: if networks.is_empty() {
                            "none".to_owned()
                        } else {
                            networks.keys().cloned().collect::<Vec<_>>().join(", ")
                        },
                    });
                }
            }
        }
        VmNicCommand::Detach { mac, .. } => {
            let canonical = canonical_mac(mac).unwrap_or_else(|| mac.clone());
            if !vm.spec.nics.iter().any(|n| n.mac == canonical) {
                return Err(VmNicError::UnknownMac {
                    vm: name.clone(),
                    mac: mac.clone(),
                });
            }
        }
    }
    Ok(())
}

/// Apply `cmd`; on refusal nothing changes and nothing is touched.
pub fn apply(
    state: &mut ClusterState,
    cmd: &VmNicCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), VmNicError> {
    check(state, cmd)?;
    let (name, at) = match cmd {
        VmNicCommand::Attach { vm, at_unix_ms, .. }
        | VmNicCommand::Detach { vm, at_unix_ms, .. } => (vm, *at_unix_ms),
    };
    let Some((id, _)) = state.vms.iter().find(|(_, v)| &v.spec.name == name) else {
        return Err(VmNicError::UnknownVm(name.clone()));
    };
    let id = *id;
    // Chosen before the record is borrowed mutably: the first candidate no NIC has.
    let generated = match cmd {
        VmNicCommand::Attach { nic, .. } if nic.mac.is_empty() => {
            let slot = state.vms[&id].spec.free_nic_slot().unwrap_or(0);
            (0..)
                .map(|attempt| generated_mac(id, usize::from(slot), attempt))
                .find(|m| mac_user(state, m).is_none())
        }
        _ => None,
    };
    let Some(vm) = state.vms.get_mut(&id) else {
        return Err(VmNicError::UnknownVm(name.clone()));
    };
    vm.spec.pin_nic_slots();
    let message = match cmd {
        VmNicCommand::Attach { nic, .. } => {
            let mac = generated
                .or_else(|| canonical_mac(&nic.mac))
                .unwrap_or_else(|| nic.mac.clone());
            let slot = vm.spec.free_nic_slot();
            vm.spec.nics.push(NicSpec {
                mac: mac.clone(),
                slot,
                ..nic.clone()
            });
            format!(
                "NIC {mac} on network {} attached to VM {name} (slot {})",
                nic.network,
                slot.unwrap_or(0)
            )
        }
        VmNicCommand::Detach { mac, .. } => {
            let canonical = canonical_mac(mac).unwrap_or_else(|| mac.clone());
            vm.spec.nics.retain(|n| n.mac != canonical);
            format!("NIC {canonical} detached from VM {name}")
        }
    };
    vm.updated_unix_ms = at;
    let node = vm.owner.unwrap_or(0);
    touched.push(StateKey::Vm(id));
    state.record_event(at, EventKind::Vm, node, message, touched);
    Ok(())
}

/// What the owner must do for one running VM whose NICs present now have the MACs
/// `present`: NICs to hot-add (with their slots), MACs to hot-remove.
pub fn plan(record: &VmRecord, present: &[String]) -> (Vec<NicSpec>, Vec<String>) {
    let mut spec = record.spec.clone();
    spec.pin_nic_slots();
    let attach = spec
        .nics
        .iter()
        .filter(|n| !present.contains(&n.mac))
        .cloned()
        .collect();
    let detach = present
        .iter()
        .filter(|m| !spec.nics.iter().any(|n| &n.mac == *m))
        .cloned()
        .collect();
    (attach, detach)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{amd, cluster};
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use crate::state::vms::VmCommand;
    use crate::state::{Command, CommandResult};

    fn nic(network: &str, mac: &str) -> NicSpec {
        NicSpec {
            network: network.into(),
            mac: mac.into(),
            ..Default::default()
        }
    }

    fn apply(s: &mut ClusterState, cmd: VmNicCommand) -> CommandResult {
        s.apply(&Command::VmNic(cmd)).0
    }

    fn attach(vm: &str, n: NicSpec) -> VmNicCommand {
        VmNicCommand::Attach {
            vm: vm.into(),
            nic: n,
            at_unix_ms: 3,
        }
    }

    #[test]
    fn attach_generates_a_unique_mac_pins_slots_and_refusals_change_nothing() {
        let mut s = cluster(1, |_| amd(4, 4 << 30));
        let mut a = VmSpec::test_guest("a", 1, 64, TestWorkload::new(WorkloadName::Net));
        a.nics = vec![
            nic("lan", "52:54:00:00:00:01"),
            nic("lan", "52:54:00:00:00:02"),
        ];
        let b = VmSpec::test_guest("b", 1, 64, TestWorkload::new(WorkloadName::Net));
        for spec in [a, b] {
            s.apply(&Command::Vm(VmCommand::CreateVm {
                spec,
                owner: None,
                at_unix_ms: 2,
            }));
        }
        // Remove the first NIC: the second keeps slot 1; a new NIC takes slot 0.
        let r = apply(
            &mut s,
            VmNicCommand::Detach {
                vm: "a".into(),
                mac: "52:54:00:00:00:01".into(),
                at_unix_ms: 3,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        assert_eq!(
            apply(&mut s, attach("a", nic("dmz", ""))),
            CommandResult::Ok
        );
        let rec = crate::state::vms::find(&s, "a")
            .cloned()
            .unwrap_or_else(|| panic!("a"));
        let got: Vec<(Option<u8>, &str)> = rec
            .spec
            .nics
            .iter()
            .map(|n| (n.slot, n.network.as_str()))
            .collect();
        assert_eq!(got, vec![(Some(1), "lan"), (Some(0), "dmz")]);
        let generated = rec.spec.nics[1].mac.clone();
        assert!(generated.starts_with("52:54:00:"), "{generated}");
        assert!(mac_user(&s, &generated) == Some("a"));

        let before = s.clone();
        for (cmd, needle) in [
            (
                attach("b", nic("lan", &generated.to_uppercase())),
                "already used by VM \"a\"",
            ),
            (attach("zz", nic("lan", "")), "no VM named"),
            (attach("b", nic("bad net", "")), "network name"),
            (
                VmNicCommand::Detach {
                    vm: "b".into(),
                    mac: "52:54:00:00:00:02".into(),
                    at_unix_ms: 4,
                },
                "no NIC with MAC",
            ),
        ] {
            let r = apply(&mut s, cmd);
            assert!(
                matches!(&r, CommandResult::Rejected { reason } if reason.contains(needle)),
                "{r:?} lacks {needle}"
            );
            assert_eq!(s, before);
        }
        // Four NICs are the most.
        assert_eq!(
            apply(&mut s, attach("a", nic("lan", ""))),
            CommandResult::Ok
        );
        assert_eq!(
            apply(&mut s, attach("a", nic("lan", ""))),
            CommandResult::Ok
        );
        let r = apply(&mut s, attach("a", nic("lan", "")));
        assert!(
            matches!(&r, CommandResult::Rejected { reason } if reason.contains("already has 4 NICs")),
            "{r:?}"
        );
        // The owner's plan: add what the record has and the VM lacks, remove the rest.
        let rec = crate::state::vms::find(&s, "a")
            .cloned()
            .unwrap_or_else(|| panic!("a"));
        let (add, remove) = plan(
            &rec,
            &["52:54:00:00:00:02".into(), "52:54:00:99:99:99".into()],
        );
        assert_eq!(add.len(), 3);
        assert!(add.iter().all(|n| n.slot.is_some()));
        assert_eq!(remove, vec!["52:54:00:99:99:99".to_string()]);
    }
}
