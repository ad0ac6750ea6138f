//! Maintenance drain of a node and failback to it.
//!
//! Drain: every running VM on the node gets a target (largest VMs first, so they find room), preferring a target
//! without an anti-affinity conflict (the "kept apart where possible" — even at the cost of a quick
//! migration), then a live migration over a quick one (which carries the reason live was impossible), then a
//! preferred owner, the fastest migration, the least utilised node.
//! The moves are then laid out by the slot scheduler (`timeline`), which respects the per-node migration limit
//! including in-flight migrations. VMs with no target are listed with every rule that ruled each node out.

use crate::cluster::{util_bp, Cluster};
use crate::estimate::{live_estimate, pair_bandwidth_mib_per_s, quick_estimate_ms};
use crate::explain::{anti_affinity_conflict, check, vm_live_blockers, MoveKind, Reason, Subject};
use crate::model::{ClusterSnapshot, NodeId, NodeState, VmId, VmState};
use crate::place::{choose_owner, no_up_node};
use crate::plan::{DrainPlan, OwnershipMove, PlannedMove, Unmovable};
use crate::timeline::{schedule, Job};
use crate::PlanError;

/// Target preference: (anti-affinity conflict, not live, preferred-owner rank, duration, utilisation after, id).
type DrainKey = (bool, bool, usize, u64, u64, NodeId);

/// A feasible way to move a VM to one node.
struct Candidate {
    kind: MoveKind,
    to: usize,
    duration_ms: u64,
    downtime_ms: u64,
    why_not_live: Vec<Reason>,
    anti_affinity: Option<Reason>,
}

/// How VM `vi` could move to `to`: live if every live rule holds and pre-copy converges, else quick; `Err` with
/// the reasons if neither.
fn evaluate(c: &Cluster<'_>, vi: usize, to: usize) -> Result<Candidate, Vec<Reason>> {
    let vm = c.vms[vi];
    let from = c.owner[vi];
    let s = Subject::of_vm(c, vi);
    let limit = c.snap.policy.max_live_migrations_per_node;
    let bw = pair_bandwidth_mib_per_s(
        c.nodes[from].node.migration_bandwidth_mib_per_s,
        c.nodes[to].node.migration_bandwidth_mib_per_s,
        limit,
    );
    // What a move between the two costs beyond moving memory (measured by the cluster).
    let overhead = c.nodes[from]
        .node
        .migration_overhead_ms
        .max(c.nodes[to].node.migration_overhead_ms);
    let live = check(c, &s, to, MoveKind::Live, false);
    let (live_hard, live_soft): (Vec<Reason>, Vec<Reason>) =
        live.into_iter().partition(Reason::is_hard);
    let mut why_not_live = live_hard;
    if !vm.live_migratable {
        why_not_live.insert(0, Reason::NotLiveMigratable { vm: vm.id.clone() });
    }
    if why_not_live.is_empty() {
        match live_estimate(vm.memory_mib, vm.dirty_rate_mib_per_s, bw) {
            Some(e) => {
                return Ok(Candidate {
                    kind: MoveKind::Live,
                    to,
                    duration_ms: e.duration_ms.saturating_add(overhead),
                    downtime_ms: e.downtime_ms,
                    why_not_live: Vec::new(),
                    anti_affinity: live_soft.into_iter().next(),
                })
            }
            None => why_not_live.push(Reason::NotConvergent {
                vm: vm.id.clone(),
                dirty_rate_mib_per_s: vm.dirty_rate_mib_per_s,
                bandwidth_mib_per_s: bw,
            }),
        }
    }
    let quick = check(c, &s, to, MoveKind::Quick, false);
    let (quick_hard, quick_soft): (Vec<Reason>, Vec<Reason>) =
        quick.into_iter().partition(Reason::is_hard);
    if !quick_hard.is_empty() {
        // Report the live reasons (the stricter set, a superset of the quick ones) once.
        let mut all = why_not_live;
        for r in quick_hard {
            if !all.contains(&r) {
                all.push(r);
            }
        }
        return Err(all);
    }
    let d = quick_estimate_ms(vm.memory_mib, bw);
    Ok(Candidate {
        kind: MoveKind::Quick,
        to,
        duration_ms: d.saturating_add(overhead),
        downtime_ms: d,
        why_not_live,
        anti_affinity: quick_soft.into_iter().next(),
    })
}

fn job(c: &Cluster<'_>, vi: usize, o: Candidate) -> Job {
    let from = c.owner[vi];
    Job {
        from,
        to: o.to,
        duration_ms: o.duration_ms,
        planned: PlannedMove {
            vm: c.vms[vi].id.clone(),
            from: c.nodes[from].node.id,
            to: c.nodes[o.to].node.id,
            kind: o.kind,
            start_ms: 0,
            end_ms: 0,
            downtime_ms: o.downtime_ms,
            why_not_live: o.why_not_live,
            anti_affinity_violation: o.anti_affinity,
        },
    }
}

fn lower_bound_ms(memory_mib: u64, bandwidth_mib_per_s: u64) -> u64 {
    (u128::from(memory_mib) * 1000).div_ceil(u128::from(bandwidth_mib_per_s.max(1))) as u64
}

/// Plans the maintenance drain of `node` starting at `now_ms`: a wave timeline that empties it, or names every VM
/// left with its reasons. The node must be Up or Paused (the caller pauses it before executing the plan).
pub fn drain(snap: &ClusterSnapshot, node: NodeId, now_ms: u64) -> Result<DrainPlan, PlanError> {
    snap.validate()?;
    let mut c = Cluster::new(snap, None);
    let di = c.node_index(node).ok_or(PlanError::UnknownNode(node))?;
    let state = c.nodes[di].node.state;
    if state == NodeState::Down {
        return Err(PlanError::WrongNodeState {
            node,
            state,
            plan: "drain",
            needed: "up or paused (a down node needs failover)",
        });
    }
    let mut vms: Vec<usize> = (0..c.vms.len()).filter(|&vi| c.owner[vi] == di).collect();
    vms.sort_by(|&a, &b| {
        c.vms[b]
            .memory_mib
            .cmp(&c.vms[a].memory_mib)
            .then_with(|| c.vms[a].id.cmp(&c.vms[b].id))
    });
    let mut jobs = Vec::new();
    let mut unmovable = Vec::new();
    let mut ownership_moves = Vec::new();
    let mut moved_mib = 0u64;
    for vi in vms {
        let vm = c.vms[vi];
        if vm.state != VmState::Running {
            match choose_owner(&c, vi, di) {
                Some((to, aa)) => {
                    ownership_moves.push(OwnershipMove {
                        vm: vm.id.clone(),
                        to: c.nodes[to].node.id,
                        anti_affinity_violation: aa,
                    });
                    c.move_vm(vi, to);
                }
                None => unmovable.push(Unmovable {
                    vm: vm.id.clone(),
                    reasons: no_up_node(&c, di),
                }),
            }
            continue;
        }
        if let Some(&to) = c.migrating.get(&vi) {
            unmovable.push(Unmovable {
                vm: vm.id.clone(),
                reasons: vec![Reason::AlreadyMigrating {
                    vm: vm.id.clone(),
                    to: c.nodes[to].node.id,
                }],
            });
            continue;
        }
        let mut best: Option<(DrainKey, Candidate)> = None;
        let mut rejected = Vec::new();
        for to in 0..c.nodes.len() {
            if to == di {
                continue;
            }
            match evaluate(&c, vi, to) {
                Ok(o) => {
                    let n = &c.nodes[to];
                    let rank = vm
                        .preferred_owners
                        .iter()
                        .position(|&p| p == n.node.id)
                        .unwrap_or(usize::MAX);
                    let key = (
                        o.anti_affinity.is_some(),
                        o.kind != MoveKind::Live,
                        rank,
                        o.duration_ms,
                        util_bp(n.mem_used_mib + vm.memory_mib, n.mem_capacity_mib),
                        n.node.id,
                    );
                    if best.as_ref().is_none_or(|(k, _)| key < *k) {
                        best = Some((key, o));
                    }
                }
                Err(reasons) => rejected.extend(reasons),
            }
        }
        match best {
            Some((_, o)) => {
                let to = o.to;
                moved_mib += vm.memory_mib;
                jobs.push(job(&c, vi, o));
                c.move_vm(vi, to);
            }
            None => {
                let mut reasons = vm_live_blockers(&c, vi);
                dedup_extend(&mut reasons, rejected);
                unmovable.push(Unmovable {
                    vm: vm.id.clone(),
                    reasons,
                });
            }
        }
    }
    let (waves, finish_ms) = schedule(&c, jobs, now_ms);
    unmovable.sort_by(|a, b| a.vm.cmp(&b.vm));
    ownership_moves.sort_by(|a, b| a.vm.cmp(&b.vm));
    let incoming_in_flight = c
        .migrating
        .iter()
        .filter(|&(_, &to)| to == di)
        .map(|(&vi, _)| c.vms[vi].id.clone())
        .collect();
    Ok(DrainPlan {
        node,
        now_ms,
        waves,
        finish_ms,
        lower_bound_ms: lower_bound_ms(moved_mib, c.nodes[di].node.migration_bandwidth_mib_per_s),
        ownership_moves,
        unmovable,
        incoming_in_flight,
    })
}

fn dedup_extend(into: &mut Vec<Reason>, more: Vec<Reason>) {
    for r in more {
        if !into.contains(&r) {
            into.push(r);
        }
    }
}

/// Plans the return of `vms` (typically [`DrainPlan::moved_vms`] of the drain) to `node` after it resumed.
/// Anti-affinity is a hard rule here: a VM is not brought back next to a VM of its class (staying put is
/// possible), and is listed as unmovable instead.
pub fn failback(
    snap: &ClusterSnapshot,
    node: NodeId,
    vms: &[VmId],
    now_ms: u64,
) -> Result<DrainPlan, PlanError> {
    snap.validate()?;
    let mut c = Cluster::new(snap, None);
    let home = c.node_index(node).ok_or(PlanError::UnknownNode(node))?;
    let state = c.nodes[home].node.state;
    if state != NodeState::Up {
        return Err(PlanError::WrongNodeState {
            node,
            state,
            plan: "failback",
            needed: "up",
        });
    }
    let mut list = Vec::with_capacity(vms.len());
    for id in vms {
        list.push(
            c.vm_index(id)
                .ok_or_else(|| PlanError::UnknownVm(id.clone()))?,
        );
    }
    list.sort_by(|&a, &b| {
        c.vms[b]
            .memory_mib
            .cmp(&c.vms[a].memory_mib)
            .then_with(|| c.vms[a].id.cmp(&c.vms[b].id))
    });
    list.dedup();
    let mut jobs = Vec::new();
    let mut unmovable = Vec::new();
    let mut ownership_moves = Vec::new();
    let mut moved_mib = 0;
    for vi in list {
        let vm = c.vms[vi];
        let from = c.owner[vi];
        if from == home {
            unmovable.push(Unmovable {
                vm: vm.id.clone(),
                reasons: vec![Reason::SameNode { node }],
            });
            continue;
        }
        if vm.state != VmState::Running {
            let s = Subject::of_vm(&c, vi);
            if let Some((class, other)) = anti_affinity_conflict(&c, &s, home) {
                unmovable.push(Unmovable {
                    vm: vm.id.clone(),
                    reasons: vec![Reason::AntiAffinity {
                        node,
                        class: class.to_owned(),
                        other_vm: c.vms[other].id.clone(),
                    }],
                });
                continue;
            }
            ownership_moves.push(OwnershipMove {
                vm: vm.id.clone(),
                to: node,
                anti_affinity_violation: None,
            });
            c.move_vm(vi, home);
            continue;
        }
        if c.nodes[from].node.state == NodeState::Down {
            unmovable.push(Unmovable {
                vm: vm.id.clone(),
                reasons: vec![Reason::NodeNotUp {
                    node: c.nodes[from].node.id,
                    state: NodeState::Down,
                }],
            });
            continue;
        }
        let mut blockers: Vec<Reason> = vm_live_blockers(&c, vi)
            .into_iter()
            .filter(|r| matches!(r, Reason::AlreadyMigrating { .. }))
            .collect();
        if blockers.is_empty() {
            match evaluate(&c, vi, home) {
                Ok(o) if o.anti_affinity.is_none() => {
                    moved_mib += vm.memory_mib;
                    jobs.push(job(&c, vi, o));
                    c.move_vm(vi, home);
                    continue;
                }
                Ok(o) => blockers.extend(o.anti_affinity),
                Err(reasons) => blockers.extend(reasons),
            }
        }
        unmovable.push(Unmovable {
            vm: vm.id.clone(),
            reasons: blockers,
        });
    }
    let (waves, finish_ms) = schedule(&c, jobs, now_ms);
    unmovable.sort_by(|a, b| a.vm.cmp(&b.vm));
    ownership_moves.sort_by(|a, b| a.vm.cmp(&b.vm));
    Ok(DrainPlan {
        node,
        now_ms,
        waves,
        finish_ms,
        lower_bound_ms: lower_bound_ms(moved_mib, c.nodes[home].node.migration_bandwidth_mib_per_s),
        ownership_moves,
        unmovable,
        incoming_in_flight: Vec::new(),
    })
}
