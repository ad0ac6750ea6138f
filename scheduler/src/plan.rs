//! Plans: the outputs of the scheduler. Plain data, serde, deterministic (sorted) contents.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::explain::{MoveKind, Reason};
use crate::model::{NodeId, RestartPriority, VmId};

/// One migration in a timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedMove {
    /// VM.
    pub vm: VmId,
    /// Source.
    pub from: NodeId,
    /// Target.
    pub to: NodeId,
    /// Live or quick.
    pub kind: MoveKind,
    /// Planned start.
    pub start_ms: u64,
    /// Planned end (start + estimate).
    pub end_ms: u64,
    /// Estimated guest downtime.
    pub downtime_ms: u64,
    /// For a quick migration: why it could not be live.
    pub why_not_live: Vec<Reason>,
    /// Anti-affinity rule that had to be broken (no other target existed), if any.
    pub anti_affinity_violation: Option<Reason>,
}

impl PlannedMove {
    /// Estimated duration.
    pub fn duration_ms(&self) -> u64 {
        self.end_ms - self.start_ms
    }
}

/// Moves that start at the same instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Start of every move in the wave.
    pub start_ms: u64,
    /// End of the longest move in the wave.
    pub end_ms: u64,
    /// Moves, sorted by VM id.
    pub moves: Vec<PlannedMove>,
}

/// A VM a plan leaves where it is, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unmovable {
    /// VM.
    pub vm: VmId,
    /// VM-level reasons (not live-migratable, already migrating, ...) then every node's reasons.
    pub reasons: Vec<Reason>,
}

/// Ownership change of a VM that is off (no migration needed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipMove {
    /// VM.
    pub vm: VmId,
    /// New owner.
    pub to: NodeId,
    /// Anti-affinity rule that had to be broken (every Up node had a VM of its class), if any.
    pub anti_affinity_violation: Option<Reason>,
}

/// Maintenance drain (or failback) timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainPlan {
    /// Node drained (for failback: the node VMs return to).
    pub node: NodeId,
    /// Time the plan starts.
    pub now_ms: u64,
    /// Waves in start order.
    pub waves: Vec<Wave>,
    /// When the last move ends (`now_ms` if nothing moves).
    pub finish_ms: u64,
    /// Lower bound on the makespan: Σ memory of the moved running VMs / the node's bandwidth.
    pub lower_bound_ms: u64,
    /// Off VMs whose ownership moves.
    pub ownership_moves: Vec<OwnershipMove>,
    /// VMs left behind, with reasons.
    pub unmovable: Vec<Unmovable>,
    /// VMs with an in-flight migration *into* the node (drain only): the caller aborts these, or they arrive
    /// after the drain and need another drain.
    pub incoming_in_flight: Vec<VmId>,
}

impl DrainPlan {
    /// All moves in start order.
    pub fn moves(&self) -> impl Iterator<Item = &PlannedMove> {
        self.waves.iter().flat_map(|w| w.moves.iter())
    }

    /// Owner of every VM the plan moves or re-owns once it has run, sorted by VM (see
    /// [`crate::ClusterSnapshot::with_new_owners`]).
    pub fn new_owners(&self) -> Vec<(VmId, NodeId)> {
        let mut v: Vec<(VmId, NodeId)> = self
            .moves()
            .map(|m| (m.vm.clone(), m.to))
            .chain(self.ownership_moves.iter().map(|o| (o.vm.clone(), o.to)))
            .collect();
        v.sort();
        v
    }

    /// VMs this plan moves (live or quick), sorted; what a later failback brings back.
    pub fn moved_vms(&self) -> Vec<VmId> {
        let mut v: Vec<VmId> = self.moves().map(|m| m.vm.clone()).collect();
        v.sort();
        v
    }
}

/// Where a VM restarts after a failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    /// VM.
    pub vm: VmId,
    /// New node.
    pub node: NodeId,
    /// Its priority (restarts are listed in priority order).
    pub priority: RestartPriority,
    /// Anti-affinity rule that had to be broken, if any.
    pub anti_affinity_violation: Option<Reason>,
}

/// A VM that is not restarted, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotRestarted {
    /// VM.
    pub vm: VmId,
    /// Its priority.
    pub priority: RestartPriority,
    /// Why: `no_automatic_restart` for priority none, else every node's reasons.
    pub reasons: Vec<Reason>,
}

/// Failover plan for a node that went down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverPlan {
    /// Failed node.
    pub down: NodeId,
    /// Restarts in the order to perform them (high priority first).
    pub restarts: Vec<Restart>,
    /// Running VMs admission control refused, or with restart priority none.
    pub not_restarted: Vec<NotRestarted>,
    /// Off VMs that get a new owner.
    pub ownership_moves: Vec<OwnershipMove>,
}

impl FailoverPlan {
    /// Owner of every restarted or re-owned VM once the plan has run, sorted by VM.
    pub fn new_owners(&self) -> Vec<(VmId, NodeId)> {
        let mut v: Vec<(VmId, NodeId)> = self
            .restarts
            .iter()
            .map(|r| (r.vm.clone(), r.node))
            .chain(self.ownership_moves.iter().map(|o| (o.vm.clone(), o.to)))
            .collect();
        v.sort();
        v
    }
}

/// Where a new VM goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// VM.
    pub vm: VmId,
    /// Chosen node.
    pub node: NodeId,
    /// Anti-affinity rule that had to be broken, if any.
    pub anti_affinity_violation: Option<Reason>,
}

/// Reasons one node was ruled out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRejection {
    /// Node.
    pub node: NodeId,
    /// Rules that rule it out.
    pub reasons: Vec<Reason>,
}

/// Why no node can take a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub struct Refusal {
    /// VM.
    pub vm: VmId,
    /// Every node and what rules it out.
    pub rejections: Vec<NodeRejection>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.rejections.is_empty() {
            return write!(f, "the cluster has no nodes");
        }
        for (i, r) in self.rejections.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            let texts: Vec<String> = r.reasons.iter().map(ToString::to_string).collect();
            write!(f, "{}", texts.join(", "))?;
        }
        Ok(())
    }
}

/// One planning step of even distribution: a VM moved from a more loaded to a less loaded node, with the loads
/// (demand, basis points) it was judged on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceStep {
    /// VM.
    pub vm: VmId,
    /// Node it leaves in this step.
    pub from: NodeId,
    /// Node it goes to.
    pub to: NodeId,
    /// Load of `from` before and after the step.
    pub from_load_bp: (u64, u64),
    /// Load of `to` before and after the step.
    pub to_load_bp: (u64, u64),
    /// Gain: how much the higher load of the two nodes drops (`from` before − the higher one after).
    pub gain_bp: u64,
    /// Cost charged for the migration (its estimated duration × the policy's cost per second).
    pub cost_bp: u64,
}

/// Why a balancing plan stopped adding moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stop", rename_all = "snake_case")]
pub enum BalanceStop {
    /// The policy is `none`.
    Disabled,
    /// The load spread is at or under the aggressiveness's imbalance target.
    Balanced {
        /// Spread reached.
        spread_bp: u64,
        /// Target.
        target_bp: u64,
    },
    /// The best move the rules allow gains no more than it costs.
    GainBelowCost {
        /// VM of that move.
        vm: VmId,
        /// From.
        from: NodeId,
        /// To.
        to: NodeId,
        /// Its gain.
        gain_bp: u64,
        /// Its cost.
        cost_bp: u64,
    },
    /// No VM may move: every candidate breaks a rule, the hysteresis margin, or its dwell time.
    NoAllowedMove {
        /// Spread left.
        spread_bp: u64,
        /// Target.
        target_bp: u64,
        /// VMs left alone because they moved less than `min_dwell_ms` ago.
        dwelling: usize,
    },
    /// The plan reached the step guard.
    MoveLimit,
    /// Power saving: no more node can be emptied.
    Consolidated,
}

impl fmt::Display for BalanceStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |bp: u64| format!("{}.{:02} %", bp / 100, bp % 100);
        match self {
            BalanceStop::Disabled => f.write_str("balancing is off (policy none)"),
            BalanceStop::Balanced { spread_bp, target_bp } => write!(
                f,
                "balanced: load spread {} is within the target {}",
                pct(*spread_bp),
                pct(*target_bp)
            ),
            BalanceStop::GainBelowCost {
                vm,
                from,
                to,
                gain_bp,
                cost_bp,
            } => write!(
                f,
                "the best remaining move ({vm} from {from} to {to}) would gain {} but costs {}",
                pct(*gain_bp),
                pct(*cost_bp)
            ),
            BalanceStop::NoAllowedMove {
                spread_bp,
                target_bp,
                dwelling,
            } => write!(
                f,
                "load spread {} is above the target {} but no move keeps every rule and the hysteresis margin \
                 ({dwelling} VMs wait out their dwell time)",
                pct(*spread_bp),
                pct(*target_bp)
            ),
            BalanceStop::MoveLimit => f.write_str("the plan reached its move limit"),
            BalanceStop::Consolidated => f.write_str("no further node can be emptied"),
        }
    }
}

/// A load-balancing plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancePlan {
    /// Policy mode the plan was made for.
    pub mode: crate::model::BalanceMode,
    /// Moves laid out in waves (all live migrations).
    pub waves: Vec<Wave>,
    /// When the last move ends.
    pub finish_ms: u64,
    /// Number of moves.
    pub moves_count: usize,
    /// Memory moved.
    pub moved_memory_mib: u64,
    /// Up nodes with no running VM after the plan whose power policy allows powering them off (power saving),
    /// as many as leave an N+1 failover reserve on the nodes that stay on.
    pub empty_nodes_may_power_off: Vec<NodeId>,
    /// Max − min demand load over Up nodes before, in basis points.
    pub spread_before_bp: u64,
    /// Same after the plan.
    pub spread_after_bp: u64,
    /// Highest demand load over Up nodes before, in basis points.
    pub max_util_before_bp: u64,
    /// Same after.
    pub max_util_after_bp: u64,
    /// Even distribution: the planning steps in order, each with its gain and cost.
    pub steps: Vec<BalanceStep>,
    /// Why planning stopped.
    pub stopped: BalanceStop,
}

impl BalancePlan {
    /// All moves in start order.
    pub fn moves(&self) -> impl Iterator<Item = &PlannedMove> {
        self.waves.iter().flat_map(|w| w.moves.iter())
    }

    /// Owner of every moved VM once the plan has run, sorted by VM.
    pub fn new_owners(&self) -> Vec<(VmId, NodeId)> {
        let mut v: Vec<(VmId, NodeId)> = self.moves().map(|m| (m.vm.clone(), m.to)).collect();
        v.sort();
        v
    }
}
