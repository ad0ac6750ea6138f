//! Scenario tests: readable cluster descriptions in `testdata/*.toml` with the expected outcomes in the same file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use scheduler::{
    balance, drain, failback, failover, place, why_not, ClusterSnapshot, MoveKind, NodeId,
    NodeState, PlanError, VmId, VmRequest,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    description: String,
    cluster: ClusterSnapshot,
    #[serde(default)]
    expect: Expect,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    why_not: Vec<WhyNot>,
    drain: Option<DrainExpect>,
    failover: Option<FailoverExpect>,
    balance: Option<BalanceExpect>,
    #[serde(default)]
    place: Vec<PlaceExpect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhyNot {
    vm: String,
    node: u64,
    rules: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainExpect {
    node: u64,
    now_ms: u64,
    unmovable: Vec<String>,
    #[serde(default)]
    unmovable_rules: BTreeMap<String, Vec<String>>,
    quick: Vec<String>,
    anti_affinity_violations: Vec<String>,
    #[serde(default)]
    targets: BTreeMap<String, Vec<u64>>,
    /// Node id → no migration touching it may start before this time.
    #[serde(default)]
    never_before_ms: BTreeMap<String, u64>,
    /// VMs the failback after the drain brings home.
    failback: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailoverExpect {
    node: u64,
    restarted: Vec<String>,
    #[serde(default)]
    restarted_on: BTreeMap<String, u64>,
    not_restarted: Vec<String>,
    #[serde(default)]
    not_restarted_rules: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    ownership: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceExpect {
    moves: usize,
    moved_memory_mib: Option<u64>,
    #[serde(default)]
    empty_nodes_may_power_off: Vec<u64>,
    max_util_after_bp_at_most: Option<u64>,
    #[serde(default)]
    targets: BTreeMap<String, Vec<u64>>,
    second_run_moves: Option<usize>,
    /// Why the plan stopped (`BalanceStop`'s tag: balanced, gain_below_cost, no_allowed_move, ...).
    stop: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlaceExpect {
    request: VmRequest,
    node: Option<u64>,
    #[serde(default)]
    refused_rules: Vec<String>,
}

fn load(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let s: Scenario = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(!s.description.is_empty());
    s.cluster
        .validate()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    s
}

fn ids(v: &[String]) -> Vec<VmId> {
    v.iter().map(VmId::new).collect()
}

fn codes(reasons: &[scheduler::Reason]) -> Vec<String> {
    reasons.iter().map(|r| r.code().to_string()).collect()
}

fn run(name: &str) {
    let s = load(name);
    let snap = &s.cluster;
    for w in &s.expect.why_not {
        let got = why_not(snap, &VmId::new(&w.vm), NodeId(w.node)).unwrap();
        assert_eq!(
            codes(&got),
            w.rules,
            "{name}: why not {} on node {}: {got:?}",
            w.vm,
            w.node
        );
        for r in &got {
            assert!(!r.to_string().is_empty());
        }
    }
    if let Some(d) = &s.expect.drain {
        let plan = drain(snap, NodeId(d.node), d.now_ms).unwrap();
        let mut unmovable: Vec<String> = plan.unmovable.iter().map(|u| u.vm.0.clone()).collect();
        unmovable.sort();
        let mut want = d.unmovable.clone();
        want.sort();
        assert_eq!(unmovable, want, "{name}: unmovable {:?}", plan.unmovable);
        for (vm, rules) in &d.unmovable_rules {
            let u = plan
                .unmovable
                .iter()
                .find(|u| &u.vm.0 == vm)
                .expect("listed unmovable");
            for rule in rules {
                assert!(
                    codes(&u.reasons).contains(rule),
                    "{name}: {vm} lacks {rule}: {:?}",
                    u.reasons
                );
            }
        }
        let mut quick: Vec<String> = plan
            .moves()
            .filter(|m| m.kind == MoveKind::Quick)
            .map(|m| m.vm.0.clone())
            .collect();
        quick.sort();
        assert_eq!(quick, d.quick, "{name}: quick migrations");
        let mut aa: Vec<String> = plan
            .moves()
            .filter(|m| m.anti_affinity_violation.is_some())
            .map(|m| m.vm.0.clone())
            .collect();
        aa.sort();
        assert_eq!(
            aa, d.anti_affinity_violations,
            "{name}: anti-affinity violations"
        );
        for (vm, allowed) in &d.targets {
            let m = plan
                .moves()
                .find(|m| &m.vm.0 == vm)
                .unwrap_or_else(|| panic!("{name}: {vm} not moved"));
            assert!(allowed.contains(&m.to.0), "{name}: {vm} went to {}", m.to);
        }
        for (node, t) in &d.never_before_ms {
            let n = NodeId(node.parse().unwrap());
            for m in plan.moves().filter(|m| m.from == n || m.to == n) {
                assert!(
                    m.start_ms >= *t,
                    "{name}: {} touches {n} at {}",
                    m.vm,
                    m.start_ms
                );
            }
        }
        // Default limit 1: the drained node is in every move, so moves never overlap.
        if snap.policy.max_live_migrations_per_node == 1 {
            let moves: Vec<_> = plan.moves().collect();
            for w in moves.windows(2) {
                assert!(
                    w[0].end_ms <= w[1].start_ms,
                    "{name}: overlapping moves from the drained node"
                );
            }
        }
        common::check_timeline(snap, &plan.waves, d.now_ms).unwrap();
        for m in plan.moves() {
            common::check_move_rules(snap, m).unwrap();
        }
        if let Some(back) = &d.failback {
            let moves: Vec<(VmId, NodeId)> = plan.moves().map(|m| (m.vm.clone(), m.to)).collect();
            let mut after = common::apply(snap, &moves);
            after
                .nodes
                .iter_mut()
                .find(|n| n.id == NodeId(d.node))
                .unwrap()
                .state = NodeState::Up;
            let fb = failback(&after, NodeId(d.node), &plan.moved_vms(), plan.finish_ms).unwrap();
            let mut got: Vec<String> = fb.moves().map(|m| m.vm.0.clone()).collect();
            got.sort();
            assert_eq!(&got, back, "{name}: failback {fb:?}");
            assert!(fb
                .moves()
                .all(|m| m.to == NodeId(d.node) && m.start_ms >= plan.finish_ms));
        }
    }
    if let Some(f) = &s.expect.failover {
        let plan = failover(snap, NodeId(f.node)).unwrap();
        let got: Vec<VmId> = plan.restarts.iter().map(|r| r.vm.clone()).collect();
        assert_eq!(got, ids(&f.restarted), "{name}: restarts {plan:?}");
        let got: Vec<VmId> = plan.not_restarted.iter().map(|r| r.vm.clone()).collect();
        assert_eq!(got, ids(&f.not_restarted), "{name}: not restarted {plan:?}");
        for (vm, node) in &f.restarted_on {
            let r = plan.restarts.iter().find(|r| &r.vm.0 == vm).unwrap();
            assert_eq!(
                r.node,
                NodeId(*node),
                "{name}: {vm} restarted on {}",
                r.node
            );
        }
        for (vm, rules) in &f.not_restarted_rules {
            let r = plan.not_restarted.iter().find(|r| &r.vm.0 == vm).unwrap();
            for rule in rules {
                assert!(
                    codes(&r.reasons).contains(rule),
                    "{name}: {vm} lacks {rule}: {:?}",
                    r.reasons
                );
            }
        }
        for (vm, node) in &f.ownership {
            let o = plan.ownership_moves.iter().find(|o| &o.vm.0 == vm).unwrap();
            assert_eq!(o.to, NodeId(*node));
        }
    }
    if let Some(b) = &s.expect.balance {
        let plan = balance(snap, 0).unwrap();
        assert_eq!(plan.moves_count, b.moves, "{name}: {plan:#?}");
        if let Some(m) = b.moved_memory_mib {
            assert_eq!(plan.moved_memory_mib, m);
        }
        let want: Vec<NodeId> = b
            .empty_nodes_may_power_off
            .iter()
            .map(|&n| NodeId(n))
            .collect();
        assert_eq!(plan.empty_nodes_may_power_off, want, "{name}: empty nodes");
        if let Some(max) = b.max_util_after_bp_at_most {
            assert!(
                plan.max_util_after_bp <= max,
                "{name}: max util after {}",
                plan.max_util_after_bp
            );
        }
        for (vm, allowed) in &b.targets {
            let m = plan
                .moves()
                .find(|m| &m.vm.0 == vm)
                .unwrap_or_else(|| panic!("{name}: {vm} not moved"));
            assert!(allowed.contains(&m.to.0), "{name}: {vm} went to {}", m.to);
        }
        assert!(
            plan.spread_after_bp <= plan.spread_before_bp
                || snap.policy.balance != scheduler::BalanceMode::EvenDistribution
        );
        if let Some(stop) = &b.stop {
            let got = serde_json::to_value(&plan.stopped).unwrap();
            assert_eq!(got["stop"], stop.as_str(), "{name}: stopped {got}");
        }
        if let Some(n) = b.second_run_moves {
            let moves: Vec<(VmId, NodeId)> = plan.moves().map(|m| (m.vm.clone(), m.to)).collect();
            let again = balance(&common::apply(snap, &moves), 0).unwrap();
            assert_eq!(again.moves_count, n, "{name}: second run {again:#?}");
        }
    }
    for p in &s.expect.place {
        match (place(snap, &p.request), p.node) {
            (Ok(got), Some(want)) => assert_eq!(got.node, NodeId(want), "{name}: {}", p.request.id),
            (Err(PlanError::NoNode(refusal)), None) => {
                let all: Vec<String> = refusal
                    .rejections
                    .iter()
                    .flat_map(|r| codes(&r.reasons))
                    .collect();
                for rule in &p.refused_rules {
                    assert!(
                        all.contains(rule),
                        "{name}: refusal lacks {rule}: {refusal}"
                    );
                }
            }
            (got, want) => panic!("{name}: {}: got {got:?}, want node {want:?}", p.request.id),
        }
    }
}

#[test]
fn mixed_vendor_16_node_cluster() {
    run("mixed16.toml");
}

#[test]
fn failover_admission_control() {
    run("failover_admission.toml");
}

#[test]
fn drain_with_anti_affinity_conflict_then_failback() {
    run("drain_anti_affinity.toml");
}

#[test]
fn power_saving_consolidation() {
    run("power_saving.toml");
}

#[test]
fn power_saving_keeps_a_failover_reserve() {
    run("power_saving_reserve.toml");
}

#[test]
fn even_distribution_smallest_sufficient_move() {
    run("even_distribution.toml");
}

#[test]
fn even_distribution_spreads_cpu_demand() {
    run("even_cpu_demand.toml");
}

#[test]
fn even_distribution_gain_below_cost() {
    run("even_gain_below_cost.toml");
}

#[test]
fn drain_prefers_anti_affinity_over_live_migration() {
    run("drain_prefers_separation.toml");
}

#[test]
fn networks_limit_placement_failover_drain_and_why_not() {
    run("networks.toml");
}
