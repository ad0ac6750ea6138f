//! Demand reports on the peer plane (`raft.proto`'s `DemandReport`) ↔ `node::demand`.

use cluster_proto::raft as pb;

use crate::node::demand::{NodeDemand, VmDemand};

pub fn demand_to_pb(d: &NodeDemand) -> pb::DemandReport {
    pb::DemandReport {
        sampled_unix_ms: d.sampled_unix_ms,
        vms: d
            .vms
            .iter()
            .map(|(name, v)| pb::VmDemandReport {
                vm: name.clone(),
                cpu_demand_millicores: v.cpu_demand_mc,
                cpu_run_millicores: v.cpu_run_mc,
                memory_touched_mib: v.memory_touched_mib,
            })
            .collect(),
    }
}

/// A peer's report, or why it is refused (too many VMs, a bad name, a VM twice).
pub fn demand_from_pb(d: &pb::DemandReport) -> Result<NodeDemand, String> {
    if d.vms.len() > crate::node::demand::DEMAND_VMS_MAX {
        return Err(format!(
            "{} VMs in one demand report, more than {}",
            d.vms.len(),
            crate::node::demand::DEMAND_VMS_MAX
        ));
    }
    let mut out = NodeDemand {
        sampled_unix_ms: d.sampled_unix_ms,
        vms: Default::default(),
    };
    for v in &d.vms {
        let demand = VmDemand {
            cpu_demand_mc: v.cpu_demand_millicores,
            cpu_run_mc: v.cpu_run_millicores,
            memory_touched_mib: v.memory_touched_mib,
        };
        if out.vms.insert(v.vm.clone(), demand).is_some() {
            return Err(format!("VM {:?} appears twice in a demand report", v.vm));
        }
    }
    out.check()?;
    Ok(out)
}

/// A VM's demand from its owner's report, for the management plane.
pub fn vm_demand_to_pb(
    demand: &crate::node::demand::Demand,
    owner: Option<u64>,
    name: &str,
) -> Option<cluster_proto::vms::VmDemand> {
    let r = demand.get(&owner?)?;
    let v = r.vms.get(name)?;
    Some(cluster_proto::vms::VmDemand {
        cpu_demand_millicores: v.cpu_demand_mc,
        cpu_run_millicores: v.cpu_run_mc,
        memory_touched_mib: v.memory_touched_mib,
        sampled_at: cluster_proto::times::timestamp_from_unix_ms(r.sampled_unix_ms),
    })
}

/// A node's demand totals, for the management plane.
pub fn node_demand_to_pb(
    demand: &crate::node::demand::Demand,
    node: u64,
) -> Option<cluster_proto::management::NodeDemand> {
    let r = demand.get(&node)?;
    let t = r.total();
    Some(cluster_proto::management::NodeDemand {
        cpu_demand_millicores: t.cpu_demand_mc,
        cpu_run_millicores: t.cpu_run_mc,
        memory_touched_mib: t.memory_touched_mib,
        sampled_at: cluster_proto::times::timestamp_from_unix_ms(r.sampled_unix_ms),
        vms: r.vms.len().min(u32::MAX as usize) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let mut d = NodeDemand {
            sampled_unix_ms: 5,
            vms: Default::default(),
        };
        d.vms.insert(
            "a".into(),
            VmDemand {
                cpu_demand_mc: 900,
                cpu_run_mc: 450,
                memory_touched_mib: 64,
            },
        );
        assert_eq!(demand_from_pb(&demand_to_pb(&d)), Ok(d.clone()));
        let mut twice = demand_to_pb(&d);
        twice.vms.push(twice.vms[0].clone());
        assert!(demand_from_pb(&twice).unwrap_err().contains("twice"));
        let mut empty = demand_to_pb(&d);
        empty.vms[0].vm.clear();
        assert!(demand_from_pb(&empty).unwrap_err().contains("0 bytes"));
    }
}
