//! The migration queue. A `vm migrate` that only a busy migration slot stands in the way
//! of (one live migration per node at a time) is not refused: it is committed as a
//! `queued` migration record (`MigrationCommand::QueueMigration`), and the leader starts
//! queued migrations, oldest first, as slots free up — what an operator who selects
//! several VMs and migrates them expects. A queued migration that can no longer start
//! (the VM was stopped or deleted, or the target can never take it now) is dropped with
//! the reason; `clusterctl migration cancel` drops one by hand.
//!
//! **Architecture Invariant:** a queued record never sets `VmRecord::migrating_to`, so it
//! holds no slot; it becomes the running record when its `StartMigration` is applied.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::placement::{self, PlacementError};
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::migrations::{queue, MigrationCommand, MigrationKind};
use crate::state::vms::VmCommand;
use crate::state::{ClusterState, Command};

/// How often the leader looks at the queue.
pub const QUEUE_INTERVAL: Duration = Duration::from_millis(200);

/// What the leader commits for one queued migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start it now (the record becomes the running one).
    Start { id: u64, cmd: Box<VmCommand> },
    /// It can no longer start.
    Drop { id: u64, reason: String },
}

/// The queue steps to commit now, oldest queued first. Each start is applied to a copy
/// of the state before the next one is judged, so two queued migrations never take the
/// same slot.
pub fn plan(state: &ClusterState, now_unix_ms: u64) -> Vec<Step> {
    let mut s = state.clone();
    let mut out = Vec::new();
    for m in queue(state) {
        let quick = m.kind == MigrationKind::Quick;
        let probe = VmCommand::StartMigration {
            name: m.vm.clone(),
            to: m.target,
            at_unix_ms: now_unix_ms,
            quick,
            max_downtime_ms: m.max_downtime_ms,
            deadline_ms: m.deadline_ms,
            bandwidth_bytes_per_s_max: m.bandwidth_bytes_per_s_max,
            predicted: None,
        };
        if let Err(e) = crate::state::vms::check_migration_start(&s, &probe) {
            out.push(Step::Drop {
                id: m.id,
                reason: crate::error_chain(&e),
            });
            continue;
        }
        let to = (m.target != 0).then_some(m.target);
        match placement::migration_target(&s, &m.vm, to, quick) {
            Ok(target) => {
                let cmd = VmCommand::StartMigration {
                    name: m.vm.clone(),
                    to: target,
                    at_unix_ms: now_unix_ms,
                    quick,
                    max_downtime_ms: m.max_downtime_ms,
                    deadline_ms: m.deadline_ms,
                    bandwidth_bytes_per_s_max: m.bandwidth_bytes_per_s_max,
                    predicted: placement::prediction_for(&s, &m.vm, target, quick),
                };
                s.apply(&Command::Vm(cmd.clone()));
                out.push(Step::Start {
                    id: m.id,
                    cmd: Box::new(cmd),
                });
            }
            Err(PlacementError::SlotsBusy { .. }) => {}
            Err(e) => out.push(Step::Drop {
                id: m.id,
                reason: crate::error_chain(&e),
            }),
        }
    }
    out
}

/// On the leader, start or drop queued migrations until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = crate::node::grid_interval(QUEUE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let leader = agent.leader();
        if leader != Some(agent.node_id()) {
            if !agent.wait_until_leader(&mut shutdown).await {
                return;
            }
            continue;
        }
        if agent.read_sm(|d| queue(&d.state).is_empty()) {
            continue;
        }
        // Judge and commit under the placement lock: a `vm migrate` or VM start on this
        // leader cannot take the same slot in between.
        let _placing = agent.placement_lock().await;
        let state = agent.read_sm(|d| d.state.clone());
        for step in plan(&state, now_unix_ms()) {
            let (id, cmd) = match step {
                Step::Start { id, cmd } => (id, Command::Vm(*cmd)),
                Step::Drop { id, reason } => {
                    tracing::info!(migration = id, %reason, "queued migration dropped");
                    let cmd = MigrationCommand::DropQueued {
                        id,
                        reason,
                        at_unix_ms: now_unix_ms(),
                    };
                    (id, Command::Migration(cmd))
                }
            };
            match agent.write(ForwardRequest::Command(cmd)).await {
                Ok(_) => tracing::debug!(migration = id, "queue step committed"),
                Err(e) => tracing::warn!(migration = id, error = %e, "queue step refused"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::migrations::MigrationState;
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use crate::state::vms::{DesiredState, RuntimeState};

    fn running(s: &mut ClusterState, name: &str, owner: u64) {
        let spec = VmSpec::test_guest(name, 1, 64, TestWorkload::new(WorkloadName::Idle));
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(owner),
            at_unix_ms: 1,
        }));
        s.apply(&Command::Vm(VmCommand::ReportVmState {
            name: name.into(),
            node_id: owner,
            generation: 1,
            runtime: RuntimeState::Running,
            reason: String::new(),
            at_unix_ms: 2,
            restart: false,
        }));
    }

    fn start(name: &str, to: u64) -> Command {
        Command::Vm(VmCommand::StartMigration {
            name: name.into(),
            to,
            at_unix_ms: 3,
            quick: false,
            max_downtime_ms: None,
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            predicted: None,
        })
    }

    fn queue_cmd(vm: &str, to: u64) -> MigrationCommand {
        MigrationCommand::QueueMigration {
            vm: vm.into(),
            to,
            quick: false,
            max_downtime_ms: Some(40),
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            at_unix_ms: 4,
        }
    }

    fn finish(s: &mut ClusterState, name: &str, to: u64) {
        s.apply(&Command::Vm(VmCommand::FinishMigration {
            name: name.into(),
            to,
            ok: true,
            reason: String::new(),
            at_unix_ms: 5,
            stats: None,
        }));
    }

    fn state_of(s: &ClusterState, id: u64) -> Option<MigrationState> {
        s.migrations.get(&id).map(|m| m.state)
    }

    #[test]
    fn queued_migrations_start_in_order_as_slots_free_and_never_share_a_slot() {
        let mut s = crate::state::fixtures::cluster(3, |_| crate::state::fixtures::amd(8, 8 << 30));
        for vm in ["a", "b", "c"] {
            running(&mut s, vm, 1);
        }
        s.apply(&start("a", 2));
        // Node 1's slot is taken: b and c wait.
        for vm in ["b", "c"] {
            let q = Command::Migration(queue_cmd(vm, 2));
            let r = s.apply(&q).0;
            assert!(
                !matches!(r, crate::state::CommandResult::Rejected { .. }),
                "queue {vm}: {r:?}"
            );
        }
        let (qb, qc) = (2, 3);
        assert_eq!(state_of(&s, qb), Some(MigrationState::Queued));
        // A queued record holds no slot and a VM is queued only once.
        assert_eq!(
            crate::state::vms::find(&s, "b").and_then(|v| v.migrating_to),
            None
        );
        assert!(matches!(
            crate::state::migrations::check(&s, &queue_cmd("b", 3)),
            Err(crate::state::migrations::MigrationError::VmBusy { id: 2, .. })
        ));
        assert!(matches!(
            crate::state::migrations::check(&s, &queue_cmd("a", 3)),
            Err(crate::state::migrations::MigrationError::VmBusy { id: 1, .. })
        ));
        assert_eq!(plan(&s, 10), Vec::new());

        finish(&mut s, "a", 2);
        // One slot each on nodes 1 and 2: only the oldest starts, with its options.
        let steps = plan(&s, 10);
        let [Step::Start { id, cmd }] = &steps[..] else {
            panic!("{steps:?}")
        };
        assert_eq!(*id, qb);
        assert!(matches!(
            &**cmd,
            VmCommand::StartMigration { name, to: 2, max_downtime_ms: Some(40), .. } if name == "b"
        ));
        s.apply(&Command::Vm((**cmd).clone()));
        // The queued record became the running one (same id, no new record).
        assert_eq!(state_of(&s, qb), Some(MigrationState::Running));
        assert_eq!(
            crate::state::migrations::running_of(&s, "b").map(|m| m.id),
            Some(qb)
        );
        assert_eq!(s.last_migration_id, 3);
        assert_eq!(plan(&s, 11), Vec::new());
        finish(&mut s, "b", 2);
        assert_eq!(state_of(&s, qb), Some(MigrationState::Succeeded));

        // c can no longer start once it is stopped: dropped with the reason.
        s.apply(&Command::Vm(VmCommand::StopVm {
            name: "c".into(),
            at_unix_ms: 12,
        }));
        assert_eq!(
            crate::state::vms::find(&s, "c").map(|v| v.desired),
            Some(DesiredState::Stopped)
        );
        let steps = plan(&s, 13);
        let [Step::Drop { id, reason }] = &steps[..] else {
            panic!("{steps:?}")
        };
        assert_eq!(*id, qc);
        assert!(reason.contains('c'), "{reason}");
        s.apply(&Command::Migration(MigrationCommand::DropQueued {
            id: qc,
            reason: reason.clone(),
            at_unix_ms: 14,
        }));
        assert_eq!(state_of(&s, qc), Some(MigrationState::Failed));
        assert!(crate::state::migrations::queue(&s).is_empty());
    }

    #[test]
    fn a_queued_migration_is_cancelled_at_once_even_a_quick_one() {
        let mut s = crate::state::fixtures::cluster(3, |_| crate::state::fixtures::amd(8, 8 << 30));
        running(&mut s, "a", 1);
        running(&mut s, "q", 1);
        s.apply(&start("a", 2));
        let mut cmd = queue_cmd("q", 0);
        if let MigrationCommand::QueueMigration { quick, .. } = &mut cmd {
            *quick = true;
        }
        s.apply(&Command::Migration(cmd));
        let cancel = MigrationCommand::CancelMigration {
            id: 2,
            at_unix_ms: 6,
        };
        assert_eq!(crate::state::migrations::check(&s, &cancel), Ok(()));
        s.apply(&Command::Migration(cancel.clone()));
        assert_eq!(state_of(&s, 2), Some(MigrationState::Cancelled));
        assert!(crate::state::migrations::check(&s, &cancel).is_err());
        finish(&mut s, "a", 2);
        assert_eq!(plan(&s, 7), Vec::new());
    }
}
