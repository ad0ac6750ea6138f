//! Blackout of a live migration through the full stack (gRPC `MigrateVm` → Raft →
//! source agent → target agent → switchover commit, figures from the replicated
//! migration record) versus vmm-node's engine alone (`migration-bench`, two in-process
//! VMs over loopback), measured in the same run with the same guest and options: an idle
//! test guest, 1 vCPU, 4 connections, 50 ms downtime goal.
//!
//! A third path runs the same migrations with `vm_workers = true`: the VM in a worker
//! process on each side (the source worker runs the engine, the target worker restores
//! from memory the target agent fills).
//!
//! Usage: `blackout-bench [MEMORY_MIB (256)] [REPEATS (5)] [idle|full (idle)]`; needs
//! `cluster-agent` and `migration-bench` built in the same target directory:
//! `cargo build [--profile fast] -p cluster-agent -p cluster-tests --bins` and
//! `cargo build [--profile fast] -p vmm-node --features test-pki --bin migration-bench`.

use cluster_proto::EnumName;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_proto::migrations as mpb;
use cluster_proto::migrations::migration_service_client::MigrationServiceClient;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_tests::vm::{guest_spec, try_get_vm, try_wait_migrated};
use cluster_tests::{locate_binary, Cluster, Options};
use tonic::transport::Channel;

const MAX_DOWNTIME_MS: u64 = 50;
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

fn pct(v: &mut [u64], p: f64) -> u64 {
    vmm_node::bench_stats::percentile(v, p).unwrap_or(0)
}

/// Full stack: per migration (engine blackout us, total us, MigrateVm → running ms).
async fn full_stack(
    memory_mib: u64,
    repeats: usize,
    node_toml: &str,
    case: Case,
) -> Result<Vec<Run>, String> {
    let bin = locate_binary("cluster-agent", "cluster-agent").map_err(|e| e.to_string())?;
    let opts = Options::agent_defaults();
    let mut c = Cluster::new(bin, opts).map_err(|e| e.to_string())?;
    let mut metrics = Vec::new();
    for id in 1..=2u8 {
        let addr = cluster_tests::free_port([127, 0, 1, id]).map_err(|e| e.to_string())?;
        c.add_node_with(
            id.into(),
            &format!("{node_toml}metrics_addr = \"{addr}\"\n"),
        )
        .map_err(|e| e.to_string())?;
        metrics.push(addr);
    }
    c.form(2).await.map_err(|e| e.to_string())?;
    // Ready: each node holds its lease (`cluster_lease_held` 1), and its fence watcher
    // has passed it on to the VM runtime, which it does once per heartbeat round on a
    // node without VMs: a target that just joined refuses an incoming VM until then.
    for addr in metrics {
        c.wait_until(
            &format!("the agent with metrics at {addr} holding its lease"),
            STEP_TIMEOUT,
            || async move { Ok::<_, String>(cluster_tests::http_get(addr, "/metrics")) },
            |(_, body)| {
                body.lines()
                    .any(|l| l.starts_with("cluster_lease_held{") && l.ends_with(" 1"))
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(3 * 100)).await;
    let ch = c.try_channel(1).await?;
    let mut vm = VmServiceClient::new(ch.clone());
    let mut mig = MigrationServiceClient::new(ch);
    vm.create_vm(pb::CreateVmRequest {
        spec: Some(guest_spec(
            "bench",
            memory_mib,
            match case {
                Case::Idle => pb::TestGuestBoot {
                    workload: cluster_proto::vms::Workload::Idle as i32,
                    ..Default::default()
                },
                Case::Full => pb::TestGuestBoot {
                    workload: cluster_proto::vms::Workload::Mem as i32,
                    wss_mib: memory_mib * 3 / 4,
                    ..Default::default()
                },
            },
        )),
        start: true,
    })
    .await
    .map_err(|s| s.to_string())?;
    let get = |vm: &VmServiceClient<Channel>| {
        let mut vm = vm.clone();
        async move { try_get_vm(&mut vm, "bench").await }
    };
    let t = Instant::now();
    while get(&vm).await?.runtime().name() != "running" {
        if t.elapsed() > STEP_TIMEOUT {
            return Err("the VM never ran".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if case == Case::Full {
        // Populated: the guest wrote its pattern once and only reads it from then on.
        c.wait_heartbeat(1, "bench", |h| h.mem == "ok").await;
    }
    let mut out = Vec::new();
    for _ in 0..repeats {
        let from = get(&vm).await?.owner_id;
        let to = 3 - from;
        let t = Instant::now();
        vm.migrate_vm(pb::MigrateVmRequest {
            name: "bench".into(),
            to_node_id: to,
            max_downtime: Some(cluster_proto::times::duration_from_ms(MAX_DOWNTIME_MS)),
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())?;
        if let Err(e) = try_wait_migrated(&mut vm, "bench", to, t, STEP_TIMEOUT).await {
            let recs = mig
                .list_migrations(mpb::ListMigrationsRequest {
                    vm: "bench".into(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().migrations)
                .unwrap_or_default();
            let mut workers = String::new();
            for id in 1..=2 {
                if let Ok(spec) = c.spec(id) {
                    let log = spec.data_dir.join("vms").join("bench").join("worker.log");
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    workers.push_str(&format!("\n--- worker log, node {id} ---\n"));
                    for l in tail.iter().rev() {
                        workers.push_str(l);
                        workers.push('\n');
                    }
                }
            }
            return Err(format!("{e}; records: {recs:?}{}{workers}", c.logs()));
        }
        let wall_ms = t.elapsed().as_millis() as u64;
        let recs = mig
            .list_migrations(mpb::ListMigrationsRequest {
                vm: "bench".into(),
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner()
            .migrations;
        let last = recs.last().cloned().unwrap_or_default();
        let s = last
            .stats
            .ok_or_else(|| format!("migration {} has no statistics", last.id))?;
        if !s.receipt_matches {
            return Err(format!("migration {}: receipt mismatch", last.id));
        }
        let us = |d: &Option<cluster_proto::prost_types::Duration>| {
            d.as_ref()
                .and_then(|d| cluster_proto::times::duration_us(d).ok())
        };
        let record_ms = cluster_proto::times::unix_ms(last.ended_at.as_ref())
            .saturating_sub(cluster_proto::times::unix_ms(last.started_at.as_ref()));
        out.push(Run {
            blackout_us: us(&s.blackout).unwrap_or(0),
            engine_us: us(&s.total).unwrap_or(0),
            wall_ms,
            record_ms,
            predicted_ms: us(&last.predicted_duration).map(|u| u / 1000),
            predicted_blackout_us: us(&last.predicted_blackout),
        });
        if case == Case::Full {
            // Settled on its new node before it moves again: two full passes of the
            // guest's read loop there. On a shadow-paging KVM (this PVM host) the first
            // read of each page after an arrival maps it writable and logs it dirty (the
            // guest's page tables say it was written), so a populated guest migrated again
            // right after arriving sends thousands of pages in its last round.
            let (_, hb) = c.wait_heartbeat(to, "bench", |h| h.mem == "ok").await;
            let first = hb.mem_passes;
            c.wait_heartbeat(to, "bench", |h| h.mem_passes >= first + 2)
                .await;
        }
    }
    Ok(out)
}

/// One migration as measured, and as the leader predicted it when it started it.
struct Run {
    blackout_us: u64,
    engine_us: u64,
    /// `MigrateVm` sent → the VM running on the target, seen by polling.
    wall_ms: u64,
    /// The record's committed start to committed end (what the prediction is of).
    record_ms: u64,
    predicted_ms: Option<u64>,
    predicted_blackout_us: Option<u64>,
}

/// |predicted − actual| / actual, in percent.
fn error_pct(predicted: u64, actual: u64) -> f64 {
    (predicted as f64 - actual as f64).abs() * 100.0 / actual.max(1) as f64
}

fn median_f(v: &mut [f64]) -> f64 {
    vmm_node::bench_stats::median(v).unwrap_or(0.0)
}

/// The guest: `idle` (memory never written) or `full` (3/4 of its memory written with a
/// pattern, then only read: populated and idle), as `migration-bench`'s cases of those names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Idle,
    Full,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Idle => "idle",
            Case::Full => "full",
        }
    }
}

/// vmm-node alone: the `<case>/tls` line of `migration-bench` (blackout p50, p99 in us).
fn engine_alone(memory_mib: u64, repeats: usize, case: Case) -> Result<(u64, u64, String), String> {
    let bin = locate_binary("migration-bench", "vmm-node").map_err(|e| e.to_string())?;
    let o = std::process::Command::new(bin)
        .args([
            "--memory-mib",
            &memory_mib.to_string(),
            "--repeats",
            &repeats.to_string(),
            "--connections",
            "4",
            "--max-downtime-ms",
            &MAX_DOWNTIME_MS.to_string(),
            "--cases",
            case.name(),
            "--vcpus",
            "1",
            // The cluster's migrations run over mutual TLS.
            "--transports",
            "tls",
        ])
        .output()
        .map_err(|e| format!("cannot run migration-bench: {e}"))?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    if !o.status.success() {
        return Err(format!(
            "migration-bench failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{}/tls ", case.name())))
        .ok_or_else(|| format!("no {}/tls line in: {text}", case.name()))?;
    let cols: Vec<&str> = line.split_whitespace().collect();
    let p50 = cols.get(3).and_then(|v| v.parse().ok()).unwrap_or(0);
    let p99 = cols.get(4).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((p50, p99, text))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let memory_mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let repeats: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let case = match args.next().as_deref() {
        None | Some("idle") => Case::Idle,
        Some("full") => Case::Full,
        Some(other) => {
            eprintln!("blackout-bench: unknown case {other:?} (idle or full)");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "blackout-bench: {} test guest, {memory_mib} MiB, 1 vCPU, 4 connections, max downtime {MAX_DOWNTIME_MS} ms, {repeats} migrations each",
        case.name()
    );
    let (e50, e99, _) = match engine_alone(memory_mib, repeats, case) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("blackout-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("  vmm-node alone (migration-bench): blackout p50 {e50} us, p99 {e99} us");
    let mut p50s = Vec::new();
    for (path, toml) in [
        ("full stack, in-process", "vm_workers = false\n"),
        ("full stack, vm_workers (default)", "vm_workers = true\n"),
    ] {
        let full = match full_stack(memory_mib, repeats, toml, case).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("blackout-bench: {path}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for (i, r) in full.iter().enumerate() {
            println!(
                "  {path} #{i}: blackout {} us (predicted {}), engine total {} ms, record {} ms (predicted {}), MigrateVm -> running on target {} ms",
                r.blackout_us,
                opt(r.predicted_blackout_us),
                r.engine_us / 1000,
                r.record_ms,
                opt(r.predicted_ms),
                r.wall_ms
            );
        }
        // Predictions once the cluster has measured a migration between the two nodes.
        let calibrated = full.get(1..).unwrap_or_default();
        let mut total_err: Vec<f64> = calibrated
            .iter()
            .filter_map(|r| Some(error_pct(r.predicted_ms?, r.record_ms)))
            .collect();
        let mut blackout_err: Vec<f64> = calibrated
            .iter()
            .filter_map(|r| Some(error_pct(r.predicted_blackout_us?, r.blackout_us)))
            .collect();
        if !total_err.is_empty() {
            println!(
                "  {path}: prediction error after the first migration (median of {}): total {:.0} %, blackout {:.0} % (goal: within 25 %)",
                total_err.len(),
                median_f(&mut total_err),
                median_f(&mut blackout_err)
            );
        }
        let mut bl: Vec<u64> = full.iter().map(|f| f.blackout_us).collect();
        let mut wall: Vec<u64> = full.iter().map(|f| f.wall_ms).collect();
        let (f50, f99) = (pct(&mut bl.clone(), 0.5), pct(&mut bl, 0.99));
        println!(
            "  {path} (2 agents, gRPC + Raft + agents): blackout p50 {f50} us, p99 {f99} us, MigrateVm -> running p50 {} ms",
            pct(&mut wall, 0.5)
        );
        println!(
            "  {path} / engine alone blackout (p50): {:.2}x",
            f50 as f64 / e50.max(1) as f64
        );
        p50s.push(f50);
    }
    if let [inproc, workers] = p50s[..] {
        println!(
            "  vm_workers / in-process blackout (p50): {:.2}x",
            workers as f64 / inproc.max(1) as f64
        );
    }
    ExitCode::SUCCESS
}
