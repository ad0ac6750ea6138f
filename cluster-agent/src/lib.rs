//! The cluster node daemon: openraft over RocksDB, a peer-only Raft gRPC service, a
//! public management gRPC service, node facts and liveness.
//!
//! Codemap (see ARCHITECTURE.md): [`config`] (TOML + flags), [`state`] (pure
//! replicated state machine), [`store`] (RocksDB log + state machine), [`datadir`]
//! (identity marker, refuses foreign/damaged dirs), [`facts`] (CPU/memory/KVM probe),
//! [`raft_types`], [`network`] (Raft client over tonic), [`peer_service`] (Raft
//! server), [`mgmt_service`] + [`convert`] (public API), [`agent`] (write path,
//! lifecycle, liveness), [`server`] (wiring, shutdown).

pub mod agent;
pub mod config;
pub mod convert;
pub mod crash_point;
pub mod datadir;
pub mod disk_locks;
pub mod drain;
pub mod drain_service;
pub mod facts;
pub mod failover;
pub mod fixtures;
pub mod forward;
pub mod hotplug;
pub mod jobs;
pub mod liveness;
pub mod lock_client;
pub mod metrics;
pub mod mgmt_service;
pub mod migration_queue;
pub mod migration_service;
pub mod migrations;
pub mod network;
pub mod peer_service;
pub mod placement;
pub mod quick_migration;
pub mod raft_types;
pub mod reconciler;
pub mod server;
pub mod state;
pub mod store;
pub mod vm_convert;
pub mod vm_service;
pub mod vmhost;
pub mod vms;
pub mod volume_service;

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
