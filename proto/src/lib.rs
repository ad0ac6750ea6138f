//! Generated gRPC types and services.
//!
//! * [`management`]: the public management API that `clusterctl` and operators use.
//! * [`raft`]: the peer-only Raft service agents use among themselves. It is served
//!   on its own listener so it can be firewalled away from clients.
//! * [`pki`]: the cluster's certificates — the identity each one names (a node, or a user
//!   with a role) and how the cluster CA issues them.

/// The encoded `FileDescriptorSet` of every .proto file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/cluster_descriptor.bin"));

/// The management-plane services (what the management listener serves and reflects;
/// the peer-only `cluster.raft.v1.RaftPeerService` is not among them).
pub const MANAGEMENT_SERVICES: &[&str] = &[
    "cluster.management.v1.ManagementService",
    "cluster.vms.v1.VmService",
    "cluster.drain.v1.DrainService",
    "cluster.volumes.v1.VolumeService",
    "cluster.migrations.v1.MigrationService",
];

/// The management methods a `viewer` may call — reads, the console and watches (gRPC
/// paths). Every other management method changes something and needs `admin` (or a node
/// certificate: agents forward calls to each other).
pub const READ_ONLY_METHODS: &[&str] = &[
    "/cluster.management.v1.ManagementService/ClusterStatus",
    "/cluster.management.v1.ManagementService/ListNodes",
    "/cluster.management.v1.ManagementService/GetNode",
    "/cluster.management.v1.ManagementService/ListEvents",
    "/cluster.management.v1.ManagementService/WatchEvents",
    "/cluster.management.v1.ManagementService/GetKv",
    "/cluster.management.v1.ManagementService/ConsoleLogin",
    "/cluster.management.v1.ManagementService/GetCa",
    "/cluster.vms.v1.VmService/ListVms",
    "/cluster.vms.v1.VmService/GetVm",
    "/cluster.vms.v1.VmService/StreamConsole",
    "/cluster.vms.v1.VmService/WhyNot",
    "/cluster.vms.v1.VmService/PlanMigration",
    "/cluster.drain.v1.DrainService/GetDrain",
    "/cluster.drain.v1.DrainService/ListJobs",
    "/cluster.drain.v1.DrainService/GetJob",
    "/cluster.drain.v1.DrainService/WatchJob",
    "/cluster.drain.v1.DrainService/GetPolicy",
    "/cluster.drain.v1.DrainService/PlanBalance",
    "/cluster.volumes.v1.VolumeService/ListDisks",
    "/cluster.volumes.v1.VolumeService/ListLocks",
    "/cluster.migrations.v1.MigrationService/ListMigrations",
    "/cluster.migrations.v1.MigrationService/GetMigration",
    "/cluster.migrations.v1.MigrationService/WatchMigration",
];

pub mod names;
pub mod pki;
pub mod times;

/// The well-known types the API uses (`Timestamp`, `Duration`).
pub use prost_types;

pub use names::EnumName;

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
