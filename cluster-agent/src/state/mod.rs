//! The replicated cluster state: a pure, deterministic state machine.
//!
//! [`ClusterState::apply`] takes a [`Command`] (what the Raft log carries) and returns a
//! [`CommandResult`] plus the [`StateKey`]s it touched, so the RocksDB state machine can
//! persist exactly those entities in one write batch. Nothing here does I/O or reads a
//! clock: every timestamp travels inside the command, proposed by the leader.

pub mod ca;
pub mod disk_locks;
#[cfg(any(test, feature = "test-hooks"))]
pub mod fixtures;
pub mod jobs;
pub mod join_tokens;
pub mod keys;
pub mod migrations;
mod nodes;
pub mod power;
pub mod revocations;
pub mod vm_disks;
pub mod vm_nics;
pub mod vm_spec;
pub mod vms;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Maximum number of events kept; older ones are evicted (their sequence numbers are
/// never reused).
pub const EVENT_LOG_CAPACITY: usize = 10_000;

/// Maximum number of voters in a cluster.
pub const MAX_VOTERS: usize = 16;

/// Maximum key length of a replicated key/value entry.
pub const KV_KEY_LEN_MAX: usize = 256;
/// Keys the replicated key/value store holds at most (a put of a new key beyond is
/// refused; existing keys can still be updated).
pub const KV_KEYS_MAX: usize = 100_000;
/// Maximum value length of a replicated key/value entry.
pub const KV_VALUE_LEN_MAX: usize = 64 * 1024;
/// Most VM names one `NodeFenced` report may carry.
pub const NODE_FENCED_VMS_MAX: usize = 1_024;
/// Longest reason of a `NodeFenced` report, in bytes.
pub const NODE_FENCED_REASON_MAX: usize = 1_024;

/// Liveness/administrative state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Up,
    Paused,
    Down,
    /// Powered off by the power policy or by hand (see `crate::state::power`): owns no VM,
    /// takes none, and its silence is expected (never Down, never failed over).
    Standby,
    /// Its power-on command ran; Up once its heartbeats are heard again.
    Waking,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Paused => "paused",
            NodeState::Down => "down",
            NodeState::Standby => "standby",
            NodeState::Waking => "waking",
        }
    }

    /// Standby or waking: powered off on purpose (or powering on), holding no VM.
    pub fn is_asleep(self) -> bool {
        matches!(self, NodeState::Standby | NodeState::Waking)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How virtualization is provided on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KvmKind {
    /// `/dev/kvm` with VT-x/AMD-V (`vmx`/`svm` CPU flag).
    Hardware,
    /// `/dev/kvm` without the CPU flag (e.g. PVM, a software hypervisor).
    Software,
    /// No usable `/dev/kvm`.
    #[default]
    None,
}

impl KvmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KvmKind::Hardware => "hardware",
            KvmKind::Software => "software",
            KvmKind::None => "none",
        }
    }
}

/// Hardware facts of a node, probed at agent start (see `facts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeFacts {
    pub cpu_vendor: String,
    pub cpu_model: String,
    pub cpu_flags: Vec<String>,
    pub logical_cpus: u32,
    pub memory_bytes: u64,
    pub kvm_kind: KvmKind,
}

/// Identity and addresses a node registers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    pub node_id: u64,
    pub name: String,
    pub mgmt_addr: String,
    pub raft_addr: String,
    pub migration_addr: String,
    pub mgmt_subnet: String,
    pub migration_subnet: String,
    pub facts: NodeFacts,
    /// VM networks of the node's config: network name → host bridge.
    #[serde(default)]
    pub networks: std::collections::BTreeMap<String, String>,
    /// How the node is secured (reported by `node show`).
    #[serde(default)]
    pub trust: NodeTrust,
    /// The commands another node runs to power this one off and on (its config's
    /// `power_off_command` / `power_on_command`); empty: it is never put in standby.
    #[serde(default)]
    pub power: crate::state::power::PowerCommands,
}

/// How a node is secured, as it reports itself (refreshed when its certificate is
/// renewed and when it starts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeTrust {
    /// Its migration plane is plaintext (`migration_insecure_plaintext`), not TLS.
    pub migration_plaintext: bool,
    /// Its peer (Raft) plane is plaintext (`raft_insecure_plaintext`), not mutual TLS.
    #[serde(default)]
    pub raft_plaintext: bool,
    /// When its node certificate expires (unix ms; 0: not reported).
    pub cert_expires_unix_ms: u64,
    /// The fingerprint of the CA that issued its node certificate ("": not reported, or
    /// not a CA it trusts); see `crate::state::ca`.
    #[serde(default)]
    pub cert_ca_sha256: String,
}

/// One node of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub registration: NodeRegistration,
    pub state: NodeState,
    pub state_since_unix_ms: u64,
    /// The node announced a restart of its agent (its VMs run on in worker processes):
    /// the leader does not mark it Down for silence during the window.
    #[serde(default)]
    pub restarting: Option<RestartWindow>,
    /// Why it is in its state (the reason of the last state change).
    #[serde(default)]
    pub state_reason: String,
    /// Standby was asked for (by the power policy or by hand): the leader drains the
    /// node, then puts it in standby and runs its power-off command.
    #[serde(default)]
    pub standby_request: Option<crate::state::power::StandbyRequest>,
}

/// A restart a node announced (see [`Command::AnnounceRestart`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartWindow {
    pub window_ms: u64,
    /// Identifies the announcement (a later one is a new window); not a clock the
    /// window is measured on: each leader measures it on its own monotonic clock from
    /// the moment it first sees the announcement.
    pub announced_unix_ms: u64,
}

/// Longest restart window a node may announce.
pub const RESTART_WINDOW_MS_MAX: u64 = 600_000;

/// Kinds of cluster events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    ClusterInitialized,
    NodeJoined,
    NodeUpdated,
    NodeStateChanged,
    NodeRemoved,
    /// A node stopped its own VMs when its lease lapsed.
    NodeFenced,
    /// VM lifecycle (created, started, stopped, reported, deleted).
    Vm,
    /// Migration jobs: drain, failback, balancing (see `crate::state::jobs`).
    Job,
    /// Shared-volume disk locks (acquired, released, handed off, taken over).
    Disk,
    /// A join token was used: a new node got its certificate.
    NodeCertificateIssued,
    /// A user certificate (or every certificate of a user name) was revoked.
    CertificateRevoked,
    /// The cluster CA was rotated, or its rotation finished (see `crate::state::ca`).
    CaRotated,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::ClusterInitialized => "cluster_initialized",
            EventKind::NodeJoined => "node_joined",
            EventKind::NodeUpdated => "node_updated",
            EventKind::NodeStateChanged => "node_state_changed",
            EventKind::NodeRemoved => "node_removed",
            EventKind::NodeFenced => "node_fenced",
            EventKind::Vm => "vm",
            EventKind::Job => "job",
            EventKind::Disk => "disk",
            EventKind::NodeCertificateIssued => "node_certificate_issued",
            EventKind::CertificateRevoked => "certificate_revoked",
            EventKind::CaRotated => "ca_rotated",
        }
    }
}

/// A cluster event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub kind: EventKind,
    pub node_id: u64,
    pub message: String,
}

/// Identity of the cluster, fixed by `InitCluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub cluster_name: String,
    pub created_unix_ms: u64,
}

/// A replicated command: what the Raft log carries. Tagged so new variants (VMs,
/// migrations, volumes, ...) can be added without breaking stored logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Fix the cluster's identity. Refused once set.
    InitCluster {
        cluster_id: String,
        cluster_name: String,
        at_unix_ms: u64,
    },
    /// Add a node to the registry or refresh its registration (addresses, facts).
    RegisterNode {
        registration: NodeRegistration,
        at_unix_ms: u64,
    },
    /// Remove a node from the registry.
    RemoveNode { node_id: u64, at_unix_ms: u64 },
    /// Change a node's state (liveness or administrative).
    SetNodeState {
        node_id: u64,
        state: NodeState,
        at_unix_ms: u64,
        reason: String,
    },
    /// A node's agent is about to restart (`window_ms` > 0) while its VMs run on in
    /// worker processes, or is back (`window_ms` = 0). See [`RestartWindow`].
    AnnounceRestart {
        node_id: u64,
        window_ms: u64,
        at_unix_ms: u64,
    },
    /// Replicated key/value write (tests, benchmarks, small settings).
    PutKv { key: String, value: String },
    /// Replicated key/value delete.
    DeleteKv { key: String },
    /// VM lifecycle (see `crate::state::vms`).
    Vm(crate::state::vms::VmCommand),
    /// Drain / failback / balance jobs and the balancing policy (see `crate::state::jobs`).
    Job(crate::state::jobs::JobCommand),
    /// Shared-volume disk lock (see `crate::state::disk_locks`); the Raft log index is the
    /// fencing token, so it is applied with [`ClusterState::apply_at`].
    Lock(crate::state::disk_locks::LockEntry),
    /// Hot add / remove of a VM's disk (see `crate::state::vm_disks`).
    VmDisk(crate::state::vm_disks::VmDiskCommand),
    /// Hot add / remove of a VM's NIC (see `crate::state::vm_nics`).
    VmNic(crate::state::vm_nics::VmNicCommand),
    /// Migration management (see `crate::state::migrations`).
    Migration(crate::state::migrations::MigrationCommand),
    /// Join tokens (see `crate::state::join_tokens`).
    Token(crate::state::join_tokens::TokenCommand),
    /// Revoked user certificates (see `crate::state::revocations`).
    Revocation(crate::state::revocations::RevocationCommand),
    /// The cluster CA's rotation (see `crate::state::ca`).
    Ca(crate::state::ca::CaCommand),
    /// Standby and wake-up of nodes (see `crate::state::power`).
    Power(crate::state::power::PowerCommand),
    /// A node reports that it stopped its own VMs because its lease lapsed (self-fencing);
    /// recorded as an event once the node can reach the cluster again.
    NodeFenced {
        node_id: u64,
        vms: Vec<String>,
        reason: String,
        at_unix_ms: u64,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::InitCluster { cluster_id, .. } => write!(f, "init_cluster({cluster_id})"),
            Command::RegisterNode { registration, .. } => {
                write!(f, "register_node({})", registration.node_id)
            }
            Command::RemoveNode { node_id, .. } => write!(f, "remove_node({node_id})"),
            Command::SetNodeState { node_id, state, .. } => {
                write!(f, "set_node_state({node_id}, {state})")
            }
            Command::AnnounceRestart {
                node_id, window_ms, ..
            } => write!(f, "announce_restart({node_id}, {window_ms} ms)"),
            Command::PutKv { key, .. } => write!(f, "put_kv({key})"),
            Command::DeleteKv { key } => write!(f, "delete_kv({key})"),
            Command::Vm(c) => write!(f, "{c}"),
            Command::Job(c) => write!(f, "{c}"),
            Command::Lock(l) => write!(f, "{l}"),
            Command::VmDisk(c) => write!(f, "{c}"),
            Command::VmNic(c) => write!(f, "{c}"),
            Command::Migration(c) => write!(f, "{c}"),
            Command::NodeFenced { node_id, .. } => write!(f, "node_fenced({node_id})"),
            Command::Token(c) => write!(f, "{c}"),
            Command::Revocation(c) => write!(f, "{c}"),
            Command::Ca(c) => write!(f, "{c}"),
            Command::Power(c) => write!(f, "{c}"),
        }
    }
}

/// Outcome of applying a command. Rejections are deterministic: every replica rejects
/// the same command the same way and nothing is changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum CommandResult {
    /// Applied (or a no-op such as a membership entry).
    #[default]
    Ok,
    /// A key/value write; the previous value if any.
    Kv { previous: Option<String> },
    /// A state change; false when the node was already in that state.
    NodeState { changed: bool },
    /// Refused; nothing changed.
    Rejected { reason: String },
    /// A lock table decision (a grant, a release).
    Lock { outcome: csv_volume::LockOutcome },
}

/// Entity touched by an apply: the storage layer persists exactly these.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StateKey {
    Cluster,
    Node(u64),
    Kv(String),
    Event(u64),
    /// Sequence number of the newest event (stored with every apply).
    LastEventSeq,
    Vm(u64),
    LastVmId,
    /// A job record (`crate::state::jobs`).
    Job(u64),
    /// Last job id and the balancing policy.
    JobMeta,
    /// The whole shared-volume lock table.
    Locks,
    Migration(u64),
    LastMigrationId,
    /// The join token table (`crate::state::join_tokens`).
    JoinTokens,
    /// The revoked user certificates (`crate::state::revocations`).
    Revocations,
    /// The CA rotation state (`crate::state::ca`).
    Ca,
}

/// The whole replicated state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    pub cluster: Option<ClusterInfo>,
    pub nodes: BTreeMap<u64, NodeRecord>,
    pub kv: BTreeMap<String, String>,
    pub events: BTreeMap<u64, Event>,
    /// Sequence number of the newest event ever appended (0: none).
    pub last_event_seq: u64,
    /// VMs by id (see `crate::state::vms`).
    #[serde(default)]
    pub vms: BTreeMap<u64, crate::state::vms::VmRecord>,
    /// Newest VM id ever given (ids are never reused).
    #[serde(default)]
    pub last_vm_id: u64,
    /// Drain / failback / balance jobs and the balancing policy (see `crate::state::jobs`).
    #[serde(default)]
    pub jobs: crate::state::jobs::JobsState,
    /// Shared-volume disk locks (see `crate::state::disk_locks`).
    #[serde(default)]
    pub locks: csv_volume::LockTable,
    /// Migration records by id (see `crate::state::migrations`).
    #[serde(default)]
    pub migrations: BTreeMap<u64, crate::state::migrations::MigrationRecord>,
    /// Newest migration id ever given (ids are never reused).
    #[serde(default)]
    pub last_migration_id: u64,
    /// Join tokens (see `crate::state::join_tokens`).
    #[serde(default)]
    pub join_tokens: crate::state::join_tokens::JoinTokens,
    /// Revoked user certificates (see `crate::state::revocations`).
    #[serde(default)]
    pub revocations: crate::state::revocations::Revocations,
    /// The cluster CA's rotation (see `crate::state::ca`); `None` before the first.
    #[serde(default)]
    pub ca: Option<crate::state::ca::CaState>,
}

/// Where a command sits in the Raft log: the lock table's fencing token is the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogPosition {
    pub index: u64,
    pub term: u64,
}

/// The answer to a command a state module refused: its error chain, nothing touched.
fn rejected(e: &dyn std::error::Error) -> (CommandResult, Vec<StateKey>) {
    (
        CommandResult::Rejected {
            reason: crate::error_chain(e),
        },
        Vec::new(),
    )
}

impl ClusterState {
    /// Apply `cmd` outside a Raft log (tests, tools): lock commands are applied at
    /// position 0 (use [`ClusterState::apply_at`] for them).
    pub fn apply(&mut self, cmd: &Command) -> (CommandResult, Vec<StateKey>) {
        self.apply_at(cmd, LogPosition::default())
    }

    /// Apply `cmd`, committed at log position `at`. Returns the result and the keys whose
    /// stored value changed.
    pub fn apply_at(&mut self, cmd: &Command, at: LogPosition) -> (CommandResult, Vec<StateKey>) {
        let mut touched = Vec::new();
        let result = match cmd {
            Command::InitCluster { .. }
            | Command::RegisterNode { .. }
            | Command::RemoveNode { .. }
            | Command::NodeFenced { .. }
            | Command::SetNodeState { .. }
            | Command::AnnounceRestart { .. }
            | Command::PutKv { .. }
            | Command::DeleteKv { .. } => {
                let result = nodes::apply(self, cmd, at, &mut touched);
                if matches!(result, CommandResult::Rejected { .. }) {
                    return (result, Vec::new());
                }
                result
            }
            Command::Vm(c) => {
                let before = self.last_vm_id;
                if let Err(e) = crate::state::vms::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                if self.last_vm_id != before {
                    touched.push(StateKey::LastVmId);
                }
                crate::state::jobs::after_vm_command(self, c, &mut touched);
                crate::state::migrations::after_vm_command(self, c, &mut touched);
                CommandResult::Ok
            }
            Command::Migration(c) => {
                if let Err(e) = crate::state::migrations::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::Job(c) => {
                if let Err(e) = crate::state::jobs::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::VmDisk(c) => {
                if let Err(e) = crate::state::vm_disks::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::VmNic(c) => {
                if let Err(e) = crate::state::vm_nics::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::Token(c) => {
                if let Err(e) = crate::state::join_tokens::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::Revocation(c) => {
                if let Err(e) = crate::state::revocations::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::Ca(c) => {
                if let Err(e) = crate::state::ca::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::Power(c) => {
                if let Err(e) = crate::state::power::apply(self, c, &mut touched) {
                    return rejected(&e);
                }
                CommandResult::Ok
            }
            Command::Lock(entry) => {
                match crate::state::disk_locks::apply(self, entry, at, &mut touched) {
                    Ok(outcome) => CommandResult::Lock { outcome },
                    Err(e) => return rejected(&e),
                }
            }
        };
        (result, touched)
    }

    /// Append an event (used by other state modules such as `crate::state::vms`).
    pub(crate) fn record_event(
        &mut self,
        at_unix_ms: u64,
        kind: EventKind,
        node_id: u64,
        message: String,
        touched: &mut Vec<StateKey>,
    ) {
        self.push_event(at_unix_ms, kind, node_id, message, touched)
    }

    fn push_event(
        &mut self,
        at_unix_ms: u64,
        kind: EventKind,
        node_id: u64,
        message: String,
        touched: &mut Vec<StateKey>,
    ) {
        self.last_event_seq += 1;
        let seq = self.last_event_seq;
        self.events.insert(
            seq,
            Event {
                seq,
                at_unix_ms,
                kind,
                node_id,
                message,
            },
        );
        touched.push(StateKey::Event(seq));
        while self.events.len() > EVENT_LOG_CAPACITY {
            if let Some((old, _)) = self.events.pop_first() {
                touched.push(StateKey::Event(old));
            }
        }
    }

    /// Why a put of `key` would be refused for want of room ([`KV_KEYS_MAX`]), if it would.
    pub fn kv_full(&self, key: &str) -> Option<String> {
        nodes::kv_full(self, key)
    }

    /// Events with `seq > after_seq`, oldest first, at most `limit`.
    pub fn events_after(&self, after_seq: u64, limit: usize) -> Vec<Event> {
        self.events
            .range(after_seq.saturating_add(1)..)
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(id: u64) -> NodeRegistration {
        crate::state::fixtures::registration(id, NodeFacts::default())
    }

    #[test]
    fn init_is_refused_twice_and_records_an_event() {
        let mut s = ClusterState::default();
        let init = Command::InitCluster {
            cluster_id: "c1".into(),
            cluster_name: "lab".into(),
            at_unix_ms: 5,
        };
        assert_eq!(s.apply(&init).0, CommandResult::Ok);
        let (r, touched) = s.apply(&init);
        assert!(matches!(r, CommandResult::Rejected { .. }));
        assert!(touched.is_empty());
        assert_eq!(s.events.len(), 1);
        assert_eq!(s.events[&1].kind, EventKind::ClusterInitialized);
    }

    #[test]
    fn a_restart_window_is_announced_bounded_and_ended() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode {
            registration: reg(1),
            at_unix_ms: 1,
        });
        let announce = |node_id, window_ms, at_unix_ms| Command::AnnounceRestart {
            node_id,
            window_ms,
            at_unix_ms,
        };
        for bad in [
            announce(9, 1000, 2),
            announce(1, RESTART_WINDOW_MS_MAX + 1, 2),
        ] {
            let (r, touched) = s.apply(&bad);
            assert!(matches!(r, CommandResult::Rejected { .. }), "{bad}: {r:?}");
            assert!(touched.is_empty());
        }
        assert_eq!(s.nodes[&1].restarting, None);
        let (r, touched) = s.apply(&announce(1, 30_000, 3));
        assert_eq!(r, CommandResult::Ok);
        assert!(touched.contains(&StateKey::Node(1)), "{touched:?}");
        assert_eq!(
            s.nodes[&1].restarting,
            Some(RestartWindow {
                window_ms: 30_000,
                announced_unix_ms: 3
            })
        );
        let (_, touched) = s.apply(&announce(1, 0, 4));
        assert!(touched.contains(&StateKey::Node(1)), "{touched:?}");
        assert_eq!(s.nodes[&1].restarting, None);
        // Ending a window that is not open changes nothing.
        assert!(s.apply(&announce(1, 0, 5)).1.is_empty());
    }

    #[test]
    fn node_lifecycle_records_transitions() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode {
            registration: reg(1),
            at_unix_ms: 1,
        });
        assert_eq!(s.nodes[&1].state, NodeState::Up);
        let down = Command::SetNodeState {
            node_id: 1,
            state: NodeState::Down,
            at_unix_ms: 2,
            reason: "silent".into(),
        };
        assert_eq!(s.apply(&down).0, CommandResult::NodeState { changed: true });
        assert_eq!(
            s.apply(&down).0,
            CommandResult::NodeState { changed: false }
        );
        assert_eq!(s.nodes[&1].state, NodeState::Down);
        assert_eq!(s.nodes[&1].state_since_unix_ms, 2);
        let kinds: Vec<_> = s.events.values().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            vec![EventKind::NodeJoined, EventKind::NodeStateChanged]
        );
        let (r, _) = s.apply(&Command::SetNodeState {
            node_id: 9,
            state: NodeState::Up,
            at_unix_ms: 3,
            reason: String::new(),
        });
        assert_eq!(
            r,
            CommandResult::Rejected {
                reason: "unknown node id 9".into()
            }
        );
        s.apply(&Command::RemoveNode {
            node_id: 1,
            at_unix_ms: 4,
        });
        assert!(s.nodes.is_empty());
        assert_eq!(s.last_event_seq, 3);
    }

    #[test]
    fn node_fenced_reports_become_events_and_bad_ones_change_nothing() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode {
            registration: reg(2),
            at_unix_ms: 1,
        });
        let before = s.clone();
        let fenced = |node_id, vms: Vec<String>, reason: &str| Command::NodeFenced {
            node_id,
            vms,
            reason: reason.into(),
            at_unix_ms: 5,
        };
        let (r, t) = s.apply(&fenced(9, vec!["a".into()], "lease lapsed"));
        assert!(
            matches!(r, CommandResult::Rejected { ref reason } if reason.contains("unknown node id 9"))
        );
        assert!(t.is_empty());
        let many = vec![String::from("v"); NODE_FENCED_VMS_MAX + 1];
        let (r, _) = s.apply(&fenced(2, many, "lease lapsed"));
        assert!(
            matches!(r, CommandResult::Rejected { ref reason } if reason.contains("too large"))
        );
        assert_eq!(s, before);
        let (r, t) = s.apply(&fenced(2, vec!["a".into(), "b".into()], "lease lapsed"));
        assert_eq!(r, CommandResult::Ok);
        let ev = s.events.values().last().cloned();
        let ev = ev.unwrap_or_else(|| panic!("no event"));
        assert_eq!(ev.kind, EventKind::NodeFenced);
        assert_eq!(ev.node_id, 2);
        assert!(
            ev.message.contains("[a, b]") && ev.message.contains("lease lapsed"),
            "{}",
            ev.message
        );
        assert!(t.contains(&StateKey::Event(ev.seq)));
    }

    #[test]
    fn event_log_is_bounded_and_sequence_monotonic() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterNode {
            registration: reg(1),
            at_unix_ms: 0,
        });
        for i in 0..(EVENT_LOG_CAPACITY as u64 + 10) {
            let state = if i % 2 == 0 {
                NodeState::Down
            } else {
                NodeState::Up
            };
            let (_, touched) = s.apply(&Command::SetNodeState {
                node_id: 1,
                state,
                at_unix_ms: i,
                reason: String::new(),
            });
            assert!(touched.contains(&StateKey::Event(s.last_event_seq)));
        }
        assert_eq!(s.events.len(), EVENT_LOG_CAPACITY);
        assert_eq!(s.last_event_seq, EVENT_LOG_CAPACITY as u64 + 11);
        let first = *s.events.keys().next().unwrap_or(&0);
        assert_eq!(first, 12);
        assert_eq!(s.events_after(s.last_event_seq - 3, 100).len(), 3);
    }

    #[test]
    fn kv_limits_are_enforced_without_change() {
        let mut s = ClusterState::default();
        let (r, t) = s.apply(&Command::PutKv {
            key: String::new(),
            value: "v".into(),
        });
        assert!(matches!(r, CommandResult::Rejected { .. }));
        assert!(t.is_empty());
        let (r, _) = s.apply(&Command::PutKv {
            key: "k".into(),
            value: "v1".into(),
        });
        assert_eq!(r, CommandResult::Kv { previous: None });
        let (r, _) = s.apply(&Command::PutKv {
            key: "k".into(),
            value: "v2".into(),
        });
        assert_eq!(
            r,
            CommandResult::Kv {
                previous: Some("v1".into())
            }
        );
    }

    #[test]
    fn the_kv_key_count_is_capped_and_full_keys_stay_updatable() {
        let mut s = ClusterState::default();
        for i in 0..KV_KEYS_MAX {
            s.kv.insert(format!("k{i}"), String::new());
        }
        let before = s.clone();
        let (r, t) = s.apply(&Command::PutKv {
            key: "new".into(),
            value: "v".into(),
        });
        match r {
            CommandResult::Rejected { reason } => assert!(
                reason.contains("holds 100000 keys, the most allowed (KV_KEYS_MAX = 100000)"),
                "{reason}"
            ),
            other => panic!("a new key beyond the cap: {other:?}"),
        }
        assert!(t.is_empty());
        assert_eq!(s, before);
        let (r, _) = s.apply(&Command::PutKv {
            key: "k7".into(),
            value: "updated".into(),
        });
        assert_eq!(
            r,
            CommandResult::Kv {
                previous: Some(String::new())
            }
        );
        // A delete makes room again.
        s.apply(&Command::DeleteKv { key: "k1".into() });
        let (r, _) = s.apply(&Command::PutKv {
            key: "new".into(),
            value: "v".into(),
        });
        assert_eq!(r, CommandResult::Kv { previous: None });
    }

    #[test]
    fn commands_round_trip_through_json_with_tags() {
        let c = Command::PutKv {
            key: "a".into(),
            value: "b".into(),
        };
        let j = serde_json::to_string(&c).unwrap_or_default();
        assert_eq!(j, r#"{"cmd":"put_kv","key":"a","value":"b"}"#);
        let back: Command =
            serde_json::from_str(&j).unwrap_or(Command::DeleteKv { key: "x".into() });
        assert_eq!(back, c);
    }
}
