//! Conversion of the replicated [`ClusterState`] into a [`scheduler::ClusterSnapshot`] and
//! the placement questions the leader asks the scheduler (where does a VM start, why not
//! on node X). Pure: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};

use scheduler::{
    ClusterSnapshot, CpuVendor, Migration, Node, NodeId, PlanError, Policy, PowerPolicy, Reason,
    Subnet, Vm, VmId, VmRequest, VmState,
};

use crate::node::demand::Demand;
use crate::state::vm_spec::VmSpec;
use crate::state::vms::{DesiredState, RuntimeState, VmRecord};
use crate::state::{ClusterState, NodeRecord, NodeState};

/// Migration bandwidth assumed for a node until one is measured (1 GiB/s).
pub const DEFAULT_MIGRATION_BANDWIDTH_MIB_PER_S: u64 = 1024;

/// How many of a node's latest successful live migrations its measured migration speed
/// is the median of.
pub const MEASURED_MIGRATIONS: usize = 8;

/// What the cluster measured of a node's latest successful live migrations (as source or
/// target): the medians of the last [`MEASURED_MIGRATIONS`] of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCalibration {
    /// Guest memory moved per second of the engine's whole migration.
    pub bandwidth_mib_per_s: u64,
    /// The cluster's time around the engine's: from the committed start to the committed
    /// end (Raft writes, reconciler, worker, disk locks) minus the engine's total.
    pub overhead_ms: u64,
    /// The measured blackout.
    pub blackout_us: u64,
}

/// Every node's [`NodeCalibration`] from the replicated migration records, in one pass. A
/// node without a measured migration is absent (defaults apply). Predictions (dry runs,
/// drain plans, balancing costs) divide a VM's memory by the bandwidth and add the
/// overhead; dry runs take the blackout as the floor of the predicted one.
pub fn calibration(state: &ClusterState) -> BTreeMap<u64, NodeCalibration> {
    let mut seen: BTreeMap<u64, Vec<(u64, u64, u64)>> = BTreeMap::new();
    for m in state.migrations.values().rev() {
        if m.kind != crate::state::migrations::MigrationKind::Live
            || m.state != crate::state::migrations::MigrationState::Succeeded
        {
            continue;
        }
        let Some(st) = m
            .stats
            .as_ref()
            .filter(|st| st.total_us > 0 && st.guest_bytes > 0)
        else {
            continue;
        };
        let per_s = u128::from(st.guest_bytes) * 1_000_000 / u128::from(st.total_us);
        let rate = u64::try_from(per_s >> 20).unwrap_or(u64::MAX).max(1);
        let overhead = m
            .ended_unix_ms
            .map_or(0, |end| end.saturating_sub(m.started_unix_ms))
            .saturating_sub(st.total_us / 1000);
        let mut ends = vec![m.source];
        if m.target != m.source {
            ends.push(m.target);
        }
        for node in ends {
            let r = seen.entry(node).or_default();
            if r.len() < MEASURED_MIGRATIONS {
                r.push((rate, overhead, st.blackout_us));
            }
        }
    }
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    seen.into_iter()
        .map(|(node, r)| {
            let c = NodeCalibration {
                bandwidth_mib_per_s: median(r.iter().map(|x| x.0).collect()),
                overhead_ms: median(r.iter().map(|x| x.1).collect()),
                blackout_us: median(r.iter().map(|x| x.2).collect()),
            };
            (node, c)
        })
        .collect()
}

/// The blackout `vm`'s own latest successful live migrations measured: the median of up to
/// [`MEASURED_MIGRATIONS`] of them (the mean of the middle two for an even count); `None`
/// before its first. A VM's blackout is mostly its own doing (the pages it dirties in the
/// last round, its devices, its disks' handoff), so once it was measured it predicts the
/// VM's next blackout better than its nodes' medians over other VMs.
pub fn vm_measured_blackout_us(state: &ClusterState, vm: &str) -> Option<u64> {
    let mut seen: Vec<u64> = state
        .migrations
        .values()
        .rev()
        .filter(|m| {
            m.vm == vm
                && m.kind == crate::state::migrations::MigrationKind::Live
                && m.state == crate::state::migrations::MigrationState::Succeeded
        })
        .filter_map(|m| m.stats.as_ref().map(|st| st.blackout_us))
        .filter(|&us| us > 0)
        .take(MEASURED_MIGRATIONS)
        .collect();
    seen.sort_unstable();
    let n = seen.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(seen[n / 2]),
        _ => Some(seen[n / 2 - 1] / 2 + seen[n / 2] / 2),
    }
}

/// How many of the latest job moves [`job_step_gap_ms`] is the median of.
pub const MEASURED_JOB_GAPS: usize = 8;
/// A job's time between one move's end and the next one's start (wake on the applied
/// end, plan the step, commit its start) before any job was measured: about what the job
/// runner took per step on the project's 2-core machine (drain-bench, 2026-12-07).
pub const JOB_STEP_GAP_DEFAULT_MS: u64 = 50;
/// Gaps longer than this are not steps of a running job (a pause, a wait for a slot).
const JOB_STEP_GAP_MAX_MS: u64 = 5_000;

/// The median time the cluster's jobs (drain, failback, balance) took between the end of
/// one move and the start of the next, over their latest [`MEASURED_JOB_GAPS`] steps;
/// [`JOB_STEP_GAP_DEFAULT_MS`] before any was measured. Plans add it to each move, since
/// a job's moves from one node run one after another.
pub fn job_step_gap_ms(state: &ClusterState) -> u64 {
    use crate::state::jobs::MoveStatus;
    let mut gaps = Vec::new();
    for job in state.jobs.jobs.values().rev() {
        let mut done: Vec<(u64, u64)> = job
            .moves
            .iter()
            .filter(|m| m.status == MoveStatus::Done && m.started_unix_ms > 0)
            .map(|m| (m.started_unix_ms, m.ended_unix_ms))
            .collect();
        done.sort_unstable();
        for pair in done.windows(2).rev() {
            let (prev_end, next_start) = (pair[0].1, pair[1].0);
            if prev_end == 0 || next_start < prev_end {
                continue; // overlapping moves (a wave of several) leave no gap
            }
            let gap = next_start - prev_end;
            if gap <= JOB_STEP_GAP_MAX_MS && gaps.len() < MEASURED_JOB_GAPS {
                gaps.push(gap);
            }
        }
        if gaps.len() >= MEASURED_JOB_GAPS {
            break;
        }
    }
    if gaps.is_empty() {
        return JOB_STEP_GAP_DEFAULT_MS;
    }
    gaps.sort_unstable();
    gaps[gaps.len() / 2]
}

/// Every node's migration speed as the cluster measured it ([`calibration`]).
pub fn measured_bandwidths(state: &ClusterState) -> BTreeMap<u64, u64> {
    calibration(state)
        .into_iter()
        .map(|(n, c)| (n, c.bandwidth_mib_per_s))
        .collect()
}

/// Node `node`'s speed in `measured` ([`measured_bandwidths`]), the default until it has one.
fn speed_of(measured: &BTreeMap<u64, u64>, node: u64) -> u64 {
    measured
        .get(&node)
        .copied()
        .unwrap_or(DEFAULT_MIGRATION_BANDWIDTH_MIB_PER_S)
}

/// Node `node`'s measured migration speed ([`measured_bandwidths`]).
pub fn measured_bandwidth_mib_per_s(state: &ClusterState, node: u64) -> u64 {
    speed_of(&measured_bandwidths(state), node)
}

/// Why the cluster state cannot be handed to the scheduler, or the scheduler refused.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("node {node} registered {which} subnet {text:?}, which is not a.b.c.d/len")]
    Subnet {
        node: u64,
        which: &'static str,
        text: String,
        #[source]
        source: scheduler::model::SubnetError,
    },
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    #[error("no node {0} in the cluster")]
    UnknownNode(u64),
    /// The scheduler's refusal; its text lists every node and what rules it out.
    #[error("no node can run VM {vm}: {refusal}")]
    Refused { vm: String, refusal: String },
    /// Refused now, but a node would do once a busy migration slot frees up: a
    /// migration can wait in the queue for it.
    #[error("no node can take VM {vm} now: {refusal}")]
    SlotsBusy { vm: String, refusal: String },
    #[error("the scheduler could not plan")]
    Plan(#[source] PlanError),
}

/// The scheduler's vendor for a CPUID vendor string; `None` when it is neither.
pub fn cpu_vendor(text: &str) -> Option<CpuVendor> {
    match text {
        "AuthenticAMD" | "AMD" | "amd" => Some(CpuVendor::Amd),
        "GenuineIntel" | "Intel" | "intel" => Some(CpuVendor::Intel),
        _ => None,
    }
}

fn node_of(rec: &NodeRecord) -> Result<Option<Node>, PlacementError> {
    let r = &rec.registration;
    let subnet = |which: &'static str, text: &str| {
        text.parse::<Subnet>()
            .map_err(|source| PlacementError::Subnet {
                node: r.node_id,
                which,
                text: text.to_owned(),
                source,
            })
    };
    // A node whose CPU vendor the scheduler cannot model, or that reports no CPUs or
    // memory, cannot take VMs: leave it out (it then appears in no plan).
    let Some(vendor) = cpu_vendor(&r.facts.cpu_vendor) else {
        return Ok(None);
    };
    if r.facts.logical_cpus == 0 || r.facts.memory_bytes < (1 << 20) {
        return Ok(None);
    }
    Ok(Some(Node {
        id: NodeId(r.node_id),
        state: match rec.state {
            NodeState::Up => scheduler::NodeState::Up,
            NodeState::Paused => scheduler::NodeState::Paused,
            // Asleep nodes are no target of anything until they are Up again.
            NodeState::Down | NodeState::Standby | NodeState::Waking => scheduler::NodeState::Down,
        },
        cpus_logical: r.facts.logical_cpus,
        memory_mib: r.facts.memory_bytes >> 20,
        reserved_memory_mib: 0,
        cpu_vendor: vendor,
        cpu_features: r.facts.cpu_flags.iter().cloned().collect(),
        management_subnet: subnet("management", &r.mgmt_subnet)?,
        migration_subnet: subnet("migration", &r.migration_subnet)?,
        power: if r.power.configured() {
            PowerPolicy::MayPowerOff
        } else {
            PowerPolicy::AlwaysOn
        },
        migration_bandwidth_mib_per_s: DEFAULT_MIGRATION_BANDWIDTH_MIB_PER_S,
        migration_overhead_ms: 0,
        networks: r.networks.keys().cloned().collect(),
    }))
}

/// Whether a VM holds resources on its owner (for capacity accounting).
fn holds_resources(vm: &VmRecord) -> bool {
    vm.desired == DesiredState::Running
        || matches!(
            vm.runtime,
            RuntimeState::Starting | RuntimeState::Running | RuntimeState::Stopping
        )
}

/// The scheduler's view of the cluster.
pub fn snapshot(state: &ClusterState) -> Result<ClusterSnapshot, PlacementError> {
    let mut nodes = Vec::new();
    for rec in state.nodes.values() {
        if let Some(n) = node_of(rec)? {
            nodes.push(n);
        }
    }
    let calibrated = calibration(state);
    // Plans are carried out by jobs: each move also waits for its job's next step.
    let step_gap = job_step_gap_ms(state);
    for n in &mut nodes {
        n.migration_overhead_ms = step_gap;
        if let Some(c) = calibrated.get(&n.id.0) {
            n.migration_bandwidth_mib_per_s = c.bandwidth_mib_per_s;
            n.migration_overhead_ms = c.overhead_ms.saturating_add(step_gap);
        }
    }
    let known: BTreeSet<u64> = nodes.iter().map(|n| n.id.0).collect();
    let vms = state
        .vms
        .values()
        .filter_map(|v| {
            let owner = v.owner.filter(|o| known.contains(o))?;
            Some(Vm {
                id: VmId(v.spec.name.clone()),
                vcpus: u32::from(v.spec.vcpus),
                memory_mib: v.spec.memory_mib,
                node: NodeId(owner),
                state: if holds_resources(v) {
                    VmState::Running
                } else {
                    VmState::Off
                },
                restart_priority: v.spec.restart_priority,
                anti_affinity: v.spec.anti_affinity.clone(),
                preferred_owners: v.spec.preferred_owners.clone(),
                dirty_rate_mib_per_s: 0,
                live_migratable: true,
                cpu_features: BTreeSet::new(),
                networks: v.spec.networks(),
                cpu_demand_millicores: None,
                memory_touched_mib: None,
                moved_at_ms: v.moved_unix_ms,
            })
        })
        .collect();
    Ok(ClusterSnapshot {
        nodes,
        vms,
        migrations: Vec::new(),
        policy: Policy::default(),
    })
}

/// Sets each VM's measured demand from its owner's fresh report (a VM no report names
/// stays unmeasured: the scheduler counts it fully busy).
pub fn add_demand(snap: &mut ClusterSnapshot, demand: &Demand) {
    for vm in &mut snap.vms {
        if let Some(d) = demand.get(&vm.node.0).and_then(|r| r.vms.get(&vm.id.0)) {
            vm.cpu_demand_millicores = Some(d.cpu_demand_mc);
            vm.memory_touched_mib = Some(d.memory_touched_mib);
        }
    }
}

/// [`snapshot`] with the live migrations in flight (`VmRecord::migrating_to`): they hold
/// a migration slot on both nodes and room on the target.
pub fn snapshot_with_migrations(state: &ClusterState) -> Result<ClusterSnapshot, PlacementError> {
    let mut snap = snapshot(state)?;
    let known: BTreeSet<u64> = snap.nodes.iter().map(|n| n.id.0).collect();
    snap.migrations = state
        .vms
        .values()
        .filter_map(|v| {
            let (from, to) = (v.owner?, v.migrating_to?);
            (known.contains(&from) && known.contains(&to)).then(|| Migration {
                vm: VmId(v.spec.name.clone()),
                from: NodeId(from),
                to: NodeId(to),
                expected_end_ms: 0,
            })
        })
        .collect();
    Ok(snap)
}

/// Choose the node a VM with `spec` starts on. `spec.name` may already exist in `state`
/// (a stopped VM being started again): it is then left out of the snapshot, so it
/// neither counts against capacity nor is refused as a duplicate.
/// Nodes are compared by measured `demand` (see [`add_demand`]).
pub fn place(state: &ClusterState, demand: &Demand, spec: &VmSpec) -> Result<u64, PlacementError> {
    let mut snap = snapshot(state)?;
    add_demand(&mut snap, demand);
    snap.vms.retain(|v| v.id.0 != spec.name);
    let req = VmRequest {
        id: VmId(spec.name.clone()),
        vcpus: u32::from(spec.vcpus),
        memory_mib: spec.memory_mib,
        anti_affinity: spec.anti_affinity.clone(),
        preferred_owners: spec.preferred_owners.clone(),
        cpu_vendor: None,
        cpu_features: BTreeSet::new(),
        networks: spec.networks(),
    };
    match scheduler::place(&snap, &req) {
        Ok(p) => Ok(p.node.0),
        Err(PlanError::NoNode(refusal)) => Err(PlacementError::Refused {
            vm: spec.name.clone(),
            refusal: refusal.to_string(),
        }),
        Err(e) => Err(PlacementError::Plan(e)),
    }
}

/// Every rule that keeps VM `name` off node `node` (empty: it could go there now).
pub fn why_not(state: &ClusterState, name: &str, node: u64) -> Result<Vec<String>, PlacementError> {
    why_not_as(state, name, node, false)
}

/// [`why_not`] for a quick migration: the live-only rules (shared migration subnet,
/// live-migratable, convergence) do not apply.
pub fn why_not_quick(
    state: &ClusterState,
    name: &str,
    node: u64,
) -> Result<Vec<String>, PlacementError> {
    why_not_as(state, name, node, true)
}

fn why_not_as(
    state: &ClusterState,
    name: &str,
    node: u64,
    quick: bool,
) -> Result<Vec<String>, PlacementError> {
    Ok(match why_not_reasons(state, name, node, quick)? {
        Judged::Unfit(why) => vec![why],
        Judged::Reasons(r) => r.iter().map(ToString::to_string).collect(),
    })
}

/// The scheduler's verdict on one node, or why the node cannot be judged at all.
enum Judged {
    Unfit(String),
    Reasons(Vec<Reason>),
}

impl Judged {
    /// Ruled out only because a migration slot (the VM's node's or this one's) is taken.
    fn waits_for_slot(&self) -> bool {
        matches!(self, Judged::Reasons(r) if !r.is_empty()
            && r.iter().all(|r| matches!(r, Reason::MigrationSlotBusy { .. })))
    }
}

fn why_not_reasons(
    state: &ClusterState,
    name: &str,
    node: u64,
    quick: bool,
) -> Result<Judged, PlacementError> {
    judge(state, &snapshot_with_migrations(state)?, name, node, quick)
}

/// [`why_not_reasons`] on `snap`, built once by a caller that judges several nodes.
fn judge(
    state: &ClusterState,
    snap: &ClusterSnapshot,
    name: &str,
    node: u64,
    quick: bool,
) -> Result<Judged, PlacementError> {
    if !state.vms.values().any(|v| v.spec.name == name) {
        return Err(PlacementError::UnknownVm(name.to_owned()));
    }
    if !state.nodes.contains_key(&node) {
        return Err(PlacementError::UnknownNode(node));
    }
    if !snap.nodes.iter().any(|n| n.id.0 == node) {
        let vendor = state
            .nodes
            .get(&node)
            .map(|n| n.registration.facts.cpu_vendor.clone())
            .unwrap_or_default();
        return Ok(Judged::Unfit(format!(
            "node {node} reports CPU vendor {vendor:?} or no CPUs/memory, so it cannot run VMs"
        )));
    }
    let vm = VmId(name.to_owned());
    let mut snap = std::borrow::Cow::Borrowed(snap);
    if !snap.vms.iter().any(|v| v.id == vm) {
        // Never placed: judge it as a start, as a VM whose record names this node.
        if let Some(rec) = state.vms.values().find(|v| v.spec.name == name) {
            snap.to_mut().vms.push(Vm {
                id: vm.clone(),
                vcpus: u32::from(rec.spec.vcpus),
                memory_mib: rec.spec.memory_mib,
                node: NodeId(node),
                state: VmState::Off,
                restart_priority: rec.spec.restart_priority,
                anti_affinity: rec.spec.anti_affinity.clone(),
                preferred_owners: rec.spec.preferred_owners.clone(),
                dirty_rate_mib_per_s: 0,
                live_migratable: true,
                cpu_features: BTreeSet::new(),
                networks: rec.spec.networks(),
                cpu_demand_millicores: None,
                memory_touched_mib: None,
                moved_at_ms: None,
            });
        }
    }
    let reasons: Vec<Reason> = if quick {
        scheduler::why_not_quick(&snap, &vm, NodeId(node))
    } else {
        scheduler::why_not(&snap, &vm, NodeId(node))
    }
    .map_err(PlacementError::Plan)?;
    Ok(Judged::Reasons(reasons))
}

/// The migration target for VM `name` (live, or quick when `quick`): `to` when given and
/// allowed, else the allowed node (not the owner) running the fewest VMs, lowest id first.
/// A refusal lists every candidate's reasons.
pub fn migration_target(
    state: &ClusterState,
    name: &str,
    to: Option<u64>,
    quick: bool,
) -> Result<u64, PlacementError> {
    let rec = state
        .vms
        .values()
        .find(|v| v.spec.name == name)
        .ok_or_else(|| PlacementError::UnknownVm(name.to_owned()))?;
    let candidates: Vec<u64> = match to {
        Some(t) => vec![t],
        None => state
            .nodes
            .keys()
            .copied()
            .filter(|n| Some(*n) != rec.owner)
            .collect(),
    };
    let mut refusals = Vec::new();
    let mut best: Option<(usize, u64)> = None;
    let mut slot_bound = false;
    let snap = snapshot_with_migrations(state)?;
    for n in candidates {
        let judged = judge(state, &snap, name, n, quick)?;
        slot_bound |= judged.waits_for_slot();
        let reasons = match judged {
            Judged::Unfit(why) => vec![why],
            Judged::Reasons(r) => r.iter().map(ToString::to_string).collect(),
        };
        if reasons.is_empty() {
            let load = state
                .vms
                .values()
                .filter(|v| v.owner == Some(n) && holds_resources(v))
                .count();
            if best.is_none_or(|b| (load, n) < b) {
                best = Some((load, n));
            }
        } else {
            refusals.push(format!("node {n}: {}", reasons.join(", ")));
        }
    }
    let refusal = if refusals.is_empty() {
        "no other node".to_owned()
    } else {
        refusals.join("; ")
    };
    best.map(|(_, n)| n).ok_or_else(|| {
        if slot_bound {
            PlacementError::SlotsBusy {
                vm: name.to_owned(),
                refusal,
            }
        } else {
            PlacementError::Refused {
                vm: name.to_owned(),
                refusal,
            }
        }
    })
}

/// A dry run of a live migration: target, go/no-go and the scheduler's prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationPrediction {
    pub from: u64,
    pub to: Option<u64>,
    /// Why it cannot go (empty: go).
    pub reasons: Vec<String>,
    /// The scheduler's estimate; its duration includes the nodes' measured overhead
    /// ([`NodeCalibration::overhead_ms`]).
    pub estimate: Option<scheduler::estimate::LiveEstimate>,
    /// Predicted blackout: the model's downtime, at least the nodes' measured blackout
    /// (live).
    pub blackout_us: Option<u64>,
}

/// The prediction a started migration of `name` to `to` keeps in its record (see
/// [`predict_migration`]); `None` when none can be made.
pub fn prediction_for(
    state: &ClusterState,
    name: &str,
    to: u64,
    quick: bool,
) -> Option<crate::state::migrations::Prediction> {
    let rec = state.vms.values().find(|v| v.spec.name == name)?;
    let from = rec.owner.unwrap_or(0);
    let (estimate, blackout_us) =
        calibrated_estimate(state, name, rec.spec.memory_mib, from, Some(to), quick);
    Some(crate::state::migrations::Prediction {
        total_ms: estimate?.duration_ms,
        blackout_us,
    })
}

/// The scheduler's estimate for moving `vm` (`memory_mib`) from `from` to `target`
/// (`None`: not known yet), calibrated by the two nodes' measured migrations
/// ([`calibration`]), and the predicted blackout: the VM's own measured one
/// ([`vm_measured_blackout_us`]), else the slower end's.
fn calibrated_estimate(
    state: &ClusterState,
    vm: &str,
    memory_mib: u64,
    from: u64,
    target: Option<u64>,
    quick: bool,
) -> (Option<scheduler::estimate::LiveEstimate>, Option<u64>) {
    let calibrated = calibration(state);
    let of = |node: Option<u64>| node.and_then(|n| calibrated.get(&n)).copied();
    let (cf, ct) = (of(Some(from)), of(target));
    let speed = |c: Option<NodeCalibration>| {
        c.map_or(DEFAULT_MIGRATION_BANDWIDTH_MIB_PER_S, |c| {
            c.bandwidth_mib_per_s
        })
    };
    let bandwidth = scheduler::estimate::pair_bandwidth_mib_per_s(
        speed(cf),
        speed(ct),
        Policy::default().max_live_migrations_per_node,
    );
    // The slower end's measured overhead and blackout (nothing until one was measured).
    let overhead_ms = cf
        .map_or(0, |c| c.overhead_ms)
        .max(ct.map_or(0, |c| c.overhead_ms));
    let blackout_us = vm_measured_blackout_us(state, vm).unwrap_or_else(|| {
        cf.map_or(0, |c| c.blackout_us)
            .max(ct.map_or(0, |c| c.blackout_us))
    });
    let estimate = if quick {
        // Save and restore: all of it is downtime, in one pass.
        let ms = scheduler::estimate::quick_estimate_ms(memory_mib, bandwidth);
        Some(scheduler::estimate::LiveEstimate {
            duration_ms: ms,
            downtime_ms: ms,
            rounds: 1,
        })
    } else {
        scheduler::estimate::live_estimate(memory_mib, 0, bandwidth)
    };
    let estimate = estimate.map(|e| scheduler::estimate::LiveEstimate {
        duration_ms: e.duration_ms.saturating_add(overhead_ms),
        ..e
    });
    let blackout_us = estimate.map(|e| {
        if quick {
            e.downtime_ms.saturating_mul(1000)
        } else {
            e.downtime_ms.saturating_mul(1000).max(blackout_us)
        }
    });
    (estimate, blackout_us)
}

/// Predict a live (or, with `quick`, quick) migration of `name` (to `to`, or to the
/// scheduler's choice).
pub fn predict_migration(
    state: &ClusterState,
    name: &str,
    to: Option<u64>,
    quick: bool,
) -> Result<MigrationPrediction, PlacementError> {
    let rec = state
        .vms
        .values()
        .find(|v| v.spec.name == name)
        .ok_or_else(|| PlacementError::UnknownVm(name.to_owned()))?;
    let from = rec.owner.unwrap_or(0);
    let mut reasons = Vec::new();
    if rec.desired != DesiredState::Running || rec.runtime != RuntimeState::Running {
        reasons.push(format!(
            "VM {name} is {} (desired {}); only a running VM can be migrated",
            rec.runtime,
            rec.desired.as_str()
        ));
    }
    let target = match migration_target(state, name, to, quick) {
        Ok(t) => Some(t),
        Err(PlacementError::Refused { refusal, .. }) => {
            reasons.push(refusal);
            None
        }
        // A real `vm migrate` would wait in the queue for the slot.
        Err(PlacementError::SlotsBusy { refusal, .. }) => {
            reasons.push(format!("{refusal} (a migration would be queued)"));
            None
        }
        Err(e) => return Err(e),
    };
    let (estimate, blackout_us) =
        calibrated_estimate(state, name, rec.spec.memory_mib, from, target, quick);
    Ok(MigrationPrediction {
        from,
        to: target,
        reasons,
        estimate,
        blackout_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::vm_spec::{TestWorkload, WorkloadName};
    use crate::state::vms::VmCommand;
    use crate::state::Command;

    fn cluster(mems_gib: &[u64]) -> ClusterState {
        crate::state::fixtures::cluster(mems_gib.len() as u64, |id| {
            crate::state::fixtures::amd(2, mems_gib[id as usize - 1] << 30)
        })
    }

    fn spec(name: &str, mib: u64, class: Option<&str>) -> VmSpec {
        let mut s = VmSpec::test_guest(name, 1, mib, TestWorkload::new(WorkloadName::Idle));
        s.anti_affinity.extend(class.map(str::to_owned));
        s
    }

    fn create(s: &mut ClusterState, spec: VmSpec) -> u64 {
        let owner = place(s, &Default::default(), &spec).expect("placed");
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec,
            owner: Some(owner),
            at_unix_ms: 2,
        }));
        owner
    }

    /// A succeeded live migration `id` of `vm` from `source` to `target`, started at 1 s
    /// and ended at 2 s, without statistics: tests fill in what they measure.
    fn ended_migration(
        id: u64,
        vm: &str,
        source: u64,
        target: u64,
    ) -> crate::state::migrations::MigrationRecord {
        use crate::state::migrations::{MigrationKind, MigrationRecord, MigrationState};
        MigrationRecord {
            id,
            vm: vm.to_owned(),
            source,
            target,
            kind: MigrationKind::Live,
            max_downtime_ms: None,
            deadline_ms: None,
            bandwidth_bytes_per_s_max: None,
            state: MigrationState::Succeeded,
            cancel_requested: false,
            started_unix_ms: 1_000,
            ended_unix_ms: Some(2_000),
            reason: String::new(),
            stats: None,
            predicted: None,
        }
    }

    #[test]
    fn migration_speed_is_calibrated_from_the_nodes_last_live_migrations() {
        use crate::state::migrations::{
            MigrationKind, MigrationRecord, MigrationState, MigrationSummary,
        };
        let mut s = cluster(&[8, 8, 8]);
        assert_eq!(
            measured_bandwidth_mib_per_s(&s, 1),
            DEFAULT_MIGRATION_BANDWIDTH_MIB_PER_S
        );
        // Node 1 ↔ 2 moved 256 MiB in 1 s, 0.5 s and 2 s (256, 512, 128 MiB/s); a failed
        // one, a quick one and node 3's own do not count.
        let rec = |id, source, target, kind, state, total_us| MigrationRecord {
            kind,
            state,
            // The cluster took 300 ms more than the engine.
            ended_unix_ms: Some(1_000 + total_us / 1000 + 300),
            stats: Some(MigrationSummary {
                guest_bytes: 256 << 20,
                total_us,
                blackout_us: 4_000 + id * 1_000,
                ..Default::default()
            }),
            ..ended_migration(id, &format!("vm{id}"), source, target)
        };
        for r in [
            rec(
                1,
                1,
                2,
                MigrationKind::Live,
                MigrationState::Succeeded,
                1_000_000,
            ),
            rec(
                2,
                2,
                1,
                MigrationKind::Live,
                MigrationState::Succeeded,
                500_000,
            ),
            rec(
                3,
                1,
                2,
                MigrationKind::Live,
                MigrationState::Succeeded,
                2_000_000,
            ),
            rec(4, 1, 2, MigrationKind::Live, MigrationState::Failed, 1),
            rec(5, 1, 2, MigrationKind::Quick, MigrationState::Succeeded, 1),
            rec(
                6,
                3,
                3,
                MigrationKind::Live,
                MigrationState::Succeeded,
                100_000,
            ),
        ] {
            s.migrations.insert(r.id, r);
        }
        assert_eq!(measured_bandwidth_mib_per_s(&s, 1), 256);
        assert_eq!(measured_bandwidth_mib_per_s(&s, 2), 256);
        assert_eq!(measured_bandwidth_mib_per_s(&s, 3), 2_560);
        let snap = snapshot(&s).expect("snapshot");
        let bw: Vec<u64> = snap
            .nodes
            .iter()
            .map(|n| n.migration_bandwidth_mib_per_s)
            .collect();
        assert_eq!(bw, vec![256, 256, 2_560]);
        // The cluster's overhead, and the step gap of jobs (none measured yet: the default).
        let overhead: Vec<u64> = snap.nodes.iter().map(|n| n.migration_overhead_ms).collect();
        let with_gap = 300 + JOB_STEP_GAP_DEFAULT_MS;
        assert_eq!(overhead, vec![with_gap, with_gap, with_gap]);
        // Blackouts 5, 6 and 7 ms between 1 and 2: the median.
        let c = calibration(&s);
        assert_eq!((c[&1].blackout_us, c[&2].blackout_us), (6_000, 6_000));
    }

    #[test]
    fn a_vms_blackout_is_predicted_from_its_own_migrations_once_measured() {
        use crate::state::migrations::{MigrationRecord, MigrationState, MigrationSummary};
        let mut s = cluster(&[8, 8]);
        let rec = |id, vm: &str, state, blackout_us| MigrationRecord {
            state,
            stats: Some(MigrationSummary {
                guest_bytes: 64 << 20,
                total_us: 500_000,
                blackout_us,
                ..Default::default()
            }),
            ..ended_migration(id, vm, 1, 2)
        };
        assert_eq!(vm_measured_blackout_us(&s, "a"), None);
        // "a": a cold first migration (9 ms), then 2 and 3 ms; a failed one does not count.
        // "b", a busier VM on the same nodes, does not move "a"'s figure.
        for r in [
            rec(1, "a", MigrationState::Succeeded, 9_000),
            rec(2, "a", MigrationState::Succeeded, 2_000),
            rec(3, "b", MigrationState::Succeeded, 40_000),
            rec(4, "a", MigrationState::Failed, 50_000),
        ] {
            s.migrations.insert(r.id, r);
        }
        // Two measured: the mean of the middle two, not the larger one.
        assert_eq!(vm_measured_blackout_us(&s, "a"), Some(5_500));
        s.migrations
            .insert(5, rec(5, "a", MigrationState::Succeeded, 3_000));
        assert_eq!(vm_measured_blackout_us(&s, "a"), Some(3_000));
        assert_eq!(vm_measured_blackout_us(&s, "b"), Some(40_000));
        // The nodes' median covers both VMs; "a"'s prediction is its own.
        assert_eq!(calibration(&s)[&1].blackout_us, 9_000);
        let (_, blackout) = calibrated_estimate(&s, "a", 64, 1, Some(2), false);
        assert_eq!(blackout, Some(3_000));
        let (_, blackout) = calibrated_estimate(&s, "never-moved", 64, 1, Some(2), false);
        assert_eq!(blackout, Some(9_000));
    }

    #[test]
    fn job_step_gap_is_the_median_gap_between_a_jobs_serial_moves() {
        use crate::state::jobs::{JobKind, JobMove, JobRecord, JobStatus, MoveStatus};
        let mut s = cluster(&[8, 8]);
        assert_eq!(job_step_gap_ms(&s), JOB_STEP_GAP_DEFAULT_MS);
        let mv = |vm: &str, start, end, status| JobMove {
            status,
            started_unix_ms: start,
            ended_unix_ms: end,
            ..JobMove::queued(vm, 1, 2, 0, 0, 0)
        };
        let job = JobRecord {
            id: 1,
            kind: JobKind::Drain,
            node: 1,
            status: JobStatus::Done,
            moves: vec![
                // Gaps 40, 60 and 20 ms; an overlapping move and a 9 s pause do not count,
                // nor does a move that never ran.
                mv("a", 1_000, 1_500, MoveStatus::Done),
                mv("b", 1_540, 2_000, MoveStatus::Done),
                mv("c", 2_060, 2_500, MoveStatus::Done),
                mv("d", 2_400, 2_700, MoveStatus::Done),
                mv("e", 2_720, 3_000, MoveStatus::Done),
                mv("f", 12_000, 12_500, MoveStatus::Done),
                mv("g", 0, 0, MoveStatus::Dropped),
            ],
            planned_finish_unix_ms: 0,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            finished_unix_ms: 0,
            reason: String::new(),
            failed_back: false,
        };
        s.jobs.jobs.insert(1, job);
        // Gaps: b−a 40, c−b 60, e−d 20 (d overlaps c); f follows e after 9 s.
        assert_eq!(job_step_gap_ms(&s), 40);
        let snap = snapshot(&s).expect("snapshot");
        assert!(snap.nodes.iter().all(|n| n.migration_overhead_ms == 40));
    }

    #[test]
    fn placement_follows_measured_demand() {
        // Two 2-CPU nodes of the same size; one small VM each.
        let mut s = cluster(&[8, 8]);
        for (name, node) in [("hot", 1), ("cold", 2)] {
            s.apply(&Command::Vm(VmCommand::CreateVm {
                spec: spec(name, 256, None),
                owner: Some(node),
                at_unix_ms: 2,
            }));
        }
        // Unmeasured, both count fully busy: a tie, the lowest id wins.
        assert_eq!(
            place(&s, &Demand::new(), &spec("new", 256, None)).ok(),
            Some(1)
        );
        // Measured: node 1's VM keeps its vCPU busy, node 2's idles; the new VM goes to node 2.
        let report = |vm: &str, cpu| crate::node::demand::NodeDemand {
            sampled_unix_ms: 1,
            vms: [(
                vm.to_owned(),
                crate::node::demand::VmDemand {
                    cpu_demand_mc: cpu,
                    cpu_run_mc: cpu,
                    memory_touched_mib: 16,
                },
            )]
            .into(),
        };
        let demand: Demand = [(1, report("hot", 1000)), (2, report("cold", 50))].into();
        assert_eq!(place(&s, &demand, &spec("new", 256, None)).ok(), Some(2));
        // The snapshot carries the figures of the VMs the reports name, nothing for others.
        let mut snap = snapshot(&s).expect("snapshot");
        add_demand(&mut snap, &demand);
        let hot = snap.vms.iter().find(|v| v.id.0 == "hot").expect("hot");
        assert_eq!(
            (hot.cpu_demand_millicores, hot.memory_touched_mib),
            (Some(1000), Some(16))
        );
        // A report from a node that does not own the VM is not its figure.
        let wrong: Demand = [(2, report("hot", 1000))].into();
        let mut snap = snapshot(&s).expect("snapshot");
        add_demand(&mut snap, &wrong);
        assert!(snap.vms.iter().all(|v| v.cpu_demand_millicores.is_none()));
    }

    #[test]
    fn spreads_and_respects_anti_affinity() {
        let mut s = cluster(&[4, 4, 4]);
        let a = create(&mut s, spec("a", 1024, Some("web")));
        let b = create(&mut s, spec("b", 1024, Some("web")));
        let c = create(&mut s, spec("c", 1024, Some("web")));
        let owners: BTreeSet<u64> = [a, b, c].into_iter().collect();
        assert_eq!(owners.len(), 3, "one web VM per node: {a} {b} {c}");
    }

    #[test]
    fn refusal_explains_every_node() {
        let mut s = cluster(&[1, 1]);
        create(&mut s, spec("a", 900, None));
        create(&mut s, spec("b", 900, None));
        let err = place(&s, &Default::default(), &spec("c", 900, None)).expect_err("no room");
        let text = crate::error_chain(&err);
        assert!(text.contains("no node can run VM c"), "{text}");
        assert!(text.to_lowercase().contains("memory"), "{text}");
        // why-not names the same reason for a node.
        s.apply(&Command::Vm(VmCommand::CreateVm {
            spec: spec("c", 900, None),
            owner: None,
            at_unix_ms: 3,
        }));
        let reasons = why_not(&s, "c", 1).expect("why not");
        assert!(!reasons.is_empty());
        assert!(why_not(&s, "ghost", 1).is_err());
        assert!(matches!(
            why_not(&s, "c", 7),
            Err(PlacementError::UnknownNode(7))
        ));
    }

    #[test]
    fn down_nodes_are_not_chosen_and_unknown_vendor_nodes_are_left_out() {
        let mut s = cluster(&[4, 4]);
        s.apply(&Command::SetNodeState {
            node_id: 1,
            state: NodeState::Down,
            at_unix_ms: 1,
            reason: "test".into(),
        });
        for i in 0..3 {
            assert_eq!(create(&mut s, spec(&format!("v{i}"), 64, None)), 2);
        }
        if let Some(n) = s.nodes.get_mut(&2) {
            n.registration.facts.cpu_vendor = "Weird".into();
        }
        assert!(matches!(
            place(&s, &Default::default(), &spec("x", 64, None)),
            Err(PlacementError::Refused { .. })
        ));
    }
}
