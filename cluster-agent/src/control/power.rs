//! Power saving on the Raft leader: drains a node whose standby was asked for, puts it in
//! standby and runs its power-off command; wakes standby nodes with their power-on
//! command when asked, when a placement finds no room, or (power-saving policy) when
//! the awake nodes are under pressure (`scheduler::power_pressure`). See
//! `crate::state::power` for the states.
//!
//! Commands run as child processes (argv, no shell) on their own tasks with a timeout
//! ([`POWER_COMMAND_TIMEOUT`]): the loop never waits for one. A failure (start error,
//! non-zero exit, timeout) is committed with its stderr (`PowerFailed`), which returns
//! the node to a sane state. Each command runs once per state entry on a leader (a new
//! leader runs a pending power-on again: powering on is idempotent; it runs a power-off
//! again only for a standby node it still hears).
//!
//! **Architecture Invariant:** a node is put in standby only when no VM is owned by it
//! or migrating to it (checked by the state machine on `EnterStandby`), and no job of
//! it runs. Hysteresis: the policy puts a node in standby only after it has been in its
//! state for the policy's `min_dwell_ms`, and wakes one for pressure only after that
//! long in standby (a placement shortfall wakes at once).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::control::job_runner;
use crate::node::demand::Demand;
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::jobs::{JobCommand, JobKind, JobStatus};
use crate::state::power::{self, PowerAction, PowerCommand};
use crate::state::{ClusterState, Command, NodeState};

/// How often the leader looks.
pub const POWER_TICK: Duration = Duration::from_millis(500);
/// A power command still running after this is killed and counted as failed.
pub const POWER_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// A woken node not heard within this goes back to standby (its wake-up failed).
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(900);
/// Most bytes of a failed command's stderr kept in its event.
const STDERR_KEPT: usize = 1024;

/// What the leader does next about a pending standby request. Pure.
pub fn standby_step(state: &ClusterState, node: u64, now: u64) -> Option<Step> {
    let rec = state.nodes.get(&node)?;
    let request = rec.standby_request.as_ref()?;
    if !matches!(rec.state, NodeState::Up | NodeState::Paused) {
        return Some(Step::Commit(Box::new(cancel(
            node,
            format!("node is {}", rec.state),
            now,
        ))));
    }
    let mut jobs = state.jobs.jobs.values().filter(|j| j.node == node);
    if jobs.clone().any(|j| j.status == JobStatus::Running) {
        return None; // its drain (or failback) runs; look again later
    }
    if power::vms_on(state, node).is_empty() {
        return Some(Step::Commit(Box::new(Command::Power(
            PowerCommand::EnterStandby {
                node,
                at_unix_ms: now,
            },
        ))));
    }
    if let Some(j) = jobs.find(|j| {
        j.kind == JobKind::Drain
            && j.created_unix_ms >= request.requested_unix_ms
            && j.status != JobStatus::Done
    }) {
        return Some(Step::Commit(Box::new(cancel(
            node,
            format!("drain job {} {}: {}", j.id, j.status.as_str(), j.reason),
            now,
        ))));
    }
    if state.vms.values().any(|v| v.migrating_to == Some(node)) {
        return None; // a VM still arrives; drain once it is there
    }
    Some(Step::Drain)
}

/// A step of [`standby_step`].
#[derive(Debug, PartialEq)]
pub enum Step {
    Commit(Box<Command>),
    /// Plan and start a drain job of the node.
    Drain,
}

fn cancel(node: u64, reason: String, now: u64) -> Command {
    Command::Power(PowerCommand::CancelStandby {
        node,
        reason,
        at_unix_ms: now,
    })
}

/// What power saving asks for now, if anything: wake a standby node (a placement
/// shortfall in any mode; pressure under the power-saving policy) or ask for the
/// standby of an empty node the balancer names. Pure, but for `demand`.
pub fn policy_step(
    state: &ClusterState,
    demand: &Demand,
    shortfall: Option<&str>,
    now: u64,
) -> Option<PowerCommand> {
    let busy = state.jobs.any_running()
        || state.vms.values().any(|v| v.migrating_to.is_some())
        || state
            .nodes
            .values()
            .any(|n| n.state == NodeState::Waking || n.standby_request.is_some());
    let dwell = state.jobs.policy.min_dwell_ms;
    let standby: Vec<u64> = state
        .nodes
        .iter()
        .filter(|(_, r)| r.state == NodeState::Standby)
        .map(|(id, _)| *id)
        .collect();
    if let (Some(why), Some(node)) = (shortfall, standby.first()) {
        if !state.nodes.values().any(|n| n.state == NodeState::Waking) {
            return Some(PowerCommand::BeginWake {
                node: *node,
                reason: format!("a placement found no room: {why}"),
                at_unix_ms: now,
            });
        }
    }
    if busy || state.jobs.policy.mode != scheduler::BalanceMode::PowerSaving {
        return None;
    }
    let mut snap = job_runner::snapshot(state).ok()?;
    crate::control::placement::add_demand(&mut snap, demand);
    let rested = |id: &u64| {
        state
            .nodes
            .get(id)
            .is_some_and(|r| now.saturating_sub(r.state_since_unix_ms) >= dwell)
    };
    match scheduler::power_pressure(&snap) {
        Ok(Some(why)) => {
            return standby
                .iter()
                .find(|id| rested(id))
                .map(|node| PowerCommand::BeginWake {
                    node: *node,
                    reason: format!("power saving: {why}"),
                    at_unix_ms: now,
                })
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "power pressure not judged");
            return None;
        }
    }
    let plan = job_runner::plan_balance(state, demand, now).ok()?;
    if plan.moves_count > 0 {
        return None;
    }
    plan.empty_nodes_may_power_off
        .iter()
        .map(|n| n.0)
        .find(|id| {
            rested(id)
                && state.nodes[id].state == NodeState::Up
                && power::check_standby(state, *id).is_ok()
        })
        .map(|node| PowerCommand::RequestStandby {
            node,
            reason: "power saving: the other nodes carry the demand with an N+1 reserve".into(),
            at_unix_ms: now,
        })
}

/// Run `argv` for `node` with a timeout; the error names the program, the exit status
/// and the end of its stderr.
pub async fn run_command(
    argv: &[String],
    node: u64,
    name: &str,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command configured".into());
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("VMCLUSTER_NODE_ID", node.to_string())
        .env("VMCLUSTER_NODE_NAME", name)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => {
            return Err(format!(
                "{program} did not finish within {} s (killed)",
                timeout.as_secs()
            ))
        }
        Ok(Err(e)) => return Err(format!("{program}: {e}")),
        Ok(Ok(o)) => o,
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let mut start = stderr.len().saturating_sub(STDERR_KEPT);
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    Err(format!("{program} {}: {}", out.status, &stderr[start..]))
}

async fn commit(agent: &Agent, cmd: Command) {
    let text = cmd.to_string();
    match agent.write(ForwardRequest::Command(cmd)).await {
        Ok(_) => tracing::info!(cmd = %text, "power step committed"),
        Err(e) => tracing::warn!(cmd = %text, error = %e, "power step not committed"),
    }
}

/// Run the power command of `node` for `action` on its own task; commit a failure.
fn spawn_command(agent: &Arc<Agent>, state: &ClusterState, node: u64, action: PowerAction) {
    let Some(rec) = state.nodes.get(&node) else {
        return;
    };
    let argv = match action {
        PowerAction::Off => rec.registration.power.off.clone(),
        PowerAction::On => rec.registration.power.on.clone(),
    };
    let name = rec.registration.name.clone();
    let agent = agent.clone();
    tokio::spawn(async move {
        tracing::info!(
            node,
            action = action.as_str(),
            ?argv,
            "running power command"
        );
        match run_command(&argv, node, &name, POWER_COMMAND_TIMEOUT).await {
            Ok(()) => {
                agent.note_power_command(action.as_str(), "ok");
                tracing::info!(node, action = action.as_str(), "power command done");
            }
            Err(error) => {
                agent.note_power_command(action.as_str(), "failed");
                tracing::warn!(node, action = action.as_str(), %error, "power command failed");
                commit(
                    &agent,
                    Command::Power(PowerCommand::PowerFailed {
                        node,
                        action,
                        error,
                        at_unix_ms: now_unix_ms(),
                    }),
                )
                .await;
            }
        }
    });
}

/// Start a drain job of `node` (under the placement lock); cancel the standby if the
/// drain cannot be planned.
async fn start_drain(agent: &Agent, node: u64) {
    let _placing = agent.placement_lock().await;
    let state = agent.read_sm(|d| d.state.clone());
    let now = now_unix_ms();
    let cmd = match job_runner::plan_drain(&state, node, now) {
        Ok(plan) => Command::Job(JobCommand::StartJob {
            kind: JobKind::Drain,
            node,
            moves: job_runner::moves_of(&plan.waves),
            planned_finish_unix_ms: plan.finish_ms,
            at_unix_ms: now,
        }),
        Err(e) => cancel(
            node,
            format!("cannot drain: {}", crate::error_chain(&e)),
            now,
        ),
    };
    commit(agent, cmd).await;
}

/// On the leader, run standby and wake-up until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    // Power commands this leader started: (node, action, state since).
    let mut ran: BTreeSet<(u64, &'static str, u64)> = BTreeSet::new();
    let mut last_policy = Instant::now();
    let mut tick = crate::node::grid_interval(POWER_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if agent.leader() != Some(agent.node_id()) {
            ran.clear();
            if !agent.wait_until_leader(&mut shutdown).await {
                return;
            }
            last_policy = Instant::now();
            continue;
        }
        // Most ticks have nothing to judge (no node asleep or asked to sleep, no policy
        // round due): a look at the applied state decides that without copying it.
        let shortfall = agent.take_capacity_short();
        let (nodes_to_judge, policy_due) = agent.read_sm(|d| {
            let s = &d.state;
            let nodes = s
                .nodes
                .values()
                .any(|r| r.state.is_asleep() || r.standby_request.is_some());
            let interval = Duration::from_millis(s.jobs.policy.interval_ms);
            let policy = shortfall.is_some()
                || (s.jobs.policy.mode == scheduler::BalanceMode::PowerSaving
                    && last_policy.elapsed() >= interval);
            (nodes, policy)
        });
        if !nodes_to_judge && !policy_due {
            ran.clear();
            continue;
        }
        let state = agent.read_sm(|d| d.state.clone());
        let now = now_unix_ms();
        ran.retain(|(n, _, since)| {
            state
                .nodes
                .get(n)
                .is_some_and(|r| r.state_since_unix_ms == *since && r.state.is_asleep())
        });
        for (id, rec) in &state.nodes {
            match rec.state {
                NodeState::Standby
                    if agent.recently_heard(*id)
                        && ran.insert((*id, "off", rec.state_since_unix_ms)) =>
                {
                    spawn_command(&agent, &state, *id, PowerAction::Off)
                }
                NodeState::Waking => {
                    if ran.insert((*id, "on", rec.state_since_unix_ms)) {
                        spawn_command(&agent, &state, *id, PowerAction::On);
                    } else if agent.waking_seen(*id, rec.state_since_unix_ms).elapsed()
                        > WAKE_TIMEOUT
                    {
                        commit(
                            &agent,
                            Command::Power(PowerCommand::PowerFailed {
                                node: *id,
                                action: PowerAction::On,
                                error: format!(
                                    "the node did not rejoin within {} s",
                                    WAKE_TIMEOUT.as_secs()
                                ),
                                at_unix_ms: now,
                            }),
                        )
                        .await;
                    }
                }
                _ => {}
            }
            match standby_step(&state, *id, now) {
                Some(Step::Commit(cmd)) => commit(&agent, *cmd).await,
                Some(Step::Drain) => start_drain(&agent, *id).await,
                None => {}
            }
        }
        if !policy_due {
            continue;
        }
        last_policy = Instant::now();
        if let Some(cmd) = policy_step(&state, &agent.demand(), shortfall.as_deref(), now) {
            commit(&agent, Command::Power(cmd)).await;
        }
    }
}
