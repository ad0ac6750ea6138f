//! Generated gRPC types and services.
//!
//! * [`management`]: the public management API that `clusterctl` and operators use.
//! * [`raft`]: the peer-only Raft service agents use among themselves. It is served
//!   on its own listener so it can be firewalled away from clients.

/// Public management API (`cluster.management.v1`).
pub mod management {
    tonic::include_proto!("cluster.management.v1");
}

/// Peer-only Raft service (`cluster.raft.v1`).
pub mod raft {
    tonic::include_proto!("cluster.raft.v1");
}

/// VM lifecycle API (`cluster.vms.v1`), served next to `management`.
pub mod vms {
    tonic::include_proto!("cluster.vms.v1");
}

/// Drain, failback and balancing jobs (`cluster.drain.v1`), served next to `management`.
pub mod drain {
    tonic::include_proto!("cluster.drain.v1");
}

/// Shared-volume disks and locks (`cluster.volumes.v1`), served next to `management`.
pub mod volumes {
    tonic::include_proto!("cluster.volumes.v1");
}

/// Migration management API (`cluster.migrations.v1`), served next to `vms`.
pub mod migrations {
    tonic::include_proto!("cluster.migrations.v1");
}
