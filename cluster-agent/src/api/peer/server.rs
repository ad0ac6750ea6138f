//! Server side of the peer-only Raft service (`cluster.raft.v1.RaftPeer`).

use std::sync::Arc;

use cluster_proto::raft::raft_peer_server::RaftPeer;
use cluster_proto::raft::{
    HeartbeatReply, HeartbeatRequest, RaftPayload, ReadIndexReply, ReadIndexRequest,
    VmPresenceReply, VmPresenceRequest,
};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::api::peer::client::{decode, encode};
use crate::api::status;
use crate::node::liveness::{Heartbeat, PeerSilence};
use crate::node::peers::ReadIndex;
use crate::node::{Agent, ForwardReply, ForwardRequest, WriteError};
use crate::raft::{NodeId, TypeConfig};

pub struct PeerService {
    pub agent: Arc<Agent>,
    /// This node's VMM (for [`RaftPeer::vm_presence`]).
    pub host: Arc<crate::vmhost::VmHost>,
}

fn reply<T: serde::Serialize>(what: &'static str, v: &T) -> Result<Response<RaftPayload>, Status> {
    encode(what, v)
        .map(Response::new)
        .map_err(|e| Status::internal(crate::error_chain(&e)))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: AppendEntriesRequest<TypeConfig> =
            decode("peer", "append_entries request", request.get_ref())
                .map_err(status::peer_payload)?;
        let res = self.agent.raft().append_entries(req).await;
        reply("append_entries reply", &res)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let req: VoteRequest<NodeId> =
            decode("peer", "vote request", request.get_ref()).map_err(status::peer_payload)?;
        let res = self.agent.raft().vote(req).await;
        reply("vote reply", &res)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: InstallSnapshotRequest<TypeConfig> =
            decode("peer", "install_snapshot request", request.get_ref())
                .map_err(status::peer_payload)?;
        let res = self.agent.raft().install_snapshot(req).await;
        reply("install_snapshot reply", &res)
    }

    async fn forward_write(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let req: ForwardRequest =
            decode("peer", "forward request", request.get_ref()).map_err(status::peer_payload)?;
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
        reply("forward reply", &res)
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        let hb = request.get_ref();
        let accepted = self.agent.heartbeat_received(&Heartbeat {
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
        });
        let m = self.agent.metrics();
        Ok(Response::new(HeartbeatReply {
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            accepted,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
        }))
    }

    async fn vm_presence(
        &self,
        request: Request<VmPresenceRequest>,
    ) -> Result<Response<VmPresenceReply>, Status> {
        let vm = &request.get_ref().vm;
        if vm.is_empty() {
            return Err(Status::invalid_argument("vm is empty: give the VM's name"));
        }
        Ok(Response::new(VmPresenceReply {
            runs: self.host.list().iter().any(|i| &i.name == vm),
            arriving: self.host.arriving().iter().any(|n| n == vm),
        }))
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        let from = request.get_ref().node_id;
        let reply = match self.agent.read_index_as_leader().await {
            ReadIndex::Confirmed { index } => ReadIndexReply {
                confirmed: true,
                read_index: index,
                reason: String::new(),
                leader_id: self.agent.node_id(),
            },
            ReadIndex::Refused { leader, reason } => {
                tracing::debug!(from, %reason, "read index refused");
                ReadIndexReply {
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
