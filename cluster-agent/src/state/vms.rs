//! Replicated VM records: the VM part of the pure cluster state machine.
//!
//! A [`VmRecord`] holds what the cluster knows of a VM: its [`VmSpec`], the desired state
//! an operator asked for, the owner node the leader chose (through the scheduler) and the
//! runtime state the owner last reported. Every change travels through Raft as a
//! [`VmCommand`] inside `Command::Vm` and is applied here deterministically: the same
//! command is refused the same way on every replica and a refusal changes nothing.
//!
//! `generation` increases with every decision (start, stop, owner change). An owner's
//! [`VmCommand::ReportVmState`] carries the generation it acted on; a report for an older
//! generation or from a node that no longer owns the VM is refused as stale, so a slow
//! report can never overwrite a newer decision.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::vm_spec::{canonical_mac, generated_mac, RestartMode, SpecError, VmSpec};
use crate::state::{ClusterState, EventKind, NodeState, StateKey};

/// Operator's wish for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Stopped,
}

impl DesiredState {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Stopped => "stopped",
        }
    }
}

/// What the owner last reported (or what the last decision implies until it reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeState {
    /// Created, never started.
    Pending,
    /// Started by the leader; the owner has not confirmed yet.
    Starting,
    Running,
    /// Stop decided; the owner has not confirmed yet.
    Stopping,
    Stopped,
    /// The VM could not start or ended by itself; `reason` says why.
    Failed,
}

impl RuntimeState {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeState::Pending => "pending",
            RuntimeState::Starting => "starting",
            RuntimeState::Running => "running",
            RuntimeState::Stopping => "stopping",
            RuntimeState::Stopped => "stopped",
            RuntimeState::Failed => "failed",
        }
    }

    /// States an owner may report.
    pub fn reportable(self) -> bool {
        matches!(
            self,
            RuntimeState::Running | RuntimeState::Stopped | RuntimeState::Failed
        )
    }
}

impl std::fmt::Display for RuntimeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One VM of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: u64,
    pub spec: VmSpec,
    pub desired: DesiredState,
    /// Node that runs (or last ran) the VM; `None` until first placed.
    pub owner: Option<u64>,
    pub runtime: RuntimeState,
    /// Why the VM is in its runtime state (failure reason, who stopped it); may be empty.
    pub reason: String,
    pub generation: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Target node of a live migration in progress (the owner runs the source side).
    #[serde(default)]
    pub migrating_to: Option<u64>,
    /// The migration in progress is a quick one (save to the shared volume, restore).
    #[serde(default)]
    pub migration_quick: bool,
    /// Set at a quick migration's switchover: the new owner restores the saved image
    /// (instead of booting) while the record is at this generation.
    #[serde(default)]
    pub quick_restore_generation: Option<u64>,
    /// When a migration last brought the VM to its owner (the balancer's dwell time).
    #[serde(default)]
    pub moved_unix_ms: Option<u64>,
    /// Automatic restarts after failures (the restart policy) within its current window,
    /// oldest first; cleared when an operator starts the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts_unix_ms: Vec<u64>,
}

/// VM commands carried by the Raft log inside `Command::Vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "vm_cmd", rename_all = "snake_case")]
pub enum VmCommand {
    /// Define a VM; with `owner` set it is started there at once.
    CreateVm {
        spec: VmSpec,
        owner: Option<u64>,
        at_unix_ms: u64,
    },
    /// Desired Running on `owner` (chosen by the leader's scheduler).
    StartVm {
        name: String,
        owner: u64,
        at_unix_ms: u64,
    },
    /// Desired Stopped.
    StopVm { name: String, at_unix_ms: u64 },
    /// Forget a stopped VM.
    DeleteVm { name: String, at_unix_ms: u64 },
    /// Move ownership (migration switchover, failover restart).
    SetVmOwner {
        name: String,
        owner: u64,
        at_unix_ms: u64,
    },
    /// Live-migrate the running VM to `to`; the owner runs the source side.
    StartMigration {
        name: String,
        to: u64,
        at_unix_ms: u64,
        /// Quick migration (save to the shared volume, restore on `to`) instead of live.
        #[serde(default)]
        quick: bool,
        /// Longest acceptable blackout (`None`: the engine's default).
        #[serde(default)]
        max_downtime_ms: Option<u64>,
        /// Give up and roll back when not converged by then (`None`: the engine's default).
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// Live: most bytes/s the migration may send (`None` or 0: unlimited).
        #[serde(default)]
        bandwidth_bytes_per_s_max: Option<u64>,
        /// The leader's prediction, kept in the migration record beside the actual figures.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        predicted: Option<crate::state::migrations::Prediction>,
    },
    /// The migration to `to` ended: on success `to` becomes the owner (switchover).
    FinishMigration {
        name: String,
        to: u64,
        ok: bool,
        reason: String,
        at_unix_ms: u64,
        /// The engine's final figures and receipt digests (see `crate::state::migrations`).
        #[serde(default)]
        stats: Option<crate::state::migrations::MigrationSummary>,
    },
    /// The owner reports what its VMM did for decision `generation`.
    ReportVmState {
        name: String,
        node_id: u64,
        generation: u64,
        runtime: RuntimeState,
        reason: String,
        at_unix_ms: u64,
        /// A `failed` report of a VM that failed while running (not a failed start, not
        /// a guest power-off): the VM's restart policy decides whether its owner starts
        /// it again (a new generation, `starting`) or it stays failed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restart: bool,
    },
}

impl VmCommand {
    pub fn vm_name(&self) -> &str {
        match self {
            VmCommand::CreateVm { spec, .. } => &spec.name,
            VmCommand::StartVm { name, .. }
            | VmCommand::StopVm { name, .. }
            | VmCommand::DeleteVm { name, .. }
            | VmCommand::SetVmOwner { name, .. }
            | VmCommand::StartMigration { name, .. }
            | VmCommand::FinishMigration { name, .. }
            | VmCommand::ReportVmState { name, .. } => name,
        }
    }

    fn verb(&self) -> &'static str {
        match self {
            VmCommand::CreateVm { .. } => "create_vm",
            VmCommand::StartVm { .. } => "start_vm",
            VmCommand::StopVm { .. } => "stop_vm",
            VmCommand::DeleteVm { .. } => "delete_vm",
            VmCommand::SetVmOwner { .. } => "set_vm_owner",
            VmCommand::ReportVmState { .. } => "report_vm_state",
            VmCommand::StartMigration { .. } => "start_migration",
            VmCommand::FinishMigration { .. } => "finish_migration",
        }
    }
}

impl std::fmt::Display for VmCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.verb(), self.vm_name())
    }
}

/// Why a VM command is refused. Each message names the field or VM at fault.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmStateError {
    #[error("invalid VM spec")]
    Spec(#[source] SpecError),
    #[error("memory_mib {memory_mib} exceeds the largest node ({largest_mib} MiB)")]
    MemoryBeyondNodes { memory_mib: u64, largest_mib: u64 },
    #[error("a VM named {0:?} already exists")]
    DuplicateName(String),
    #[error("MAC {mac} is already used by VM {vm:?}; give another MAC or leave it out to have one generated")]
    MacInUse { mac: String, vm: String },
    #[error("no VM named {0:?}; `clusterctl vm list` shows the VMs")]
    UnknownVm(String),
    #[error("unknown node id {0}")]
    UnknownNode(u64),
    #[error("node {node} is {state}; VMs can only be started on an up node")]
    NodeNotUp { node: u64, state: NodeState },
    #[error("VM {name:?} is already started on node {owner}")]
    AlreadyStarted { name: String, owner: u64 },
    #[error("VM {name:?} is {runtime} (desired {desired}); stop it before deleting it")]
    DeleteRunning {
        name: String,
        runtime: RuntimeState,
        desired: &'static str,
    },
    #[error("VM {name:?} is owned by node {owner}, not node {node}")]
    NotOwner {
        name: String,
        owner: String,
        node: u64,
    },
    #[error("report for VM {name:?} is for generation {got}, the current one is {current}")]
    StaleGeneration {
        name: String,
        got: u64,
        current: u64,
    },
    #[error("runtime state {0} cannot be reported; use running, stopped or failed")]
    NotReportable(RuntimeState),
    #[error("VM {name:?} is {runtime} (desired {desired}); only a running VM can be migrated")]
    NotMigratable {
        name: String,
        runtime: RuntimeState,
        desired: &'static str,
    },
    #[error("VM {name:?} already runs on node {node}")]
    SameNode { name: String, node: u64 },
    #[error("VM {name:?} is already migrating to node {to}")]
    AlreadyMigrating { name: String, to: u64 },
    #[error("VM {name:?} is not migrating to node {to}")]
    NotMigrating { name: String, to: u64 },
    #[error("bad migration options: {0}")]
    BadMigrationOptions(String),
}

/// How a refusal maps onto an API status class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
}

impl VmStateError {
    pub fn class(&self) -> ErrorClass {
        match self {
            VmStateError::Spec(_)
            | VmStateError::MemoryBeyondNodes { .. }
            | VmStateError::NotReportable(_)
            | VmStateError::BadMigrationOptions(_) => ErrorClass::InvalidArgument,
            VmStateError::UnknownVm(_) | VmStateError::UnknownNode(_) => ErrorClass::NotFound,
            VmStateError::DuplicateName(_) | VmStateError::MacInUse { .. } => {
                ErrorClass::AlreadyExists
            }
            VmStateError::NodeNotUp { .. }
            | VmStateError::AlreadyStarted { .. }
            | VmStateError::DeleteRunning { .. }
            | VmStateError::NotOwner { .. }
            | VmStateError::NotMigratable { .. }
            | VmStateError::SameNode { .. }
            | VmStateError::AlreadyMigrating { .. }
            | VmStateError::NotMigrating { .. }
            | VmStateError::StaleGeneration { .. } => ErrorClass::FailedPrecondition,
        }
    }
}

/// Longest `--max-downtime` accepted.
pub const MAX_DOWNTIME_MS_MAX: u64 = 60_000;
/// Longest `--deadline` accepted.
pub const DEADLINE_MS_MAX: u64 = 24 * 3_600_000;

/// The live migration options the engine accepts: 1 ms ≤ max downtime ≤ 60 s, and a
/// deadline longer than the max downtime (either may be left to the default).
pub fn check_migration_options(
    max_downtime_ms: Option<u64>,
    deadline_ms: Option<u64>,
) -> Result<(), VmStateError> {
    let bad = |m: String| Err(VmStateError::BadMigrationOptions(m));
    if let Some(d) = max_downtime_ms {
        if d == 0 || d > MAX_DOWNTIME_MS_MAX {
            return bad(format!(
                "max_downtime_ms {d} is out of range (1..={MAX_DOWNTIME_MS_MAX})"
            ));
        }
    }
    if let Some(t) = deadline_ms {
        if t == 0 || t > DEADLINE_MS_MAX {
            return bad(format!(
                "deadline_ms {t} is out of range (1..={DEADLINE_MS_MAX})"
            ));
        }
        let downtime = max_downtime_ms
            .unwrap_or(vmm_node::migration::convergence::DEFAULT_MAX_DOWNTIME.as_millis() as u64);
        if t <= downtime {
            return bad(format!(
                "deadline_ms {t} must exceed the max downtime ({downtime} ms)"
            ));
        }
    }
    Ok(())
}

/// The bandwidth cap the engine accepts: none, 0 (also none) or at least 1 MiB/s.
pub fn check_bandwidth_cap(bandwidth_bytes_per_s_max: Option<u64>) -> Result<(), VmStateError> {
    let min = vmm_node::migration::transport::BANDWIDTH_BYTES_PER_S_MIN;
    match bandwidth_bytes_per_s_max {
        Some(b) if b != 0 && b < min => Err(VmStateError::BadMigrationOptions(format!(
            "bandwidth_bytes_per_s_max {b} is below the minimum of {min} (1 MiB/s); \
             leave it unset or 0 for no cap"
        ))),
        _ => Ok(()),
    }
}

/// The VM named `name`, if any.
pub fn find<'a>(state: &'a ClusterState, name: &str) -> Option<&'a VmRecord> {
    state.vms.values().find(|v| v.spec.name == name)
}

fn find_id(vms: &BTreeMap<u64, VmRecord>, name: &str) -> Option<u64> {
    vms.iter()
        .find(|(_, v)| v.spec.name == name)
        .map(|(id, _)| *id)
}

fn check_owner(state: &ClusterState, owner: u64) -> Result<(), VmStateError> {
    let node = state
        .nodes
        .get(&owner)
        .ok_or(VmStateError::UnknownNode(owner))?;
    if node.state != NodeState::Up {
        return Err(VmStateError::NodeNotUp {
            node: owner,
            state: node.state,
        });
    }
    Ok(())
}

/// Spec checks that depend on the cluster: the pure spec rules plus "fits some node".
/// The VM (name) whose NIC has `mac` (canonical form), if any.
pub fn mac_user<'s>(state: &'s ClusterState, mac: &str) -> Option<&'s str> {
    state
        .vms
        .values()
        .find(|v| v.spec.nics.iter().any(|n| n.mac == mac))
        .map(|v| v.spec.name.as_str())
}

/// `spec` as stored for VM `id`: given MACs in canonical form, missing ones generated (the
/// first candidate no VM uses, so every replica picks the same).
fn with_macs(state: &ClusterState, id: u64, spec: &VmSpec) -> VmSpec {
    let mut spec = spec.clone();
    for i in 0..spec.nics.len() {
        if !spec.nics[i].mac.is_empty() {
            if let Some(m) = canonical_mac(&spec.nics[i].mac) {
                spec.nics[i].mac = m;
            }
            continue;
        }
        let taken = |m: &str| mac_user(state, m).is_some() || spec.nics.iter().any(|n| n.mac == m);
        let mac = (0..)
            .map(|attempt| generated_mac(id, i, attempt))
            .find(|m| !taken(m))
            .unwrap_or_default();
        spec.nics[i].mac = mac;
    }
    spec
}

pub fn validate_spec(state: &ClusterState, spec: &VmSpec) -> Result<(), VmStateError> {
    spec.validate().map_err(VmStateError::Spec)?;
    let largest_mib = state
        .nodes
        .values()
        .map(|n| n.registration.facts.memory_bytes >> 20)
        .max()
        .unwrap_or(0);
    if spec.memory_mib > largest_mib {
        return Err(VmStateError::MemoryBeyondNodes {
            memory_mib: spec.memory_mib,
            largest_mib,
        });
    }
    Ok(())
}

/// [`check`] of a `StartMigration` whose target may still be open (`to` 0: the
/// scheduler picks it later): every rule but the target's.
pub fn check_migration_start(state: &ClusterState, cmd: &VmCommand) -> Result<(), VmStateError> {
    match check(state, cmd) {
        Err(VmStateError::UnknownNode(0))
            if matches!(cmd, VmCommand::StartMigration { to: 0, .. }) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Would `cmd` be accepted now? (The leader asks before proposing; apply asks again.)
pub fn check(state: &ClusterState, cmd: &VmCommand) -> Result<(), VmStateError> {
    let existing = |name: &str| find(state, name).ok_or(VmStateError::UnknownVm(name.to_owned()));
    match cmd {
        VmCommand::CreateVm { spec, owner, .. } => {
            validate_spec(state, spec)?;
            if find(state, &spec.name).is_some() {
                return Err(VmStateError::DuplicateName(spec.name.clone()));
            }
            for nic in spec.nics.iter().filter(|n| !n.mac.is_empty()) {
                let mac = canonical_mac(&nic.mac).unwrap_or_else(|| nic.mac.clone());
                if let Some(vm) = mac_user(state, &mac) {
                    return Err(VmStateError::MacInUse {
                        mac,
                        vm: vm.to_owned(),
                    });
                }
            }
            if let Some(o) = owner {
                check_owner(state, *o)?;
            }
        }
        VmCommand::StartVm { name, owner, .. } => {
            let vm = existing(name)?;
            // A VM that failed (to start, or by itself) may be started again.
            if vm.desired == DesiredState::Running && vm.runtime != RuntimeState::Failed {
                return Err(VmStateError::AlreadyStarted {
                    name: name.clone(),
                    owner: vm.owner.unwrap_or(0),
                });
            }
            check_owner(state, *owner)?;
        }
        VmCommand::StopVm { name, .. } => {
            existing(name)?;
        }
        VmCommand::DeleteVm { name, .. } => {
            let vm = existing(name)?;
            let idle = matches!(
                vm.runtime,
                RuntimeState::Pending | RuntimeState::Stopped | RuntimeState::Failed
            );
            if vm.desired == DesiredState::Running || !idle {
                return Err(VmStateError::DeleteRunning {
                    name: name.clone(),
                    runtime: vm.runtime,
                    desired: vm.desired.as_str(),
                });
            }
        }
        VmCommand::SetVmOwner { name, owner, .. } => {
            existing(name)?;
            check_owner(state, *owner)?;
        }
        VmCommand::StartMigration {
            name,
            to,
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max,
            ..
        } => {
            check_migration_options(*max_downtime_ms, *deadline_ms)?;
            check_bandwidth_cap(*bandwidth_bytes_per_s_max)?;
            let vm = existing(name)?;
            if vm.desired != DesiredState::Running || vm.runtime != RuntimeState::Running {
                return Err(VmStateError::NotMigratable {
                    name: name.clone(),
                    runtime: vm.runtime,
                    desired: vm.desired.as_str(),
                });
            }
            if let Some(t) = vm.migrating_to {
                return Err(VmStateError::AlreadyMigrating {
                    name: name.clone(),
                    to: t,
                });
            }
            if vm.owner == Some(*to) {
                return Err(VmStateError::SameNode {
                    name: name.clone(),
                    node: *to,
                });
            }
            check_owner(state, *to)?;
        }
        VmCommand::FinishMigration { name, to, .. } => {
            let vm = existing(name)?;
            if vm.migrating_to != Some(*to) {
                return Err(VmStateError::NotMigrating {
                    name: name.clone(),
                    to: *to,
                });
            }
        }
        VmCommand::ReportVmState {
            name,
            node_id,
            generation,
            runtime,
            ..
        } => {
            let vm = existing(name)?;
            if !runtime.reportable() {
                return Err(VmStateError::NotReportable(*runtime));
            }
            if vm.owner != Some(*node_id) {
                return Err(VmStateError::NotOwner {
                    name: name.clone(),
                    owner: vm.owner.map_or("none".into(), |o| o.to_string()),
                    node: *node_id,
                });
            }
            if *generation != vm.generation {
                return Err(VmStateError::StaleGeneration {
                    name: name.clone(),
                    got: *generation,
                    current: vm.generation,
                });
            }
        }
    }
    Ok(())
}

/// Apply `cmd` to `state`; on refusal nothing changes and nothing is touched.
pub fn apply(
    state: &mut ClusterState,
    cmd: &VmCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), VmStateError> {
    check(state, cmd)?;
    let (at, message) = match cmd {
        VmCommand::CreateVm {
            spec,
            owner,
            at_unix_ms,
        } => {
            state.last_vm_id += 1;
            let id = state.last_vm_id;
            let spec = with_macs(state, id, spec);
            let (desired, runtime, generation) = match owner {
                Some(_) => (DesiredState::Running, RuntimeState::Starting, 1),
                None => (DesiredState::Stopped, RuntimeState::Pending, 0),
            };
            state.vms.insert(
                id,
                VmRecord {
                    id,
                    spec: spec.clone(),
                    desired,
                    owner: *owner,
                    runtime,
                    reason: String::new(),
                    generation,
                    created_unix_ms: *at_unix_ms,
                    updated_unix_ms: *at_unix_ms,
                    migrating_to: None,
                    migration_quick: false,
                    quick_restore_generation: None,
                    moved_unix_ms: None,
                    restarts_unix_ms: Vec::new(),
                },
            );
            touched.push(StateKey::Vm(id));
            let placed = owner.map_or(String::new(), |o| format!(", started on node {o}"));
            (
                *at_unix_ms,
                format!("VM {} (id {id}) created{placed}", spec.name),
            )
        }
        VmCommand::StartVm {
            name,
            owner,
            at_unix_ms,
        } => {
            let vm = record_mut(state, name, touched)?;
            vm.desired = DesiredState::Running;
            vm.owner = Some(*owner);
            vm.runtime = RuntimeState::Starting;
            vm.reason.clear();
            vm.generation += 1;
            vm.updated_unix_ms = *at_unix_ms;
            // An operator's start ends a crash loop's count.
            vm.restarts_unix_ms.clear();
            (*at_unix_ms, format!("VM {name} started on node {owner}"))
        }
        VmCommand::StopVm { name, at_unix_ms } => {
            let vm = record_mut(state, name, touched)?;
            vm.desired = DesiredState::Stopped;
            vm.runtime = match vm.runtime {
                RuntimeState::Starting | RuntimeState::Running | RuntimeState::Stopping => {
                    RuntimeState::Stopping
                }
                other => other,
            };
            vm.reason = "stopped by the operator".into();
            vm.generation += 1;
            vm.updated_unix_ms = *at_unix_ms;
            (*at_unix_ms, format!("VM {name} stop requested"))
        }
        VmCommand::DeleteVm { name, at_unix_ms } => {
            if let Some(id) = find_id(&state.vms, name) {
                state.vms.remove(&id);
                touched.push(StateKey::Vm(id));
            }
            (*at_unix_ms, format!("VM {name} deleted"))
        }
        VmCommand::SetVmOwner {
            name,
            owner,
            at_unix_ms,
        } => {
            let vm = record_mut(state, name, touched)?;
            let from = vm.owner;
            vm.owner = Some(*owner);
            vm.migrating_to = None;
            if vm.desired == DesiredState::Running {
                vm.runtime = RuntimeState::Starting;
            }
            vm.generation += 1;
            vm.updated_unix_ms = *at_unix_ms;
            (
                *at_unix_ms,
                match from {
                    Some(f) => format!("VM {name} owner node {f} -> node {owner}"),
                    None => format!("VM {name} owner none -> node {owner}"),
                },
            )
        }
        VmCommand::StartMigration {
            name,
            to,
            at_unix_ms,
            quick,
            ..
        } => {
            let vm = record_mut(state, name, touched)?;
            vm.migrating_to = Some(*to);
            vm.migration_quick = *quick;
            vm.updated_unix_ms = *at_unix_ms;
            let kind = if *quick {
                "quick migration"
            } else {
                "migration"
            };
            (
                *at_unix_ms,
                format!("VM {name} {kind} to node {to} started"),
            )
        }
        VmCommand::FinishMigration {
            name,
            to,
            ok,
            reason,
            at_unix_ms,
            ..
        } => {
            let vm = record_mut(state, name, touched)?;
            vm.migrating_to = None;
            let quick = std::mem::take(&mut vm.migration_quick);
            vm.updated_unix_ms = *at_unix_ms;
            if *ok {
                vm.owner = Some(*to);
                vm.moved_unix_ms = Some(*at_unix_ms);
                vm.runtime = RuntimeState::Starting;
                vm.generation += 1;
                if quick {
                    vm.quick_restore_generation = Some(vm.generation);
                }
                (
                    *at_unix_ms,
                    format!("VM {name} migrated to node {to} ({reason})"),
                )
            } else {
                (
                    *at_unix_ms,
                    format!("VM {name} migration to node {to} failed: {reason}"),
                )
            }
        }
        VmCommand::ReportVmState {
            name,
            node_id,
            runtime: RuntimeState::Failed,
            reason,
            at_unix_ms,
            restart: true,
            ..
        } => {
            let vm = record_mut(state, name, touched)?;
            let message = restart_after_failure(vm, *node_id, reason, *at_unix_ms);
            (*at_unix_ms, message)
        }
        VmCommand::ReportVmState {
            name,
            node_id,
            runtime,
            reason,
            at_unix_ms,
            ..
        } => {
            let vm = record_mut(state, name, touched)?;
            let changed = vm.runtime != *runtime || vm.reason != *reason;
            vm.runtime = *runtime;
            vm.reason = reason.clone();
            vm.updated_unix_ms = *at_unix_ms;
            if !changed {
                return Ok(());
            }
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            };
            (
                *at_unix_ms,
                format!("VM {name} is {runtime} on node {node_id}{why}"),
            )
        }
    };
    let node = match cmd {
        VmCommand::ReportVmState { node_id, .. } => *node_id,
        _ => find(state, cmd.vm_name())
            .and_then(|v| v.owner)
            .unwrap_or(0),
    };
    state.record_event(at, EventKind::Vm, node, message, touched);
    Ok(())
}

/// A `failed` report with `restart` set: what the VM's restart policy makes of it. A VM
/// still meant to run here is restarted (a new generation, `starting`, the restart
/// remembered) while its policy allows one more within its window; otherwise it is left
/// `failed` with the reason and why it was not restarted. Returns the event's message.
fn restart_after_failure(vm: &mut VmRecord, node: u64, reason: &str, at: u64) -> String {
    let name = vm.spec.name.clone();
    let policy = vm.spec.restart_policy;
    let window_ms = policy.window_s.saturating_mul(1000);
    vm.restarts_unix_ms
        .retain(|t| at.saturating_sub(*t) < window_ms && *t <= at);
    vm.updated_unix_ms = at;
    let refused = if vm.desired != DesiredState::Running {
        Some("it is not meant to run".to_string())
    } else if let Some(to) = vm.migrating_to {
        Some(format!("it was migrating to node {to}"))
    } else if policy.mode == RestartMode::Never {
        Some("its restart policy is never".to_string())
    } else if vm.restarts_unix_ms.len() >= policy.max_restarts as usize {
        Some(format!(
            "restarted {} times within {} s (restart policy {}); start it when the cause is fixed",
            vm.restarts_unix_ms.len(),
            policy.window_s,
            policy.describe()
        ))
    } else {
        None
    };
    match refused {
        Some(why) => {
            vm.runtime = RuntimeState::Failed;
            vm.reason = format!("{reason}; not restarted: {why}");
            format!("VM {name} failed on node {node}: {}", vm.reason)
        }
        None => {
            vm.restarts_unix_ms.push(at);
            vm.runtime = RuntimeState::Starting;
            vm.generation += 1;
            vm.reason = format!("restarted after a failure: {reason}");
            format!(
                "VM {name} failed on node {node}: {reason}; restarting it there (restart {} of {} within {} s)",
                vm.restarts_unix_ms.len(),
                policy.max_restarts,
                policy.window_s
            )
        }
    }
}

/// The record of VM `name` (found by `check` just before), touched for persistence.
fn record_mut<'a>(
    state: &'a mut ClusterState,
    name: &str,
    touched: &mut Vec<StateKey>,
) -> Result<&'a mut VmRecord, VmStateError> {
    let id = find_id(&state.vms, name).ok_or_else(|| VmStateError::UnknownVm(name.to_owned()))?;
    touched.push(StateKey::Vm(id));
    state
        .vms
        .get_mut(&id)
        .ok_or_else(|| VmStateError::UnknownVm(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::vm_spec::{TestWorkload, WorkloadName};
    use crate::state::{Command, CommandResult, NodeFacts};

    fn state_with_nodes(n: u64) -> ClusterState {
        crate::state::fixtures::cluster(n, |_| NodeFacts {
            memory_bytes: 4 << 30,
            logical_cpus: 4,
            ..NodeFacts::default()
        })
    }

    fn spec(name: &str) -> VmSpec {
        VmSpec::test_guest(name, 1, 64, TestWorkload::new(WorkloadName::Mem))
    }

    fn vm(s: &mut ClusterState, c: VmCommand) -> CommandResult {
        s.apply(&Command::Vm(c)).0
    }

    fn rejected(r: CommandResult) -> String {
        match r {
            CommandResult::Rejected { reason } => reason,
            other => format!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn macs_are_generated_once_and_unique_in_the_cluster() {
        use crate::state::vm_spec::NicSpec;
        let mut s = state_with_nodes(1);
        let with_nic = |name: &str, mac: &str| {
            let mut sp = spec(name);
            sp.nics.push(NicSpec {
                network: "lan".into(),
                mac: mac.into(),
                ..Default::default()
            });
            VmCommand::CreateVm {
                spec: sp,
                owner: None,
                at_unix_ms: 1,
            }
        };
        assert_eq!(vm(&mut s, with_nic("a", "")), CommandResult::Ok);
        let mac_a = find(&s, "a").unwrap().spec.nics[0].mac.clone();
        assert_eq!(mac_a, generated_mac(1, 0, 0));
        assert_eq!(
            vm(&mut s, with_nic("b", "52:54:00:AB:CD:EF")),
            CommandResult::Ok
        );
        assert_eq!(find(&s, "b").unwrap().spec.nics[0].mac, "52:54:00:ab:cd:ef");
        // A given MAC another VM has is refused with that VM named; nothing changes.
        let before = s.clone();
        let why = rejected(vm(&mut s, with_nic("c", &mac_a.to_uppercase())));
        assert!(why.contains(&mac_a) && why.contains("\"a\""), "{why}");
        assert_eq!(s, before);
        // A generated MAC skips the ones in use: VM 3's first candidate is taken.
        assert_eq!(
            vm(&mut s, with_nic("c", &generated_mac(4, 0, 0))),
            CommandResult::Ok
        );
        assert_eq!(vm(&mut s, with_nic("d", "")), CommandResult::Ok);
        assert_eq!(
            find(&s, "d").unwrap().spec.nics[0].mac,
            generated_mac(4, 0, 1)
        );
    }

    #[test]
    fn create_start_report_stop_delete() {
        let mut s = state_with_nodes(2);
        let r = vm(
            &mut s,
            VmCommand::CreateVm {
                spec: spec("a"),
                owner: Some(2),
                at_unix_ms: 10,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        let rec = find(&s, "a").cloned().expect("created");
        assert_eq!(rec.id, 1);
        assert_eq!(
            (rec.desired, rec.owner, rec.runtime, rec.generation),
            (DesiredState::Running, Some(2), RuntimeState::Starting, 1)
        );
        let report = |runtime, generation, node_id| VmCommand::ReportVmState {
            name: "a".into(),
            node_id,
            generation,
            runtime,
            reason: String::new(),
            at_unix_ms: 11,
            restart: false,
        };
        assert_eq!(
            vm(&mut s, report(RuntimeState::Running, 1, 2)),
            CommandResult::Ok
        );
        assert_eq!(
            find(&s, "a").map(|v| v.runtime),
            Some(RuntimeState::Running)
        );
        // Deleting a running VM is refused and changes nothing.
        let before = s.clone();
        let why = rejected(vm(
            &mut s,
            VmCommand::DeleteVm {
                name: "a".into(),
                at_unix_ms: 12,
            },
        ));
        assert!(why.contains("stop it before deleting"), "{why}");
        assert_eq!(s, before);
        vm(
            &mut s,
            VmCommand::StopVm {
                name: "a".into(),
                at_unix_ms: 13,
            },
        );
        let rec = find(&s, "a").cloned().expect("exists");
        assert_eq!((rec.runtime, rec.generation), (RuntimeState::Stopping, 2));
        // A report for the old decision is stale; the owner's report for gen 2 lands.
        assert!(rejected(vm(&mut s, report(RuntimeState::Running, 1, 2))).contains("generation 1"));
        assert!(
            rejected(vm(&mut s, report(RuntimeState::Stopped, 2, 1))).contains("owned by node 2")
        );
        assert_eq!(
            vm(&mut s, report(RuntimeState::Stopped, 2, 2)),
            CommandResult::Ok
        );
        assert_eq!(
            vm(
                &mut s,
                VmCommand::DeleteVm {
                    name: "a".into(),
                    at_unix_ms: 14,
                },
            ),
            CommandResult::Ok
        );
        assert!(s.vms.is_empty());
        // Ids are never reused.
        vm(
            &mut s,
            VmCommand::CreateVm {
                spec: spec("b"),
                owner: None,
                at_unix_ms: 15,
            },
        );
        assert_eq!(
            find(&s, "b").map(|v| (v.id, v.runtime)),
            Some((2, RuntimeState::Pending))
        );
    }

    #[test]
    fn a_failure_is_restarted_per_policy_until_the_crash_loop_bound() {
        let mut s = state_with_nodes(2);
        let mut sp = spec("a");
        sp.restart_policy.max_restarts = 2;
        sp.restart_policy.window_s = 60;
        let create = VmCommand::CreateVm {
            spec: sp,
            owner: Some(2),
            at_unix_ms: 0,
        };
        assert_eq!(vm(&mut s, create), CommandResult::Ok);
        let report = |runtime, generation, at_unix_ms, restart| VmCommand::ReportVmState {
            name: "a".into(),
            node_id: 2,
            generation,
            runtime,
            reason: "worker died".into(),
            at_unix_ms,
            restart,
        };
        let state = |s: &ClusterState| {
            let r = find(s, "a").expect("exists");
            (r.runtime, r.generation, r.restarts_unix_ms.clone())
        };
        vm(&mut s, report(RuntimeState::Running, 1, 1_000, false));
        // Two failures within the window: restarted each time (a new generation).
        vm(&mut s, report(RuntimeState::Failed, 1, 10_000, true));
        assert_eq!(state(&s), (RuntimeState::Starting, 2, vec![10_000]));
        assert!(find(&s, "a")
            .unwrap()
            .reason
            .contains("restarted after a failure: worker died"));
        vm(&mut s, report(RuntimeState::Running, 2, 11_000, false));
        vm(&mut s, report(RuntimeState::Failed, 2, 20_000, true));
        assert_eq!(state(&s), (RuntimeState::Starting, 3, vec![10_000, 20_000]));
        let last = s.events.values().last().expect("event").message.clone();
        assert!(
            last.contains("restarting it there (restart 2 of 2 within 60 s)"),
            "{last}"
        );
        // A third within 60 s: a crash loop, left failed with the reason.
        vm(&mut s, report(RuntimeState::Running, 3, 21_000, false));
        vm(&mut s, report(RuntimeState::Failed, 3, 30_000, true));
        assert_eq!(state(&s), (RuntimeState::Failed, 3, vec![10_000, 20_000]));
        let why = find(&s, "a").unwrap().reason.clone();
        assert!(
            why.contains("worker died; not restarted: restarted 2 times within 60 s"),
            "{why}"
        );
        // An operator's start clears the count; failures older than the window expire.
        let start = VmCommand::StartVm {
            name: "a".into(),
            owner: 2,
            at_unix_ms: 31_000,
        };
        assert_eq!(vm(&mut s, start), CommandResult::Ok);
        assert_eq!(state(&s), (RuntimeState::Starting, 4, vec![]));
        vm(&mut s, report(RuntimeState::Running, 4, 32_000, false));
        vm(&mut s, report(RuntimeState::Failed, 4, 40_000, true));
        vm(&mut s, report(RuntimeState::Running, 5, 41_000, false));
        vm(&mut s, report(RuntimeState::Failed, 5, 90_000, true));
        vm(&mut s, report(RuntimeState::Running, 6, 91_000, false));
        vm(&mut s, report(RuntimeState::Failed, 6, 110_000, true));
        assert_eq!(
            state(&s),
            (RuntimeState::Starting, 7, vec![90_000, 110_000])
        );
        // A failure without `restart` (a failed start) is left failed.
        vm(&mut s, report(RuntimeState::Failed, 7, 111_000, false));
        assert_eq!(state(&s).0, RuntimeState::Failed);
    }

    #[test]
    fn a_never_policy_or_a_stopped_vm_is_not_restarted() {
        let mut s = state_with_nodes(2);
        let mut sp = spec("a");
        sp.restart_policy.mode = crate::state::vm_spec::RestartMode::Never;
        vm(
            &mut s,
            VmCommand::CreateVm {
                spec: sp,
                owner: Some(2),
                at_unix_ms: 0,
            },
        );
        let failed = |generation| VmCommand::ReportVmState {
            name: "a".into(),
            node_id: 2,
            generation,
            runtime: RuntimeState::Failed,
            reason: "GuestReset".into(),
            at_unix_ms: 5,
            restart: true,
        };
        vm(&mut s, failed(1));
        let r = find(&s, "a").expect("exists");
        assert_eq!((r.runtime, r.generation), (RuntimeState::Failed, 1));
        assert!(
            r.reason.contains("its restart policy is never"),
            "{}",
            r.reason
        );
        // A bad policy is refused with the fields named.
        let mut bad = spec("b");
        bad.restart_policy.max_restarts = 0;
        let why = rejected(vm(
            &mut s,
            VmCommand::CreateVm {
                spec: bad,
                owner: None,
                at_unix_ms: 6,
            },
        ));
        assert!(why.contains("max_restarts must be 1..=100"), "{why}");
    }

    #[test]
    fn bad_input_is_refused_with_the_field_named() {
        let mut s = state_with_nodes(1);
        let create = |spec: VmSpec, owner| VmCommand::CreateVm {
            spec,
            owner,
            at_unix_ms: 1,
        };
        let mut zero = spec("z");
        zero.vcpus = 0;
        let mut many = spec("m");
        many.vcpus = 33;
        let mut nomem = spec("n");
        nomem.memory_mib = 0;
        let mut huge = spec("h");
        huge.memory_mib = 8192;
        let mut badname = spec("x");
        badname.name = "bad name".into();
        let cases = [
            (create(zero, None), "vcpus"),
            (create(many, None), "vcpus"),
            (create(nomem, None), "memory_mib"),
            (create(huge, None), "largest node (4096 MiB)"),
            (create(badname, None), "VM name"),
            (create(spec("u"), Some(9)), "unknown node id 9"),
            (
                VmCommand::StopVm {
                    name: "ghost".into(),
                    at_unix_ms: 1,
                },
                "no VM named \"ghost\"",
            ),
            (
                VmCommand::ReportVmState {
                    name: "ghost".into(),
                    node_id: 1,
                    generation: 0,
                    runtime: RuntimeState::Running,
                    reason: String::new(),
                    at_unix_ms: 1,
                    restart: false,
                },
                "no VM named",
            ),
        ];
        for (cmd, want) in cases {
            let before = s.clone();
            let (r, touched) = s.apply(&Command::Vm(cmd.clone()));
            let why = rejected(r);
            assert!(why.contains(want), "{cmd}: {why:?} lacks {want:?}");
            assert!(touched.is_empty());
            assert_eq!(s, before);
        }
        assert_eq!(vm(&mut s, create(spec("d"), Some(1))), CommandResult::Ok);
        let why = rejected(vm(&mut s, create(spec("d"), None)));
        assert!(why.contains("already exists"), "{why}");
        let why = rejected(vm(
            &mut s,
            VmCommand::StartVm {
                name: "d".into(),
                owner: 1,
                at_unix_ms: 2,
            },
        ));
        assert!(why.contains("already started on node 1"), "{why}");
        assert_eq!(
            check(
                &s,
                &VmCommand::StartVm {
                    name: "ghost".into(),
                    owner: 1,
                    at_unix_ms: 2
                }
            )
            .map_err(|e| e.class()),
            Err(ErrorClass::NotFound)
        );
    }

    #[test]
    fn down_node_cannot_take_a_vm() {
        let mut s = state_with_nodes(2);
        s.apply(&Command::SetNodeState {
            node_id: 2,
            state: NodeState::Down,
            at_unix_ms: 1,
            reason: "test".into(),
        });
        let why = rejected(vm(
            &mut s,
            VmCommand::CreateVm {
                spec: spec("a"),
                owner: Some(2),
                at_unix_ms: 2,
            },
        ));
        assert!(why.contains("node 2 is down"), "{why}");
    }

    #[test]
    fn vm_commands_round_trip_through_json() {
        let c = Command::Vm(VmCommand::CreateVm {
            spec: spec("a"),
            owner: Some(3),
            at_unix_ms: 7,
        });
        let j = serde_json::to_string(&c).unwrap_or_default();
        assert!(
            j.contains(r#""cmd":"vm""#) && j.contains(r#""vm_cmd":"create_vm""#),
            "{j}"
        );
        let back: Result<Command, _> = serde_json::from_str(&j);
        assert_eq!(back.ok(), Some(c));
        let mut s = state_with_nodes(1);
        vm(
            &mut s,
            VmCommand::CreateVm {
                spec: spec("a"),
                owner: Some(1),
                at_unix_ms: 7,
            },
        );
        let j = serde_json::to_string(&s).unwrap_or_default();
        let back: Result<ClusterState, _> = serde_json::from_str(&j);
        assert_eq!(back.ok(), Some(s));
    }

    #[test]
    fn migration_start_finish_and_refusals() {
        let mut s = state_with_nodes(3);
        vm(
            &mut s,
            VmCommand::CreateVm {
                spec: spec("m"),
                owner: Some(1),
                at_unix_ms: 1,
            },
        );
        let start = |to| VmCommand::StartMigration {
            name: "m".into(),
            to,
            at_unix_ms: 2,
            quick: false,
            max_downtime_ms: None,
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            predicted: None,
        };
        // Not running yet (Starting): refused.
        assert!(rejected(vm(&mut s, start(2))).contains("only a running VM"));
        vm(
            &mut s,
            VmCommand::ReportVmState {
                name: "m".into(),
                node_id: 1,
                generation: 1,
                runtime: RuntimeState::Running,
                reason: String::new(),
                at_unix_ms: 2,
                restart: false,
            },
        );
        assert!(rejected(vm(&mut s, start(1))).contains("already runs on node 1"));
        assert!(rejected(vm(&mut s, start(9))).contains("unknown node id 9"));
        assert_eq!(vm(&mut s, start(2)), CommandResult::Ok);
        assert!(rejected(vm(&mut s, start(3))).contains("already migrating to node 2"));
        let finish = |to, ok| VmCommand::FinishMigration {
            name: "m".into(),
            to,
            ok,
            reason: "r".into(),
            at_unix_ms: 3,
            stats: None,
        };
        assert!(rejected(vm(&mut s, finish(3, true))).contains("not migrating to node 3"));
        // A failed migration leaves the owner; a successful one switches it over.
        assert_eq!(vm(&mut s, finish(2, false)), CommandResult::Ok);
        let r = find(&s, "m").cloned().expect("exists");
        assert_eq!((r.owner, r.migrating_to, r.generation), (Some(1), None, 1));
        vm(&mut s, start(2));
        assert_eq!(vm(&mut s, finish(2, true)), CommandResult::Ok);
        let r = find(&s, "m").cloned().expect("exists");
        assert_eq!(
            (r.owner, r.migrating_to, r.generation, r.runtime),
            (Some(2), None, 2, RuntimeState::Starting)
        );
    }

    #[test]
    fn a_failed_vm_can_be_started_again() {
        let mut s = state_with_nodes(2);
        vm(
            &mut s,
            VmCommand::CreateVm {
                spec: spec("f"),
                owner: Some(1),
                at_unix_ms: 1,
            },
        );
        vm(
            &mut s,
            VmCommand::ReportVmState {
                name: "f".into(),
                node_id: 1,
                generation: 1,
                runtime: RuntimeState::Failed,
                reason: "guest exited".into(),
                at_unix_ms: 2,
                restart: false,
            },
        );
        assert_eq!(
            find(&s, "f").map(|v| (v.runtime, v.reason.as_str())),
            Some((RuntimeState::Failed, "guest exited"))
        );
        let r = vm(
            &mut s,
            VmCommand::StartVm {
                name: "f".into(),
                owner: 2,
                at_unix_ms: 3,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        let v = find(&s, "f").cloned().expect("exists");
        assert_eq!(
            (v.owner, v.runtime, v.generation, v.reason.as_str()),
            (Some(2), RuntimeState::Starting, 2, "")
        );
    }
}
