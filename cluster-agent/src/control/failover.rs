//! Failover: when a node is Down, the leader restarts its running VMs on survivors, in
//! the order and on the nodes of the scheduler's failover plan, after the down node's
//! self-fencing grace has passed.
//!
//! Fencing (see `liveness`): every agent holds a lease renewed by heartbeat
//! acknowledgements from a majority; its fence watcher stops all of its VMs as soon as
//! the lease lapses. The leader marks a node Down only when a quorum-intersecting set of
//! peers has not heard it for `down_after` (longer than the lease), and waits
//! [`FAILOVER_GRACE`] more (the fence watcher's poll plus the VM stop) before it commits
//! new owners, so a partitioned owner has stopped its copy before another node starts one.
//! For VMs with shared-volume disks the leader first commits the takeover of their disk
//! locks by the new owner ([`disk_takeovers`], `ForceTakeover`: new fencing tokens), then
//! `SetVmOwner`; an old owner that overslept its lease is refused at its next disk write
//! by the fence record the new owner writes before it starts the VM.
//!
//! **Architecture Invariant:** the new owner is committed through Raft (`SetVmOwner`)
//! before any agent starts the VM; the reconciler of the new owner starts it from the
//! committed record.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::control::placement::{self, PlacementError};
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::vms::{DesiredState, VmCommand};
use crate::state::{ClusterState, Command, NodeState};

/// How long the leader waits after a node went Down before restarting its VMs: the down
/// node's lease lapsed before the Down decision (`liveness`); this covers its fence
/// watcher's poll ([`crate::control::fencing::FENCE_POLL`]) and stopping the VMs.
pub const FAILOVER_GRACE: Duration = Duration::from_millis(500);
/// How often the leader looks for VMs to fail over.
pub const FAILOVER_INTERVAL: Duration = Duration::from_millis(100);

/// One restart decided by the failover plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub vm: String,
    pub from: u64,
    pub to: u64,
}

/// The restarts to commit now: for each node of `dead` (Down for the grace on this
/// agent's clock, see `node::liveness::DownClock`) that still owns VMs with desired state Running, the scheduler's
/// failover plan (priority order). VMs the plan cannot place (or with restart priority
/// none) are left where they are.
///
/// A VM that was migrating away from the dead node goes to its migration target (if that
/// is not Down too), whatever its restart priority: the source may have died after the
/// switchover, with the VM already running on the target (the owner change was not yet
/// committed) — moving it anywhere else would reboot a running VM. If the target never
/// got that far, its half-received copy was dropped when the source's connection broke,
/// and it boots the VM from its disks, whose locks it may already hold.
pub fn plan(
    state: &ClusterState,
    demand: &crate::node::demand::Demand,
    dead: &[u64],
) -> Result<Vec<Takeover>, PlacementError> {
    plan_noting(state, demand, dead, &mut None)
}

/// [`plan`], noting in `short` why a VM that should restart found no node.
fn plan_noting(
    state: &ClusterState,
    demand: &crate::node::demand::Demand,
    dead: &[u64],
    short: &mut Option<String>,
) -> Result<Vec<Takeover>, PlacementError> {
    let mut out = Vec::new();
    let mut snap = None;
    let dead: Vec<u64> = dead
        .iter()
        .copied()
        .filter(|id| {
            state
                .nodes
                .get(id)
                .is_some_and(|n| n.state == NodeState::Down)
        })
        .collect();
    let mut to_target = Vec::new();
    for v in state.vms.values() {
        let (Some(owner), Some(target)) = (v.owner, v.migrating_to) else {
            continue;
        };
        let target_alive = state
            .nodes
            .get(&target)
            .is_some_and(|n| n.state != NodeState::Down);
        if dead.contains(&owner) && v.desired == DesiredState::Running && target_alive {
            out.push(Takeover {
                vm: v.spec.name.clone(),
                from: owner,
                to: target,
            });
            to_target.push((v.spec.name.clone(), target));
        }
    }
    for id in &dead {
        let owns_running = state.vms.values().any(|v| {
            v.owner == Some(*id)
                && v.desired == DesiredState::Running
                && !to_target.iter().any(|(n, _)| *n == v.spec.name)
        });
        if !owns_running {
            continue;
        }
        let s = match &snap {
            Some(s) => s,
            None => {
                // The VMs going to their migration targets live there from now on.
                let mut s = placement::snapshot(state)?;
                placement::add_demand(&mut s, demand);
                for vm in &mut s.vms {
                    if let Some((_, t)) = to_target.iter().find(|(n, _)| *n == vm.id.0) {
                        vm.node = scheduler::NodeId(*t);
                    }
                }
                snap.insert(s)
            }
        };
        if !s.nodes.iter().any(|n| n.id.0 == *id) {
            continue;
        }
        let p = scheduler::failover(s, scheduler::NodeId(*id)).map_err(PlacementError::Plan)?;
        for r in p.restarts {
            out.push(Takeover {
                vm: r.vm.0,
                from: *id,
                to: r.node.0,
            });
        }
        for n in p.not_restarted {
            tracing::debug!(vm = %n.vm, node = id, "vm not restarted by failover");
            if n.priority == scheduler::RestartPriority::None {
                continue;
            }
            short.get_or_insert_with(|| {
                format!("failover of node {id} found no node for VM {}", n.vm.0)
            });
        }
    }
    Ok(out)
}

/// On the leader, commit failover restarts until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = crate::node::grid_interval(FAILOVER_INTERVAL);
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
        // Failover acts only for Down nodes: while none is, no copy of the state.
        if !agent.read_sm(|d| d.state.nodes.values().any(|n| n.state == NodeState::Down)) {
            continue;
        }
        let state = agent.read_sm(|d| d.state.clone());
        let dead = agent.down_for_at_least(&state, FAILOVER_GRACE);
        let mut short = None;
        let takeovers = match plan_noting(&state, &agent.demand(), &dead, &mut short) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "failover planning failed");
                continue;
            }
        };
        if let Some(why) = short {
            agent.note_capacity_short(why);
        }
        for t in takeovers {
            if let Err(e) = take_over_disks(&agent, &state, &t).await {
                tracing::warn!(vm = %t.vm, to = t.to, error = %e, "disk takeover refused; vm not failed over yet");
                continue;
            }
            let cmd = Command::Vm(VmCommand::SetVmOwner {
                name: t.vm.clone(),
                owner: t.to,
                at_unix_ms: now_unix_ms(),
            });
            match agent.write(ForwardRequest::Command(cmd)).await {
                Ok(_) => tracing::info!(vm = %t.vm, from = t.from, to = t.to, "vm failed over"),
                Err(e) => tracing::warn!(vm = %t.vm, error = %e, "failover commit refused"),
            }
        }
    }
}

/// The locks failover must move before restarting `t.vm` on `t.to`: every disk of the VM
/// whose holders are all Down (the old owner, fenced by its lease) is taken over
/// (`ForceTakeover`, a new fencing token). An exclusive lock held by a live node that neither
/// owns nor receives the VM — the target of an earlier takeover whose `SetVmOwner` was never
/// committed (e.g. the leader died in between), which never opened the disk — is handed
/// off to `t.to`.
pub fn disk_takeovers(state: &ClusterState, t: &Takeover) -> Vec<csv_volume::LockCommand> {
    let Some(vm) = crate::state::vms::find(state, &t.vm) else {
        return Vec::new();
    };
    let down = crate::state::disk_locks::down_nodes(state);
    vm.spec
        .disks
        .iter()
        .filter_map(|d| {
            let lock = state.locks.lock(&d.name)?;
            let mode = crate::control::disk_lock_client::mode_of(d);
            if lock.holders.contains(&t.to) && lock.mode == mode {
                return None;
            }
            if lock.holders.iter().all(|h| down.contains(h)) {
                // A staged handoff to the new owner (the VM was migrating there): it may
                // run the VM already with the reserved token, which stays.
                if let (Some(from), Some(_)) = (
                    lock.exclusive_owner(),
                    lock.handoff
                        .filter(|h| h.to == t.to && mode == csv_volume::LockMode::Exclusive),
                ) {
                    return Some(csv_volume::LockCommand::CompleteHandoff {
                        disk: d.name.clone(),
                        from,
                        to: t.to,
                    });
                }
                return Some(csv_volume::LockCommand::ForceTakeover {
                    disk: d.name.clone(),
                    node: t.to,
                    mode,
                });
            }
            let stray = lock
                .exclusive_owner()
                .filter(|h| Some(*h) != vm.owner && Some(*h) != vm.migrating_to);
            stray.map(|from| csv_volume::LockCommand::Handoff {
                disk: d.name.clone(),
                from,
                to: t.to,
            })
        })
        .collect()
}

/// Failover step 1 (before `SetVmOwner`): commit the takeover of the VM's disk locks by
/// the new owner. New fencing tokens, so a late write of the old owner is refused at the
/// disk. The leader has already waited out the old owner's lease (`FAILOVER_GRACE`).
async fn take_over_disks(agent: &Agent, state: &ClusterState, t: &Takeover) -> Result<(), String> {
    for cmd in disk_takeovers(state, t) {
        let g = crate::control::disk_lock_client::grant(agent, &t.vm, cmd)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        tracing::info!(vm = %t.vm, disk = %g.disk, to = t.to, token = %g.token, "disk lock taken over");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::liveness::DownClock;
    use crate::state::vm_spec::{TestWorkload, VmSpec, WorkloadName};
    use std::time::Instant;

    fn cluster() -> ClusterState {
        crate::state::fixtures::cluster(3, |_| crate::state::fixtures::amd(4, 4 << 30))
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn create(s: &mut ClusterState, name: &str, owner: u64, prio: scheduler::RestartPriority) {
        let mut spec = VmSpec::test_guest(name, 1, 64, TestWorkload::new(WorkloadName::Idle));
        spec.restart_priority = prio;
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(owner),
            at_unix_ms: 2,
        }));
    }

    #[test]
    fn restarts_after_grace_in_priority_order_and_skips_priority_none() {
        let mut s = cluster();
        create(&mut s, "low", 2, scheduler::RestartPriority::Low);
        create(&mut s, "high", 2, scheduler::RestartPriority::High);
        create(&mut s, "never", 2, scheduler::RestartPriority::None);
        create(&mut s, "other", 1, scheduler::RestartPriority::High);
        let (mut clock, t0, grace) = (DownClock::default(), Instant::now(), ms(1_500));
        assert_eq!(clock.ready(&s, t0, grace), Vec::<u64>::new());
        s.apply(&Command::SetNodeState {
            node_id: 2,
            state: NodeState::Down,
            at_unix_ms: 10_000,
            reason: "silent".into(),
        });
        // First seen Down at t0 + 1 s; still inside the grace at t0 + 2 s: nothing yet.
        assert_eq!(clock.ready(&s, t0 + ms(1_000), grace), Vec::<u64>::new());
        let dead = clock.ready(&s, t0 + ms(2_000), grace);
        assert_eq!(plan(&s, &Default::default(), &dead).ok(), Some(vec![]));
        let dead = clock.ready(&s, t0 + ms(2_500), grace);
        assert_eq!(dead, vec![2]);
        let t = plan(&s, &Default::default(), &dead).unwrap_or_default();
        let names: Vec<&str> = t.iter().map(|t| t.vm.as_str()).collect();
        assert_eq!(names, vec!["high", "low"]);
        assert!(t.iter().all(|t| t.from == 2 && t.to != 2));
        // Once committed, nothing is left to do.
        for t in &t {
            s.apply(&Command::Vm(VmCommand::SetVmOwner {
                name: t.vm.clone(),
                owner: t.to,
                at_unix_ms: 11_600,
            }));
        }
        assert_eq!(plan(&s, &Default::default(), &dead).ok(), Some(vec![]));
    }

    #[test]
    fn the_grace_runs_on_this_agents_clock_from_its_first_look() {
        // The Down was committed by another leader whose clock was far ahead (or this
        // agent's stepped back): the record's timestamp says "long ago". The grace still
        // runs whole from when this agent first saw the node Down.
        let mut s = cluster();
        create(&mut s, "vm", 2, scheduler::RestartPriority::High);
        s.apply(&Command::SetNodeState {
            node_id: 2,
            state: NodeState::Down,
            at_unix_ms: 1,
            reason: "silent".into(),
        });
        let (mut clock, t0, grace) = (DownClock::default(), Instant::now(), ms(500));
        assert!(clock.ready(&s, t0, grace).is_empty());
        assert!(clock.ready(&s, t0 + ms(499), grace).is_empty());
        assert_eq!(clock.ready(&s, t0 + ms(500), grace), vec![2]);
        // Up and Down again is a new Down: the grace starts over.
        for (state, at) in [(NodeState::Up, 2), (NodeState::Down, 3)] {
            s.apply(&Command::SetNodeState {
                node_id: 2,
                state,
                at_unix_ms: at,
                reason: "flap".into(),
            });
        }
        assert!(clock.ready(&s, t0 + ms(600), grace).is_empty());
        assert_eq!(clock.ready(&s, t0 + ms(1_100), grace), vec![2]);
    }

    #[test]
    fn a_vm_migrating_away_from_the_dead_node_goes_to_its_target() {
        let down = |s: &mut ClusterState, node_id| {
            s.apply(&Command::SetNodeState {
                node_id,
                state: NodeState::Down,
                at_unix_ms: 10_000,
                reason: "silent".into(),
            })
        };
        let mut s = cluster();
        // Priority none: a restart would skip it, but on the target it may already run.
        create(&mut s, "moving", 2, scheduler::RestartPriority::None);
        create(&mut s, "staying", 2, scheduler::RestartPriority::High);
        s.apply(&Command::Vm(VmCommand::ReportVmState {
            name: "moving".into(),
            node_id: 2,
            generation: 1,
            runtime: crate::state::vms::RuntimeState::Running,
            reason: String::new(),
            at_unix_ms: 3,
            restart: false,
        }));
        s.apply(&Command::Vm(VmCommand::StartMigration {
            name: "moving".into(),
            to: 3,
            at_unix_ms: 4,
            quick: false,
            max_downtime_ms: None,
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            predicted: None,
        }));
        assert_eq!(
            crate::state::vms::find(&s, "moving").and_then(|v| v.migrating_to),
            Some(3)
        );
        let mut both_down = s.clone();
        down(&mut s, 2);
        let t = plan(&s, &Default::default(), &[2]).unwrap_or_default();
        let moving: Vec<_> = t.iter().filter(|t| t.vm == "moving").collect();
        assert_eq!(
            moving,
            vec![&Takeover {
                vm: "moving".into(),
                from: 2,
                to: 3
            }]
        );
        assert!(t.iter().any(|t| t.vm == "staying" && t.to != 2), "{t:?}");
        // The target is dead too: the ordinary failover rules apply (priority none: stays).
        down(&mut both_down, 2);
        down(&mut both_down, 3);
        let t = plan(&both_down, &Default::default(), &[2, 3]).unwrap_or_default();
        assert!(t.iter().all(|t| t.vm != "moving"), "{t:?}");
        assert!(t.iter().any(|t| t.vm == "staying" && t.to == 1), "{t:?}");
    }

    /// Applies lock command `command` of VM `vm` at log index `index`.
    fn lock_at(s: &mut ClusterState, vm: &str, index: u64, command: csv_volume::LockCommand) {
        s.apply_at(
            &Command::Lock(crate::state::disk_locks::LockEntry {
                command,
                vm: vm.into(),
                at_unix_ms: 3,
            }),
            crate::state::LogPosition { index, term: 1 },
        );
    }

    /// The test cluster with disk VM `vm` (its disk `vol/<vm>.img`) on node 2, which
    /// holds the disk's lock exclusively from log index 5.
    fn disk_vm_on_node_2(vm: &str) -> (ClusterState, csv_volume::DiskName) {
        let mut s = cluster();
        let disk =
            csv_volume::DiskName::parse(&format!("vol/{vm}.img")).unwrap_or_else(|e| panic!("{e}"));
        let mut spec = VmSpec::test_guest(vm, 1, 64, TestWorkload::new(WorkloadName::Disk));
        spec.disks.push(crate::vmhost::DiskSpec {
            name: disk.clone(),
            read_only: false,
        });
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(2),
            at_unix_ms: 2,
        }));
        lock_at(
            &mut s,
            vm,
            5,
            csv_volume::LockCommand::Acquire {
                disk: disk.clone(),
                node: 2,
                mode: csv_volume::LockMode::Exclusive,
            },
        );
        (s, disk)
    }

    #[test]
    fn disk_takeover_only_from_down_holders_and_only_once() {
        use csv_volume::{LockCommand, LockMode};
        let (mut s, disk) = disk_vm_on_node_2("f");
        let t = Takeover {
            vm: "f".into(),
            from: 2,
            to: 3,
        };
        // The holder is alive: nothing to take over.
        assert!(disk_takeovers(&s, &t).is_empty());
        assert!(!crate::control::disk_lock_client::held_only_by_fenced_nodes(&s, &disk, 3, &[]));
        s.apply(&Command::SetNodeState {
            node_id: 2,
            state: NodeState::Down,
            at_unix_ms: 10_000,
            reason: "silent".into(),
        });
        let cmds = disk_takeovers(&s, &t);
        assert_eq!(
            cmds,
            vec![LockCommand::ForceTakeover {
                disk: disk.clone(),
                node: 3,
                mode: LockMode::Exclusive
            }]
        );
        // A restart elsewhere takes the lock only once the grace has passed.
        assert!(!crate::control::disk_lock_client::held_only_by_fenced_nodes(&s, &disk, 3, &[]));
        assert!(crate::control::disk_lock_client::held_only_by_fenced_nodes(
            &s,
            &disk,
            3,
            &[2]
        ));
        lock_at(&mut s, "f", 20, cmds[0].clone());
        // Committed: the new owner holds it, with the entry's index as the token.
        assert!(disk_takeovers(&s, &t).is_empty());
        let l = s.locks.lock(&disk).cloned();
        assert_eq!(l.map(|l| (l.holders, l.token.0)), Some(([3].into(), 20)));
        // The owner change was lost (leader died); the next plan picks node 1: the lock
        // goes from node 3 (alive, not the owner, never opened it) to node 1.
        let t1 = Takeover {
            vm: "f".into(),
            from: 2,
            to: 1,
        };
        assert_eq!(
            disk_takeovers(&s, &t1),
            vec![LockCommand::Handoff {
                disk: disk.clone(),
                from: 3,
                to: 1
            }]
        );
    }

    #[test]
    fn a_down_source_mid_migration_completes_the_reserved_handoff_to_the_target() {
        use csv_volume::{LockCommand, LockMode};
        let (mut s, disk) = disk_vm_on_node_2("m");
        lock_at(
            &mut s,
            "m",
            6,
            LockCommand::ReserveHandoff {
                disk: disk.clone(),
                from: 2,
                to: 3,
            },
        );
        s.apply(&Command::SetNodeState {
            node_id: 2,
            state: NodeState::Down,
            at_unix_ms: 10_000,
            reason: "silent".into(),
        });
        // To the reserved target: it keeps the token it may already run the VM with.
        let to_target = Takeover {
            vm: "m".into(),
            from: 2,
            to: 3,
        };
        assert_eq!(
            disk_takeovers(&s, &to_target),
            vec![LockCommand::CompleteHandoff {
                disk: disk.clone(),
                from: 2,
                to: 3
            }]
        );
        // Anywhere else: a takeover above the reservation.
        let elsewhere = Takeover {
            vm: "m".into(),
            from: 2,
            to: 1,
        };
        assert_eq!(
            disk_takeovers(&s, &elsewhere),
            vec![LockCommand::ForceTakeover {
                disk: disk.clone(),
                node: 1,
                mode: LockMode::Exclusive
            }]
        );
        let complete = disk_takeovers(&s, &to_target).remove(0);
        lock_at(&mut s, "m", 9, complete);
        let l = s.locks.lock(&disk).cloned();
        assert_eq!(
            l.map(|l| (l.holders, l.token.0, l.handoff)),
            Some(([3].into(), 6, None))
        );
        assert!(disk_takeovers(&s, &to_target).is_empty());
    }
}
