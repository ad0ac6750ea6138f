//! Quick migration through the cluster: `vm migrate NAME --quick`.
//!
//! Committed like a live migration (`StartMigration { quick: true }`): the owner's
//! reconciler saves the VM into the shared volume (`VmHost::quick_save`: pause, snapshot,
//! disks flushed and closed), commits the disk `Handoff`s to the target, then commits
//! `FinishMigration { ok }`, which moves the owner and marks the new generation as one to
//! be restored (`VmRecord::quick_restore_generation`). The target's reconciler then
//! acquires the handed-off locks (idempotent: it already holds them) and restores the
//! image (`VmHost::quick_restore`) instead of booting.
//!
//! The image lives under the first disk's volume (or, for a VM without disks, the first
//! volume of the agent's config: every agent of a cluster names the same volumes).

use std::sync::Arc;

use csv_volume::{LockGrant, VolumeRegistry};

use crate::node::Agent;
use crate::state::ClusterState;
use crate::vmhost::quick_migration::SIDECAR_FILE;
use crate::vmhost::{VmHost, VmInfo, VmSpec};

/// The volume that holds `spec`'s quick-migration image.
pub fn quick_volume(registry: &VolumeRegistry, spec: &VmSpec) -> Option<String> {
    match spec.disks.first() {
        Some(d) => Some(d.name.volume().to_owned()),
        None => registry.volumes().next().map(|v| v.name().to_owned()),
    }
}

/// Why a quick migration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum QuickMigrationError {
    #[error("no VM named {0:?}")]
    UnknownVm(String),
    #[error("VM {vm:?} has no disks and no shared volume is configured ([[volumes]]); a quick migration saves the VM to a shared volume")]
    NoVolume { vm: String },
}

/// Refuses `--quick` for a VM that has no volume to be saved to.
pub fn check_volume(
    state: &ClusterState,
    host: &VmHost,
    vm: &str,
) -> Result<(), QuickMigrationError> {
    let Some(rec) = crate::state::vms::find(state, vm) else {
        return Err(QuickMigrationError::UnknownVm(vm.to_owned()));
    };
    match quick_volume(host.registry(), &rec.spec) {
        Some(_) => Ok(()),
        None => Err(QuickMigrationError::NoVolume { vm: vm.to_owned() }),
    }
}

/// Source half: save `name` to the shared volume for node `to` and commit the disk
/// handoffs. Returns the summary for the migration's end, or why it failed (the VM then
/// runs on here, unless the save succeeded and only the handoff commit failed).
pub async fn save_and_hand_off(
    agent: &Arc<Agent>,
    host: &Arc<VmHost>,
    name: &str,
    to: u64,
) -> Result<String, String> {
    let spec = host.state(name).map_err(|e| crate::error_chain(&e))?.spec;
    let volume = quick_volume(host.registry(), &spec)
        .ok_or_else(|| "no shared volume to save the VM to".to_owned())?;
    let (h, n) = (host.clone(), name.to_owned());
    let image = tokio::task::spawn_blocking(move || h.quick_save(&n, &volume, to))
        .await
        .map_err(|e| format!("quick save task failed: {e}"))?
        .map_err(|e| crate::error_chain(&e))?;
    for cmd in image.release {
        crate::control::disk_lock_client::commit(agent, name, cmd)
            .await
            .map_err(|e| {
                format!(
                    "VM saved to {} but {}",
                    image.dir.display(),
                    crate::error_chain(&e)
                )
            })?;
    }
    Ok(format!(
        "quick: paused {} us, saved {} MiB in {} ms",
        image.save.pause_us,
        (image.save.memory_bytes + image.save.state_bytes) >> 20,
        image.save.save_us / 1000
    ))
}

/// Target half: restore `spec` from its saved image with `grants`. Without an image (it was
/// restored before this agent restarted, and deleted) the VM boots from its disks.
pub fn restore(host: &VmHost, spec: VmSpec, grants: &[LockGrant]) -> Result<VmInfo, String> {
    let volume = quick_volume(host.registry(), &spec)
        .ok_or_else(|| "no shared volume holds the saved VM".to_owned())?;
    let dir = host
        .quick_dir(&volume, &spec.name)
        .map_err(|e| crate::error_chain(&e))?;
    if !dir.join(SIDECAR_FILE).exists() {
        tracing::warn!(vm = %spec.name, dir = %dir.display(), "no quick-migration image; booting from the disks");
        return host.start(spec, grants).map_err(|e| crate::error_chain(&e));
    }
    let (info, stats) = host
        .quick_restore(&dir, grants)
        .map_err(|e| crate::error_chain(&e))?;
    tracing::info!(vm = %info.name, restore_us = stats.restore_us, resume_us = stats.resume_us, "vm restored from quick migration");
    Ok(info)
}
