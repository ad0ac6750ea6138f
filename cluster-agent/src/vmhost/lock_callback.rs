//! The callback through which this layer hands lock decisions back to the agent.
//!
//! The agent implements [`DiskLocks`] by proposing the commands through Raft and
//! answering once they are applied (`control::disk_lock_client`). `vmhost::local_locks`
//! (tests and `vmhost-bench` only) implements it over an in-process lock table.

use csv_volume::{LockCommand, LockGrant, NodeId};

use super::spec::DiskSpec;

/// Error returned by the agent's callback (its own error type, boxed).
pub type LockOpError = Box<dyn std::error::Error + Send + Sync>;

/// Lock decisions this layer needs committed.
pub trait DiskLocks: Send + Sync {
    /// Commits `commands` (`Release` / `Handoff` produced by the csv-volume hooks when
    /// disks were flushed and closed); returns once they are applied.
    fn commit(&self, vm: &str, commands: &[LockCommand]) -> Result<(), LockOpError>;
    /// Target of a migration: returns `node`'s grants for `disks` once the source's
    /// handoff is applied (for read-only disks: a shared `Acquire` for `node`).
    fn acquire(
        &self,
        vm: &str,
        node: NodeId,
        disks: &[DiskSpec],
    ) -> Result<Vec<LockGrant>, LockOpError>;
    /// Target of a migration, when the session is set up (long before the storage
    /// stage): the staged handoffs the source reserved for `node` (made visible locally
    /// first), whose fence records the target prepares before the pause.
    fn prepare_incoming(&self, _vm: &str, _node: NodeId, _disks: &[DiskSpec]) -> Vec<LockGrant> {
        Vec::new()
    }
    /// Source of a migration rolled back after [`DiskLocks::commit`]: brings `disks`
    /// back to `node` (handing them back from wherever they went) and returns the grants.
    fn reclaim(
        &self,
        vm: &str,
        node: NodeId,
        disks: &[DiskSpec],
    ) -> Result<Vec<LockGrant>, LockOpError>;
}
