//! Conversions between the agent's node/cluster types and the management protobuf
//! types (errors: `api::status`).

use cluster_proto::management as pb;
use cluster_proto::times;
use tonic::Status;

use crate::state::{Event, EventKind, KvmKind, NodeFacts, NodeRecord, NodeRegistration, NodeState};

fn kvm_kind_to_pb(k: KvmKind) -> pb::KvmKind {
    match k {
        KvmKind::Hardware => pb::KvmKind::Hardware,
        KvmKind::Software => pb::KvmKind::Software,
        KvmKind::None => pb::KvmKind::None,
    }
}

pub fn node_state_to_pb(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::Up => pb::NodeState::Up,
        NodeState::Paused => pb::NodeState::Paused,
        NodeState::Down => pb::NodeState::Down,
        NodeState::Standby => pb::NodeState::Standby,
        NodeState::Waking => pb::NodeState::Waking,
    }
}

fn event_kind_to_pb(k: EventKind) -> pb::EventKind {
    match k {
        EventKind::ClusterInitialized => pb::EventKind::ClusterInitialized,
        EventKind::NodeJoined => pb::EventKind::NodeJoined,
        EventKind::NodeUpdated => pb::EventKind::NodeUpdated,
        EventKind::NodeStateChanged => pb::EventKind::NodeStateChanged,
        EventKind::NodeRemoved => pb::EventKind::NodeRemoved,
        EventKind::NodeFenced => pb::EventKind::NodeFenced,
        EventKind::Vm => pb::EventKind::Vm,
        EventKind::Job => pb::EventKind::Job,
        EventKind::Disk => pb::EventKind::Disk,
        EventKind::NodeCertificateIssued => pb::EventKind::NodeCertificateIssued,
        EventKind::CertificateRevoked => pb::EventKind::CertificateRevoked,
        EventKind::CaRotated => pb::EventKind::CaRotated,
    }
}

pub fn facts_to_pb(f: &NodeFacts) -> pb::NodeFacts {
    pb::NodeFacts {
        cpu_vendor: f.cpu_vendor.clone(),
        cpu_model: f.cpu_model.clone(),
        logical_cpus: f.logical_cpus,
        memory_bytes: f.memory_bytes,
        kvm_kind: kvm_kind_to_pb(f.kvm_kind) as i32,
        cpu_flags: f.cpu_flags.clone(),
    }
}

/// Largest number of CPU flags accepted from a joining node.
const CPU_FLAGS_MAX: usize = 1024;
const TEXT_LEN_MAX: usize = 256;

fn text(field: &str, v: &str) -> Result<String, Status> {
    if v.len() > TEXT_LEN_MAX {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the limit is {TEXT_LEN_MAX}",
            v.len()
        )));
    }
    Ok(v.to_string())
}

pub fn facts_from_pb(f: Option<&pb::NodeFacts>) -> Result<NodeFacts, Status> {
    let f =
        f.ok_or_else(|| Status::invalid_argument("facts are missing from the admit request"))?;
    let kvm_kind = match f.kvm_kind() {
        pb::KvmKind::Hardware => KvmKind::Hardware,
        pb::KvmKind::Software => KvmKind::Software,
        pb::KvmKind::None => KvmKind::None,
        pb::KvmKind::Unspecified => {
            return Err(Status::invalid_argument(format!(
            "facts.kvm_kind {} is not one of KVM_KIND_HARDWARE, KVM_KIND_SOFTWARE, KVM_KIND_NONE",
            f.kvm_kind
        )))
        }
    };
    if f.cpu_flags.len() > CPU_FLAGS_MAX {
        return Err(Status::invalid_argument(format!(
            "facts.cpu_flags has {} entries; the limit is {CPU_FLAGS_MAX}",
            f.cpu_flags.len()
        )));
    }
    Ok(NodeFacts {
        cpu_vendor: text("facts.cpu_vendor", &f.cpu_vendor)?,
        cpu_model: text("facts.cpu_model", &f.cpu_model)?,
        cpu_flags: f
            .cpu_flags
            .iter()
            .map(|s| text("facts.cpu_flags", s))
            .collect::<Result<_, _>>()?,
        logical_cpus: f.logical_cpus,
        memory_bytes: f.memory_bytes,
        kvm_kind,
    })
}

fn networks_to_pb(n: &std::collections::BTreeMap<String, String>) -> Vec<pb::VmNetwork> {
    n.iter()
        .map(|(name, bridge)| pb::VmNetwork {
            name: name.clone(),
            bridge: bridge.clone(),
        })
        .collect()
}

fn networks_from_pb(
    n: &[pb::VmNetwork],
) -> Result<std::collections::BTreeMap<String, String>, Status> {
    let mut out = std::collections::BTreeMap::new();
    for v in n {
        if !crate::state::vm_spec::valid_network_name(&v.name) {
            return Err(Status::invalid_argument(format!(
                "network name {:?} is not valid (letters, digits, '.', '_', '-')",
                v.name
            )));
        }
        if out
            .insert(v.name.clone(), text("networks.bridge", &v.bridge)?)
            .is_some()
        {
            return Err(Status::invalid_argument(format!(
                "network {:?} is listed twice",
                v.name
            )));
        }
    }
    Ok(out)
}

pub fn registration_from_pb(r: &pb::AdmitNodeRequest) -> Result<NodeRegistration, Status> {
    if r.node_id == 0 {
        return Err(Status::invalid_argument(
            "node_id 0 is reserved; use 1 or higher",
        ));
    }
    for (field, v) in [("raft_addr", &r.raft_addr), ("mgmt_addr", &r.mgmt_addr)] {
        if v.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "{field} {v:?} is not an IP:port address"
            )));
        }
    }
    Ok(NodeRegistration {
        node_id: r.node_id,
        name: text("name", &r.name)?,
        mgmt_addr: r.mgmt_addr.clone(),
        raft_addr: r.raft_addr.clone(),
        migration_addr: text("migration_addr", &r.migration_addr)?,
        mgmt_subnet: text("mgmt_subnet", &r.mgmt_subnet)?,
        migration_subnet: text("migration_subnet", &r.migration_subnet)?,
        facts: facts_from_pb(r.facts.as_ref())?,
        networks: networks_from_pb(&r.networks)?,
        trust: crate::state::NodeTrust {
            migration_plaintext: r.migration_plaintext,
            raft_plaintext: r.raft_plaintext,
            cert_expires_unix_ms: times::unix_ms(r.cert_expires_at.as_ref()),
            cert_ca_sha256: {
                let fp = &r.cert_ca_fingerprint;
                if !fp.is_empty()
                    && (fp.len() != 64
                        || !fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
                {
                    return Err(Status::invalid_argument(
                        "cert_ca_fingerprint must be empty or 64 lowercase hex digits (SHA-256)",
                    ));
                }
                fp.clone()
            },
        },
        power: {
            let p = crate::state::power::PowerCommands {
                off: r.power_off_command.clone(),
                on: r.power_on_command.clone(),
            };
            p.validate().map_err(Status::invalid_argument)?;
            p
        },
    })
}

pub fn registration_to_pb(r: &NodeRegistration) -> pb::AdmitNodeRequest {
    pb::AdmitNodeRequest {
        node_id: r.node_id,
        name: r.name.clone(),
        raft_addr: r.raft_addr.clone(),
        mgmt_addr: r.mgmt_addr.clone(),
        migration_addr: r.migration_addr.clone(),
        mgmt_subnet: r.mgmt_subnet.clone(),
        migration_subnet: r.migration_subnet.clone(),
        facts: Some(facts_to_pb(&r.facts)),
        networks: networks_to_pb(&r.networks),
        power_off_command: r.power.off.clone(),
        power_on_command: r.power.on.clone(),
        migration_plaintext: r.trust.migration_plaintext,
        cert_expires_at: times::timestamp_from_unix_ms(r.trust.cert_expires_unix_ms),
        cert_ca_fingerprint: r.trust.cert_ca_sha256.clone(),
        raft_plaintext: r.trust.raft_plaintext,
    }
}

pub fn node_to_pb(r: &NodeRecord, raft_role: pb::RaftRole) -> pb::NodeInfo {
    let g = &r.registration;
    pb::NodeInfo {
        node_id: g.node_id,
        name: g.name.clone(),
        state: node_state_to_pb(r.state) as i32,
        mgmt_addr: g.mgmt_addr.clone(),
        raft_addr: g.raft_addr.clone(),
        migration_addr: g.migration_addr.clone(),
        mgmt_subnet: g.mgmt_subnet.clone(),
        migration_subnet: g.migration_subnet.clone(),
        facts: Some(facts_to_pb(&g.facts)),
        state_since: times::timestamp_from_unix_ms(r.state_since_unix_ms),
        raft_role: raft_role as i32,
        networks: networks_to_pb(&g.networks),
        migration_transport: if g.trust.migration_plaintext {
            pb::MigrationTransport::InsecurePlaintext as i32
        } else {
            pb::MigrationTransport::Tls as i32
        },
        cert_expires_at: times::timestamp_from_unix_ms(g.trust.cert_expires_unix_ms),
        cert_ca_fingerprint: g.trust.cert_ca_sha256.clone(),
        raft_plaintext: g.trust.raft_plaintext,
        demand: None,
        state_reason: r.state_reason.clone(),
        standby_requested: r
            .standby_request
            .as_ref()
            .map(|q| q.reason.clone())
            .unwrap_or_default(),
        power_control: g.power.configured(),
    }
}

pub fn event_to_pb(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        at: times::timestamp_from_unix_ms(e.at_unix_ms),
        kind: event_kind_to_pb(e.kind) as i32,
        node_id: e.node_id,
        message: e.message.clone(),
    }
}
