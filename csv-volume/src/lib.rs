//! Cluster Shared Volumes: one namespace of disks on shared storage, a replicated
//! lock table that decides which node may write which disk, and fenced disk access
//! that refuses writes from a node whose lock was superseded.
//!
//! - [`name`]: pure validation of disk names (`volume/dir/disk.img`) and sizes.
//! - [`lock`]: the lock table, a pure deterministic state machine the cluster-agent
//!   embeds in its Raft state machine.
//! - [`volume`]: volumes and raw sparse disk images (create, grow, delete, list).
//! - [`fence`]: the fence record beside each disk and its cheap change check.
//! - [`disk`]: [`FencedDisk`], the token-checking disk backend.
//! - [`hooks`]: VM start/stop, migration handoff and failover takeover steps.

pub mod disk;
pub mod fence;
pub mod hooks;
pub mod lock;
pub mod name;
pub mod volume;

pub use disk::{disk_error, DiskError, FenceCheck, FencedDisk};
pub use fence::{staged_path, FenceError, FenceRecord};
pub use hooks::{
    discard_staged_handoff, handoff_open, handoff_release, open_for_vm, release_on_stop,
    stage_handoff, sync_handoff, takeover_open, HookError,
};
pub use lock::{
    ApplyContext, DiskLock, FencingToken, LockCommand, LockError, LockGrant, LockMode, LockOutcome,
    LockTable, NodeId,
};
pub use name::{DiskName, NameError, SizeError};
pub use volume::{DiskInfo, Volume, VolumeConfig, VolumeError, VolumeRegistry};
