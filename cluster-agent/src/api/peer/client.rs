//! Client side of the peer-only service: openraft's `RaftNetworkFactory` over tonic
//! ([`Network`]) and the agent's [`PeerClient`] ([`GrpcPeers`]: write forwarding,
//! heartbeats). Requests and replies are openraft's own types, JSON-encoded in
//! the `json` field of each rpc's message; replies carry `Result<Reply, RaftError>` so remote Raft errors come
//! back typed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
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
use tokio::sync::{mpsc, oneshot};
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
/// only when `plaintext`: `raft_insecure_plaintext`), leaving from `local` when given;
/// every call on it times out after `timeout`.
pub fn peer_channel(
    credentials: &Credentials,
    addr: &str,
    timeout: Duration,
    local: Option<IpAddr>,
    plaintext: bool,
) -> Result<Channel, PeerError> {
    Ok(peer_endpoint(credentials, addr, timeout, local, plaintext)?
        .timeout(timeout)
        .connect_lazy())
}

/// The endpoint of [`peer_channel`], without a per-call timeout.
fn peer_endpoint(
    credentials: &Credentials,
    addr: &str,
    connect_timeout: Duration,
    local: Option<IpAddr>,
    plaintext: bool,
) -> Result<tonic::transport::Endpoint, PeerError> {
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
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .local_address(local))
}

/// Channels cached at most (one per peer address; the cache is cleared when a membership
/// churn leaves more).
const CHANNELS_MAX: usize = 64;

/// One lazily connecting channel per peer address, shared by every call to that peer: a
/// call reuses the peer's HTTP/2 connection instead of opening a connection and running a
/// TLS handshake of its own. Channels are rebuilt when the node's credentials change (a
/// renewed certificate), so new connections present the current certificate.
pub struct ChannelCache {
    /// `None`: calls carry no channel-wide timeout (callers bound each call).
    call_timeout: Option<Duration>,
    connect_timeout: Duration,
    local_ip: Option<IpAddr>,
    credentials: SharedCredentials,
    /// The peer plane is plaintext (`raft_insecure_plaintext`).
    plaintext: bool,
    /// Channels by peer address, built with the credentials of the generation noted.
    channels: Mutex<(u64, HashMap<String, Channel>)>,
}

impl ChannelCache {
    pub fn new(
        call_timeout: Option<Duration>,
        connect_timeout: Duration,
        local_ip: Option<IpAddr>,
        credentials: SharedCredentials,
        plaintext: bool,
    ) -> ChannelCache {
        ChannelCache {
            call_timeout,
            connect_timeout,
            local_ip,
            credentials,
            plaintext,
            channels: Mutex::default(),
        }
    }

    /// The channel to `addr` (made on first use).
    pub fn get(&self, addr: &str) -> Result<Channel, PeerError> {
        let mut guard = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.credentials.generation();
        if guard.0 != generation {
            *guard = (generation, HashMap::new());
        }
        let channels = &mut guard.1;
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        if channels.len() >= CHANNELS_MAX {
            channels.clear();
        }
        let ep = peer_endpoint(
            &self.credentials.current(),
            addr,
            self.connect_timeout,
            self.local_ip,
            self.plaintext,
        )?;
        let c = match self.call_timeout {
            Some(t) => ep.timeout(t).connect_lazy(),
            None => ep.connect_lazy(),
        };
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
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

/// Creates one [`PeerConnection`] per target. openraft asks for a new client for every
/// replication stream, election and read-index round; they all share one cached channel
/// (one HTTP/2 connection) per peer, so none of them waits for a TLS handshake.
#[derive(Clone)]
pub struct Network {
    /// This node's certificate and the cluster CA (replaced before the certificate
    /// expires: the cache rebuilds its channels when they change).
    pub credentials: SharedCredentials,
    channels: Arc<ChannelCache>,
}

impl Network {
    /// Raft connections leave from `local_ip` (`None`: the kernel's choice); every call
    /// times out after `rpc_timeout`; plaintext only with `raft_insecure_plaintext`.
    pub fn new(
        rpc_timeout: Duration,
        local_ip: Option<IpAddr>,
        credentials: SharedCredentials,
        plaintext: bool,
    ) -> Network {
        Network {
            channels: Arc::new(ChannelCache::new(
                Some(rpc_timeout),
                rpc_timeout,
                local_ip,
                credentials.clone(),
                plaintext,
            )),
            credentials,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> Self::Network {
        let generation = self.credentials.generation();
        PeerConnection {
            target,
            addr: node.raft_addr.clone(),
            channel: self.channels.get(&node.raft_addr),
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
            self.channel = self.network.channels.get(&self.addr);
            self.generation = generation;
        }
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(e))),
        };
        let mut client = peer_client(channel);
        let t0 = std::time::Instant::now();
        let json = encode(rpc, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let bytes = json.len();
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
        tracing::debug!(
            target: crate::raft::store::TIMING,
            rpc,
            bytes,
            rtt_us = t0.elapsed().as_micros() as u64,
            "peer call"
        );
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

/// The agent's [`PeerClient`] over the peer-only gRPC service. Heartbeats, forwarded
/// writes, read-index questions and presence checks to one peer share one channel (apart
/// from Raft's own, so a large append never delays a heartbeat behind it on one TCP
/// stream); each call has its own deadline.
pub struct GrpcPeers {
    channels: ChannelCache,
    heartbeats: HeartbeatStreams,
}

impl GrpcPeers {
    /// Connections leave from `local_ip` (`None`: the kernel's choice) and give up
    /// connecting after `connect_timeout`.
    pub fn new(
        local_ip: Option<IpAddr>,
        connect_timeout: Duration,
        credentials: SharedCredentials,
        plaintext: bool,
    ) -> GrpcPeers {
        GrpcPeers {
            heartbeats: HeartbeatStreams::new(credentials.clone()),
            channels: ChannelCache::new(None, connect_timeout, local_ip, credentials, plaintext),
        }
    }

    fn client(&self, addr: &str) -> Result<RaftPeerServiceClient<Channel>, PeerError> {
        self.channels.get(addr).map(peer_client)
    }
}

fn heartbeat_to_pb(hb: &Heartbeat) -> HeartbeatRequest {
    HeartbeatRequest {
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
    }
}

fn ack_from_pb(r: &pb::HeartbeatResponse) -> HeartbeatAck {
    HeartbeatAck {
        leader_id: r.leader_id,
        term: r.term,
        accepted: r.accepted,
        last_applied: r.last_applied,
    }
}

/// Heartbeats sent on one stream and not answered yet, at most (a receiver this far
/// behind is not answering: its stream is dropped and the next round opens another).
const HEARTBEATS_IN_FLIGHT_MAX: usize = 8;

type Answer = Result<HeartbeatAck, PeerCallError>;
type Waiters = Arc<Mutex<VecDeque<oneshot::Sender<Answer>>>>;

/// The open `HeartbeatStream` to one peer: requests go out on `tx`; the driver task
/// answers the oldest waiter with each response (the receiver answers in order).
/// Dropping it stops the driver, which resets the HTTP/2 stream.
struct HeartbeatStream {
    tx: mpsc::Sender<pb::HeartbeatStreamRequest>,
    waiting: Waiters,
    /// False once the driver ended (the stream failed or the receiver closed it).
    open: Arc<AtomicBool>,
    /// The credentials generation of the channel it runs on.
    generation: u64,
    _stop: oneshot::Sender<()>,
}

/// One heartbeat stream per peer address, opened on first use and again after it
/// failed; an address whose agent does not implement `HeartbeatStream` (an older
/// version) gets unary `Heartbeat` calls from then on.
struct HeartbeatStreams {
    credentials: SharedCredentials,
    streams: Mutex<HashMap<String, HeartbeatStream>>,
    unary: Arc<Mutex<HashSet<String>>>,
}

impl HeartbeatStreams {
    fn new(credentials: SharedCredentials) -> HeartbeatStreams {
        HeartbeatStreams {
            credentials,
            streams: Mutex::default(),
            unary: Arc::default(),
        }
    }

    fn unary_only(&self, addr: &str) -> bool {
        self.unary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(addr)
    }

    /// Queue `req` on the stream to `addr`, opening one if there is none, it failed or it
    /// runs on older credentials. The receiver resolves with the answer, or an error once
    /// the stream failed. A stream that cannot take the send (too many unanswered) is
    /// dropped: this round fails and the next one opens another.
    fn send(
        &self,
        peers: &GrpcPeers,
        addr: &str,
        req: HeartbeatRequest,
    ) -> oneshot::Receiver<Answer> {
        let (ack_tx, ack_rx) = oneshot::channel();
        let generation = self.credentials.generation();
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        let reusable = streams
            .get(addr)
            .is_some_and(|s| s.generation == generation && s.open.load(Ordering::Acquire));
        if !reusable {
            streams.remove(addr);
            if streams.len() >= CHANNELS_MAX {
                streams.clear();
            }
            match self.open(peers, addr, generation) {
                Ok(s) => {
                    streams.insert(addr.to_owned(), s);
                }
                Err(e) => {
                    let _ = ack_tx.send(Err(call_err(&e)));
                    return ack_rx;
                }
            }
        }
        let Some(stream) = streams.get(addr) else {
            return ack_rx;
        };
        let msg = pb::HeartbeatStreamRequest {
            heartbeat: Some(req),
        };
        // The waiter is queued under the lock the driver takes to answer: an answer
        // always finds the waiter of its own request at the front.
        let mut waiting = stream.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if stream.tx.try_send(msg).is_ok() {
            waiting.push_back(ack_tx);
        } else {
            drop(waiting);
            streams.remove(addr);
            let _ = ack_tx.send(Err(PeerCallError(format!(
                "{HEARTBEATS_IN_FLIGHT_MAX} heartbeats to {addr} unanswered: stream dropped"
            ))));
        }
        ack_rx
    }

    fn open(
        &self,
        peers: &GrpcPeers,
        addr: &str,
        generation: u64,
    ) -> Result<HeartbeatStream, PeerError> {
        let client = peers.client(addr)?;
        let (tx, rx) = mpsc::channel(HEARTBEATS_IN_FLIGHT_MAX);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let waiting = Waiters::default();
        let open = Arc::new(AtomicBool::new(true));
        tokio::spawn(drive_heartbeat_stream(
            client,
            rx,
            stop_rx,
            waiting.clone(),
            open.clone(),
            (self.unary.clone(), addr.to_owned()),
        ));
        Ok(HeartbeatStream {
            tx,
            waiting,
            open,
            generation,
            _stop: stop_tx,
        })
    }
}

/// Runs one heartbeat stream until it fails, the receiver ends it or it is dropped;
/// then fails every heartbeat still waiting for its answer.
async fn drive_heartbeat_stream(
    mut client: RaftPeerServiceClient<Channel>,
    outbound: mpsc::Receiver<pb::HeartbeatStreamRequest>,
    mut stop: oneshot::Receiver<()>,
    waiting: Waiters,
    open: Arc<AtomicBool>,
    (unary, addr): (Arc<Mutex<HashSet<String>>>, String),
) {
    let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound);
    let why = tokio::select! {
        _ = &mut stop => "dropped".to_owned(),
        r = client.heartbeat_stream(outbound) => match r {
            Err(s) => {
                if s.code() == tonic::Code::Unimplemented {
                    tracing::info!(peer = %addr, "the peer has no heartbeat stream (an older agent): unary heartbeats to it");
                    unary.lock().unwrap_or_else(|p| p.into_inner()).insert(addr);
                }
                format!("heartbeat stream not opened: {:?}: {}", s.code(), s.message())
            }
            Ok(resp) => {
                let mut inbound = resp.into_inner();
                loop {
                    let m = tokio::select! {
                        _ = &mut stop => break "dropped".to_owned(),
                        m = inbound.message() => m,
                    };
                    match m {
                        Ok(Some(r)) => {
                            let answer = r.ack.as_ref().map(ack_from_pb).ok_or_else(|| {
                                PeerCallError("a heartbeat answer without its ack".to_owned())
                            });
                            let next = waiting.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                            if let Some(w) = next {
                                let _ = w.send(answer);
                            }
                        }
                        Ok(None) => break "the receiver ended the heartbeat stream".to_owned(),
                        Err(s) => {
                            break format!("heartbeat not delivered: {:?}: {}", s.code(), s.message())
                        }
                    }
                }
            }
        },
    };
    open.store(false, Ordering::Release);
    for w in waiting.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
        let _ = w.send(Err(PeerCallError(why.clone())));
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
        let prepared = self
            .client(&addr)
            .and_then(|c| Ok((c, encode("forward request", req)?)));
        Box::pin(async move {
            let (mut client, json) = prepared.map_err(|e| call_err(&e))?;
            let reply = match tokio::time::timeout(
                timeout,
                client.forward_write(pb::ForwardWriteRequest { json }),
            )
            .await
            {
                Ok(r) => r.map_err(|s| PeerCallError(s.message().to_string()))?,
                Err(_) => {
                    return Err(PeerCallError(format!(
                        "the forwarded write was not answered within {} ms",
                        timeout.as_millis()
                    )))
                }
            };
            decode(&addr, "forward reply", &reply.get_ref().json).map_err(|e| call_err(&e))
        })
    }

    fn heartbeat(
        &self,
        raft_addr: &str,
        hb: Heartbeat,
        timeout: Duration,
    ) -> PeerFuture<Result<HeartbeatAck, PeerCallError>> {
        let req = heartbeat_to_pb(&hb);
        if !self.heartbeats.unary_only(raft_addr) {
            let sent = self.heartbeats.send(self, raft_addr, req);
            return Box::pin(async move {
                match tokio::time::timeout(timeout, sent).await {
                    Ok(Ok(answer)) => answer,
                    Ok(Err(_)) => Err(PeerCallError(
                        "heartbeat not answered: its stream ended".to_owned(),
                    )),
                    Err(_) => Err(PeerCallError(format!(
                        "heartbeat timed out after {} ms",
                        timeout.as_millis()
                    ))),
                }
            });
        }
        let client = self.client(raft_addr);
        Box::pin(async move {
            let mut client = client.map_err(|e| call_err(&e))?;
            match tokio::time::timeout(timeout, client.heartbeat(req)).await {
                Ok(Ok(reply)) => Ok(ack_from_pb(&reply.into_inner())),
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
        let client = self.client(raft_addr);
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
        let client = self.client(raft_addr);
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
