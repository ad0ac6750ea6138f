//! Lays migrations out in time so that no node is in more than `limit` migrations at once (both directions,
//! in-flight ones included), finishing as early as a greedy list schedule can.
//!
//! Jobs are taken longest first (LPT). At each instant every job whose source and target both have a free slot
//! starts; then time advances to the next slot release. Moves that start at the same instant form a [`Wave`].

use std::collections::BTreeMap;

use crate::cluster::Cluster;
use crate::plan::{PlannedMove, Wave};

/// A move waiting for a start time.
#[derive(Clone, Debug)]
pub(crate) struct Job {
    pub from: usize,
    pub to: usize,
    pub duration_ms: u64,
    /// The move, with `start_ms`/`end_ms` filled in by [`schedule`].
    pub planned: PlannedMove,
}

/// Schedules `jobs` from `now_ms`; returns the waves and the finish time (`now_ms` when there is nothing to do).
pub(crate) fn schedule(c: &Cluster<'_>, mut jobs: Vec<Job>, now_ms: u64) -> (Vec<Wave>, u64) {
    let limit = c.snap.policy.max_live_migrations_per_node as usize;
    // Slot release times per node: in-flight migrations still running at `now_ms`.
    let mut busy: Vec<Vec<u64>> = c
        .nodes
        .iter()
        .map(|n| {
            n.inflight_ends_ms
                .iter()
                .copied()
                .filter(|&e| e > now_ms)
                .collect()
        })
        .collect();
    jobs.sort_by(|a, b| {
        b.duration_ms
            .cmp(&a.duration_ms)
            .then_with(|| a.planned.vm.cmp(&b.planned.vm))
    });
    let mut pending: Vec<Option<Job>> = jobs.into_iter().map(Some).collect();
    let mut left = pending.len();
    let mut waves: BTreeMap<u64, Vec<PlannedMove>> = BTreeMap::new();
    let mut t = now_ms;
    let mut finish = now_ms;
    while left > 0 {
        for n in busy.iter_mut() {
            n.retain(|&e| e > t);
        }
        for slot in pending.iter_mut() {
            let Some(job) = slot else { continue };
            if busy[job.from].len() < limit && busy[job.to].len() < limit {
                let end = t.saturating_add(job.duration_ms);
                busy[job.from].push(end);
                busy[job.to].push(end);
                finish = finish.max(end);
                let mut planned = job.planned.clone();
                planned.start_ms = t;
                planned.end_ms = end;
                waves.entry(t).or_default().push(planned);
                *slot = None;
                left -= 1;
            }
        }
        if left == 0 {
            break;
        }
        // Every job is blocked by a busy slot, so some slot is released later than `t`.
        match busy.iter().flatten().copied().filter(|&e| e > t).min() {
            Some(next) => t = next,
            None => break, // unreachable with limit >= 1: a free node pair always starts a job
        }
    }
    let waves = waves
        .into_iter()
        .map(|(start_ms, mut moves)| {
            moves.sort_by(|a, b| a.vm.cmp(&b.vm));
            Wave {
                start_ms,
                end_ms: moves.iter().map(|m| m.end_ms).max().unwrap_or(start_ms),
                moves,
            }
        })
        .collect();
    (waves, finish)
}
