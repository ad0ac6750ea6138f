//! The peer-only plane: the Raft RPCs, write forwarding and heartbeats between members.
//! [`server`] serves them; [`client`] is openraft's network and the agent's
//! [`PeerClient`](crate::node::peers::PeerClient).

use std::sync::atomic::{AtomicU64, Ordering};

pub mod client;
pub mod server;

/// AppendEntries calls (log replication and Raft's heartbeats) this agent process sent
/// and served, by transport: the unary `AppendEntries` rpc, or a message on an
/// `AppendEntriesStream`. Rendered as `cluster_peer_append_entries_total` on `/metrics`.
#[derive(Default)]
pub struct AppendEntriesCounts {
    pub sent_unary: AtomicU64,
    pub sent_stream: AtomicU64,
    pub served_unary: AtomicU64,
    pub served_stream: AtomicU64,
}

impl AppendEntriesCounts {
    /// `(direction, transport, count)` for each series.
    pub fn snapshot(&self) -> [(&'static str, &'static str, u64); 4] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("sent", "unary", v(&self.sent_unary)),
            ("sent", "stream", v(&self.sent_stream)),
            ("served", "unary", v(&self.served_unary)),
            ("served", "stream", v(&self.served_stream)),
        ]
    }
}

pub(crate) fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The process's [`AppendEntriesCounts`] (one agent per process).
pub static APPEND_ENTRIES: AppendEntriesCounts = AppendEntriesCounts {
    sent_unary: AtomicU64::new(0),
    sent_stream: AtomicU64::new(0),
    served_unary: AtomicU64::new(0),
    served_stream: AtomicU64::new(0),
};
