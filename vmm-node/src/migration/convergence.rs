//! Convergence: a pure model that decides, after each pre-copy round, whether to run
//! another round, throttle the vCPUs more (auto-converge), stop and copy, or give up.
//! No I/O, no clock: the caller passes measured figures and elapsed times in.

use std::time::Duration;

/// Default maximum blackout.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(300);
/// Default deadline for the whole migration.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(120);
/// First throttle step (percent of vCPU time taken away).
pub const THROTTLE_INITIAL_PERCENT: u8 = 20;
/// Further throttle steps.
pub const THROTTLE_STEP_PERCENT: u8 = 10;
/// Highest throttle.
pub const THROTTLE_MAX_PERCENT: u8 = 99;
/// A round "makes progress" when the dirty set shrinks below this share of the previous.
const PROGRESS_RATIO: f64 = 0.9;
/// Pre-copy rounds without reaching the target before each throttle step.
const STALLED_ROUNDS_BEFORE_THROTTLE: u32 = 1;
/// A round that finds this share of what it sent dirty again is outrun by the guest
/// (the dirty rate is then under-measured: it saturates at the working set).
const OUTRUN_RATIO: f64 = 0.9;

/// Errors of convergence configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvergenceError {
    #[error("maximum downtime must be at least 1 ms, got {0:?}")]
    DowntimeTooSmall(Duration),
    #[error("deadline {deadline:?} must exceed the maximum downtime {max_downtime:?}")]
    DeadlineTooSmall {
        deadline: Duration,
        max_downtime: Duration,
    },
}

/// User-settable limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvergenceConfig {
    pub max_downtime: Duration,
    pub deadline: Duration,
    /// Auto-converge allowed.
    pub throttle: bool,
}

impl Default for ConvergenceConfig {
    fn default() -> Self {
        ConvergenceConfig {
            max_downtime: DEFAULT_MAX_DOWNTIME,
            deadline: DEFAULT_DEADLINE,
            throttle: true,
        }
    }
}

impl ConvergenceConfig {
    pub fn validate(&self) -> Result<(), ConvergenceError> {
        if self.max_downtime < Duration::from_millis(1) {
            return Err(ConvergenceError::DowntimeTooSmall(self.max_downtime));
        }
        if self.deadline <= self.max_downtime {
            return Err(ConvergenceError::DeadlineTooSmall {
                deadline: self.deadline,
                max_downtime: self.max_downtime,
            });
        }
        Ok(())
    }
}

/// What one finished round measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundObservation {
    /// Bytes the round put on the wire.
    pub bytes_sent: u64,
    /// Pages the round processed (sent or skipped).
    pub pages_processed: u64,
    /// Wall time of the round (scan + send + acknowledgement).
    pub duration: Duration,
    /// Dirty bytes found after the round (what the next round would send).
    pub dirty_bytes: u64,
    /// Time since the migration started.
    pub elapsed: Duration,
}

/// The model's verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    AnotherRound,
    /// Remaining dirty bytes fit in the allowed blackout.
    StopAndCopy,
    /// Raise the vCPU throttle to this percentage and run another round.
    Throttle {
        percent: u8,
    },
    /// Abandon the migration (the VM keeps running on the source).
    GiveUp {
        reason: String,
    },
}

/// Estimated outcome.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    pub bandwidth_bytes_per_s: f64,
    pub dirty_rate_bytes_per_s: f64,
    /// Remaining time until the VM runs on the target, if it converges.
    pub remaining: Option<Duration>,
    /// Expected blackout.
    pub downtime: Duration,
    pub converges: bool,
}

/// Convergence state across rounds.
#[derive(Debug, Clone)]
pub struct Convergence {
    cfg: ConvergenceConfig,
    bandwidth_bytes_per_s: f64,
    dirty_rate_bytes_per_s: f64,
    throttle_percent: u8,
    best_dirty_bytes: u64,
    stalled_rounds: u32,
    rounds: u32,
    /// A round moved enough bytes to measure the link (the hint no longer applies).
    bandwidth_measured: bool,
}

impl Convergence {
    pub fn new(cfg: ConvergenceConfig) -> Self {
        Convergence {
            cfg,
            bandwidth_bytes_per_s: 0.0,
            dirty_rate_bytes_per_s: 0.0,
            throttle_percent: 0,
            best_dirty_bytes: u64::MAX,
            stalled_rounds: 0,
            rounds: 0,
            bandwidth_measured: false,
        }
    }

    /// Seeds the bandwidth estimate (e.g. the migration network's nominal speed); it is
    /// used until a round moves at least 1 MiB, then measurements replace it. Without
    /// it, a mostly-zero guest's round 0 (scan-bound, few bytes) would make the link look
    /// slow and the blackout budget tiny.
    pub fn with_bandwidth_hint(mut self, bytes_per_s: f64) -> Self {
        self.bandwidth_bytes_per_s = bytes_per_s.max(0.0);
        self
    }

    pub fn throttle_percent(&self) -> u8 {
        self.throttle_percent
    }

    pub fn bandwidth_bytes_per_s(&self) -> f64 {
        self.bandwidth_bytes_per_s
    }

    pub fn dirty_rate_bytes_per_s(&self) -> f64 {
        self.dirty_rate_bytes_per_s
    }

    /// Records a round and decides what comes next.
    pub fn observe(&mut self, o: &RoundObservation) -> Decision {
        self.rounds += 1;
        let secs = o.duration.as_secs_f64().max(1e-6);
        // Bandwidth: only rounds that moved a meaningful amount measure the link; keep the
        // best figure seen (short rounds are latency-bound and would under-estimate it).
        let bw = o.bytes_sent as f64 / secs;
        if o.bytes_sent >= 1 << 20 {
            self.bandwidth_bytes_per_s = if self.bandwidth_measured {
                self.bandwidth_bytes_per_s.max(bw)
            } else {
                bw
            };
            self.bandwidth_measured = true;
        } else if !self.bandwidth_measured {
            self.bandwidth_bytes_per_s = self.bandwidth_bytes_per_s.max(bw);
        }
        self.dirty_rate_bytes_per_s = o.dirty_bytes as f64 / secs;

        if o.dirty_bytes == 0 || o.dirty_bytes as f64 <= self.budget_bytes() {
            return Decision::StopAndCopy;
        }
        if o.elapsed >= self.cfg.deadline {
            return Decision::GiveUp {
                reason: format!(
                    "deadline of {:?} reached with {} dirty bytes left \
                     (dirty rate {:.0} B/s, bandwidth {:.0} B/s, throttle {} %)",
                    self.cfg.deadline,
                    o.dirty_bytes,
                    self.dirty_rate_bytes_per_s,
                    self.bandwidth_bytes_per_s,
                    self.throttle_percent
                ),
            };
        }
        if (o.dirty_bytes as f64) < self.best_dirty_bytes as f64 * PROGRESS_RATIO {
            self.best_dirty_bytes = o.dirty_bytes;
            self.stalled_rounds = 0;
        } else {
            self.best_dirty_bytes = self.best_dirty_bytes.min(o.dirty_bytes);
            self.stalled_rounds += 1;
        }
        let processed_bytes = o.pages_processed as f64 * 4096.0;
        let outrun = self.dirty_rate_bytes_per_s >= self.bandwidth_bytes_per_s
            || (self.rounds > 1 && o.dirty_bytes as f64 >= OUTRUN_RATIO * processed_bytes);
        if self.cfg.throttle
            && self.throttle_percent < THROTTLE_MAX_PERCENT
            && (outrun || self.stalled_rounds >= STALLED_ROUNDS_BEFORE_THROTTLE)
        {
            self.throttle_percent = if self.throttle_percent == 0 {
                THROTTLE_INITIAL_PERCENT
            } else {
                (self.throttle_percent + THROTTLE_STEP_PERCENT).min(THROTTLE_MAX_PERCENT)
            };
            self.stalled_rounds = 0;
            return Decision::Throttle {
                percent: self.throttle_percent,
            };
        }
        Decision::AnotherRound
    }

    fn budget_bytes(&self) -> f64 {
        self.bandwidth_bytes_per_s * self.cfg.max_downtime.as_secs_f64()
    }

    /// Predicts the rest of the migration from `dirty_bytes` still to send, assuming the
    /// measured bandwidth and dirty rate hold (geometric series of rounds).
    pub fn predict(&self, dirty_bytes: u64) -> Prediction {
        let bw = self.bandwidth_bytes_per_s;
        let rate = self.dirty_rate_bytes_per_s;
        let budget = self.budget_bytes();
        if bw <= 0.0 {
            return Prediction {
                bandwidth_bytes_per_s: bw,
                dirty_rate_bytes_per_s: rate,
                remaining: None,
                downtime: self.cfg.max_downtime,
                converges: false,
            };
        }
        let mut remaining = dirty_bytes as f64;
        let mut t = 0.0;
        let mut converges = false;
        for _ in 0..64 {
            if remaining <= budget {
                converges = true;
                break;
            }
            let round = remaining / bw;
            t += round;
            remaining = rate * round;
            if rate >= bw {
                break;
            }
        }
        let downtime = Duration::from_secs_f64(remaining / bw);
        Prediction {
            bandwidth_bytes_per_s: bw,
            dirty_rate_bytes_per_s: rate,
            remaining: converges.then(|| Duration::from_secs_f64(t) + downtime),
            downtime,
            converges,
        }
    }
}

/// Progress as reported to a user: monotone by construction.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Bytes put on the wire so far (never decreases).
    pub bytes_sent: u64,
    /// Estimated bytes still to send (never increases).
    pub bytes_remaining: u64,
    /// Share done, 0..=1 (never decreases).
    pub fraction_done: f64,
    pub rate_bytes_per_s: f64,
    /// Estimated time left (never increases; stays 0 once reached until the end).
    pub eta_ms: u64,
    pub round: u32,
    pub throttle_percent: u8,
}

/// Produces [`Progress`] values that never go backwards even though the underlying
/// estimate does (a guest can dirty more memory than was left).
#[derive(Debug, Clone, Default)]
pub struct ProgressTracker {
    last: Option<Progress>,
    last_elapsed_ms: u64,
}

impl ProgressTracker {
    /// Folds a raw estimate (its `fraction_done` is ignored) into the monotone series.
    /// `elapsed_ms` is time since the start.
    pub fn update(&mut self, raw: Progress, elapsed_ms: u64) -> Progress {
        let mut p = raw;
        if let Some(prev) = self.last {
            p.bytes_sent = p.bytes_sent.max(prev.bytes_sent);
            p.bytes_remaining = p.bytes_remaining.min(prev.bytes_remaining);
            let since = elapsed_ms.saturating_sub(self.last_elapsed_ms);
            p.eta_ms = p.eta_ms.min(prev.eta_ms.saturating_sub(since));
            p.round = p.round.max(prev.round);
        }
        let total = p.bytes_sent + p.bytes_remaining;
        p.fraction_done = if total == 0 {
            1.0
        } else {
            p.bytes_sent as f64 / total as f64
        };
        if let Some(prev) = self.last {
            p.fraction_done = p.fraction_done.max(prev.fraction_done);
        }
        self.last = Some(p);
        self.last_elapsed_ms = elapsed_ms;
        p
    }

    /// Final progress: everything sent.
    pub fn finish(&mut self, bytes_sent: u64, elapsed_ms: u64) -> Progress {
        let raw = Progress {
            bytes_sent,
            bytes_remaining: 0,
            fraction_done: 1.0,
            rate_bytes_per_s: 0.0,
            eta_ms: 0,
            round: 0,
            throttle_percent: 0,
        };
        let mut p = self.update(raw, elapsed_ms);
        p.fraction_done = 1.0;
        self.last = Some(p);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn obs(bytes_sent: u64, ms: u64, dirty: u64, elapsed_ms: u64) -> RoundObservation {
        RoundObservation {
            bytes_sent,
            pages_processed: bytes_sent / 4096,
            duration: Duration::from_millis(ms),
            dirty_bytes: dirty,
            elapsed: Duration::from_millis(elapsed_ms),
        }
    }

    fn cfg(downtime_ms: u64, deadline_ms: u64) -> ConvergenceConfig {
        ConvergenceConfig {
            max_downtime: Duration::from_millis(downtime_ms),
            deadline: Duration::from_millis(deadline_ms),
            throttle: true,
        }
    }

    #[test]
    fn idle_guest_stops_after_round_zero() {
        let mut c = Convergence::new(cfg(5, 10_000));
        // 100 MB in 100 ms = 1 GB/s; 5 ms budget = 5 MB; 1 MB dirty.
        assert_eq!(
            c.observe(&obs(100 * MB, 100, MB, 100)),
            Decision::StopAndCopy
        );
    }

    #[test]
    fn shrinking_dirty_set_iterates_then_stops() {
        let mut c = Convergence::new(cfg(5, 10_000));
        assert_eq!(
            c.observe(&obs(100 * MB, 100, 40 * MB, 100)),
            Decision::AnotherRound
        );
        assert_eq!(
            c.observe(&obs(40 * MB, 40, 12 * MB, 140)),
            Decision::AnotherRound
        );
        assert_eq!(
            c.observe(&obs(12 * MB, 12, 3 * MB, 152)),
            Decision::StopAndCopy
        );
    }

    #[test]
    fn guest_faster_than_link_is_throttled_in_steps_up_to_99() {
        let mut c = Convergence::new(cfg(5, 1_000_000));
        // 1 GB/s link, dirty rate 2 GB/s: every round finds more than it sent.
        let mut percents = Vec::new();
        for i in 0..20 {
            match c.observe(&obs(100 * MB, 100, 200 * MB, 100 * (i + 1))) {
                Decision::Throttle { percent } => percents.push(percent),
                Decision::AnotherRound => {}
                d => panic!("unexpected {d:?}"),
            }
        }
        assert_eq!(percents[..3], [20, 30, 40]);
        assert_eq!(*percents.last().unwrap(), 99);
        assert!(percents.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn deadline_gives_up_with_reason() {
        let mut c = Convergence::new(cfg(5, 1_000));
        match c.observe(&obs(100 * MB, 100, 200 * MB, 1_000)) {
            Decision::GiveUp { reason } => assert!(reason.contains("deadline"), "{reason}"),
            d => panic!("unexpected {d:?}"),
        }
    }

    #[test]
    fn stalled_rounds_trigger_throttle_even_below_link_speed() {
        let mut c = Convergence::new(cfg(5, 100_000));
        // The dirty set does not shrink although the dirty rate is below the bandwidth
        // and each round processes more than it finds dirty.
        assert_eq!(
            c.observe(&obs(100 * MB, 100, 30 * MB, 100)),
            Decision::AnotherRound
        );
        let mut o = obs(30 * MB, 60, 29 * MB, 160);
        o.pages_processed = 100 * MB / 4096;
        assert_eq!(c.observe(&o), Decision::Throttle { percent: 20 });
        // A round that clearly shrinks the dirty set is progress again.
        let mut o = obs(29 * MB, 30, 10 * MB, 200);
        o.pages_processed = 100 * MB / 4096;
        assert_eq!(c.observe(&o), Decision::AnotherRound);
    }

    #[test]
    fn guest_rewriting_its_whole_working_set_is_throttled_at_once() {
        let mut c = Convergence::new(cfg(5, 100_000));
        assert_eq!(
            c.observe(&obs(100 * MB, 100, 30 * MB, 100)),
            Decision::AnotherRound
        );
        // Round 1 sent 30 MB and found the same 30 MB dirty again: outrun.
        assert_eq!(
            c.observe(&obs(30 * MB, 60, 30 * MB, 160)),
            Decision::Throttle { percent: 20 }
        );
    }

    #[test]
    fn throttle_disabled_never_throttles() {
        let mut c = Convergence::new(ConvergenceConfig {
            throttle: false,
            ..cfg(5, 1_000)
        });
        for i in 0..9 {
            assert_eq!(
                c.observe(&obs(100 * MB, 100, 200 * MB, 100 * (i + 1))),
                Decision::AnotherRound
            );
        }
        assert!(matches!(
            c.observe(&obs(100 * MB, 100, 200 * MB, 1000)),
            Decision::GiveUp { .. }
        ));
    }

    #[test]
    fn prediction_for_converging_and_diverging_guests() {
        let mut c = Convergence::new(cfg(5, 100_000));
        c.observe(&obs(1000 * MB, 1000, 100 * MB, 1000)); // 1 GB/s, 100 MB/s dirty
        let p = c.predict(100 * MB);
        assert!(p.converges);
        // ~100 ms + 10 ms + 1 ms ... plus downtime ≤ 5 ms.
        let r = p.remaining.unwrap();
        assert!(
            r > Duration::from_millis(100) && r < Duration::from_millis(130),
            "{r:?}"
        );
        assert!(p.downtime <= Duration::from_millis(5));

        let mut d = Convergence::new(cfg(5, 100_000));
        d.observe(&obs(100 * MB, 100, 300 * MB, 100)); // dirty 3 GB/s vs 1 GB/s
        let p = d.predict(300 * MB);
        assert!(!p.converges);
        assert_eq!(p.remaining, None);
    }

    #[test]
    fn bandwidth_hint_applies_until_a_round_measures_the_link() {
        // Round 0 of a mostly-zero guest: 100 KB in 300 ms would mean 333 KB/s.
        let mut c = Convergence::new(cfg(5, 10_000)).with_bandwidth_hint(100.0 * MB as f64);
        assert_eq!(
            c.observe(&obs(100_000, 300, 200_000, 300)),
            Decision::StopAndCopy
        );
        assert_eq!(c.bandwidth_bytes_per_s(), 100.0 * MB as f64);
        // A round of 10 MB in 100 ms measures 100 MB/s... then 50 MB/s replaces the hint.
        let mut c = Convergence::new(cfg(5, 10_000)).with_bandwidth_hint(400.0 * MB as f64);
        c.observe(&obs(10 * MB, 200, 100 * MB, 200));
        assert_eq!(c.bandwidth_bytes_per_s(), 50.0 * MB as f64);
    }

    #[test]
    fn config_validation() {
        assert!(cfg(0, 10).validate().is_err());
        assert_eq!(
            cfg(10, 10).validate(),
            Err(ConvergenceError::DeadlineTooSmall {
                deadline: Duration::from_millis(10),
                max_downtime: Duration::from_millis(10)
            })
        );
        assert!(ConvergenceConfig::default().validate().is_ok());
    }

    #[test]
    fn progress_never_goes_backwards() {
        let mut t = ProgressTracker::default();
        let mut x: u64 = 12345;
        let mut prev: Option<Progress> = None;
        let mut sent = 0;
        for step in 0..500u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sent += x % 1000;
            let raw = Progress {
                bytes_sent: sent,
                bytes_remaining: x % 100_000,
                fraction_done: 0.0,
                rate_bytes_per_s: 1.0,
                eta_ms: x % 5000,
                round: (step / 10) as u32,
                throttle_percent: 0,
            };
            let p = t.update(raw, step * 10);
            if let Some(q) = prev {
                assert!(p.bytes_sent >= q.bytes_sent);
                assert!(p.bytes_remaining <= q.bytes_remaining);
                assert!(p.fraction_done >= q.fraction_done);
                assert!(p.eta_ms <= q.eta_ms);
            }
            prev = Some(p);
        }
        let f = t.finish(sent, 6000);
        assert_eq!(f.fraction_done, 1.0);
        assert_eq!(f.bytes_remaining, 0);
    }
}
