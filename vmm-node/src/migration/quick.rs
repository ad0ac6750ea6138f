//! Quick migration: pause + snapshot (memory included) into a directory both nodes see,
//! then restore and resume on the target. Downtime = save + restore.

use std::path::Path;
use std::time::Instant;

use crate::snapshot::{self, SnapshotError};
use crate::Vm;

/// Errors of quick migration.
#[derive(Debug, thiserror::Error)]
pub enum QuickError {
    #[error("cannot pause the VM")]
    Pause(#[source] crate::VmError),
    #[error("cannot save the snapshot to {dir}")]
    Save {
        dir: String,
        #[source]
        source: SnapshotError,
    },
    #[error("cannot restore the snapshot from {dir}")]
    Restore {
        dir: String,
        #[source]
        source: SnapshotError,
    },
    #[error("cannot resume the restored VM")]
    Resume(#[source] crate::VmError),
}

/// Source half figures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuickSaveStats {
    pub pause_us: u64,
    pub save_us: u64,
    pub state_bytes: u64,
    pub memory_bytes: u64,
}

/// Target half figures.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QuickRestoreStats {
    pub restore_us: u64,
    pub resume_us: u64,
}

/// Pauses `vm` and saves it (state + memory) into `dir`. The VM stays paused; the caller
/// destroys it once the target runs it, or resumes it if the target cannot.
pub fn save(vm: &Vm, dir: &Path) -> Result<QuickSaveStats, QuickError> {
    let t = Instant::now();
    vm.pause().map_err(QuickError::Pause)?;
    let pause_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    let st = snapshot::save(vm, dir).map_err(|source| QuickError::Save {
        dir: dir.display().to_string(),
        source,
    })?;
    let stats = QuickSaveStats {
        pause_us,
        save_us: t.elapsed().as_micros() as u64,
        state_bytes: st.state_bytes,
        memory_bytes: st.memory_bytes,
    };
    tracing::info!(dir = %dir.display(), save_us = stats.save_us, "quick migration saved");
    Ok(stats)
}

/// Restores the VM saved in `dir` and resumes it.
pub fn restore(dir: &Path) -> Result<(Vm, QuickRestoreStats), QuickError> {
    let t = Instant::now();
    let vm = snapshot::restore(dir).map_err(|source| QuickError::Restore {
        dir: dir.display().to_string(),
        source,
    })?;
    let restore_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    vm.resume().map_err(QuickError::Resume)?;
    let stats = QuickRestoreStats {
        restore_us,
        resume_us: t.elapsed().as_micros() as u64,
    };
    tracing::info!(dir = %dir.display(), restore_us, "quick migration restored");
    Ok((vm, stats))
}
