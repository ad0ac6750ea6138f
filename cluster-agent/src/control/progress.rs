//! Live progress of the migrations this node is the source of, and the counters
//! `/metrics` reports: the source's engine events are written here; the migration
//! service's progress streams and the metrics read them.

use std::collections::HashMap;
use std::sync::Mutex;

use vmm_node::migration::source::MigrationEvent;

use crate::state::migrations;

/// Live progress entries kept (one per migration this node is the source of).
pub const BOARD_ENTRIES_MAX: usize = 64;

/// The latest engine event figures of one outgoing migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveProgress {
    pub phase: String,
    pub bytes_sent: u64,
    pub bytes_remaining: u64,
    pub fraction_done: f64,
    pub rate_bytes_per_s: f64,
    pub eta_ms: u64,
    pub round: u32,
    pub throttle_percent: u8,
    /// Bumped on every update (streams send only changes).
    pub version: u64,
}

/// Upper bounds (seconds) of the blackout histogram buckets (`/metrics`), +Inf implied.
pub const BLACKOUT_BUCKETS_S: [f64; 10] =
    [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// Upper bounds (seconds) of the migration duration histogram buckets, +Inf implied.
pub const DURATION_BUCKETS_S: [f64; 10] =
    [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];

/// How an outgoing migration ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// Counters of the migrations this node ran the source of since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceCounters {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub wire_bytes: u64,
    /// Successful migrations whose target's memory receipt differed from the source's.
    pub receipt_mismatches: u64,
}

/// Histograms of the successful outgoing live migrations (`/metrics` registers them).
#[derive(Debug, Clone)]
pub struct SourceHistograms {
    pub blackout_seconds: prometheus::Histogram,
    pub duration_seconds: prometheus::Histogram,
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )
    .expect("constant histogram names and increasing buckets are valid")
}

impl Default for SourceHistograms {
    fn default() -> Self {
        SourceHistograms {
            blackout_seconds: histogram(
                "cluster_migration_blackout_seconds",
                "Blackout (guest paused) of successful outgoing live migrations.",
                &BLACKOUT_BUCKETS_S,
            ),
            duration_seconds: histogram(
                "cluster_migration_duration_seconds",
                "Duration (start to switchover) of successful outgoing live migrations.",
                &DURATION_BUCKETS_S,
            ),
        }
    }
}

/// Progress of the migrations this node runs the source of, by migration id.
#[derive(Debug, Default)]
pub struct ProgressBoard {
    inner: Mutex<HashMap<u64, LiveProgress>>,
    counters: Mutex<SourceCounters>,
    histograms: SourceHistograms,
}

impl ProgressBoard {
    fn counters_mut(&self) -> std::sync::MutexGuard<'_, SourceCounters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counters(&self) -> SourceCounters {
        self.counters_mut().clone()
    }

    pub fn histograms(&self) -> &SourceHistograms {
        &self.histograms
    }

    /// An outgoing migration began.
    pub fn started(&self) {
        self.counters_mut().started += 1;
    }

    /// An outgoing migration ended (`summary` for a successful one).
    pub fn finished(&self, outcome: Outcome, summary: Option<&migrations::MigrationSummary>) {
        let mut c = self.counters_mut();
        match outcome {
            Outcome::Succeeded => c.succeeded += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Cancelled => c.cancelled += 1,
        }
        if let Some(s) = summary {
            c.wire_bytes += s.wire_bytes;
            if !s.receipt_matches {
                c.receipt_mismatches += 1;
            }
            self.histograms
                .blackout_seconds
                .observe(s.blackout_us as f64 / 1e6);
            self.histograms
                .duration_seconds
                .observe(s.total_us as f64 / 1e6);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveProgress>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record one engine event of migration `id`.
    pub fn update(&self, id: u64, ev: &MigrationEvent) {
        let mut b = self.lock();
        if !b.contains_key(&id) && b.len() >= BOARD_ENTRIES_MAX {
            if let Some(oldest) = b.keys().min().copied() {
                b.remove(&oldest);
            }
        }
        let p = b.entry(id).or_default();
        match ev {
            MigrationEvent::Phase(ph) => p.phase = (*ph).to_string(),
            MigrationEvent::Progress(g) => {
                p.bytes_sent = g.bytes_sent;
                p.bytes_remaining = g.bytes_remaining;
                p.fraction_done = g.fraction_done;
                p.rate_bytes_per_s = g.rate_bytes_per_s;
                p.eta_ms = g.eta_ms;
                p.round = g.round;
                p.throttle_percent = g.throttle_percent;
            }
            MigrationEvent::Throttle(t) => p.throttle_percent = *t,
            MigrationEvent::Prediction(_) => return,
        }
        p.version += 1;
    }

    pub fn get(&self, id: u64) -> Option<LiveProgress> {
        self.lock().get(&id).cloned()
    }
}
