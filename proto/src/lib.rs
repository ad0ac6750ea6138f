//! Generated gRPC types and services.
//!
//! * [`management`]: the public management API that `clusterctl` and operators use.
//! * [`raft`]: the peer-only Raft service agents use among themselves. It is served
//!   on its own listener so it can be firewalled away from clients.

/// The encoded `FileDescriptorSet` of every .proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cluster_descriptor.bin"));

/// The management-plane services (what the management listener serves and reflects;
/// the peer-only `cluster.raft.v1.RaftPeer` is not among them).
pub const MANAGEMENT_SERVICES: &[&str] = &[
    "cluster.management.v1.Management",
    "cluster.vms.v1.VmService",
    "cluster.drain.v1.DrainService",
    "cluster.volumes.v1.VolumeService",
    "cluster.migrations.v1.MigrationService",
];

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

/// Request metadata key that asks an agent for its own, possibly stale view instead of a
/// linearizable read (value `true` or `1`). Without it, every read of the management
/// services is linearizable: the agent confirms with the Raft leader (which confirms
/// with a quorum) that its replica holds every committed entry, and answers
/// `UNAVAILABLE` when it cannot. `ClusterStatus` always answers the local view.
pub const STALE_READ_HEADER: &str = "x-stale-read";
