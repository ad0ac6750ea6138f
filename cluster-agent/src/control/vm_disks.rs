//! The owner's side of disk hot add / remove: brings this node's running VMs in line with
//! the disk lists of their committed records (`state::vm_disks` holds the commands and
//! the pure [`plan`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use csv_volume::DiskName;

use crate::node::Agent;
use crate::state::vm_disks::plan;
use crate::state::vms::{DesiredState, RuntimeState, VmRecord};
use crate::vmhost::VmHost;

/// Reconciler step: attach/detach disks of this node's running VMs to match the records.
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
        let attached: Vec<DiskName> = info.disks.iter().map(|d| d.name.clone()).collect();
        let (attach, detach) = plan(r, &attached);
        for disk in detach {
            let (h, n, d) = (host.clone(), info.name.clone(), disk.clone());
            match tokio::task::spawn_blocking(move || h.detach_disk(&n, &d)).await {
                Ok(Ok(release)) => {
                    tracing::info!(vm = %info.name, %disk, "disk hot-removed");
                    crate::control::disk_lock_client::release_all(agent, &info.name, vec![release])
                        .await;
                }
                Ok(Err(e)) => {
                    tracing::warn!(vm = %info.name, %disk, error = %crate::error_chain(&e), "disk hot-remove failed")
                }
                Err(e) => tracing::error!(vm = %info.name, %disk, error = %e, "detach task failed"),
            }
        }
        for disk in attach {
            // Held by another node (not one to take over from): wait, without writing a
            // refused command to the log every tick.
            let state = agent.read_sm(|d| d.state.clone());
            let fenced = agent.down_for_at_least(&state, crate::control::failover::FAILOVER_GRACE);
            let blocked = state.locks.lock(&disk.name).is_some_and(|l| {
                let may_join = disk.read_only && l.mode == csv_volume::LockMode::Shared;
                let mine = l.holders.contains(&me);
                let takeover = crate::control::disk_lock_client::held_only_by_fenced_nodes(
                    &state, &disk.name, me, &fenced,
                );
                !(mine || may_join || takeover)
            });
            if blocked {
                tracing::debug!(vm = %info.name, disk = %disk.name, "disk to hot-add is locked by another node");
                continue;
            }
            let grants = match crate::control::disk_lock_client::acquire_all(
                agent,
                &info.name,
                me,
                std::slice::from_ref(&disk),
            )
            .await
            {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(vm = %info.name, disk = %disk.name, error = %crate::error_chain(&e), "cannot lock disk to hot-add");
                    continue;
                }
            };
            let Some(grant) = grants.into_iter().next() else {
                continue;
            };
            let (h, n, d, g) = (host.clone(), info.name.clone(), disk.clone(), grant.clone());
            match tokio::task::spawn_blocking(move || h.attach_disk(&n, d, &g)).await {
                Ok(Ok(slot)) => {
                    tracing::info!(vm = %info.name, disk = %disk.name, slot, token = %grant.token, "disk hot-added")
                }
                other => {
                    let why = match other {
                        Ok(Err(e)) => crate::error_chain(&e),
                        Err(e) => format!("attach task failed: {e}"),
                        Ok(Ok(_)) => String::new(),
                    };
                    tracing::warn!(vm = %info.name, disk = %disk.name, error = %why, "disk hot-add failed");
                    // A VM that has the disk after all (attached by an earlier pass) keeps
                    // its lock: releasing it would let another node write a disk in use.
                    let attached_now = host
                        .state(&info.name)
                        .is_ok_and(|v| v.disks.iter().any(|d| d.name == disk.name));
                    if attached_now {
                        tracing::info!(vm = %info.name, disk = %disk.name, "the disk is attached after all; its lock is kept");
                        continue;
                    }
                    crate::control::disk_lock_client::release_all(
                        agent,
                        &info.name,
                        vec![csv_volume::LockCommand::Release {
                            disk: grant.disk.clone(),
                            node: me,
                        }],
                    )
                    .await;
                }
            }
        }
    }
}
