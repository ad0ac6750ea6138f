//! Shared-volume disk benchmark through the full stack: a local 3-node cluster of real
//! agents whose `[[volumes]]` name one temp directory. Measures, each with a baseline
//! from the same run:
//!
//! 1. start: `vm create` → first heartbeat, for a VM with a disk (locks committed, fence
//!    record written, disk opened) against the same VM without a disk;
//! 2. live migration blackout (from the committed migration event) with a disk (the
//!    staged handoff: lock entries before and after it, the fence record installed by a
//!    rename inside it) against without;
//! 3. quick migration (`--quick`: save to the volume, handoff, restore) against live
//!    migration of the same VM, request → running on the target;
//! 4. failover: kill -9 of the owner → first `disk=ok` heartbeat elsewhere (lock takeover
//!    with a new fencing token included).
//!
//! Usage: `disk-bench [ROUNDS]` (default 3; the `cluster-agent` binary must be built in
//! the same target directory: `cargo build -p cluster-agent -p cluster-tests --bins`).

use cluster_proto::EnumName;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_proto::vms as pb;
use cluster_proto::volumes as vpb;
use cluster_proto::volumes::volume_service_client::VolumeServiceClient;
use cluster_tests::vm::{guest_spec, try_get_vm};
use cluster_tests::{locate_binary, Cluster, Options};

const STEP_TIMEOUT: Duration = Duration::from_secs(90);

fn spec(name: &str, disk: Option<&str>) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Disk as i32,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(50)),
        ..Default::default()
    };
    pb::VmSpec {
        disks: disk
            .map(|d| pb::DiskSpec {
                name: d.into(),
                read_only: false,
            })
            .into_iter()
            .collect(),
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        ..guest_spec(name, 64, boot)
    }
}

/// Waits for a heartbeat of `name` (through `via`) from a node other than `not_from`
/// whose disk field is `disk`; returns the node.
async fn heartbeat(
    c: &Cluster,
    via: u64,
    name: &str,
    not_from: u64,
    disk: &str,
) -> Result<u64, String> {
    let start = Instant::now();
    let want = format!("disk={disk}");
    while start.elapsed() < STEP_TIMEOUT {
        if let Ok(resp) = c
            .try_vms(via)
            .await?
            .stream_console(pb::StreamConsoleRequest {
                name: name.into(),
                follow: true,
                ..Default::default()
            })
            .await
        {
            let mut s = resp.into_inner();
            while let Ok(Ok(Some(chunk))) =
                tokio::time::timeout(Duration::from_secs(2), s.message()).await
            {
                let hit = chunk.text.lines().any(|l| {
                    l.trim_start().starts_with("HB seq=") && l.split_whitespace().any(|f| f == want)
                });
                if chunk.node_id != not_from && hit {
                    return Ok(chunk.node_id);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!("no {want} heartbeat of {name} via node {via}"))
}

async fn get(c: &Cluster, via: u64, name: &str) -> Result<pb::VmInfo, String> {
    try_get_vm(&mut c.try_vms(via).await?, name).await
}

/// Migrates `name` to `to` (quick or live) and waits until it runs there; returns the
/// wall time in ms and the blackout in µs from the committed event (live only).
async fn migrate(c: &Cluster, name: &str, to: u64, quick: bool) -> Result<(u128, u64), String> {
    let mut req = pb::MigrateVmRequest {
        name: name.into(),
        to_node_id: to,
        ..Default::default()
    };
    req.quick = quick;
    let t = Instant::now();
    c.try_vms(1)
        .await?
        .migrate_vm(req)
        .await
        .map_err(|s| format!("migrate {name}: {s}"))?;
    loop {
        let v = get(c, 1, name).await?;
        if v.owner_id == to && v.migrating_to == 0 && v.runtime().name() == "running" {
            break;
        }
        if t.elapsed() > STEP_TIMEOUT {
            return Err(format!("{name} did not arrive on node {to}: {v:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ms = t.elapsed().as_millis();
    let events = c.events(1).await.map_err(|e| e.to_string())?;
    let blackout = events
        .iter()
        .rev()
        .find(|e| {
            e.message
                .contains(&format!("VM {name} migrated to node {to}"))
        })
        .and_then(|e| {
            let rest = e.message.split("blackout ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0);
    Ok((ms, blackout))
}

fn median(v: &mut [u128]) -> u128 {
    vmm_node::bench_stats::median(v).unwrap_or(0)
}

#[derive(Default)]
struct Figures {
    start_disk_ms: Vec<u128>,
    start_nodisk_ms: Vec<u128>,
    blackout_disk_us: Vec<u128>,
    blackout_nodisk_us: Vec<u128>,
    live_ms: Vec<u128>,
    quick_ms: Vec<u128>,
    failover_ms: Vec<u128>,
}

async fn round(bin: &std::path::Path, f: &mut Figures) -> Result<(), String> {
    let mut c = Cluster::new(bin.to_path_buf(), Options::default()).map_err(|e| e.to_string())?;
    let csv = c.dir().join("csv");
    std::fs::create_dir_all(&csv).map_err(|e| e.to_string())?;
    for id in 1..=3 {
        c.add_node_with(
            id,
            &format!(
                "[[volumes]]\nname = \"vol\"\npath = \"{}\"\n",
                csv.display()
            ),
        )
        .map_err(|e| e.to_string())?;
    }
    c.form(3).await.map_err(|e| e.to_string())?;
    VolumeServiceClient::new(c.try_channel(1).await?)
        .create_disk(vpb::CreateDiskRequest {
            name: "vol/bench/d.img".into(),
            size_mib: 16,
        })
        .await
        .map_err(|s| s.to_string())?;

    // 1. Start with and without a disk (both preferred on node 2, a follower).
    for (name, disk) in [("nodisk", None), ("withdisk", Some("vol/bench/d.img"))] {
        let mut s = spec(name, disk);
        s.preferred_owners = vec![2];
        let t = Instant::now();
        c.try_vms(1)
            .await?
            .create_vm(pb::CreateVmRequest {
                spec: Some(s),
                start: true,
            })
            .await
            .map_err(|s| format!("create {name}: {s}"))?;
        heartbeat(&c, 1, name, 0, if disk.is_some() { "ok" } else { "nodisk" }).await?;
        let ms = t.elapsed().as_millis();
        if disk.is_some() {
            f.start_disk_ms.push(ms);
        } else {
            f.start_nodisk_ms.push(ms);
        }
    }

    // 2 + 3. Live there and back for both; then quick for the disk VM.
    for name in ["nodisk", "withdisk"] {
        for to in [3, 2] {
            let (ms, blackout) = migrate(&c, name, to, false).await?;
            if name == "withdisk" {
                f.blackout_disk_us.push(u128::from(blackout));
                f.live_ms.push(ms);
            } else {
                f.blackout_nodisk_us.push(u128::from(blackout));
            }
        }
    }
    for to in [3, 2] {
        let (ms, _) = migrate(&c, "withdisk", to, true).await?;
        f.quick_ms.push(ms);
    }
    heartbeat(&c, 1, "withdisk", 0, "ok").await?;

    // 4. Failover of the disk VM.
    let owner = get(&c, 1, "withdisk").await?.owner_id;
    let via = if owner == 1 { 3 } else { 1 };
    let t = Instant::now();
    c.kill9(owner).map_err(|e| e.to_string())?;
    heartbeat(&c, via, "withdisk", owner, "ok").await?;
    f.failover_ms.push(t.elapsed().as_millis());
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let bin = match locate_binary("cluster-agent", "cluster-agent") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("disk-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut f = Figures::default();
    for r in 0..rounds {
        if let Err(e) = round(&bin, &mut f).await {
            eprintln!("disk-bench: round {r}: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    println!("disk-bench: {rounds} round(s), 3 agents on loopback, medians");
    println!(
        "start  create -> first heartbeat: with disk {} ms, without disk {} ms (baseline)",
        median(&mut f.start_disk_ms),
        median(&mut f.start_nodisk_ms)
    );
    println!(
        "live   blackout: with disk {} us (staged handoff), without disk {} us (baseline)",
        median(&mut f.blackout_disk_us),
        median(&mut f.blackout_nodisk_us)
    );
    println!(
        "move   request -> running on target, VM with disk: quick {} ms, live {} ms (baseline)",
        median(&mut f.quick_ms),
        median(&mut f.live_ms)
    );
    println!(
        "fail   kill -9 owner -> disk=ok heartbeat elsewhere: {} ms (start baseline {} ms)",
        median(&mut f.failover_ms),
        median(&mut f.start_disk_ms)
    );
    ExitCode::SUCCESS
}
