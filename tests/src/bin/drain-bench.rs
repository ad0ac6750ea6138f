//! Drain benchmark: a local 4-node cluster of real agents with 8 test-guest VMs on node 1.
//! Baseline measured in the same run: each VM live-migrated on its own (MigrateVm →
//! running on the target, node 1 → nodes 2/3/4 in turn, then back, untimed). Then
//! `DrainNode(1)`: wall time until the drain job is done, against the sum of the
//! individual migration times. With at most one migration per node and every move
//! leaving node 1, the drain is serial by design: the figure shows the job machinery's
//! overhead (Raft commits, the leader's 250 ms executor tick, the owner's report).
//!
//! Usage: `drain-bench [VMS]` (default 8; the `cluster-agent` binary must be built in
//! the same target directory: `cargo build -p cluster-agent -p cluster-tests --bins`).

use cluster_proto::EnumName;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_proto::drain as dpb;
use cluster_proto::drain::drain_service_client::DrainServiceClient;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_tests::vm::{guest_spec, mem_boot, try_get_vm};
use cluster_tests::{locate_binary, Cluster, Options};
use tonic::transport::Channel;

const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const NODES: u64 = 4;

/// Live-migrate `name` to `to` and wait until it runs there; wall ms.
async fn migrate(cl: &mut VmServiceClient<Channel>, name: &str, to: u64) -> Result<u128, String> {
    let t = Instant::now();
    cl.migrate_vm(pb::MigrateVmRequest {
        name: name.into(),
        to_node_id: to,
        ..Default::default()
    })
    .await
    .map_err(|s| format!("migrate {name} to {to}: {s}"))?;
    // Reads come from the answering agent's replica: wait until it has seen the start.
    let mut seen_start = false;
    loop {
        let v = try_get_vm(cl, name).await?;
        seen_start |= v.migrating_to == to;
        if v.migrating_to == 0 && v.owner_id == to && v.runtime().name() == "running" {
            return Ok(t.elapsed().as_millis());
        }
        if seen_start && v.migrating_to == 0 && v.owner_id != to {
            return Err(format!("migration of {name} failed: {}", v.reason));
        }
        if t.elapsed() > STEP_TIMEOUT {
            return Err(format!("migration of {name} did not finish"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(bin: &std::path::Path, n: usize) -> Result<(), String> {
    let mut c = Cluster::new(bin.to_path_buf(), Options::default()).map_err(|e| e.to_string())?;
    c.form(NODES).await.map_err(|e| e.to_string())?;
    let leader = c.status(1).await.map_err(|e| e.to_string())?.leader_id;
    let mut cl = c.try_vms(leader).await?;
    let names: Vec<String> = (0..n).map(|i| format!("bench{i}")).collect();
    for name in &names {
        cl.create_vm(pb::CreateVmRequest {
            spec: Some(pb::VmSpec {
                preferred_owners: vec![1],
                ..guest_spec(name, 64, mem_boot())
            }),
            start: true,
        })
        .await
        .map_err(|s| format!("create {name}: {s}"))?;
    }
    let t = Instant::now();
    for name in &names {
        loop {
            let v = try_get_vm(&mut cl, name).await?;
            if v.runtime().name() == "running" && v.owner_id == 1 {
                break;
            }
            if t.elapsed() > STEP_TIMEOUT {
                return Err(format!("{name} did not start on node 1: {v:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Baseline: one migration at a time through the whole stack.
    let mut individual = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let to = 2 + (i as u64 % (NODES - 1));
        individual.push(migrate(&mut cl, name, to).await?);
        migrate(&mut cl, name, 1).await?;
    }
    let sum_ms: u128 = individual.iter().sum();

    // The drain.
    let mut d = DrainServiceClient::new(c.try_channel(leader).await?);
    let t = Instant::now();
    let r = d
        .drain_node(dpb::DrainNodeRequest {
            node_id: 1,
            dry_run: false,
        })
        .await
        .map_err(|s| format!("drain: {s}"))?
        .into_inner();
    let planned_ms = cluster_proto::times::unix_ms(r.planned_finish_at.as_ref())
        .saturating_sub(cluster_proto::times::unix_ms(r.planned_start_at.as_ref()));
    let job = loop {
        let j = d
            .get_drain(dpb::GetDrainRequest { node_id: 1 })
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .job
            .unwrap_or_default();
        if j.status().name() != "running" {
            break j;
        }
        if t.elapsed() > STEP_TIMEOUT * 4 {
            return Err(format!("drain did not finish: {j:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let drain_ms = t.elapsed().as_millis();
    if job.status().name() != "done" {
        return Err(format!(
            "drain ended {}: {}",
            job.status().name(),
            job.reason
        ));
    }
    let moves_ms: u64 = job
        .moves
        .iter()
        .filter(|m| m.status().name() == "done")
        .map(|m| {
            cluster_proto::times::unix_ms(m.ended_at.as_ref())
                .saturating_sub(cluster_proto::times::unix_ms(m.started_at.as_ref()))
        })
        .sum();
    let first_start = job
        .moves
        .iter()
        .map(|m| cluster_proto::times::unix_ms(m.started_at.as_ref()))
        .filter(|s| *s > 0)
        .min();
    let last_end = job
        .moves
        .iter()
        .map(|m| cluster_proto::times::unix_ms(m.ended_at.as_ref()))
        .max();
    let span_ms = match (first_start, last_end) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => 0,
    };
    println!("  individual live migrations (MigrateVm -> running on target), ms: {individual:?}");
    println!("  sum of individual migrations:        {sum_ms:>7} ms");
    println!(
        "  drain of node 1 ({n} VMs), wall:      {drain_ms:>7} ms  ({:.2}x the sum)",
        drain_ms as f64 / sum_ms.max(1) as f64
    );
    println!("  drain, first move start -> last end: {span_ms:>7} ms");
    println!("  drain, sum of its moves (start->end): {moves_ms:>6} ms");
    println!(
        "  scheduler's planned drain time:       {planned_ms:>6} ms (calibrated by the migrations before it; error {:.0} % of the wall time, goal within 25 %)",
        (planned_ms as f64 - drain_ms as f64).abs() * 100.0 / drain_ms.max(1) as f64
    );
    println!(
        "  moves done: {}/{}",
        job.moves
            .iter()
            .filter(|m| m.status().name() == "done")
            .count(),
        job.moves.len()
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8);
    let bin = match locate_binary("cluster-agent", "cluster-agent") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("drain-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("drain-bench: {NODES} agents on loopback, {n} test-guest VMs (64 MiB, mem workload, wss 8 MiB) on node 1");
    match run(&bin, n).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("drain-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
