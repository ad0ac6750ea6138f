//! The demand sampler (every node): every [`DEMAND_SAMPLE`] it reads the cumulative CPU
//! time and resident memory of this node's running VMs from the [`VmHost`], smooths them
//! into demand ([`Smoother`]) and publishes the report on the agent, which sends it with
//! the next heartbeat round (see `node::demand`). No Raft write.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::node::demand::{NodeDemand, Sample, Smoother, DEMAND_HALF_LIFE, DEMAND_SAMPLE};
use crate::node::{now_unix_ms, Agent};
use crate::vmhost::VmHost;

/// Sample and publish until `shutdown` turns true.
pub async fn run(agent: Arc<Agent>, host: Arc<VmHost>, mut shutdown: watch::Receiver<bool>) {
    let mut smoother = Smoother::new(DEMAND_HALF_LIFE);
    let mut tick = tokio::time::interval(DEMAND_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let h = host.clone();
        let Ok(usage) = tokio::task::spawn_blocking(move || h.usage()).await else {
            continue;
        };
        let samples: BTreeMap<String, Sample> = usage
            .into_iter()
            .map(|(name, u)| {
                (
                    name,
                    Sample {
                        cpu_run_ns: u.cpu_run_ns,
                        cpu_wait_ns: u.cpu_wait_ns,
                        memory_resident_bytes: u.memory_resident_bytes,
                    },
                )
            })
            .collect();
        let vms = smoother.update(samples, Instant::now());
        agent.set_local_demand(NodeDemand {
            sampled_unix_ms: now_unix_ms(),
            vms,
        });
    }
}
