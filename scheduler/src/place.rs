//! Placement of a new VM and failover restarts (cold starts: capacity, node state, anti-affinity).
//!
//! Target choice, in order: a node without an anti-affinity conflict; the VM's preferred owners in their order;
//! then the fit rule on demand load (the higher of CPU demand and memory demand utilisation, see
//! `Vm::cpu_demand_millicores`; spread: lowest load after the start; power saving: highest load, so empty nodes
//! stay empty); then the lowest node id. A new VM counts as all its vCPUs busy and all its memory touched.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::cluster::Cluster;
use crate::explain::{anti_affinity_conflict, check, MoveKind, Reason, Subject};
use crate::model::{BalanceMode, ClusterSnapshot, CpuVendor, NodeId, NodeState, VmId, VmState};
use crate::plan::{
    FailoverPlan, NodeRejection, NotRestarted, OwnershipMove, Placement, Refusal, Restart,
};
use crate::PlanError;

/// A VM to place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRequest {
    /// Id of the new VM.
    pub id: VmId,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory.
    pub memory_mib: u64,
    /// Anti-affinity classes.
    #[serde(default)]
    pub anti_affinity: BTreeSet<String>,
    /// Preferred owners, most preferred first.
    #[serde(default)]
    pub preferred_owners: Vec<NodeId>,
    /// CPU vendor the VM requires, if any.
    #[serde(default)]
    pub cpu_vendor: Option<CpuVendor>,
    /// CPU features the VM requires.
    #[serde(default)]
    pub cpu_features: BTreeSet<String>,
    /// Networks the VM's NICs are on.
    #[serde(default)]
    pub networks: BTreeSet<String>,
}

/// How to pick among feasible nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fit {
    /// Lowest demand load after the move.
    Spread,
    /// Highest demand load after the move, preferring nodes already running VMs.
    Pack,
}

impl Fit {
    pub fn for_policy(mode: BalanceMode) -> Self {
        if mode == BalanceMode::PowerSaving {
            Fit::Pack
        } else {
            Fit::Spread
        }
    }
}

/// Target preference: (anti-affinity conflict, preferred-owner rank, empty node (pack only), fit, id).
type PlaceKey = (bool, usize, Reverse<bool>, u64, NodeId);

/// Chooses a node for `s` among all nodes, or returns every node's rejection.
pub(crate) fn choose(
    c: &Cluster<'_>,
    s: &Subject<'_>,
    kind: MoveKind,
    preferred: &[NodeId],
    fit: Fit,
) -> Result<(usize, Option<Reason>), Vec<NodeRejection>> {
    let mut best: Option<(PlaceKey, usize, Option<Reason>)> = None;
    let mut rejections = Vec::new();
    for ni in 0..c.nodes.len() {
        let reasons = check(c, s, ni, kind, false);
        if reasons.iter().any(Reason::is_hard) {
            rejections.push(NodeRejection {
                node: c.nodes[ni].node.id,
                reasons,
            });
            continue;
        }
        let n = &c.nodes[ni];
        let aa = reasons.into_iter().next();
        let rank = preferred
            .iter()
            .position(|&p| p == n.node.id)
            .unwrap_or(usize::MAX);
        // Demand of the subject: measured for an existing VM, all vCPUs and all memory for a new one.
        let (cpu_mc, mem_mib) = match s.vi {
            Some(vi) => (c.vms[vi].cpu_demand_mc(), c.vms[vi].memory_demand_mib()),
            None => (u64::from(s.vcpus) * 1000, s.memory_mib),
        };
        let after = n.load_with_bp(cpu_mc, mem_mib);
        let (nonempty, fit_key) = match fit {
            Fit::Spread => (true, after),
            Fit::Pack => (!n.running.is_empty(), u64::MAX - after),
        };
        let key = (aa.is_some(), rank, Reverse(nonempty), fit_key, n.node.id);
        if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
            best = Some((key, ni, aa));
        }
    }
    match best {
        Some((_, ni, aa)) => Ok((ni, aa)),
        None => Err(rejections),
    }
}

/// Chooses the node for a new VM, or refuses with every node's reasons.
pub fn place(snap: &ClusterSnapshot, req: &VmRequest) -> Result<Placement, PlanError> {
    snap.validate()?;
    if req.memory_mib == 0 || req.vcpus == 0 {
        return Err(PlanError::EmptyRequest(req.id.clone()));
    }
    if req.memory_mib > crate::model::MAX_QUANTITY || req.vcpus > crate::model::MAX_CPUS {
        return Err(PlanError::RequestOutOfRange(req.id.clone()));
    }
    let c = Cluster::new(snap, None);
    if c.vm_index(&req.id).is_some() {
        return Err(PlanError::VmExists(req.id.clone()));
    }
    let s = Subject {
        vi: None,
        memory_mib: req.memory_mib,
        vcpus: req.vcpus,
        classes: &req.anti_affinity,
        features: &req.cpu_features,
        vendor: req.cpu_vendor,
        networks: &req.networks,
        source: None,
    };
    let fit = Fit::for_policy(snap.policy.balance);
    match choose(&c, &s, MoveKind::Start, &req.preferred_owners, fit) {
        Ok((ni, aa)) => Ok(Placement {
            vm: req.id.clone(),
            node: c.nodes[ni].node.id,
            anti_affinity_violation: aa,
        }),
        Err(rejections) => Err(PlanError::NoNode(Refusal {
            vm: req.id.clone(),
            rejections,
        })),
    }
}

/// Where the VMs of the failed node `down` restart, highest restart priority first (larger VMs first within a
/// priority, so they find room), with admission control: VMs no node can take are listed with every node's reasons.
pub fn failover(snap: &ClusterSnapshot, down: NodeId) -> Result<FailoverPlan, PlanError> {
    snap.validate()?;
    let mut c = Cluster::new(snap, Some(down));
    let di = c.node_index(down).ok_or(PlanError::UnknownNode(down))?;
    let state = c.nodes[di].node.state;
    if state != NodeState::Down {
        return Err(PlanError::WrongNodeState {
            node: down,
            state,
            plan: "failover",
            needed: "down",
        });
    }
    let fit = Fit::for_policy(snap.policy.balance);
    let mut order: Vec<usize> = (0..c.vms.len()).filter(|&vi| c.owner[vi] == di).collect();
    order.sort_by(|&a, &b| {
        let (va, vb) = (c.vms[a], c.vms[b]);
        va.restart_priority
            .cmp(&vb.restart_priority)
            .then(vb.memory_mib.cmp(&va.memory_mib))
            .then_with(|| va.id.cmp(&vb.id))
    });
    let mut plan = FailoverPlan {
        down,
        restarts: Vec::new(),
        not_restarted: Vec::new(),
        ownership_moves: Vec::new(),
    };
    for vi in order {
        let vm = c.vms[vi];
        if vm.state != VmState::Running {
            if let Some((to, aa)) = choose_owner(&c, vi, di) {
                plan.ownership_moves.push(OwnershipMove {
                    vm: vm.id.clone(),
                    to: c.nodes[to].node.id,
                    anti_affinity_violation: aa,
                });
                c.move_vm(vi, to);
            } else {
                plan.not_restarted.push(NotRestarted {
                    vm: vm.id.clone(),
                    priority: vm.restart_priority,
                    reasons: no_up_node(&c, di),
                });
            }
            continue;
        }
        if vm.restart_priority == crate::model::RestartPriority::None {
            plan.not_restarted.push(NotRestarted {
                vm: vm.id.clone(),
                priority: vm.restart_priority,
                reasons: vec![Reason::NoAutomaticRestart { vm: vm.id.clone() }],
            });
            continue;
        }
        let mut s = Subject::of_vm(&c, vi);
        s.source = None;
        match choose(&c, &s, MoveKind::Start, &vm.preferred_owners, fit) {
            Ok((ni, aa)) => {
                plan.restarts.push(Restart {
                    vm: vm.id.clone(),
                    node: c.nodes[ni].node.id,
                    priority: vm.restart_priority,
                    anti_affinity_violation: aa,
                });
                c.move_vm(vi, ni);
            }
            Err(rejections) => plan.not_restarted.push(NotRestarted {
                vm: vm.id.clone(),
                priority: vm.restart_priority,
                reasons: rejections.into_iter().flat_map(|r| r.reasons).collect(),
            }),
        }
    }
    Ok(plan)
}

/// New owner for an off VM (no resources needed): an Up node other than `exclude`, without an anti-affinity
/// conflict if possible, preferred owners first, then the lowest id.
pub(crate) fn choose_owner(
    c: &Cluster<'_>,
    vi: usize,
    exclude: usize,
) -> Option<(usize, Option<Reason>)> {
    let vm = c.vms[vi];
    let s = Subject::of_vm(c, vi);
    let order = vm
        .preferred_owners
        .iter()
        .filter_map(|&p| c.node_index(p))
        .chain(0..c.nodes.len())
        .filter(|&n| n != exclude && c.is_up(n));
    let mut fallback = None;
    for n in order {
        match anti_affinity_conflict(c, &s, n) {
            None => return Some((n, None)),
            Some((class, other)) if fallback.is_none() => {
                fallback = Some((
                    n,
                    Some(Reason::AntiAffinity {
                        node: c.nodes[n].node.id,
                        class: class.to_owned(),
                        other_vm: c.vms[other].id.clone(),
                    }),
                ));
            }
            Some(_) => {}
        }
    }
    fallback
}

/// "Not up" reasons for every node but `exclude`.
pub(crate) fn no_up_node(c: &Cluster<'_>, exclude: usize) -> Vec<Reason> {
    (0..c.nodes.len())
        .filter(|&n| n != exclude)
        .map(|n| Reason::NodeNotUp {
            node: c.nodes[n].node.id,
            state: c.nodes[n].node.state,
        })
        .collect()
}
