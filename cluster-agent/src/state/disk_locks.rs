//! Shared-volume disk locks in the replicated state: the lock part of the pure cluster
//! state machine.
//!
//! The cluster's [`csv_volume::LockTable`] lives in `ClusterState.locks`. Each change
//! travels through Raft as a [`LockEntry`] inside `Command::Lock` and is applied here with
//! the entry's Raft log position: the log index is the fencing token of every new lock
//! epoch (csv-volume's `ApplyContext`), and the nodes the replicated registry marks Down
//! are the only ones whose locks may be taken over (`ForceTakeover`). Read-only lock
//! queries are answered from the replica, never committed.
//!
//! **Architecture Invariant:** this module does no I/O and reads no clock; the fencing
//! token is the committed entry's log index, identical on every replica.

use std::collections::BTreeSet;

use csv_volume::{ApplyContext, DiskName, LockCommand, LockError, LockOutcome};
use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, EventKind, LogPosition, NodeState, StateKey};

/// One lock decision carried by the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockEntry {
    pub command: LockCommand,
    /// The VM the disk belongs to (for events and logs); may be empty.
    #[serde(default)]
    pub vm: String,
    pub at_unix_ms: u64,
}

impl std::fmt::Display for LockEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.command {
            LockCommand::Acquire { disk, node, .. } => write!(f, "lock_acquire({disk}, {node})"),
            LockCommand::Release { disk, node } => write!(f, "lock_release({disk}, {node})"),
            LockCommand::Handoff { disk, from, to } => {
                write!(f, "lock_handoff({disk}, {from} -> {to})")
            }
            LockCommand::ReserveHandoff { disk, from, to } => {
                write!(f, "lock_reserve_handoff({disk}, {from} -> {to})")
            }
            LockCommand::CompleteHandoff { disk, from, to } => {
                write!(f, "lock_complete_handoff({disk}, {from} -> {to})")
            }
            LockCommand::CancelHandoff { disk, from, to } => {
                write!(f, "lock_cancel_handoff({disk}, {from} -> {to})")
            }
            LockCommand::ForceTakeover { disk, node, .. } => {
                write!(f, "lock_takeover({disk}, {node})")
            }
            LockCommand::ReleaseAllOf { node } => write!(f, "lock_release_all({node})"),
            LockCommand::Query { disk } => write!(f, "lock_query({disk})"),
            LockCommand::QueryNode { node } => write!(f, "lock_query_node({node})"),
        }
    }
}

/// Why a lock entry is refused (nothing changes).
#[derive(Debug, thiserror::Error)]
pub enum DiskLockError {
    #[error("lock queries are answered from the replica and are not committed")]
    QueryNotCommitted,
    #[error("unknown node id {0}")]
    UnknownNode(u64),
    #[error("the lock table refused the command")]
    Table(#[source] LockError),
}

/// The apply context of the entry at `at`: Down nodes from the replicated registry.
pub fn context(state: &ClusterState, at: LogPosition) -> ApplyContext {
    ApplyContext {
        log_index: at.index,
        term: at.term,
        down_nodes: down_nodes(state),
    }
}

/// Nodes the replicated registry marks Down.
pub fn down_nodes(state: &ClusterState) -> BTreeSet<u64> {
    state
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Down)
        .map(|(id, _)| *id)
        .collect()
}

/// Would `entry` be accepted by the registry checks (the table decides the rest)?
pub fn check(state: &ClusterState, entry: &LockEntry) -> Result<(), DiskLockError> {
    let granted_to = match &entry.command {
        LockCommand::Query { .. } | LockCommand::QueryNode { .. } => {
            return Err(DiskLockError::QueryNotCommitted)
        }
        LockCommand::Acquire { node, .. } | LockCommand::ForceTakeover { node, .. } => *node,
        LockCommand::Handoff { to, .. }
        | LockCommand::ReserveHandoff { to, .. }
        | LockCommand::CompleteHandoff { to, .. } => *to,
        LockCommand::Release { .. }
        | LockCommand::ReleaseAllOf { .. }
        | LockCommand::CancelHandoff { .. } => return Ok(()),
    };
    if !state.nodes.contains_key(&granted_to) {
        return Err(DiskLockError::UnknownNode(granted_to));
    }
    Ok(())
}

/// Apply `entry`, committed at `at`. On refusal nothing changes and nothing is touched.
pub fn apply(
    state: &mut ClusterState,
    entry: &LockEntry,
    at: LogPosition,
    touched: &mut Vec<StateKey>,
) -> Result<LockOutcome, DiskLockError> {
    check(state, entry)?;
    let ctx = context(state, at);
    let outcome = state
        .locks
        .apply(entry.command.clone(), &ctx)
        .map_err(DiskLockError::Table)?;
    touched.push(StateKey::Locks);
    let vm = if entry.vm.is_empty() {
        String::new()
    } else {
        format!(" (VM {})", entry.vm)
    };
    let event = match (&entry.command, &outcome) {
        (LockCommand::ForceTakeover { disk, node, .. }, LockOutcome::Granted(g)) => Some((
            *node,
            format!(
                "disk {disk} taken over by node {node} with fencing token {}{vm}",
                g.token
            ),
        )),
        (LockCommand::Handoff { disk, from, to }, LockOutcome::Granted(g)) => Some((
            *to,
            format!(
                "disk {disk} handed off from node {from} to node {to}, fencing token {}{vm}",
                g.token
            ),
        )),
        (LockCommand::ReserveHandoff { disk, from, to }, LockOutcome::Reserved(g)) => Some((
            *from,
            format!(
                "disk {disk} handoff from node {from} to node {to} reserved, fencing token {}{vm}",
                g.token
            ),
        )),
        (LockCommand::CompleteHandoff { disk, from, to }, LockOutcome::Granted(g)) => Some((
            *to,
            format!(
                "disk {disk} handed off from node {from} to node {to}, fencing token {} (reserved){vm}",
                g.token
            ),
        )),
        (LockCommand::Acquire { disk, node, mode }, LockOutcome::Granted(g)) => Some((
            *node,
            format!(
                "disk {disk} locked {mode} by node {node}, fencing token {}{vm}",
                g.token
            ),
        )),
        (LockCommand::Release { disk, node }, _) => {
            Some((*node, format!("disk {disk} released by node {node}{vm}")))
        }
        (LockCommand::ReleaseAllOf { node }, LockOutcome::ReleasedAll { disks, .. })
            if !disks.is_empty() =>
        {
            Some((
                *node,
                format!("node {node} released {} disk lock(s){vm}", disks.len()),
            ))
        }
        _ => None,
    };
    if let Some((node, message)) = event {
        state.record_event(entry.at_unix_ms, EventKind::Disk, node, message, touched);
    }
    Ok(outcome)
}

/// A node left the registry: drop every disk lock it holds (`ReleaseAllOf`, applied at
/// the `RemoveNode` entry's position). Nothing can take a removed node's lock over (only
/// Down nodes in the registry can be), so it would otherwise block its disks forever; a
/// removed node that still writes is refused at the disk once a new holder installs its
/// newer fence record.
pub fn release_removed_node(
    state: &mut ClusterState,
    node: u64,
    at_unix_ms: u64,
    at: LogPosition,
    touched: &mut Vec<StateKey>,
) {
    if state.locks.locks_of(node).next().is_none() {
        return;
    }
    let entry = LockEntry {
        command: LockCommand::ReleaseAllOf { node },
        vm: String::new(),
        at_unix_ms,
    };
    let ctx = context(state, at);
    if let Ok(LockOutcome::ReleasedAll { disks, .. }) = state.locks.apply(entry.command, &ctx) {
        touched.push(StateKey::Locks);
        let message = format!(
            "node {node} removed: its lock(s) on {} disk(s) released",
            disks.len()
        );
        state.record_event(at_unix_ms, EventKind::Disk, node, message, touched);
    }
}

/// VMs (other than `except`) whose spec lists `disk`, in id order.
pub fn disk_users<'a>(state: &'a ClusterState, disk: &DiskName, except: &str) -> Vec<&'a str> {
    state
        .vms
        .values()
        .filter(|v| v.spec.name != except && v.spec.disks.iter().any(|d| &d.name == disk))
        .map(|v| v.spec.name.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, CommandResult, NodeFacts};
    use csv_volume::{FencingToken, LockMode};

    fn state(n: u64) -> ClusterState {
        crate::state::fixtures::cluster(n, |_| NodeFacts::default())
    }

    fn disk() -> DiskName {
        DiskName::parse("vol/a.img").unwrap_or_else(|e| panic!("{e}"))
    }

    fn lock(s: &mut ClusterState, index: u64, command: LockCommand) -> CommandResult {
        let entry = LockEntry {
            command,
            vm: "vm".into(),
            at_unix_ms: index,
        };
        s.apply_at(&Command::Lock(entry), LogPosition { index, term: 1 })
            .0
    }

    fn token(r: &CommandResult) -> Option<FencingToken> {
        match r {
            CommandResult::Lock {
                outcome: LockOutcome::Granted(g),
            } => Some(g.token),
            _ => None,
        }
    }

    #[test]
    fn log_index_is_the_token_and_takeover_needs_a_down_holder() {
        let mut s = state(3);
        let r = lock(
            &mut s,
            10,
            LockCommand::Acquire {
                disk: disk(),
                node: 1,
                mode: LockMode::Exclusive,
            },
        );
        assert_eq!(token(&r), Some(FencingToken(10)));
        // Idempotent re-acquire keeps the token.
        let r = lock(
            &mut s,
            11,
            LockCommand::Acquire {
                disk: disk(),
                node: 1,
                mode: LockMode::Exclusive,
            },
        );
        assert_eq!(token(&r), Some(FencingToken(10)));
        let take = LockCommand::ForceTakeover {
            disk: disk(),
            node: 2,
            mode: LockMode::Exclusive,
        };
        let before = s.clone();
        let r = lock(&mut s, 12, take.clone());
        assert!(
            matches!(&r, CommandResult::Rejected { reason } if reason.contains("takeover needs every holder Down")),
            "{r:?}"
        );
        assert_eq!(s, before, "a refused lock command changes nothing");
        s.apply(&Command::SetNodeState {
            node_id: 1,
            state: NodeState::Down,
            at_unix_ms: 13,
            reason: "silent".into(),
        });
        let r = lock(&mut s, 14, take);
        assert_eq!(token(&r), Some(FencingToken(14)));
        assert_eq!(
            s.locks.lock(&disk()).and_then(|l| l.exclusive_owner()),
            Some(2)
        );
        assert!(s
            .events
            .values()
            .any(|e| e.kind == EventKind::Disk && e.message.contains("taken over by node 2")));
        // A Down node is granted nothing.
        let r = lock(
            &mut s,
            15,
            LockCommand::Acquire {
                disk: DiskName::parse("vol/b.img").unwrap_or_else(|e| panic!("{e}")),
                node: 1,
                mode: LockMode::Exclusive,
            },
        );
        assert!(matches!(r, CommandResult::Rejected { .. }), "{r:?}");
    }

    #[test]
    fn a_removed_node_loses_its_locks() {
        let mut s = state(3);
        lock(
            &mut s,
            7,
            LockCommand::Acquire {
                disk: disk(),
                node: 3,
                mode: LockMode::Exclusive,
            },
        );
        let (r, touched) = s.apply_at(
            &Command::RemoveNode {
                node_id: 3,
                at_unix_ms: 8,
            },
            LogPosition { index: 8, term: 1 },
        );
        assert_eq!(r, CommandResult::Ok);
        assert!(touched.contains(&StateKey::Locks));
        assert!(s.locks.is_empty());
        // Another node can lock the disk now, with a newer token.
        let r = lock(
            &mut s,
            9,
            LockCommand::Acquire {
                disk: disk(),
                node: 1,
                mode: LockMode::Exclusive,
            },
        );
        assert_eq!(token(&r), Some(FencingToken(9)));
    }

    #[test]
    fn queries_and_unknown_nodes_are_refused_and_the_table_survives_json() {
        let mut s = state(2);
        let r = lock(&mut s, 3, LockCommand::Query { disk: disk() });
        assert!(
            matches!(&r, CommandResult::Rejected { reason } if reason.contains("not committed"))
        );
        let r = lock(
            &mut s,
            4,
            LockCommand::Acquire {
                disk: disk(),
                node: 9,
                mode: LockMode::Exclusive,
            },
        );
        assert!(
            matches!(&r, CommandResult::Rejected { reason } if reason.contains("unknown node id 9"))
        );
        assert!(s.locks.is_empty());
        lock(
            &mut s,
            5,
            LockCommand::Acquire {
                disk: disk(),
                node: 2,
                mode: LockMode::Shared,
            },
        );
        let j = serde_json::to_string(&s).unwrap_or_default();
        let back: ClusterState = serde_json::from_str(&j).unwrap_or_default();
        assert_eq!(back, s);
        assert_eq!(back.locks.len(), 1);
    }
}
