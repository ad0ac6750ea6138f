//! Load balancing: even distribution and power saving. Utilisation is memory used / memory capacity (after
//! reserve and overcommit) of Up nodes, in basis points; CPU is a capacity constraint only.
//!
//! **Even distribution.** While some Up node is above the threshold (80/70/60 % for low/medium/high
//! aggressiveness), move one VM off the most loaded such node. A move of a VM from `a` to `b` is allowed only if
//! after it both nodes lie at least `balance_margin_bp` inside the old interval: `util(b)' + margin ≤ util(a)` and
//! `util(a)' ≥ util(b) + margin`. That hysteresis gives: the spread never grows; Φ = Σ used²/capacity drops by at
//! least 2·x·margin per move, so moves cannot cycle, within a run or across runs (no ping-pong). A VM picked
//! twice in one plan gets a single migration from its origin to its final node, so a run stops only at a state
//! the next run leaves alone. The VM picked is the smallest that brings the node under the
//! threshold, else the largest allowed (fewest moves), and the target the least utilised one.
//!
//! **Power saving.** Nodes are emptied smallest first onto nodes that already run VMs (best fit, never above the
//! fill level 70/80/90 %); a node is emptied only if all its running VMs can move, never into a node that was
//! empty, and a node that received VMs is not emptied in the same plan. Each emptied node lowers the number of
//! non-empty nodes, so repeated runs converge. Empty Up nodes whose power policy allows it are named.
//!
//! Both modes only plan live migrations that keep every rule, anti-affinity included.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::{util_bp, Cluster};
use crate::estimate::{live_estimate, pair_bandwidth_mib_per_s};
use crate::explain::{check, MoveKind, Subject};
use crate::model::{BalanceMode, ClusterSnapshot, PowerPolicy};
use crate::plan::{BalancePlan, PlannedMove};
use crate::timeline::{schedule, Job};
use crate::PlanError;

/// Upper bound on planning steps in one plan (a guard; the potential argument already bounds them).
pub const MAX_BALANCE_MOVES: usize = 10_000;

/// (max − min, max) utilisation over Up nodes, in basis points.
fn spread(c: &Cluster<'_>) -> (u64, u64) {
    let utils: Vec<u64> = (0..c.nodes.len())
        .filter(|&n| c.is_up(n))
        .map(|n| c.nodes[n].util_bp())
        .collect();
    let max = utils.iter().copied().max().unwrap_or(0);
    let min = utils.iter().copied().min().unwrap_or(0);
    (max - min, max)
}

/// Live-migration duration of `vi` to `to`, if every rule (anti-affinity included) allows the move now.
fn clean_live(c: &Cluster<'_>, vi: usize, to: usize) -> Option<(u64, u64)> {
    let vm = c.vms[vi];
    if !vm.live_migratable || c.migrating.contains_key(&vi) {
        return None;
    }
    let s = Subject::of_vm(c, vi);
    if !check(c, &s, to, MoveKind::Live, false).is_empty() {
        return None;
    }
    let from = c.owner[vi];
    let bw = pair_bandwidth_mib_per_s(
        c.nodes[from].node.migration_bandwidth_mib_per_s,
        c.nodes[to].node.migration_bandwidth_mib_per_s,
        c.snap.policy.max_live_migrations_per_node,
    );
    live_estimate(vm.memory_mib, vm.dirty_rate_mib_per_s, bw)
        .map(|e| (e.duration_ms, e.downtime_ms))
}

fn record(
    c: &Cluster<'_>,
    jobs: &mut Vec<Job>,
    vi: usize,
    from: usize,
    to: usize,
    est: (u64, u64),
) {
    jobs.push(Job {
        from,
        to,
        duration_ms: est.0,
        planned: PlannedMove {
            vm: c.vms[vi].id.clone(),
            from: c.nodes[from].node.id,
            to: c.nodes[to].node.id,
            kind: MoveKind::Live,
            start_ms: 0,
            end_ms: 0,
            downtime_ms: est.1,
            why_not_live: Vec::new(),
            anti_affinity_violation: None,
        },
    });
}

/// Plans load balancing according to `snap.policy.balance`, with moves laid out from `now_ms`.
pub fn balance(snap: &ClusterSnapshot, now_ms: u64) -> Result<BalancePlan, PlanError> {
    snap.validate()?;
    let mut c = Cluster::new(snap, None);
    let (spread_before_bp, max_util_before_bp) = spread(&c);
    let mut jobs = Vec::new();
    match snap.policy.balance {
        BalanceMode::None => {}
        BalanceMode::EvenDistribution => even(&mut c, &mut jobs),
        BalanceMode::PowerSaving => consolidate(&mut c, &mut jobs),
    }
    let (spread_after_bp, max_util_after_bp) = spread(&c);
    let empty_nodes_may_power_off = if snap.policy.balance == BalanceMode::PowerSaving {
        (0..c.nodes.len())
            .filter(|&n| {
                let a = &c.nodes[n];
                c.is_up(n)
                    && a.running.is_empty()
                    && a.mem_used_mib == 0
                    && a.inflight_ends_ms.is_empty()
                    && a.node.power == PowerPolicy::MayPowerOff
            })
            .map(|n| c.nodes[n].node.id)
            .collect()
    } else {
        Vec::new()
    };
    let moves_count = jobs.len();
    let moved_memory_mib = jobs
        .iter()
        .map(|j| {
            c.vm_index(&j.planned.vm)
                .map_or(0, |vi| c.vms[vi].memory_mib)
        })
        .sum();
    let (waves, finish_ms) = schedule(&c, jobs, now_ms);
    Ok(BalancePlan {
        mode: snap.policy.balance,
        waves,
        finish_ms,
        moves_count,
        moved_memory_mib,
        empty_nodes_may_power_off,
        spread_before_bp,
        spread_after_bp,
        max_util_before_bp,
        max_util_after_bp,
    })
}

fn even(c: &mut Cluster<'_>, jobs: &mut Vec<Job>) {
    let threshold = u64::from(c.snap.policy.aggressiveness.even_threshold_bp());
    let margin = u64::from(c.snap.policy.balance_margin_bp);
    // VM → the node it was on before this plan. A VM picked again later in the same plan is not moved twice: its
    // single migration goes from its origin straight to its final node.
    let mut origin: BTreeMap<usize, usize> = BTreeMap::new();
    for _ in 0..MAX_BALANCE_MOVES {
        let mut sources: Vec<usize> = (0..c.nodes.len())
            .filter(|&n| c.is_up(n) && c.nodes[n].util_bp() > threshold)
            .collect();
        sources.sort_by_key(|&n| (std::cmp::Reverse(c.nodes[n].util_bp()), c.nodes[n].node.id));
        let step = sources
            .into_iter()
            .find_map(|src| best_even_move(c, src, threshold, margin, &origin).map(|m| (src, m)));
        let Some((src, (vi, to))) = step else { break };
        origin.entry(vi).or_insert(src);
        c.move_vm(vi, to);
    }
    for (vi, from) in origin {
        let to = c.owner[vi];
        if to == from {
            continue; // came back where it started: no migration
        }
        if let Some(est) = estimate_between(c, vi, from, to) {
            record(c, jobs, vi, from, to, est);
        }
    }
}

/// Live-migration estimate of `vi` from `from` to `to`.
fn estimate_between(c: &Cluster<'_>, vi: usize, from: usize, to: usize) -> Option<(u64, u64)> {
    let vm = c.vms[vi];
    let bw = pair_bandwidth_mib_per_s(
        c.nodes[from].node.migration_bandwidth_mib_per_s,
        c.nodes[to].node.migration_bandwidth_mib_per_s,
        c.snap.policy.max_live_migrations_per_node,
    );
    live_estimate(vm.memory_mib, vm.dirty_rate_mib_per_s, bw)
        .map(|e| (e.duration_ms, e.downtime_ms))
}

fn best_even_move(
    c: &Cluster<'_>,
    src: usize,
    threshold: u64,
    margin: u64,
    origin: &BTreeMap<usize, usize>,
) -> Option<(usize, usize)> {
    let s = &c.nodes[src];
    let src_util = s.util_bp();
    // VMs in preference order: those that bring the node under the threshold, least memory first; then the
    // others, largest first (fewest moves).
    let mut vms: Vec<(bool, u64, usize)> = s
        .running
        .iter()
        .map(|&vi| {
            let mem = c.vms[vi].memory_mib;
            let clears = util_bp(s.mem_used_mib - mem, s.mem_capacity_mib) <= threshold;
            (!clears, if clears { mem } else { u64::MAX - mem }, vi)
        })
        .collect();
    vms.sort_unstable();
    for (_, _, vi) in vms {
        let mem = c.vms[vi].memory_mib;
        let src_after = util_bp(s.mem_used_mib - mem, s.mem_capacity_mib);
        // Targets that keep the hysteresis condition, least utilised after the move first.
        let mut targets: Vec<(u64, crate::model::NodeId, usize)> = (0..c.nodes.len())
            .filter_map(|to| {
                let t = &c.nodes[to];
                if to == src || !c.is_up(to) || mem > t.mem_free_mib() {
                    return None;
                }
                let t_after = util_bp(t.mem_used_mib + mem, t.mem_capacity_mib);
                (t_after + margin <= src_util && src_after >= t.util_bp() + margin)
                    .then_some((t_after, t.node.id, to))
            })
            .collect();
        targets.sort_unstable();
        let from = origin.get(&vi).copied().unwrap_or(src);
        if let Some(to) = targets.into_iter().map(|(_, _, to)| to).find(|&to| {
            clean_live(c, vi, to).is_some()
                && (to == from || estimate_between(c, vi, from, to).is_some())
        }) {
            return Some((vi, to));
        }
    }
    None
}

/// (fill key, node id), target, (duration, downtime).
type PackChoice = ((u64, crate::model::NodeId), usize, (u64, u64));

fn consolidate(c: &mut Cluster<'_>, jobs: &mut Vec<Job>) {
    let fill = u64::from(c.snap.policy.aggressiveness.consolidation_fill_bp());
    let mut candidates: Vec<usize> = (0..c.nodes.len())
        .filter(|&n| c.is_up(n) && !c.nodes[n].running.is_empty())
        .collect();
    candidates.sort_by_key(|&n| (c.nodes[n].mem_used_mib, c.nodes[n].node.id));
    // Nodes that must not receive VMs: empty ones (they stay off) and emptied ones.
    let mut closed: BTreeSet<usize> = (0..c.nodes.len())
        .filter(|&n| c.nodes[n].running.is_empty())
        .collect();
    let mut receivers: BTreeSet<usize> = BTreeSet::new();
    for n in candidates {
        if receivers.contains(&n) || !c.nodes[n].inflight_ends_ms.is_empty() {
            continue;
        }
        closed.insert(n);
        let mut vms: Vec<usize> = c.nodes[n].running.iter().copied().collect();
        vms.sort_by(|&a, &b| {
            c.vms[b]
                .memory_mib
                .cmp(&c.vms[a].memory_mib)
                .then_with(|| c.vms[a].id.cmp(&c.vms[b].id))
        });
        let mut tentative: Vec<(usize, usize, (u64, u64))> = Vec::new();
        let mut ok = true;
        for vi in vms {
            let mem = c.vms[vi].memory_mib;
            let mut best: Option<PackChoice> = None;
            for to in 0..c.nodes.len() {
                let t = &c.nodes[to];
                if closed.contains(&to) || !c.is_up(to) || mem > t.mem_free_mib() {
                    continue;
                }
                let after = util_bp(t.mem_used_mib + mem, t.mem_capacity_mib);
                if after > fill {
                    continue;
                }
                let key = (u64::MAX - after, t.node.id);
                if best.as_ref().is_some_and(|(k, ..)| *k <= key) {
                    continue;
                }
                if let Some(est) = clean_live(c, vi, to) {
                    best = Some((key, to, est));
                }
            }
            match best {
                Some((_, to, est)) => {
                    tentative.push((vi, to, est));
                    c.move_vm(vi, to);
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            for (vi, to, est) in tentative {
                record(c, jobs, vi, n, to, est);
                receivers.insert(to);
            }
        } else {
            for (vi, _, _) in tentative.into_iter().rev() {
                c.move_vm(vi, n);
            }
            closed.remove(&n);
        }
    }
}
