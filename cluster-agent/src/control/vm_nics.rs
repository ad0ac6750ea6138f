//! The owner's side of NIC hot add / remove: brings this node's running VMs in line with
//! the NIC lists of their committed records (`state::vm_nics` holds the commands and the
//! pure [`plan`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::node::Agent;
use crate::state::vm_nics::plan;
use crate::state::vms::{DesiredState, RuntimeState, VmRecord};
use crate::vmhost::VmHost;

/// Reconciler step: hot-add/remove NICs of this node's running VMs to match the records.
/// `busy` names VMs with an operation in flight (migration), which are left alone.
pub async fn reconcile(
    agent: &Arc<Agent>,
    host: &Arc<VmHost>,
    records: &[VmRecord],
    busy: &BTreeSet<String>,
) {
    let me = agent.node_id();
    for info in host.list() {
        if busy.contains(&info.name) || info.status != vmm_node::VmStatus::Running {
            continue;
        }
        let Some(r) = records.iter().find(|r| r.spec.name == info.name) else {
            continue;
        };
        if r.owner != Some(me)
            || r.desired != DesiredState::Running
            || r.migrating_to.is_some()
            || r.runtime != RuntimeState::Running
        {
            continue;
        }
        let present: Vec<String> = info.spec.nics.iter().map(|n| n.mac.clone()).collect();
        let (attach, detach) = plan(r, &present);
        for mac in detach {
            let (h, n, m) = (host.clone(), info.name.clone(), mac.clone());
            match tokio::task::spawn_blocking(move || h.detach_nic(&n, &m)).await {
                Ok(Ok(())) => tracing::info!(vm = %info.name, %mac, "nic hot-removed"),
                Ok(Err(e)) => {
                    tracing::warn!(vm = %info.name, %mac, error = %crate::error_chain(&e), "nic hot-remove failed")
                }
                Err(e) => tracing::error!(vm = %info.name, %mac, error = %e, "detach task failed"),
            }
        }
        for nic in attach {
            let (h, n, c) = (host.clone(), info.name.clone(), nic.clone());
            match tokio::task::spawn_blocking(move || h.attach_nic(&n, c)).await {
                Ok(Ok(slot)) => {
                    tracing::info!(vm = %info.name, mac = %nic.mac, network = %nic.network, slot, "nic hot-added")
                }
                Ok(Err(e)) => {
                    tracing::warn!(vm = %info.name, mac = %nic.mac, error = %crate::error_chain(&e), "nic hot-add failed")
                }
                Err(e) => {
                    tracing::error!(vm = %info.name, mac = %nic.mac, error = %e, "attach task failed")
                }
            }
        }
    }
}
