//! The peer-only plane: the Raft RPCs, write forwarding and heartbeats between members.
//! [`server`] serves them; [`client`] is openraft's network and the agent's
//! [`PeerClient`](crate::node::peers::PeerClient).

pub mod client;
pub mod server;
