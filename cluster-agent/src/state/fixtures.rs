//! Cluster-state fixtures for unit tests and the `vms-bench` binary: nodes registered
//! with loopback addresses (127.0.1.`id` management and Raft, 127.0.2.`id` migration).
//! No I/O; nothing outside tests and benches uses them.

use crate::state::{ClusterState, Command, NodeFacts, NodeRegistration};

/// Node `id`'s loopback registration with `facts`.
pub fn registration(id: u64, facts: NodeFacts) -> NodeRegistration {
    NodeRegistration {
        trust: Default::default(),
        node_id: id,
        name: format!("n{id}"),
        mgmt_addr: format!("127.0.1.{id}:7001"),
        raft_addr: format!("127.0.1.{id}:7002"),
        migration_addr: format!("127.0.2.{id}:7003"),
        mgmt_subnet: "127.0.1.0/24".into(),
        migration_subnet: "127.0.2.0/24".into(),
        facts,
        networks: Default::default(),
        power: Default::default(),
    }
}

/// An AMD host with `logical_cpus` and `memory_bytes`.
pub fn amd(logical_cpus: u32, memory_bytes: u64) -> NodeFacts {
    NodeFacts {
        cpu_vendor: "AuthenticAMD".into(),
        logical_cpus,
        memory_bytes,
        ..NodeFacts::default()
    }
}

/// A state with nodes `1..=n` registered at time 1, node `id` with `facts(id)`.
pub fn cluster(n: u64, facts: impl Fn(u64) -> NodeFacts) -> ClusterState {
    let mut s = ClusterState::default();
    for id in 1..=n {
        s.apply(&Command::RegisterNode {
            registration: registration(id, facts(id)),
            at_unix_ms: 1,
        });
    }
    s
}
