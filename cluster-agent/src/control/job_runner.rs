//! The job executor on the Raft leader: runs drain, failback and balance jobs
//! (`crate::state::jobs`) and the periodic balancer.
//!
//! Every [`JOB_TICK`] the leader reads its applied state and asks the pure [`step`] which
//! job commands to propose: end moves whose migration ended, start queued moves whose
//! source and target take part in no other migration (at most one migration per node
//! across the cluster, so ⌊n/2⌋ run at once), re-plan a drain whose moves are used up
//! while VMs remain, and finish jobs. Each start is one committed
//! `JobCommand::StartMove`, which also commits the VM's `StartMigration`; the owner's
//! reconciler runs the migration and commits `FinishMigration`, which ends the move.
//! Because every step is in Raft, a new leader continues where the old one stopped.
//!
//! **Architecture Invariant:** no node takes part in two migrations at once through a
//! job: a move starts only when neither its source nor its target appears in any VM
//! record's migration (`owner` and `migrating_to`), judged on the applied state and on
//! the moves started earlier in the same step.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use scheduler::{ClusterSnapshot, DrainPlan, MoveKind, NodeId, Reason, VmId, Wave};
use tokio::sync::watch;

use crate::control::placement::{self, PlacementError};
use crate::node::demand::Demand;
use crate::node::{now_unix_ms, Agent, ForwardRequest};
#[cfg(test)]
use crate::state::jobs::BalancePolicy;
use crate::state::jobs::{
    self, JobCommand, JobKind, JobMove, JobRecord, JobStatus, MoveOutcome, MoveStatus,
};
use crate::state::vms::{DesiredState, RuntimeState};
use crate::state::{ClusterState, Command, NodeState};

/// How often the leader advances its jobs.
pub const JOB_TICK: Duration = Duration::from_millis(200);
/// Failed moves of one VM after which a drain gives up on it.
pub const MOVE_ATTEMPTS_MAX: usize = 3;

/// The scheduler's view with in-flight migrations and the balancing policy.
pub fn snapshot(state: &ClusterState) -> Result<ClusterSnapshot, PlacementError> {
    let mut snap = placement::snapshot_with_migrations(state)?;
    snap.policy.balance = state.jobs.policy.mode;
    snap.policy.aggressiveness = state.jobs.policy.aggressiveness;
    snap.policy.min_dwell_ms = state.jobs.policy.min_dwell_ms;
    snap.policy.migration_cost_bp_per_s = state.jobs.policy.migration_cost_bp_per_s;
    Ok(snap)
}

/// The moves of a scheduler timeline as queued job moves (wave numbers from 1).
pub fn moves_of(waves: &[Wave]) -> Vec<JobMove> {
    let mut out = Vec::new();
    for (i, w) in waves.iter().enumerate() {
        for m in &w.moves {
            let mut jm = JobMove::queued(
                &m.vm.0,
                m.from.0,
                m.to.0,
                i as u32 + 1,
                m.start_ms,
                m.end_ms,
            );
            jm.quick = m.kind == MoveKind::Quick;
            jm.why_not_live = m.why_not_live.iter().map(ToString::to_string).collect();
            out.push(jm);
        }
    }
    out
}

/// Why a drain plan cannot empty the node: each VM left behind with its reasons. A VM
/// that is already migrating away is not a reason to refuse (it is leaving).
pub fn unmovable_text(plan: &DrainPlan) -> Option<String> {
    let stuck: Vec<String> = plan
        .unmovable
        .iter()
        .filter(|u| {
            !u.reasons
                .iter()
                .any(|r| matches!(r, Reason::AlreadyMigrating { .. }))
        })
        .map(|u| {
            let why: Vec<String> = u.reasons.iter().map(ToString::to_string).collect();
            format!("VM {} cannot go anywhere: {}", u.vm.0, why.join("; "))
        })
        .collect();
    (!stuck.is_empty()).then(|| stuck.join(". "))
}

/// Why the leader cannot plan.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Job(#[from] jobs::JobError),
    #[error("cannot read the cluster for the scheduler")]
    Placement(#[source] PlacementError),
    #[error("the scheduler could not plan")]
    Plan(#[source] scheduler::PlanError),
    #[error("drain of node {node} refused: {why}")]
    Unmovable { node: u64, why: String },
}

/// Check and plan a drain of `node` at `now` (nothing committed).
pub fn plan_drain(state: &ClusterState, node: u64, now: u64) -> Result<DrainPlan, DrainError> {
    jobs::check_drain(state, node)?;
    let snap = snapshot(state).map_err(DrainError::Placement)?;
    if !snap.nodes.iter().any(|n| n.id.0 == node) {
        // A node the scheduler leaves out (unknown CPU vendor, no memory) runs no VMs.
        return Ok(DrainPlan {
            node: NodeId(node),
            now_ms: now,
            waves: Vec::new(),
            finish_ms: now,
            lower_bound_ms: 0,
            ownership_moves: Vec::new(),
            unmovable: Vec::new(),
            incoming_in_flight: Vec::new(),
        });
    }
    let plan = scheduler::drain(&snap, NodeId(node), now).map_err(DrainError::Plan)?;
    if let Some(why) = unmovable_text(&plan) {
        return Err(DrainError::Unmovable { node, why });
    }
    Ok(plan)
}

/// The VMs a failback to `node` brings back: moved off it by its drain jobs not yet
/// failed back, still running where the drain put them.
pub fn failback_vms(state: &ClusterState, node: u64) -> Vec<VmId> {
    let mut out: Vec<VmId> = Vec::new();
    for j in state.jobs.jobs.values() {
        if j.kind != JobKind::Drain || j.node != node || j.failed_back {
            continue;
        }
        for m in j.moves.iter().filter(|m| m.status == MoveStatus::Done) {
            let Some(v) = crate::state::vms::find(state, &m.vm) else {
                continue;
            };
            let id = VmId(m.vm.clone());
            if v.owner != Some(node) && v.desired == DesiredState::Running && !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out.sort();
    out
}

/// Plan the failback of `vms` to `node`, judged as if `node` were already Up.
pub fn plan_failback(
    state: &ClusterState,
    node: u64,
    vms: &[VmId],
    now: u64,
) -> Result<DrainPlan, DrainError> {
    let mut up = state.clone();
    if let Some(n) = up.nodes.get_mut(&node) {
        n.state = NodeState::Up;
    }
    let snap = snapshot(&up).map_err(DrainError::Placement)?;
    let vms: Vec<VmId> = vms
        .iter()
        .filter(|v| snap.vms.iter().any(|s| s.id == **v))
        .cloned()
        .collect();
    scheduler::failback(&snap, NodeId(node), &vms, now).map_err(DrainError::Plan)
}

/// The balancer's plan under the replicated policy and the measured `demand` (nothing
/// committed).
pub fn plan_balance(
    state: &ClusterState,
    demand: &Demand,
    now: u64,
) -> Result<scheduler::BalancePlan, DrainError> {
    let mut snap = snapshot(state).map_err(DrainError::Placement)?;
    placement::add_demand(&mut snap, demand);
    scheduler::balance(&snap, now).map_err(DrainError::Plan)
}

/// Nodes taking part in a migration now (source or target).
fn busy_nodes(state: &ClusterState) -> BTreeSet<u64> {
    let mut busy = BTreeSet::new();
    for v in state.vms.values() {
        if let Some(to) = v.migrating_to {
            busy.insert(to);
            busy.extend(v.owner);
        }
    }
    busy
}

fn end(job: u64, vm: &str, outcome: MoveOutcome, reason: String, now: u64) -> JobCommand {
    JobCommand::EndMove {
        job,
        vm: vm.to_owned(),
        outcome,
        reason,
        at_unix_ms: now,
    }
}

fn finish(job: u64, status: JobStatus, reason: String, now: u64) -> JobCommand {
    JobCommand::FinishJob {
        job,
        status,
        reason,
        at_unix_ms: now,
    }
}

/// The job commands the leader proposes now, in order. Pure.
pub fn step(state: &ClusterState, now: u64) -> Vec<JobCommand> {
    let mut out = Vec::new();
    let mut busy = busy_nodes(state);
    // 1. In-flight moves whose migration ended without a FinishMigration we saw.
    for j in state.jobs.jobs.values() {
        for m in j.moves.iter().filter(|m| m.status == MoveStatus::InFlight) {
            match crate::state::vms::find(state, &m.vm) {
                None => out.push(end(
                    j.id,
                    &m.vm,
                    MoveOutcome::Failed,
                    "the VM was deleted".into(),
                    now,
                )),
                Some(v) if v.migrating_to == Some(m.to) => {}
                Some(v) if v.owner == Some(m.to) => {
                    out.push(end(j.id, &m.vm, MoveOutcome::Done, String::new(), now))
                }
                Some(v) => out.push(end(
                    j.id,
                    &m.vm,
                    MoveOutcome::Failed,
                    format!(
                        "the migration ended without switchover (owner {:?})",
                        v.owner
                    ),
                    now,
                )),
            }
        }
    }
    // 2. Running jobs: stop, start moves, finish or re-plan.
    for j in state
        .jobs
        .jobs
        .values()
        .filter(|j| j.status == JobStatus::Running)
    {
        let node_state = state.nodes.get(&j.node).map(|n| n.state);
        let stop = match (j.kind, node_state) {
            (JobKind::Drain, Some(NodeState::Paused)) => None,
            (JobKind::Failback, Some(NodeState::Up)) => None,
            (JobKind::Balance, _) => None,
            (_, Some(s)) => Some(format!("node {} is {s}", j.node)),
            (_, None) => Some(format!("node {} was removed", j.node)),
        };
        if let Some(why) = stop {
            out.push(finish(j.id, JobStatus::Aborted, why, now));
            continue;
        }
        let mut changed = false;
        let mut started_vms = BTreeSet::new();
        for m in j.moves.iter().filter(|m| m.status == MoveStatus::Queued) {
            if !started_vms.insert(m.vm.clone()) {
                continue; // one open move per VM at a time
            }
            let skip = match crate::state::vms::find(state, &m.vm) {
                None => Some("the VM was deleted".to_owned()),
                Some(v) if v.desired != DesiredState::Running => {
                    Some("the VM was stopped".to_owned())
                }
                Some(v) if v.owner != Some(m.from) => Some(format!(
                    "the VM is now on node {}",
                    v.owner.unwrap_or_default()
                )),
                Some(v) if v.runtime == RuntimeState::Failed => {
                    Some(format!("the VM failed: {}", v.reason))
                }
                Some(_) => None,
            };
            if let Some(why) = skip {
                out.push(end(j.id, &m.vm, MoveOutcome::Skipped, why, now));
                changed = true;
                continue;
            }
            let Some(v) = crate::state::vms::find(state, &m.vm) else {
                continue;
            };
            if v.migrating_to.is_some() || v.runtime != RuntimeState::Running {
                continue; // wait for another migration of it, or for it to run
            }
            if busy.contains(&m.from) || busy.contains(&m.to) {
                continue;
            }
            let reasons = if m.quick {
                Vec::new()
            } else {
                placement::why_not(state, &m.vm, m.to).unwrap_or_else(|e| vec![e.to_string()])
            };
            if !reasons.is_empty() {
                out.push(end(
                    j.id,
                    &m.vm,
                    MoveOutcome::Failed,
                    format!(
                        "target node {} no longer fits: {}",
                        m.to,
                        reasons.join(", ")
                    ),
                    now,
                ));
                changed = true;
                continue;
            }
            out.push(JobCommand::StartMove {
                job: j.id,
                vm: m.vm.clone(),
                at_unix_ms: now,
            });
            busy.insert(m.from);
            busy.insert(m.to);
            changed = true;
        }
        if changed || j.open_moves() > 0 {
            continue;
        }
        match j.kind {
            JobKind::Drain => out.extend(drain_tail(state, j, now)),
            JobKind::Failback | JobKind::Balance => {
                let failed = j.count(MoveStatus::Failed);
                let status = JobStatus::Done;
                let reason = if failed > 0 {
                    format!("{failed} moves failed")
                } else {
                    String::new()
                };
                out.push(finish(j.id, status, reason, now));
            }
        }
    }
    out
}

/// A drain with no open moves: done when the node is empty, else re-plan or give up.
fn drain_tail(state: &ClusterState, j: &JobRecord, now: u64) -> Option<JobCommand> {
    let remaining: Vec<&crate::state::vms::VmRecord> = state
        .vms
        .values()
        .filter(|v| jobs::must_leave(v, j.node))
        .collect();
    if remaining.is_empty() {
        return Some(finish(
            j.id,
            JobStatus::Done,
            format!("node {} is empty", j.node),
            now,
        ));
    }
    if remaining.iter().any(|v| v.migrating_to.is_some()) {
        return None; // a migration started elsewhere is still running
    }
    for v in &remaining {
        let failed: Vec<&JobMove> = j
            .moves
            .iter()
            .filter(|m| m.vm == v.spec.name && m.status == MoveStatus::Failed)
            .collect();
        if failed.len() >= MOVE_ATTEMPTS_MAX {
            let last = failed.last().map(|m| m.reason.clone()).unwrap_or_default();
            return Some(finish(
                j.id,
                JobStatus::Failed,
                format!(
                    "VM {} could not be moved after {} attempts: {last}",
                    v.spec.name,
                    failed.len()
                ),
                now,
            ));
        }
    }
    let snap = match snapshot(state) {
        Ok(s) => s,
        Err(e) => return Some(finish(j.id, JobStatus::Failed, crate::error_chain(&e), now)),
    };
    let plan = match scheduler::drain(&snap, NodeId(j.node), now) {
        Ok(p) => p,
        Err(e) => return Some(finish(j.id, JobStatus::Failed, crate::error_chain(&e), now)),
    };
    if let Some(why) = unmovable_text(&plan) {
        return Some(finish(j.id, JobStatus::Failed, why, now));
    }
    let moves = moves_of(&plan.waves);
    if moves.is_empty() {
        return None; // e.g. a VM still starting; look again next tick
    }
    Some(JobCommand::AddMoves {
        job: j.id,
        moves,
        planned_finish_unix_ms: plan.finish_ms,
        at_unix_ms: now,
    })
}

/// A balance job to start now under the policy, if the balancer wants moves and no
/// other job or migration is running.
pub fn balance_job(state: &ClusterState, demand: &Demand, now: u64) -> Option<JobCommand> {
    if state.jobs.policy.mode == scheduler::BalanceMode::None
        || state.jobs.any_running()
        || state.vms.values().any(|v| v.migrating_to.is_some())
    {
        return None;
    }
    let plan = match plan_balance(state, demand, now) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "balance planning failed");
            return None;
        }
    };
    let moves = moves_of(&plan.waves);
    if moves.is_empty() {
        return None;
    }
    Some(JobCommand::StartJob {
        kind: JobKind::Balance,
        node: 0,
        moves,
        planned_finish_unix_ms: plan.finish_ms,
        at_unix_ms: now,
    })
}

/// On the leader, advance jobs and run the balancer until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let mut last_balance = Instant::now();
    let mut applied = agent.applied_watch();
    let mut tick = crate::node::grid_interval(JOB_TICK);
    loop {
        // While a job runs, a newly applied entry (a move's migration ended) wakes the
        // runner at once, so the next move starts without waiting for the tick.
        let last = *applied.borrow_and_update();
        let job_running = agent.read_sm(|d| d.state.jobs.any_running());
        tokio::select! {
            _ = tick.tick() => {}
            _ = async { applied.wait_for(|a| *a != last).await.is_ok() }, if job_running => {
                tokio::time::sleep(crate::control::reconciler::APPLY_WAKE_DELAY).await;
            }
            _ = shutdown.changed() => return,
        }
        let leader = agent.leader();
        if leader != Some(agent.node_id()) {
            if !agent.wait_until_leader(&mut shutdown).await {
                return;
            }
            last_balance = Instant::now();
            continue;
        }
        // Nothing to step and no balancing round due: no copy of the state, no lock (the
        // idle case, every tick).
        let busy = agent.read_sm(|d| {
            let due =
                last_balance.elapsed() >= Duration::from_millis(d.state.jobs.policy.interval_ms);
            due || d.state.jobs.jobs.values().any(|j| {
                j.status == JobStatus::Running
                    || j.moves.iter().any(|m| m.status == MoveStatus::InFlight)
            })
        });
        if !busy {
            continue;
        }
        // Judge and commit under the placement lock: the migration queue and `vm migrate`
        // on this leader cannot take a slot this step counts as free.
        let _placing = agent.placement_lock().await;
        let state = agent.read_sm(|d| d.state.clone());
        let mut cmds = step(&state, now_unix_ms());
        let interval = Duration::from_millis(state.jobs.policy.interval_ms);
        if cmds.is_empty() && last_balance.elapsed() >= interval {
            last_balance = Instant::now();
            cmds.extend(balance_job(&state, &agent.demand(), now_unix_ms()));
            agent.note_balance_round();
        }
        for cmd in cmds {
            let text = cmd.to_string();
            match agent
                .write(ForwardRequest::Command(Command::Job(cmd)))
                .await
            {
                Ok(_) => tracing::debug!(cmd = %text, "job step committed"),
                Err(e) => tracing::warn!(cmd = %text, error = %e, "job step not committed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures;
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use crate::state::vms::VmCommand;
    use crate::state::CommandResult;

    fn cluster(n: u64) -> ClusterState {
        fixtures::cluster(n, |_| fixtures::amd(4, 4 << 30))
    }

    fn run_vm(s: &mut ClusterState, name: &str, owner: u64) {
        let spec = VmSpec::test_guest(name, 1, 256, TestWorkload::new(WorkloadName::Idle));
        let r = s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(owner),
            at_unix_ms: 2,
        }));
        assert_eq!(r.0, CommandResult::Ok);
        report_running(s, name);
    }

    fn report_running(s: &mut ClusterState, name: &str) {
        let v = crate::state::vms::find(s, name).cloned().expect("vm");
        s.apply(&Command::Vm(VmCommand::ReportVmState {
            name: name.into(),
            node_id: v.owner.unwrap_or(0),
            generation: v.generation,
            runtime: RuntimeState::Running,
            reason: String::new(),
            at_unix_ms: 3,
            restart: false,
        }));
    }

    fn job(s: &mut ClusterState, c: JobCommand) -> CommandResult {
        s.apply(&Command::Job(c)).0
    }

    fn start_drain(s: &mut ClusterState, node: u64, now: u64) -> u64 {
        let plan = plan_drain(s, node, now).expect("plan");
        let r = job(
            s,
            JobCommand::StartJob {
                kind: JobKind::Drain,
                node,
                moves: moves_of(&plan.waves),
                planned_finish_unix_ms: plan.finish_ms,
                at_unix_ms: now,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        s.jobs.last_job_id
    }

    /// Apply one executor step, then finish every migration it started (`ok`), as the
    /// owners' reconcilers would. Returns the VMs whose migration started.
    fn tick(s: &mut ClusterState, now: u64, ok: bool) -> Vec<(String, u64, u64)> {
        let mut started = Vec::new();
        for c in step(s, now) {
            if let JobCommand::StartMove { vm, .. } = &c {
                let from = crate::state::vms::find(s, vm)
                    .and_then(|v| v.owner)
                    .unwrap_or(0);
                assert_eq!(job(s, c.clone()), CommandResult::Ok, "{c}");
                let to = crate::state::vms::find(s, vm)
                    .and_then(|v| v.migrating_to)
                    .unwrap_or(0);
                started.push((vm.clone(), from, to));
            } else {
                assert_eq!(job(s, c.clone()), CommandResult::Ok, "{c}");
            }
        }
        // Never two migrations on one node at once.
        let mut seen = BTreeSet::new();
        for v in s.vms.values() {
            if let (Some(o), Some(t)) = (v.owner, v.migrating_to) {
                assert!(
                    seen.insert(o) && seen.insert(t),
                    "node overlap: {:?}",
                    s.vms
                );
            }
        }
        for (vm, _, to) in &started {
            s.apply(&Command::Vm(VmCommand::FinishMigration {
                name: vm.clone(),
                to: *to,
                ok,
                reason: if ok {
                    "receipt matches".into()
                } else {
                    "target refused".into()
                },
                at_unix_ms: now + 1,
                stats: None,
            }));
            if ok {
                report_running(s, vm);
            }
        }
        started
    }

    #[test]
    fn drain_runs_one_migration_per_node_empties_the_node_and_finishes() {
        let mut s = cluster(4);
        for i in 0..5 {
            run_vm(&mut s, &format!("d{i}"), 1);
        }
        run_vm(&mut s, "other", 2);
        let id = start_drain(&mut s, 1, 100);
        assert_eq!(s.nodes[&1].state, NodeState::Paused);
        let mut rounds = 0;
        while s.jobs.jobs[&id].status == JobStatus::Running {
            let started = tick(&mut s, 200 + rounds, true);
            // Node 1 is the source of every move: one at a time.
            assert!(started.len() <= 1, "{started:?}");
            rounds += 1;
            assert!(rounds < 50, "drain did not finish: {:?}", s.jobs.jobs[&id]);
        }
        let j = &s.jobs.jobs[&id];
        assert_eq!(j.status, JobStatus::Done, "{j:?}");
        assert_eq!(j.count(MoveStatus::Done), 5);
        assert!(s.vms.values().all(|v| v.owner != Some(1)));
        // Every move is an ordinary migration record (listable, cancellable, counted).
        let recs: Vec<_> = s.migrations.values().collect();
        assert_eq!(recs.len(), 5, "{recs:?}");
        assert!(
            recs.iter()
                .all(|m| m.source == 1
                    && m.state == crate::state::migrations::MigrationState::Succeeded),
            "{recs:?}"
        );
        let texts: Vec<&str> = s.events.values().map(|e| e.message.as_str()).collect();
        assert!(
            texts.iter().any(|t| t.contains("drain of node 1 started")),
            "{texts:?}"
        );
        assert!(texts.iter().any(|t| t.contains("wave 1 of")), "{texts:?}");
        assert!(
            texts.iter().any(|t| t.contains("VM d0 moved to node")),
            "{texts:?}"
        );
        assert!(
            texts.iter().any(|t| t.contains("done (5 moved, 0 failed)")),
            "{texts:?}"
        );
    }

    #[test]
    fn two_drains_run_disjoint_migrations_concurrently() {
        let mut s = cluster(6);
        for i in 0..2 {
            run_vm(&mut s, &format!("a{i}"), 1);
            run_vm(&mut s, &format!("b{i}"), 2);
        }
        start_drain(&mut s, 1, 10);
        start_drain(&mut s, 2, 11);
        let started = tick(&mut s, 20, true);
        assert_eq!(started.len(), 2, "{started:?}");
    }

    #[test]
    fn failed_moves_are_replanned_then_the_drain_gives_up_naming_the_vm() {
        let mut s = cluster(3);
        run_vm(&mut s, "x", 1);
        let id = start_drain(&mut s, 1, 10);
        for r in 0..20 {
            if s.jobs.jobs[&id].status != JobStatus::Running {
                break;
            }
            tick(&mut s, 20 + r, false);
        }
        let j = &s.jobs.jobs[&id];
        assert_eq!(j.status, JobStatus::Failed, "{j:?}");
        assert!(
            j.reason
                .contains("VM x could not be moved after 3 attempts"),
            "{}",
            j.reason
        );
        assert!(j.reason.contains("target refused"), "{}", j.reason);
        assert_eq!(
            crate::state::vms::find(&s, "x").and_then(|v| v.owner),
            Some(1)
        );
    }

    #[test]
    fn abort_drops_queued_moves_keeps_in_flight_and_a_new_drain_resumes() {
        let mut s = cluster(3);
        for i in 0..3 {
            run_vm(&mut s, &format!("d{i}"), 1);
        }
        let id = start_drain(&mut s, 1, 10);
        // One move starts; abort while it is in flight.
        let cmds = step(&s, 20);
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        for c in cmds {
            job(&mut s, c);
        }
        let r = job(
            &mut s,
            JobCommand::FinishJob {
                job: id,
                status: JobStatus::Aborted,
                reason: "operator".into(),
                at_unix_ms: 21,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        let j = s.jobs.jobs[&id].clone();
        assert_eq!(
            (j.count(MoveStatus::InFlight), j.count(MoveStatus::Dropped)),
            (1, 2)
        );
        // The in-flight migration finishes; the aborted job records it, starts nothing.
        let moving = j
            .moves
            .iter()
            .find(|m| m.status == MoveStatus::InFlight)
            .cloned()
            .expect("in flight");
        s.apply(&Command::Vm(VmCommand::FinishMigration {
            name: moving.vm.clone(),
            to: moving.to,
            ok: true,
            reason: String::new(),
            at_unix_ms: 22,
            stats: None,
        }));
        assert_eq!(s.jobs.jobs[&id].count(MoveStatus::Done), 1);
        assert!(step(&s, 23).is_empty());
        assert_eq!(s.nodes[&1].state, NodeState::Paused);
        // Draining again resumes with the two VMs left.
        let id2 = start_drain(&mut s, 1, 30);
        assert_eq!(s.jobs.jobs[&id2].moves.len(), 2);
        assert!(s
            .events
            .values()
            .any(|e| e.message.contains("drain of node 1 resumed")));
        // Failback brings back the VMs both drains moved.
        for r in 0..20 {
            if s.jobs.jobs[&id2].status != JobStatus::Running {
                break;
            }
            for c in step(&s, 40 + r) {
                job(&mut s, c.clone());
                if let JobCommand::StartMove { vm, .. } = c {
                    let to = crate::state::vms::find(&s, &vm)
                        .and_then(|v| v.migrating_to)
                        .unwrap_or(0);
                    s.apply(&Command::Vm(VmCommand::FinishMigration {
                        name: vm.clone(),
                        to,
                        ok: true,
                        reason: String::new(),
                        at_unix_ms: 41 + r,
                        stats: None,
                    }));
                    report_running(&mut s, &vm);
                }
            }
        }
        assert_eq!(s.jobs.jobs[&id2].status, JobStatus::Done);
        let back = failback_vms(&s, 1);
        assert_eq!(back.len(), 3, "{back:?}");
    }

    #[test]
    fn a_queued_move_to_a_node_that_went_down_fails_and_is_replanned_elsewhere() {
        let mut s = cluster(4);
        for i in 0..3 {
            run_vm(&mut s, &format!("q{i}"), 1);
        }
        let id = start_drain(&mut s, 1, 10);
        let queued_to: Vec<u64> = s.jobs.jobs[&id].moves.iter().map(|m| m.to).collect();
        let dead = queued_to[queued_to.len() - 1];
        s.apply(&Command::SetNodeState {
            node_id: dead,
            state: NodeState::Down,
            at_unix_ms: 11,
            reason: "killed".into(),
        });
        for r in 0..30 {
            if s.jobs.jobs[&id].status != JobStatus::Running {
                break;
            }
            tick(&mut s, 20 + r, true);
        }
        let j = &s.jobs.jobs[&id];
        assert_eq!(j.status, JobStatus::Done, "{j:?}");
        assert!(j
            .moves
            .iter()
            .any(|m| m.status == MoveStatus::Failed && m.reason.contains("no longer fits")));
        assert!(s
            .vms
            .values()
            .all(|v| v.owner != Some(1) && v.owner != Some(dead)));
    }

    #[test]
    fn refusals_name_the_problem_and_change_nothing() {
        let mut s = cluster(2);
        run_vm(&mut s, "a", 1);
        let before = s.clone();
        let err = |s: &ClusterState, node| {
            plan_drain(s, node, 5)
                .map(|_| ())
                .map_err(|e| crate::error_chain(&e))
                .expect_err("refused")
        };
        assert!(err(&s, 9).contains("unknown node id 9"));
        s.apply(&Command::SetNodeState {
            node_id: 2,
            state: NodeState::Paused,
            at_unix_ms: 3,
            reason: String::new(),
        });
        assert!(err(&s, 1).contains("node 1 is the last up node"));
        let r = job(
            &mut s,
            JobCommand::StartJob {
                kind: JobKind::Drain,
                node: 1,
                moves: Vec::new(),
                planned_finish_unix_ms: 0,
                at_unix_ms: 6,
            },
        );
        assert!(matches!(r, CommandResult::Rejected { reason } if reason.contains("last up node")));
        s = before.clone();
        // A VM too big for any other node cannot go anywhere: named with the reason.
        for (name, mib, owner) in [("big", 3000, 1), ("big2", 1500, 2)] {
            let spec = VmSpec::test_guest(name, 1, mib, TestWorkload::new(WorkloadName::Idle));
            s.apply(&Command::Vm(VmCommand::CreateVm {
                spec,
                owner: Some(owner),
                at_unix_ms: 2,
            }));
        }
        let e = err(&s, 1);
        assert!(e.contains("VM big cannot go anywhere"), "{e}");
        s = before;
        start_drain(&mut s, 1, 7);
        assert!(err(&s, 1).contains("already being drained"));
        let resume = jobs::check_resume(&s, 1).map_err(|e| e.to_string());
        assert!(resume.is_err_and(|e| e.contains("abort it first")));
        assert!(jobs::check_resume(&s, 2).is_err_and(|e| e.to_string().contains("not paused")));
    }

    #[test]
    fn balance_job_moves_off_the_hot_node_and_none_moves_nothing() {
        let mut s = cluster(3);
        for i in 0..4 {
            let spec = VmSpec::test_guest(
                &format!("b{i}"),
                1,
                900,
                TestWorkload::new(WorkloadName::Idle),
            );
            s.apply(&Command::Vm(VmCommand::CreateVm {
                spec,
                owner: Some(1),
                at_unix_ms: 2,
            }));
            report_running(&mut s, &format!("b{i}"));
        }
        assert!(
            balance_job(&s, &Demand::new(), 10).is_none(),
            "policy none moves nothing"
        );
        let r = job(
            &mut s,
            JobCommand::SetPolicy {
                policy: BalancePolicy {
                    mode: scheduler::BalanceMode::EvenDistribution,
                    aggressiveness: scheduler::Aggressiveness::High,
                    interval_ms: 1000,
                    ..BalancePolicy::default()
                },
                at_unix_ms: 11,
            },
        );
        assert_eq!(r, CommandResult::Ok);
        let c = balance_job(&s, &Demand::new(), 12).expect("balance moves");
        assert_eq!(job(&mut s, c), CommandResult::Ok);
        let id = s.jobs.last_job_id;
        for r in 0..20 {
            if s.jobs.jobs[&id].status != JobStatus::Running {
                break;
            }
            tick(&mut s, 20 + r, true);
        }
        assert_eq!(s.jobs.jobs[&id].status, JobStatus::Done);
        let on1 = s.vms.values().filter(|v| v.owner == Some(1)).count();
        assert!(on1 < 4, "{on1}");
        assert!(
            balance_job(&s, &Demand::new(), 100).is_none(),
            "a balanced cluster stays put"
        );
        let bad = job(
            &mut s,
            JobCommand::SetPolicy {
                policy: BalancePolicy {
                    interval_ms: 5,
                    ..BalancePolicy::default()
                },
                at_unix_ms: 12,
            },
        );
        assert!(
            matches!(bad, CommandResult::Rejected { reason } if reason.contains("below the minimum"))
        );
    }
}
