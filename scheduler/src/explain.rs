//! The rules that rule a node out for a VM, and the "why not node X?" answer.
//!
//! Every planner decides feasibility through one function, `check`, so a plan and its explanation can never disagree.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::model::{CpuVendor, NodeId, NodeState, Subnet, VmId, VmState};

/// How a VM would get to a node; decides which rules apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// Live migration: shared migration subnet, same CPU vendor, all CPU features, migration slots.
    Live,
    /// Quick migration (save, move ownership through the shared volume, restore): same CPU vendor and features,
    /// migration slots; no migration-network requirement.
    Quick,
    /// A cold start (new VM, or restart after failover): capacity, node state and anti-affinity only.
    Start,
}

impl fmt::Display for MoveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MoveKind::Live => "live migration",
            MoveKind::Quick => "quick migration",
            MoveKind::Start => "start",
        })
    }
}

/// One rule that rules a node out (or, for anti-affinity, makes it undesirable) for a VM.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum Reason {
    /// The VM is already there.
    SameNode {
        /// Node.
        node: NodeId,
    },
    /// The node is paused or down.
    NodeNotUp {
        /// Node.
        node: NodeId,
        /// Its state.
        state: NodeState,
    },
    /// Source and target migration networks differ.
    SubnetMismatch {
        /// Node.
        node: NodeId,
        /// Source's migration subnet.
        source_subnet: Subnet,
        /// Target's migration subnet.
        target_subnet: Subnet,
    },
    /// Different CPU vendor.
    CpuVendorMismatch {
        /// Node.
        node: NodeId,
        /// Vendor the VM runs on (or requires).
        vm_vendor: CpuVendor,
        /// Target's vendor.
        node_vendor: CpuVendor,
    },
    /// Target lacks CPU features the VM was started with.
    MissingCpuFeatures {
        /// Node.
        node: NodeId,
        /// Features missing on the target.
        missing: BTreeSet<String>,
    },
    /// The node has none of (or not all of) the networks the VM's NICs are on.
    MissingNetworks {
        /// Node.
        node: NodeId,
        /// Networks the VM needs that the node does not have.
        missing: BTreeSet<String>,
    },
    /// Not enough memory left under the overcommit policy.
    InsufficientMemory {
        /// Node.
        node: NodeId,
        /// The VM's memory.
        need_mib: u64,
        /// Free memory on the node.
        free_mib: u64,
    },
    /// Not enough vCPU capacity left under the overcommit policy.
    InsufficientCpu {
        /// Node.
        node: NodeId,
        /// The VM's vCPUs.
        need_vcpus: u64,
        /// Free vCPU capacity on the node.
        free_vcpus: u64,
    },
    /// A VM of the same anti-affinity class is on the node.
    AntiAffinity {
        /// Node.
        node: NodeId,
        /// Shared class.
        class: String,
        /// The VM already there.
        other_vm: VmId,
    },
    /// A node involved is already in as many migrations as the policy allows.
    MigrationSlotBusy {
        /// The busy node (source or target).
        node: NodeId,
        /// Migrations it is in.
        busy: u32,
        /// Policy limit.
        limit: u32,
    },
    /// The VM cannot be live-migrated.
    NotLiveMigratable {
        /// VM.
        vm: VmId,
    },
    /// The VM is already being migrated.
    AlreadyMigrating {
        /// VM.
        vm: VmId,
        /// Where it is going.
        to: NodeId,
    },
    /// Pre-copy would not converge: the VM dirties memory about as fast as the link sends it.
    NotConvergent {
        /// VM.
        vm: VmId,
        /// Its dirty rate.
        dirty_rate_mib_per_s: u64,
        /// Bandwidth of the migration.
        bandwidth_mib_per_s: u64,
    },
    /// The VM is off: it has no running state to migrate.
    NotRunning {
        /// VM.
        vm: VmId,
    },
    /// Restart priority "none": not restarted automatically after a failure.
    NoAutomaticRestart {
        /// VM.
        vm: VmId,
    },
}

impl Reason {
    /// Short stable rule name (`subnet_mismatch`, ...), as used in test data and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::SameNode { .. } => "same_node",
            Reason::NodeNotUp { .. } => "node_not_up",
            Reason::SubnetMismatch { .. } => "subnet_mismatch",
            Reason::CpuVendorMismatch { .. } => "cpu_vendor_mismatch",
            Reason::MissingCpuFeatures { .. } => "missing_cpu_features",
            Reason::MissingNetworks { .. } => "missing_networks",
            Reason::InsufficientMemory { .. } => "insufficient_memory",
            Reason::InsufficientCpu { .. } => "insufficient_cpu",
            Reason::AntiAffinity { .. } => "anti_affinity",
            Reason::MigrationSlotBusy { .. } => "migration_slot_busy",
            Reason::NotLiveMigratable { .. } => "not_live_migratable",
            Reason::AlreadyMigrating { .. } => "already_migrating",
            Reason::NotConvergent { .. } => "not_convergent",
            Reason::NotRunning { .. } => "not_running",
            Reason::NoAutomaticRestart { .. } => "no_automatic_restart",
        }
    }

    /// The node the rule is about, if it is about one.
    pub fn node(&self) -> Option<NodeId> {
        match self {
            Reason::SameNode { node }
            | Reason::NodeNotUp { node, .. }
            | Reason::SubnetMismatch { node, .. }
            | Reason::CpuVendorMismatch { node, .. }
            | Reason::MissingCpuFeatures { node, .. }
            | Reason::MissingNetworks { node, .. }
            | Reason::InsufficientMemory { node, .. }
            | Reason::InsufficientCpu { node, .. }
            | Reason::AntiAffinity { node, .. }
            | Reason::MigrationSlotBusy { node, .. } => Some(*node),
            Reason::AlreadyMigrating { to, .. } => Some(*to),
            Reason::NotLiveMigratable { .. }
            | Reason::NotConvergent { .. }
            | Reason::NotRunning { .. }
            | Reason::NoAutomaticRestart { .. } => None,
        }
    }

    /// Whether the rule is a hard one (everything except anti-affinity, which is kept "where possible").
    pub fn is_hard(&self) -> bool {
        !matches!(self, Reason::AntiAffinity { .. })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::SameNode { node } => write!(f, "the VM already runs on {node}"),
            Reason::NodeNotUp { node, state } => {
                write!(f, "{node} is {state} and takes no new VMs")
            }
            Reason::SubnetMismatch {
                node,
                source_subnet,
                target_subnet,
            } => write!(
                f,
                "{node} migrates on {target_subnet}, the VM's current node on {source_subnet}"
            ),
            Reason::CpuVendorMismatch {
                node,
                vm_vendor,
                node_vendor,
            } => write!(
                f,
                "{node} has {node_vendor} CPUs and the VM needs {vm_vendor}"
            ),
            Reason::MissingCpuFeatures { node, missing } => {
                let list: Vec<&str> = missing.iter().map(String::as_str).collect();
                write!(
                    f,
                    "{node} lacks CPU features the VM was started with: {}",
                    list.join(", ")
                )
            }
            Reason::MissingNetworks { node, missing } => {
                let list: Vec<&str> = missing.iter().map(String::as_str).collect();
                write!(
                    f,
                    "{node} lacks the VM's network(s): {} (no such network in its config)",
                    list.join(", ")
                )
            }
            Reason::InsufficientMemory {
                node,
                need_mib,
                free_mib,
            } => write!(
                f,
                "{node} has {free_mib} MiB of memory free and the VM needs {need_mib} MiB"
            ),
            Reason::InsufficientCpu {
                node,
                need_vcpus,
                free_vcpus,
            } => write!(
                f,
                "{node} has room for {free_vcpus} more vCPUs and the VM has {need_vcpus}"
            ),
            Reason::AntiAffinity {
                node,
                class,
                other_vm,
            } => write!(
                f,
                "{other_vm} of anti-affinity class {class:?} is already on {node}"
            ),
            Reason::MigrationSlotBusy { node, busy, limit } => write!(
                f,
                "{node} is already in {busy} live migration(s) and the policy allows {limit} at a time"
            ),
            Reason::NotLiveMigratable { vm } => write!(f, "{vm} cannot be live-migrated"),
            Reason::AlreadyMigrating { vm, to } => {
                write!(f, "{vm} is already being migrated to {to}")
            }
            Reason::NotConvergent {
                vm,
                dirty_rate_mib_per_s,
                bandwidth_mib_per_s,
            } => write!(
                f,
                "{vm} dirties {dirty_rate_mib_per_s} MiB/s; at the {bandwidth_mib_per_s} MiB/s this migration can send, pre-copy does not converge"
            ),
            Reason::NotRunning { vm } => write!(f, "{vm} is off and has nothing to migrate"),
            Reason::NoAutomaticRestart { vm } => {
                write!(f, "{vm} has restart priority none and is not restarted automatically")
            }
        }
    }
}

/// What is being placed: an existing VM or a new request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Subject<'b> {
    /// Index of an existing VM (excluded from its own anti-affinity check).
    pub vi: Option<usize>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub classes: &'b BTreeSet<String>,
    /// Features the target must offer (for Live/Quick: those the VM started with; for Start: required ones).
    pub features: &'b BTreeSet<String>,
    /// Required vendor (Start of a new VM that asks for one).
    pub vendor: Option<CpuVendor>,
    /// Networks the target must have (every kind of move).
    pub networks: &'b BTreeSet<String>,
    /// Current node index (Live/Quick).
    pub source: Option<usize>,
}

impl<'b> Subject<'b> {
    pub fn of_vm(c: &Cluster<'b>, vi: usize) -> Self {
        let vm = c.vms[vi];
        Subject {
            vi: Some(vi),
            memory_mib: vm.memory_mib,
            vcpus: vm.vcpus,
            classes: &vm.anti_affinity,
            features: &vm.cpu_features,
            vendor: None,
            networks: &vm.networks,
            source: Some(c.owner[vi]),
        }
    }
}

/// Every rule that rules `target` out for `s`, hard rules and anti-affinity alike, in a fixed order.
/// `slots` says whether to count in-flight migrations against the per-node limit (planners that lay out a
/// timeline check slots over time instead).
pub(crate) fn check(
    c: &Cluster<'_>,
    s: &Subject<'_>,
    target: usize,
    kind: MoveKind,
    slots: bool,
) -> Vec<Reason> {
    let mut out = Vec::new();
    let t = &c.nodes[target];
    let tid = t.node.id;
    if s.source == Some(target) {
        out.push(Reason::SameNode { node: tid });
    }
    if t.node.state != NodeState::Up {
        out.push(Reason::NodeNotUp {
            node: tid,
            state: t.node.state,
        });
    }
    let src = s.source.map(|i| c.nodes[i].node);
    if kind == MoveKind::Live {
        if let Some(src) = src {
            if src.migration_subnet != t.node.migration_subnet {
                out.push(Reason::SubnetMismatch {
                    node: tid,
                    source_subnet: src.migration_subnet,
                    target_subnet: t.node.migration_subnet,
                });
            }
        }
    }
    let vendor = match kind {
        MoveKind::Live | MoveKind::Quick => src.map(|n| n.cpu_vendor),
        MoveKind::Start => s.vendor,
    };
    if let Some(v) = vendor {
        if v != t.node.cpu_vendor {
            out.push(Reason::CpuVendorMismatch {
                node: tid,
                vm_vendor: v,
                node_vendor: t.node.cpu_vendor,
            });
        }
    }
    let missing: BTreeSet<String> = s
        .features
        .difference(&t.node.cpu_features)
        .cloned()
        .collect();
    if !missing.is_empty() && (kind != MoveKind::Start || s.vi.is_none()) {
        out.push(Reason::MissingCpuFeatures { node: tid, missing });
    }
    let missing: BTreeSet<String> = s.networks.difference(&t.node.networks).cloned().collect();
    if !missing.is_empty() {
        out.push(Reason::MissingNetworks { node: tid, missing });
    }
    if s.source != Some(target) {
        if s.memory_mib > t.mem_free_mib() {
            out.push(Reason::InsufficientMemory {
                node: tid,
                need_mib: s.memory_mib,
                free_mib: t.mem_free_mib(),
            });
        }
        if u64::from(s.vcpus) > t.vcpus_free() {
            out.push(Reason::InsufficientCpu {
                node: tid,
                need_vcpus: u64::from(s.vcpus),
                free_vcpus: t.vcpus_free(),
            });
        }
        if let Some((class, other)) = anti_affinity_conflict(c, s, target) {
            out.push(Reason::AntiAffinity {
                node: tid,
                class: class.to_owned(),
                other_vm: c.vms[other].id.clone(),
            });
        }
    }
    if slots && kind != MoveKind::Start {
        let limit = c.snap.policy.max_live_migrations_per_node;
        for ni in s.source.into_iter().chain(std::iter::once(target)) {
            let busy = c.inflight_count(ni);
            if busy >= limit {
                out.push(Reason::MigrationSlotBusy {
                    node: c.nodes[ni].node.id,
                    busy,
                    limit,
                });
            }
        }
    }
    out
}

/// First (class, VM) on `target` that shares an anti-affinity class with `s`.
pub(crate) fn anti_affinity_conflict<'c>(
    c: &'c Cluster<'_>,
    s: &Subject<'_>,
    target: usize,
) -> Option<(&'c str, usize)> {
    let t = &c.nodes[target];
    for class in s.classes {
        if let Some((name, set)) = t.classes.get_key_value(class.as_str()) {
            if let Some(&other) = set.iter().find(|&&o| Some(o) != s.vi) {
                return Some((name, other));
            }
        }
    }
    None
}

/// VM-level reasons a running VM cannot be live-migrated at all.
pub(crate) fn vm_live_blockers(c: &Cluster<'_>, vi: usize) -> Vec<Reason> {
    let vm = c.vms[vi];
    let mut out = Vec::new();
    if vm.state != VmState::Running {
        out.push(Reason::NotRunning { vm: vm.id.clone() });
    }
    if !vm.live_migratable {
        out.push(Reason::NotLiveMigratable { vm: vm.id.clone() });
    }
    if let Some(&to) = c.migrating.get(&vi) {
        out.push(Reason::AlreadyMigrating {
            vm: vm.id.clone(),
            to: c.nodes[to].node.id,
        });
    }
    out
}
