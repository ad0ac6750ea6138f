//! Benchmark: 16 nodes × 2,000 VMs with measured demand. Prints plan computation times (against the cost of
//! merely validating the snapshot, measured in the same run), drain makespan against the link lower bound
//! Σ memory / bandwidth, balancing results against a lower bound on the best achievable maximum utilisation, and a
//! simulated day: a diurnal demand trace with noise through the even policy every 5 minutes, against the same
//! trace with balancing off (the baseline); and a simulated day of power saving on a CPU-bound cluster: the
//! power-saving policy puts emptied hosts in standby and wakes them under pressure (as the agent's power controller
//! does), reported as host-hours in standby against the ideal (the fewest hosts that carry the demand at the fill
//! level plus the N+1 reserve, never fewer than a Raft majority plus one).
//!
//! Run: `cargo run --release -p scheduler --bin scheduler-bench [-- iterations]`

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use scheduler::{
    balance, drain, failover, power_pressure, Aggressiveness, BalanceMode, ClusterSnapshot,
    CpuVendor, Node, NodeId, NodeState, Policy, PowerPolicy, RestartPriority, Vm, VmId, VmState,
};

const NODES: u64 = 16;
const VMS: u64 = 2_000;
const NODE_MEMORY_MIB: u64 = 1_048_576;
const RESERVED_MIB: u64 = 16_384;
const BANDWIDTH_MIB_PER_S: u64 = 1_200;

/// splitmix64, so the cluster is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Nodes 1-8 Intel on 10.0.2.0/24, 9-16 AMD on 10.0.3.0/24; node loads skewed from ~35 % to ~85 %.
fn cluster(balance: BalanceMode, limit: u32) -> ClusterSnapshot {
    cluster_with(balance, limit, Aggressiveness::Medium)
}

fn cluster_with(
    balance: BalanceMode,
    limit: u32,
    aggressiveness: Aggressiveness,
) -> ClusterSnapshot {
    let mut r = Rng(42);
    let nodes: Vec<Node> = (1..=NODES)
        .map(|i| Node {
            id: NodeId(i),
            state: NodeState::Up,
            cpus_logical: 192,
            memory_mib: NODE_MEMORY_MIB,
            reserved_memory_mib: RESERVED_MIB,
            cpu_vendor: if i <= 8 {
                CpuVendor::Intel
            } else {
                CpuVendor::Amd
            },
            cpu_features: ["aes", "avx2"].iter().map(|s| s.to_string()).collect(),
            management_subnet: "10.0.1.0/24".parse().expect("valid subnet"),
            migration_subnet: if i <= 8 { "10.0.2.0/24" } else { "10.0.3.0/24" }
                .parse()
                .expect("valid subnet"),
            power: PowerPolicy::MayPowerOff,
            migration_bandwidth_mib_per_s: BANDWIDTH_MIB_PER_S,
            migration_overhead_ms: 0,
            networks: Default::default(),
        })
        .collect();
    let usable = NODE_MEMORY_MIB - RESERVED_MIB;
    // Target load per node: 35 % .. 85 %.
    let target: Vec<u64> = (0..NODES)
        .map(|i| usable * (35 + (i * 7) % 51) / 100)
        .collect();
    let mut used = vec![0u64; NODES as usize];
    let mut vms = Vec::new();
    let sizes = [1_024, 2_048, 4_096, 4_096, 8_192, 8_192];
    for k in 0..VMS {
        let memory_mib = sizes[r.below(sizes.len() as u64) as usize];
        // Node with the largest remaining gap to its target load.
        let n = (0..NODES as usize)
            .max_by_key(|&i| {
                (
                    i128::from(target[i]) - i128::from(used[i]),
                    std::cmp::Reverse(i),
                )
            })
            .unwrap_or(0);
        used[n] += memory_mib;
        let mut anti_affinity = std::collections::BTreeSet::new();
        if r.below(100) < 5 {
            anti_affinity.insert(format!("class-{}", r.below(20)));
        }
        let vcpus = 1 + r.below(4) as u32;
        // Measured demand: each vCPU 0-100 % busy, 25-100 % of memory touched.
        let cpu_demand_millicores = Some(r.below(u64::from(vcpus) * 1000 + 1));
        let memory_touched_mib = Some(memory_mib / 4 + r.below(memory_mib * 3 / 4 + 1));
        vms.push(Vm {
            id: VmId(format!("vm-{k:04}")),
            vcpus,
            memory_mib,
            node: NodeId(n as u64 + 1),
            state: VmState::Running,
            restart_priority: [
                RestartPriority::High,
                RestartPriority::Medium,
                RestartPriority::Low,
            ][r.below(3) as usize],
            anti_affinity,
            preferred_owners: Vec::new(),
            dirty_rate_mib_per_s: r.below(40),
            live_migratable: r.below(100) >= 2,
            cpu_features: ["aes"].iter().map(|s| s.to_string()).collect(),
            networks: Default::default(),
            cpu_demand_millicores,
            memory_touched_mib,
            moved_at_ms: None,
        });
    }
    ClusterSnapshot {
        nodes,
        vms,
        migrations: Vec::new(),
        policy: Policy {
            max_live_migrations_per_node: limit,
            balance,
            aggressiveness,
            ..Policy::default()
        },
    }
}

/// Median and minimum of `iters` runs of `f`.
fn time<T>(iters: u32, mut f: impl FnMut() -> T) -> (Duration, Duration, T) {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..iters {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    times.sort();
    (
        times[times.len() / 2],
        times[0],
        last.expect("at least one iteration"),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Demand load of every node in basis points (the crate's definition, computed here independently): the higher
/// of Σ CPU demand / (logical CPUs × 1000) and Σ touched memory / usable memory.
fn loads_bp(snap: &ClusterSnapshot) -> Vec<u64> {
    snap.nodes
        .iter()
        .map(|n| {
            let (mut cpu, mut mem) = (0u64, 0u64);
            for v in snap.vms.iter().filter(|v| v.node == n.id) {
                cpu += v.cpu_demand_mc();
                mem += v.memory_demand_mib();
            }
            let usable = (n.memory_mib - n.reserved_memory_mib)
                * u64::from(snap.policy.memory_overcommit_percent)
                / 100;
            (cpu * 10_000 / (u64::from(n.cpus_logical) * 1000)).max(mem * 10_000 / usable)
        })
        .collect()
}

/// Demand multiplier (per mille) of a VM of `group` at minute `m` of the day: a smooth daily curve peaking at the
/// group's hour (office 14:00, web 20:00, batch 02:00), between 20 % and 100 % of the VM's peak demand.
fn diurnal_permille(group: u64, m: u64) -> u64 {
    let peak_min = [14 * 60, 20 * 60, 2 * 60][group as usize % 3];
    let phase = (m as f64 - peak_min as f64) / 1440.0 * std::f64::consts::TAU;
    (200.0 + 800.0 * (0.5 + 0.5 * phase.cos())).round() as u64
}

/// Results of one simulated day.
struct Day {
    migrations: usize,
    moved_gib: u64,
    /// Node-minutes with load above 100 % (demand beyond the node's CPUs or memory).
    over_full_node_min: u64,
    /// Node-minutes with load above 80 %.
    over_80_node_min: u64,
    /// Highest load any node reached.
    max_load_bp: u64,
    plan_ms: Vec<f64>,
}

/// Runs a day of 5-minute steps: each VM's demand is its peak × its group's diurnal curve × ±10 % noise; with
/// `mode` even, the balancer runs every step and its moves are applied (arrival time recorded for the dwell time).
fn simulate_day(mode: BalanceMode) -> Day {
    let mut snap = cluster_with(mode, 1, Aggressiveness::Medium);
    // Peak demand per VM and its group; groups skewed by node so that the nodes' loads drift apart over the day.
    let mut r = Rng(7);
    let peaks: Vec<(u64, u64)> = snap
        .vms
        .iter()
        .map(|v| {
            let peak = u64::from(v.vcpus) * (500 + r.below(501));
            let group = if r.below(100) < 70 {
                (v.node.0 - 1) % 3
            } else {
                r.below(3)
            };
            (peak, group)
        })
        .collect();
    let mut day = Day {
        migrations: 0,
        moved_gib: 0,
        over_full_node_min: 0,
        over_80_node_min: 0,
        max_load_bp: 0,
        plan_ms: Vec::new(),
    };
    const STEP_MIN: u64 = 5;
    for step in 0..(1440 / STEP_MIN) {
        let minute = step * STEP_MIN;
        let now_ms = minute * 60_000;
        for (v, &(peak, group)) in snap.vms.iter_mut().zip(&peaks) {
            let noise = 900 + r.below(201); // ±10 %
            v.cpu_demand_millicores =
                Some(peak * diurnal_permille(group, minute) / 1000 * noise / 1000);
        }
        if mode != BalanceMode::None {
            let t = Instant::now();
            let plan = balance(&snap, now_ms).expect("balance plans");
            day.plan_ms.push(ms(t.elapsed()));
            day.migrations += plan.moves_count;
            day.moved_gib += plan.moved_memory_mib / 1024;
            for (vm, to) in plan.new_owners() {
                if let Some(v) = snap.vms.iter_mut().find(|v| v.id == vm) {
                    v.node = to;
                    v.moved_at_ms = Some(now_ms);
                }
            }
        }
        for l in loads_bp(&snap) {
            day.max_load_bp = day.max_load_bp.max(l);
            if l > 10_000 {
                day.over_full_node_min += STEP_MIN;
            }
            if l > 8_000 {
                day.over_80_node_min += STEP_MIN;
            }
        }
    }
    day
}

/// Results of one simulated day of power saving.
struct PowerDay {
    migrations: usize,
    standby_host_min: u64,
    ideal_standby_host_min: u64,
    /// Host-minutes above the fill level plus the margin (what wakes a host).
    over_target_host_min: u64,
    /// Steps (5 min) that ended with the N+1 reserve short.
    reserve_short_steps: u64,
    standbys: u64,
    wakes: u64,
}

/// A day of 5-minute steps on a CPU-bound cluster (16 hosts × 48 CPUs, 320 VMs of 2 vCPUs whose demand follows
/// one office-hours curve with ±10 % noise) under the power-saving policy, acting as the agent's power controller
/// does (`cluster-agent/src/control/power.rs`): pressure (reserve short or a host past the fill level) wakes a
/// rested standby host; the balancer's moves are applied every step (relieving hot hosts first) and, when it has
/// none and there is no pressure, one empty host it names (rested, leaving a Raft majority plus one awake) goes to
/// standby.
fn simulate_power_day() -> PowerDay {
    const HOSTS: u64 = 16;
    const CPUS: u32 = 48;
    const VMS_PER_HOST: u64 = 20;
    let nodes: Vec<Node> = (1..=HOSTS)
        .map(|i| Node {
            id: NodeId(i),
            state: NodeState::Up,
            cpus_logical: CPUS,
            memory_mib: 262_144,
            reserved_memory_mib: RESERVED_MIB,
            cpu_vendor: CpuVendor::Intel,
            cpu_features: ["aes"].iter().map(|s| s.to_string()).collect(),
            management_subnet: "10.0.1.0/24".parse().expect("valid subnet"),
            migration_subnet: "10.0.2.0/24".parse().expect("valid subnet"),
            power: PowerPolicy::MayPowerOff,
            migration_bandwidth_mib_per_s: BANDWIDTH_MIB_PER_S,
            migration_overhead_ms: 0,
            networks: Default::default(),
        })
        .collect();
    let vms: Vec<Vm> = (0..HOSTS * VMS_PER_HOST)
        .map(|k| Vm {
            id: VmId(format!("vm-{k:04}")),
            vcpus: 2,
            memory_mib: 4_096,
            node: NodeId(k % HOSTS + 1),
            state: VmState::Running,
            restart_priority: RestartPriority::Medium,
            anti_affinity: Default::default(),
            preferred_owners: Vec::new(),
            dirty_rate_mib_per_s: 10,
            live_migratable: true,
            cpu_features: ["aes"].iter().map(|s| s.to_string()).collect(),
            networks: Default::default(),
            cpu_demand_millicores: Some(0),
            memory_touched_mib: Some(1_024),
            moved_at_ms: None,
        })
        .collect();
    let mut snap = ClusterSnapshot {
        nodes,
        vms,
        migrations: Vec::new(),
        policy: Policy {
            max_live_migrations_per_node: 1,
            balance: BalanceMode::PowerSaving,
            aggressiveness: Aggressiveness::Medium,
            ..Policy::default()
        },
    };
    let fill_bp = u64::from(snap.policy.aggressiveness.consolidation_fill_bp());
    let limit_bp = fill_bp + u64::from(snap.policy.balance_margin_bp);
    let dwell = snap.policy.min_dwell_ms;
    let min_awake = HOSTS / 2 + 2;
    let mut since = vec![0u64; HOSTS as usize];
    let mut r = Rng(11);
    let mut day = PowerDay {
        migrations: 0,
        standby_host_min: 0,
        ideal_standby_host_min: 0,
        over_target_host_min: 0,
        reserve_short_steps: 0,
        standbys: 0,
        wakes: 0,
    };
    const STEP_MIN: u64 = 5;
    for step in 0..(1440 / STEP_MIN) {
        let minute = step * STEP_MIN;
        let now_ms = minute * 60_000;
        for v in snap.vms.iter_mut() {
            let noise = 900 + r.below(201);
            v.cpu_demand_millicores =
                Some(2_000 * diurnal_permille(0, minute) / 1000 * noise / 1000 * 9 / 10);
        }
        let rested = |since: &[u64], i: usize| now_ms.saturating_sub(since[i]) >= dwell;
        let awake = snap
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .count() as u64;
        // The power controller: pressure wakes a rested standby host.
        let pressure = power_pressure(&snap).expect("pressure judged").is_some();
        if pressure {
            if let Some(i) = (0..snap.nodes.len())
                .find(|&i| snap.nodes[i].state == NodeState::Down && rested(&since, i))
            {
                snap.nodes[i].state = NodeState::Up;
                since[i] = now_ms;
                day.wakes += 1;
            }
        }
        // The balancer's round: relieve hot hosts, else pack; with nothing to move and no
        // pressure, one empty host it names goes to standby.
        let plan = balance(&snap, now_ms).expect("balance plans");
        day.migrations += plan.moves_count;
        for (vm, to) in plan.new_owners() {
            if let Some(v) = snap.vms.iter_mut().find(|v| v.id == vm) {
                v.node = to;
                v.moved_at_ms = Some(now_ms);
            }
        }
        if !pressure && plan.moves_count == 0 && awake > min_awake {
            if let Some(i) = plan
                .empty_nodes_may_power_off
                .iter()
                .map(|id| (id.0 - 1) as usize)
                .find(|&i| rested(&since, i))
            {
                snap.nodes[i].state = NodeState::Down;
                since[i] = now_ms;
                day.standbys += 1;
            }
        }
        // After the step: what the day is judged by.
        let standby = snap
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Down)
            .count() as u64;
        day.standby_host_min += standby * STEP_MIN;
        let demand_mc: u64 = snap.vms.iter().map(|v| v.cpu_demand_mc()).sum();
        let per_host_mc = u64::from(CPUS) * 1000 * fill_bp / 10_000;
        let needed = (demand_mc.div_ceil(per_host_mc) + 1).max(min_awake);
        day.ideal_standby_host_min += HOSTS.saturating_sub(needed) * STEP_MIN;
        let loads = loads_bp(&snap);
        for (n, l) in snap.nodes.iter().zip(&loads) {
            if n.state == NodeState::Up && *l > limit_bp {
                day.over_target_host_min += STEP_MIN;
            }
        }
        if power_pressure(&snap)
            .expect("pressure judged")
            .is_some_and(|why| why.contains("reserve"))
        {
            day.reserve_short_steps += 1;
        }
    }
    day
}

/// Lower bound on the best maximum utilisation reachable by live migration: each (vendor, migration subnet)
/// group can at best spread its load evenly, and no node sheds VMs that cannot live-migrate.
fn util_lower_bound_bp(snap: &ClusterSnapshot) -> u64 {
    let usable = |n: &Node| {
        (n.memory_mib - n.reserved_memory_mib) * u64::from(snap.policy.memory_overcommit_percent)
            / 100
    };
    let mut groups: BTreeMap<(CpuVendor, String), (u64, u64)> = BTreeMap::new();
    let mut pinned: BTreeMap<NodeId, u64> = BTreeMap::new();
    for n in &snap.nodes {
        let g = groups
            .entry((n.cpu_vendor, n.migration_subnet.to_string()))
            .or_default();
        g.1 += usable(n);
    }
    for v in &snap.vms {
        let n = snap
            .nodes
            .iter()
            .find(|n| n.id == v.node)
            .expect("VM on a known node");
        groups
            .get_mut(&(n.cpu_vendor, n.migration_subnet.to_string()))
            .expect("group exists")
            .0 += v.memory_mib;
        if !v.live_migratable {
            *pinned.entry(n.id).or_default() += v.memory_mib;
        }
    }
    let even = groups
        .values()
        .map(|&(u, c)| u * 10_000 / c)
        .max()
        .unwrap_or(0);
    let pinned_max = snap
        .nodes
        .iter()
        .map(|n| pinned.get(&n.id).copied().unwrap_or(0) * 10_000 / usable(n))
        .max()
        .unwrap_or(0);
    even.max(pinned_max)
}

fn main() {
    let iters: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    println!(
        "scheduler-bench: {NODES} nodes x {VMS} VMs, {iters} iterations per figure (median / min)"
    );

    let snap = cluster(BalanceMode::EvenDistribution, 1);
    let (med, min, _) = time(iters, || snap.validate());
    println!(
        "baseline   validate snapshot only        {:>8.3} ms / {:>8.3} ms",
        ms(med),
        ms(min)
    );

    // Drain the most loaded node.
    let heaviest = (1..=NODES)
        .map(NodeId)
        .max_by_key(|&id| {
            (
                snap.vms
                    .iter()
                    .filter(|v| v.node == id)
                    .map(|v| v.memory_mib)
                    .sum::<u64>(),
                std::cmp::Reverse(id),
            )
        })
        .expect("nodes exist");
    for limit in [1, 2] {
        let s = cluster(BalanceMode::EvenDistribution, limit);
        let (med, min, plan) = time(iters, || drain(&s, heaviest, 0).expect("drain plans"));
        let live = plan
            .moves()
            .filter(|m| m.kind == scheduler::MoveKind::Live)
            .count();
        let quick = plan.moves().count() - live;
        let bound = plan.lower_bound_ms.max(1);
        println!(
            "drain      {heaviest} (limit {limit})          {:>8.3} ms / {:>8.3} ms   moves {} ({} live, {} quick), {} unmovable, {} waves",
            ms(med), ms(min), plan.moves().count(), live, quick, plan.unmovable.len(), plan.waves.len()
        );
        let live_mib: u64 = plan
            .moves()
            .filter(|m| m.kind == scheduler::MoveKind::Live)
            .map(|m| {
                s.vms
                    .iter()
                    .find(|v| v.id == m.vm)
                    .map_or(0, |v| v.memory_mib)
            })
            .sum();
        let live_ms: u64 = plan
            .moves()
            .filter(|m| m.kind == scheduler::MoveKind::Live)
            .map(|m| m.duration_ms())
            .sum();
        let live_bound = live_mib * 1000 / BANDWIDTH_MIB_PER_S;
        println!(
            "           makespan {:.1} s, lower bound Σmem/bw {:.1} s, ratio {:.3} (live moves alone: {:.3}; quick moves cost 2·m/b by model)",
            (plan.finish_ms as f64) / 1000.0,
            bound as f64 / 1000.0,
            plan.finish_ms as f64 / bound as f64,
            live_ms as f64 / live_bound.max(1) as f64
        );
    }

    // Failover of the most loaded node.
    let mut down = snap.clone();
    if let Some(n) = down.nodes.iter_mut().find(|n| n.id == heaviest) {
        n.state = NodeState::Down;
    }
    let (med, min, plan) = time(iters, || failover(&down, heaviest).expect("failover plans"));
    println!(
        "failover   {heaviest}                    {:>8.3} ms / {:>8.3} ms   restarts {}, refused {}",
        ms(med),
        ms(min),
        plan.restarts.len(),
        plan.not_restarted.len()
    );

    let lb = util_lower_bound_bp(&snap);
    println!(
        "           (balance figures: load = the higher of CPU demand and touched memory over capacity; the lower bound is on memory alone)"
    );
    for (mode, aggr, name) in [
        (
            BalanceMode::EvenDistribution,
            Aggressiveness::Low,
            "even (low, spread 30 %)",
        ),
        (
            BalanceMode::EvenDistribution,
            Aggressiveness::Medium,
            "even (medium, 20 %)",
        ),
        (
            BalanceMode::EvenDistribution,
            Aggressiveness::High,
            "even (high, 10 %)",
        ),
        (
            BalanceMode::PowerSaving,
            Aggressiveness::Medium,
            "power saving (80 %)",
        ),
        (
            BalanceMode::PowerSaving,
            Aggressiveness::High,
            "power saving (90 %)",
        ),
    ] {
        let s = cluster_with(mode, 1, aggr);
        let (med, min, plan) = time(iters, || balance(&s, 0).expect("balance plans"));
        println!(
            "balance    {name:<22}    {:>8.3} ms / {:>8.3} ms   moves {}, moved {} GiB, max util {:.1} % -> {:.1} % (lower bound {:.1} %), spread {:.1} -> {:.1} pts, nodes that may power off {}",
            ms(med),
            ms(min),
            plan.moves_count,
            plan.moved_memory_mib / 1024,
            plan.max_util_before_bp as f64 / 100.0,
            plan.max_util_after_bp as f64 / 100.0,
            lb as f64 / 100.0,
            plan.spread_before_bp as f64 / 100.0,
            plan.spread_after_bp as f64 / 100.0,
            plan.empty_nodes_may_power_off.len()
        );
        if mode == BalanceMode::PowerSaving {
            let fill = u128::from(aggr.consolidation_fill_bp());
            let cap = u128::from(NODE_MEMORY_MIB - RESERVED_MIB);
            let mut group_used: BTreeMap<CpuVendor, u128> = BTreeMap::new();
            let mut pinned_nodes = std::collections::BTreeSet::new();
            for v in &s.vms {
                let n = s.nodes.iter().find(|n| n.id == v.node).expect("known node");
                *group_used.entry(n.cpu_vendor).or_default() += u128::from(v.memory_mib);
                if !v.live_migratable {
                    pinned_nodes.insert(v.node);
                }
            }
            let need: u128 = group_used
                .values()
                .map(|&u| (u * 10_000).div_ceil(fill * cap))
                .sum();
            println!(
                "           nodes left running {}, lower bound {} (= max of capacity bound {} and {} nodes holding a VM that cannot live-migrate)",
                NODES as usize - plan.empty_nodes_may_power_off.len(),
                need.max(pinned_nodes.len() as u128),
                need,
                pinned_nodes.len()
            );
        }
    }

    // A simulated day, balancing off (baseline) and on.
    for (mode, name) in [
        (BalanceMode::None, "baseline: no balancing"),
        (BalanceMode::EvenDistribution, "even (medium)"),
    ] {
        let d = simulate_day(mode);
        let mut t = d.plan_ms.clone();
        t.sort_by(f64::total_cmp);
        let (med, max) = (
            t.get(t.len() / 2).copied().unwrap_or(0.0),
            t.last().copied().unwrap_or(0.0),
        );
        println!(
            "day        {name:<24}  migrations {}, moved {} GiB, node-minutes above 100 % load {}, above 80 % {}, highest load {:.1} %, plan {:.3} ms median / {:.3} ms max",
            d.migrations,
            d.moved_gib,
            d.over_full_node_min,
            d.over_80_node_min,
            d.max_load_bp as f64 / 100.0,
            med,
            max
        );
    }

    let p = simulate_power_day();
    println!(
        "day        power saving (medium, 80 %)  migrations {}, standby {} / wake {}, host-hours in standby {:.1} vs ideal {:.1} ({:.0} %), host-minutes above the fill level + margin {}, steps with the N+1 reserve short {}",
        p.migrations,
        p.standbys,
        p.wakes,
        p.standby_host_min as f64 / 60.0,
        p.ideal_standby_host_min as f64 / 60.0,
        p.standby_host_min as f64 * 100.0 / p.ideal_standby_host_min.max(1) as f64,
        p.over_target_host_min,
        p.reserve_short_steps
    );
}
