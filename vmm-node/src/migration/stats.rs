//! Per-migration statistics.

use serde::{Deserialize, Serialize};

use super::convergence::Prediction;

/// One pre-copy (or the final) round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    pub round: u32,
    pub data_pages: u64,
    pub zero_pages_sent: u64,
    pub zero_pages_skipped: u64,
    /// Of `zero_pages_skipped`: pages not even read, because the host's page tables show
    /// they were never written (round 0, private anonymous memory only).
    #[serde(default)]
    pub untouched_pages: u64,
    pub wire_bytes: u64,
    pub duration_us: u64,
    /// Pages found dirty after the round.
    pub dirty_pages_after: u64,
    pub throttle_percent: u8,
}

/// The blackout (guest paused) split by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blackout {
    /// Last dirty pages sent and acknowledged (the four parts below together).
    pub final_copy_us: u64,
    /// Of `final_copy_us`: vCPUs (and devices) stopped.
    #[serde(default)]
    pub pause_us: u64,
    /// Of `final_copy_us`: the last dirty log read.
    #[serde(default)]
    pub dirty_log_us: u64,
    /// Of `final_copy_us`: the last dirty pages written on the data connections.
    #[serde(default)]
    pub final_send_us: u64,
    /// Of `final_copy_us`: the wait for the target's acknowledgement of the last round.
    #[serde(default)]
    pub final_ack_us: u64,
    /// vCPU / VM / device state saved and sent.
    pub state_us: u64,
    /// Disks flushed and released, target acquired and opened them, state restored.
    pub handoff_us: u64,
    /// Commit until the target reports running.
    pub resume_us: u64,
    /// Pause on the source until the target runs.
    pub total_us: u64,
}

/// Summary of a prediction, serializable.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PredictionStats {
    pub remaining_ms: Option<u64>,
    pub downtime_us: u64,
    pub converges: bool,
}

impl From<Prediction> for PredictionStats {
    fn from(p: Prediction) -> Self {
        PredictionStats {
            remaining_ms: p.remaining.map(|d| d.as_millis() as u64),
            downtime_us: p.downtime.as_micros() as u64,
            converges: p.converges,
        }
    }
}

/// Statistics of one live migration (source side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStats {
    pub connections: usize,
    pub guest_bytes: u64,
    pub rounds: Vec<RoundStats>,
    pub wire_bytes: u64,
    pub zero_pages_skipped: u64,
    /// Of `zero_pages_skipped`: pages never written, skipped without being read.
    #[serde(default)]
    pub untouched_pages: u64,
    pub bandwidth_bytes_per_s: f64,
    pub dirty_rate_bytes_per_s: f64,
    pub max_throttle_percent: u8,
    pub setup_us: u64,
    pub total_us: u64,
    pub blackout: Blackout,
    /// Prediction made after round 0.
    pub first_prediction: Option<PredictionStats>,
    /// Digest of the per-page CRCs as sent (source side of the receipt).
    pub source_digest: u64,
    /// Digest recomputed from the paused source's actual memory after switchover (when
    /// `MigrateOptions::verify_memory`): catches a page the dirty tracking missed.
    pub source_memory_digest: Option<u64>,
    /// Digest of the per-page CRCs as received (the target's receipt).
    pub target_digest: Option<u64>,
    /// Time the after-switchover verification took (not part of `total_us`).
    pub verify_us: u64,
}

impl MigrationStats {
    /// The target's receipt matches what was sent and, if verified, the source memory.
    pub fn receipt_matches(&self) -> bool {
        self.target_digest == Some(self.source_digest)
            && self
                .source_memory_digest
                .is_none_or(|d| d == self.source_digest)
    }
}
