//! The peer plane as the agent's core sees it: write forwarding to the leader and
//! heartbeats between members. `api::peer::client` implements [`PeerClient`] over the
//! peer-only gRPC service; the core never sees the wire types.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::agent::{ForwardReply, ForwardRequest, WriteError};
use super::liveness::{Heartbeat, HeartbeatAck};

/// What a [`PeerClient`] call returns: a boxed future, so the trait is object safe.
pub type PeerFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A peer call that did not get an answer (bad address, unreachable, undecodable
/// reply); the message is the whole error chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PeerCallError(pub String);

/// Calls to other members' peer-only service.
pub trait PeerClient: Send + Sync + 'static {
    /// Ask the leader at `raft_addr` to execute `req`; the outer error is the transport's,
    /// the inner one the leader's answer.
    fn forward(
        &self,
        raft_addr: &str,
        req: &ForwardRequest,
        timeout: Duration,
    ) -> PeerFuture<Result<Result<ForwardReply, WriteError>, PeerCallError>>;

    /// Send one heartbeat to the member at `raft_addr`.
    fn heartbeat(
        &self,
        raft_addr: &str,
        hb: Heartbeat,
        timeout: Duration,
    ) -> PeerFuture<Result<HeartbeatAck, PeerCallError>>;

    /// Ask the member at `raft_addr` whether its VMM runs or receives `vm`.
    fn vm_presence(
        &self,
        raft_addr: &str,
        vm: &str,
        timeout: Duration,
    ) -> PeerFuture<Result<VmPresence, PeerCallError>>;

    /// Ask the leader at `raft_addr` for a read index (see [`ReadIndex`]).
    fn read_index(
        &self,
        raft_addr: &str,
        from: u64,
        timeout: Duration,
    ) -> PeerFuture<Result<ReadIndex, PeerCallError>>;
}

/// What a member's VMM holds of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPresence {
    /// Registered on its host: it runs (or is paused) there.
    Runs,
    /// An incoming live migration of it is in progress there.
    Arriving,
    /// Neither.
    Absent,
}

/// A leader's answer to a read-index request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadIndex {
    /// The leader confirmed with a quorum that it leads: a read after applying `index` is
    /// linearizable.
    Confirmed { index: u64 },
    /// It could not: not the leader (its view of the leader, if any), or no quorum.
    Refused { leader: Option<u64>, reason: String },
}
