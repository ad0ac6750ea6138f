//! Replicated migration records: the migration part of the pure cluster state machine.
//!
//! A [`MigrationRecord`] is opened when a `VmCommand::StartMigration` is applied and
//! closed by the matching `VmCommand::FinishMigration` (succeeded / failed, or cancelled
//! when an operator's [`MigrationCommand::CancelMigration`] was committed first), with
//! the engine's final statistics and both receipt digests. A running record whose VM
//! lost its migration some other way (failover owner change, delete) is closed as
//! failed. Finished records are kept up to [`MIGRATION_HISTORY_MAX`]; the oldest finished
//! ones are dropped first.
//!
//! A migration that only a busy migration slot stands in the way of is opened `queued`
//! (`MigrationCommand::QueueMigration`, see `migration_queue`); the `StartMigration` that
//! the leader commits for it later turns that record into the running one.
//!
//! **Architecture Invariant:** at most one running-or-queued migration record per VM; a
//! VM has a running one exactly while its `VmRecord::migrating_to` is set (a queued one
//! never sets it); records change only in `apply` (pure, deterministic: no clock,
//! timestamps travel in commands).

use serde::{Deserialize, Serialize};

use crate::state::vms::VmCommand;
use crate::state::{ClusterState, EventKind, StateKey};

/// Finished migration records kept (running ones are never dropped).
pub const MIGRATION_HISTORY_MAX: usize = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationKind {
    Live,
    /// Saved to the shared volume, restored on the target.
    Quick,
}

impl MigrationKind {
    pub fn of(quick: bool) -> MigrationKind {
        if quick {
            MigrationKind::Quick
        } else {
            MigrationKind::Live
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MigrationKind::Live => "live",
            MigrationKind::Quick => "quick",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Waiting for a migration slot of its source or target (at most one live migration
    /// per node); started by the leader's queue loop in order.
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl MigrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationState::Queued => "queued",
            MigrationState::Running => "running",
            MigrationState::Succeeded => "succeeded",
            MigrationState::Failed => "failed",
            MigrationState::Cancelled => "cancelled",
        }
    }

    pub fn finished(self) -> bool {
        !matches!(self, MigrationState::Queued | MigrationState::Running)
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The engine's figures of a finished migration, as the source reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub rounds: u32,
    pub guest_bytes: u64,
    pub wire_bytes: u64,
    pub total_us: u64,
    pub blackout_us: u64,
    pub max_throttle_percent: u8,
    /// Digest of guest memory as sent (source side of the receipt).
    pub source_digest: u64,
    /// Digest as received (the target's receipt); `None` when the target never sent one.
    pub target_digest: Option<u64>,
    pub receipt_matches: bool,
}

impl MigrationSummary {
    pub fn from_stats(s: &vmm_node::migration::stats::MigrationStats) -> MigrationSummary {
        MigrationSummary {
            rounds: s.rounds.len() as u32,
            guest_bytes: s.guest_bytes,
            wire_bytes: s.wire_bytes,
            total_us: s.total_us,
            blackout_us: s.blackout.total_us,
            max_throttle_percent: s.max_throttle_percent,
            source_digest: s.source_digest,
            target_digest: s.target_digest,
            receipt_matches: s.receipt_matches(),
        }
    }
}

/// What the leader predicted for a migration when it started it (the dry run's figures,
/// calibrated by the cluster's measured migrations), kept beside the actual ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    /// From the committed start to the committed end.
    pub total_ms: u64,
    /// `None`: not predicted (a job's move keeps only its planned duration).
    pub blackout_us: Option<u64>,
}

/// One migration of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: u64,
    pub vm: String,
    pub source: u64,
    pub target: u64,
    pub kind: MigrationKind,
    /// Options the operator chose (`None`: the engine's default).
    pub max_downtime_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    /// Live: most bytes/s the migration may send (`None` or 0: unlimited).
    #[serde(default)]
    pub bandwidth_bytes_per_s_max: Option<u64>,
    pub state: MigrationState,
    /// An operator asked to cancel; the source aborts and rolls back.
    pub cancel_requested: bool,
    pub started_unix_ms: u64,
    pub ended_unix_ms: Option<u64>,
    /// Why it failed, or the source's summary line.
    pub reason: String,
    pub stats: Option<MigrationSummary>,
    /// The leader's prediction at the start (`None`: none was made, e.g. a record of an
    /// older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Prediction>,
}

/// Migration commands carried by the Raft log inside `Command::Migration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "migration_cmd", rename_all = "snake_case")]
pub enum MigrationCommand {
    /// Ask the source of running migration `id` to abort and roll back; a queued one is
    /// cancelled at once.
    CancelMigration { id: u64, at_unix_ms: u64 },
    /// Queue a migration of `vm` that cannot start now only because a migration slot is
    /// busy. `to` 0: the scheduler picks the target when it starts.
    QueueMigration {
        vm: String,
        to: u64,
        quick: bool,
        max_downtime_ms: Option<u64>,
        deadline_ms: Option<u64>,
        #[serde(default)]
        bandwidth_bytes_per_s_max: Option<u64>,
        at_unix_ms: u64,
    },
    /// Drop queued migration `id`: it can no longer start (the VM stopped, the target
    /// went away...).
    DropQueued {
        id: u64,
        reason: String,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for MigrationCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationCommand::CancelMigration { id, .. } => write!(f, "cancel_migration({id})"),
            MigrationCommand::QueueMigration { vm, to, .. } => {
                write!(f, "queue_migration({vm}, {to})")
            }
            MigrationCommand::DropQueued { id, .. } => write!(f, "drop_queued({id})"),
        }
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MigrationError {
    #[error("no migration with id {0}; `clusterctl migration list` shows them")]
    Unknown(u64),
    #[error("migration {id} already {state}; only a running or queued migration can be cancelled")]
    Finished { id: u64, state: MigrationState },
    #[error("migration {0} is already being cancelled")]
    AlreadyCancelling(u64),
    #[error("migration {0} is a quick migration (save, hand off, restore), which cannot be cancelled midway")]
    QuickNotCancellable(u64),
    #[error("VM {vm} already has migration {id} {state}")]
    VmBusy {
        vm: String,
        id: u64,
        state: MigrationState,
    },
    #[error("migration {id} is {state}, not queued")]
    NotQueued { id: u64, state: MigrationState },
    #[error(transparent)]
    Vm(#[from] crate::state::vms::VmStateError),
}

impl MigrationError {
    pub fn class(&self) -> crate::state::vms::ErrorClass {
        match self {
            MigrationError::Unknown(_) => crate::state::vms::ErrorClass::NotFound,
            MigrationError::Finished { .. }
            | MigrationError::AlreadyCancelling(_)
            | MigrationError::QuickNotCancellable(_)
            | MigrationError::VmBusy { .. }
            | MigrationError::NotQueued { .. } => crate::state::vms::ErrorClass::FailedPrecondition,
            MigrationError::Vm(e) => e.class(),
        }
    }
}

/// The running migration of `vm`, if any.
pub fn running_of<'a>(state: &'a ClusterState, vm: &str) -> Option<&'a MigrationRecord> {
    state
        .migrations
        .values()
        .rev()
        .find(|m| m.vm == vm && m.state == MigrationState::Running)
}

/// The queued migration of `vm`, if any.
pub fn queued_of<'a>(state: &'a ClusterState, vm: &str) -> Option<&'a MigrationRecord> {
    state
        .migrations
        .values()
        .find(|m| m.vm == vm && m.state == MigrationState::Queued)
}

/// The queued migrations, oldest first.
pub fn queue(state: &ClusterState) -> Vec<&MigrationRecord> {
    state
        .migrations
        .values()
        .filter(|m| m.state == MigrationState::Queued)
        .collect()
}

/// What the leader asks before proposing a migration command.
pub fn check(state: &ClusterState, cmd: &MigrationCommand) -> Result<(), MigrationError> {
    match cmd {
        MigrationCommand::CancelMigration { id, .. } => {
            let m = state
                .migrations
                .get(id)
                .ok_or(MigrationError::Unknown(*id))?;
            if m.state.finished() {
                return Err(MigrationError::Finished {
                    id: *id,
                    state: m.state,
                });
            }
            if m.state == MigrationState::Queued {
                return Ok(());
            }
            if m.cancel_requested {
                return Err(MigrationError::AlreadyCancelling(*id));
            }
            if m.kind == MigrationKind::Quick {
                return Err(MigrationError::QuickNotCancellable(*id));
            }
            Ok(())
        }
        MigrationCommand::QueueMigration {
            vm,
            to,
            quick,
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max,
            at_unix_ms,
        } => {
            if let Some(m) = queued_of(state, vm).or_else(|| running_of(state, vm)) {
                return Err(MigrationError::VmBusy {
                    vm: vm.clone(),
                    id: m.id,
                    state: m.state,
                });
            }
            // The checks of starting it now, the target aside when the scheduler picks it.
            let probe = VmCommand::StartMigration {
                name: vm.clone(),
                to: *to,
                at_unix_ms: *at_unix_ms,
                quick: *quick,
                max_downtime_ms: *max_downtime_ms,
                deadline_ms: *deadline_ms,
                bandwidth_bytes_per_s_max: *bandwidth_bytes_per_s_max,
                predicted: None,
            };
            Ok(crate::state::vms::check_migration_start(state, &probe)?)
        }
        MigrationCommand::DropQueued { id, .. } => {
            let m = state
                .migrations
                .get(id)
                .ok_or(MigrationError::Unknown(*id))?;
            if m.state != MigrationState::Queued {
                return Err(MigrationError::NotQueued {
                    id: *id,
                    state: m.state,
                });
            }
            Ok(())
        }
    }
}

/// Apply a migration command (every replica).
pub fn apply(
    state: &mut ClusterState,
    cmd: &MigrationCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), MigrationError> {
    check(state, cmd)?;
    match cmd {
        MigrationCommand::CancelMigration { id, at_unix_ms } => {
            let Some(m) = state.migrations.get_mut(id) else {
                return Err(MigrationError::Unknown(*id));
            };
            m.cancel_requested = true;
            let queued = m.state == MigrationState::Queued;
            if queued {
                m.state = MigrationState::Cancelled;
                m.ended_unix_ms = Some(*at_unix_ms);
                m.reason = "cancelled by the operator while queued".into();
            }
            let (vm, source) = (m.vm.clone(), m.source);
            touched.push(StateKey::Migration(*id));
            let what = if queued {
                "cancelled while queued"
            } else {
                "cancel requested"
            };
            state.record_event(
                *at_unix_ms,
                EventKind::Vm,
                source,
                format!("migration {id} of VM {vm}: {what}"),
                touched,
            );
        }
        MigrationCommand::QueueMigration {
            vm,
            to,
            quick,
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max,
            at_unix_ms,
        } => {
            let source = crate::state::vms::find(state, vm)
                .and_then(|v| v.owner)
                .unwrap_or(0);
            let rec = MigrationRecord {
                state: MigrationState::Queued,
                ..MigrationRecord::draft(
                    vm,
                    source,
                    *to,
                    *quick,
                    *max_downtime_ms,
                    *deadline_ms,
                    *bandwidth_bytes_per_s_max,
                )
            };
            let id = open(state, rec, *at_unix_ms, touched);
            let target = if *to == 0 {
                "a node the scheduler picks".to_owned()
            } else {
                format!("node {to}")
            };
            state.record_event(
                *at_unix_ms,
                EventKind::Vm,
                source,
                format!("migration {id} of VM {vm} to {target} queued: a migration slot is busy"),
                touched,
            );
        }
        MigrationCommand::DropQueued {
            id,
            reason,
            at_unix_ms,
        } => {
            let Some(m) = state.migrations.get_mut(id) else {
                return Err(MigrationError::Unknown(*id));
            };
            m.state = MigrationState::Failed;
            m.ended_unix_ms = Some(*at_unix_ms);
            m.reason = format!("dropped from the queue: {reason}");
            let (vm, source) = (m.vm.clone(), m.source);
            touched.push(StateKey::Migration(*id));
            state.record_event(
                *at_unix_ms,
                EventKind::Vm,
                source,
                format!("migration {id} of VM {vm} dropped from the queue: {reason}"),
                touched,
            );
        }
    }
    Ok(())
}

impl MigrationRecord {
    /// A running record of `vm` not yet in the state ([`open`] numbers and dates it).
    fn draft(
        vm: &str,
        source: u64,
        target: u64,
        quick: bool,
        max_downtime_ms: Option<u64>,
        deadline_ms: Option<u64>,
        bandwidth_bytes_per_s_max: Option<u64>,
    ) -> MigrationRecord {
        MigrationRecord {
            id: 0,
            vm: vm.to_owned(),
            source,
            target,
            kind: MigrationKind::of(quick),
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max,
            state: MigrationState::Running,
            cancel_requested: false,
            started_unix_ms: 0,
            ended_unix_ms: None,
            reason: String::new(),
            stats: None,
            predicted: None,
        }
    }
}

/// Adds `rec` as the next migration, started at `at_unix_ms`; returns its id.
fn open(
    state: &mut ClusterState,
    rec: MigrationRecord,
    at_unix_ms: u64,
    touched: &mut Vec<StateKey>,
) -> u64 {
    state.last_migration_id += 1;
    let id = state.last_migration_id;
    state.migrations.insert(
        id,
        MigrationRecord {
            id,
            started_unix_ms: at_unix_ms,
            ..rec
        },
    );
    touched.push(StateKey::Migration(id));
    touched.push(StateKey::LastMigrationId);
    trim(state, touched);
    id
}

/// Keep the migration records in step with a VM command that was just applied.
pub fn after_vm_command(state: &mut ClusterState, cmd: &VmCommand, touched: &mut Vec<StateKey>) {
    match cmd {
        VmCommand::StartMigration {
            name,
            to,
            at_unix_ms,
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max,
            quick,
            predicted,
        } => {
            let source = state
                .vms
                .values()
                .find(|v| &v.spec.name == name)
                .and_then(|v| v.owner)
                .unwrap_or(0);
            // Started from the queue (or by a drain for a VM with a queued migration): the
            // queued record becomes the running one.
            let queued = queued_of(state, name).map(|m| m.id);
            let draft = MigrationRecord::draft(
                name,
                source,
                *to,
                *quick,
                *max_downtime_ms,
                *deadline_ms,
                *bandwidth_bytes_per_s_max,
            );
            let draft = MigrationRecord {
                predicted: *predicted,
                ..draft
            };
            if let Some(m) = queued.and_then(|id| state.migrations.get_mut(&id)) {
                *m = MigrationRecord {
                    id: m.id,
                    started_unix_ms: *at_unix_ms,
                    ..draft
                };
                touched.push(StateKey::Migration(m.id));
            } else {
                open(state, draft, *at_unix_ms, touched);
            }
        }
        VmCommand::FinishMigration {
            name,
            ok,
            reason,
            at_unix_ms,
            stats,
            ..
        } => {
            let id = running_of(state, name).map(|m| m.id);
            if let Some(m) = id.and_then(|id| state.migrations.get_mut(&id)) {
                m.state = match (*ok, m.cancel_requested) {
                    (true, _) => MigrationState::Succeeded,
                    (false, true) => MigrationState::Cancelled,
                    (false, false) => MigrationState::Failed,
                };
                m.ended_unix_ms = Some(*at_unix_ms);
                m.reason = reason.clone();
                m.stats = stats.clone();
                touched.push(StateKey::Migration(m.id));
            }
        }
        _ => {}
    }
    // A VM that lost its migration another way (failover, delete): close the record.
    let at = cmd_time(cmd);
    let orphaned: Vec<u64> = state
        .migrations
        .values()
        .filter(|m| m.state == MigrationState::Running)
        .filter(|m| {
            !state
                .vms
                .values()
                .any(|v| v.spec.name == m.vm && v.migrating_to == Some(m.target))
        })
        .map(|m| m.id)
        .collect();
    for id in orphaned {
        if let Some(m) = state.migrations.get_mut(&id) {
            m.state = MigrationState::Failed;
            m.ended_unix_ms = Some(at);
            m.reason = "the VM's owner changed or it was deleted while migrating".into();
            touched.push(StateKey::Migration(id));
        }
    }
}

fn cmd_time(cmd: &VmCommand) -> u64 {
    match cmd {
        VmCommand::CreateVm { at_unix_ms, .. }
        | VmCommand::StartVm { at_unix_ms, .. }
        | VmCommand::StopVm { at_unix_ms, .. }
        | VmCommand::DeleteVm { at_unix_ms, .. }
        | VmCommand::SetVmOwner { at_unix_ms, .. }
        | VmCommand::StartMigration { at_unix_ms, .. }
        | VmCommand::FinishMigration { at_unix_ms, .. }
        | VmCommand::ReportVmState { at_unix_ms, .. } => *at_unix_ms,
    }
}

/// Drop the oldest finished records beyond [`MIGRATION_HISTORY_MAX`].
fn trim(state: &mut ClusterState, touched: &mut Vec<StateKey>) {
    let finished: Vec<u64> = state
        .migrations
        .values()
        .filter(|m| m.state.finished())
        .map(|m| m.id)
        .collect();
    let excess = finished.len().saturating_sub(MIGRATION_HISTORY_MAX);
    for id in finished.into_iter().take(excess) {
        state.migrations.remove(&id);
        touched.push(StateKey::Migration(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use crate::state::vms::RuntimeState;
    use crate::state::{Command, CommandResult};

    fn cluster_with_running_vm() -> ClusterState {
        let mut s = crate::state::fixtures::cluster(2, |_| crate::state::fixtures::amd(4, 4 << 30));
        let spec = VmSpec::test_guest("m", 1, 64, TestWorkload::new(WorkloadName::Idle));
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(1),
            at_unix_ms: 2,
        }));
        s.apply(&Command::Vm(VmCommand::ReportVmState {
            name: "m".into(),
            node_id: 1,
            generation: 1,
            runtime: RuntimeState::Running,
            reason: String::new(),
            at_unix_ms: 3,
            restart: false,
        }));
        s
    }

    fn start(s: &mut ClusterState, at: u64) -> CommandResult {
        s.apply(&Command::Vm(VmCommand::StartMigration {
            name: "m".into(),
            to: 2,
            at_unix_ms: at,
            max_downtime_ms: Some(50),
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            predicted: None,
            quick: false,
        }))
        .0
    }

    fn finish(s: &mut ClusterState, ok: bool, at: u64) -> CommandResult {
        s.apply(&Command::Vm(VmCommand::FinishMigration {
            name: "m".into(),
            to: 2,
            ok,
            reason: "r".into(),
            at_unix_ms: at,
            stats: Some(MigrationSummary {
                rounds: 3,
                receipt_matches: ok,
                ..MigrationSummary::default()
            }),
        }))
        .0
    }

    fn cancel(s: &mut ClusterState, id: u64) -> CommandResult {
        s.apply(&Command::Migration(MigrationCommand::CancelMigration {
            id,
            at_unix_ms: 9,
        }))
        .0
    }

    #[test]
    fn start_finish_cancel_and_refusals() {
        let mut s = cluster_with_running_vm();
        assert_eq!(start(&mut s, 10), CommandResult::Ok);
        let m = &s.migrations[&1];
        assert_eq!(
            (
                m.vm.as_str(),
                m.source,
                m.target,
                m.state,
                m.max_downtime_ms
            ),
            ("m", 1, 2, MigrationState::Running, Some(50))
        );
        assert_eq!(finish(&mut s, true, 20), CommandResult::Ok);
        let m = &s.migrations[&1];
        assert_eq!(
            (m.state, m.ended_unix_ms),
            (MigrationState::Succeeded, Some(20))
        );
        assert_eq!(m.stats.as_ref().map(|x| x.rounds), Some(3));
        // Cancelling a finished or unknown migration is refused and changes nothing.
        let before = s.clone();
        assert!(
            matches!(cancel(&mut s, 1), CommandResult::Rejected { reason } if reason.contains("already succeeded"))
        );
        assert!(
            matches!(cancel(&mut s, 7), CommandResult::Rejected { reason } if reason.contains("no migration with id 7"))
        );
        assert_eq!(s, before);
        // Back to node 1, cancelled midway: the record says cancelled.
        s.apply(&Command::Vm(VmCommand::ReportVmState {
            name: "m".into(),
            node_id: 2,
            generation: 2,
            runtime: RuntimeState::Running,
            reason: String::new(),
            at_unix_ms: 21,
            restart: false,
        }));
        s.apply(&Command::Vm(VmCommand::StartMigration {
            name: "m".into(),
            to: 1,
            at_unix_ms: 30,
            max_downtime_ms: None,
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            predicted: None,
            quick: false,
        }));
        assert_eq!(cancel(&mut s, 2), CommandResult::Ok);
        assert!(
            matches!(cancel(&mut s, 2), CommandResult::Rejected { reason } if reason.contains("already being cancelled"))
        );
        s.apply(&Command::Vm(VmCommand::FinishMigration {
            name: "m".into(),
            to: 1,
            ok: false,
            reason: "cancelled".into(),
            at_unix_ms: 31,
            stats: None,
        }));
        assert_eq!(s.migrations[&2].state, MigrationState::Cancelled);
    }

    #[test]
    fn quick_migrations_are_recorded_as_quick_and_cannot_be_cancelled() {
        let mut s = cluster_with_running_vm();
        s.apply(&Command::Vm(VmCommand::StartMigration {
            name: "m".into(),
            to: 2,
            at_unix_ms: 10,
            max_downtime_ms: None,
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            predicted: None,
            quick: true,
        }));
        assert_eq!(s.migrations[&1].kind, MigrationKind::Quick);
        let before = s.clone();
        assert!(
            matches!(cancel(&mut s, 1), CommandResult::Rejected { reason } if reason.contains("quick migration"))
        );
        assert_eq!(s, before);
    }

    #[test]
    fn owner_change_closes_a_running_record_and_history_is_bounded() {
        let mut s = cluster_with_running_vm();
        start(&mut s, 10);
        s.apply(&Command::Vm(VmCommand::SetVmOwner {
            name: "m".into(),
            owner: 2,
            at_unix_ms: 11,
        }));
        assert_eq!(s.migrations[&1].state, MigrationState::Failed);
        assert!(running_of(&s, "m").is_none());
        // History: only finished records are trimmed, oldest first.
        for id in 100..(100 + MIGRATION_HISTORY_MAX as u64 + 5) {
            let mut r = s.migrations[&1].clone();
            r.id = id;
            s.migrations.insert(id, r);
        }
        let mut touched = Vec::new();
        trim(&mut s, &mut touched);
        assert_eq!(s.migrations.len(), MIGRATION_HISTORY_MAX);
        assert!(!s.migrations.contains_key(&1));
        assert!(touched.contains(&StateKey::Migration(1)));
    }
}
