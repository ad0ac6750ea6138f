//! Cluster identity, the node registry, fence reports and the replicated key/value
//! store: the commands that are not a family of their own.

use super::{
    ClusterInfo, ClusterState, Command, CommandResult, EventKind, LogPosition, NodeRecord,
    NodeRegistration, NodeState, StateKey, KV_KEYS_MAX, KV_KEY_LEN_MAX, KV_VALUE_LEN_MAX,
    NODE_FENCED_REASON_MAX, NODE_FENCED_VMS_MAX,
};

/// Apply one of this file's commands (the dispatcher in `state/mod.rs` sends only
/// those); on refusal nothing changes and nothing is touched.
pub(super) fn apply(
    cs: &mut ClusterState,
    cmd: &Command,
    at: LogPosition,
    touched: &mut Vec<StateKey>,
) -> CommandResult {
    match cmd {
        Command::InitCluster {
            cluster_id,
            cluster_name,
            at_unix_ms,
        } => {
            if let Some(existing) = &cs.cluster {
                return CommandResult::Rejected {
                    reason: format!(
                        "the cluster is already initialized with id {}",
                        existing.cluster_id
                    ),
                };
            }
            cs.cluster = Some(ClusterInfo {
                cluster_id: cluster_id.clone(),
                cluster_name: cluster_name.clone(),
                created_unix_ms: *at_unix_ms,
            });
            touched.push(StateKey::Cluster);
            cs.push_event(
                *at_unix_ms,
                EventKind::ClusterInitialized,
                0,
                format!("cluster {cluster_name} ({cluster_id}) initialized"),
                touched,
            );
            CommandResult::Ok
        }
        Command::RegisterNode {
            registration,
            at_unix_ms,
        } => {
            let id = registration.node_id;
            if let Some(reason) = validate_registration(registration) {
                return CommandResult::Rejected { reason };
            }
            match cs.nodes.get_mut(&id) {
                Some(record) => {
                    if record.registration != *registration {
                        record.registration = registration.clone();
                        touched.push(StateKey::Node(id));
                        cs.push_event(
                            *at_unix_ms,
                            EventKind::NodeUpdated,
                            id,
                            format!("node {id} ({}) updated its registration", registration.name),
                            touched,
                        );
                    }
                }
                None => {
                    cs.nodes.insert(
                        id,
                        NodeRecord {
                            registration: registration.clone(),
                            state: NodeState::Up,
                            state_since_unix_ms: *at_unix_ms,
                            restarting: None,
                            state_reason: "joined".into(),
                            standby_request: None,
                        },
                    );
                    touched.push(StateKey::Node(id));
                    cs.push_event(
                        *at_unix_ms,
                        EventKind::NodeJoined,
                        id,
                        format!(
                            "node {id} ({}) joined at {}",
                            registration.name, registration.mgmt_addr
                        ),
                        touched,
                    );
                }
            }
            CommandResult::Ok
        }
        Command::RemoveNode {
            node_id,
            at_unix_ms,
        } => {
            let Some(record) = cs.nodes.remove(node_id) else {
                return CommandResult::Rejected {
                    reason: format!("unknown node id {node_id}"),
                };
            };
            touched.push(StateKey::Node(*node_id));
            cs.push_event(
                *at_unix_ms,
                EventKind::NodeRemoved,
                *node_id,
                format!("node {node_id} ({}) removed", record.registration.name),
                touched,
            );
            crate::state::disk_locks::release_removed_node(cs, *node_id, *at_unix_ms, at, touched);
            crate::state::revocations::revoke_removed_node(cs, *node_id, *at_unix_ms, touched);
            CommandResult::Ok
        }
        Command::NodeFenced {
            node_id,
            vms,
            reason,
            at_unix_ms,
        } => {
            if !cs.nodes.contains_key(node_id) {
                return CommandResult::Rejected {
                    reason: format!("unknown node id {node_id}"),
                };
            }
            if vms.len() > NODE_FENCED_VMS_MAX || reason.len() > NODE_FENCED_REASON_MAX {
                return CommandResult::Rejected {
                        reason: format!(
                            "fence report of node {node_id} too large: {} VM names (max {NODE_FENCED_VMS_MAX}), reason of {} bytes (max {NODE_FENCED_REASON_MAX})",
                            vms.len(),
                            reason.len()
                        ),
                    };
            }
            cs.push_event(
                *at_unix_ms,
                EventKind::NodeFenced,
                *node_id,
                format!(
                    "node {node_id} fenced itself: stopped {} VM(s) [{}] ({reason})",
                    vms.len(),
                    vms.join(", ")
                ),
                touched,
            );
            CommandResult::Ok
        }
        Command::SetNodeState {
            node_id,
            state,
            at_unix_ms,
            reason,
        } => {
            let Some(record) = cs.nodes.get_mut(node_id) else {
                return CommandResult::Rejected {
                    reason: format!("unknown node id {node_id}"),
                };
            };
            if state.is_asleep() {
                return CommandResult::Rejected {
                    reason: format!(
                        "node {node_id} cannot be set {state} directly; standby and wake-up have their own commands"
                    ),
                };
            }
            if record.state == *state {
                return CommandResult::NodeState { changed: false };
            }
            let from = record.state;
            // Only liveness takes a node out of standby or waking: Up once it is heard
            // again after its power-on command (Waking → Up). A standby node stays so.
            if from == NodeState::Standby || (from == NodeState::Waking && *state != NodeState::Up)
            {
                return CommandResult::Rejected {
                    reason: format!(
                        "node {node_id} is {from}; `clusterctl node wake {node_id}` brings it back"
                    ),
                };
            }
            record.state = *state;
            record.state_since_unix_ms = *at_unix_ms;
            record.state_reason = reason.clone();
            touched.push(StateKey::Node(*node_id));
            cs.push_event(
                *at_unix_ms,
                EventKind::NodeStateChanged,
                *node_id,
                format!("node {node_id} {from} -> {state}: {reason}"),
                touched,
            );
            CommandResult::NodeState { changed: true }
        }
        Command::AnnounceRestart {
            node_id,
            window_ms,
            at_unix_ms,
        } => {
            if *window_ms > crate::state::RESTART_WINDOW_MS_MAX {
                return CommandResult::Rejected {
                    reason: format!(
                        "restart window of {window_ms} ms is longer than {} ms",
                        crate::state::RESTART_WINDOW_MS_MAX
                    ),
                };
            }
            let Some(record) = cs.nodes.get_mut(node_id) else {
                return CommandResult::Rejected {
                    reason: format!("unknown node id {node_id}"),
                };
            };
            let next = (*window_ms > 0).then_some(crate::state::RestartWindow {
                window_ms: *window_ms,
                announced_unix_ms: *at_unix_ms,
            });
            if record.restarting == next {
                return CommandResult::Ok;
            }
            record.restarting = next;
            touched.push(StateKey::Node(*node_id));
            let message = match next {
                Some(_) => format!(
                    "node {node_id} restarts its agent; its VMs run on in their worker processes; not Down for silence for up to {window_ms} ms"
                ),
                None => format!("node {node_id} is back from its agent restart"),
            };
            cs.push_event(
                *at_unix_ms,
                EventKind::NodeUpdated,
                *node_id,
                message,
                touched,
            );
            CommandResult::Ok
        }
        Command::PutKv { key, value } => {
            if let Some(reason) = validate_kv(key, value) {
                return CommandResult::Rejected { reason };
            }
            if let Some(reason) = kv_full(cs, key) {
                return CommandResult::Rejected { reason };
            }
            let previous = cs.kv.insert(key.clone(), value.clone());
            touched.push(StateKey::Kv(key.clone()));
            CommandResult::Kv { previous }
        }
        Command::DeleteKv { key } => {
            let previous = cs.kv.remove(key);
            if previous.is_some() {
                touched.push(StateKey::Kv(key.clone()));
            }
            CommandResult::Kv { previous }
        }
        Command::Vm(_)
        | Command::Job(_)
        | Command::Lock(_)
        | Command::VmDisk(_)
        | Command::VmNic(_)
        | Command::Token(_)
        | Command::Revocation(_)
        | Command::Ca(_)
        | Command::Power(_)
        | Command::Migration(_) => CommandResult::Rejected {
            reason: format!("{cmd} is not a node command"),
        },
    }
}

fn validate_registration(r: &NodeRegistration) -> Option<String> {
    if r.node_id == 0 {
        return Some("node id 0 is reserved; use 1 or higher".into());
    }
    if r.name.is_empty() {
        return Some(format!("node {} has an empty name", r.node_id));
    }
    if r.raft_addr.is_empty() || r.mgmt_addr.is_empty() {
        return Some(format!(
            "node {} must register a management and a raft address",
            r.node_id
        ));
    }
    if let Err(e) = r.power.validate() {
        return Some(format!("node {}: {e}", r.node_id));
    }
    None
}

/// Why a put of `key` finds no room: a new key when the KV holds [`KV_KEYS_MAX`] keys
/// (an existing key can always be updated).
pub(crate) fn kv_full(cs: &ClusterState, key: &str) -> Option<String> {
    (cs.kv.len() >= KV_KEYS_MAX && !cs.kv.contains_key(key)).then(|| {
        format!(
            "the replicated KV holds {} keys, the most allowed (KV_KEYS_MAX = {KV_KEYS_MAX}); \
             delete a key first (existing keys can still be updated)",
            cs.kv.len()
        )
    })
}

fn validate_kv(key: &str, value: &str) -> Option<String> {
    if key.is_empty() {
        return Some("key/value keys must not be empty".into());
    }
    if key.len() > KV_KEY_LEN_MAX {
        return Some(format!(
            "key is {} bytes; the limit is {KV_KEY_LEN_MAX}",
            key.len()
        ));
    }
    if value.len() > KV_VALUE_LEN_MAX {
        return Some(format!(
            "value is {} bytes; the limit is {KV_VALUE_LEN_MAX}",
            value.len()
        ));
    }
    None
}
