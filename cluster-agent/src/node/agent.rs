//! The running agent: Raft instance, write path (local or forwarded to the leader),
//! cluster lifecycle (init, admit, remove) and liveness (heartbeats, Down/Up).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::liveness::{DownClock, Heartbeat, Liveness, Timing};
use super::peers::PeerClient;
use crate::node::config::AgentConfig;
use crate::node::credentials::{Credentials, SharedCredentials};
use crate::node::facts::{self, FactsError};
use crate::raft::datadir::{DataDir, DataDirError};
use crate::raft::store::{SharedSm, SmData};
use crate::raft::{NodeId, PeerNode, Raft, RaftMetrics};
use crate::state::{
    ClusterInfo, ClusterState, Command, CommandResult, NodeFacts, NodeRegistration, MAX_VOTERS,
};

/// How long a write waits for a leader before giving up.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a write through a follower waits for the follower to apply it.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);
/// How long the leader waits for a new learner to catch up.
pub const LEARNER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot probe node facts")]
    Facts(#[source] FactsError),
    #[error("cannot open the data dir")]
    DataDir(#[source] DataDirError),
    #[error("invalid Raft configuration")]
    RaftConfig(#[source] openraft::ConfigError),
    #[error("cannot start Raft")]
    Raft(#[source] openraft::error::Fatal<NodeId>),
}

/// Errors of the write path and lifecycle operations. Serializable so a leader's
/// answer travels back to the agent that forwarded the request.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq, Eq)]
pub enum WriteError {
    #[error("node {this} is not the leader (leader: {leader:?})")]
    NotLeader { this: u64, leader: Option<u64> },
    #[error("no leader was elected within {waited_ms} ms; is a majority of voters running?")]
    NoLeader { waited_ms: u64 },
    #[error("the cluster is not initialized; run `clusterctl cluster init` on one agent first")]
    NotInitialized,
    #[error("this agent is already a member of cluster {cluster_id}")]
    AlreadyMember { cluster_id: String },
    #[error("the command was refused: {reason}")]
    Rejected { reason: String },
    #[error("unknown node id {node_id}; `clusterctl node list` shows the members")]
    UnknownNode { node_id: u64 },
    #[error("node id {node_id} is already used by {existing}; pick another node_id or remove the old node first")]
    DuplicateNode { node_id: u64, existing: String },
    #[error("the cluster already has {voters} voters, the maximum is {max}; remove a node before adding another")]
    TooManyVoters { voters: usize, max: usize },
    #[error("node {node_id} is the last voter; a cluster cannot remove its last voter")]
    LastVoter { node_id: u64 },
    #[error("the new node {node_id} at {raft_addr} did not catch up within {waited_ms} ms; it was not added")]
    LearnerTimeout {
        node_id: u64,
        raft_addr: String,
        waited_ms: u64,
    },
    #[error("forwarding to the leader {leader} at {addr} failed: {message}")]
    Forward {
        leader: u64,
        addr: String,
        message: String,
    },
    #[error("raft error: {message}")]
    Raft { message: String },
}

/// A write a non-leader forwards to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardRequest {
    Command(Command),
    Admit(NodeRegistration),
    Remove { node_id: u64 },
}

/// The leader's answer to a [`ForwardRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ForwardReply {
    Command {
        result: CommandResult,
        log_index: u64,
    },
    Admitted {
        cluster_id: String,
        cluster_name: String,
        leader_id: u64,
        voter_count: u64,
    },
    Removed {
        voter_count: u64,
    },
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn random_hex128() -> String {
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    a.write_u32(std::process::id());
    let mut b = std::collections::hash_map::RandomState::new().build_hasher();
    b.write_u64(a.finish());
    format!("{:016x}{:016x}", a.finish(), b.finish())
}

/// The agent's shared core, used by the services and the controllers. Its fields are
/// private: callers read the replicated state through [`Agent::read_sm`], the Raft view
/// through [`Agent::metrics`], and change anything only through [`Agent::write`].
pub struct Agent {
    pub(super) config: AgentConfig,
    pub(super) raft: Raft,
    pub(super) sm: SharedSm,
    /// The last applied log id (see `SmStore::applied_watch`).
    applied: watch::Receiver<Option<crate::raft::LogId>>,
    pub(super) facts: NodeFacts,
    pub(super) incarnation: u64,
    pub(super) data_dir: Mutex<DataDir>,
    pub(super) liveness: Mutex<Liveness>,
    pub(super) peers: Arc<dyn PeerClient>,
    /// Held on the leader from judging a placement or migration target to committing it,
    /// so two decisions never both take the last room or migration slot.
    pub(super) place_lock: tokio::sync::Mutex<()>,
    /// When this agent first saw each node Down (graces run on this clock).
    pub(super) down_clock: Mutex<DownClock>,
    /// On the leader: when it first saw each node's restart announcement (node id →
    /// announcement, first seen); the window runs on this clock.
    pub(super) restart_holds: Mutex<std::collections::HashMap<u64, (u64, Instant)>>,
    /// This node's certificate, key and the cluster CA (for every connection it makes).
    pub(super) credentials: SharedCredentials,
    /// Demand reports: every node's latest, and whether this node's newest went out yet.
    pub(super) demand: Mutex<DemandState>,
    /// Looks the balancer took on this agent while it led (for `/metrics`).
    pub(super) balance_rounds: std::sync::atomic::AtomicU64,
    /// VM failures this agent's reconciler saw on its host, by kind (for `/metrics`).
    pub(super) vm_failures: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Power saving on this agent (see [`PowerBoard`]).
    pub(super) power: Mutex<PowerBoard>,
    /// Rounds the heartbeat loop and the fence watcher completed (see
    /// [`Agent::loop_rounds`]).
    pub(super) heartbeat_rounds: std::sync::atomic::AtomicU64,
    pub(super) fence_rounds: std::sync::atomic::AtomicU64,
    /// What this node saw of a leader (for `super::elections`).
    pub(super) leader_signs: Mutex<super::elections::Signs>,
}

/// What power saving keeps in memory on an agent (none of it needs to survive a leader
/// change: a new leader measures anew).
#[derive(Debug, Default)]
pub(super) struct PowerBoard {
    /// A placement (create, start, failover) found no room since the power controller
    /// last looked: why.
    capacity_short: Option<String>,
    /// Power commands this agent ran: (action, outcome) → count.
    runs: std::collections::BTreeMap<(&'static str, &'static str), u64>,
    /// When this agent first saw each node Waking: node → (state since, first seen).
    waking_seen: std::collections::BTreeMap<u64, (u64, Instant)>,
}

/// This agent's view of measured demand (see [`super::demand`]).
#[derive(Debug, Default)]
pub(super) struct DemandState {
    pub board: super::demand::DemandBoard,
    /// This node's newest report, until a heartbeat round carried it.
    pub unsent: Option<super::demand::NodeDemand>,
}

impl Agent {
    /// Open the data dir, probe facts and start Raft over `network` (not yet the servers).
    /// `peers` reaches the other members for write forwarding and heartbeats.
    pub async fn start<N>(
        config: AgentConfig,
        credentials: SharedCredentials,
        network: N,
        peers: Arc<dyn PeerClient>,
    ) -> Result<Arc<Agent>, StartError>
    where
        N: openraft::RaftNetworkFactory<crate::raft::TypeConfig>,
    {
        let facts = facts::probe(&config.facts_override).map_err(StartError::Facts)?;
        let (data_dir, log_store, sm_store) =
            DataDir::open(&config.data_dir, config.node_id).map_err(StartError::DataDir)?;
        let sm = sm_store.shared();
        let applied = sm_store.applied_watch();
        let raft_config = openraft::Config {
            cluster_name: "vm-cluster".into(),
            // Only openraft's AppendEntries timeout and (× 1.5) its tick now: its
            // heartbeats are sent by `run_raft_heartbeats`, its elections asked for by
            // `run_elections` (see `node::elections`).
            heartbeat_interval: (config.election_timeout_min_ms / 2).max(1),
            enable_heartbeat: false,
            enable_elect: false,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: config.max_logs_kept_after_snapshot,
            snapshot_max_chunk_size: 1024 * 1024,
            install_snapshot_timeout: config.rpc_timeout.as_millis() as u64 * 2,
            ..Default::default()
        }
        .validate()
        .map_err(StartError::RaftConfig)?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log_store,
            sm_store,
        )
        .await
        .map_err(StartError::Raft)?;
        tracing::info!(
            node_id = config.node_id,
            fresh = data_dir.fresh,
            cpu_vendor = %facts.cpu_vendor,
            kvm_kind = facts.kvm_kind.as_str(),
            "agent started"
        );
        let liveness = Liveness::new(config.node_id, Timing::from_config(&config));
        Ok(Arc::new(Agent {
            credentials,
            incarnation: now_unix_ms(),
            config,
            raft,
            sm,
            applied,
            facts,
            data_dir: Mutex::new(data_dir),
            peers,
            liveness: Mutex::new(liveness),
            demand: Mutex::default(),
            balance_rounds: Default::default(),
            vm_failures: Default::default(),
            power: Mutex::default(),
            heartbeat_rounds: Default::default(),
            fence_rounds: Default::default(),
            leader_signs: Mutex::default(),
            place_lock: tokio::sync::Mutex::new(()),
            down_clock: Mutex::new(DownClock::default()),
            restart_holds: Mutex::default(),
        }))
    }

    pub(super) fn lock_leader_signs(&self) -> std::sync::MutexGuard<'_, super::elections::Signs> {
        self.leader_signs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An AppendEntries (or snapshot) from a leader arrived (a sign its Raft core works).
    pub fn note_append(&self) {
        self.lock_leader_signs().append_arrived(Instant::now());
    }

    /// Whether this voter refuses `candidate`'s vote request without asking openraft:
    /// another leader answered within the lease and its AppendEntries arrive
    /// ([`super::elections::Signs::refuses`]).
    pub fn refuses_vote(&self, candidate: u64) -> bool {
        let term = self.raft.metrics().borrow().current_term;
        let timing = super::elections::ElectionTiming::from_config(&self.config);
        self.lock_leader_signs()
            .refuses(candidate, term, &timing, Instant::now())
    }

    /// The fence watcher (`control/fencing.rs`) finished one check of the lease.
    pub fn note_fence_round(&self) {
        self.fence_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Rounds completed so far by the heartbeat loop and by the fence watcher, the two
    /// loops the "a VM runs on at most one node" argument rests on: the systemd watchdog
    /// (`crate::systemd`) pings only while both advance.
    pub fn loop_rounds(&self) -> (u64, u64) {
        (
            self.heartbeat_rounds
                .load(std::sync::atomic::Ordering::Relaxed),
            self.fence_rounds.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// This agent's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// This node's TLS credentials now (they are replaced before they expire).
    pub fn credentials(&self) -> Arc<Credentials> {
        self.credentials.current()
    }

    /// This node's replaceable TLS credentials.
    pub fn shared_credentials(&self) -> &SharedCredentials {
        &self.credentials
    }

    /// The Raft instance (the peer service hands it the RPCs it receives).
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// A snapshot of this node's Raft metrics (leader, term, applied index, membership).
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// A watch of the Raft metrics. It changes with every acknowledgement a leader
    /// receives: to wait for newly applied entries use [`Agent::applied_watch`], for a
    /// change of role, leader or membership [`Agent::role_watch`].
    pub fn metrics_watch(&self) -> watch::Receiver<RaftMetrics> {
        self.raft.metrics()
    }

    /// A watch of the last applied log id: changes once newly applied entries are readable
    /// through [`Agent::read_sm`], and at no other time.
    pub fn applied_watch(&self) -> watch::Receiver<Option<crate::raft::LogId>> {
        self.applied.clone()
    }

    /// A watch that changes only with this node's role, the leader it knows, its vote or the
    /// membership (and ends when the Raft core stops).
    pub fn role_watch(&self) -> watch::Receiver<crate::raft::RaftServerMetrics> {
        self.raft.server_metrics()
    }

    /// Resolves when Raft stops with a fatal error (a storage failure, a panic in its
    /// core): the replica can no longer apply anything, so the agent must fail-stop.
    ///
    /// It waits on the server metrics (role, leader, membership), which change rarely, not
    /// on the full metrics, which change with every acknowledgement a leader receives: the
    /// core reports the error in the full metrics and then drops every sender, which ends
    /// the wait.
    pub async fn fatal(&self) -> String {
        let mut w = self.role_watch();
        loop {
            if let Err(e) = &self.raft.metrics().borrow().running_state {
                return e.to_string();
            }
            if w.changed().await.is_err() {
                return match &self.raft.metrics().borrow().running_state {
                    Err(e) => e.to_string(),
                    Ok(()) => "the Raft core stopped".to_owned(),
                };
            }
        }
    }

    /// Wait until this agent leads (at once if it does): the leader-only loops sleep here
    /// on followers instead of waking every tick to find they do not lead. False when
    /// `shutdown` changed first.
    pub async fn wait_until_leader(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        let me = Some(self.node_id());
        let mut m = self.role_watch();
        tokio::select! {
            r = m.wait_for(|m| m.current_leader == me) => r.is_ok(),
            _ = shutdown.changed() => false,
        }
    }

    /// The current leader as this node knows it.
    pub fn leader(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    /// The lock a leader holds from judging a placement or migration target to
    /// committing it.
    pub async fn placement_lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.place_lock.lock().await
    }

    pub fn node_id(&self) -> u64 {
        self.config.node_id
    }

    /// A copy of the applied state.
    pub fn read_sm<T>(&self, f: impl FnOnce(&SmData) -> T) -> T {
        let g = self.sm.read().unwrap_or_else(|p| p.into_inner());
        f(&g)
    }

    pub fn cluster_info(&self) -> Option<ClusterInfo> {
        self.read_sm(|d| d.state.cluster.clone())
    }

    /// This agent's registration record.
    pub fn registration(&self) -> NodeRegistration {
        let c = &self.config;
        let cert_expires_unix_ms = self.credentials().expires_unix_ms;
        NodeRegistration {
            trust: crate::state::NodeTrust {
                migration_plaintext: c.migration_insecure_plaintext,
                raft_plaintext: c.raft_insecure_plaintext,
                cert_expires_unix_ms,
                cert_ca_sha256: self.credentials().cert_ca_sha256.clone(),
            },
            node_id: c.node_id,
            name: c.name.clone(),
            mgmt_addr: c.mgmt_addr.to_string(),
            raft_addr: c.raft_addr.to_string(),
            migration_addr: c.migration_addr.to_string(),
            mgmt_subnet: c.mgmt_subnet.to_string(),
            migration_subnet: c.migration_subnet.to_string(),
            facts: self.facts.clone(),
            networks: c
                .networks
                .iter()
                .map(|n| (n.name.clone(), n.bridge.clone()))
                .collect(),
            power: c.power.clone(),
        }
    }

    pub fn peer_node(&self) -> PeerNode {
        PeerNode {
            raft_addr: self.config.raft_addr.to_string(),
            mgmt_addr: self.config.mgmt_addr.to_string(),
        }
    }

    fn record_cluster_id(&self, cluster_id: &str) {
        let mut dd = self.data_dir.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = dd.set_cluster_id(cluster_id) {
            tracing::error!(error = %crate::error_chain(&e), "cannot record the cluster id in the identity marker");
        }
    }

    /// Bootstrap a one-node cluster on this agent.
    pub async fn init_cluster(&self, cluster_name: &str) -> Result<ClusterInfo, WriteError> {
        if self.raft.is_initialized().await.map_err(raft_err)? {
            let cluster_id = self
                .cluster_info()
                .map(|c| c.cluster_id)
                .unwrap_or_default();
            return Err(WriteError::AlreadyMember { cluster_id });
        }
        let mut members = BTreeMap::new();
        members.insert(self.node_id(), self.peer_node());
        self.raft.initialize(members).await.map_err(raft_err)?;
        let cluster_id = random_hex128();
        self.write(ForwardRequest::Command(Command::InitCluster {
            cluster_id: cluster_id.clone(),
            cluster_name: cluster_name.to_string(),
            at_unix_ms: now_unix_ms(),
        }))
        .await?;
        self.write(ForwardRequest::Command(Command::RegisterNode {
            registration: self.registration(),
            at_unix_ms: now_unix_ms(),
        }))
        .await?;
        self.record_cluster_id(&cluster_id);
        self.cluster_info().ok_or(WriteError::NotInitialized)
    }

    /// Called after a successful join to remember the cluster.
    pub fn joined(&self, cluster_id: &str) {
        self.record_cluster_id(cluster_id);
    }

    /// Submit a write: execute it if this agent leads, else forward it to the leader.
    /// Retries while the leader is unknown or changing, up to [`WRITE_DEADLINE`].
    pub async fn write(&self, req: ForwardRequest) -> Result<ForwardReply, WriteError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            let m = self.raft.metrics().borrow().clone();
            let attempt = match m.current_leader {
                Some(l) if l == self.node_id() => self.execute_as_leader(req.clone()).await,
                Some(l) => match m.membership_config.membership().get_node(&l) {
                    Some(node) => {
                        let reply = self.forward(l, node.clone(), &req).await;
                        if let Ok(ForwardReply::Command { log_index, .. }) = &reply {
                            self.wait_applied(*log_index).await;
                        }
                        reply
                    }
                    None => Err(WriteError::NotLeader {
                        this: self.node_id(),
                        leader: Some(l),
                    }),
                },
                None => Err(WriteError::NotLeader {
                    this: self.node_id(),
                    leader: None,
                }),
            };
            match attempt {
                Err(WriteError::NotLeader { .. }) | Err(WriteError::Forward { .. })
                    if start.elapsed() < WRITE_DEADLINE =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
                Err(WriteError::NotLeader { .. }) => {
                    return Err(WriteError::NoLeader {
                        waited_ms: start.elapsed().as_millis() as u64,
                    })
                }
                other => return other,
            }
        }
    }

    /// Read-your-writes through a follower: wait (up to [`APPLY_WAIT`]) until this
    /// replica has applied the write the leader committed at `log_index`, so a read on
    /// this agent right after the write sees it. The write is committed either way.
    async fn wait_applied(&self, log_index: u64) {
        if let Err(e) = self
            .raft
            .wait(Some(APPLY_WAIT))
            .applied_index_at_least(Some(log_index), "forwarded write applied locally")
            .await
        {
            tracing::warn!(log_index, error = %e, "forwarded write not yet applied here");
        }
    }

    async fn forward(
        &self,
        leader: u64,
        node: PeerNode,
        req: &ForwardRequest,
    ) -> Result<ForwardReply, WriteError> {
        let fwd_err = |message: String| WriteError::Forward {
            leader,
            addr: node.raft_addr.clone(),
            message,
        };
        let timeout = LEARNER_CATCH_UP_TIMEOUT + self.config.rpc_timeout;
        self.peers
            .forward(&node.raft_addr, req, timeout)
            .await
            .map_err(|e| fwd_err(e.0))?
    }

    /// Whether node `node`'s VMM runs or receives `vm`, asked over the peer plane.
    pub async fn vm_presence(
        &self,
        node: u64,
        vm: &str,
    ) -> Result<super::peers::VmPresence, super::peers::PeerCallError> {
        let addr = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.raft_addr.clone())
            .ok_or_else(|| super::peers::PeerCallError(format!("node {node} is not a member")))?;
        self.peers
            .vm_presence(&addr, vm, self.config.rpc_timeout)
            .await
    }

    /// Execute a write on this agent, which must be the leader.
    pub async fn execute_as_leader(&self, req: ForwardRequest) -> Result<ForwardReply, WriteError> {
        match req {
            ForwardRequest::Command(cmd) => {
                let t0 = std::time::Instant::now();
                let resp = self
                    .raft
                    .client_write(cmd)
                    .await
                    .map_err(|e| self.client_write_err(e))?;
                tracing::debug!(
                    target: crate::raft::store::TIMING,
                    index = resp.log_id.index,
                    us = t0.elapsed().as_micros() as u64,
                    "client_write"
                );
                if let CommandResult::Rejected { reason } = resp.data {
                    return Err(WriteError::Rejected { reason });
                }
                Ok(ForwardReply::Command {
                    result: resp.data,
                    log_index: resp.log_id.index,
                })
            }
            ForwardRequest::Admit(reg) => self.admit(reg).await,
            ForwardRequest::Remove { node_id } => self.remove(node_id).await,
        }
    }

    fn client_write_err(
        &self,
        e: RaftError<NodeId, ClientWriteError<NodeId, PeerNode>>,
    ) -> WriteError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => WriteError::NotLeader {
                this: self.node_id(),
                leader: f.leader_id,
            },
            other => WriteError::Raft {
                message: other.to_string(),
            },
        }
    }

    fn membership(&self) -> (BTreeSet<u64>, BTreeMap<u64, PeerNode>) {
        let m = self.raft.metrics().borrow().membership_config.clone();
        let voters = m.membership().voter_ids().collect();
        let nodes = m
            .membership()
            .nodes()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        (voters, nodes)
    }

    async fn admit(&self, reg: NodeRegistration) -> Result<ForwardReply, WriteError> {
        let Some(info) = self.cluster_info() else {
            return Err(WriteError::NotInitialized);
        };
        let id = reg.node_id;
        if id == 0 {
            return Err(WriteError::Rejected {
                reason: "node id 0 is reserved".into(),
            });
        }
        let (voters, nodes) = self.membership();
        let peer = PeerNode {
            raft_addr: reg.raft_addr.clone(),
            mgmt_addr: reg.mgmt_addr.clone(),
        };
        match nodes.get(&id) {
            Some(existing) if *existing != peer => {
                return Err(WriteError::DuplicateNode {
                    node_id: id,
                    existing: format!("the member at {}", existing.mgmt_addr),
                })
            }
            Some(_) => {}
            None => {
                if let Some((other, _)) = nodes
                    .iter()
                    .find(|(_, n)| n.raft_addr == peer.raft_addr || n.mgmt_addr == peer.mgmt_addr)
                {
                    return Err(WriteError::DuplicateNode {
                        node_id: id,
                        existing: format!("address already used by member {other}"),
                    });
                }
            }
        }
        if !voters.contains(&id) && voters.len() >= MAX_VOTERS {
            return Err(WriteError::TooManyVoters {
                voters: voters.len(),
                max: MAX_VOTERS,
            });
        }
        if !nodes.contains_key(&id) {
            tracing::info!(node_id = id, raft_addr = %reg.raft_addr, "adding learner");
            let added = tokio::time::timeout(
                LEARNER_CATCH_UP_TIMEOUT,
                self.raft.add_learner(id, peer.clone(), true),
            )
            .await;
            match added {
                Ok(r) => {
                    r.map_err(|e| self.client_write_err(e))?;
                }
                Err(_) => {
                    // Take the unreachable learner out again so it does not linger.
                    let mut set = BTreeSet::new();
                    set.insert(id);
                    if let Err(e) = self
                        .raft
                        .change_membership(ChangeMembers::RemoveNodes(set), false)
                        .await
                    {
                        tracing::warn!(node_id = id, error = %e, "cannot remove the learner that did not catch up");
                    }
                    return Err(WriteError::LearnerTimeout {
                        node_id: id,
                        raft_addr: reg.raft_addr,
                        waited_ms: LEARNER_CATCH_UP_TIMEOUT.as_millis() as u64,
                    });
                }
            }
        }
        if !voters.contains(&id) {
            tracing::info!(node_id = id, "promoting learner to voter");
            let mut set = BTreeSet::new();
            set.insert(id);
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(set), false)
                .await
                .map_err(|e| self.client_write_err(e))?;
        }
        let resp = self
            .raft
            .client_write(Command::RegisterNode {
                registration: reg,
                at_unix_ms: now_unix_ms(),
            })
            .await
            .map_err(|e| self.client_write_err(e))?;
        if let CommandResult::Rejected { reason } = resp.data {
            return Err(WriteError::Rejected { reason });
        }
        self.mark_seen(id);
        let (voters, _) = self.membership();
        Ok(ForwardReply::Admitted {
            cluster_id: info.cluster_id,
            cluster_name: info.cluster_name,
            leader_id: self.node_id(),
            voter_count: voters.len() as u64,
        })
    }

    async fn remove(&self, node_id: u64) -> Result<ForwardReply, WriteError> {
        let (voters, nodes) = self.membership();
        let registered = self.read_sm(|d| d.state.nodes.contains_key(&node_id));
        if !registered && !nodes.contains_key(&node_id) {
            return Err(WriteError::UnknownNode { node_id });
        }
        if voters.len() == 1 && voters.contains(&node_id) {
            return Err(WriteError::LastVoter { node_id });
        }
        if registered {
            let resp = self
                .raft
                .client_write(Command::RemoveNode {
                    node_id,
                    at_unix_ms: now_unix_ms(),
                })
                .await
                .map_err(|e| self.client_write_err(e))?;
            if let CommandResult::Rejected { reason } = resp.data {
                return Err(WriteError::Rejected { reason });
            }
        }
        if nodes.contains_key(&node_id) {
            let mut set = BTreeSet::new();
            set.insert(node_id);
            let change = if voters.contains(&node_id) {
                ChangeMembers::RemoveVoters(set)
            } else {
                ChangeMembers::RemoveNodes(set)
            };
            self.raft
                .change_membership(change, false)
                .await
                .map_err(|e| self.client_write_err(e))?;
        }
        let (voters, _) = self.membership();
        Ok(ForwardReply::Removed {
            voter_count: voters.len() as u64,
        })
    }

    /// Record a heartbeat from a peer (every node keeps them, see `liveness`), and the
    /// demand report it carries. Returns whether this agent is the leader.
    pub fn heartbeat_received(&self, hb: &Heartbeat) -> bool {
        self.lock_liveness().heard(hb, Instant::now());
        if let Some(d) = &hb.demand {
            self.lock_demand()
                .board
                .record(hb.node_id, d.clone(), Instant::now());
        }
        self.raft.metrics().borrow().current_leader == Some(self.node_id())
    }

    pub(super) fn lock_demand(&self) -> std::sync::MutexGuard<'_, DemandState> {
        self.demand.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publish this node's newest demand report: kept on this agent's board and sent with
    /// the next heartbeat round.
    pub fn set_local_demand(&self, report: super::demand::NodeDemand) {
        let mut d = self.lock_demand();
        d.board
            .record(self.node_id(), report.clone(), Instant::now());
        d.unsent = Some(report);
    }

    fn lock_power(&self) -> std::sync::MutexGuard<'_, PowerBoard> {
        self.power.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A placement found no room (`why`): the power controller wakes a standby node.
    pub fn note_capacity_short(&self, why: String) {
        self.lock_power().capacity_short = Some(why);
    }

    /// The last placement shortfall noted, cleared.
    pub fn take_capacity_short(&self) -> Option<String> {
        self.lock_power().capacity_short.take()
    }

    /// Count one power command run by this agent (`action` "off"/"on", `outcome`
    /// "ok"/"failed").
    pub fn note_power_command(&self, action: &'static str, outcome: &'static str) {
        *self.lock_power().runs.entry((action, outcome)).or_default() += 1;
    }

    /// Power commands this agent ran, by action and outcome.
    pub fn power_commands(&self) -> Vec<((&'static str, &'static str), u64)> {
        let b = self.lock_power();
        [
            ("off", "ok"),
            ("off", "failed"),
            ("on", "ok"),
            ("on", "failed"),
        ]
        .into_iter()
        .map(|k| (k, b.runs.get(&k).copied().unwrap_or(0)))
        .collect()
    }

    /// When this agent first saw `node` Waking since `since_unix_ms` (the record's
    /// state change), on its own monotonic clock.
    pub fn waking_seen(&self, node: u64, since_unix_ms: u64) -> Instant {
        let mut b = self.lock_power();
        let e = b
            .waking_seen
            .entry(node)
            .or_insert((since_unix_ms, Instant::now()));
        if e.0 != since_unix_ms {
            *e = (since_unix_ms, Instant::now());
        }
        e.1
    }

    /// This agent heard `node`'s heartbeats within `down_after` (always true of itself).
    pub fn recently_heard(&self, node: u64) -> bool {
        self.lock_liveness().recently_heard(node, Instant::now())
    }

    /// How long this agent has not heard `node` (zero for itself).
    pub fn silence_of(&self, node: u64) -> Duration {
        if node == self.node_id() {
            return Duration::ZERO;
        }
        self.lock_liveness().silence_of(node, Instant::now())
    }

    /// Count one look of the periodic balancer (moves planned or not).
    pub fn note_balance_round(&self) {
        self.balance_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Looks of the periodic balancer on this agent so far.
    pub fn balance_rounds(&self) -> u64 {
        self.balance_rounds
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Count one VM failure of `kind` on this host (see `control::reconciler::failure_kind`).
    pub fn count_vm_failure(&self, kind: &'static str) {
        *self
            .vm_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_default() += 1;
    }

    /// VM failures seen on this host so far, by kind.
    pub fn vm_failures(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.vm_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every node's demand report that is still fresh (see [`super::demand`]).
    pub fn demand(&self) -> std::collections::BTreeMap<u64, super::demand::NodeDemand> {
        self.lock_demand().board.fresh(Instant::now())
    }

    pub(super) fn lock_liveness(&self) -> std::sync::MutexGuard<'_, Liveness> {
        self.liveness.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark_seen(&self, node_id: u64) {
        self.lock_liveness().heard_now(node_id);
    }

    /// The nodes of `state` that have been Down for at least `grace`, measured on this
    /// agent's monotonic clock from when it first saw them Down (see [`DownClock`]).
    pub fn down_for_at_least(&self, state: &ClusterState, grace: Duration) -> Vec<u64> {
        self.down_clock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ready(state, Instant::now(), grace)
    }

    /// Note the nodes Down in the applied state now, so a grace counts from about when
    /// this agent applied the Down rather than from its first question (the heartbeat
    /// loop calls this every round).
    pub(super) fn observe_downs(&self) {
        let now = Instant::now();
        self.read_sm(|d| {
            self.down_clock
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ready(&d.state, now, Duration::MAX)
        });
    }

    /// This node's lease (see `liveness`): whether it may run VMs now. The members are
    /// taken from the applied state first: before its first heartbeat round a restarted
    /// agent must not take itself for a one-node cluster (which needs no acknowledgement
    /// and no catch-up) and start VMs from its stale replica.
    pub fn lease(&self) -> crate::node::liveness::LeaseView {
        let m = self.raft.metrics().borrow().clone();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let members: Vec<u64> = self.read_sm(|d| d.state.nodes.keys().copied().collect());
        let mut l = self.lock_liveness();
        l.set_members(members);
        l.lease(Instant::now(), applied)
    }
}

fn raft_err<E: std::fmt::Display>(e: E) -> WriteError {
    WriteError::Raft {
        message: e.to_string(),
    }
}
