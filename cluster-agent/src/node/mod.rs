//! The agent's core: the [`Agent`] (Raft instance, write path, cluster lifecycle), its
//! configuration, the host facts it registers with, and liveness (heartbeats, the
//! leader's Down decision, this node's lease).
//!
//! **Architecture Invariant:** nothing here knows tonic or the protobuf types; the peer
//! plane is reached through the [`peers::PeerClient`] trait, which `api::peer`
//! implements.

mod agent;
pub mod config;
pub mod credentials;
pub mod demand;
pub mod elections;
pub mod facts;
mod heartbeats;
pub mod liveness;
pub mod peers;
mod reads;

pub use agent::{
    now_unix_ms, Agent, ForwardReply, ForwardRequest, StartError, WriteError,
    LEARNER_CATCH_UP_TIMEOUT, WRITE_DEADLINE,
};
pub use heartbeats::{grid_interval, heartbeat_timeout, until_next_round};
pub use reads::{ReadError, READ_DEADLINE};
