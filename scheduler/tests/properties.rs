//! Property tests over random clusters: every plan keeps every rule, plans are deterministic, drains empty the
//! node or explain what is left, balancing never widens the spread and converges.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use scheduler::{
    balance, drain, failback, failover, place, why_not, why_not_quick, BalanceMode, BalanceStop,
    ClusterSnapshot, MoveKind, NodeId, NodeState, PlanError, RestartPriority, VmId, VmRequest,
    VmState,
};

fn config() -> ProptestConfig {
    // PROPTEST_CASES overrides the default of 256 cases.
    let base = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_some() {
        base
    } else {
        ProptestConfig { cases: 256, ..base }
    }
}

fn drainable(snap: &ClusterSnapshot, pick: u64) -> Option<NodeId> {
    let ids: Vec<NodeId> = snap
        .nodes
        .iter()
        .filter(|n| n.state != NodeState::Down)
        .map(|n| n.id)
        .collect();
    (!ids.is_empty()).then(|| ids[(pick % ids.len() as u64) as usize])
}

/// Reversed node and VM lists: same cluster, different input order.
fn reordered(snap: &ClusterSnapshot) -> ClusterSnapshot {
    let mut s = snap.clone();
    s.nodes.reverse();
    s.vms.reverse();
    s.migrations.reverse();
    s
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn drain_keeps_every_rule_and_empties_or_explains(seed in any::<u64>(), pick in any::<u64>(), now in 0u64..30_000) {
        let snap = random_cluster(seed);
        let Some(target) = drainable(&snap, pick) else { return Ok(()) };
        let plan = drain(&snap, target, now).expect("drain of an up/paused node plans");
        let mut moves = Vec::new();
        let mut received = BTreeSet::new();
        for m in plan.moves() {
            prop_assert_eq!(m.from, target);
            check_move_rules(&snap, m).map_err(TestCaseError::fail)?;
            moves.push((m.vm.clone(), m.to));
            received.insert(m.to);
        }
        check_timeline(&snap, &plan.waves, now).map_err(TestCaseError::fail)?;
        for o in &plan.ownership_moves {
            prop_assert!(o.to != target);
            prop_assert_eq!(node(&snap, o.to).state, NodeState::Up);
            moves.push((o.vm.clone(), o.to));
        }
        let after = apply(&snap, &moves);
        check_capacity(&after, &received).map_err(TestCaseError::fail)?;
        // Every VM on the node is moved, re-owned or explained; nothing twice.
        let mut seen = BTreeSet::new();
        for v in plan.moves().map(|m| &m.vm).chain(plan.ownership_moves.iter().map(|o| &o.vm)) {
            prop_assert!(seen.insert(v.clone()), "{} planned twice", v);
        }
        for u in &plan.unmovable {
            prop_assert!(!u.reasons.is_empty(), "{} left without a reason", u.vm);
            prop_assert!(seen.insert(u.vm.clone()), "{} both moved and unmovable", u.vm);
        }
        let on_node: BTreeSet<VmId> = snap.vms.iter().filter(|v| v.node == target).map(|v| v.id.clone()).collect();
        prop_assert_eq!(seen, on_node);
        let incoming: Vec<VmId> = snap.migrations.iter().filter(|m| m.to == target).map(|m| m.vm.clone()).collect();
        let mut got = plan.incoming_in_flight.clone();
        got.sort();
        let mut want = incoming;
        want.sort();
        prop_assert_eq!(got, want);
        // Anti-affinity: any new co-location is flagged on one of the moves that made it.
        let flagged: BTreeSet<VmId> = plan.moves().filter(|m| m.anti_affinity_violation.is_some()).map(|m| m.vm.clone())
            .chain(plan.ownership_moves.iter().filter(|o| o.anti_affinity_violation.is_some()).map(|o| o.vm.clone()))
            .collect();
        let before_pairs = anti_affinity_pairs(&snap);
        for (a, b) in anti_affinity_pairs(&after) {
            if !before_pairs.contains(&(a.clone(), b.clone())) {
                prop_assert!(flagged.contains(&a) || flagged.contains(&b), "{} and {} put together silently", a, b);
            }
        }
        // The makespan is never below the link-bound lower bound.
        let slack = plan.moves().count() as u64;
        prop_assert!(plan.finish_ms - now + slack >= plan.lower_bound_ms);
        prop_assert!(plan.moves().all(|m| m.end_ms <= plan.finish_ms));
        // Finish soonest: with the default limit the drained node is in every move, so without in-flight
        // migrations it is never idle — the makespan is exactly the sum of the move estimates.
        if snap.migrations.is_empty() && snap.policy.max_live_migrations_per_node == 1 {
            let total: u64 = plan.moves().map(|m| m.duration_ms()).sum();
            prop_assert_eq!(plan.finish_ms - now, total);
        }
    }

    #[test]
    fn plans_are_deterministic_and_independent_of_input_order(seed in any::<u64>(), pick in any::<u64>()) {
        let snap = random_cluster(seed);
        let other = reordered(&snap);
        if let Some(n) = drainable(&snap, pick) {
            let a = drain(&snap, n, 5).unwrap();
            prop_assert_eq!(&a, &drain(&snap, n, 5).unwrap());
            prop_assert_eq!(&a, &drain(&other, n, 5).unwrap());
        }
        let b = balance(&snap, 5).unwrap();
        if snap.policy.balance == BalanceMode::None {
            prop_assert_eq!(b.moves_count, 0);
            prop_assert!(b.empty_nodes_may_power_off.is_empty());
        }
        prop_assert_eq!(&b, &balance(&other, 5).unwrap());
        for n in snap.nodes.iter().filter(|n| n.state == NodeState::Down) {
            prop_assert_eq!(failover(&snap, n.id).unwrap(), failover(&other, n.id).unwrap());
        }
        // Plans survive serialisation unchanged (they are stored in Raft).
        let json = serde_json::to_string(&b).unwrap();
        prop_assert_eq!(b, serde_json::from_str(&json).unwrap());
    }

    #[test]
    fn failover_restarts_in_priority_order_within_capacity(seed in any::<u64>(), pick in any::<u64>()) {
        let mut snap = random_cluster(seed);
        let i = (pick % snap.nodes.len() as u64) as usize;
        let down = snap.nodes[i].id;
        snap.nodes[i].state = NodeState::Down;
        snap.migrations.retain(|m| m.from != down && m.to != down);
        let plan = failover(&snap, down).unwrap();
        let mut moves = Vec::new();
        let mut received = BTreeSet::new();
        let mut last = RestartPriority::High;
        for r in &plan.restarts {
            prop_assert!(r.priority >= last, "restart order not by priority");
            last = r.priority;
            prop_assert!(r.priority != RestartPriority::None);
            prop_assert_eq!(node(&snap, r.node).state, NodeState::Up);
            prop_assert_eq!(vm(&snap, &r.vm).node, down);
            prop_assert!(vm(&snap, &r.vm).networks.is_subset(&node(&snap, r.node).networks), "{} restarted without its networks", r.vm);
            moves.push((r.vm.clone(), r.node));
            received.insert(r.node);
        }
        for o in &plan.ownership_moves {
            prop_assert_eq!(vm(&snap, &o.vm).state, VmState::Off);
            moves.push((o.vm.clone(), o.to));
        }
        check_capacity(&apply(&snap, &moves), &received).map_err(TestCaseError::fail)?;
        let on_node: BTreeSet<VmId> = snap.vms.iter().filter(|v| v.node == down).map(|v| v.id.clone()).collect();
        let mut covered = BTreeSet::new();
        for v in plan.restarts.iter().map(|r| &r.vm)
            .chain(plan.not_restarted.iter().map(|n| &n.vm))
            .chain(plan.ownership_moves.iter().map(|o| &o.vm))
        {
            prop_assert!(covered.insert(v.clone()), "{} listed twice", v);
        }
        prop_assert_eq!(covered, on_node);
        for n in &plan.not_restarted {
            prop_assert!(!n.reasons.is_empty());
            // Admission control: a refused VM was ruled out by a hard rule, not only by anti-affinity.
            prop_assert!(n.priority == RestartPriority::None || n.reasons.iter().any(|r| r.is_hard()));
        }
    }

    #[test]
    fn even_balancing_never_widens_spread_and_converges(seed in any::<u64>()) {
        let mut snap = random_cluster(seed);
        snap.policy.balance = BalanceMode::EvenDistribution;
        let now = 100_000;
        let mut seen: BTreeSet<Vec<(VmId, NodeId)>> = BTreeSet::new();
        let mut loads = sorted_loads(&snap);
        for round in 0..20 {
            let plan = balance(&snap, now).unwrap();
            prop_assert_eq!(plan.spread_before_bp, spread_bp(&snap));
            prop_assert!(plan.spread_after_bp <= plan.spread_before_bp, "spread grew: {:?}", plan);
            // Every step gains more than it costs, keeps the margin, and the stop reason is true.
            let target = u64::from(snap.policy.aggressiveness.imbalance_target_bp());
            for st in &plan.steps {
                prop_assert!(st.gain_bp > st.cost_bp, "{:?}", st);
                prop_assert_eq!(st.gain_bp, st.from_load_bp.0 - st.from_load_bp.1.max(st.to_load_bp.1));
                let margin = u64::from(snap.policy.balance_margin_bp);
                prop_assert!(st.to_load_bp.1 + margin <= st.from_load_bp.0 && st.from_load_bp.1 >= st.to_load_bp.0 + margin, "{:?}", st);
            }
            match &plan.stopped {
                BalanceStop::Balanced { spread_bp, .. } => prop_assert!(*spread_bp <= target),
                BalanceStop::GainBelowCost { gain_bp, cost_bp, .. } => prop_assert!(gain_bp <= cost_bp),
                BalanceStop::NoAllowedMove { spread_bp, .. } => prop_assert!(*spread_bp > target),
                other => prop_assert!(false, "unexpected stop {:?}", other),
            }
            if plan.moves_count == 0 {
                prop_assert!(round <= 1, "balancing needed {} runs to settle", round);
                return Ok(());
            }
            // A VM moves at most once per plan, and never one still in its dwell time.
            let vms: BTreeSet<&VmId> = plan.moves().map(|m| &m.vm).collect();
            prop_assert_eq!(vms.len(), plan.moves_count);
            let mut moves = Vec::new();
            let mut received = BTreeSet::new();
            for m in plan.moves() {
                prop_assert_eq!(m.kind, MoveKind::Live);
                prop_assert!(m.anti_affinity_violation.is_none());
                check_move_rules(&snap, m).map_err(TestCaseError::fail)?;
                let v = vm(&snap, &m.vm);
                prop_assert!(v.moved_at_ms.is_none_or(|t| now >= t + snap.policy.min_dwell_ms), "{} moved within its dwell time", m.vm);
                moves.push((m.vm.clone(), m.to));
                received.insert(m.to);
            }
            check_timeline(&snap, &plan.waves, now).map_err(TestCaseError::fail)?;
            let after = apply(&snap, &moves);
            check_capacity(&after, &received).map_err(TestCaseError::fail)?;
            prop_assert_eq!(plan.spread_after_bp, spread_bp(&after));
            let new_aa = anti_affinity_pairs(&after);
            prop_assert!(new_aa.is_subset(&anti_affinity_pairs(&snap)), "balancing created an anti-affinity conflict");
            // No ping-pong: the loads sorted high to low drop lexicographically, so no placement comes back.
            let new_loads = sorted_loads(&after);
            prop_assert!(new_loads < loads, "loads did not drop: {:?} -> {:?}", loads, new_loads);
            loads = new_loads;
            let placement: Vec<(VmId, NodeId)> = after.vms.iter().map(|v| (v.id.clone(), v.node)).collect();
            prop_assert!(seen.insert(placement), "a placement came back");
            snap = after;
        }
        prop_assert!(false, "balancing did not converge in 20 runs");
    }

    #[test]
    fn power_saving_empties_named_nodes_and_converges(seed in any::<u64>()) {
        let mut snap = random_cluster(seed);
        snap.policy.balance = BalanceMode::PowerSaving;
        let mut nonempty = usize::MAX;
        for _ in 0..20 {
            let plan = balance(&snap, 0).unwrap();
            let mut moves = Vec::new();
            let mut received = BTreeSet::new();
            for m in plan.moves() {
                check_move_rules(&snap, m).map_err(TestCaseError::fail)?;
                moves.push((m.vm.clone(), m.to));
                received.insert(m.to);
            }
            check_timeline(&snap, &plan.waves, 0).map_err(TestCaseError::fail)?;
            let after = apply(&snap, &moves);
            check_capacity(&after, &received).map_err(TestCaseError::fail)?;
            prop_assert!(anti_affinity_pairs(&after).is_subset(&anti_affinity_pairs(&snap)));
            for id in &plan.empty_nodes_may_power_off {
                let n = node(&after, *id);
                prop_assert_eq!(n.state, NodeState::Up);
                prop_assert_eq!(n.power, scheduler::PowerPolicy::MayPowerOff);
                prop_assert!(after.vms.iter().all(|v| v.node != *id || v.state == VmState::Off));
            }
            // N+1: with the named nodes off, the VMs of any node left on fit in the others' free room.
            if !plan.empty_nodes_may_power_off.is_empty() {
                let u = usage(&after);
                let on: Vec<&scheduler::Node> = after
                    .nodes
                    .iter()
                    .filter(|n| n.state == NodeState::Up && !plan.empty_nodes_may_power_off.contains(&n.id))
                    .collect();
                for lost in &on {
                    let (mem, cpu) = u.get(&lost.id).copied().unwrap_or((0, 0));
                    let free = |f: &dyn Fn(&scheduler::Node) -> u64, used: &dyn Fn(NodeId) -> u64| {
                        on.iter().filter(|n| n.id != lost.id).map(|n| f(n).saturating_sub(used(n.id))).sum::<u64>()
                    };
                    let free_mem = free(&|n| usable_mem(n, &after.policy), &|id| u.get(&id).map_or(0, |x| x.0));
                    let free_cpu = free(&|n| usable_vcpus(n, &after.policy), &|id| u.get(&id).map_or(0, |x| x.1));
                    prop_assert!(mem <= free_mem && cpu <= free_cpu, "{} cannot fail over: {} MiB / {} vCPUs, free {} / {}", lost.id, mem, cpu, free_mem, free_cpu);
                }
            }
            let used: BTreeSet<NodeId> = usage(&after).into_iter().filter(|(_, u)| u.0 > 0).map(|(n, _)| n).collect();
            if plan.moves_count == 0 {
                return Ok(());
            }
            let limit = u64::from(snap.policy.aggressiveness.consolidation_fill_bp()) + u64::from(snap.policy.balance_margin_bp);
            if plan.max_util_before_bp > limit {
                // A round that relieves a node past the fill level: it spreads, never heats.
                prop_assert!(plan.max_util_after_bp <= plan.max_util_before_bp, "relieving raised the hottest node: {plan:?}");
                snap = after;
                continue;
            }
            prop_assert!(used.len() < nonempty, "consolidation did not reduce non-empty nodes");
            nonempty = used.len();
            snap = after;
        }
        prop_assert!(false, "power saving did not converge");
    }

    #[test]
    fn placement_fits_or_every_node_refuses(seed in any::<u64>(), mem in 1u64..40_000, vcpus in 1u32..40, aa in any::<bool>(), nets in 0usize..4) {
        let snap = random_cluster(seed);
        let req = VmRequest {
            id: VmId::new("new-vm"),
            vcpus,
            memory_mib: mem,
            anti_affinity: if aa { ["db".to_string()].into() } else { Default::default() },
            preferred_owners: vec![],
            cpu_vendor: None,
            cpu_features: Default::default(),
            networks: NETWORKS.iter().enumerate().filter(|(i, _)| nets & (1 << i) != 0).map(|(_, n)| n.to_string()).collect(),
        };
        let free = |id: NodeId| {
            let n = node(&snap, id);
            let u = usage(&snap).get(&id).copied().unwrap_or_default();
            (usable_mem(n, &snap.policy).saturating_sub(u.0), usable_vcpus(n, &snap.policy).saturating_sub(u.1))
        };
        match place(&snap, &req) {
            Ok(p) => {
                prop_assert_eq!(node(&snap, p.node).state, NodeState::Up);
                let (m, c) = free(p.node);
                prop_assert!(mem <= m && u64::from(vcpus) <= c);
                prop_assert!(req.networks.is_subset(&node(&snap, p.node).networks));
            }
            Err(PlanError::NoNode(refusal)) => {
                prop_assert_eq!(refusal.rejections.len(), snap.nodes.len());
                for n in &snap.nodes {
                    let (m, c) = free(n.id);
                    prop_assert!(n.state != NodeState::Up || mem > m || u64::from(vcpus) > c || !req.networks.is_subset(&n.networks), "{} could host it", n.id);
                }
                prop_assert!(!refusal.to_string().is_empty());
            }
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn why_not_empty_means_a_legal_live_move(seed in any::<u64>(), pv in any::<u64>(), pn in any::<u64>()) {
        let snap = random_cluster(seed);
        if snap.vms.is_empty() { return Ok(()) }
        let v = &snap.vms[(pv % snap.vms.len() as u64) as usize];
        let n = &snap.nodes[(pn % snap.nodes.len() as u64) as usize];
        let reasons = why_not(&snap, &v.id, n.id).unwrap();
        let src = node(&snap, v.node);
        if reasons.is_empty() {
            prop_assert_eq!(n.state, NodeState::Up);
            prop_assert!(n.id != v.node);
            prop_assert!(v.networks.is_subset(&n.networks));
            if v.state == VmState::Running && src.state != NodeState::Down {
                prop_assert_eq!(src.migration_subnet, n.migration_subnet);
                prop_assert_eq!(src.cpu_vendor, n.cpu_vendor);
                prop_assert!(v.cpu_features.is_subset(&n.cpu_features));
                prop_assert!(v.live_migratable);
            }
        } else {
            for r in &reasons {
                prop_assert!(!r.to_string().is_empty());
            }
        }
        if n.state != NodeState::Up {
            prop_assert!(reasons.iter().any(|r| r.code() == "node_not_up"));
        }
        if !v.networks.is_subset(&n.networks) {
            prop_assert!(reasons.iter().any(|r| r.code() == "missing_networks"));
        }
    }

    #[test]
    fn why_not_quick_is_the_live_rules_minus_the_live_only_ones(seed in any::<u64>(), pv in any::<u64>(), pn in any::<u64>()) {
        let snap = random_cluster(seed);
        if snap.vms.is_empty() { return Ok(()) }
        let v = &snap.vms[(pv % snap.vms.len() as u64) as usize];
        let n = &snap.nodes[(pn % snap.nodes.len() as u64) as usize];
        let quick = why_not_quick(&snap, &v.id, n.id).unwrap();
        let live = why_not(&snap, &v.id, n.id).unwrap();
        let live_only = ["subnet_mismatch", "not_live_migratable", "not_convergent"];
        // Every quick reason is also a live reason; live adds only live-only rules.
        for r in &quick {
            prop_assert!(live.iter().any(|l| l.code() == r.code()), "{} not in {:?}", r.code(), live);
            prop_assert!(!live_only.contains(&r.code()), "{}", r.code());
        }
        for l in &live {
            prop_assert!(live_only.contains(&l.code()) || quick.iter().any(|r| r.code() == l.code()), "{} missing from quick {:?}", l.code(), quick);
        }
        if quick.is_empty() {
            prop_assert_eq!(n.state, NodeState::Up);
            prop_assert!(n.id != v.node);
            let src = node(&snap, v.node);
            if v.state == VmState::Running && src.state != NodeState::Down {
                prop_assert_eq!(src.cpu_vendor, n.cpu_vendor);
                prop_assert!(v.cpu_features.is_subset(&n.cpu_features));
            }
        }
    }

    #[test]
    fn failback_returns_drained_vms_within_rules(seed in any::<u64>(), pick in any::<u64>()) {
        let snap = random_cluster(seed);
        let Some(target) = drainable(&snap, pick) else { return Ok(()) };
        let d = drain(&snap, target, 0).unwrap();
        let moves: Vec<(VmId, NodeId)> = d.moves().map(|m| (m.vm.clone(), m.to)).collect();
        let mut after = apply(&snap, &moves);
        after.nodes.iter_mut().find(|n| n.id == target).unwrap().state = NodeState::Up;
        let plan = failback(&after, target, &d.moved_vms(), d.finish_ms).unwrap();
        let mut received = BTreeSet::new();
        for m in plan.moves() {
            prop_assert_eq!(m.to, target);
            prop_assert!(m.anti_affinity_violation.is_none());
            check_move_rules(&after, m).map_err(TestCaseError::fail)?;
            received.insert(m.to);
        }
        check_timeline(&after, &plan.waves, d.finish_ms).map_err(TestCaseError::fail)?;
        let back: Vec<(VmId, NodeId)> = plan.moves().map(|m| (m.vm.clone(), m.to)).collect();
        check_capacity(&apply(&after, &back), &received).map_err(TestCaseError::fail)?;
        prop_assert_eq!(plan.moves().count() + plan.unmovable.len() + plan.ownership_moves.len(), d.moved_vms().len());
    }

    #[test]
    fn extreme_values_give_errors_or_plans_never_panics(seed in any::<u64>(), field in 0usize..8, value in prop_oneof![Just(0u64), Just(1u64), Just(u64::MAX), Just(1u64 << 40), any::<u64>()]) {
        let mut snap = random_cluster(seed);
        let v32 = u32::try_from(value).unwrap_or(u32::MAX);
        match field {
            0 => snap.nodes[0].memory_mib = value,
            1 => snap.nodes[0].reserved_memory_mib = value,
            2 => snap.nodes[0].migration_bandwidth_mib_per_s = value,
            3 => snap.nodes[0].cpus_logical = v32,
            4 => if let Some(v) = snap.vms.first_mut() { v.memory_mib = value },
            5 => if let Some(v) = snap.vms.first_mut() { v.dirty_rate_mib_per_s = value },
            6 => snap.policy.memory_overcommit_percent = v32,
            _ => snap.policy.max_live_migrations_per_node = v32,
        }
        let valid = snap.validate().is_ok();
        let first = snap.nodes[0].id;
        let results = [
            drain(&snap, first, value / 2).map(|_| ()),
            balance(&snap, value / 2).map(|_| ()),
            failover(&snap, first).map(|_| ()),
        ];
        for r in results {
            match r {
                Err(PlanError::InvalidSnapshot(_)) => prop_assert!(!valid),
                Err(PlanError::WrongNodeState { .. }) | Ok(()) => prop_assert!(valid),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }

    #[test]
    fn chained_failovers_stay_within_capacity(seed in any::<u64>(), a in any::<u64>(), b in any::<u64>()) {
        let mut snap = random_cluster(seed);
        snap.migrations.clear();
        let mut received = BTreeSet::new();
        for pick in [a, b] {
            let up: Vec<usize> = (0..snap.nodes.len()).filter(|&i| snap.nodes[i].state == NodeState::Up).collect();
            if up.is_empty() { break }
            let i = up[(pick % up.len() as u64) as usize];
            snap.nodes[i].state = NodeState::Down;
            let down = snap.nodes[i].id;
            let plan = failover(&snap, down).unwrap();
            received.extend(plan.restarts.iter().map(|r| r.node));
            received.remove(&down);
            snap = snap.with_new_owners(&plan.new_owners()).unwrap();
            prop_assert!(snap.vms.iter().filter(|v| v.node == down && v.state == VmState::Running)
                .all(|v| plan.not_restarted.iter().any(|n| n.vm == v.id)));
        }
        check_capacity(&snap, &received).map_err(TestCaseError::fail)?;
    }
}
