//! Replicated migration jobs (maintenance drain, failback, load balancing) and the
//! balancing policy: the job part of the pure cluster state machine.
//!
//! A [`JobRecord`] holds a plan (moves laid out in waves by the scheduler) and its
//! progress. Every step travels through Raft as a [`JobCommand`] inside `Command::Job`:
//! the leader's executor (`crate::control::job_runner`) proposes, every replica applies here. Because
//! progress lives in the replicated state, a new leader continues a job where the old
//! one stopped: a move is started by [`JobCommand::StartMove`], which in the same apply
//! commits the VM's `StartMigration` and marks the move in flight, so no move can be
//! started twice; a move ends when the VM's `FinishMigration` is applied
//! ([`after_vm_command`]) or, as a fallback, when the executor sees the VM record no
//! longer migrating ([`JobCommand::EndMove`]).
//!
//! **Architecture Invariant:** `jobs.rs` is pure and deterministic like the rest of
//! `ClusterState::apply`: no clock, no I/O; timestamps travel inside commands, and a
//! refused command changes nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::vms::{self, DesiredState, VmCommand, VmStateError};
use crate::state::{ClusterState, EventKind, NodeState, StateKey};

/// Finished jobs kept in the state; the oldest finished ones are evicted beyond this.
pub const FINISHED_JOBS_KEPT: usize = 64;
/// Moves one job may hold (planned plus re-planned).
pub const JOB_MOVES_MAX: usize = 4096;
/// Default period of the leader's balancer.
pub const DEFAULT_BALANCE_INTERVAL_MS: u64 = 30_000;
/// Shortest balancer period a policy may set.
pub const BALANCE_INTERVAL_MS_MIN: u64 = 1_000;

/// **The single place where a planned move becomes a VM migration command.** `quick`
/// says the scheduler found that the move cannot be live (other migration subnet, not
/// live-migratable, non-convergent): the VM is then saved to the shared volume and
/// restored on the target.
/// `planned_ms`: the move's planned duration, kept as the migration's predicted total.
pub fn start_migration_command(
    vm: &str,
    to: u64,
    quick: bool,
    at_unix_ms: u64,
    planned_ms: Option<u64>,
) -> VmCommand {
    VmCommand::StartMigration {
        name: vm.to_owned(),
        to,
        at_unix_ms,
        quick,
        max_downtime_ms: None,
        deadline_ms: None,
        bandwidth_bytes_per_s_max: None,
        predicted: planned_ms.map(|total_ms| crate::state::migrations::Prediction {
            total_ms,
            blackout_us: None,
        }),
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Empty a node for maintenance (the node is paused first).
    Drain,
    /// Bring the VMs a drain moved back to their node.
    Failback,
    /// Moves of the load balancer.
    Balance,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Drain => "drain",
            JobKind::Failback => "failback",
            JobKind::Balance => "balance",
        }
    }
}

/// Life of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Running,
    Done,
    /// Stopped by an operator (or because its node was resumed); queued moves dropped.
    Aborted,
    /// Could not finish (a VM could not be moved); `reason` says which and why.
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Done => "done",
            JobStatus::Aborted => "aborted",
            JobStatus::Failed => "failed",
        }
    }
}

/// Life of one move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveStatus {
    Queued,
    InFlight,
    Done,
    Failed,
    /// Dropped by an abort before it started.
    Dropped,
    /// Not needed any more (the VM was stopped, deleted or moved by someone else).
    Skipped,
}

impl MoveStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            MoveStatus::Queued => "queued",
            MoveStatus::InFlight => "in_flight",
            MoveStatus::Done => "done",
            MoveStatus::Failed => "failed",
            MoveStatus::Dropped => "dropped",
            MoveStatus::Skipped => "skipped",
        }
    }

    fn open(self) -> bool {
        matches!(self, MoveStatus::Queued | MoveStatus::InFlight)
    }
}

/// One planned migration of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMove {
    pub vm: String,
    pub from: u64,
    pub to: u64,
    /// The scheduler says this move cannot be live; `why_not_live` says why.
    pub quick: bool,
    pub why_not_live: Vec<String>,
    /// Wave number (1-based) in the plan it came from.
    pub wave: u32,
    /// Planned start and end (unix ms, from the scheduler's timeline).
    pub planned_start_unix_ms: u64,
    pub planned_end_unix_ms: u64,
    pub status: MoveStatus,
    pub started_unix_ms: u64,
    pub ended_unix_ms: u64,
    pub reason: String,
}

impl JobMove {
    /// A queued move.
    pub fn queued(vm: &str, from: u64, to: u64, wave: u32, start: u64, end: u64) -> JobMove {
        JobMove {
            vm: vm.to_owned(),
            from,
            to,
            quick: false,
            why_not_live: Vec::new(),
            wave,
            planned_start_unix_ms: start,
            planned_end_unix_ms: end,
            status: MoveStatus::Queued,
            started_unix_ms: 0,
            ended_unix_ms: 0,
            reason: String::new(),
        }
    }
}

/// One job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: u64,
    pub kind: JobKind,
    /// Node drained / failed back to; 0 for balance jobs.
    pub node: u64,
    pub status: JobStatus,
    pub moves: Vec<JobMove>,
    pub planned_finish_unix_ms: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub finished_unix_ms: u64,
    pub reason: String,
    /// Drain jobs: a failback has taken (or was asked to take) this job's VMs back.
    #[serde(default)]
    pub failed_back: bool,
}

impl JobRecord {
    pub fn open_moves(&self) -> usize {
        self.moves.iter().filter(|m| m.status.open()).count()
    }

    pub fn count(&self, s: MoveStatus) -> usize {
        self.moves.iter().filter(|m| m.status == s).count()
    }
}

/// Load-balancing policy, replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancePolicy {
    pub mode: scheduler::BalanceMode,
    pub aggressiveness: scheduler::Aggressiveness,
    /// How often the leader runs the balancer.
    pub interval_ms: u64,
    /// A VM that arrived by migration less than this long ago is not moved by the balancer.
    #[serde(default = "default_min_dwell_ms")]
    pub min_dwell_ms: u64,
    /// What a balancing move costs per second of estimated migration, in basis points of
    /// load (a move is made only if its gain is larger).
    #[serde(default = "default_migration_cost_bp_per_s")]
    pub migration_cost_bp_per_s: u32,
}

fn default_min_dwell_ms() -> u64 {
    scheduler::model::DEFAULT_MIN_DWELL_MS
}

fn default_migration_cost_bp_per_s() -> u32 {
    scheduler::model::DEFAULT_MIGRATION_COST_BP_PER_S
}

impl Default for BalancePolicy {
    fn default() -> Self {
        BalancePolicy {
            mode: scheduler::BalanceMode::None,
            aggressiveness: scheduler::Aggressiveness::Medium,
            interval_ms: DEFAULT_BALANCE_INTERVAL_MS,
            min_dwell_ms: default_min_dwell_ms(),
            migration_cost_bp_per_s: default_migration_cost_bp_per_s(),
        }
    }
}

/// The job part of [`ClusterState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JobsState {
    pub jobs: BTreeMap<u64, JobRecord>,
    /// Newest job id ever given (ids are never reused).
    pub last_job_id: u64,
    pub policy: BalancePolicy,
}

impl JobsState {
    /// The running job of `kind` for `node`, if any.
    pub fn running(&self, kind: JobKind, node: u64) -> Option<&JobRecord> {
        self.jobs
            .values()
            .find(|j| j.kind == kind && j.node == node && j.status == JobStatus::Running)
    }

    /// The newest job of `kind` for `node`.
    pub fn latest(&self, kind: JobKind, node: u64) -> Option<&JobRecord> {
        self.jobs
            .values()
            .rev()
            .find(|j| j.kind == kind && j.node == node)
    }

    /// Any running job.
    pub fn any_running(&self) -> bool {
        self.jobs.values().any(|j| j.status == JobStatus::Running)
    }
}

/// How a move ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveOutcome {
    Done,
    Failed,
    Skipped,
}

/// Job commands carried by the Raft log inside `Command::Job`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job_cmd", rename_all = "snake_case")]
pub enum JobCommand {
    /// Start a job with its planned moves. A drain also pauses its node (no new VMs).
    StartJob {
        kind: JobKind,
        node: u64,
        moves: Vec<JobMove>,
        planned_finish_unix_ms: u64,
        at_unix_ms: u64,
    },
    /// Start the first queued move of `vm` in job `job`: commits the VM's migration too.
    StartMove {
        job: u64,
        vm: String,
        at_unix_ms: u64,
    },
    /// The move of `vm` ended: `Done` an in-flight one, `Failed` an in-flight one or a
    /// queued one that cannot start, `Skipped` a queued one no longer needed.
    EndMove {
        job: u64,
        vm: String,
        outcome: MoveOutcome,
        reason: String,
        at_unix_ms: u64,
    },
    /// Re-planned moves appended to a running job.
    AddMoves {
        job: u64,
        moves: Vec<JobMove>,
        planned_finish_unix_ms: u64,
        at_unix_ms: u64,
    },
    /// End a running job: `Done`, `Failed` or `Aborted`. Queued moves are dropped;
    /// in-flight migrations finish or roll back by themselves.
    FinishJob {
        job: u64,
        status: JobStatus,
        reason: String,
        at_unix_ms: u64,
    },
    /// Return a node to service (Paused → Up); with `failback`, mark the drain jobs of
    /// the node as failed back and start a failback job with `moves` (may be empty).
    ResumeNode {
        node: u64,
        failback: Option<Vec<JobMove>>,
        planned_finish_unix_ms: u64,
        at_unix_ms: u64,
    },
    /// Replace the balancing policy.
    SetPolicy {
        policy: BalancePolicy,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for JobCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobCommand::StartJob { kind, node, .. } => {
                write!(f, "start_job({}, {node})", kind.as_str())
            }
            JobCommand::StartMove { job, vm, .. } => write!(f, "start_move({job}, {vm})"),
            JobCommand::EndMove { job, vm, .. } => write!(f, "end_move({job}, {vm})"),
            JobCommand::AddMoves { job, .. } => write!(f, "add_moves({job})"),
            JobCommand::FinishJob { job, status, .. } => {
                write!(f, "finish_job({job}, {})", status.as_str())
            }
            JobCommand::ResumeNode { node, .. } => write!(f, "resume_node({node})"),
            JobCommand::SetPolicy { .. } => write!(f, "set_policy"),
        }
    }
}

/// Why a job command is refused. Each message names the node, job or VM at fault.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("unknown node id {0}; `clusterctl node list` shows the members")]
    UnknownNode(u64),
    #[error("node {node} is {state}; only an up or paused node can be drained")]
    NodeDown { node: u64, state: NodeState },
    #[error("node {0} is the last up node; there is nowhere to move its VMs")]
    LastUpNode(u64),
    #[error(
        "node {node} is already being drained (job {job}); `clusterctl drain show {node}` shows it"
    )]
    AlreadyDraining { node: u64, job: u64 },
    #[error("node {node} is {state}, not paused; only a paused node can be resumed")]
    NotPaused { node: u64, state: NodeState },
    #[error("node {node} is being drained (job {job}); abort it first with `clusterctl drain abort {node}`")]
    DrainRunning { node: u64, job: u64 },
    #[error("no job {0}")]
    UnknownJob(u64),
    #[error("job {job} is {status}, not running")]
    JobNotRunning { job: u64, status: &'static str },
    #[error("job {job} has no {status} move of VM {vm:?}")]
    NoSuchMove {
        job: u64,
        vm: String,
        status: &'static str,
    },
    #[error("a job needs at least one move")]
    NoMoves,
    #[error("a job may hold at most {JOB_MOVES_MAX} moves")]
    TooManyMoves,
    #[error("a finished job is done, failed or aborted, not running")]
    BadFinish,
    #[error("balance interval {0} ms is below the minimum of {BALANCE_INTERVAL_MS_MIN} ms")]
    IntervalTooShort(u64),
    #[error("{what} is {value}; it must be at most {max}")]
    PolicyOutOfRange {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("cannot start the migration")]
    Vm(#[source] VmStateError),
}

/// How a refusal maps onto an API status class.
pub fn error_class(e: &JobError) -> vms::ErrorClass {
    match e {
        JobError::UnknownNode(_) | JobError::UnknownJob(_) => vms::ErrorClass::NotFound,
        JobError::AlreadyDraining { .. } => vms::ErrorClass::AlreadyExists,
        JobError::NoMoves
        | JobError::TooManyMoves
        | JobError::BadFinish
        | JobError::IntervalTooShort(_)
        | JobError::PolicyOutOfRange { .. } => vms::ErrorClass::InvalidArgument,
        JobError::Vm(v) => v.class(),
        _ => vms::ErrorClass::FailedPrecondition,
    }
}

fn node_state(state: &ClusterState, node: u64) -> Result<NodeState, JobError> {
    state
        .nodes
        .get(&node)
        .map(|n| n.state)
        .ok_or(JobError::UnknownNode(node))
}

/// The queued move of `vm` in job `j`.
fn queued_move<'a>(j: &'a JobRecord, vm: &str) -> Result<&'a JobMove, JobError> {
    j.moves
        .iter()
        .find(|m| m.vm == vm && m.status == MoveStatus::Queued)
        .ok_or_else(|| JobError::NoSuchMove {
            job: j.id,
            vm: vm.to_string(),
            status: "queued",
        })
}

fn running_job(state: &ClusterState, job: u64) -> Result<&JobRecord, JobError> {
    let j = state.jobs.jobs.get(&job).ok_or(JobError::UnknownJob(job))?;
    if j.status != JobStatus::Running {
        return Err(JobError::JobNotRunning {
            job,
            status: j.status.as_str(),
        });
    }
    Ok(j)
}

/// Would a drain of `node` be accepted now (before any plan)?
pub fn check_drain(state: &ClusterState, node: u64) -> Result<(), JobError> {
    let s = node_state(state, node)?;
    if !matches!(s, NodeState::Up | NodeState::Paused) {
        return Err(JobError::NodeDown { node, state: s });
    }
    if let Some(j) = state.jobs.running(JobKind::Drain, node) {
        return Err(JobError::AlreadyDraining { node, job: j.id });
    }
    if !state
        .nodes
        .iter()
        .any(|(id, n)| *id != node && n.state == NodeState::Up)
    {
        return Err(JobError::LastUpNode(node));
    }
    Ok(())
}

/// Would a resume of `node` be accepted now?
pub fn check_resume(state: &ClusterState, node: u64) -> Result<(), JobError> {
    let s = node_state(state, node)?;
    if let Some(j) = state.jobs.running(JobKind::Drain, node) {
        return Err(JobError::DrainRunning { node, job: j.id });
    }
    if s != NodeState::Paused {
        return Err(JobError::NotPaused { node, state: s });
    }
    Ok(())
}

/// Would `cmd` be accepted now? (The leader asks before proposing; apply asks again.)
pub fn check(state: &ClusterState, cmd: &JobCommand) -> Result<(), JobError> {
    match cmd {
        JobCommand::StartJob {
            kind, node, moves, ..
        } => {
            if moves.len() > JOB_MOVES_MAX {
                return Err(JobError::TooManyMoves);
            }
            match kind {
                JobKind::Drain => check_drain(state, *node)?,
                JobKind::Failback | JobKind::Balance => {
                    if moves.is_empty() {
                        return Err(JobError::NoMoves);
                    }
                    if *kind == JobKind::Failback {
                        node_state(state, *node)?;
                    }
                }
            }
        }
        JobCommand::StartMove {
            job,
            vm,
            at_unix_ms,
        } => {
            let j = running_job(state, *job)?;
            let m = queued_move(j, vm)?;
            vms::check(
                state,
                &start_migration_command(vm, m.to, m.quick, *at_unix_ms, None),
            )
            .map_err(JobError::Vm)?;
        }
        JobCommand::EndMove {
            job, vm, outcome, ..
        } => {
            let j = state.jobs.jobs.get(job).ok_or(JobError::UnknownJob(*job))?;
            if ending_move(j, vm, *outcome).is_none() {
                return Err(JobError::NoSuchMove {
                    job: *job,
                    vm: vm.clone(),
                    status: match outcome {
                        MoveOutcome::Done => "in_flight",
                        MoveOutcome::Failed => "in_flight or queued",
                        MoveOutcome::Skipped => "queued",
                    },
                });
            }
        }
        JobCommand::AddMoves { job, moves, .. } => {
            let j = running_job(state, *job)?;
            if moves.is_empty() {
                return Err(JobError::NoMoves);
            }
            if j.moves.len() + moves.len() > JOB_MOVES_MAX {
                return Err(JobError::TooManyMoves);
            }
        }
        JobCommand::FinishJob { job, status, .. } => {
            running_job(state, *job)?;
            if *status == JobStatus::Running {
                return Err(JobError::BadFinish);
            }
        }
        JobCommand::ResumeNode { node, failback, .. } => {
            check_resume(state, *node)?;
            if failback.as_ref().is_some_and(|m| m.len() > JOB_MOVES_MAX) {
                return Err(JobError::TooManyMoves);
            }
        }
        JobCommand::SetPolicy { policy, .. } => {
            if policy.interval_ms < BALANCE_INTERVAL_MS_MIN {
                return Err(JobError::IntervalTooShort(policy.interval_ms));
            }
            for (what, value, max) in [
                (
                    "min_dwell_ms",
                    policy.min_dwell_ms,
                    scheduler::model::MAX_QUANTITY,
                ),
                (
                    "migration_cost_bp_per_s",
                    u64::from(policy.migration_cost_bp_per_s),
                    u64::from(scheduler::model::MAX_MIGRATION_COST_BP_PER_S),
                ),
            ] {
                if value > max {
                    return Err(JobError::PolicyOutOfRange { what, value, max });
                }
            }
        }
    }
    Ok(())
}

fn new_job(
    state: &mut ClusterState,
    kind: JobKind,
    node: u64,
    moves: &[JobMove],
    planned_finish_unix_ms: u64,
    at: u64,
    touched: &mut Vec<StateKey>,
) -> u64 {
    state.jobs.last_job_id += 1;
    let id = state.jobs.last_job_id;
    state.jobs.jobs.insert(
        id,
        JobRecord {
            id,
            kind,
            node,
            status: JobStatus::Running,
            moves: moves.to_vec(),
            planned_finish_unix_ms,
            created_unix_ms: at,
            updated_unix_ms: at,
            finished_unix_ms: 0,
            reason: String::new(),
            failed_back: false,
        },
    );
    touched.push(StateKey::Job(id));
    touched.push(StateKey::JobMeta);
    evict_finished(state, touched);
    id
}

fn evict_finished(state: &mut ClusterState, touched: &mut Vec<StateKey>) {
    let finished: Vec<u64> = state
        .jobs
        .jobs
        .values()
        .filter(|j| j.status != JobStatus::Running)
        .map(|j| j.id)
        .collect();
    if finished.len() > FINISHED_JOBS_KEPT {
        for id in &finished[..finished.len() - FINISHED_JOBS_KEPT] {
            state.jobs.jobs.remove(id);
            touched.push(StateKey::Job(*id));
        }
    }
}

fn label(j: &JobRecord) -> String {
    match j.kind {
        JobKind::Drain => format!("drain of node {} (job {})", j.node, j.id),
        JobKind::Failback => format!("failback to node {} (job {})", j.node, j.id),
        JobKind::Balance => format!("balancing (job {})", j.id),
    }
}

fn waves(moves: &[JobMove]) -> u32 {
    moves.iter().map(|m| m.wave).max().unwrap_or(0)
}

fn event(state: &mut ClusterState, at: u64, node: u64, msg: String, touched: &mut Vec<StateKey>) {
    state.record_event(at, EventKind::Job, node, msg, touched);
}

/// Apply `cmd` to `state`; on refusal nothing changes and nothing is touched.
pub fn apply(
    state: &mut ClusterState,
    cmd: &JobCommand,
    touched: &mut Vec<StateKey>,
) -> Result<(), JobError> {
    check(state, cmd)?;
    match cmd {
        JobCommand::StartJob {
            kind,
            node,
            moves,
            planned_finish_unix_ms,
            at_unix_ms,
        } => {
            let at = *at_unix_ms;
            if *kind == JobKind::Drain {
                pause(state, *node, at, "drain", touched);
            }
            let resumed = *kind == JobKind::Drain
                && state
                    .jobs
                    .latest(JobKind::Drain, *node)
                    .is_some_and(|j| j.status == JobStatus::Aborted && !j.failed_back);
            let id = new_job(
                state,
                *kind,
                *node,
                moves,
                *planned_finish_unix_ms,
                at,
                touched,
            );
            let vms: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
            let msg = match kind {
                JobKind::Drain => format!(
                    "drain of node {node} {} (job {id}): {} moves in {} waves [{}], ETA {} ms",
                    if resumed { "resumed" } else { "started" },
                    moves.len(),
                    waves(moves),
                    vms.join(", "),
                    planned_finish_unix_ms.saturating_sub(at)
                ),
                JobKind::Failback => format!(
                    "failback to node {node} started (job {id}): {} moves [{}]",
                    moves.len(),
                    vms.join(", ")
                ),
                JobKind::Balance => format!(
                    "balancing started (job {id}): {} moves [{}]",
                    moves.len(),
                    vms.join(", ")
                ),
            };
            event(state, at, *node, msg, touched);
        }
        JobCommand::StartMove {
            job,
            vm,
            at_unix_ms,
        } => {
            let at = *at_unix_ms;
            let (to, quick, wave, planned_ms) = {
                let j = state.jobs.jobs.get(job).ok_or(JobError::UnknownJob(*job))?;
                let m = queued_move(j, vm)?;
                let planned = m
                    .planned_end_unix_ms
                    .saturating_sub(m.planned_start_unix_ms);
                (m.to, m.quick, m.wave, planned)
            };
            let start = start_migration_command(vm, to, quick, at, Some(planned_ms));
            vms::apply(state, &start, touched).map_err(JobError::Vm)?;
            // The same migration record a `Command::Vm(StartMigration)` opens: the move is
            // listed, watched, cancellable and counted like any other migration.
            crate::state::migrations::after_vm_command(state, &start, touched);
            let j = state
                .jobs
                .jobs
                .get_mut(job)
                .ok_or(JobError::UnknownJob(*job))?;
            let first_of_wave = !j
                .moves
                .iter()
                .any(|m| m.wave == wave && m.status != MoveStatus::Queued);
            if let Some(m) = j
                .moves
                .iter_mut()
                .find(|m| m.vm == *vm && m.status == MoveStatus::Queued)
            {
                m.status = MoveStatus::InFlight;
                m.started_unix_ms = at;
            }
            j.updated_unix_ms = at;
            let (name, node, total) = (label(j), j.node, waves(&j.moves));
            touched.push(StateKey::Job(*job));
            if first_of_wave {
                event(
                    state,
                    at,
                    node,
                    format!("{name}: wave {wave} of {total} started"),
                    touched,
                );
            }
            let how = if quick { "quick" } else { "live" };
            event(
                state,
                at,
                node,
                format!("{name}: VM {vm} {how} migration to node {to} started"),
                touched,
            );
        }
        JobCommand::EndMove {
            job,
            vm,
            outcome,
            reason,
            at_unix_ms,
        } => end_move(state, *job, vm, *outcome, reason, *at_unix_ms, touched),
        JobCommand::AddMoves {
            job,
            moves,
            planned_finish_unix_ms,
            at_unix_ms,
        } => {
            let j = state
                .jobs
                .jobs
                .get_mut(job)
                .ok_or(JobError::UnknownJob(*job))?;
            j.moves.extend(moves.iter().cloned());
            j.planned_finish_unix_ms = *planned_finish_unix_ms;
            j.updated_unix_ms = *at_unix_ms;
            let (name, node) = (label(j), j.node);
            touched.push(StateKey::Job(*job));
            let vms: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
            event(
                state,
                *at_unix_ms,
                node,
                format!(
                    "{name}: re-planned {} moves [{}]",
                    moves.len(),
                    vms.join(", ")
                ),
                touched,
            );
        }
        JobCommand::FinishJob {
            job,
            status,
            reason,
            at_unix_ms,
        } => {
            let j = state
                .jobs
                .jobs
                .get_mut(job)
                .ok_or(JobError::UnknownJob(*job))?;
            let mut dropped = 0;
            for m in j.moves.iter_mut() {
                if m.status == MoveStatus::Queued {
                    m.status = MoveStatus::Dropped;
                    m.ended_unix_ms = *at_unix_ms;
                    dropped += 1;
                }
            }
            j.status = *status;
            j.reason = reason.clone();
            j.updated_unix_ms = *at_unix_ms;
            j.finished_unix_ms = *at_unix_ms;
            let (name, node) = (label(j), j.node);
            let (done, failed, in_flight) = (
                j.count(MoveStatus::Done),
                j.count(MoveStatus::Failed),
                j.count(MoveStatus::InFlight),
            );
            touched.push(StateKey::Job(*job));
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(": {reason}")
            };
            let msg = match status {
                JobStatus::Aborted => format!(
                    "{name} aborted{why} ({done} moved, {in_flight} in flight finish or roll back, {dropped} queued dropped)"
                ),
                _ => format!(
                    "{name} {} ({done} moved, {failed} failed){why}",
                    status.as_str()
                ),
            };
            event(state, *at_unix_ms, node, msg, touched);
            evict_finished(state, touched);
        }
        JobCommand::ResumeNode {
            node,
            failback,
            planned_finish_unix_ms,
            at_unix_ms,
        } => {
            let at = *at_unix_ms;
            if let Some(rec) = state.nodes.get_mut(node) {
                rec.state = NodeState::Up;
                rec.state_since_unix_ms = at;
                rec.state_reason = "resumed".into();
            }
            touched.push(StateKey::Node(*node));
            state.record_event(
                at,
                EventKind::NodeStateChanged,
                *node,
                format!("node {node} paused -> up: resumed"),
                touched,
            );
            if let Some(moves) = failback {
                let ids: Vec<u64> = state
                    .jobs
                    .jobs
                    .values()
                    .filter(|j| j.kind == JobKind::Drain && j.node == *node && !j.failed_back)
                    .map(|j| j.id)
                    .collect();
                for id in ids {
                    if let Some(j) = state.jobs.jobs.get_mut(&id) {
                        j.failed_back = true;
                        touched.push(StateKey::Job(id));
                    }
                }
                if moves.is_empty() {
                    event(
                        state,
                        at,
                        *node,
                        format!("failback to node {node}: nothing to move back"),
                        touched,
                    );
                } else {
                    let id = new_job(
                        state,
                        JobKind::Failback,
                        *node,
                        moves,
                        *planned_finish_unix_ms,
                        at,
                        touched,
                    );
                    let vms: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
                    event(
                        state,
                        at,
                        *node,
                        format!(
                            "failback to node {node} started (job {id}): {} moves [{}]",
                            moves.len(),
                            vms.join(", ")
                        ),
                        touched,
                    );
                }
            }
        }
        JobCommand::SetPolicy { policy, at_unix_ms } => {
            state.jobs.policy = policy.clone();
            touched.push(StateKey::JobMeta);
            event(
                state,
                *at_unix_ms,
                0,
                format!(
                    "balancing policy set to {} ({}, every {} ms)",
                    mode_str(policy.mode),
                    aggressiveness_str(policy.aggressiveness),
                    policy.interval_ms
                ),
                touched,
            );
        }
    }
    Ok(())
}

fn pause(state: &mut ClusterState, node: u64, at: u64, why: &str, touched: &mut Vec<StateKey>) {
    let Some(rec) = state.nodes.get_mut(&node) else {
        return;
    };
    if rec.state == NodeState::Paused {
        return;
    }
    let from = rec.state;
    rec.state = NodeState::Paused;
    rec.state_since_unix_ms = at;
    rec.state_reason = why.to_owned();
    touched.push(StateKey::Node(node));
    state.record_event(
        at,
        EventKind::NodeStateChanged,
        node,
        format!("node {node} {from} -> paused: {why}"),
        touched,
    );
}

fn end_move(
    state: &mut ClusterState,
    job: u64,
    vm: &str,
    outcome: MoveOutcome,
    reason: &str,
    at: u64,
    touched: &mut Vec<StateKey>,
) {
    let Some(j) = state.jobs.jobs.get_mut(&job) else {
        return;
    };
    let Some(i) = ending_move(j, vm, outcome) else {
        return;
    };
    let m = &mut j.moves[i];
    m.status = match outcome {
        MoveOutcome::Done => MoveStatus::Done,
        MoveOutcome::Failed => MoveStatus::Failed,
        MoveOutcome::Skipped => MoveStatus::Skipped,
    };
    m.ended_unix_ms = at;
    m.reason = reason.to_owned();
    let to = m.to;
    j.updated_unix_ms = at;
    let total = j.moves.len();
    let finished = j.moves.iter().filter(|m| !m.status.open()).count();
    let (name, node) = (label(j), j.node);
    touched.push(StateKey::Job(job));
    let why = if reason.is_empty() {
        String::new()
    } else {
        format!(": {reason}")
    };
    let msg = match outcome {
        MoveOutcome::Done => {
            format!("{name}: VM {vm} moved to node {to} ({finished}/{total} moves ended)")
        }
        MoveOutcome::Failed => format!("{name}: VM {vm} move to node {to} failed{why}"),
        MoveOutcome::Skipped => format!("{name}: VM {vm} move to node {to} skipped{why}"),
    };
    event(state, at, node, msg, touched);
}

/// The move of `vm` that `outcome` ends: a done move was in flight; a failed one was in
/// flight or (refused before it started) queued; a skipped one was queued.
fn ending_move(j: &JobRecord, vm: &str, outcome: MoveOutcome) -> Option<usize> {
    let find = |st: MoveStatus| j.moves.iter().position(|m| m.vm == vm && m.status == st);
    match outcome {
        MoveOutcome::Done => find(MoveStatus::InFlight),
        MoveOutcome::Failed => find(MoveStatus::InFlight).or_else(|| find(MoveStatus::Queued)),
        MoveOutcome::Skipped => find(MoveStatus::Queued),
    }
}

/// Called by `ClusterState::apply` after every applied VM command: a committed
/// `FinishMigration` ends the matching in-flight job move in the same apply.
pub fn after_vm_command(state: &mut ClusterState, cmd: &VmCommand, touched: &mut Vec<StateKey>) {
    let VmCommand::FinishMigration {
        name,
        to,
        ok,
        reason,
        at_unix_ms,
        ..
    } = cmd
    else {
        return;
    };
    let jobs: Vec<u64> = state
        .jobs
        .jobs
        .values()
        .filter(|j| {
            j.moves
                .iter()
                .any(|m| m.vm == *name && m.to == *to && m.status == MoveStatus::InFlight)
        })
        .map(|j| j.id)
        .collect();
    for job in jobs {
        let (outcome, why) = if *ok {
            (MoveOutcome::Done, String::new())
        } else {
            (MoveOutcome::Failed, reason.clone())
        };
        end_move(state, job, name, outcome, &why, *at_unix_ms, touched);
    }
}

pub fn mode_str(m: scheduler::BalanceMode) -> &'static str {
    match m {
        scheduler::BalanceMode::None => "none",
        scheduler::BalanceMode::EvenDistribution => "even",
        scheduler::BalanceMode::PowerSaving => "power-saving",
    }
}

pub fn aggressiveness_str(a: scheduler::Aggressiveness) -> &'static str {
    match a {
        scheduler::Aggressiveness::Low => "low",
        scheduler::Aggressiveness::Medium => "medium",
        scheduler::Aggressiveness::High => "high",
    }
}

/// Whether a VM record still needs to leave a drained node.
pub fn must_leave(v: &vms::VmRecord, node: u64) -> bool {
    v.owner == Some(node) && v.desired == DesiredState::Running
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    #[test]
    fn a_policy_out_of_range_is_refused_with_its_field() {
        let state = ClusterState::default();
        let set = |policy: BalancePolicy| {
            check(
                &state,
                &JobCommand::SetPolicy {
                    policy,
                    at_unix_ms: 1,
                },
            )
        };
        assert_eq!(set(BalancePolicy::default()), Ok(()));
        let e = set(BalancePolicy {
            min_dwell_ms: u64::MAX,
            ..BalancePolicy::default()
        })
        .expect_err("refused");
        assert!(e.to_string().starts_with("min_dwell_ms is"), "{e}");
        let e = set(BalancePolicy {
            migration_cost_bp_per_s: 10_001,
            ..BalancePolicy::default()
        })
        .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "migration_cost_bp_per_s is 10001; it must be at most 10000"
        );
        assert_eq!(error_class(&e), vms::ErrorClass::InvalidArgument);
        // A policy stored before these fields existed reads with their defaults.
        let old: BalancePolicy = serde_json::from_str(
            r#"{"mode":"even_distribution","aggressiveness":"high","interval_ms":1000}"#,
        )
        .expect("old policy");
        assert_eq!(old.min_dwell_ms, scheduler::model::DEFAULT_MIN_DWELL_MS);
        assert_eq!(
            old.migration_cost_bp_per_s,
            scheduler::model::DEFAULT_MIGRATION_COST_BP_PER_S
        );
    }
}
