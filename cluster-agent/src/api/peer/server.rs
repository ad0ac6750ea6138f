//! Server side of the peer-only Raft service (`cluster.raft.v1.RaftPeer`).

use std::sync::Arc;

use cluster_proto::pki::Identity;
use cluster_proto::raft as pb;
use cluster_proto::raft::raft_peer_service_server::RaftPeerService;
use cluster_proto::raft::{
    FetchCaKeyRequest, FetchCaKeyResponse, HeartbeatRequest, HeartbeatResponse,
    HeartbeatStreamRequest, HeartbeatStreamResponse, ReadIndexRequest, ReadIndexResponse,
    VmPresenceRequest, VmPresenceResponse,
};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status, Streaming};

use crate::api::peer::client::{decode, encode};
use crate::api::peer::APPEND_ENTRIES;
use crate::api::status;
use crate::node::liveness::{Heartbeat, PeerSilence};
use crate::node::peers::ReadIndex;
use crate::node::{Agent, ForwardReply, ForwardRequest, WriteError};
use crate::raft::{NodeId, TypeConfig};

pub struct PeerService {
    pub agent: Arc<Agent>,
    /// This node's VMM (for `RaftPeer::vm_presence`).
    pub host: Arc<crate::vmhost::VmHost>,
}

/// The member node that called: the caller's certificate must name a node, and once this
/// node belongs to a cluster, a current member (the replicated membership is the
/// allow-list: a removed node's certificate is refused from the moment its removal is
/// in this node's log). A node not yet in a cluster accepts any node of the CA (the
/// leader that adds it calls before this node knows the membership).
///
/// Over a plaintext peer plane (`raft_insecure_plaintext`) there is no certificate: the
/// caller is the member whose `raft_addr` has the connection's source IP (agents connect
/// from the IP of their `raft_addr`), and a connection from any other address is refused
/// once this node is in a cluster. That identifies, it does not authenticate: anyone
/// who can send from a member's address is that member.
fn member<T>(agent: &Agent, req: &Request<T>) -> Result<NodeId, Status> {
    if agent.config().raft_insecure_plaintext {
        return member_by_address(agent, req);
    }
    let id = match crate::api::tls::caller(req)? {
        Some(Identity::Node(id)) => id,
        Some(other) => {
            return Err(Status::permission_denied(format!(
                "the peer plane serves cluster nodes only, not {other}"
            )))
        }
        None => {
            return Err(Status::unauthenticated(
                "the peer plane needs a node certificate of this cluster",
            ))
        }
    };
    still_member(agent, id)?;
    Ok(id)
}

/// [`member`]'s membership half: node `id` is a current member (or this node is in no
/// cluster yet). A stream rpc asks again for every message it carries.
fn still_member(agent: &Agent, id: NodeId) -> Result<(), Status> {
    let m = agent.metrics_watch();
    let m = m.borrow();
    let membership = m.membership_config.membership();
    let empty = membership.nodes().next().is_none();
    if !empty && membership.get_node(&id).is_none() {
        return Err(Status::permission_denied(format!(
            "node {id} is not a member of this cluster"
        )));
    }
    Ok(())
}

/// One heartbeat from the authenticated `caller`, checked and recorded; the answer.
fn answer_heartbeat(
    agent: &Agent,
    caller: NodeId,
    hb: &HeartbeatRequest,
) -> Result<HeartbeatResponse, Status> {
    claims(caller, Some(hb.node_id), "a heartbeat")?;
    if hb.silences.len() > HEARTBEAT_SILENCES_MAX {
        return Err(Status::invalid_argument(format!(
            "a heartbeat with {} silence reports; at most {HEARTBEAT_SILENCES_MAX} (one per member)",
            hb.silences.len()
        )));
    }
    let accepted = agent.heartbeat_received(&heartbeat_from_pb(hb));
    let m = agent.metrics_watch();
    let m = m.borrow();
    Ok(HeartbeatResponse {
        leader_id: m.current_leader.unwrap_or(0),
        term: m.current_term,
        accepted,
        last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
    })
}

/// [`member`] over a plaintext peer plane: the member with the connection's source IP
/// ([`UNKNOWN_CALLER`] if several members share it, or while this node is in no
/// cluster).
fn member_by_address<T>(agent: &Agent, req: &Request<T>) -> Result<NodeId, Status> {
    let Some(from) = req.remote_addr() else {
        return Err(Status::unauthenticated(
            "the plaintext peer plane cannot tell where this call comes from",
        ));
    };
    let m = agent.metrics();
    let membership = m.membership_config.membership();
    if membership.nodes().next().is_none() {
        return Ok(UNKNOWN_CALLER);
    }
    let found: Vec<NodeId> = membership
        .nodes()
        .filter(|(_, n)| {
            n.raft_addr
                .parse::<std::net::SocketAddr>()
                .is_ok_and(|a| a.ip() == from.ip())
        })
        .map(|(id, _)| *id)
        .collect();
    match found.as_slice() {
        [] => Err(Status::permission_denied(format!(
            "{} is not the raft address of a member of this cluster (the plaintext peer plane \
             knows its callers by address)",
            from.ip()
        ))),
        [one] => Ok(*one),
        // Members sharing an IP: any of them.
        _ => Ok(UNKNOWN_CALLER),
    }
}

/// The caller a plaintext peer plane cannot name (this node is in no cluster yet, or
/// members share the caller's IP): its claims are taken as they are.
const UNKNOWN_CALLER: NodeId = 0;

/// Refuse a message whose claimed sender is not the authenticated one.
fn claims(caller: NodeId, claimed: Option<NodeId>, what: &str) -> Result<(), Status> {
    match claimed {
        Some(c) if c != caller && caller != UNKNOWN_CALLER => Err(Status::permission_denied(
            format!("{what} in the name of node {c} from node {caller}"),
        )),
        _ => Ok(()),
    }
}

/// Silence reports one heartbeat may carry (one per member; clusters have at most
/// `MAX_VOTERS` voters).
pub const HEARTBEAT_SILENCES_MAX: usize = 256;

/// The JSON of a reply, for the `json` field of the rpc's response message.
fn reply<T: serde::Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, Status> {
    encode(what, v).map_err(|e| Status::internal(crate::error_chain(&e)))
}

/// One AppendEntries (`json`, openraft's request) from the authenticated `caller`,
/// checked and handed to Raft; the JSON of openraft's answer.
async fn serve_append_entries(
    agent: &Agent,
    caller: NodeId,
    json: &[u8],
) -> Result<Vec<u8>, Status> {
    let t0 = std::time::Instant::now();
    let req: AppendEntriesRequest<TypeConfig> =
        decode("peer", "append_entries request", json).map_err(status::peer_payload)?;
    claims(caller, req.vote.leader_id().voted_for(), "append_entries")?;
    agent.note_append();
    let entries = req.entries.len();
    let t1 = std::time::Instant::now();
    let res = agent.raft().append_entries(req).await;
    let t2 = std::time::Instant::now();
    let json = reply("append_entries reply", &res)?;
    tracing::debug!(
        target: crate::raft::store::TIMING,
        entries,
        decode_us = (t1 - t0).as_micros() as u64,
        raft_us = (t2 - t1).as_micros() as u64,
        "peer append_entries served"
    );
    Ok(json)
}

/// The answers of a streaming rpc.
type Answers<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The answers to a stream of requests from the authenticated `caller`: each request
/// is answered, in order, by `answer`, once the caller is found still a member (a node
/// removed while its stream is open is refused from its next request on; a plaintext
/// peer plane's caller it could not name by address is taken at its word, as on a unary
/// call). The first refusal ends the stream with its status. Requests are read as the
/// client reads the answers: a client that stops reading stops its stream, not the node.
fn answer_in_order<Req, Resp, F, Fut>(
    agent: Arc<Agent>,
    caller: NodeId,
    inbound: Streaming<Req>,
    answer: F,
) -> Answers<Resp>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Arc<Agent>, Req) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<Resp, Status>> + Send,
{
    let answers = futures::stream::unfold(
        (inbound, agent, answer, false),
        move |(mut inbound, agent, answer, ended)| async move {
            if ended {
                return None;
            }
            let msg = match inbound.message().await {
                Ok(Some(m)) => m,
                // The sender closed the stream or went away.
                Ok(None) | Err(_) => return None,
            };
            let item = if caller == UNKNOWN_CALLER {
                answer(agent.clone(), msg).await
            } else {
                match still_member(&agent, caller) {
                    Ok(()) => answer(agent.clone(), msg).await,
                    Err(e) => Err(e),
                }
            };
            let ended = item.is_err();
            Some((item, (inbound, agent, answer, ended)))
        },
    );
    Box::pin(answers)
}

#[tonic::async_trait]
impl RaftPeerService for PeerService {
    async fn append_entries(
        &self,
        request: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let caller = member(&self.agent, &request)?;
        super::count(&APPEND_ENTRIES.served_unary);
        let json = serve_append_entries(&self.agent, caller, &request.get_ref().json).await?;
        Ok(Response::new(pb::AppendEntriesResponse { json }))
    }

    type AppendEntriesStreamStream = Answers<pb::AppendEntriesStreamResponse>;

    /// Each request on the stream is checked and served like [`Self::append_entries`]'s,
    /// the caller's membership included (see `answer_in_order`), and answered with its
    /// id; the first refusal ends the stream.
    async fn append_entries_stream(
        &self,
        request: Request<Streaming<pb::AppendEntriesStreamRequest>>,
    ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
        let caller = member(&self.agent, &request)?;
        let answers = answer_in_order(
            self.agent.clone(),
            caller,
            request.into_inner(),
            move |agent, msg: pb::AppendEntriesStreamRequest| async move {
                super::count(&APPEND_ENTRIES.served_stream);
                let json = serve_append_entries(&agent, caller, &msg.json).await?;
                Ok(pb::AppendEntriesStreamResponse { id: msg.id, json })
            },
        );
        Ok(Response::new(answers))
    }

    async fn vote(
        &self,
        request: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let caller = member(&self.agent, &request)?;
        let req: VoteRequest<NodeId> = decode("peer", "vote request", &request.get_ref().json)
            .map_err(status::peer_payload)?;
        claims(caller, req.vote.leader_id().voted_for(), "a vote request")?;
        let candidate = req.vote.leader_id().voted_for();
        let res = match candidate {
            // Another leader answered within its lease and its AppendEntries arrive: refused
            // here, as openraft's leader lease would (`node::elections`).
            Some(c) if self.agent.refuses_vote(c) => {
                let m = self.agent.metrics_watch();
                let vote = m.borrow().vote;
                tracing::info!(candidate = c, "vote refused: the leader is heard");
                Ok(openraft::raft::VoteResponse {
                    vote,
                    vote_granted: false,
                    last_log_id: None,
                })
            }
            _ => self.agent.raft().vote(req).await,
        };
        let json = reply("vote reply", &res)?;
        Ok(Response::new(pb::VoteResponse { json }))
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let caller = member(&self.agent, &request)?;
        let req: InstallSnapshotRequest<TypeConfig> =
            decode("peer", "install_snapshot request", &request.get_ref().json)
                .map_err(status::peer_payload)?;
        claims(caller, req.vote.leader_id().voted_for(), "install_snapshot")?;
        self.agent.note_append();
        let res = self.agent.raft().install_snapshot(req).await;
        let json = reply("install_snapshot reply", &res)?;
        Ok(Response::new(pb::InstallSnapshotResponse { json }))
    }

    async fn forward_write(
        &self,
        request: Request<pb::ForwardWriteRequest>,
    ) -> Result<Response<pb::ForwardWriteResponse>, Status> {
        member(&self.agent, &request)?;
        let req: ForwardRequest = decode("peer", "forward request", &request.get_ref().json)
            .map_err(status::peer_payload)?;
        let m = self.agent.metrics();
        // Only the leader executes; a stale forwarder gets NotLeader and re-resolves.
        let res: Result<ForwardReply, WriteError> =
            if m.current_leader == Some(self.agent.node_id()) {
                self.agent.execute_as_leader(req).await
            } else {
                Err(WriteError::NotLeader {
                    this: self.agent.node_id(),
                    leader: m.current_leader,
                })
            };
        let json = reply("forward reply", &res)?;
        Ok(Response::new(pb::ForwardWriteResponse { json }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = member(&self.agent, &request)?;
        answer_heartbeat(&self.agent, caller, request.get_ref()).map(Response::new)
    }

    type HeartbeatStreamStream = Answers<HeartbeatStreamResponse>;

    /// Each heartbeat on the stream is checked like [`Self::heartbeat`]'s, the caller's
    /// membership included (see `answer_in_order`); the first refusal ends the stream.
    async fn heartbeat_stream(
        &self,
        request: Request<Streaming<HeartbeatStreamRequest>>,
    ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
        let caller = member(&self.agent, &request)?;
        let answers = answer_in_order(
            self.agent.clone(),
            caller,
            request.into_inner(),
            move |agent, msg: HeartbeatStreamRequest| async move {
                let Some(hb) = msg.heartbeat.as_ref() else {
                    return Err(Status::invalid_argument(
                        "a heartbeat stream message without its heartbeat",
                    ));
                };
                let ack = answer_heartbeat(&agent, caller, hb)?;
                Ok(HeartbeatStreamResponse { ack: Some(ack) })
            },
        );
        Ok(Response::new(answers))
    }

    async fn vm_presence(
        &self,
        request: Request<VmPresenceRequest>,
    ) -> Result<Response<VmPresenceResponse>, Status> {
        member(&self.agent, &request)?;
        let vm = &request.get_ref().vm;
        if vm.is_empty() {
            return Err(Status::invalid_argument("vm is empty: give the VM's name"));
        }
        Ok(Response::new(VmPresenceResponse {
            runs: self.host.list().iter().any(|i| &i.name == vm),
            arriving: self.host.arriving().iter().any(|n| n == vm),
        }))
    }

    async fn fetch_ca_key(
        &self,
        request: Request<FetchCaKeyRequest>,
    ) -> Result<Response<FetchCaKeyResponse>, Status> {
        let caller = member(&self.agent, &request)?;
        crate::api::ca::fetch_ca_key(&self.agent, caller, request.get_ref()).await
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let caller = member(&self.agent, &request)?;
        let from = request.get_ref().node_id;
        claims(caller, Some(from), "a read-index request")?;
        let reply = match self.agent.read_index_as_leader().await {
            ReadIndex::Confirmed { index } => ReadIndexResponse {
                confirmed: true,
                read_index: index,
                reason: String::new(),
                leader_id: self.agent.node_id(),
            },
            ReadIndex::Refused { leader, reason } => {
                tracing::debug!(from, %reason, "read index refused");
                ReadIndexResponse {
                    confirmed: false,
                    read_index: 0,
                    reason,
                    leader_id: leader.unwrap_or(0),
                }
            }
        };
        Ok(Response::new(reply))
    }
}

/// A heartbeat as the liveness model takes it (the caller checked its size and sender).
pub fn heartbeat_from_pb(hb: &cluster_proto::raft::HeartbeatRequest) -> Heartbeat {
    Heartbeat {
        node_id: hb.node_id,
        incarnation: hb.incarnation,
        silences: hb
            .silences
            .iter()
            .map(|s| PeerSilence {
                node_id: s.node_id,
                silent_ms: s.silent_ms,
            })
            .collect(),
        // A bad report is dropped, never the heartbeat: liveness does not depend on it.
        demand: hb.demand.as_ref().and_then(|d| {
            crate::api::convert::demand::demand_from_pb(d)
                .map_err(
                    |e| tracing::debug!(node = hb.node_id, error = %e, "demand report ignored"),
                )
                .ok()
        }),
    }
}
