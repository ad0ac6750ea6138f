//! The cluster node daemon: one per VM host. Raft-replicated cluster state (openraft over
//! RocksDB), the controllers that act on it, the gRPC management API and the peer-only
//! Raft service, and the agent-local VM runtime.
//!
//! # Layout
//!
//! Layers, each depending only on the ones below it (a test, `tests/layers.rs`, keeps it
//! so):
//!
//! - [`api`]: the only module that knows tonic and the protobuf types — the management
//!   services, the peer plane (Raft service and its client), conversions, the one error
//!   → `tonic::Status` mapping, and `/metrics`.
//! - [`control`]: controllers acting on committed state — reconciler, failover, job
//!   runner, migration queue, placement, disk-lock client, migration progress.
//! - [`node`]: the agent's core — [`node::Agent`] (write path, cluster lifecycle),
//!   config, host facts, the liveness/lease model and its loops.
//! - [`raft`]: openraft glue — type config, the RocksDB log store and state machine, the
//!   data dir.
//! - [`state`]: the pure replicated state machine (commands, apply, storage keys).
//! - [`vmhost`]: the agent-local VM runtime over `vmm-node`; knows no Raft, only
//!   [`state`]'s spec types.
//!
//! [`server`] wires the layers together; `main.rs` only parses flags and calls it.
//! Beside them, depending on no layer but `node` for the agent's status: [`logging`] (the
//! stderr log, text or JSON) and [`systemd`] (readiness, status and watchdog
//! notifications), and `crash_point` (named abort points for fault tests, reachable
//! from every layer).

pub mod api;
pub mod control;
pub(crate) mod crash_point;
pub mod logging;
pub mod node;
pub mod raft;
pub mod server;
pub mod state;
pub mod systemd;
pub mod vmhost;

/// Render an error and its `source()` chain as one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
