//! Migration time model.
//!
//! **Live (pre-copy).** Round 0 sends all guest memory `m` at bandwidth `b`; while it runs the guest dirties
//! `d` MiB/s, so round *i* re-sends `min(m, d · t(i−1))`. Rounds stop once what is left can be sent within
//! [`STOP_COPY_TARGET_MS`] (the stop-and-copy downtime target); that last part is sent with the guest paused.
//! If that is not reached within [`MAX_PRECOPY_ROUNDS`] rounds the migration does not converge (the caller falls
//! back to quick migration). For `d ≪ b` the total tends to `m / (b − d)`.
//!
//! **Quick.** Save memory to the shared volume and restore it on the target: `2 · m / b`, all of it downtime.
//!
//! **Bandwidth of one migration.** A node's measured bandwidth is shared by its migration slots: one migration
//! gets `min(b_src / L, b_dst / L)` with `L` the per-node limit. With the default `L = 1` that is the whole link, and
//! in any case a node never sends faster than its link, so `Σ m / b_src` is a lower bound on draining it.

use serde::{Deserialize, Serialize};

/// Downtime the pre-copy phase aims for before stop-and-copy.
pub const STOP_COPY_TARGET_MS: u64 = 300;
/// Pre-copy rounds after which a migration is declared non-convergent.
pub const MAX_PRECOPY_ROUNDS: u32 = 30;

/// Estimated live migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveEstimate {
    /// Whole migration, first byte to switchover.
    pub duration_ms: u64,
    /// Time the guest is paused.
    pub downtime_ms: u64,
    /// Pre-copy rounds (including the first full copy).
    pub rounds: u32,
}

/// Estimates a live migration; `None` if pre-copy does not converge.
pub fn live_estimate(
    memory_mib: u64,
    dirty_rate_mib_per_s: u64,
    bandwidth_mib_per_s: u64,
) -> Option<LiveEstimate> {
    if bandwidth_mib_per_s == 0 {
        return None;
    }
    let m = memory_mib as f64;
    let d = dirty_rate_mib_per_s as f64;
    let b = bandwidth_mib_per_s as f64;
    let stop_mib = b * STOP_COPY_TARGET_MS as f64 / 1000.0;
    let mut to_send = m;
    let mut total_s = 0.0;
    for round in 1..=MAX_PRECOPY_ROUNDS {
        let t = to_send / b;
        total_s += t;
        let dirty = (d * t).min(m);
        if dirty <= stop_mib {
            let down_s = dirty / b;
            total_s += down_s;
            return Some(LiveEstimate {
                duration_ms: ceil_ms(total_s),
                downtime_ms: ceil_ms(down_s),
                rounds: round,
            });
        }
        to_send = dirty;
    }
    None
}

/// Estimates a quick migration (save, move, restore), in ms.
pub fn quick_estimate_ms(memory_mib: u64, bandwidth_mib_per_s: u64) -> u64 {
    if bandwidth_mib_per_s == 0 {
        return u64::MAX;
    }
    ceil_ms(2.0 * memory_mib as f64 / bandwidth_mib_per_s as f64)
}

/// Bandwidth one migration gets between two nodes whose links are shared by `limit` slots each.
pub fn pair_bandwidth_mib_per_s(src_mib_per_s: u64, dst_mib_per_s: u64, limit: u32) -> u64 {
    (src_mib_per_s.min(dst_mib_per_s) / u64::from(limit.max(1))).max(1)
}

fn ceil_ms(seconds: f64) -> u64 {
    let ms = (seconds * 1000.0).ceil();
    if ms >= u64::MAX as f64 {
        u64::MAX
    } else {
        (ms as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_guest_takes_memory_over_bandwidth() {
        let e = live_estimate(4096, 0, 1024).expect("idle guest converges");
        assert_eq!(e.duration_ms, 4000);
        assert_eq!(e.rounds, 1);
        assert_eq!(e.downtime_ms, 1);
    }

    #[test]
    fn dirtying_guest_approaches_m_over_b_minus_d() {
        let e = live_estimate(8192, 100, 1000).expect("converges");
        let bound = 8192.0 / 900.0 * 1000.0;
        assert!(e.duration_ms as f64 >= 8192.0);
        assert!((e.duration_ms as f64) <= bound + 2.0, "{e:?} vs {bound}");
        assert!(e.rounds > 1);
        assert!(e.downtime_ms <= STOP_COPY_TARGET_MS);
    }

    #[test]
    fn guest_dirtying_faster_than_link_does_not_converge() {
        assert_eq!(live_estimate(8192, 1000, 1000), None);
        assert_eq!(live_estimate(8192, 2000, 1000), None);
    }

    #[test]
    fn quick_is_save_plus_restore() {
        assert_eq!(quick_estimate_ms(1024, 512), 4000);
    }

    #[test]
    fn pair_bandwidth_is_slowest_link_split_by_slots() {
        assert_eq!(pair_bandwidth_mib_per_s(1000, 400, 1), 400);
        assert_eq!(pair_bandwidth_mib_per_s(1000, 400, 2), 200);
    }
}
