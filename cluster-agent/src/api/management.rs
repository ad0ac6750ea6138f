//! Server side of the public management service (`cluster.management.v1.Management`).

use std::sync::Arc;
use std::time::Duration;

use cluster_proto::management as pb;
use cluster_proto::management::management_service_client::ManagementServiceClient;
use cluster_proto::management::management_service_server::ManagementService;
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::api::convert::nodes as convert;
use crate::api::{paging, status};
use crate::node::{Agent, ForwardReply, ForwardRequest};
use crate::state::{Command, CommandResult, NodeState, KV_KEY_LEN_MAX, KV_VALUE_LEN_MAX};

/// The most events a watch reads from the replica at once.
const EVENTS_WATCH_BATCH: usize = 1_000;
/// Events a watch buffers for a slow client before it waits for it.
const EVENTS_WATCH_BUFFER: usize = 256;

type EventStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send>,
>;
/// How long a joining agent waits for the member it contacts to answer.
pub const JOIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a joined agent waits to apply its own membership before answering.
pub const JOIN_APPLY_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ManagementApi {
    pub agent: Arc<Agent>,
    /// The web console's logins (`None`: this agent serves no console).
    pub console: Option<Arc<crate::api::console::Sessions>>,
}

#[tonic::async_trait]
impl ManagementService for ManagementApi {
    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let a = &self.agent;
        let m = a.metrics();
        let membership = m.membership_config.membership();
        let voter_ids: Vec<u64> = membership.voter_ids().collect();
        let learner_ids: Vec<u64> = membership.learner_ids().collect();
        let leader_mgmt_addr = m
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.mgmt_addr.clone()))
            .unwrap_or_default();
        let raft_state = match m.state {
            ServerState::Leader => pb::RaftState::Leader,
            ServerState::Follower if learner_ids.contains(&a.node_id()) => pb::RaftState::Learner,
            ServerState::Follower => pb::RaftState::Follower,
            ServerState::Candidate => pb::RaftState::Candidate,
            ServerState::Learner => pb::RaftState::Learner,
            ServerState::Shutdown => pb::RaftState::Shutdown,
        };
        let info = a.cluster_info();
        let ca = crate::api::ca::ca_info(a);
        Ok(Response::new(pb::ClusterStatusResponse {
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            this_node_id: a.node_id(),
            raft_state: raft_state as i32,
            initialized: !voter_ids.is_empty(),
            voter_ids,
            learner_ids,
            cluster_id: info
                .as_ref()
                .map(|i| i.cluster_id.clone())
                .unwrap_or_default(),
            cluster_name: info.map(|i| i.cluster_name).unwrap_or_default(),
            last_applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            leader_mgmt_addr,
            ca_fingerprint: ca.current_fingerprint,
            previous_ca_fingerprint: ca.previous_fingerprint,
        }))
    }

    async fn init_cluster(
        &self,
        request: Request<pb::InitClusterRequest>,
    ) -> Result<Response<pb::InitClusterResponse>, Status> {
        let name = request.get_ref().cluster_name.trim().to_string();
        let name = if name.is_empty() {
            "vm-cluster".to_string()
        } else {
            name
        };
        if name.len() > 63 {
            return Err(Status::invalid_argument(
                "cluster_name must be at most 63 characters",
            ));
        }
        let info = self.agent.init_cluster(&name).await?;
        tracing::info!(cluster_id = %info.cluster_id, cluster_name = %info.cluster_name, "cluster initialized");
        Ok(Response::new(pb::InitClusterResponse {
            cluster_id: info.cluster_id,
            leader_id: self.agent.node_id(),
        }))
    }

    async fn join_cluster(
        &self,
        request: Request<pb::JoinClusterRequest>,
    ) -> Result<Response<pb::JoinClusterResponse>, Status> {
        let via = request.get_ref().via.trim().to_string();
        let a = &self.agent;
        if via.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "join address {via:?} is not an IP:port address, e.g. 127.0.1.1:7001"
            )));
        }
        if a.raft()
            .is_initialized()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
        {
            let id = a.cluster_info().map(|c| c.cluster_id).unwrap_or_default();
            return Err(Status::failed_precondition(format!(
                "this agent (node {}) is already a member of cluster {id}; `clusterctl cluster leave` it first",
                a.node_id()
            )));
        }
        let endpoint = crate::api::tls::endpoint(&a.credentials(), &via)
            .map_err(|e| {
                Status::invalid_argument(format!("join address {via:?} is not usable: {e}"))
            })?
            .local_address(a.config().mgmt_source_ip())
            .connect_timeout(JOIN_CONNECT_TIMEOUT)
            .timeout(crate::node::LEARNER_CATCH_UP_TIMEOUT + crate::node::WRITE_DEADLINE);
        let channel = endpoint.connect().await.map_err(|e| {
            Status::unavailable(format!(
                "cannot reach join address {via}: {}",
                crate::error_chain(&e)
            ))
        })?;
        let mut client = ManagementServiceClient::new(channel);
        let reg = convert::registration_to_pb(&a.registration());
        let reply = client.admit_node(reg).await.map_err(|s| {
            Status::new(
                s.code(),
                format!("the member at {via} refused the join: {}", s.message()),
            )
        })?;
        let r = reply.into_inner();
        // The leader answers once it has replicated to us; wait (bounded) until this
        // agent has applied its own membership too, so a status right after the
        // join already shows the cluster.
        let me = a.node_id();
        if let Err(e) = a
            .raft()
            .wait(Some(JOIN_APPLY_TIMEOUT))
            .metrics(
                |m| {
                    m.membership_config
                        .membership()
                        .voter_ids()
                        .any(|v| v == me)
                },
                "own membership applied",
            )
            .await
        {
            tracing::warn!(error = %e, "joined, but this agent has not applied its membership yet");
        }
        a.joined(&r.cluster_id);
        tracing::info!(cluster_id = %r.cluster_id, via = %via, "joined cluster");
        Ok(Response::new(pb::JoinClusterResponse {
            cluster_id: r.cluster_id,
            leader_id: r.leader_id,
            voter_count: r.voter_count,
        }))
    }

    async fn admit_node(
        &self,
        request: Request<pb::AdmitNodeRequest>,
    ) -> Result<Response<pb::AdmitNodeResponse>, Status> {
        // A node admits itself only: its certificate names the id it registers.
        if let Some(crate::api::auth::Caller(cluster_proto::pki::Identity::Node(id))) =
            request.extensions().get()
        {
            let claimed = request.get_ref().node_id;
            if *id != claimed {
                return Err(Status::permission_denied(format!(
                    "node {id} cannot register as node {claimed}"
                )));
            }
        }
        let reg = convert::registration_from_pb(request.get_ref())?;
        // Both ends of the peer plane must speak alike (or they never reach each other).
        let here = self.agent.config().raft_insecure_plaintext;
        if reg.trust.raft_plaintext != here {
            let word = |p: bool| if p { "plaintext" } else { "mutual TLS" };
            return Err(Status::failed_precondition(format!(
                "node {}'s peer plane is {} but this cluster's is {}: set \
                 raft_insecure_plaintext alike on every node",
                reg.node_id,
                word(reg.trust.raft_plaintext),
                word(here)
            )));
        }
        match self.agent.write(ForwardRequest::Admit(reg)).await? {
            ForwardReply::Admitted {
                cluster_id,
                cluster_name,
                leader_id,
                voter_count,
            } => Ok(Response::new(pb::AdmitNodeResponse {
                cluster_id,
                cluster_name,
                leader_id,
                voter_count,
            })),
            other => Err(status::unexpected_reply(&other)),
        }
    }

    async fn leave_cluster(
        &self,
        request: Request<pb::LeaveClusterRequest>,
    ) -> Result<Response<pb::LeaveClusterResponse>, Status> {
        let node_id = request.get_ref().node_id;
        if node_id == 0 {
            return Err(Status::invalid_argument(
                "node_id 0 is reserved; give the id of a member",
            ));
        }
        match self.agent.write(ForwardRequest::Remove { node_id }).await? {
            ForwardReply::Removed { voter_count } => {
                Ok(Response::new(pb::LeaveClusterResponse { voter_count }))
            }
            other => Err(status::unexpected_reply(&other)),
        }
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let (voters, learners) = {
            let m = self.agent.metrics();
            let mem = m.membership_config.membership();
            (
                mem.voter_ids().collect::<Vec<_>>(),
                mem.learner_ids().collect::<Vec<_>>(),
            )
        };
        let demand = self.agent.demand();
        let nodes = self.agent.read_sm(|d| {
            d.state
                .nodes
                .values()
                .map(|r| {
                    let id = r.registration.node_id;
                    let role = if voters.contains(&id) {
                        pb::RaftRole::Voter
                    } else if learners.contains(&id) {
                        pb::RaftRole::Learner
                    } else {
                        pb::RaftRole::None
                    };
                    pb::NodeInfo {
                        demand: crate::api::convert::demand::node_demand_to_pb(&demand, id),
                        ..convert::node_to_pb(r, role)
                    }
                })
                .collect()
        });
        let r = request.get_ref();
        let (nodes, next_page_token) = crate::api::paging::page(
            nodes,
            |n: &pb::NodeInfo| n.node_id,
            r.page_size,
            &r.page_token,
        )?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes,
            next_page_token,
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::GetNodeResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let id = request.get_ref().node_id;
        let m = self.agent.metrics();
        let mem = m.membership_config.membership();
        let role = if mem.voter_ids().any(|v| v == id) {
            pb::RaftRole::Voter
        } else if mem.learner_ids().any(|v| v == id) {
            pb::RaftRole::Learner
        } else {
            pb::RaftRole::None
        };
        let demand = self.agent.demand();
        self.agent
            .read_sm(|d| {
                d.state.nodes.get(&id).map(|r| pb::NodeInfo {
                    demand: crate::api::convert::demand::node_demand_to_pb(&demand, id),
                    ..convert::node_to_pb(r, role)
                })
            })
            .map(|node| Response::new(pb::GetNodeResponse { node: Some(node) }))
            .ok_or_else(|| {
                Status::not_found(format!(
                    "unknown node id {id}; `clusterctl node list` shows the members"
                ))
            })
    }

    async fn set_node_state(
        &self,
        request: Request<pb::SetNodeStateRequest>,
    ) -> Result<Response<pb::SetNodeStateResponse>, Status> {
        let r = request.into_inner();
        let target = match r.state() {
            pb::NodeState::Paused => NodeState::Paused,
            pb::NodeState::Up => NodeState::Up,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "state {} cannot be set by hand; use NODE_STATE_PAUSED or NODE_STATE_UP (down is decided by liveness)",
                    cluster_proto::names::name_of::<pb::NodeState>(r.state)
                )))
            }
        };
        if r.reason.len() > 256 {
            return Err(Status::invalid_argument("reason must be at most 256 bytes"));
        }
        let current = self
            .agent
            .read_sm(|d| d.state.nodes.get(&r.node_id).map(|n| n.state));
        match current {
            None => {
                return Err(Status::not_found(format!(
                    "unknown node id {}; `clusterctl node list` shows the members",
                    r.node_id
                )))
            }
            Some(NodeState::Down) => {
                return Err(Status::failed_precondition(format!(
                    "node {} is down; it becomes up by itself when its agent reports again",
                    r.node_id
                )))
            }
            Some(s) if s.is_asleep() => {
                return Err(Status::failed_precondition(format!(
                    "node {} is {s}; `clusterctl node wake {}` brings it back",
                    r.node_id, r.node_id
                )))
            }
            Some(_) => {}
        }
        let reason = if r.reason.is_empty() {
            format!("set to {} by an operator", target.as_str())
        } else {
            r.reason
        };
        let node = self
            .commit_for_node(
                r.node_id,
                Command::SetNodeState {
                    node_id: r.node_id,
                    state: target,
                    at_unix_ms: crate::node::now_unix_ms(),
                    reason,
                },
            )
            .await?;
        Ok(Response::new(pb::SetNodeStateResponse { node }))
    }

    async fn standby_node(
        &self,
        request: Request<pb::StandbyNodeRequest>,
    ) -> Result<Response<pb::StandbyNodeResponse>, Status> {
        let r = request.into_inner();
        let reason = power_reason(&r.reason, "standby asked for by an operator")?;
        let node = self
            .commit_for_node(
                r.node_id,
                Command::Power(crate::state::power::PowerCommand::RequestStandby {
                    node: r.node_id,
                    reason,
                    at_unix_ms: crate::node::now_unix_ms(),
                }),
            )
            .await?;
        Ok(Response::new(pb::StandbyNodeResponse { node }))
    }

    async fn wake_node(
        &self,
        request: Request<pb::WakeNodeRequest>,
    ) -> Result<Response<pb::WakeNodeResponse>, Status> {
        let r = request.into_inner();
        let reason = power_reason(&r.reason, "woken by an operator")?;
        let node = self
            .commit_for_node(
                r.node_id,
                Command::Power(crate::state::power::PowerCommand::BeginWake {
                    node: r.node_id,
                    reason,
                    at_unix_ms: crate::node::now_unix_ms(),
                }),
            )
            .await?;
        Ok(Response::new(pb::WakeNodeResponse { node }))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let r = request.get_ref();
        let size = paging::page_size(r.page_size)?;
        // The page token is the seq of the page before's last event: pages keep their
        // place while the log grows and drops its oldest.
        let after =
            paging::token_key::<u64>(&r.page_token)?.map_or(r.after_seq, |t| t.max(r.after_seq));
        let (mut events, last_seq): (Vec<pb::Event>, u64) = self.agent.read_sm(|d| {
            (
                d.state
                    .events_after(after, size + 1)
                    .iter()
                    .map(convert::event_to_pb)
                    .collect(),
                d.state.last_event_seq,
            )
        });
        let more = events.len() > size;
        events.truncate(size);
        let next_page_token = match events.last() {
            Some(last) if more => paging::token(last.seq),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListEventsResponse {
            events,
            last_seq,
            next_page_token,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let mut after = request.into_inner().after_seq;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENTS_WATCH_BUFFER);
        let agent = self.agent.clone();
        let mut applied = crate::api::read::AppliedWatch::new(&agent);
        tokio::spawn(async move {
            loop {
                let events: Vec<pb::Event> = agent.read_sm(|d| {
                    d.state
                        .events_after(after, EVENTS_WATCH_BATCH)
                        .iter()
                        .map(convert::event_to_pb)
                        .collect()
                });
                let events_len = events.len();
                for event in events {
                    after = event.seq;
                    let update = pb::WatchEventsResponse { event: Some(event) };
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                }
                if events_len == EVENTS_WATCH_BATCH {
                    // More are waiting: read them before waiting for an apply.
                    continue;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = applied.changed() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        crate::api::certificates::create_join_token(&self.agent, request).await
    }

    async fn issue_certificate(
        &self,
        request: Request<pb::IssueCertificateRequest>,
    ) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        crate::api::certificates::issue_certificate(&self.agent, request).await
    }

    async fn revoke_certificate(
        &self,
        request: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        crate::api::certificates::revoke_certificate(&self.agent, request).await
    }

    async fn list_revocations(
        &self,
        request: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        crate::api::certificates::list_revocations(&self.agent, request).await
    }

    async fn rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::RotateCaResponse>, Status> {
        crate::api::ca::rotate(&self.agent, request).await
    }

    async fn finish_ca_rotation(
        &self,
        request: Request<pb::FinishCaRotationRequest>,
    ) -> Result<Response<pb::FinishCaRotationResponse>, Status> {
        crate::api::ca::finish(&self.agent, request).await
    }

    async fn get_ca(
        &self,
        request: Request<pb::GetCaRequest>,
    ) -> Result<Response<pb::GetCaResponse>, Status> {
        crate::api::ca::get(&self.agent, request).await
    }

    async fn renew_node_certificate(
        &self,
        request: Request<pb::RenewNodeCertificateRequest>,
    ) -> Result<Response<pb::RenewNodeCertificateResponse>, Status> {
        crate::api::certificates::renew_node_certificate(&self.agent, request).await
    }

    async fn console_login(
        &self,
        request: Request<pb::ConsoleLoginRequest>,
    ) -> Result<Response<pb::ConsoleLoginResponse>, Status> {
        crate::api::console::login(self.console.as_deref(), &self.agent, &request)
            .map(Response::new)
    }

    async fn put_kv(
        &self,
        request: Request<pb::PutKvRequest>,
    ) -> Result<Response<pb::PutKvResponse>, Status> {
        let r = request.into_inner();
        if r.key.is_empty() {
            return Err(Status::invalid_argument("key must not be empty"));
        }
        if r.key.len() > KV_KEY_LEN_MAX {
            return Err(Status::invalid_argument(format!(
                "key is {} bytes; the limit is {KV_KEY_LEN_MAX}",
                r.key.len()
            )));
        }
        if r.value.len() > KV_VALUE_LEN_MAX {
            return Err(Status::invalid_argument(format!(
                "value is {} bytes; the limit is {KV_VALUE_LEN_MAX}",
                r.value.len()
            )));
        }
        // Full: answered from this replica (the state machine refuses it too).
        if let Some(reason) = self.agent.read_sm(|d| d.state.kv_full(&r.key)) {
            return Err(Status::resource_exhausted(reason));
        }
        match self
            .agent
            .write(ForwardRequest::Command(Command::PutKv {
                key: r.key,
                value: r.value,
            }))
            .await?
        {
            ForwardReply::Command {
                result: CommandResult::Kv { previous },
                log_index,
            } => Ok(Response::new(pb::PutKvResponse {
                log_index,
                had_previous: previous.is_some(),
                previous: previous.unwrap_or_default(),
            })),
            other => Err(status::unexpected_reply(&other)),
        }
    }

    async fn get_kv(
        &self,
        request: Request<pb::GetKvRequest>,
    ) -> Result<Response<pb::GetKvResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let key = &request.get_ref().key;
        let v = self.agent.read_sm(|d| d.state.kv.get(key).cloned());
        Ok(Response::new(pb::GetKvResponse {
            found: v.is_some(),
            value: v.unwrap_or_default(),
        }))
    }
}

impl ManagementApi {
    /// Commits `cmd`, an operator's change to node `node_id`, and answers with the node as
    /// it is then.
    async fn commit_for_node(
        &self,
        node_id: u64,
        cmd: Command,
    ) -> Result<Option<pb::NodeInfo>, Status> {
        self.agent.write(ForwardRequest::Command(cmd)).await?;
        Ok(self
            .get_node(Request::new(pb::GetNodeRequest { node_id }))
            .await?
            .into_inner()
            .node)
    }
}

/// An operator's reason for a standby or a wake-up (at most 256 bytes), or `default`.
fn power_reason(given: &str, default: &str) -> Result<String, Status> {
    if given.len() > 256 {
        return Err(Status::invalid_argument("reason must be at most 256 bytes"));
    }
    Ok(if given.is_empty() {
        default.to_owned()
    } else {
        given.to_owned()
    })
}
