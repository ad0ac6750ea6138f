//! Resource accounting over a validated snapshot: the mutable working state every planner starts from.
//!
//! Nodes and VMs are held in vectors sorted by id and addressed by index, so iteration order (and therefore every
//! plan) depends only on the ids, never on the order of the input lists.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{ClusterSnapshot, Node, NodeId, Vm, VmId, VmState};

/// Basis points in 100 %.
pub(crate) const BP: u64 = 10_000;

/// Accounting for one node.
#[derive(Clone, Debug)]
pub(crate) struct NodeAcct<'a> {
    pub node: &'a Node,
    /// Memory VMs may use: (physical − reserved) × memory overcommit.
    pub mem_capacity_mib: u64,
    /// vCPUs VMs may use: logical CPUs × CPU overcommit.
    pub vcpu_capacity: u64,
    pub mem_used_mib: u64,
    pub vcpus_used: u64,
    /// CPU demand VMs may have before the node is saturated: logical CPUs × 1000 (millicores).
    pub cpu_capacity_mc: u64,
    /// Measured CPU demand of the running VMs (and incoming migrations), millicores.
    pub cpu_demand_mc: u64,
    /// Measured memory demand (touched guest memory) of the same VMs.
    pub mem_demand_mib: u64,
    /// Running VMs owned by the node (indices into `Cluster::vms`).
    pub running: BTreeSet<usize>,
    /// Anti-affinity class → VMs holding it here (owned, running or off, plus incoming migrations).
    pub classes: BTreeMap<&'a str, BTreeSet<usize>>,
    /// End times of the in-flight migrations this node takes part in.
    pub inflight_ends_ms: Vec<u64>,
}

impl NodeAcct<'_> {
    pub fn mem_free_mib(&self) -> u64 {
        self.mem_capacity_mib.saturating_sub(self.mem_used_mib)
    }

    pub fn vcpus_free(&self) -> u64 {
        self.vcpu_capacity.saturating_sub(self.vcpus_used)
    }

    /// Demand load in basis points: the higher of CPU demand / CPU capacity and memory demand / memory
    /// capacity (a host is as loaded as its busiest resource). Above 10 000 when CPU demand exceeds the CPUs.
    pub fn load_bp(&self) -> u64 {
        self.load_with_bp(0, 0)
    }

    /// [`Self::load_bp`] after adding `cpu_mc` and `mem_mib` of demand (both may be 0).
    pub fn load_with_bp(&self, cpu_mc: u64, mem_mib: u64) -> u64 {
        util_bp(self.cpu_demand_mc + cpu_mc, self.cpu_capacity_mc).max(util_bp(
            self.mem_demand_mib + mem_mib,
            self.mem_capacity_mib,
        ))
    }

    /// [`Self::load_bp`] after removing `cpu_mc` and `mem_mib` of demand.
    pub fn load_without_bp(&self, cpu_mc: u64, mem_mib: u64) -> u64 {
        util_bp(
            self.cpu_demand_mc.saturating_sub(cpu_mc),
            self.cpu_capacity_mc,
        )
        .max(util_bp(
            self.mem_demand_mib.saturating_sub(mem_mib),
            self.mem_capacity_mib,
        ))
    }
}

/// `used / capacity` in basis points.
pub(crate) fn util_bp(used_mib: u64, capacity_mib: u64) -> u64 {
    if capacity_mib == 0 {
        return 0;
    }
    (u128::from(used_mib) * u128::from(BP) / u128::from(capacity_mib)) as u64
}

/// Working state built from a snapshot.
#[derive(Clone, Debug)]
pub(crate) struct Cluster<'a> {
    pub snap: &'a ClusterSnapshot,
    /// Sorted by id.
    pub nodes: Vec<NodeAcct<'a>>,
    /// Sorted by id.
    pub vms: Vec<&'a Vm>,
    /// Current owner of each VM (index into `nodes`), updated as planned moves are applied.
    pub owner: Vec<usize>,
    /// VM index → target node index of its in-flight migration.
    pub migrating: BTreeMap<usize, usize>,
}

impl<'a> Cluster<'a> {
    /// Builds the accounting. `snap` must have passed `validate()`. In-flight migrations touching `ignore_node`
    /// are treated as aborted (used by failover: a migration to or from a failed node does not complete).
    pub fn new(snap: &'a ClusterSnapshot, ignore_node: Option<NodeId>) -> Self {
        let p = &snap.policy;
        let mut nodes: Vec<NodeAcct<'a>> = snap
            .nodes
            .iter()
            .map(|n| NodeAcct {
                node: n,
                mem_capacity_mib: ((u128::from(n.memory_mib - n.reserved_memory_mib)
                    * u128::from(p.memory_overcommit_percent))
                    / 100) as u64,
                vcpu_capacity: u64::from(n.cpus_logical) * u64::from(p.cpu_overcommit_percent)
                    / 100,
                mem_used_mib: 0,
                vcpus_used: 0,
                cpu_capacity_mc: u64::from(n.cpus_logical) * 1000,
                cpu_demand_mc: 0,
                mem_demand_mib: 0,
                running: BTreeSet::new(),
                classes: BTreeMap::new(),
                inflight_ends_ms: Vec::new(),
            })
            .collect();
        nodes.sort_by_key(|n| n.node.id);
        let mut vms: Vec<&'a Vm> = snap.vms.iter().collect();
        vms.sort_by(|a, b| a.id.cmp(&b.id));
        let mut c = Cluster {
            snap,
            nodes,
            vms,
            owner: Vec::new(),
            migrating: BTreeMap::new(),
        };
        c.owner = c
            .vms
            .iter()
            .map(|vm| c.node_index(vm.node).unwrap_or(0))
            .collect();
        for vi in 0..c.vms.len() {
            let ni = c.owner[vi];
            c.add_vm_to(vi, ni);
        }
        for m in &snap.migrations {
            if ignore_node.is_some_and(|d| d == m.from || d == m.to) {
                continue;
            }
            let (Some(vi), Some(from), Some(to)) =
                (c.vm_index(&m.vm), c.node_index(m.from), c.node_index(m.to))
            else {
                continue;
            };
            c.migrating.insert(vi, to);
            // The target has already reserved room for the incoming VM.
            c.reserve_on(vi, to);
            c.nodes[from].inflight_ends_ms.push(m.expected_end_ms);
            c.nodes[to].inflight_ends_ms.push(m.expected_end_ms);
        }
        c
    }

    pub fn node_index(&self, id: NodeId) -> Option<usize> {
        self.nodes.binary_search_by_key(&id, |n| n.node.id).ok()
    }

    pub fn vm_index(&self, id: &VmId) -> Option<usize> {
        self.vms.binary_search_by(|v| v.id.cmp(id)).ok()
    }

    fn reserve_on(&mut self, vi: usize, ni: usize) {
        let vm = self.vms[vi];
        let n = &mut self.nodes[ni];
        if vm.state == VmState::Running {
            n.mem_used_mib += vm.memory_mib;
            n.vcpus_used += u64::from(vm.vcpus);
            n.cpu_demand_mc += vm.cpu_demand_mc();
            n.mem_demand_mib += vm.memory_demand_mib();
        }
        for class in &vm.anti_affinity {
            n.classes.entry(class.as_str()).or_default().insert(vi);
        }
    }

    fn add_vm_to(&mut self, vi: usize, ni: usize) {
        self.reserve_on(vi, ni);
        if self.vms[vi].state == VmState::Running {
            self.nodes[ni].running.insert(vi);
        }
    }

    fn remove_vm_from(&mut self, vi: usize, ni: usize) {
        let vm = self.vms[vi];
        let n = &mut self.nodes[ni];
        if vm.state == VmState::Running {
            n.mem_used_mib = n.mem_used_mib.saturating_sub(vm.memory_mib);
            n.vcpus_used = n.vcpus_used.saturating_sub(u64::from(vm.vcpus));
            n.cpu_demand_mc = n.cpu_demand_mc.saturating_sub(vm.cpu_demand_mc());
            n.mem_demand_mib = n.mem_demand_mib.saturating_sub(vm.memory_demand_mib());
            n.running.remove(&vi);
        }
        for class in &vm.anti_affinity {
            if let Some(set) = n.classes.get_mut(class.as_str()) {
                set.remove(&vi);
                if set.is_empty() {
                    n.classes.remove(class.as_str());
                }
            }
        }
    }

    /// Applies a planned move of VM `vi` to node `to` in the accounting.
    pub fn move_vm(&mut self, vi: usize, to: usize) {
        let from = self.owner[vi];
        self.remove_vm_from(vi, from);
        self.add_vm_to(vi, to);
        self.owner[vi] = to;
    }

    /// Number of in-flight migrations a node takes part in (ignoring time).
    pub fn inflight_count(&self, ni: usize) -> u32 {
        self.nodes[ni].inflight_ends_ms.len() as u32
    }

    /// Whether the node is Up.
    pub fn is_up(&self, ni: usize) -> bool {
        self.nodes[ni].node.state == crate::model::NodeState::Up
    }
}
