//! Client side of the peer-only service: openraft's `RaftNetworkFactory` over tonic
//! ([`Network`]) and the agent's [`PeerClient`] ([`GrpcPeers`]: write forwarding,
//! heartbeats). Requests and replies are openraft's own types, JSON-encoded in
//! the `json` field of each rpc's message; replies carry `Result<Reply, RaftError>` so remote Raft errors come
//! back typed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_proto::raft as pb;
use cluster_proto::raft::raft_peer_service_client::RaftPeerServiceClient;
use cluster_proto::raft::{
    HeartbeatRequest, PeerSilence as PbSilence, ReadIndexRequest, VmPresenceRequest,
};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use crate::node::credentials::{Credentials, SharedCredentials};
use crate::node::liveness::{Heartbeat, HeartbeatAck};
use crate::node::peers::{PeerCallError, PeerClient, PeerFuture, ReadIndex, VmPresence};
use crate::node::{ForwardReply, ForwardRequest, WriteError};
use crate::raft::{NodeId, PeerNode, TypeConfig};

/// Largest gRPC message accepted on the peer service (snapshot chunks are smaller).
pub const PEER_MESSAGE_LEN_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("{addr:?} is not a valid peer address")]
    BadAddress {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("peer at {addr} did not answer {rpc}")]
    Rpc {
        addr: String,
        rpc: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("cannot encode {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("peer at {addr} sent an undecodable {what}")]
    Decode {
        addr: String,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("payload of {len} bytes exceeds the limit of {PEER_MESSAGE_LEN_MAX}")]
    TooLarge { len: usize },
}

/// A lazily connecting channel to a peer's Raft service over mutual TLS (plaintext, h2c,
/// only when `plaintext`: `raft_insecure_plaintext`), leaving from `local` when given.
pub fn peer_channel(
    credentials: &Credentials,
    addr: &str,
    timeout: Duration,
    local: Option<IpAddr>,
    plaintext: bool,
) -> Result<Channel, PeerError> {
    let bad = |source| PeerError::BadAddress {
        addr: addr.to_string(),
        source,
    };
    let ep = if plaintext {
        tonic::transport::Endpoint::from_shared(format!("http://{addr}")).map_err(bad)?
    } else {
        crate::api::tls::endpoint(credentials, addr).map_err(bad)?
    };
    Ok(ep
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .local_address(local)
        .connect_lazy())
}

pub fn peer_client(channel: Channel) -> RaftPeerServiceClient<Channel> {
    RaftPeerServiceClient::new(channel)
        .max_decoding_message_size(PEER_MESSAGE_LEN_MAX)
        .max_encoding_message_size(PEER_MESSAGE_LEN_MAX)
}

/// The JSON of a peer payload (the `json` field of the Raft rpcs' messages).
pub fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, PeerError> {
    serde_json::to_vec(v).map_err(|source| PeerError::Encode { what, source })
}

/// A peer payload's JSON, refused above [`PEER_MESSAGE_LEN_MAX`] before decoding.
pub fn decode<T: DeserializeOwned>(
    addr: &str,
    what: &'static str,
    json: &[u8],
) -> Result<T, PeerError> {
    if json.len() > PEER_MESSAGE_LEN_MAX {
        return Err(PeerError::TooLarge { len: json.len() });
    }
    serde_json::from_slice(json).map_err(|source| PeerError::Decode {
        addr: addr.to_string(),
        what,
        source,
    })
}

/// Creates one [`PeerConnection`] per target.
#[derive(Clone)]
pub struct Network {
    pub rpc_timeout: Duration,
    /// The address Raft connections leave from (`None`: the kernel's choice).
    pub local_ip: Option<IpAddr>,
    /// This node's certificate and the cluster CA (replaced before the certificate
    /// expires: each connection rebuilds its channel when they change).
    pub credentials: SharedCredentials,
    /// The peer plane is plaintext (`raft_insecure_plaintext`).
    pub plaintext: bool,
    /// One channel per peer address, shared by every client openraft asks for (it asks
    /// for a new one for each read-index round: without this, each linearizable read
    /// opened a connection, with a TLS handshake), rebuilt when the credentials change.
    pub channels: SharedChannels,
}

/// Channels by peer address, and the credentials generation they were built with.
pub type SharedChannels = Arc<Mutex<(u64, HashMap<String, Channel>)>>;

impl Network {
    /// The channel to `addr`: the shared one, or a new one built with the current
    /// credentials (the cache is emptied when they change, and when churn grew it past
    /// [`HEARTBEAT_CLIENTS_MAX`] addresses).
    fn channel(&self, addr: &str) -> Result<Channel, PeerError> {
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.credentials.generation();
        if guard.0 != generation {
            *guard = (generation, HashMap::new());
        }
        if let Some(c) = guard.1.get(addr) {
            return Ok(c.clone());
        }
        if guard.1.len() >= HEARTBEAT_CLIENTS_MAX {
            guard.1.clear();
        }
        let c = peer_channel(
            &self.credentials.current(),
            addr,
            self.rpc_timeout,
            self.local_ip,
            self.plaintext,
        )?;
        guard.1.insert(addr.to_owned(), c.clone());
        Ok(c)
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> Self::Network {
        let generation = self.credentials.generation();
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            channel: self.channel(&node.raft_addr),
            generation,
            network: self.clone(),
        }
    }
}

pub struct PeerConnection {
    target: NodeId,
    addr: String,
    channel: Result<Channel, PeerError>,
    /// The credentials generation `channel` was built with.
    generation: u64,
    network: Network,
}

type RpcErr<E> = RPCError<NodeId, PeerNode, RaftError<NodeId, E>>;

impl PeerConnection {
    async fn call<Req, Resp, E>(&mut self, rpc: &'static str, req: &Req) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let generation = self.network.credentials.generation();
        if generation != self.generation {
            // A rotated certificate: new connections present the new one (the old one's
            // connection would be refused once the old certificate expires).
            self.channel = self.network.channel(&self.addr);
            self.generation = generation;
        }
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let mut client = peer_client(channel);
        let json = encode(rpc, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = match rpc {
            "append_entries" => client
                .append_entries(pb::AppendEntriesRequest { json })
                .await
                .map(|r| r.into_inner().json),
            "vote" => client
                .vote(pb::VoteRequest { json })
                .await
                .map(|r| r.into_inner().json),
            _ => client
                .install_snapshot(pb::InstallSnapshotRequest { json })
                .await
                .map(|r| r.into_inner().json),
        };
        let reply = reply.map_err(|source| {
            let e = PeerError::Rpc {
                addr: self.addr.clone(),
                rpc,
                source,
            };
            RPCError::Unreachable(Unreachable::new(&e))
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> = decode(&self.addr, rpc, &reply)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call("append_entries", &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call("install_snapshot", &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call("vote", &rpc).await
    }
}

/// Heartbeat clients cached at most (one per peer address; the cache is cleared when a
/// membership churn leaves more).
const HEARTBEAT_CLIENTS_MAX: usize = 64;

/// The agent's [`PeerClient`] over the peer-only gRPC service.
pub struct GrpcPeers {
    /// The address every connection leaves from (`None`: the kernel's choice).
    local_ip: Option<IpAddr>,
    credentials: SharedCredentials,
    /// The peer plane is plaintext (`raft_insecure_plaintext`).
    plaintext: bool,
    /// Clients by peer address and call timeout, built with the credentials of the
    /// generation noted (heartbeats, read-index requests, forwarded writes, presence).
    heartbeat_clients: Mutex<(u64, HashMap<String, RaftPeerServiceClient<Channel>>)>,
}

impl GrpcPeers {
    pub fn new(
        local_ip: Option<IpAddr>,
        credentials: SharedCredentials,
        plaintext: bool,
    ) -> GrpcPeers {
        GrpcPeers {
            local_ip,
            credentials,
            plaintext,
            heartbeat_clients: Mutex::default(),
        }
    }

    fn heartbeat_client(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<RaftPeerServiceClient<Channel>, PeerError> {
        let mut guard = self
            .heartbeat_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let generation = self.credentials.generation();
        if guard.0 != generation {
            *guard = (generation, HashMap::new());
        }
        let clients = &mut guard.1;
        // By address and timeout (the channel's deadline is per call).
        let key = format!("{addr}|{}", timeout.as_millis());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        if clients.len() >= HEARTBEAT_CLIENTS_MAX {
            clients.clear();
        }
        let c = peer_client(peer_channel(
            &self.credentials.current(),
            addr,
            timeout,
            self.local_ip,
            self.plaintext,
        )?);
        clients.insert(key, c.clone());
        Ok(c)
    }
}

fn call_err(e: &PeerError) -> PeerCallError {
    PeerCallError(crate::error_chain(e))
}

impl PeerClient for GrpcPeers {
    fn forward(
        &self,
        raft_addr: &str,
        req: &ForwardRequest,
        timeout: Duration,
    ) -> PeerFuture<Result<Result<ForwardReply, WriteError>, PeerCallError>> {
        let addr = raft_addr.to_string();
        // A cached client (a new connection per forwarded write cost a TLS handshake each).
        let prepared = self
            .heartbeat_client(&addr, timeout)
            .and_then(|c| Ok((c, encode("forward request", req)?)));
        Box::pin(async move {
            let (mut client, json) = prepared.map_err(|e| call_err(&e))?;
            let reply = client
                .forward_write(pb::ForwardWriteRequest { json })
                .await
                .map_err(|s| PeerCallError(s.message().to_string()))?;
            decode(&addr, "forward reply", &reply.get_ref().json).map_err(|e| call_err(&e))
        })
    }

    fn heartbeat(
        &self,
        raft_addr: &str,
        hb: Heartbeat,
        timeout: Duration,
    ) -> PeerFuture<Result<HeartbeatAck, PeerCallError>> {
        let client = self.heartbeat_client(raft_addr, timeout);
        Box::pin(async move {
            let mut client = client.map_err(|e| call_err(&e))?;
            let req = HeartbeatRequest {
                node_id: hb.node_id,
                incarnation: hb.incarnation,
                silences: hb
                    .silences
                    .iter()
                    .map(|s| PbSilence {
                        node_id: s.node_id,
                        silent_ms: s.silent_ms,
                    })
                    .collect(),
                demand: hb
                    .demand
                    .as_ref()
                    .map(crate::api::convert::demand::demand_to_pb),
            };
            match tokio::time::timeout(timeout, client.heartbeat(req)).await {
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    Ok(HeartbeatAck {
                        leader_id: r.leader_id,
                        term: r.term,
                        accepted: r.accepted,
                        last_applied: r.last_applied,
                    })
                }
                Ok(Err(s)) => Err(PeerCallError(format!(
                    "heartbeat not delivered: {:?}: {}",
                    s.code(),
                    s.message()
                ))),
                Err(_) => Err(PeerCallError(format!(
                    "heartbeat timed out after {} ms",
                    timeout.as_millis()
                ))),
            }
        })
    }

    fn vm_presence(
        &self,
        raft_addr: &str,
        vm: &str,
        timeout: Duration,
    ) -> PeerFuture<Result<VmPresence, PeerCallError>> {
        let client = self.heartbeat_client(raft_addr, timeout);
        let vm = vm.to_owned();
        Box::pin(async move {
            let mut client = client.map_err(|e| call_err(&e))?;
            match tokio::time::timeout(timeout, client.vm_presence(VmPresenceRequest { vm })).await
            {
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    Ok(if r.runs {
                        VmPresence::Runs
                    } else if r.arriving {
                        VmPresence::Arriving
                    } else {
                        VmPresence::Absent
                    })
                }
                Ok(Err(s)) => Err(PeerCallError(format!(
                    "vm presence not answered: {:?}: {}",
                    s.code(),
                    s.message()
                ))),
                Err(_) => Err(PeerCallError(format!(
                    "vm presence not answered within {} ms",
                    timeout.as_millis()
                ))),
            }
        })
    }

    fn read_index(
        &self,
        raft_addr: &str,
        from: u64,
        timeout: Duration,
    ) -> PeerFuture<Result<ReadIndex, PeerCallError>> {
        let client = self.heartbeat_client(raft_addr, timeout);
        Box::pin(async move {
            let mut client = client.map_err(|e| call_err(&e))?;
            let req = ReadIndexRequest { node_id: from };
            match tokio::time::timeout(timeout, client.read_index(req)).await {
                Ok(Ok(reply)) => {
                    let r = reply.into_inner();
                    Ok(if r.confirmed {
                        ReadIndex::Confirmed {
                            index: r.read_index,
                        }
                    } else {
                        ReadIndex::Refused {
                            leader: (r.leader_id != 0).then_some(r.leader_id),
                            reason: r.reason,
                        }
                    })
                }
                Ok(Err(s)) => Err(PeerCallError(format!(
                    "read index not answered: {:?}: {}",
                    s.code(),
                    s.message()
                ))),
                Err(_) => Err(PeerCallError(format!(
                    "read index not answered within {} ms",
                    timeout.as_millis()
                ))),
            }
        })
    }
}
