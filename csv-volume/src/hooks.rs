//! Hooks the cluster-agent calls around a VM's life, on the node that runs it.
//!
//! The lock decisions come from the replicated [`crate::LockTable`]; the agent passes
//! the resulting [`LockGrant`] in, so this crate needs no Raft. Each hook does the
//! file-side half of one protocol step:
//!
//! ```text
//! VM start     agent: Acquire ─raft─▶ grant ──▶ open_for_vm: write fence(token) → open
//! VM stop      release_on_stop: flush → close ──▶ agent: Release ─raft─▶
//! migration    source, VM running: agent: ReserveHandoff(src→dst) ─raft─▶ reserved grant
//!              source, paused: handoff_release: flush → close (no entry in the blackout)
//!              target: handoff_open(reserved grant): write fence(reserved token) → open
//!              VM running on dst: agent: CompleteHandoff ─raft─▶ dst holds the disk
//!              (without a reservation: Handoff(src→dst) ─raft─▶ grant, inside the blackout)
//! failover     agent: ForceTakeover (owner Down) ─raft─▶ grant
//!              new owner: takeover_open(grant, old lease deadline): wait → write fence → open
//! ```

use std::thread;
use std::time::Instant;

use crate::disk::{DiskError, FencedDisk};
use crate::fence::{
    discard_staged_record, install_fence_record, stage_fence_record, sync_record_dir,
    write_fence_record, FenceError, FenceRecord,
};
use crate::lock::{LockCommand, LockGrant, LockMode, NodeId};
use crate::volume::{VolumeError, VolumeRegistry};

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("grant for disk {disk} is for node {grant_node}, this is node {local_node}")]
    WrongNode {
        disk: String,
        grant_node: NodeId,
        local_node: NodeId,
    },
    #[error("handoff grant for disk {disk} is {mode}, expected exclusive read-write")]
    NotExclusive { disk: String, mode: LockMode },
    #[error("disk {disk} was opened without a namespace name; cannot build a lock command")]
    Unnamed { disk: String },
    #[error("volume operation failed")]
    Volume(#[source] VolumeError),
    #[error("cannot install the fence record")]
    Fence(#[source] FenceError),
    #[error("cannot open the fenced disk")]
    Open(#[source] DiskError),
    #[error("cannot flush disk {disk} before letting it go")]
    Flush {
        disk: String,
        #[source]
        source: std::io::Error,
    },
}

fn check_node(local_node: NodeId, grant: &LockGrant) -> Result<(), HookError> {
    if grant.node != local_node {
        return Err(HookError::WrongNode {
            disk: grant.disk.to_string(),
            grant_node: grant.node,
            local_node,
        });
    }
    Ok(())
}

/// VM start (and the last step of handoff/takeover): installs the grant's fence record
/// beside the disk (never rolling back a newer one) and opens the disk for the grant.
pub fn open_for_vm(
    registry: &VolumeRegistry,
    local_node: NodeId,
    grant: &LockGrant,
) -> Result<FencedDisk, HookError> {
    install_and_open(registry, local_node, grant, write_fence_record)
}

/// Installs `grant`'s fence record with `install` (never rolling a newer one back) and
/// opens the disk for the grant.
fn install_and_open(
    registry: &VolumeRegistry,
    local_node: NodeId,
    grant: &LockGrant,
    install: fn(&std::path::Path, &FenceRecord) -> Result<bool, FenceError>,
) -> Result<FencedDisk, HookError> {
    check_node(local_node, grant)?;
    let path = registry.disk_path(&grant.disk).map_err(HookError::Volume)?;
    install(&path, &FenceRecord::from(grant)).map_err(HookError::Fence)?;
    FencedDisk::open(
        &path,
        Some(grant.disk.clone()),
        grant.node,
        grant.token,
        grant.mode,
    )
    .map_err(HookError::Open)
}

fn flush_and_close(mut disk: FencedDisk) -> Result<crate::name::DiskName, HookError> {
    let Some(name) = disk.name().cloned() else {
        return Err(HookError::Unnamed {
            disk: disk.describe(),
        });
    };
    disk.flush().map_err(|source| HookError::Flush {
        disk: name.to_string(),
        source,
    })?;
    drop(disk);
    Ok(name)
}

/// VM stop: flushes and closes the disk, and returns the `Release` command for the
/// agent to propose. A fenced disk fails here (its data must not be trusted, and the
/// lock is no longer this node's to release).
pub fn release_on_stop(disk: FencedDisk) -> Result<LockCommand, HookError> {
    let node = disk.node();
    let name = flush_and_close(disk)?;
    tracing::info!(disk = %name, node, "disk released on VM stop");
    Ok(LockCommand::Release { disk: name, node })
}

/// Migration, source side: flushes and closes the disk, and returns the `Handoff`
/// command (this node → `to`) for the agent to propose.
pub fn handoff_release(disk: FencedDisk, to: NodeId) -> Result<LockCommand, HookError> {
    let from = disk.node();
    let name = flush_and_close(disk)?;
    tracing::info!(disk = %name, from, to, "disk handed off");
    Ok(LockCommand::Handoff {
        disk: name,
        from,
        to,
    })
}

/// Migration, target side: with the grant from the committed `Handoff` (or the reserved
/// one of a staged handoff), installs the new token — renaming the record
/// [`stage_handoff`] prepared, when there is one — and opens the disk.
pub fn handoff_open(
    registry: &VolumeRegistry,
    local_node: NodeId,
    grant: &LockGrant,
) -> Result<FencedDisk, HookError> {
    if grant.mode != LockMode::Exclusive {
        return Err(HookError::NotExclusive {
            disk: grant.disk.to_string(),
            mode: grant.mode,
        });
    }
    install_and_open(registry, local_node, grant, install_fence_record)
}

/// Staged handoff, target side, before the source pauses: writes the reserved grant's
/// fence record durably beside the current one, so that [`handoff_open`] installs it
/// with one rename inside the blackout. The old holder keeps writing until then.
pub fn stage_handoff(
    registry: &VolumeRegistry,
    local_node: NodeId,
    grant: &LockGrant,
) -> Result<(), HookError> {
    check_node(local_node, grant)?;
    let path = registry.disk_path(&grant.disk).map_err(HookError::Volume)?;
    stage_fence_record(&path, &FenceRecord::from(grant)).map_err(HookError::Fence)
}

/// A staged handoff that will not be installed (the migration ended first).
pub fn discard_staged_handoff(registry: &VolumeRegistry, grant: &LockGrant) {
    if let Ok(path) = registry.disk_path(&grant.disk) {
        discard_staged_record(&path, &FenceRecord::from(grant));
    }
}

/// After the VM runs on the target: makes the installed record's rename durable.
pub fn sync_handoff(registry: &VolumeRegistry, grant: &LockGrant) -> Result<(), HookError> {
    let path = registry.disk_path(&grant.disk).map_err(HookError::Volume)?;
    sync_record_dir(&path).map_err(HookError::Fence)
}

/// Failover: with the grant from a committed `ForceTakeover`, waits until the old
/// owner's lease deadline has passed (it has stopped writing by then), then installs
/// the new token (fencing any late writer) and opens the disk.
pub fn takeover_open(
    registry: &VolumeRegistry,
    local_node: NodeId,
    grant: &LockGrant,
    old_lease_deadline: Instant,
) -> Result<FencedDisk, HookError> {
    check_node(local_node, grant)?;
    let now = Instant::now();
    if old_lease_deadline > now {
        let wait = old_lease_deadline - now;
        tracing::info!(disk = %grant.disk, wait_ms = wait.as_millis() as u64, "waiting out the old owner's lease");
        thread::sleep(wait);
    }
    let disk = open_for_vm(registry, local_node, grant)?;
    tracing::info!(disk = %grant.disk, node = local_node, token = grant.token.0, "disk taken over");
    Ok(disk)
}
