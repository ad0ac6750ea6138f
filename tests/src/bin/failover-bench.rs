//! VM failover benchmark: starts a local 3-node cluster of real agents, runs one test
//! guest VM, kill -9s its owner and measures the time until the VM's first heartbeat on
//! another node. Baseline measured in the same run: create → first heartbeat on a
//! healthy cluster (the cost of starting the VM itself). Runs once with a follower as the
//! owner and once with the leader as the owner (the leader case adds an election).
//!
//! Each case runs twice: with the agent's default liveness settings (heartbeats 200 ms,
//! Down after 1200 ms, elections 600–1200 ms) and with the test harness's slower ones
//! (200 ms / 2000 ms / 1000–2000 ms), `ROUNDS` times each.
//!
//! Usage: `failover-bench [ROUNDS]` (the `cluster-agent` binary must be built in the same
//! target directory: `cargo build -p cluster-agent -p cluster-tests --bins`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_proto::vms as pb;
use cluster_tests::vm::{guest_spec, mem_boot, try_get_vm, try_wait_migrated};
use cluster_tests::{locate_binary, Cluster, Options};

const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// cluster-agent's `failover::FAILOVER_GRACE`.
const FAILOVER_GRACE_MS: u64 = 500;

/// First `HB ... mem=ok` line of `name` seen through `via`: (node that produced it).
/// The memory-checking test guest with a heartbeat every 20 ms.
fn fast_boot() -> pb::TestGuestBoot {
    pb::TestGuestBoot {
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(20)),
        ..mem_boot()
    }
}

/// First `HB ... mem=ok` line of `name` seen through `via`: (node that produced it).
async fn first_heartbeat(c: &Cluster, via: u64, name: &str, not_from: u64) -> Result<u64, String> {
    let start = Instant::now();
    while start.elapsed() < STEP_TIMEOUT {
        let mut cl = c.try_vms(via).await?;
        let got = cl
            .stream_console(pb::StreamConsoleRequest {
                name: name.into(),
                follow: true,
                ..Default::default()
            })
            .await;
        if let Ok(resp) = got {
            let mut s = resp.into_inner();
            while let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(Duration::from_secs(2), s.message()).await
            {
                if chunk.node_id != not_from
                    && chunk
                        .text
                        .lines()
                        .any(|l| l.starts_with("HB seq=") && l.contains("mem=ok"))
                {
                    return Ok(chunk.node_id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("no heartbeat of {name} via node {via}"))
}

async fn owner_of(c: &Cluster, via: u64, name: &str) -> Result<u64, String> {
    let mut cl = c.try_vms(via).await?;
    Ok(try_get_vm(&mut cl, name).await?.owner_id)
}

async fn leader(c: &Cluster, via: u64) -> Result<u64, String> {
    Ok(c.status(via).await.map_err(|e| e.to_string())?.leader_id)
}

/// One round: returns (create→heartbeat ms, kill→heartbeat-elsewhere ms, owner was leader).
async fn round(
    bin: &std::path::Path,
    opts: &Options,
    owner_is_leader: bool,
) -> Result<(u128, u128, bool), String> {
    let mut c = Cluster::new(bin.to_path_buf(), opts.clone()).map_err(|e| e.to_string())?;
    c.form(3).await.map_err(|e| e.to_string())?;
    let lead = leader(&c, 1).await?;
    let follower = [1, 2, 3].into_iter().find(|n| *n != lead).unwrap_or(1);
    let target = if owner_is_leader { lead } else { follower };
    let mut cl = c.try_vms(1).await?;
    let t = Instant::now();
    cl.create_vm(pb::CreateVmRequest {
        spec: Some(pb::VmSpec {
            restart_priority: cluster_proto::vms::RestartPriority::High as i32,
            preferred_owners: vec![target],
            ..guest_spec("bench", 64, fast_boot())
        }),
        start: true,
    })
    .await
    .map_err(|s| s.to_string())?;
    let via = [1, 2, 3].into_iter().find(|n| *n != target).unwrap_or(1);
    first_heartbeat(&c, via, "bench", 0).await?;
    let start_ms = t.elapsed().as_millis();
    let owner = owner_of(&c, via, "bench").await?;
    let t = Instant::now();
    c.kill9(owner).map_err(|e| e.to_string())?;
    first_heartbeat(&c, via, "bench", owner).await?;
    Ok((start_ms, t.elapsed().as_millis(), owner == lead))
}

/// Live migration through the whole stack (gRPC → Raft → source agent → target agent →
/// switchover commit): (wall ms from MigrateVm to Running on the target, blackout us the
/// engine measured, receipt matched).
async fn migration_round(bin: &std::path::Path) -> Result<(u128, u64, bool), String> {
    let mut c = Cluster::new(bin.to_path_buf(), Options::default()).map_err(|e| e.to_string())?;
    c.form(2).await.map_err(|e| e.to_string())?;
    let mut cl = c.try_vms(1).await?;
    cl.create_vm(pb::CreateVmRequest {
        spec: Some(guest_spec("mig", 64, fast_boot())),
        start: true,
    })
    .await
    .map_err(|s| s.to_string())?;
    first_heartbeat(&c, 1, "mig", 0).await?;
    let t = Instant::now();
    let started = cl
        .migrate_vm(pb::MigrateVmRequest {
            name: "mig".into(),
            to_node_id: 0,
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner()
        .vm
        .unwrap_or_default();
    let target = started.migrating_to;
    try_wait_migrated(&mut cl, "mig", target, t, STEP_TIMEOUT).await?;
    let wall_ms = t.elapsed().as_millis();
    let events = c.events(1).await.map_err(|e| e.to_string())?;
    let msg = events
        .iter()
        .rev()
        .find(|e| e.message.contains("mig migrated to node"))
        .map(|e| e.message.clone())
        .unwrap_or_default();
    let blackout_us = msg
        .split("blackout ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok((wall_ms, blackout_us, msg.contains("receipt matches")))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let bin = match locate_binary("cluster-agent", "cluster-agent") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("failover-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("failover-bench: 3 agents on loopback, 1 test-guest VM (64 MiB, mem workload, 20 ms heartbeats)");
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let agent_defaults = Options::agent_defaults();
    for (label, opts) in [
        ("agent defaults", agent_defaults),
        ("harness settings", Options::default()),
    ] {
        println!(
            "  {label}: heartbeats {} ms, Down after {} ms (lease {} ms), elections {}-{} ms, failover grace {} ms",
            opts.heartbeat_interval_ms,
            opts.down_after_ms,
            opts.down_after_ms / 2,
            opts.election_timeout_min_ms,
            opts.election_timeout_max_ms,
            FAILOVER_GRACE_MS
        );
        for owner_is_leader in [false, true] {
            let mut figures = Vec::new();
            for _ in 0..rounds {
                match round(&bin, &opts, owner_is_leader).await {
                    Ok((start_ms, failover_ms, was_leader)) => {
                        println!(
                            "    owner {:8}: create -> first heartbeat {start_ms:5} ms (baseline) | kill -9 owner -> first heartbeat elsewhere {failover_ms:5} ms",
                            if was_leader { "leader" } else { "follower" }
                        );
                        figures.push(failover_ms);
                    }
                    Err(e) => {
                        eprintln!("failover-bench: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            figures.sort_unstable();
            println!(
                "    owner {:8}: kill -9 -> heartbeat elsewhere min {} / median {} / max {} ms over {rounds} rounds",
                if owner_is_leader { "leader" } else { "follower" },
                figures.first().copied().unwrap_or(0),
                figures.get(figures.len() / 2).copied().unwrap_or(0),
                figures.last().copied().unwrap_or(0)
            );
        }
    }
    match migration_round(&bin).await {
        Ok((wall_ms, blackout_us, receipt)) => println!(
            "  live migration through the cluster (64 MiB, mem workload): MigrateVm -> running on target {wall_ms} ms, engine blackout {blackout_us} us, receipt {}",
            if receipt { "matches" } else { "MISSING/MISMATCH" }
        ),
        Err(e) => {
            eprintln!("failover-bench: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
