//! Client side of the peer-only service: openraft's `RaftNetworkFactory` over tonic
//! ([`Network`]) and the agent's [`PeerClient`] ([`GrpcPeers`]: write forwarding,
//! heartbeats). Requests and replies are openraft's own types, JSON-encoded in
//! the `json` field of each rpc's message; replies carry `Result<Reply, RaftError>` so remote Raft errors come
//! back typed.

use std::collections::{HashMap, VecDeque};
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

use super::APPEND_ENTRIES;
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
    #[error("peer at {addr} did not answer {rpc} within {} ms", after.as_millis())]
    Timeout {
        addr: String,
        rpc: &'static str,
        after: Duration,
    },
    #[error("peer at {addr} answered request {answered} on a stream where request {sent} waited")]
    OutOfTurn {
        addr: String,
        sent: u64,
        answered: u64,
    },
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
    /// Open AppendEntries streams not in use, per peer.
    streams: Arc<AppendStreams>,
    rpc_timeout: Duration,
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
            streams: Arc::default(),
            rpc_timeout,
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
    /// The channel to the target, rebuilt after a certificate rotation.
    // (openraft's error type: its `RaftNetwork` methods return it anyway.)
    #[allow(clippy::result_large_err)]
    fn channel<E: std::error::Error>(&mut self) -> Result<Channel, RpcErr<E>> {
        let generation = self.network.credentials.generation();
        if generation != self.generation {
            // A rotated certificate: new connections present the new one (the old one's
            // connection would be refused once the old certificate expires).
            self.channel = self.network.channels.get(&self.addr);
            self.generation = generation;
        }
        match &self.channel {
            Ok(c) => Ok(c.clone()),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(e))),
        }
    }

    /// `req` as a unary call of `rpc`: the reply's JSON.
    async fn unary(
        &self,
        channel: Channel,
        rpc: &'static str,
        json: Vec<u8>,
    ) -> Result<Vec<u8>, PeerError> {
        let mut client = peer_client(channel);
        let reply = match rpc {
            "append_entries" => {
                super::count(&APPEND_ENTRIES.sent_unary);
                client
                    .append_entries(pb::AppendEntriesRequest { json })
                    .await
                    .map(|r| r.into_inner().json)
            }
            "vote" => client
                .vote(pb::VoteRequest { json })
                .await
                .map(|r| r.into_inner().json),
            _ => client
                .install_snapshot(pb::InstallSnapshotRequest { json })
                .await
                .map(|r| r.into_inner().json),
        };
        reply.map_err(|source| PeerError::Rpc {
            addr: self.addr.clone(),
            rpc,
            source,
        })
    }

    async fn call<Req, Resp, E>(&mut self, rpc: &'static str, req: &Req) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self.channel()?;
        let t0 = std::time::Instant::now();
        let json = encode(rpc, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let bytes = json.len();
        let reply = self
            .unary(channel, rpc, json)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        self.answer(rpc, &reply, bytes, t0)
    }

    /// openraft's answer in `reply` (a call of `rpc` that sent `bytes`, begun at `t0`).
    #[allow(clippy::result_large_err)]
    fn answer<Resp, E>(
        &self,
        rpc: &'static str,
        reply: &[u8],
        bytes: usize,
        t0: std::time::Instant,
    ) -> Result<Resp, RpcErr<E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&self.addr, rpc, reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        tracing::debug!(
            target: crate::raft::store::TIMING,
            rpc,
            bytes,
            rtt_us = t0.elapsed().as_micros() as u64,
            "peer call"
        );
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// `rpc` on a stream to the target (see [`AppendStreams`]): the reply's JSON and the
    /// request's size, or `Ok(None)` when the target does not implement the stream (the
    /// caller then sends a unary call). Bounded by the RPC timeout, as a unary call is.
    async fn append_on_stream(
        &self,
        channel: Channel,
        rpc: &AppendEntriesRequest<TypeConfig>,
    ) -> Result<Option<(Vec<u8>, usize)>, PeerError> {
        let timeout = self.network.rpc_timeout;
        let exchange = self
            .network
            .streams
            .exchange(channel, &self.addr, self.generation, rpc);
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            // The stream, owned by the exchange, was dropped with it: it is never reused.
            Err(_) => Err(PeerError::Timeout {
                addr: self.addr.clone(),
                rpc: "append_entries_stream",
                after: timeout,
            }),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    /// On an AppendEntries stream to the target; as a unary call to a target that has
    /// none. Errors map as the unary call's do: not delivered or not answered within the
    /// RPC timeout is `Unreachable`, an undecodable answer `Network`, Raft's refusal
    /// `RemoteError`. openraft bounds each call by its `RPCOption` time too and drops
    /// the future then (see `AppendStreams` for why that is safe).
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        if self.network.streams.unary.unary_only(&self.addr) {
            return self.call("append_entries", &rpc).await;
        }
        let channel = self.channel()?;
        let t0 = std::time::Instant::now();
        match self.append_on_stream(channel, &rpc).await {
            Ok(Some((reply, bytes))) => self.answer("append_entries", &reply, bytes, t0),
            Ok(None) => self.call("append_entries", &rpc).await,
            Err(e @ PeerError::Encode { .. }) => Err(RPCError::Network(NetworkError::new(&e))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
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

/// Peers whose agent does not implement one of the stream rpcs (an older version): they
/// get the unary call instead, and the stream is tried again after
/// [`UNARY_RETRY_AFTER`] (the peer may have been upgraded meanwhile).
#[derive(Clone, Default)]
struct UnaryPeers(Arc<Mutex<HashMap<String, std::time::Instant>>>);

/// How long a peer found without a stream rpc gets unary calls before the stream is
/// tried again.
const UNARY_RETRY_AFTER: Duration = Duration::from_secs(60);

impl UnaryPeers {
    fn unary_only(&self, addr: &str) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(addr) {
            Some(since) if since.elapsed() < UNARY_RETRY_AFTER => true,
            Some(_) => {
                m.remove(addr);
                false
            }
            None => false,
        }
    }

    /// Whether `s`, the answer to opening stream `rpc` at `addr`, says the peer does not
    /// implement it; the address then gets unary calls for a while.
    fn note(&self, addr: &str, rpc: &str, s: &tonic::Status) -> bool {
        if s.code() != tonic::Code::Unimplemented {
            return false;
        }
        tracing::info!(peer = %addr, rpc, "the peer does not implement this stream (an older agent): unary calls to it");
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CHANNELS_MAX {
            m.clear();
        }
        m.insert(addr.to_owned(), std::time::Instant::now());
        true
    }
}

/// Idle AppendEntries streams kept per peer (openraft runs one replication task per
/// target, and rounds that confirm its leadership may overlap it).
const APPEND_STREAMS_IDLE_MAX: usize = 4;

/// An open `AppendEntriesStream` to one peer, with nothing in flight while it is idle.
struct AppendStream {
    tx: mpsc::Sender<pb::AppendEntriesStreamRequest>,
    inbound: tonic::Streaming<pb::AppendEntriesStreamResponse>,
    /// The credentials generation of the channel it runs on.
    generation: u64,
    /// The id of its next request.
    next_id: u64,
}

/// AppendEntries streams, shared by every [`PeerConnection`] of a [`Network`]. A call
/// takes an idle stream to its target (or opens one), sends its request, reads the
/// answer and only then puts the stream back: a stream carries one request at a time,
/// and the call owns it meanwhile. openraft drops a call's future when its own timeout
/// expires; the stream, with the request whose answer is still to come, goes with it
/// (the HTTP/2 stream is reset), so a later request never reads an earlier request's
/// answer. The answer's id must be its request's besides (a receiver that answered out
/// of turn loses the stream and the call fails).
#[derive(Default)]
struct AppendStreams {
    idle: Mutex<HashMap<String, Vec<AppendStream>>>,
    unary: UnaryPeers,
}

/// How one request on a stream went.
enum Exchanged {
    Answer(Vec<u8>),
    /// The stream broke before answering (the receiver went away, reset it, or an idle
    /// stream had been closed meanwhile): nothing says whether the request was served.
    Broken(tonic::Status),
    /// The receiver answered another request: a protocol error.
    OutOfTurn {
        sent: u64,
        answered: u64,
    },
}

impl AppendStreams {
    /// An idle stream to `addr` on credentials `generation`, still open.
    fn take(&self, addr: &str, generation: u64) -> Option<AppendStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(addr)?;
        while let Some(s) = list.pop() {
            if s.generation == generation && !s.tx.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put(&self, addr: &str, s: AppendStream) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !idle.contains_key(addr) && idle.len() >= CHANNELS_MAX {
            idle.clear();
        }
        let list = idle.entry(addr.to_owned()).or_default();
        if list.len() < APPEND_STREAMS_IDLE_MAX {
            list.push(s);
        }
    }

    /// Sends `rpc` to `addr` on an idle stream, or on a new one over `channel`; the
    /// answer's JSON and the request's size. `Ok(None)`: the peer has no such stream (it
    /// is noted; the caller sends a unary call). A broken idle stream is replaced once,
    /// the request sent again on the new one (AppendEntries is idempotent).
    async fn exchange(
        &self,
        channel: Channel,
        addr: &str,
        generation: u64,
        rpc: &AppendEntriesRequest<TypeConfig>,
    ) -> Result<Option<(Vec<u8>, usize)>, PeerError> {
        let failed = |source: tonic::Status| PeerError::Rpc {
            addr: addr.to_owned(),
            rpc: "append_entries_stream",
            source,
        };
        let out_of_turn = |sent, answered| PeerError::OutOfTurn {
            addr: addr.to_owned(),
            sent,
            answered,
        };
        let json = encode("append_entries", rpc)?;
        let bytes = json.len();
        let json = if let Some(mut s) = self.take(addr, generation) {
            match s.exchange(json).await {
                (Exchanged::Answer(reply), _) => {
                    self.put(addr, s);
                    return Ok(Some((reply, bytes)));
                }
                (Exchanged::OutOfTurn { sent, answered }, _) => {
                    return Err(out_of_turn(sent, answered))
                }
                (Exchanged::Broken(status), unsent) => {
                    tracing::debug!(peer = %addr, %status, "an idle append_entries stream was broken: opening another");
                    match unsent {
                        Some(json) => json,
                        None => encode("append_entries", rpc)?,
                    }
                }
            }
        } else {
            json
        };
        let (tx, rx) = mpsc::channel(2);
        // Queued before the stream opens: it leaves right after the stream's headers.
        super::count(&APPEND_ENTRIES.sent_stream);
        if tx
            .try_send(pb::AppendEntriesStreamRequest { id: 1, json })
            .is_err()
        {
            return Err(failed(tonic::Status::internal(
                "a new stream's queue refused its first request",
            )));
        }
        let opened = peer_client(channel)
            .append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let inbound = match opened {
            Ok(r) => r.into_inner(),
            Err(status) if self.unary.note(addr, "append_entries_stream", &status) => {
                return Ok(None)
            }
            Err(status) => return Err(failed(status)),
        };
        let mut s = AppendStream {
            tx,
            inbound,
            generation,
            next_id: 2,
        };
        match s.read(1).await {
            Exchanged::Answer(reply) => {
                self.put(addr, s);
                Ok(Some((reply, bytes)))
            }
            Exchanged::Broken(status)
                if self.unary.note(addr, "append_entries_stream", &status) =>
            {
                Ok(None)
            }
            Exchanged::Broken(status) => Err(failed(status)),
            Exchanged::OutOfTurn { sent, answered } => Err(out_of_turn(sent, answered)),
        }
    }
}

impl AppendStream {
    /// Sends `json` with the next id; its answer, and `json` back when it could not be
    /// sent at all.
    async fn exchange(&mut self, json: Vec<u8>) -> (Exchanged, Option<Vec<u8>>) {
        let id = self.next_id;
        self.next_id += 1;
        // (Never full: one request at a time on a queue of two.)
        if let Err(e) = self
            .tx
            .try_send(pb::AppendEntriesStreamRequest { id, json })
        {
            let closed = tonic::Status::unavailable("the stream is closed");
            return (Exchanged::Broken(closed), Some(e.into_inner().json));
        }
        super::count(&APPEND_ENTRIES.sent_stream);
        (self.read(id).await, None)
    }

    /// The answer to request `id`.
    async fn read(&mut self, id: u64) -> Exchanged {
        match self.inbound.message().await {
            Ok(Some(r)) if r.id == id => Exchanged::Answer(r.json),
            Ok(Some(r)) => Exchanged::OutOfTurn {
                sent: id,
                answered: r.id,
            },
            Ok(None) => {
                Exchanged::Broken(tonic::Status::unavailable("the receiver ended the stream"))
            }
            Err(status) => Exchanged::Broken(status),
        }
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
/// version) gets unary `Heartbeat` calls for a while ([`UnaryPeers`]).
struct HeartbeatStreams {
    credentials: SharedCredentials,
    streams: Mutex<HashMap<String, HeartbeatStream>>,
    unary: UnaryPeers,
}

impl HeartbeatStreams {
    fn new(credentials: SharedCredentials) -> HeartbeatStreams {
        HeartbeatStreams {
            credentials,
            streams: Mutex::default(),
            unary: UnaryPeers::default(),
        }
    }

    fn unary_only(&self, addr: &str) -> bool {
        self.unary.unary_only(addr)
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
    (unary, addr): (UnaryPeers, String),
) {
    let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound);
    let why = tokio::select! {
        _ = &mut stop => "dropped".to_owned(),
        r = client.heartbeat_stream(outbound) => match r {
            Err(s) => {
                unary.note(&addr, "heartbeat_stream", &s);
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

#[cfg(test)]
mod tests {
    //! openraft's AppendEntries over [`Network`] against fake peers on loopback (h2c):
    //! the stream carries the calls, a peer without it gets unary calls, a broken stream
    //! is replaced, and an answer is never taken for another request's.

    use std::sync::atomic::AtomicU64;

    use cluster_proto::raft::raft_peer_service_server::{RaftPeerService, RaftPeerServiceServer};
    use openraft::{CommittedLeaderId, LogId, Vote};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// A peer that answers each AppendEntries with `PartialSuccess(its prev_log_id)`, so
    /// an answer names the request it answers.
    #[derive(Clone, Default)]
    struct Fake {
        /// Has no `AppendEntriesStream` (an older agent).
        no_stream: bool,
        /// Answers on the stream carry their request's id plus this.
        id_skew: u64,
        /// The request whose prev_log_id has this index is answered after `slow_by`.
        slow_index: Option<u64>,
        slow_by: Duration,
        /// A stream ends after answering this many requests.
        close_after: Option<u64>,
        unary: Arc<AtomicU64>,
        streams_opened: Arc<AtomicU64>,
        streamed: Arc<AtomicU64>,
    }

    fn answer(json: &[u8]) -> Result<(Vec<u8>, Option<u64>), Status> {
        let r: AppendEntriesRequest<TypeConfig> =
            serde_json::from_slice(json).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let index = r.prev_log_id.map(|l| l.index);
        let reply: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> =
            Ok(AppendEntriesResponse::PartialSuccess(r.prev_log_id));
        let json = serde_json::to_vec(&reply).map_err(|e| Status::internal(e.to_string()))?;
        Ok((json, index))
    }

    type Out<T> =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

    #[tonic::async_trait]
    impl RaftPeerService for Fake {
        async fn append_entries(
            &self,
            request: Request<pb::AppendEntriesRequest>,
        ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            let (json, _) = answer(&request.get_ref().json)?;
            Ok(Response::new(pb::AppendEntriesResponse { json }))
        }

        type AppendEntriesStreamStream = Out<pb::AppendEntriesStreamResponse>;

        async fn append_entries_stream(
            &self,
            request: Request<Streaming<pb::AppendEntriesStreamRequest>>,
        ) -> Result<Response<Self::AppendEntriesStreamStream>, Status> {
            if self.no_stream {
                return Err(Status::unimplemented("no AppendEntriesStream here"));
            }
            self.streams_opened.fetch_add(1, Ordering::SeqCst);
            let mut inbound = request.into_inner();
            let this = self.clone();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                let mut answered = 0;
                while let Ok(Some(m)) = inbound.message().await {
                    this.streamed.fetch_add(1, Ordering::SeqCst);
                    let item = answer(&m.json).map(|(json, index)| {
                        (
                            index,
                            pb::AppendEntriesStreamResponse {
                                id: m.id + this.id_skew,
                                json,
                            },
                        )
                    });
                    let item = match item {
                        Ok((index, r)) => {
                            if index.is_some() && index == this.slow_index {
                                tokio::time::sleep(this.slow_by).await;
                            }
                            Ok(r)
                        }
                        Err(s) => Err(s),
                    };
                    if tx.send(item).await.is_err() {
                        break;
                    }
                    answered += 1;
                    if this.close_after == Some(answered) {
                        break;
                    }
                }
            });
            Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )))
        }

        async fn vote(
            &self,
            _: Request<pb::VoteRequest>,
        ) -> Result<Response<pb::VoteResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn install_snapshot(
            &self,
            _: Request<pb::InstallSnapshotRequest>,
        ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn forward_write(
            &self,
            _: Request<pb::ForwardWriteRequest>,
        ) -> Result<Response<pb::ForwardWriteResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn heartbeat(
            &self,
            _: Request<pb::HeartbeatRequest>,
        ) -> Result<Response<pb::HeartbeatResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        type HeartbeatStreamStream = Out<pb::HeartbeatStreamResponse>;

        async fn heartbeat_stream(
            &self,
            _: Request<Streaming<pb::HeartbeatStreamRequest>>,
        ) -> Result<Response<Self::HeartbeatStreamStream>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn read_index(
            &self,
            _: Request<pb::ReadIndexRequest>,
        ) -> Result<Response<pb::ReadIndexResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn vm_presence(
            &self,
            _: Request<pb::VmPresenceRequest>,
        ) -> Result<Response<pb::VmPresenceResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn fetch_ca_key(
            &self,
            _: Request<pb::FetchCaKeyRequest>,
        ) -> Result<Response<pb::FetchCaKeyResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    /// `fake` served on loopback; a plaintext connection to it, as openraft makes them.
    async fn connect(fake: Fake) -> PeerConnection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local addr: {e}"));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftPeerServiceServer::new(fake))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let credentials = SharedCredentials::new(Credentials {
            ca_pem: String::new(),
            cert_pem: String::new(),
            key_pem: String::new(),
            expires_unix_ms: 0,
            cert_ca_sha256: String::new(),
            retired_ca_pem: String::new(),
        });
        let mut network = Network::new(Duration::from_secs(5), None, credentials, true);
        let node = PeerNode {
            raft_addr: addr.to_string(),
            mgmt_addr: String::new(),
        };
        network.new_client(2, &node).await
    }

    fn request(index: u64) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            entries: vec![],
            leader_commit: None,
        }
    }

    /// The answer to `request(index)`, which must name `index`.
    async fn send(
        c: &mut PeerConnection,
        index: u64,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let option = RPCOption::new(Duration::from_secs(5));
        c.append_entries(request(index), option).await
    }

    fn names(r: &AppendEntriesResponse<NodeId>) -> Option<u64> {
        match r {
            AppendEntriesResponse::PartialSuccess(l) => l.map(|l| l.index),
            _ => None,
        }
    }

    #[tokio::test]
    async fn append_entries_travel_on_one_stream() {
        let fake = Fake::default();
        let mut c = connect(fake.clone()).await;
        for i in 1..=5 {
            let r = send(&mut c, i)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(names(&r), Some(i), "answer {r:?} to request {i}");
        }
        assert_eq!(fake.streams_opened.load(Ordering::SeqCst), 1);
        assert_eq!(fake.streamed.load(Ordering::SeqCst), 5);
        assert_eq!(fake.unary.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_peer_without_the_stream_gets_unary_calls() {
        let fake = Fake {
            no_stream: true,
            ..Fake::default()
        };
        let mut c = connect(fake.clone()).await;
        for i in 1..=3 {
            let r = send(&mut c, i)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(names(&r), Some(i), "answer {r:?} to request {i}");
        }
        assert_eq!(fake.unary.load(Ordering::SeqCst), 3);
        assert_eq!(fake.streamed.load(Ordering::SeqCst), 0);
        assert!(
            c.network.streams.unary.unary_only(&c.addr),
            "the peer is remembered as unary-only"
        );
    }

    #[tokio::test]
    async fn a_stream_the_receiver_ended_is_replaced() {
        let fake = Fake {
            close_after: Some(1),
            ..Fake::default()
        };
        let mut c = connect(fake.clone()).await;
        for i in 1..=3 {
            let r = send(&mut c, i)
                .await
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(names(&r), Some(i), "answer {r:?} to request {i}");
        }
        assert_eq!(fake.streams_opened.load(Ordering::SeqCst), 3);
        assert_eq!(fake.unary.load(Ordering::SeqCst), 0);
    }

    /// openraft drops a call whose time is up; the answer that arrives later must never
    /// be taken for the next request's.
    #[tokio::test]
    async fn a_late_answer_never_answers_a_later_request() {
        let fake = Fake {
            slow_index: Some(2),
            // (Far beyond the 100 ms the call is given, however slow the machine.)
            slow_by: Duration::from_millis(1500),
            ..Fake::default()
        };
        let mut c = connect(fake.clone()).await;
        let r = send(&mut c, 1)
            .await
            .unwrap_or_else(|e| panic!("call 1: {e}"));
        assert_eq!(names(&r), Some(1));
        // Request 2 goes out on the now idle stream; its call is dropped before the answer.
        let dropped = tokio::time::timeout(Duration::from_millis(100), send(&mut c, 2)).await;
        assert!(
            dropped.is_err(),
            "request 2 was answered in time: {dropped:?}"
        );
        // Requests 3 and 4 are sent while (and after) request 2's answer is on its way.
        let r = send(&mut c, 3)
            .await
            .unwrap_or_else(|e| panic!("call 3: {e}"));
        assert_eq!(names(&r), Some(3), "answer {r:?} to request 3");
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let r = send(&mut c, 4)
            .await
            .unwrap_or_else(|e| panic!("call 4: {e}"));
        assert_eq!(names(&r), Some(4), "answer {r:?} to request 4");
        // The dropped call's stream was not reused.
        assert_eq!(fake.streams_opened.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_answer_with_another_requests_id_fails_the_call() {
        let fake = Fake {
            id_skew: 1,
            ..Fake::default()
        };
        let mut c = connect(fake.clone()).await;
        for i in 1..=2 {
            match send(&mut c, i).await {
                Err(RPCError::Unreachable(e)) => {
                    let text = e.to_string();
                    assert!(text.contains("answered request"), "{text}");
                }
                other => panic!("an answer out of turn was taken: {other:?}"),
            }
        }
        // Each failed stream was dropped, not reused.
        assert_eq!(fake.streams_opened.load(Ordering::SeqCst), 2);
    }
}
