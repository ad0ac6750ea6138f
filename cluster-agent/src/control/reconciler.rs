//! The VM reconciler: runs on every agent and makes the embedded VMM ([`VmHost`]) match
//! the committed VM records.
//!
//! Every [`RECONCILE_INTERVAL`] it reads the applied state and compares it with the VMs
//! this host runs. The decision of what to do is a pure function ([`plan`]) from the
//! records and the host's view to a list of [`Action`]s; the loop executes them (VMM calls
//! on a blocking thread) and reports the outcome through a committed
//! `ReportVmState` carrying the decision's generation.
//!
//! **Architecture Invariant:** the reconciler never decides placement; it only follows
//! committed records. A VM runs here only while its record names this node as owner with
//! desired state Running.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vmm_node::VmStatus;

use crate::control::progress::{Outcome, ProgressBoard};
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::vm_spec::VmSpec;
use crate::state::vms::{DesiredState, RuntimeState, VmCommand, VmRecord};
use crate::state::Command;
use crate::vmhost::VmHost;

/// How often the committed state is compared with the host.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// After an apply wakes the loop, how long it waits for more entries of the same batch.
pub const APPLY_WAKE_DELAY: Duration = Duration::from_millis(5);

/// What the host shows of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostView {
    Running,
    Paused,
    /// The VM ended by itself (crash, guest exit); still registered on the host.
    /// `failure`: it failed while running (worker died, vCPU error, guest reset: the
    /// [`failure_kind`]), which its restart policy may restart; `None` for a guest
    /// power-off or a requested stop.
    Ended {
        reason: String,
        failure: Option<&'static str>,
    },
    /// The name is taken by a VM not registered yet (being started, or an incoming live
    /// migration): nothing can start or stop it until it runs or is dropped.
    Arriving,
}

/// One step for the loop to execute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the VM here, then report Running or Failed for `generation`.
    Start { spec: Box<VmSpec>, generation: u64 },
    /// Stop and remove the VM from this host; report Stopped when `report` is set.
    /// `failure`: the report is of a failure (its kind) that the VM's restart policy may
    /// restart.
    Stop {
        name: String,
        report: Option<(u64, RuntimeState, String)>,
        failure: Option<&'static str>,
    },
    /// Live-migrate the VM to node `to` (this node is the source), then commit the end.
    MigrateOut { name: String, to: u64 },
    /// Give up the incoming live migration of the VM (see [`VmHost::abandon_incoming`]).
    AbandonIncoming { name: String },
    /// Report a state for `generation` without touching the VMM.
    Report {
        name: String,
        generation: u64,
        runtime: RuntimeState,
        reason: String,
    },
}

/// The actions that bring `host` in line with `records` for node `me`.
/// `migrating_out` names the VMs whose outgoing migration this node is running now.
pub fn plan(
    me: u64,
    records: &[VmRecord],
    host: &BTreeMap<String, HostView>,
    migrating_out: &BTreeSet<String>,
) -> Vec<Action> {
    let mut out = Vec::new();
    for r in records {
        let name = &r.spec.name;
        let mine = r.owner == Some(me);
        let run_here = mine && r.desired == DesiredState::Running;
        match (run_here, host.get(name)) {
            // Failed over to this node while its incoming migration is still being
            // received: the source is gone; give that receive up so the VM can start.
            (true, Some(HostView::Arriving)) if r.migrating_to.is_none() => {
                out.push(Action::AbandonIncoming { name: name.clone() });
            }
            (_, Some(HostView::Arriving)) => {}
            // Migrated away, switchover not yet committed: never restart it here.
            (true, None) if r.migrating_to.is_some() => {}
            (true, Some(HostView::Running | HostView::Paused)) if r.migrating_to.is_some() => {
                if let Some(to) = r.migrating_to.filter(|_| !migrating_out.contains(name)) {
                    out.push(Action::MigrateOut {
                        name: name.clone(),
                        to,
                    });
                }
            }
            // Arriving by migration: keep it until the switchover is committed.
            (false, Some(_)) if r.migrating_to == Some(me) => {}
            (true, None) => {
                // Start for a fresh decision, or again after this agent restarted while
                // the record still says Running. A failure is not retried in a loop.
                if matches!(r.runtime, RuntimeState::Starting | RuntimeState::Running) {
                    out.push(Action::Start {
                        spec: Box::new(r.spec.clone()),
                        generation: r.generation,
                    });
                }
            }
            (true, Some(HostView::Running | HostView::Paused)) => {
                if r.runtime != RuntimeState::Running {
                    out.push(Action::Report {
                        name: name.clone(),
                        generation: r.generation,
                        runtime: RuntimeState::Running,
                        reason: String::new(),
                    });
                }
            }
            (true, Some(HostView::Ended { reason, failure })) => out.push(Action::Stop {
                name: name.clone(),
                report: Some((
                    r.generation,
                    RuntimeState::Failed,
                    format!("the VM ended by itself: {reason}"),
                )),
                failure: *failure,
            }),
            (false, Some(_)) => out.push(Action::Stop {
                name: name.clone(),
                report: mine.then(|| (r.generation, RuntimeState::Stopped, r.reason.clone())),
                failure: None,
            }),
            (false, None) => {
                if mine && r.runtime == RuntimeState::Stopping {
                    out.push(Action::Report {
                        name: name.clone(),
                        generation: r.generation,
                        runtime: RuntimeState::Stopped,
                        reason: r.reason.clone(),
                    });
                }
            }
        }
    }
    for (name, view) in host {
        if *view != HostView::Arriving && !records.iter().any(|r| &r.spec.name == name) {
            out.push(Action::Stop {
                name: name.clone(),
                report: None,
                failure: None,
            });
        }
    }
    out
}

fn host_view(host: &VmHost) -> BTreeMap<String, HostView> {
    let mut view: BTreeMap<String, HostView> = host
        .list()
        .into_iter()
        .map(|i| {
            let view = match i.status {
                VmStatus::Running => HostView::Running,
                VmStatus::Paused => HostView::Paused,
                VmStatus::Stopped { reason } => HostView::Ended {
                    failure: failure_kind(&reason),
                    reason: format!("{reason:?}"),
                },
            };
            (i.name, view)
        })
        .collect();
    for name in host.arriving() {
        view.entry(name).or_insert(HostView::Arriving);
    }
    view
}

/// What kind of failure a VM's end is (a metric label), or `None` when the VM was asked
/// to stop or the guest powered itself off: those are not failures a restart policy
/// restarts.
pub fn failure_kind(reason: &vmm_node::StopReason) -> Option<&'static str> {
    use vmm_node::StopReason as R;
    match reason {
        R::Requested | R::GuestExit { .. } => None,
        R::GuestReset => Some("guest_reset"),
        R::VcpuError { .. } => Some("vcpu_error"),
        R::ProcessGone { .. } => Some("process_gone"),
    }
}

/// This node's own committed record says Down: it runs no VM (the fence watcher stops
/// what runs; failover may already have given its VMs to others).
fn recorded_down(agent: &Agent) -> bool {
    let me = agent.node_id();
    agent.read_sm(|d| {
        d.state
            .nodes
            .get(&me)
            .is_some_and(|n| n.state == crate::state::NodeState::Down)
    })
}

/// Run the reconciler until `shutdown` turns true; then stop every VM of this host.
pub async fn run(
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    progress: Arc<ProgressBoard>,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = agent.node_id();
    let migrating_out: Arc<std::sync::Mutex<BTreeSet<String>>> = Arc::default();
    let mut orphans = BTreeMap::new();
    let fence = tokio::spawn(crate::control::fencing::run_fence(
        agent.clone(),
        host.clone(),
        shutdown.clone(),
    ));
    let mut applied = agent.applied_watch();
    loop {
        // Without the lease (or before catching up after a lapse) this node may be cut
        // off while the leader fails its VMs over: start nothing (the fence watcher
        // stops what runs).
        let lease = agent.lease();
        if !lease.held || lease.catching_up || recorded_down(&agent) {
            tokio::select! {
                _ = tokio::time::sleep(crate::control::fencing::FENCE_POLL) => {}
                _ = shutdown.changed() => break,
            }
            continue;
        }
        let records: Vec<VmRecord> = agent.read_sm(|d| d.state.vms.values().cloned().collect());
        let view = host_view(&host);
        let busy = migrating_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for action in plan(me, &records, &view, &busy) {
            if let Action::MigrateOut { name, to } = action {
                migrating_out
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.clone());
                let (a, h, set) = (agent.clone(), host.clone(), migrating_out.clone());
                let p = progress.clone();
                tokio::spawn(async move {
                    migrate_out(&a, &h, &p, &name, to).await;
                    set.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                });
                continue;
            }
            execute(&agent, &host, action, lease.lapses).await;
        }
        crate::control::vm_disks::reconcile(&agent, &host, &records, &busy).await;
        crate::control::vm_nics::reconcile(&agent, &host, &records, &busy).await;
        resolve_orphaned_migrations(&agent, &host, &records, &busy, &mut orphans).await;
        // Woken early by newly applied entries (a new owner starts its VM at once).
        let last = *applied.borrow_and_update();
        // A full interval after each pass (not a tick on the grid, which can fire right
        // after a long pass): what a pass did (a VM started, a disk hot-added) shows in
        // the workers' cached views by the next one.
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            _ = async { applied.wait_for(|a| *a != last).await.is_ok() } => {
                tokio::time::sleep(APPLY_WAKE_DELAY).await;
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = fence.await;
    let h = host.clone();
    // VMs in worker processes keep running: a restarted agent adopts them.
    let stopped = tokio::task::spawn_blocking(move || h.stop_in_process())
        .await
        .unwrap_or_default();
    tracing::info!(node_id = me, vms = ?stopped, "reconciler stopped; local vms stopped");
}

async fn report(
    agent: &Agent,
    name: String,
    generation: u64,
    runtime: RuntimeState,
    reason: String,
    restart: bool,
) {
    let cmd = Command::Vm(VmCommand::ReportVmState {
        name: name.clone(),
        node_id: agent.node_id(),
        generation,
        runtime,
        reason,
        at_unix_ms: now_unix_ms(),
        restart,
    });
    match agent.write(ForwardRequest::Command(cmd)).await {
        Ok(_) => tracing::info!(vm = %name, generation, state = %runtime, "vm state reported"),
        // Stale reports (a newer decision was committed meanwhile) are expected.
        Err(e) => tracing::debug!(vm = %name, error = %e, "vm state report not applied"),
    }
}

/// How long an outgoing live migration record of this node may show no VM here and no
/// migration running here before this node asks the target how it ended.
pub const ORPHANED_MIGRATION_WAIT: Duration = Duration::from_secs(2);

/// Resolves the records of live migrations whose source side died with an earlier agent
/// process (kill -9 and a restart before the node was marked Down): the record still
/// names this node the owner and the target, nothing runs here and no migration runs
/// here, so nobody would ever end it. After [`ORPHANED_MIGRATION_WAIT`] this node asks
/// the target: it runs the VM (the switchover happened) → the migration succeeded; it
/// neither runs nor receives it → the migration is dead (a receive never resumes
/// without its source, and no new one starts for this record) and failed, and the VM
/// boots here again; it still receives it, or does not answer → ask again later.
///
/// A quick migration moves the owner only with `FinishMigration`, after the save and
/// the disk handoffs, and the target runs nothing before: while no disk of the VM was
/// handed off to the target (the save never finished, or never started because the VM
/// had been fenced here), the migration is failed without asking and the VM boots here
/// again. One whose disks were handed off is left to its own recovery (failover gives
/// the VM to the target once this node is Down).
async fn resolve_orphaned_migrations(
    agent: &Arc<Agent>,
    host: &Arc<VmHost>,
    records: &[VmRecord],
    busy: &BTreeSet<String>,
    orphans: &mut BTreeMap<String, std::time::Instant>,
) {
    let me = agent.node_id();
    let here = host_view(host);
    let now = std::time::Instant::now();
    let current: Vec<(String, u64, bool)> = records
        .iter()
        .filter(|r| {
            r.owner == Some(me)
                && r.desired == DesiredState::Running
                && !here.contains_key(&r.spec.name)
                && !busy.contains(&r.spec.name)
        })
        .filter_map(|r| {
            r.migrating_to
                .map(|to| (r.spec.name.clone(), to, r.migration_quick))
        })
        .collect();
    orphans.retain(|n, _| current.iter().any(|(c, _, _)| c == n));
    for (name, to, quick) in current {
        let since = *orphans.entry(name.clone()).or_insert(now);
        if now.saturating_duration_since(since) < ORPHANED_MIGRATION_WAIT {
            continue;
        }
        orphans.insert(name.clone(), now);
        let (ok, reason) = if quick {
            if quick_handed_off(agent, &name, to) {
                continue;
            }
            (
                false,
                format!("the source had no VM to save (fenced or restarted) and nothing was handed off to node {to}"),
            )
        } else {
            match agent.vm_presence(to, &name).await {
                Ok(crate::node::peers::VmPresence::Runs) => (
                    true,
                    format!(
                        "the source agent restarted after the switchover; node {to} runs the VM"
                    ),
                ),
                Ok(crate::node::peers::VmPresence::Absent) => (
                    false,
                    format!(
                    "the source agent restarted during the migration; node {to} does not run the VM"
                ),
                ),
                Ok(crate::node::peers::VmPresence::Arriving) => continue,
                Err(e) => {
                    tracing::info!(vm = %name, to, error = %e, "cannot ask the target how an orphaned migration ended yet");
                    continue;
                }
            }
        };
        tracing::warn!(vm = %name, to, ok, %reason, "orphaned migration resolved");
        if ok {
            crate::control::disk_lock_client::complete_reserved_handoffs(agent, &name, to).await;
        }
        let cmd = Command::Vm(VmCommand::FinishMigration {
            name: name.clone(),
            to,
            ok,
            reason,
            at_unix_ms: now_unix_ms(),
            stats: None,
        });
        if let Err(e) = agent.write(ForwardRequest::Command(cmd)).await {
            tracing::info!(vm = %name, error = %e, "orphaned migration end not committed");
        }
    }
}

/// Whether any disk of `name` was handed off to `to` (a quick migration's save
/// finished and its handoff was committed, at least in part).
fn quick_handed_off(agent: &Agent, name: &str, to: u64) -> bool {
    agent.read_sm(|d| {
        crate::state::vms::find(&d.state, name).is_some_and(|r| {
            r.spec.disks.iter().any(|disk| {
                d.state
                    .locks
                    .lock(&disk.name)
                    .is_some_and(|l| l.holders.contains(&to))
            })
        })
    })
}

/// How long the source keeps trying to commit the end of a migration.
pub const FINISH_COMMIT_DEADLINE: Duration = Duration::from_secs(30);

/// Run the source side of a live migration of `name` to node `to`, then commit its end
/// (switchover on success, rollback otherwise).
async fn migrate_out(
    agent: &Arc<Agent>,
    host: &Arc<VmHost>,
    progress: &Arc<ProgressBoard>,
    name: &str,
    to: u64,
) {
    let addr = agent.read_sm(|d| {
        d.state
            .nodes
            .get(&to)
            .map(|n| n.registration.migration_addr.clone())
    });
    // The migration record opened with StartMigration: its id and the operator's options.
    let record = agent.read_sm(|d| crate::state::migrations::running_of(&d.state, name).cloned());
    let quick = agent
        .read_sm(|d| crate::state::vms::find(&d.state, name).is_some_and(|r| r.migration_quick));
    progress.started();
    let source_locks =
        crate::control::disk_lock_client::ClusterLocks::for_migration_source(agent.clone());
    let mut reserved = 0;
    let result: Result<(String, crate::state::migrations::MigrationSummary), String> = if quick {
        crate::crash_point::reached(crate::crash_point::QUICK_MIGRATE_OUT_BEFORE_SAVE);
        crate::control::quick_migration::save_and_hand_off(agent, host, name, to)
            .await
            .map(|line| (line, crate::state::migrations::MigrationSummary::default()))
    } else {
        match addr.as_deref().map(str::parse::<std::net::SocketAddr>) {
            None => Err(format!("node {to} is not registered")),
            Some(Err(e)) => Err(format!("node {to} has an invalid migration address: {e}")),
            Some(Ok(addr)) => {
                let (h, n, a, p) = (
                    host.clone(),
                    name.to_owned(),
                    agent.clone(),
                    progress.clone(),
                );
                // Staged disk handoff: the target's tokens are reserved while the VM
                // runs, so no lock entry is committed inside the blackout.
                reserved = crate::control::disk_lock_client::reserve_handoffs(
                    agent,
                    name,
                    agent.node_id(),
                    to,
                )
                .await;
                let locks: Arc<dyn crate::vmhost::DiskLocks> = source_locks.clone();
                tokio::task::spawn_blocking(move || {
                    run_migration(&a, &p, &h, &n, (to, addr), record.as_ref(), locks)
                })
                .await
                .unwrap_or_else(|e| Err(format!("migration task failed: {e}")))
            }
        }
    };
    let (ok, reason, stats) = match result {
        Ok((summary, stats)) => {
            crate::crash_point::reached(crate::crash_point::MIGRATE_OUT_AFTER_SWITCHOVER);
            tracing::info!(vm = name, to, %summary, "vm migrated");
            // A quick migration has no live figures (its summary is empty).
            progress.finished(Outcome::Succeeded, (!quick).then_some(&stats));
            (true, summary, Some(stats))
        }
        Err(e) => {
            tracing::warn!(vm = name, to, error = %e, "vm migration failed");
            if reserved > 0 && !source_locks.released() {
                // The target never opened the disks with the reserved tokens.
                crate::control::disk_lock_client::cancel_reserved_handoffs(
                    agent,
                    name,
                    agent.node_id(),
                    to,
                )
                .await;
            }
            let outcome = if e.starts_with(CANCELLED_PREFIX) {
                Outcome::Cancelled
            } else {
                Outcome::Failed
            };
            progress.finished(outcome, None);
            (false, e, None)
        }
    };
    if ok && reserved > 0 {
        // Before the owner changes: the new owner holds the disks by the time it sees
        // the VM as its own (it may have to boot it from them, after an unconfirmed
        // switchover).
        crate::control::disk_lock_client::complete_reserved_handoffs(agent, name, to).await;
    }
    let start = std::time::Instant::now();
    loop {
        let cmd = Command::Vm(VmCommand::FinishMigration {
            name: name.to_owned(),
            to,
            ok,
            reason: reason.clone(),
            at_unix_ms: now_unix_ms(),
            stats: stats.clone(),
        });
        match agent.write(ForwardRequest::Command(cmd)).await {
            Ok(_) => return,
            Err(crate::node::WriteError::Rejected { reason }) => {
                tracing::warn!(vm = name, %reason, "migration end refused");
                return;
            }
            Err(e) if start.elapsed() < FINISH_COMMIT_DEADLINE => {
                tracing::warn!(vm = name, error = %e, "cannot commit the migration end yet; retrying");
                tokio::time::sleep(RECONCILE_INTERVAL).await;
            }
            Err(e) => {
                tracing::error!(vm = name, error = %e, "gave up committing the migration end");
                return;
            }
        }
    }
}

/// Whether a live migration failed after the point of no return (Commit sent, the
/// target's answer lost).
fn commit_uncertain(e: &crate::vmhost::VmHostError) -> bool {
    matches!(
        e,
        crate::vmhost::VmHostError::Migration {
            source: vmm_node::migration::MigrationError::CommitUncertain(_),
            ..
        } | crate::vmhost::VmHostError::WorkerMigration {
            commit_uncertain: true,
            ..
        }
    )
}

/// Start of the failure reason of a migration an operator cancelled.
pub const CANCELLED_PREFIX: &str = "cancelled by the operator";

/// How often the source side looks for engine progress and a committed cancel.
pub const MIGRATION_POLL: Duration = Duration::from_millis(50);

/// The source side of one live migration on a blocking thread: runs the engine with the
/// record's options, feeds the progress board, cancels when the record asks for it.
/// Returns the summary line and the figures, or why it failed.
fn run_migration(
    agent: &Agent,
    progress: &ProgressBoard,
    host: &Arc<VmHost>,
    name: &str,
    (to, addr): (u64, std::net::SocketAddr),
    record: Option<&crate::state::migrations::MigrationRecord>,
    locks: Arc<dyn crate::vmhost::DiskLocks>,
) -> Result<(String, crate::state::migrations::MigrationSummary), String> {
    let mut opts = crate::vmhost::LiveOptions {
        source_ip: agent.config().migration_source_ip(),
        ..Default::default()
    };
    if let Some(r) = record {
        opts.ticket = r.id;
        opts.max_downtime_ms = r.max_downtime_ms.unwrap_or(opts.max_downtime_ms);
        opts.deadline_ms = r.deadline_ms.unwrap_or(opts.deadline_ms);
        opts.bandwidth_bytes_per_s_max = r.bandwidth_bytes_per_s_max.unwrap_or(0);
    }
    let id = record.map(|r| r.id);
    let handle = host
        .migrate_out(name, to, addr, opts, locks)
        .map_err(|e| crate::error_chain(&e))?;
    let mut cancelled = false;
    loop {
        match handle.progress.recv_timeout(MIGRATION_POLL) {
            Ok(ev) => {
                if let Some(id) = id {
                    progress.update(id, &ev);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let cancel = id.is_some_and(|id| {
            agent.read_sm(|d| {
                d.state
                    .migrations
                    .get(&id)
                    .is_some_and(|m| m.cancel_requested)
            })
        });
        if cancel && !cancelled {
            tracing::info!(vm = name, to, "migration cancel requested; aborting");
            handle.cancel();
            cancelled = true;
        }
    }
    let report = match handle.wait() {
        Ok(r) => r,
        // Commit sent, no answer: the disks are the target's (handed off), the source
        // copy stays paused and is stopped once the target owns the VM; the target runs
        // it, or boots it from its disks.
        Err(e) if commit_uncertain(&e) => {
            return Ok((
                format!(
                    "switchover unconfirmed, node {to} owns the VM now: {}",
                    crate::error_chain(&e)
                ),
                crate::state::migrations::MigrationSummary::default(),
            ))
        }
        Err(e) => {
            let why = crate::error_chain(&e);
            return Err(if cancelled {
                format!("{CANCELLED_PREFIX} ({why})")
            } else {
                why
            });
        }
    };
    let summary = crate::state::migrations::MigrationSummary::from_stats(&report.stats);
    Ok((
        format!(
            "blackout {} us, receipt {}",
            report.stats.blackout.total_us,
            if report.receipt_matches() {
                "matches"
            } else {
                "MISMATCH"
            }
        ),
        summary,
    ))
}

/// Why a start decided while this node held its lease (with `lapses` lapses so far) for
/// `generation` of `name` must not go on, if it must not: the lease lapsed since (the
/// node may be cut off while the majority fails the VM over), or the record moved on.
fn start_withdrawn(agent: &Agent, name: &str, generation: u64, lapses: u64) -> Option<String> {
    let lease = agent.lease();
    if !lease.held || lease.catching_up || lease.lapses != lapses {
        return Some("this node's lease lapsed while it started the VM".into());
    }
    if recorded_down(agent) {
        return Some("this node's committed record says Down".into());
    }
    let me = agent.node_id();
    let current = agent.read_sm(|d| {
        crate::state::vms::find(&d.state, name).is_some_and(|r| {
            r.owner == Some(me) && r.generation == generation && r.desired == DesiredState::Running
        })
    });
    (!current).then(|| "the VM's record changed while it started".into())
}

/// Start `spec` here: commit the locks of its disks, start it through vmhost with the
/// grants, release the locks again if it does not start. The decision is checked again
/// before and after the VM starts ([`start_withdrawn`]): a start that overlapped a lease
/// lapse or a newer decision is stopped again at once and not reported (`None`).
async fn start(
    agent: &Arc<Agent>,
    host: &Arc<VmHost>,
    spec: VmSpec,
    generation: u64,
    lapses: u64,
) -> Option<(RuntimeState, String)> {
    let name = spec.name.clone();
    // Arrived by quick migration: restore the saved image instead of booting.
    let restore = agent.read_sm(|d| {
        crate::state::vms::find(&d.state, &name).and_then(|r| r.quick_restore_generation)
    }) == Some(generation);
    let grants = match crate::control::disk_lock_client::acquire_all(
        agent,
        &name,
        agent.node_id(),
        &spec.disks,
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            let reason = format!("cannot lock its disks: {}", crate::error_chain(&e));
            tracing::warn!(vm = %name, error = %reason, "vm not started");
            return Some((RuntimeState::Failed, reason));
        }
    };
    let release_cmds = |grants: &[csv_volume::LockGrant]| {
        grants
            .iter()
            .map(|g| csv_volume::LockCommand::Release {
                disk: g.disk.clone(),
                node: g.node,
            })
            .collect::<Vec<_>>()
    };
    if let Some(why) = start_withdrawn(agent, &name, generation, lapses) {
        tracing::warn!(vm = %name, %why, "vm start withdrawn before it ran");
        crate::control::disk_lock_client::release_all(agent, &name, release_cmds(&grants)).await;
        return None;
    }
    // A worker runs its VM on a deadline the fence loop renews; one taken just now may not
    // have been passed on yet: pass on the lease this start was decided under.
    if let Some(until) = agent.lease().until {
        host.renew_workers(until);
    }
    let h = host.clone();
    let g = grants.clone();
    let started = tokio::task::spawn_blocking(move || {
        if restore {
            crate::control::quick_migration::restore(&h, spec, &g)
        } else {
            h.start(spec, &g).map_err(|e| crate::error_chain(&e))
        }
    })
    .await;
    let failed = |reason: String| (reason, release_cmds(&grants));
    let (reason, release) = match started {
        Ok(Ok(_)) => {
            if let Some(why) = start_withdrawn(agent, &name, generation, lapses) {
                tracing::warn!(vm = %name, %why, "vm start withdrawn; stopping it again");
                let (h, n) = (host.clone(), name.clone());
                match tokio::task::spawn_blocking(move || h.stop(&n)).await {
                    Ok(Ok(s)) => {
                        crate::control::disk_lock_client::release_all(agent, &name, s.release).await
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(vm = %name, error = %crate::error_chain(&e), "vm stop failed")
                    }
                    Err(e) => tracing::error!(vm = %name, error = %e, "stop task failed"),
                }
                return None;
            }
            tracing::info!(vm = %name, disks = grants.len(), "vm started by reconciler");
            return Some((RuntimeState::Running, String::new()));
        }
        Ok(Err(e)) => failed(e),
        Err(e) => failed(format!("start task failed: {e}")),
    };
    tracing::warn!(vm = %name, error = %reason, "vm failed to start");
    crate::control::disk_lock_client::release_all(agent, &name, release).await;
    Some((RuntimeState::Failed, reason))
}

/// Execute `action`, decided while this node's lease had seen `lapses` lapses.
async fn execute(agent: &Arc<Agent>, host: &Arc<VmHost>, action: Action, lapses: u64) {
    match action {
        Action::MigrateOut { name, to } => {
            // Run by the loop on its own task; reaching here means a caller bypassed it.
            tracing::error!(vm = %name, to, "migrate action executed inline; ignored");
        }
        Action::Start { spec, generation } => {
            let name = spec.name.clone();
            if let Some((runtime, reason)) = start(agent, host, *spec, generation, lapses).await {
                report(agent, name, generation, runtime, reason, false).await;
            }
        }
        Action::Stop {
            name,
            report: rep,
            failure,
        } => {
            if let Some(kind) = failure {
                agent.count_vm_failure(kind);
            }
            let h = host.clone();
            let n = name.clone();
            let stopped = tokio::task::spawn_blocking(move || h.stop(&n)).await;
            match stopped {
                Ok(Ok(s)) => {
                    tracing::info!(vm = %name, disk_errors = s.disk_errors.len(), "vm stopped by reconciler");
                    crate::control::disk_lock_client::release_all(agent, &name, s.release).await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(vm = %name, error = %crate::error_chain(&e), "vm stop failed")
                }
                Err(e) => tracing::error!(vm = %name, error = %e, "stop task failed"),
            }
            if let Some((generation, runtime, reason)) = rep {
                report(agent, name, generation, runtime, reason, failure.is_some()).await;
            }
        }
        Action::Report {
            name,
            generation,
            runtime,
            reason,
        } => report(agent, name, generation, runtime, reason, false).await,
        Action::AbandonIncoming { name } => {
            if host.abandon_incoming(&name) {
                tracing::warn!(vm = %name, "incoming migration abandoned: the VM was failed over to this node");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::vm_spec::{TestWorkload, WorkloadName};

    fn rec(name: &str, owner: u64, desired: DesiredState, runtime: RuntimeState) -> VmRecord {
        VmRecord {
            id: 1,
            spec: VmSpec::test_guest(name, 1, 32, TestWorkload::new(WorkloadName::Idle)),
            desired,
            owner: Some(owner),
            runtime,
            reason: String::new(),
            generation: 3,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            migrating_to: None,
            migration_quick: false,
            quick_restore_generation: None,
            moved_unix_ms: None,
            restarts_unix_ms: Vec::new(),
        }
    }

    #[test]
    fn starts_own_vms_and_ignores_others() {
        let recs = [
            rec("a", 1, DesiredState::Running, RuntimeState::Starting),
            rec("b", 2, DesiredState::Running, RuntimeState::Starting),
            rec("c", 1, DesiredState::Running, RuntimeState::Failed),
        ];
        let acts = plan(1, &recs, &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(acts.len(), 1);
        assert!(matches!(&acts[0], Action::Start { spec, generation: 3 } if spec.name == "a"));
    }

    #[test]
    fn a_vm_still_arriving_is_not_started_again_and_given_up_once_failed_over_here() {
        let mut host = BTreeMap::new();
        host.insert("a".to_string(), HostView::Arriving);
        host.insert("b".to_string(), HostView::Arriving);
        host.insert("unknown".to_string(), HostView::Arriving);
        let recs = [
            // Failed over to this node while its incoming copy is still being received.
            rec("a", 1, DesiredState::Running, RuntimeState::Starting),
            rec("b", 2, DesiredState::Running, RuntimeState::Running),
        ];
        assert_eq!(
            plan(1, &recs, &host, &BTreeSet::new()),
            vec![Action::AbandonIncoming { name: "a".into() }]
        );
        // Still an ordinary incoming migration (owner 2, migrating here): left alone.
        let mut arriving = recs.clone();
        arriving[0].owner = Some(2);
        arriving[0].migrating_to = Some(1);
        assert_eq!(plan(1, &arriving, &host, &BTreeSet::new()), Vec::new());
        host.clear();
        let acts = plan(1, &recs, &host, &BTreeSet::new());
        assert!(
            matches!(&acts[..], [Action::Start { spec, .. }] if spec.name == "a"),
            "{acts:?}"
        );
    }

    #[test]
    fn reports_running_once_and_stops_what_is_not_wanted() {
        let mut host = BTreeMap::new();
        host.insert("a".to_string(), HostView::Running);
        host.insert("b".to_string(), HostView::Running);
        host.insert("orphan".to_string(), HostView::Running);
        let recs = [
            rec("a", 1, DesiredState::Running, RuntimeState::Starting),
            rec("b", 1, DesiredState::Stopped, RuntimeState::Stopping),
        ];
        let acts = plan(1, &recs, &host, &BTreeSet::new());
        assert_eq!(
            acts,
            vec![
                Action::Report {
                    name: "a".into(),
                    generation: 3,
                    runtime: RuntimeState::Running,
                    reason: String::new()
                },
                Action::Stop {
                    name: "b".into(),
                    report: Some((3, RuntimeState::Stopped, String::new())),
                    failure: None,
                },
                Action::Stop {
                    name: "orphan".into(),
                    report: None,
                    failure: None,
                },
            ]
        );
        // Once reported, a running VM needs nothing.
        let recs = [rec("a", 1, DesiredState::Running, RuntimeState::Running)];
        host.remove("b");
        host.remove("orphan");
        assert!(plan(1, &recs, &host, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn vm_owned_elsewhere_is_stopped_without_report_and_ended_vm_fails() {
        let mut host = BTreeMap::new();
        host.insert("a".to_string(), HostView::Running);
        host.insert(
            "b".to_string(),
            HostView::Ended {
                reason: "GuestExit(3)".into(),
                failure: None,
            },
        );
        host.insert(
            "c".to_string(),
            HostView::Ended {
                reason: "ProcessGone".into(),
                failure: Some("process_gone"),
            },
        );
        let recs = [
            rec("a", 2, DesiredState::Running, RuntimeState::Running),
            rec("b", 1, DesiredState::Running, RuntimeState::Running),
            rec("c", 1, DesiredState::Running, RuntimeState::Running),
        ];
        let acts = plan(1, &recs, &host, &BTreeSet::new());
        assert_eq!(acts.len(), 3);
        assert_eq!(
            acts[0],
            Action::Stop {
                name: "a".into(),
                report: None,
                failure: None,
            }
        );
        // A guest power-off is reported failed for good; a dead worker as a failure the
        // restart policy may restart.
        assert!(
            matches!(&acts[1], Action::Stop { name, report: Some((3, RuntimeState::Failed, why)), failure: None } if name == "b" && why.contains("GuestExit"))
        );
        assert!(
            matches!(&acts[2], Action::Stop { name, report: Some((3, RuntimeState::Failed, why)), failure: Some("process_gone") } if name == "c" && why.contains("ProcessGone"))
        );
    }

    #[test]
    fn failure_kinds_leave_out_requested_stops_and_guest_power_offs() {
        use vmm_node::StopReason as R;
        assert_eq!(failure_kind(&R::Requested), None);
        assert_eq!(failure_kind(&R::GuestExit { code: 0 }), None);
        assert_eq!(failure_kind(&R::GuestReset), Some("guest_reset"));
        let vcpu = R::VcpuError {
            vcpu: 0,
            message: "x".into(),
        };
        assert_eq!(failure_kind(&vcpu), Some("vcpu_error"));
        let gone = R::ProcessGone {
            message: "killed".into(),
        };
        assert_eq!(failure_kind(&gone), Some("process_gone"));
    }

    #[test]
    fn migration_source_migrates_once_and_target_keeps_the_arriving_vm() {
        let mut r = rec("m", 1, DesiredState::Running, RuntimeState::Running);
        r.migrating_to = Some(2);
        let recs = [r];
        let mut host = BTreeMap::new();
        host.insert("m".to_string(), HostView::Running);
        // Source: one MigrateOut, none while it runs, no restart once the VM left.
        assert_eq!(
            plan(1, &recs, &host, &BTreeSet::new()),
            vec![Action::MigrateOut {
                name: "m".into(),
                to: 2
            }]
        );
        let busy: BTreeSet<String> = ["m".to_string()].into_iter().collect();
        assert!(plan(1, &recs, &host, &busy).is_empty());
        assert!(plan(1, &recs, &BTreeMap::new(), &BTreeSet::new()).is_empty());
        // Target: the arriving VM is not stopped; a third node would stop a stray copy.
        assert!(plan(2, &recs, &host, &BTreeSet::new()).is_empty());
        assert_eq!(
            plan(3, &recs, &host, &BTreeSet::new()),
            vec![Action::Stop {
                name: "m".into(),
                report: None,
                failure: None,
            }]
        );
    }
}
