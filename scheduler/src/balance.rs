//! Load balancing on measured demand: even distribution and power saving.
//!
//! **Load.** A node's load is the higher of its CPU demand / CPU capacity (Σ measured vCPU demand of its
//! running VMs over logical CPUs × 1000 millicores) and its memory demand / memory capacity (Σ touched memory
//! over (memory − reserve) × overcommit), in basis points; unmeasured VMs count as fully busy (see
//! `Vm::cpu_demand_millicores`). Capacity rules still use configured vCPUs and memory.
//!
//! **Even distribution.** While the load spread (most − least loaded Up node) is above the aggressiveness's
//! imbalance target (30/20/10 % for low/medium/high), make the best move off the most loaded node that has
//! one. A move of a VM from `a` to `b` is allowed only if it keeps every rule (anti-affinity included), the VM
//! has stayed `min_dwell_ms` since its last migration, and after it both nodes lie at least `balance_margin_bp`
//! inside the old interval: `load(b)' + margin ≤ load(a)` and `load(a)' ≥ load(b) + margin` (hysteresis). Its
//! gain is `load(a) − max(load(a)', load(b)')`; its cost is its live-migration estimate (estimate.rs) × the
//! policy's `migration_cost_bp_per_s`; it is made only if the gain is larger. The best move is the largest
//! gain, then the least loaded target after it, then VM id, then node id.
//!
//! No ping-pong: each move replaces the loads `l_a > l_b` by two values strictly below `l_a`, so the vector of
//! node loads sorted high to low drops lexicographically; the set of placements is finite, so no placement
//! repeats within a plan or across runs on the same demand. Across changing demand the dwell time and the
//! margin keep a VM from going back and forth. The spread never grows. A VM picked twice in one plan gets a
//! single migration from its origin to its final node.
//!
//! **Power saving.** Nodes are emptied smallest first onto nodes that already run VMs (best fit, never above the
//! fill level 70/80/90 % of load); a node is emptied only if all its running VMs can move, never into a node that
//! was empty, and a node that received VMs is not emptied in the same plan. Each emptied node lowers the number
//! of non-empty nodes, so repeated runs converge. Empty Up nodes whose power policy allows it are named.
//!
//! Both modes only plan live migrations that keep every rule, anti-affinity included.

use std::collections::{BTreeMap, BTreeSet};

use crate::cluster::Cluster;
use crate::estimate::{live_estimate, pair_bandwidth_mib_per_s};
use crate::explain::{check, MoveKind, Subject};
use crate::model::{BalanceMode, ClusterSnapshot, PowerPolicy};
use crate::plan::{BalancePlan, BalanceStep, BalanceStop, PlannedMove};
use crate::timeline::{schedule, Job};
use crate::PlanError;

/// Upper bound on planning steps in one plan (a guard; the potential argument already bounds them).
pub const MAX_BALANCE_MOVES: usize = 10_000;

/// (max − min, max) demand load over Up nodes, in basis points.
fn spread(c: &Cluster<'_>) -> (u64, u64) {
    let utils: Vec<u64> = (0..c.nodes.len())
        .filter(|&n| c.is_up(n))
        .map(|n| c.nodes[n].load_bp())
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

/// Whether the Up nodes `on` keep an N+1 failover reserve: the VMs of any one of them fit in the others' free
/// memory and vCPUs (checked against the largest: Σ used ≤ Σ capacity − the largest capacity, for each resource).
fn keeps_reserve(c: &Cluster<'_>, on: &[usize]) -> bool {
    let sum = |f: &dyn Fn(usize) -> u64| on.iter().map(|&n| f(n)).sum::<u64>();
    let max = |f: &dyn Fn(usize) -> u64| on.iter().map(|&n| f(n)).max().unwrap_or(0);
    let mem_cap = |n: usize| c.nodes[n].mem_capacity_mib;
    let vcpu_cap = |n: usize| c.nodes[n].vcpu_capacity;
    sum(&|n| c.nodes[n].mem_used_mib) <= sum(&mem_cap) - max(&mem_cap)
        && sum(&|n| c.nodes[n].vcpus_used) <= sum(&vcpu_cap) - max(&vcpu_cap)
}

/// Empty Up nodes whose policy allows powering them off, lowest id first, as long as the nodes left on keep an
/// N+1 failover reserve ([`keeps_reserve`]); none if the reserve is short already.
fn may_power_off(c: &Cluster<'_>) -> Vec<crate::model::NodeId> {
    let mut on: Vec<usize> = (0..c.nodes.len()).filter(|&n| c.is_up(n)).collect();
    let mut off = Vec::new();
    for n in 0..c.nodes.len() {
        let a = &c.nodes[n];
        let empty = c.is_up(n)
            && a.running.is_empty()
            && a.mem_used_mib == 0
            && a.inflight_ends_ms.is_empty()
            && a.node.power == PowerPolicy::MayPowerOff;
        if !empty {
            continue;
        }
        let rest: Vec<usize> = on.iter().copied().filter(|&m| m != n).collect();
        if keeps_reserve(c, &rest) {
            on = rest;
            off.push(a.node.id);
        }
    }
    off
}

/// Why the Up nodes need one more host, if they do: their N+1 failover reserve is short ([`keeps_reserve`]), or
/// a node's load is above the power-saving fill level by more than the balance margin (hysteresis: consolidation
/// fills nodes only up to the fill level, so a host is woken only once demand grew past what it planned for).
/// Power saving wakes a standby host when this is `Some`.
pub fn power_pressure(snap: &ClusterSnapshot) -> Result<Option<String>, PlanError> {
    snap.validate()?;
    let c = Cluster::new(snap, None);
    let on: Vec<usize> = (0..c.nodes.len()).filter(|&n| c.is_up(n)).collect();
    if on.is_empty() {
        return Ok(None);
    }
    if !keeps_reserve(&c, &on) {
        return Ok(Some(format!(
            "the {} up nodes no longer keep an N+1 failover reserve",
            on.len()
        )));
    }
    let fill = u64::from(c.snap.policy.aggressiveness.consolidation_fill_bp());
    let limit = fill + u64::from(c.snap.policy.balance_margin_bp);
    Ok(on
        .iter()
        .map(|&n| (c.nodes[n].node.id, c.nodes[n].load_bp()))
        .find(|(_, l)| *l > limit)
        .map(|(id, l)| {
            format!(
                "{id} is at {:.1} % load, above the {:.1} % fill level plus the margin",
                l as f64 / 100.0,
                fill as f64 / 100.0
            )
        }))
}

/// Plans load balancing according to `snap.policy.balance`, with moves laid out from `now_ms`.
pub fn balance(snap: &ClusterSnapshot, now_ms: u64) -> Result<BalancePlan, PlanError> {
    snap.validate()?;
    let mut c = Cluster::new(snap, None);
    let (spread_before_bp, max_util_before_bp) = spread(&c);
    let mut jobs = Vec::new();
    let mut steps = Vec::new();
    let stopped = match snap.policy.balance {
        BalanceMode::None => BalanceStop::Disabled,
        BalanceMode::EvenDistribution => even(&mut c, &mut jobs, &mut steps, now_ms),
        BalanceMode::PowerSaving => {
            consolidate(&mut c, &mut jobs, now_ms);
            BalanceStop::Consolidated
        }
    };
    let (spread_after_bp, max_util_after_bp) = spread(&c);
    let empty_nodes_may_power_off = if snap.policy.balance == BalanceMode::PowerSaving {
        may_power_off(&c)
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
        steps,
        stopped,
    })
}

fn even(
    c: &mut Cluster<'_>,
    jobs: &mut Vec<Job>,
    steps: &mut Vec<BalanceStep>,
    now_ms: u64,
) -> BalanceStop {
    let target = u64::from(c.snap.policy.aggressiveness.imbalance_target_bp());
    // VM → the node it was on before this plan. A VM picked again later in the same plan is not moved twice: its
    // single migration goes from its origin straight to its final node.
    let mut origin: BTreeMap<usize, usize> = BTreeMap::new();
    let mut cost_cache: CostCache = vec![None; c.vms.len()];
    let mut stop = BalanceStop::MoveLimit;
    for _ in 0..MAX_BALANCE_MOVES {
        let (spread_bp, _) = spread(c);
        if spread_bp <= target {
            stop = BalanceStop::Balanced {
                spread_bp,
                target_bp: target,
            };
            break;
        }
        let mut sources: Vec<usize> = (0..c.nodes.len())
            .filter(|&n| c.is_up(n) && !c.nodes[n].running.is_empty())
            .collect();
        sources.sort_by_key(|&n| (std::cmp::Reverse(c.nodes[n].load_bp()), c.nodes[n].node.id));
        let mut below_cost: Option<BalanceStop> = None;
        let mut dwelling = 0;
        let mut chosen = None;
        for src in sources {
            match best_even_move(c, src, &origin, now_ms, &mut cost_cache) {
                Search::Found(step, vi, to) => {
                    chosen = Some((src, step, vi, to));
                    break;
                }
                Search::BelowCost(s) => {
                    below_cost.get_or_insert(s);
                }
                Search::Nothing { dwelling: d } => dwelling += d,
            }
        }
        let Some((src, step, vi, to)) = chosen else {
            stop = below_cost.unwrap_or(BalanceStop::NoAllowedMove {
                spread_bp,
                target_bp: target,
                dwelling,
            });
            break;
        };
        origin.entry(vi).or_insert(src);
        c.move_vm(vi, to);
        steps.push(step);
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
    stop
}

/// Outcome of looking for a move off one node.
enum Search {
    /// The best move: its step, the VM and the target.
    Found(BalanceStep, usize, usize),
    /// Moves keep the rules, but the best gains no more than it costs.
    BelowCost(BalanceStop),
    /// No move keeps the rules and the margin; `dwelling` VMs were skipped for their dwell time.
    Nothing { dwelling: usize },
}

/// Cost of a move in basis points of load: its estimated duration × the policy's cost per second.
fn cost_bp(c: &Cluster<'_>, duration_ms: u64) -> u64 {
    let per_s = u128::from(c.snap.policy.migration_cost_bp_per_s);
    (u128::from(duration_ms) * per_s)
        .div_ceil(1000)
        .min(u128::from(u64::MAX)) as u64
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

/// A move considered, ordered best first: (gain (largest first), target load after (least first), VM index,
/// target index, source load after). VM and node indexes follow their ids, so ties go to the lowest ids.
type Candidate = std::cmp::Reverse<(std::cmp::Reverse<u64>, u64, usize, usize, u64)>;

/// Per VM: (from, best bandwidth, cheapest cost) of its last lower bound on a move's cost (see `min_cost`).
type CostCache = Vec<Option<(usize, u64, Option<u64>)>>;

fn best_even_move(
    c: &Cluster<'_>,
    src: usize,
    origin: &BTreeMap<usize, usize>,
    now_ms: u64,
    cost_cache: &mut CostCache,
) -> Search {
    let p = &c.snap.policy;
    let margin = u64::from(p.balance_margin_bp);
    let s = &c.nodes[src];
    let src_load = s.load_bp();
    let mut dwelling = 0;
    // Targets a live move from here can reach (cheap node-level rules; the full rule check below decides) and
    // whose load leaves room for the hysteresis condition (`load(b) + margin ≤ load(a)` at least).
    let targets: Vec<(usize, u64)> = (0..c.nodes.len())
        .filter(|&to| {
            let t = &c.nodes[to];
            to != src
                && c.is_up(to)
                && t.node.cpu_vendor == s.node.cpu_vendor
                && t.node.migration_subnet == s.node.migration_subnet
        })
        .map(|to| (to, c.nodes[to].load_bp()))
        .filter(|&(_, load)| load + margin <= src_load)
        .collect();
    // The best target of a VM is the allowed one least loaded after the move (largest gain); targets already
    // tried for it are skipped.
    let best_target = |vi: usize, tried: &[usize]| -> Option<Candidate> {
        let vm = c.vms[vi];
        let (cpu, mem) = (vm.cpu_demand_mc(), vm.memory_demand_mib());
        let src_after = s.load_without_bp(cpu, mem);
        let mut best: Option<(u64, usize)> = None;
        for &(to, t_load) in &targets {
            let t = &c.nodes[to];
            if tried.contains(&to)
                || vm.memory_mib > t.mem_free_mib()
                || u64::from(vm.vcpus) > t.vcpus_free()
            {
                continue;
            }
            let t_after = t.load_with_bp(cpu, mem);
            if t_after + margin <= src_load
                && src_after >= t_load + margin
                && best.is_none_or(|b| (t_after, to) < b)
            {
                best = Some((t_after, to));
            }
        }
        best.map(|(t_after, to)| {
            let gain = src_load - src_after.max(t_after);
            std::cmp::Reverse((std::cmp::Reverse(gain), t_after, vi, to, src_after))
        })
    };
    // One candidate per VM in a heap, best first: the estimate and the rule check (the expensive part) run only
    // on the few taken from the top; a VM whose candidate fails offers its next target.
    let mut candidates = std::collections::BinaryHeap::new();
    for &vi in &s.running {
        if dwelling_vm(c, vi, now_ms) {
            dwelling += 1;
            continue;
        }
        if let Some(cand) = best_target(vi, &[]) {
            candidates.push(cand);
        }
    }
    // The cheapest migration a VM could have from here (the fastest link among the targets): a gain at or below
    // it can be beaten by none of its targets.
    let best_bw = targets
        .iter()
        .map(|&(to, _)| c.nodes[to].node.migration_bandwidth_mib_per_s)
        .max()
        .unwrap_or(0);
    let mut min_cost = |vi: usize, from: usize| {
        if let Some((f, b, v)) = cost_cache[vi] {
            if (f, b) == (from, best_bw) {
                return v;
            }
        }
        let bw = pair_bandwidth_mib_per_s(
            c.nodes[from].node.migration_bandwidth_mib_per_s,
            best_bw,
            p.max_live_migrations_per_node,
        );
        let vm = c.vms[vi];
        let v = live_estimate(vm.memory_mib, vm.dirty_rate_mib_per_s, bw)
            .map(|e| cost_bp(c, e.duration_ms));
        cost_cache[vi] = Some((from, best_bw, v));
        v
    };
    let mut tried: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut below_cost = None;
    while let Some(std::cmp::Reverse((std::cmp::Reverse(gain), t_after, vi, to, src_after))) =
        candidates.pop()
    {
        let from = origin.get(&vi).copied().unwrap_or(src);
        // Not worth it whatever the target, and a move to name is known already: drop this VM.
        if below_cost.is_some() && to != from && min_cost(vi, from).is_none_or(|m| gain <= m) {
            continue;
        }
        let estimate = if to == from {
            Some(0) // back where it started this plan: no migration at all
        } else {
            estimate_between(c, vi, from, to).map(|(d, _)| d)
        };
        let cost = estimate.map(|d| cost_bp(c, d));
        let passes = match cost {
            Some(cost) if gain > cost => clean_live(c, vi, to).is_some(),
            // Checked only to name the first move that is not worth it, when planning stops.
            Some(_) if below_cost.is_none() => clean_live(c, vi, to).is_some(),
            _ => false,
        };
        if let (true, Some(cost)) = (passes, cost) {
            let step = BalanceStep {
                vm: c.vms[vi].id.clone(),
                from: s.node.id,
                to: c.nodes[to].node.id,
                from_load_bp: (src_load, src_after),
                to_load_bp: (c.nodes[to].load_bp(), t_after),
                gain_bp: gain,
                cost_bp: cost,
            };
            if gain > cost {
                return Search::Found(step, vi, to);
            }
            below_cost.get_or_insert(BalanceStop::GainBelowCost {
                vm: step.vm,
                from: step.from,
                to: step.to,
                gain_bp: gain,
                cost_bp: cost,
            });
        }
        // Its next target gains less. Look at it when this one broke a rule or does not converge (another may
        // not), when no move has been named yet, or when some target could cost less than that smaller gain.
        let t = tried.entry(vi).or_default();
        t.push(to);
        if let Some(next) = best_target(vi, t) {
            let std::cmp::Reverse((std::cmp::Reverse(next_gain), ..)) = next;
            let worth = cost.is_some_and(|cost| gain > cost);
            let look = cost.is_none()
                || (worth && !passes)
                || (below_cost.is_none() && !passes)
                || min_cost(vi, from).is_some_and(|m| next_gain > m);
            if look {
                candidates.push(next);
            }
        }
    }
    match below_cost {
        Some(stop) => Search::BelowCost(stop),
        None => Search::Nothing { dwelling },
    }
}

/// (fill key, node id), target, (duration, downtime).
type PackChoice = ((u64, crate::model::NodeId), usize, (u64, u64));

/// Power saving's first duty: a node past the fill level plus the margin sheds VMs, busiest first, onto the
/// least-loaded Up node that stays within the fill level (a host just woken for this included), until it is back
/// under the limit. Returns whether it planned any move (packing waits for the next round then, so one round never
/// moves a VM both ways).
fn relieve(c: &mut Cluster<'_>, jobs: &mut Vec<Job>, now_ms: u64) -> bool {
    let fill = u64::from(c.snap.policy.aggressiveness.consolidation_fill_bp());
    let limit = fill + u64::from(c.snap.policy.balance_margin_bp);
    let mut hot: Vec<usize> = (0..c.nodes.len())
        .filter(|&n| c.is_up(n) && c.nodes[n].load_bp() > limit)
        .collect();
    hot.sort_by_key(|&n| (std::cmp::Reverse(c.nodes[n].load_bp()), c.nodes[n].node.id));
    let before = jobs.len();
    for n in hot {
        if !c.nodes[n].inflight_ends_ms.is_empty() {
            continue;
        }
        let mut vms: Vec<usize> = c.nodes[n].running.iter().copied().collect();
        vms.sort_by(|&a, &b| {
            c.vms[b]
                .cpu_demand_mc()
                .cmp(&c.vms[a].cpu_demand_mc())
                .then_with(|| c.vms[a].id.cmp(&c.vms[b].id))
        });
        for vi in vms {
            if c.nodes[n].load_bp() <= limit {
                break;
            }
            if dwelling_vm(c, vi, now_ms) {
                continue;
            }
            let mem = c.vms[vi].memory_mib;
            let best = (0..c.nodes.len())
                .filter(|&to| to != n && c.is_up(to) && mem <= c.nodes[to].mem_free_mib())
                .map(|to| {
                    let after = c.nodes[to]
                        .load_with_bp(c.vms[vi].cpu_demand_mc(), c.vms[vi].memory_demand_mib());
                    (after, c.nodes[to].node.id, to)
                })
                .filter(|&(after, ..)| after <= fill)
                .min()
                .and_then(|(_, _, to)| clean_live(c, vi, to).map(|est| (to, est)));
            if let Some((to, est)) = best {
                c.move_vm(vi, to);
                record(c, jobs, vi, n, to, est);
            }
        }
    }
    jobs.len() > before
}

/// Whether VM `vi` still waits out its dwell time after its last migration.
fn dwelling_vm(c: &Cluster<'_>, vi: usize, now_ms: u64) -> bool {
    c.vms[vi]
        .moved_at_ms
        .is_some_and(|t| now_ms < t.saturating_add(c.snap.policy.min_dwell_ms))
}

fn consolidate(c: &mut Cluster<'_>, jobs: &mut Vec<Job>, now_ms: u64) {
    if relieve(c, jobs, now_ms) {
        return;
    }
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
        if receivers.contains(&n)
            || !c.nodes[n].inflight_ends_ms.is_empty()
            || c.nodes[n]
                .running
                .iter()
                .any(|&vi| dwelling_vm(c, vi, now_ms))
        {
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
                let after =
                    t.load_with_bp(c.vms[vi].cpu_demand_mc(), c.vms[vi].memory_demand_mib());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CpuVendor, Node, NodeId, NodeState, Vm, VmId, VmState};

    fn node(id: u64) -> Node {
        Node {
            id: NodeId(id),
            state: NodeState::Up,
            cpus_logical: 4,
            memory_mib: 16_384,
            reserved_memory_mib: 0,
            cpu_vendor: CpuVendor::Intel,
            cpu_features: Default::default(),
            management_subnet: "10.0.1.0/24".parse().expect("subnet"),
            migration_subnet: "10.0.2.0/24".parse().expect("subnet"),
            power: Default::default(),
            migration_bandwidth_mib_per_s: 1024,
            migration_overhead_ms: 0,
            networks: Default::default(),
        }
    }

    fn busy_vm(i: usize, node: u64, cpu_mc: u64) -> Vm {
        Vm {
            id: VmId(format!("vm-{i:02}")),
            vcpus: 1,
            memory_mib: 512,
            node: NodeId(node),
            state: VmState::Running,
            restart_priority: Default::default(),
            anti_affinity: Default::default(),
            preferred_owners: Vec::new(),
            dirty_rate_mib_per_s: 0,
            live_migratable: true,
            cpu_features: Default::default(),
            networks: Default::default(),
            cpu_demand_millicores: Some(cpu_mc),
            memory_touched_mib: Some(64),
            moved_at_ms: None,
        }
    }

    /// Eight busy VMs on node 1 of four nodes.
    fn crowded() -> ClusterSnapshot {
        let mut snap = ClusterSnapshot {
            nodes: (1..=4).map(node).collect(),
            vms: (0..8).map(|i| busy_vm(i, 1, 900)).collect(),
            ..Default::default()
        };
        snap.policy.balance = BalanceMode::EvenDistribution;
        snap.policy.aggressiveness = crate::model::Aggressiveness::High;
        snap
    }

    fn apply(snap: &mut ClusterSnapshot, plan: &BalancePlan, now_ms: u64) {
        for (vm, to) in plan.new_owners() {
            let v = snap.vms.iter_mut().find(|v| v.id == vm).expect("moved VM");
            v.node = to;
            v.moved_at_ms = Some(now_ms);
        }
    }

    #[test]
    fn a_vm_within_its_dwell_time_stays() {
        let mut snap = crowded();
        snap.policy.min_dwell_ms = 60_000;
        for v in &mut snap.vms {
            v.moved_at_ms = Some(1_000);
        }
        let plan = balance(&snap, 60_999).expect("plans");
        assert_eq!(plan.moves_count, 0);
        assert_eq!(
            plan.stopped,
            BalanceStop::NoAllowedMove {
                spread_bp: plan.spread_before_bp,
                target_bp: 1_000,
                dwelling: 8
            }
        );
        assert!(plan
            .stopped
            .to_string()
            .contains("8 VMs wait out their dwell time"));
        // One millisecond later the dwell time is over.
        let plan = balance(&snap, 61_000).expect("plans");
        assert_eq!(plan.moves_count, 6, "{plan:#?}");
    }

    /// Demand that wobbles from run to run (±4 %, under the 5 % margin) never makes VMs go back and forth:
    /// after the first run spreads them, 100 more runs over simulated minutes move nothing, with or without
    /// a dwell time.
    #[test]
    fn noisy_demand_causes_no_ping_pong() {
        for dwell_ms in [0, 300_000] {
            let mut snap = crowded();
            snap.policy.min_dwell_ms = dwell_ms;
            let mut seed = 7u64;
            let mut moves_after_first = 0;
            for round in 0..101u64 {
                let now = round * 30_000;
                for v in &mut snap.vms {
                    seed = seed
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    v.cpu_demand_millicores = Some(860 + (seed >> 33) % 81);
                }
                let plan = balance(&snap, now).expect("plans");
                for s in &plan.steps {
                    assert!(s.gain_bp > s.cost_bp, "{s:?}");
                }
                if round > 0 {
                    moves_after_first += plan.moves_count;
                }
                apply(&mut snap, &plan, now);
            }
            assert_eq!(moves_after_first, 0, "dwell {dwell_ms} ms");
            let per_node: Vec<usize> = (1..=4)
                .map(|n| snap.vms.iter().filter(|v| v.node == NodeId(n)).count())
                .collect();
            assert_eq!(per_node, vec![2, 2, 2, 2]);
        }
    }

    #[test]
    fn cost_follows_the_migration_estimate() {
        let mut snap = crowded();
        // 512 MiB over 1024 MiB/s: 500 ms; at 100 bp per second that is 50 bp.
        let plan = balance(&snap, 0).expect("plans");
        assert!(
            plan.steps.iter().all(|s| s.cost_bp == 50),
            "{:?}",
            plan.steps
        );
        // A cost no gain can beat stops the plan before its first move.
        snap.policy.migration_cost_bp_per_s = 10_000;
        let plan = balance(&snap, 0).expect("plans");
        assert_eq!(plan.moves_count, 0);
        assert!(
            matches!(
                plan.stopped,
                BalanceStop::GainBelowCost { cost_bp: 5_000, .. }
            ),
            "{:?}",
            plan.stopped
        );
    }

    #[test]
    fn memory_demand_counts_too() {
        // Idle VMs (no CPU demand) that touched all their memory: memory alone drives the spread.
        let mut snap = crowded();
        for v in &mut snap.vms {
            v.cpu_demand_millicores = Some(0);
            v.memory_mib = 2_048;
            v.memory_touched_mib = Some(2_048);
        }
        let plan = balance(&snap, 0).expect("plans");
        assert!(plan.moves_count >= 3, "{plan:#?}");
        assert!(plan.max_util_after_bp < plan.max_util_before_bp);
        // Same VMs having touched little memory: nothing to balance.
        for v in &mut snap.vms {
            v.memory_touched_mib = Some(64);
        }
        let plan = balance(&snap, 0).expect("plans");
        assert_eq!(plan.moves_count, 0);
        assert!(matches!(plan.stopped, BalanceStop::Balanced { .. }));
    }

    #[test]
    fn power_saving_relieves_a_node_past_the_fill_level_onto_a_woken_host() {
        // Node 1 at 90 % CPU (fill 80 % + margin 5 %), node 2 empty (just woken), node 3 half full.
        let mut snap = ClusterSnapshot {
            nodes: (1..=3).map(node).collect(),
            vms: (0..4)
                .map(|i| busy_vm(i, 1, 900))
                .chain((4..6).map(|i| busy_vm(i, 3, 1000)))
                .collect(),
            ..Default::default()
        };
        snap.policy.balance = BalanceMode::PowerSaving;
        let plan = balance(&snap, 0).expect("plans");
        assert!(plan.moves_count >= 1, "{plan:?}");
        let owners = plan.new_owners();
        assert!(
            owners.iter().all(|(_, to)| *to == NodeId(2)),
            "moves go to the least-loaded node within the fill level: {owners:?}"
        );
        for (vm, to) in &owners {
            let v = snap.vms.iter_mut().find(|v| v.id == *vm).expect("known");
            v.node = *to;
            v.moved_at_ms = Some(0);
        }
        assert_eq!(power_pressure(&snap).expect("plans"), None, "relieved");
        // The next round, within the moved VMs' dwell time: none of them moves again, and
        // whatever packing does leaves no node past the limit.
        let again = balance(&snap, 1_000).expect("plans");
        for (vm, to) in again.new_owners() {
            assert!(!owners.iter().any(|(v, _)| *v == vm), "{vm:?} moved twice");
            snap.vms
                .iter_mut()
                .find(|v| v.id == vm)
                .expect("known")
                .node = to;
        }
        assert_eq!(power_pressure(&snap).expect("plans"), None);
    }

    #[test]
    fn pressure_when_the_reserve_is_short_or_a_node_is_past_the_fill_level() {
        // Two 16 GiB nodes with 4 GiB of VMs: reserve kept, loads low: no pressure.
        let mut snap = ClusterSnapshot {
            nodes: (1..=2).map(node).collect(),
            vms: (0..8).map(|i| busy_vm(i, 1, 100)).collect(),
            ..Default::default()
        };
        snap.policy.balance = BalanceMode::PowerSaving;
        assert_eq!(power_pressure(&snap).expect("plans"), None);
        // 24 VMs of 512 MiB (12 GiB): more than one node's memory short of the other's.
        snap.vms = (0..24)
            .map(|i| busy_vm(i, (i % 2) as u64 + 1, 100))
            .collect();
        let why = power_pressure(&snap).expect("plans").expect("pressure");
        assert!(why.contains("N+1 failover reserve"), "{why}");
        // A CPU-busy node past the fill level (80 % + 5 %) with the reserve kept.
        snap.nodes = (1..=3).map(node).collect();
        snap.vms = (0..4).map(|i| busy_vm(i, 1, 900)).collect();
        let why = power_pressure(&snap).expect("plans").expect("pressure");
        assert!(why.contains("node 1 is at 90.0 % load"), "{why}");
        // A standby (Down to the scheduler) node counts for nothing.
        snap.vms = (0..4).map(|i| busy_vm(i, 1, 100)).collect();
        snap.nodes[1].state = NodeState::Down;
        snap.nodes[2].state = NodeState::Down;
        let why = power_pressure(&snap).expect("plans").expect("pressure");
        assert!(why.contains("the 1 up nodes"), "{why}");
    }
}
