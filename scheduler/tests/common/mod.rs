//! Shared test support: a seeded random cluster generator and an independent plan checker that re-derives every
//! rule from the snapshot (it does not call the crate's own rule code).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

use scheduler::{
    Aggressiveness, BalanceMode, ClusterSnapshot, CpuVendor, Migration, MoveKind, Node, NodeId,
    NodeState, PlannedMove, Policy, PowerPolicy, RestartPriority, Vm, VmId, VmState, Wave,
};

/// splitmix64: a tiny deterministic PRNG so a proptest seed fully determines a cluster.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const FEATURES: [&str; 4] = ["aes", "avx2", "avx512f", "sha"];
/// VM network names nodes may have.
pub const NETWORKS: [&str; 2] = ["lan", "dmz"];

pub fn usable_mem(n: &Node, p: &Policy) -> u64 {
    ((n.memory_mib - n.reserved_memory_mib) as u128 * p.memory_overcommit_percent as u128 / 100)
        as u64
}

pub fn usable_vcpus(n: &Node, p: &Policy) -> u64 {
    n.cpus_logical as u64 * p.cpu_overcommit_percent as u64 / 100
}

/// A random but consistent cluster: VMs only where they fit, in-flight migrations with room reserved.
pub fn random_cluster(seed: u64) -> ClusterSnapshot {
    let mut r = Rng::new(seed);
    let policy = Policy {
        max_live_migrations_per_node: 1 + r.below(3) as u32,
        cpu_overcommit_percent: r.pick(&[100, 200, 400]),
        memory_overcommit_percent: r.pick(&[100, 100, 120]),
        balance: r.pick(&[
            BalanceMode::None,
            BalanceMode::EvenDistribution,
            BalanceMode::PowerSaving,
        ]),
        aggressiveness: r.pick(&[
            Aggressiveness::Low,
            Aggressiveness::Medium,
            Aggressiveness::High,
        ]),
        balance_margin_bp: r.pick(&[200, 500, 1000]),
        migration_cost_bp_per_s: r.pick(&[0, 10, 100, 1000]),
        min_dwell_ms: r.pick(&[0, 60_000]),
    };
    let n_nodes = 2 + r.below(7);
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        let state = match r.below(10) {
            0 => NodeState::Paused,
            1 => NodeState::Down,
            _ => NodeState::Up,
        };
        let features = FEATURES
            .iter()
            .filter(|_| r.chance(70))
            .map(|s| s.to_string())
            .collect();
        let subnet = r.below(2);
        nodes.push(Node {
            id: NodeId(10 + i * 3),
            state,
            cpus_logical: r.pick(&[8, 16, 32]),
            memory_mib: r.pick(&[16_384, 32_768, 65_536]),
            reserved_memory_mib: r.pick(&[0, 1024, 2048]),
            cpu_vendor: if r.chance(70) {
                CpuVendor::Intel
            } else {
                CpuVendor::Amd
            },
            cpu_features: features,
            management_subnet: "10.1.0.0/16".parse().unwrap(),
            migration_subnet: format!("10.2.{subnet}.0/24").parse().unwrap(),
            power: if r.chance(50) {
                PowerPolicy::MayPowerOff
            } else {
                PowerPolicy::AlwaysOn
            },
            migration_bandwidth_mib_per_s: r.pick(&[500, 1000, 2000]),
            migration_overhead_ms: 0,
            networks: NETWORKS
                .iter()
                .filter(|_| r.chance(80))
                .map(|s| s.to_string())
                .collect(),
        });
    }
    let mut mem_used: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut cpu_used: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut vms = Vec::new();
    let n_vms = r.below(45);
    for i in 0..n_vms {
        let node = &nodes[r.below(n_nodes) as usize];
        let memory_mib = r.pick(&[512, 1024, 2048, 4096, 8192]);
        let vcpus = 1 + r.below(8) as u32;
        let state = if r.chance(90) {
            VmState::Running
        } else {
            VmState::Off
        };
        if state == VmState::Running {
            let m = mem_used.entry(node.id).or_default();
            let c = cpu_used.entry(node.id).or_default();
            if *m + memory_mib > usable_mem(node, &policy)
                || *c + vcpus as u64 > usable_vcpus(node, &policy)
            {
                continue;
            }
            *m += memory_mib;
            *c += vcpus as u64;
        }
        let mut anti_affinity = BTreeSet::new();
        if r.chance(30) {
            anti_affinity.insert(r.pick(&["db", "web", "dc"]).to_string());
        }
        let preferred_owners = (0..r.below(3))
            .map(|_| nodes[r.below(n_nodes) as usize].id)
            .collect();
        let cpu_features = node
            .cpu_features
            .iter()
            .filter(|_| r.chance(50))
            .cloned()
            .collect();
        let networks = node
            .networks
            .iter()
            .filter(|_| r.chance(40))
            .cloned()
            .collect();
        vms.push(Vm {
            id: VmId(format!("vm-{i:03}")),
            vcpus,
            memory_mib,
            node: node.id,
            state,
            restart_priority: r.pick(&[
                RestartPriority::High,
                RestartPriority::Medium,
                RestartPriority::Low,
                RestartPriority::None,
            ]),
            anti_affinity,
            preferred_owners,
            dirty_rate_mib_per_s: r.pick(&[0, 10, 50, 200, 3000]),
            live_migratable: r.chance(90),
            cpu_features,
            networks,
            // Measured demand (sometimes above what the VM can use, sometimes not measured yet).
            cpu_demand_millicores: r.chance(80).then(|| r.below(u64::from(vcpus) * 1100 + 1)),
            memory_touched_mib: r.chance(80).then(|| r.below(memory_mib * 11 / 10 + 1)),
            moved_at_ms: r.chance(20).then(|| r.below(120_000)),
        });
    }
    // A few in-flight migrations between Up nodes, with room reserved on the target.
    let mut migrations = Vec::new();
    for vm in &vms {
        if vm.state != VmState::Running || !r.chance(10) {
            continue;
        }
        let to = &nodes[r.below(n_nodes) as usize];
        if to.id == vm.node || to.state != NodeState::Up {
            continue;
        }
        let m = mem_used.entry(to.id).or_default();
        let c = cpu_used.entry(to.id).or_default();
        if *m + vm.memory_mib > usable_mem(to, &policy)
            || *c + vm.vcpus as u64 > usable_vcpus(to, &policy)
        {
            continue;
        }
        let busy = |id: NodeId| {
            migrations
                .iter()
                .filter(|m: &&Migration| m.from == id || m.to == id)
                .count()
        };
        if busy(vm.node) >= policy.max_live_migrations_per_node as usize
            || busy(to.id) >= policy.max_live_migrations_per_node as usize
        {
            continue;
        }
        *m += vm.memory_mib;
        *c += vm.vcpus as u64;
        migrations.push(Migration {
            vm: vm.id.clone(),
            from: vm.node,
            to: to.id,
            expected_end_ms: 1_000 + r.below(60_000),
        });
    }
    let snap = ClusterSnapshot {
        nodes,
        vms,
        migrations,
        policy,
    };
    snap.validate().expect("generator makes valid snapshots");
    snap
}

/// The snapshot with the given VMs moved (in-flight migrations of moved VMs dropped).
pub fn apply(snap: &ClusterSnapshot, moves: &[(VmId, NodeId)]) -> ClusterSnapshot {
    let mut s = snap.clone();
    for (vm, to) in moves {
        s.vms
            .iter_mut()
            .find(|v| &v.id == vm)
            .expect("moved VM exists")
            .node = *to;
    }
    s.migrations
        .retain(|m| !moves.iter().any(|(v, _)| v == &m.vm));
    s
}

pub fn node(snap: &ClusterSnapshot, id: NodeId) -> &Node {
    snap.nodes.iter().find(|n| n.id == id).expect("node exists")
}

pub fn vm<'a>(snap: &'a ClusterSnapshot, id: &VmId) -> &'a Vm {
    snap.vms.iter().find(|v| &v.id == id).expect("vm exists")
}

/// Memory/vCPUs used per node: running VMs at their owner plus in-flight reservations at targets.
pub fn usage(snap: &ClusterSnapshot) -> BTreeMap<NodeId, (u64, u64)> {
    let mut u: BTreeMap<NodeId, (u64, u64)> = BTreeMap::new();
    for v in snap.vms.iter().filter(|v| v.state == VmState::Running) {
        let e = u.entry(v.node).or_default();
        e.0 += v.memory_mib;
        e.1 += v.vcpus as u64;
    }
    for m in &snap.migrations {
        let v = vm(snap, &m.vm);
        if v.state == VmState::Running {
            let e = u.entry(m.to).or_default();
            e.0 += v.memory_mib;
            e.1 += v.vcpus as u64;
        }
    }
    u
}

/// Checks that no node that received a VM in `after` is over its capacity.
pub fn check_capacity(after: &ClusterSnapshot, received: &BTreeSet<NodeId>) -> Result<(), String> {
    for (id, (mem, cpu)) in usage(after) {
        if !received.contains(&id) {
            continue;
        }
        let n = node(after, id);
        if mem > usable_mem(n, &after.policy) || cpu > usable_vcpus(n, &after.policy) {
            return Err(format!("{id} over capacity: {mem} MiB / {cpu} vCPUs"));
        }
    }
    Ok(())
}

/// Checks one migration's static rules against the snapshot it starts from.
pub fn check_move_rules(before: &ClusterSnapshot, m: &PlannedMove) -> Result<(), String> {
    let v = vm(before, &m.vm);
    if v.node != m.from {
        return Err(format!(
            "{} moved from {} but is on {}",
            m.vm, m.from, v.node
        ));
    }
    if before.migrations.iter().any(|x| x.vm == m.vm) {
        return Err(format!("{} is already migrating", m.vm));
    }
    let (src, dst) = (node(before, m.from), node(before, m.to));
    if dst.state != NodeState::Up {
        return Err(format!("{} moved to {} which is {}", m.vm, m.to, dst.state));
    }
    if src.cpu_vendor != dst.cpu_vendor {
        return Err(format!("{} crosses CPU vendors", m.vm));
    }
    if !v.cpu_features.is_subset(&dst.cpu_features) {
        return Err(format!(
            "{} lands on {} lacking its CPU features",
            m.vm, m.to
        ));
    }
    if !v.networks.is_subset(&dst.networks) {
        return Err(format!("{} lands on {} lacking its networks", m.vm, m.to));
    }
    if v.state != VmState::Running {
        return Err(format!("{} is off but migrated", m.vm));
    }
    match m.kind {
        MoveKind::Live => {
            if src.migration_subnet != dst.migration_subnet {
                return Err(format!("{} live-migrates across subnets", m.vm));
            }
            if !v.live_migratable {
                return Err(format!("{} is not live-migratable", m.vm));
            }
            if !m.why_not_live.is_empty() {
                return Err(format!("{} is live but carries why_not_live", m.vm));
            }
        }
        MoveKind::Quick => {
            if m.why_not_live.is_empty() {
                return Err(format!("{} is quick without saying why not live", m.vm));
            }
        }
        MoveKind::Start => return Err(format!("{} planned as a start", m.vm)),
    }
    if m.end_ms <= m.start_ms {
        return Err(format!("{} has an empty interval", m.vm));
    }
    Ok(())
}

/// Checks the timeline: per-node concurrent migrations (with in-flight ones) never exceed the limit, and waves
/// are well formed (one start time, no node more than `limit` times).
pub fn check_timeline(before: &ClusterSnapshot, waves: &[Wave], now_ms: u64) -> Result<(), String> {
    let limit = before.policy.max_live_migrations_per_node as usize;
    let mut intervals: Vec<(NodeId, u64, u64)> = Vec::new();
    for m in &before.migrations {
        if m.expected_end_ms > now_ms {
            intervals.push((m.from, now_ms, m.expected_end_ms));
            intervals.push((m.to, now_ms, m.expected_end_ms));
        }
    }
    let mut last_start = None;
    for w in waves {
        if last_start.is_some_and(|s| s >= w.start_ms) {
            return Err("waves not in strictly increasing start order".into());
        }
        last_start = Some(w.start_ms);
        if w.start_ms < now_ms {
            return Err("wave starts before now".into());
        }
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for m in &w.moves {
            if m.start_ms != w.start_ms || m.end_ms > w.end_ms {
                return Err(format!("{} does not fit its wave", m.vm));
            }
            *per_node.entry(m.from).or_default() += 1;
            *per_node.entry(m.to).or_default() += 1;
            intervals.push((m.from, m.start_ms, m.end_ms));
            intervals.push((m.to, m.start_ms, m.end_ms));
        }
        if let Some((n, k)) = per_node.iter().find(|(_, &k)| k > limit) {
            return Err(format!(
                "{n} appears {k} times in the wave at {}",
                w.start_ms
            ));
        }
    }
    // Sweep: at every interval start, count overlapping intervals per node.
    for &(n, s, _) in &intervals {
        let k = intervals
            .iter()
            .filter(|&&(n2, s2, e2)| n2 == n && s2 <= s && s < e2)
            .count();
        if k > limit {
            return Err(format!("{n} is in {k} migrations at {s}, limit {limit}"));
        }
    }
    Ok(())
}

/// Pairs of VMs sharing an anti-affinity class on one node.
pub fn anti_affinity_pairs(snap: &ClusterSnapshot) -> BTreeSet<(VmId, VmId)> {
    let mut out = BTreeSet::new();
    for a in &snap.vms {
        for b in &snap.vms {
            if a.id < b.id && a.node == b.node && !a.anti_affinity.is_disjoint(&b.anti_affinity) {
                out.insert((a.id.clone(), b.id.clone()));
            }
        }
    }
    out
}

/// Demand load of Up nodes, basis points, computed independently of the crate: the higher of Σ CPU demand /
/// (logical CPUs × 1000) and Σ memory demand / usable memory, over running VMs and incoming migrations;
/// unmeasured demand counts in full, measured demand at most in full.
pub fn loads_bp(snap: &ClusterSnapshot) -> BTreeMap<NodeId, u64> {
    let demand = |v: &Vm| {
        let cpu = v.vcpus as u64 * 1000;
        (
            v.cpu_demand_millicores.map_or(cpu, |d| d.min(cpu)),
            v.memory_touched_mib
                .map_or(v.memory_mib, |m| m.min(v.memory_mib)),
        )
    };
    let mut d: BTreeMap<NodeId, (u64, u64)> = BTreeMap::new();
    let holders = snap
        .vms
        .iter()
        .filter(|v| v.state == VmState::Running)
        .map(|v| (v.node, v))
        .chain(
            snap.migrations
                .iter()
                .map(|m| (m.to, vm(snap, &m.vm)))
                .filter(|(_, v)| v.state == VmState::Running),
        );
    for (n, v) in holders {
        let (c, m) = demand(v);
        let e = d.entry(n).or_default();
        e.0 += c;
        e.1 += m;
    }
    snap.nodes
        .iter()
        .filter(|n| n.state == NodeState::Up)
        .map(|n| {
            let (c, m) = d.get(&n.id).copied().unwrap_or((0, 0));
            let cpu = (c as u128 * 10_000 / (n.cpus_logical as u128 * 1000)) as u64;
            let mem = (m as u128 * 10_000 / usable_mem(n, &snap.policy) as u128) as u64;
            (n.id, cpu.max(mem))
        })
        .collect()
}

pub fn spread_bp(snap: &ClusterSnapshot) -> u64 {
    let u = loads_bp(snap);
    let max = u.values().max().copied().unwrap_or(0);
    let min = u.values().min().copied().unwrap_or(0);
    max - min
}

/// Up nodes' loads sorted high to low: the balancer's potential, which drops lexicographically with every move.
pub fn sorted_loads(snap: &ClusterSnapshot) -> Vec<u64> {
    let mut v: Vec<u64> = loads_bp(snap).into_values().collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}
