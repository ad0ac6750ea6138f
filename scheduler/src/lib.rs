//! Constraint-aware VM placement, failover, maintenance drain and load balancing for the cluster.
//!
//! A pure library: no I/O, no clock (time is an input, `now_ms`), no tokio, no randomness. Every entry point takes
//! a [`ClusterSnapshot`] and returns a plan; the same snapshot always gives the same plan, whatever the order of
//! its lists. The cluster-agent runs it on the Raft leader and commits the plans it decides to execute.
//!
//! Entry points: [`place()`], [`failover()`], [`drain()`], [`failback()`], [`balance()`], [`why_not()`].
//!
//! ```
//! use scheduler::{drain, why_not, ClusterSnapshot, NodeId, VmId};
//!
//! let snap: ClusterSnapshot = serde_json::from_str(r#"{
//!   "nodes": [
//!     {"id": 1, "state": "up", "cpus_logical": 16, "memory_mib": 65536, "cpu_vendor": "intel",
//!      "management_subnet": "10.0.1.0/24", "migration_subnet": "10.0.2.0/24",
//!      "migration_bandwidth_mib_per_s": 1000},
//!     {"id": 2, "state": "up", "cpus_logical": 16, "memory_mib": 65536, "cpu_vendor": "amd",
//!      "management_subnet": "10.0.1.0/24", "migration_subnet": "10.0.2.0/24",
//!      "migration_bandwidth_mib_per_s": 1000},
//!     {"id": 3, "state": "up", "cpus_logical": 16, "memory_mib": 65536, "cpu_vendor": "intel",
//!      "management_subnet": "10.0.1.0/24", "migration_subnet": "10.0.2.0/24",
//!      "migration_bandwidth_mib_per_s": 1000}
//!   ],
//!   "vms": [{"id": "web", "vcpus": 2, "memory_mib": 4096, "node": 1, "dirty_rate_mib_per_s": 20}]
//! }"#).unwrap();
//!
//! let plan = drain(&snap, NodeId(1), 0).unwrap();
//! assert_eq!(plan.moves().next().unwrap().to, NodeId(3)); // node 2 is AMD
//! let why = why_not(&snap, &VmId::new("web"), NodeId(2)).unwrap();
//! assert_eq!(why[0].to_string(), "node 2 has AMD CPUs and the VM needs Intel");
//! ```

pub mod balance;
mod cluster;
pub mod drain;
pub mod estimate;
pub mod explain;
pub mod model;
pub mod place;
pub mod plan;
mod timeline;

pub use balance::{balance, power_pressure};
pub use drain::{drain, failback};
pub use explain::{MoveKind, Reason};
pub use model::{
    Aggressiveness, BalanceMode, ClusterSnapshot, CpuVendor, Migration, Node, NodeId, NodeState,
    Policy, PowerPolicy, RestartPriority, SnapshotError, Subnet, Vm, VmId, VmState,
};
pub use place::{failover, place, VmRequest};
pub use plan::{
    BalancePlan, BalanceStep, BalanceStop, DrainPlan, FailoverPlan, NodeRejection, NotRestarted,
    OwnershipMove, Placement, PlannedMove, Refusal, Restart, Unmovable, Wave,
};

use cluster::Cluster;
use explain::{check, vm_live_blockers, Subject};

/// Why a plan could not be made at all (as opposed to a plan that leaves VMs behind with reasons).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The snapshot is inconsistent.
    #[error("the cluster snapshot is inconsistent")]
    InvalidSnapshot(#[source] SnapshotError),
    /// A node named in the request is not in the snapshot.
    #[error("{0} is not in the snapshot")]
    UnknownNode(NodeId),
    /// A VM named in the request is not in the snapshot.
    #[error("{0} is not in the snapshot")]
    UnknownVm(VmId),
    /// The node is in the wrong state for the plan.
    #[error("{node} is {state}; {plan} needs a node that is {needed}")]
    WrongNodeState {
        /// Node.
        node: NodeId,
        /// Its state.
        state: NodeState,
        /// Plan asked for.
        plan: &'static str,
        /// State(s) it needs.
        needed: &'static str,
    },
    /// A new VM reuses an existing id.
    #[error("{0} already exists")]
    VmExists(VmId),
    /// A new VM asks for no memory or no vCPU.
    #[error("{0} asks for zero vCPUs or zero memory")]
    EmptyRequest(VmId),
    /// A new VM asks for more than any node could have (see `model::MAX_QUANTITY`, `model::MAX_CPUS`).
    #[error("{0} asks for more memory or vCPUs than any node can have")]
    RequestOutOfRange(VmId),
    /// No node can take a new VM.
    #[error("no node can host {}", .0.vm)]
    NoNode(#[source] Refusal),
}

impl From<SnapshotError> for PlanError {
    fn from(e: SnapshotError) -> Self {
        PlanError::InvalidSnapshot(e)
    }
}

impl ClusterSnapshot {
    /// The snapshot as it is once a plan has run: each listed VM owned by its new node, and any in-flight
    /// migration of those VMs gone. Use it to chain plans (e.g. a second failover after a first one).
    pub fn with_new_owners(&self, owners: &[(VmId, NodeId)]) -> Result<ClusterSnapshot, PlanError> {
        let mut next = self.clone();
        for (vm, node) in owners {
            if !next.nodes.iter().any(|n| n.id == *node) {
                return Err(PlanError::UnknownNode(*node));
            }
            let v = next
                .vms
                .iter_mut()
                .find(|v| &v.id == vm)
                .ok_or_else(|| PlanError::UnknownVm(vm.clone()))?;
            v.node = *node;
        }
        next.migrations
            .retain(|m| !owners.iter().any(|(vm, _)| *vm == m.vm));
        Ok(next)
    }
}

/// "Why not node X?" for a quick migration (save to the shared volume, restore on `node`) of a running VM:
/// the rules of a quick move — capacity, node state, same CPU vendor and features, anti-affinity, migration
/// slots in use, a migration already in flight — but not the live-only ones (shared migration subnet,
/// live-migratable, convergence). Empty if the VM could be quick-migrated there now; a VM that is not
/// running is judged for a start.
pub fn why_not_quick(
    snap: &ClusterSnapshot,
    vm: &VmId,
    node: NodeId,
) -> Result<Vec<Reason>, PlanError> {
    why_not_as(snap, vm, node, MoveKind::Quick)
}

/// "Why not node X?": every rule that rules `node` out for `vm`, empty if the VM could move there now.
///
/// A running VM on an Up or Paused node is judged for a live migration (including migration slots in use and
/// pre-copy convergence); a VM that is off or whose node is Down is judged for a start there.
pub fn why_not(snap: &ClusterSnapshot, vm: &VmId, node: NodeId) -> Result<Vec<Reason>, PlanError> {
    why_not_as(snap, vm, node, MoveKind::Live)
}

/// [`why_not`] / [`why_not_quick`]: `kind` is the move a running VM would make (`Live` or `Quick`).
fn why_not_as(
    snap: &ClusterSnapshot,
    vm: &VmId,
    node: NodeId,
    kind: MoveKind,
) -> Result<Vec<Reason>, PlanError> {
    snap.validate()?;
    let c = Cluster::new(snap, None);
    let vi = c
        .vm_index(vm)
        .ok_or_else(|| PlanError::UnknownVm(vm.clone()))?;
    let ni = c.node_index(node).ok_or(PlanError::UnknownNode(node))?;
    let v = c.vms[vi];
    let owner = c.owner[vi];
    let subject = Subject::of_vm(&c, vi);
    if v.state != VmState::Running || c.nodes[owner].node.state == NodeState::Down {
        return Ok(check(&c, &subject, ni, MoveKind::Start, false));
    }
    let mut out = vm_live_blockers(&c, vi);
    if kind == MoveKind::Quick {
        out.retain(|r| !matches!(r, Reason::NotLiveMigratable { .. }));
        out.extend(check(&c, &subject, ni, MoveKind::Quick, true));
        return Ok(out);
    }
    out.extend(check(&c, &subject, ni, MoveKind::Live, true));
    if out.is_empty() {
        let limit = snap.policy.max_live_migrations_per_node;
        let bw = estimate::pair_bandwidth_mib_per_s(
            c.nodes[owner].node.migration_bandwidth_mib_per_s,
            c.nodes[ni].node.migration_bandwidth_mib_per_s,
            limit,
        );
        if estimate::live_estimate(v.memory_mib, v.dirty_rate_mib_per_s, bw).is_none() {
            out.push(Reason::NotConvergent {
                vm: v.id.clone(),
                dirty_rate_mib_per_s: v.dirty_rate_mib_per_s,
                bandwidth_mib_per_s: bw,
            });
        }
    }
    Ok(out)
}
