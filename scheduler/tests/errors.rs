//! Bad input gets a typed error naming what is wrong; nothing panics.

use std::error::Error as _;

use scheduler::{
    balance, drain, failback, failover, place, why_not, ClusterSnapshot, CpuVendor, Migration,
    Node, NodeId, NodeState, PlanError, SnapshotError, Subnet, Vm, VmId, VmRequest,
};

fn node(id: u64, state: NodeState) -> Node {
    Node {
        id: NodeId(id),
        state,
        cpus_logical: 8,
        memory_mib: 16_384,
        reserved_memory_mib: 1_024,
        cpu_vendor: CpuVendor::Intel,
        cpu_features: Default::default(),
        management_subnet: "10.0.1.0/24".parse().unwrap(),
        migration_subnet: "10.0.2.0/24".parse().unwrap(),
        power: Default::default(),
        migration_bandwidth_mib_per_s: 1_000,
        migration_overhead_ms: 0,
        networks: Default::default(),
    }
}

fn vm(id: &str, node: u64) -> Vm {
    Vm {
        id: VmId::new(id),
        vcpus: 2,
        memory_mib: 1_024,
        node: NodeId(node),
        state: Default::default(),
        restart_priority: Default::default(),
        anti_affinity: Default::default(),
        preferred_owners: vec![],
        dirty_rate_mib_per_s: 0,
        live_migratable: true,
        cpu_features: Default::default(),
        networks: Default::default(),
        cpu_demand_millicores: None,
        memory_touched_mib: None,
        moved_at_ms: None,
    }
}

fn snap() -> ClusterSnapshot {
    ClusterSnapshot {
        nodes: vec![
            node(1, NodeState::Up),
            node(2, NodeState::Up),
            node(3, NodeState::Down),
        ],
        vms: vec![vm("a", 1), vm("b", 3)],
        migrations: vec![],
        policy: Default::default(),
    }
}

fn invalid(mut f: impl FnMut(&mut ClusterSnapshot)) -> SnapshotError {
    let mut s = snap();
    f(&mut s);
    let e = s.validate().expect_err("snapshot must be rejected");
    // Every entry point refuses it the same way.
    assert_eq!(
        drain(&s, NodeId(1), 0),
        Err(PlanError::InvalidSnapshot(e.clone()))
    );
    assert_eq!(balance(&s, 0), Err(PlanError::InvalidSnapshot(e.clone())));
    e
}

#[test]
fn inconsistent_snapshots_are_named() {
    assert_eq!(
        invalid(|s| s.nodes.push(node(1, NodeState::Up))),
        SnapshotError::DuplicateNode(NodeId(1))
    );
    assert_eq!(
        invalid(|s| s.vms.push(vm("a", 2))),
        SnapshotError::DuplicateVm(VmId::new("a"))
    );
    assert_eq!(
        invalid(|s| s.vms.push(vm("c", 9))),
        SnapshotError::VmOnUnknownNode {
            vm: VmId::new("c"),
            node: NodeId(9)
        }
    );
    assert_eq!(
        invalid(|s| s.nodes[0].memory_mib = 0),
        SnapshotError::EmptyNode(NodeId(1))
    );
    assert!(matches!(
        invalid(|s| s.nodes[0].reserved_memory_mib = 16_384),
        SnapshotError::ReservedTooLarge {
            node: NodeId(1),
            ..
        }
    ));
    assert_eq!(
        invalid(|s| s.nodes[1].migration_bandwidth_mib_per_s = 0),
        SnapshotError::ZeroBandwidth(NodeId(2))
    );
    assert_eq!(
        invalid(|s| s.vms[0].vcpus = 0),
        SnapshotError::EmptyVm(VmId::new("a"))
    );
    assert_eq!(
        invalid(|s| s.policy.max_live_migrations_per_node = 0),
        SnapshotError::BadMigrationLimit(0)
    );
    assert!(matches!(
        invalid(|s| s.policy.memory_overcommit_percent = 0),
        SnapshotError::BadOvercommit {
            name: "memory_overcommit_percent",
            value: 0
        }
    ));
    assert_eq!(
        invalid(|s| s.policy.balance_margin_bp = 10_000),
        SnapshotError::BadMargin(10_000)
    );
    for (what, f) in [
        (
            "policy migration_cost_bp_per_s",
            Box::new(|s: &mut ClusterSnapshot| s.policy.migration_cost_bp_per_s = 10_001)
                as Box<dyn Fn(&mut ClusterSnapshot)>,
        ),
        (
            "policy min_dwell_ms",
            Box::new(|s: &mut ClusterSnapshot| s.policy.min_dwell_ms = u64::MAX),
        ),
        (
            "VM a cpu_demand_millicores",
            Box::new(|s: &mut ClusterSnapshot| s.vms[0].cpu_demand_millicores = Some(u64::MAX)),
        ),
        (
            "VM a memory_touched_mib",
            Box::new(|s: &mut ClusterSnapshot| s.vms[0].memory_touched_mib = Some(u64::MAX)),
        ),
    ] {
        match invalid(&*f) {
            SnapshotError::OutOfRange { what: w, .. } => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
    let mig = |vm: &str, from, to| Migration {
        vm: VmId::new(vm),
        from: NodeId(from),
        to: NodeId(to),
        expected_end_ms: 5,
    };
    assert_eq!(
        invalid(|s| s.migrations.push(mig("zz", 1, 2))),
        SnapshotError::MigrationOfUnknownVm(VmId::new("zz"))
    );
    assert!(matches!(
        invalid(|s| s.migrations.push(mig("a", 2, 1))),
        SnapshotError::MigrationMismatch { .. }
    ));
    assert!(matches!(
        invalid(|s| s.migrations.push(mig("a", 1, 1))),
        SnapshotError::MigrationMismatch { .. }
    ));
    assert!(matches!(
        invalid(|s| s.migrations.push(mig("a", 1, 7))),
        SnapshotError::MigrationMismatch { .. }
    ));
    assert_eq!(
        invalid(|s| {
            s.migrations.push(mig("a", 1, 2));
            s.migrations.push(mig("a", 1, 2));
        }),
        SnapshotError::DuplicateMigration(VmId::new("a"))
    );
}

#[test]
fn error_chain_names_the_cause_once() {
    let mut s = snap();
    s.vms.push(vm("a", 1));
    let e = drain(&s, NodeId(1), 0).unwrap_err();
    assert_eq!(e.to_string(), "the cluster snapshot is inconsistent");
    assert_eq!(
        e.source().unwrap().to_string(),
        "VM a appears more than once"
    );
}

#[test]
fn requests_against_wrong_nodes_or_vms_are_refused() {
    let s = snap();
    assert_eq!(
        drain(&s, NodeId(9), 0),
        Err(PlanError::UnknownNode(NodeId(9)))
    );
    assert!(matches!(
        drain(&s, NodeId(3), 0),
        Err(PlanError::WrongNodeState {
            node: NodeId(3),
            state: NodeState::Down,
            ..
        })
    ));
    let e = failover(&s, NodeId(1)).unwrap_err();
    assert!(matches!(
        e,
        PlanError::WrongNodeState {
            state: NodeState::Up,
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        "node 1 is up; failover needs a node that is down"
    );
    assert!(matches!(
        failback(&s, NodeId(3), &[], 0),
        Err(PlanError::WrongNodeState { .. })
    ));
    assert_eq!(
        failback(&s, NodeId(1), &[VmId::new("nope")], 0),
        Err(PlanError::UnknownVm(VmId::new("nope")))
    );
    assert_eq!(
        why_not(&s, &VmId::new("nope"), NodeId(1)),
        Err(PlanError::UnknownVm(VmId::new("nope")))
    );
    assert_eq!(
        why_not(&s, &VmId::new("a"), NodeId(9)),
        Err(PlanError::UnknownNode(NodeId(9)))
    );
}

#[test]
fn placement_requests_are_checked() {
    let s = snap();
    let req = |id: &str, mem| VmRequest {
        id: VmId::new(id),
        vcpus: 1,
        memory_mib: mem,
        anti_affinity: Default::default(),
        preferred_owners: vec![],
        cpu_vendor: None,
        cpu_features: Default::default(),
        networks: Default::default(),
    };
    assert_eq!(
        place(&s, &req("a", 1)),
        Err(PlanError::VmExists(VmId::new("a")))
    );
    assert_eq!(
        place(&s, &req("new", 0)),
        Err(PlanError::EmptyRequest(VmId::new("new")))
    );
    let e = place(&s, &req("new", 1 << 20)).unwrap_err();
    assert_eq!(e.to_string(), "no node can host VM new");
    let why = e.source().unwrap().to_string();
    assert!(
        why.contains("node 1 has 14336 MiB of memory free and the VM needs 1048576 MiB"),
        "{why}"
    );
    assert!(why.contains("node 3 is down and takes no new VMs"), "{why}");
    let mut amd = req("amd", 512);
    amd.cpu_vendor = Some(CpuVendor::Amd);
    let e = place(&s, &amd).unwrap_err();
    assert!(e
        .source()
        .unwrap()
        .to_string()
        .contains("node 1 has Intel CPUs and the VM needs AMD"));
}

#[test]
fn subnets_parse_strictly() {
    let ok: Subnet = "10.0.2.0/24".parse().unwrap();
    assert_eq!(ok.to_string(), "10.0.2.0/24");
    assert!(ok.contains("10.0.2.77".parse().unwrap()));
    assert!(!ok.contains("10.0.3.1".parse().unwrap()));
    for bad in [
        "10.0.2.0",
        "10.0.2.0/33",
        "10.0.2.1/24",
        "10.0.2/24",
        "x/8",
        "10.0.2.0/-1",
    ] {
        let e = bad.parse::<Subnet>().expect_err(bad);
        assert!(e.to_string().contains(bad), "{e}");
    }
    // Through serde too, with the field named.
    let e = toml::from_str::<Node>(
        r#"id = 1
state = "up"
cpus_logical = 8
memory_mib = 1024
cpu_vendor = "intel"
management_subnet = "10.0.1.0/24"
migration_subnet = "10.0.2.5/24"
migration_bandwidth_mib_per_s = 10
"#,
    )
    .unwrap_err();
    assert!(e.to_string().contains("host bits"), "{e}");
}

#[test]
fn unknown_fields_are_rejected() {
    let e = toml::from_str::<scheduler::Policy>("max_live_migrations_per_nod = 2").unwrap_err();
    assert!(e.to_string().contains("max_live_migrations_per_nod"), "{e}");
}

/// A drain's moves take the nodes' measured migration overhead on top of moving memory:
/// the larger of the two ends'.
#[test]
fn drain_moves_include_the_measured_overhead() {
    let plain = drain(&snap(), NodeId(1), 0).expect("plan");
    let mut s = snap();
    s.nodes[0].migration_overhead_ms = 150;
    s.nodes[1].migration_overhead_ms = 400;
    let slow = drain(&s, NodeId(1), 0).expect("plan");
    assert_eq!(
        slow.finish_ms,
        plain.finish_ms + 400,
        "{plain:?} vs {slow:?}"
    );
}
