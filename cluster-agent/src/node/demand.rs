//! Measured demand: what each node's VMs use, as the balancer and placement see it.
//!
//! Every agent samples its own VMs (`control::demand` reads vmm-node's cumulative counters
//! every [`DEMAND_SAMPLE`]) and turns the counters into smoothed rates here ([`Smoother`]).
//! The report rides on the next round of liveness heartbeats (not through Raft): every
//! member hears every member's report, so a new leader already holds them all. Each agent
//! keeps the latest report of every node on its [`DemandBoard`]; a report older than
//! [`DEMAND_STALE_AFTER`] is not used (its VMs count as unmeasured: fully busy).
//!
//! Pure: no I/O; times are passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often an agent samples its VMs.
pub const DEMAND_SAMPLE: Duration = Duration::from_secs(2);
/// Half-life of the CPU demand smoothing (exponentially weighted average of the rates).
pub const DEMAND_HALF_LIFE: Duration = Duration::from_secs(10);
/// A report older than this is not used.
pub const DEMAND_STALE_AFTER: Duration = Duration::from_secs(30);
/// Most VMs one report may carry (a peer sending more is ignored).
pub const DEMAND_VMS_MAX: usize = 4096;
/// Longest VM name a report may carry.
pub const DEMAND_NAME_MAX: usize = 256;

/// Every node's fresh report, by node id.
pub type Demand = BTreeMap<u64, NodeDemand>;

/// Demand of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmDemand {
    /// vCPU run + runnable-wait time per second, smoothed, millicores (1000 = one busy vCPU).
    pub cpu_demand_mc: u64,
    /// Of that, the time it actually ran (the rest waited for a CPU), millicores.
    pub cpu_run_mc: u64,
    /// Guest memory resident on the host (touched), MiB.
    pub memory_touched_mib: u64,
}

/// One node's report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeDemand {
    /// When it was sampled (the reporter's clock, unix ms; shown, never compared).
    pub sampled_unix_ms: u64,
    /// Per VM running there, by name.
    pub vms: BTreeMap<String, VmDemand>,
}

impl NodeDemand {
    /// Σ over the node's VMs.
    pub fn total(&self) -> VmDemand {
        self.vms
            .values()
            .fold(VmDemand::default(), |a, v| VmDemand {
                cpu_demand_mc: a.cpu_demand_mc.saturating_add(v.cpu_demand_mc),
                cpu_run_mc: a.cpu_run_mc.saturating_add(v.cpu_run_mc),
                memory_touched_mib: a.memory_touched_mib.saturating_add(v.memory_touched_mib),
            })
    }

    /// Why a report from a peer is refused, if it is.
    pub fn check(&self) -> Result<(), String> {
        if self.vms.len() > DEMAND_VMS_MAX {
            return Err(format!(
                "{} VMs in one demand report, more than {DEMAND_VMS_MAX}",
                self.vms.len()
            ));
        }
        if let Some(name) = self
            .vms
            .keys()
            .find(|n| n.is_empty() || n.len() > DEMAND_NAME_MAX)
        {
            return Err(format!(
                "a demand report names a VM of {} bytes (1..={DEMAND_NAME_MAX} allowed)",
                name.len()
            ));
        }
        Ok(())
    }
}

/// Cumulative counters of one VM at one moment (vmm-node's `VmUsage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub cpu_run_ns: u64,
    pub cpu_wait_ns: u64,
    pub memory_resident_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Track {
    last: Sample,
    at: Instant,
    /// Smoothed (demand, run) rates in millicores; `None` until a second sample.
    smoothed: Option<(f64, f64)>,
}

/// Turns cumulative samples into smoothed rates, per VM.
#[derive(Debug, Clone)]
pub struct Smoother {
    half_life: Duration,
    vms: BTreeMap<String, Track>,
}

impl Smoother {
    pub fn new(half_life: Duration) -> Smoother {
        Smoother {
            half_life,
            vms: BTreeMap::new(),
        }
    }

    /// Takes this round's samples (VMs absent are forgotten) and returns the demand of every
    /// VM with at least two samples. A counter that went backwards (the VM restarted here)
    /// starts that VM over.
    pub fn update(
        &mut self,
        samples: BTreeMap<String, Sample>,
        now: Instant,
    ) -> BTreeMap<String, VmDemand> {
        self.vms.retain(|name, _| samples.contains_key(name));
        let mut out = BTreeMap::new();
        for (name, s) in samples {
            let memory_touched_mib = s.memory_resident_bytes >> 20;
            let Some(t) = self.vms.get_mut(&name) else {
                self.vms.insert(
                    name,
                    Track {
                        last: s,
                        at: now,
                        smoothed: None,
                    },
                );
                continue;
            };
            let dt = now.saturating_duration_since(t.at);
            let went_back = s.cpu_run_ns < t.last.cpu_run_ns || s.cpu_wait_ns < t.last.cpu_wait_ns;
            if went_back {
                *t = Track {
                    last: s,
                    at: now,
                    smoothed: None,
                };
                continue;
            }
            if dt.is_zero() {
                if let Some((d, r)) = t.smoothed {
                    out.insert(name, demand(d, r, memory_touched_mib));
                }
                continue;
            }
            let secs = dt.as_secs_f64();
            let run = (s.cpu_run_ns - t.last.cpu_run_ns) as f64 / secs / 1e6;
            let wait = (s.cpu_wait_ns - t.last.cpu_wait_ns) as f64 / secs / 1e6;
            let alpha = 1.0 - 0.5f64.powf(secs / self.half_life.as_secs_f64().max(1e-3));
            let (d, r) = match t.smoothed {
                None => (run + wait, run),
                Some((d, r)) => (d + alpha * (run + wait - d), r + alpha * (run - r)),
            };
            t.smoothed = Some((d, r));
            t.last = s;
            t.at = now;
            out.insert(name, demand(d, r, memory_touched_mib));
        }
        out
    }
}

fn demand(d: f64, r: f64, memory_touched_mib: u64) -> VmDemand {
    VmDemand {
        cpu_demand_mc: d.round().max(0.0) as u64,
        cpu_run_mc: r.round().max(0.0) as u64,
        memory_touched_mib,
    }
}

/// The latest report of every node this agent heard (its own included).
#[derive(Debug, Clone, Default)]
pub struct DemandBoard {
    reports: BTreeMap<u64, (NodeDemand, Instant)>,
}

impl DemandBoard {
    /// Keeps `report` as `node`'s latest.
    pub fn record(&mut self, node: u64, report: NodeDemand, now: Instant) {
        self.reports.insert(node, (report, now));
    }

    /// Reports received within [`DEMAND_STALE_AFTER`] of `now`.
    pub fn fresh(&self, now: Instant) -> Demand {
        self.reports
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) <= DEMAND_STALE_AFTER)
            .map(|(n, (r, _))| (*n, r.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(run_ms: u64, wait_ms: u64, mib: u64) -> Sample {
        Sample {
            cpu_run_ns: run_ms * 1_000_000,
            cpu_wait_ns: wait_ms * 1_000_000,
            memory_resident_bytes: mib << 20,
        }
    }

    #[test]
    fn demand_is_run_plus_wait_per_second_smoothed() {
        let mut s = Smoother::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let one = |run, wait| BTreeMap::from([("a".to_string(), sample(run, wait, 64))]);
        assert!(s.update(one(0, 0), t0).is_empty(), "one sample is no rate");
        // Ran 1 s and waited 1 s over 2 s: one vCPU's worth of demand, half of it served.
        let d = s.update(one(1000, 1000), t0 + Duration::from_secs(2));
        assert_eq!(
            d["a"],
            VmDemand {
                cpu_demand_mc: 1000,
                cpu_run_mc: 500,
                memory_touched_mib: 64
            }
        );
        // Idle for one half-life: the smoothed demand halves.
        let d = s.update(one(1000, 1000), t0 + Duration::from_secs(12));
        assert_eq!(d["a"].cpu_demand_mc, 500);
        // A VM that restarted (counters back at zero) starts over; one absent is forgotten.
        assert!(s.update(one(5, 0), t0 + Duration::from_secs(14)).is_empty());
        assert!(s
            .update(BTreeMap::new(), t0 + Duration::from_secs(16))
            .is_empty());
        assert!(s.vms.is_empty());
    }

    #[test]
    fn stale_reports_are_not_used_and_bad_ones_are_named() {
        let mut b = DemandBoard::default();
        let t0 = Instant::now();
        b.record(1, NodeDemand::default(), t0);
        assert_eq!(b.fresh(t0 + DEMAND_STALE_AFTER).len(), 1);
        assert!(b
            .fresh(t0 + DEMAND_STALE_AFTER + Duration::from_millis(1))
            .is_empty());
        let mut r = NodeDemand::default();
        r.vms
            .insert("x".repeat(DEMAND_NAME_MAX + 1), VmDemand::default());
        assert!(r.check().unwrap_err().contains("257 bytes"));
        let r = NodeDemand {
            sampled_unix_ms: 0,
            vms: (0..=DEMAND_VMS_MAX)
                .map(|i| (i.to_string(), VmDemand::default()))
                .collect(),
        };
        assert!(r.check().unwrap_err().contains("4097 VMs"));
    }
}
