//! Chaos run: a local cluster of real agents (5 by default, as root: the partitions are
//! iptables rules, see `cluster_tests::partition`) running test-guest VMs, some with a
//! disk on a shared volume, while a seeded random schedule injects faults one round at a
//! time — a node cut off, a minority split off, a one-way cut, a flapping link, a node's
//! links losing 30–70% of their packets, a node frozen, kill -9 and restart, live and
//! quick migrations, drains — each held 1–4 s (freezes 0.2–1 s) and healed, then the
//! cluster is given time to settle. Writers put keys through every node all along.
//!
//! At the end it prints the faults injected, migrations, failovers, and the two numbers
//! that must be zero — VM double runs (from every node's own console journal, see
//! `cluster_tests::checker`) and lost acknowledged writes — plus the guests' own memory
//! and disk verification (heartbeats with `mem=bad` or `disk=bad`). It exits non-zero
//! when any of those is not zero, or when the cluster did not settle at the end.
//!
//! Freezes (SIGSTOP, then SIGCONT) last less than the Down timeout: a frozen agent that
//! thaws runs its vCPUs until its fence poll, so a freeze long enough for its VMs to fail
//! over breaks the lease's bounded-delay assumption and can show as a double run
//! (docs/known-limits.md). Shorter ones are within it and must show none.
//!
//! Usage: `chaos [--nodes 5] [--duration-s 120] [--seed 1] [--vms 3] [--disk-vms 2]`
//! (build `cluster-agent` in the same target directory first:
//! `cargo build -p cluster-agent -p cluster-tests --bins`).

use cluster_proto::EnumName;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use cluster_proto::drain as dpb;
use cluster_proto::vms as pb;
use cluster_proto::volumes as vpb;
use cluster_tests::checker::{RunChecker, Writer};
use cluster_tests::partition::Partition;
use cluster_tests::vm::{guest_spec, mem_boot};
use cluster_tests::{locate_binary, Cluster, Options, Wait};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Parser)]
#[command(
    name = "chaos",
    about = "Random partitions, kills and migrations against a local cluster"
)]
struct Args {
    /// Agents in the cluster.
    #[arg(long, default_value_t = 5)]
    nodes: u64,
    /// How long to inject faults.
    #[arg(long, default_value_t = 120)]
    duration_s: u64,
    /// Seed of the fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// VMs without a disk.
    #[arg(long, default_value_t = 3)]
    vms: usize,
    /// VMs with a disk on the shared volume.
    #[arg(long, default_value_t = 2)]
    disk_vms: usize,
    /// Copy every agent's log into this directory at the end.
    #[arg(long)]
    keep_logs: Option<std::path::PathBuf>,
}

/// How long the cluster may take to settle after a fault before the round counts as
/// unsettled.
const SETTLE_MAX: Duration = Duration::from_secs(60);
/// Log lines per node printed for a round that did not settle.
const UNSETTLED_LOG_LINES: usize = 80;
/// Freezes last at least this and less than [`FREEZE_MAX`].
const FREEZE_MIN: Duration = Duration::from_millis(200);
/// Below the agent's Down timeout (1.2 s): no failover starts while a node is frozen
/// (see the module doc).
const FREEZE_MAX: Duration = Duration::from_millis(1_000);
/// A write through each node every so often.
const WRITE_EVERY: Duration = Duration::from_millis(50);

/// The agent's default timings (as the partition tests use them).
fn agent_timings() -> Options {
    Options::agent_defaults()
}

#[derive(Debug, Default)]
struct Tally {
    faults: BTreeMap<&'static str, u64>,
    live_requested: u64,
    quick_requested: u64,
    migrate_refused: u64,
    unsettled_rounds: u64,
}

impl Tally {
    /// Counts `fault`, injected on `nodes`, and says so on stderr (with the time, to
    /// read beside the agents' logs).
    fn count(&mut self, fault: &'static str, nodes: &[u64]) {
        *self.faults.entry(fault).or_default() += 1;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!(
            "[{}.{:03}] {fault}: nodes {nodes:?}",
            at.as_secs(),
            at.subsec_millis()
        );
    }
}

fn vm_names(args: &Args) -> (Vec<String>, Vec<String>) {
    let plain = (0..args.vms).map(|i| format!("vm-{i}")).collect();
    let disk = (0..args.disk_vms).map(|i| format!("dvm-{i}")).collect();
    (plain, disk)
}

fn disk_spec(name: &str) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Disk as i32,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    pb::VmSpec {
        disks: vec![pb::DiskSpec {
            name: format!("vol/vms/{name}.img"),
            read_only: false,
        }],
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        ..guest_spec(name, 64, boot)
    }
}

fn mem_spec(name: &str) -> pb::VmSpec {
    pb::VmSpec {
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        ..guest_spec(name, 64, mem_boot())
    }
}

/// The leader that every running node agrees on.
async fn leader(cl: &Cluster) -> Result<u64, String> {
    cl.wait_leader(&cl.running(), SETTLE_MAX)
        .await
        .map_err(|e| e.to_string())
}

/// Waits until every running node agrees on a leader and every VM runs with no
/// migration under way, as the leader sees it.
async fn settle(cl: &Cluster, names: &[String]) -> Result<(), String> {
    let l = leader(cl).await?;
    let want = names.len();
    Wait::new(SETTLE_MAX)
        .until(
            "every VM running, none migrating",
            || cl.read_vms(l),
            |vms| {
                vms.iter()
                    .filter(|v| v.runtime().name() == "running" && v.migrating_to == 0)
                    .count()
                    == want
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The state of an agent's process as `/proc` tells it (`R`, `S`, `T` stopped, ...).
fn process_state(pid: Option<u32>) -> String {
    let Some(pid) = pid else {
        return "not running".into();
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // pid (comm) state ...: comm may hold spaces, the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?");
    format!("pid {pid}, state {state}")
}

/// `k` distinct nodes of `ids`, chosen by `rng`.
fn pick(rng: &mut StdRng, ids: &[u64], k: usize) -> Vec<u64> {
    let mut pool = ids.to_vec();
    let mut out = Vec::new();
    while out.len() < k && !pool.is_empty() {
        out.push(pool.remove(rng.gen_range(0..pool.len())));
    }
    out
}

/// One fault round: inject, hold, heal. Returns what was injected.
async fn round(
    cl: &mut Cluster,
    part: &Partition,
    rng: &mut StdRng,
    tally: &mut Tally,
    plain: &[String],
    disk: &[String],
) -> Result<(), String> {
    let ids = cl.ids();
    let n = ids.len();
    let hold = Duration::from_millis(rng.gen_range(1_000..4_000));
    let err = |e: cluster_tests::HarnessError| e.to_string();
    match rng.gen_range(0..10) {
        0 => {
            let node = pick(rng, &ids, 1)[0];
            tally.count("isolate a node", &[node]);
            part.isolate(node, &ids).map_err(err)?;
            // The fault's length (the schedule's stimulus).
            tokio::time::sleep(hold).await;
            part.heal().map_err(err)?;
        }
        1 => {
            let minority = pick(rng, &ids, (n - 1) / 2);
            let rest: Vec<u64> = ids
                .iter()
                .copied()
                .filter(|i| !minority.contains(i))
                .collect();
            tally.count("split off a minority", &minority);
            part.cut(&minority, &rest).map_err(err)?;
            tokio::time::sleep(hold).await;
            part.heal().map_err(err)?;
        }
        2 => {
            let pair = pick(rng, &ids, 2);
            tally.count("one-way cut", &pair);
            part.cut_oneway(cl, &pair[..1], &pair[1..]).map_err(err)?;
            tokio::time::sleep(hold).await;
            part.heal().map_err(err)?;
        }
        3 => {
            let node = pick(rng, &ids, 1)[0];
            let others: Vec<u64> = ids.iter().copied().filter(|i| *i != node).collect();
            tally.count("flapping link (300 ms)", &[node]);
            part.flap(&[node], &others, Duration::from_millis(300), hold * 2)
                .wait()
                .await
                .map_err(err)?;
        }
        4 if cl.running().len() == n => {
            let node = pick(rng, &ids, 1)[0];
            tally.count("kill -9 and restart", &[node]);
            cl.kill9(node).map_err(err)?;
            tokio::time::sleep(hold).await;
            cl.start(node).await.map_err(err)?;
        }
        5 | 6 => {
            let quick = rng.gen_bool(0.5) && !disk.is_empty();
            let pool = if quick { disk } else { plain };
            if pool.is_empty() {
                return Ok(());
            }
            let vm = pool[rng.gen_range(0..pool.len())].clone();
            let via = leader(cl).await?;
            let req = pb::MigrateVmRequest {
                name: vm,
                quick,
                no_queue: true,
                ..Default::default()
            };
            if quick {
                tally.quick_requested += 1;
            } else {
                tally.live_requested += 1;
            }
            eprintln!(
                "{} migration of {} requested",
                if quick { "quick" } else { "live" },
                req.name
            );
            let mut c = cl.try_vms(via).await?;
            if c.migrate_vm(req).await.is_err() {
                tally.migrate_refused += 1;
            }
            // Half the time, a partition lands in the middle of the migration.
            if rng.gen_bool(0.5) {
                let node = pick(rng, &ids, 1)[0];
                tally.count("isolate a node during a migration", &[node]);
                part.isolate(node, &ids).map_err(err)?;
                tokio::time::sleep(hold).await;
                part.heal().map_err(err)?;
            }
        }
        7 => {
            let node = pick(rng, &ids, 1)[0];
            let others: Vec<u64> = ids.iter().copied().filter(|i| *i != node).collect();
            let probability = [0.3, 0.5, 0.7][rng.gen_range(0..3)];
            let fault = match probability {
                p if p < 0.4 => "lossy links (30%)",
                p if p < 0.6 => "lossy links (50%)",
                _ => "lossy links (70%)",
            };
            tally.count(fault, &[node]);
            part.lossy(&[node], &others, probability).map_err(err)?;
            tokio::time::sleep(hold).await;
            part.heal().map_err(err)?;
        }
        8 if cl.running().len() == n => {
            let node = pick(rng, &ids, 1)[0];
            let frozen = Duration::from_millis(
                rng.gen_range(FREEZE_MIN.as_millis() as u64..FREEZE_MAX.as_millis() as u64),
            );
            tally.count("freeze (SIGSTOP 0.2-1 s)", &[node]);
            cl.freeze(node).map_err(err)?;
            tokio::time::sleep(frozen).await;
            cl.thaw(node).map_err(err)?;
        }
        _ => {
            let node = pick(rng, &ids, 1)[0];
            let via = leader(cl).await?;
            tally.count("drain and resume", &[node]);
            let ch = cl.try_channel(via).await?;
            let mut d = dpb::drain_service_client::DrainServiceClient::new(ch);
            let _ = d
                .drain_node(dpb::DrainNodeRequest {
                    node_id: node,
                    dry_run: false,
                })
                .await;
            tokio::time::sleep(hold).await;
            let _ = d
                .resume_node(dpb::ResumeNodeRequest {
                    node_id: node,
                    ..Default::default()
                })
                .await;
        }
    }
    Ok(())
}

async fn run(args: &Args) -> Result<bool, String> {
    let bin = locate_binary("cluster-agent", "cluster-agent").map_err(|e| e.to_string())?;
    let mut cl = Cluster::new(bin, agent_timings()).map_err(|e| e.to_string())?;
    let (_, volume) = cl.shared_volume();
    for id in 1..=args.nodes {
        cl.add_node_with(id, &volume).map_err(|e| e.to_string())?;
    }
    cl.form(args.nodes).await.map_err(|e| e.to_string())?;
    let part = Partition::new().map_err(|e| e.to_string())?;
    let (plain, disk) = vm_names(args);
    let l = leader(&cl).await?;
    let mut vols = vpb::volume_service_client::VolumeServiceClient::new(cl.try_channel(l).await?);
    for name in &disk {
        vols.create_disk(vpb::CreateDiskRequest {
            name: format!("vol/vms/{name}.img"),
            size_mib: 4,
        })
        .await
        .map_err(|e| format!("create disk of {name}: {e}"))?;
    }
    let mut c = cl.try_vms(l).await?;
    for spec in plain
        .iter()
        .map(|n| mem_spec(n))
        .chain(disk.iter().map(|n| disk_spec(n)))
    {
        let name = spec.name.clone();
        c.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start: true,
        })
        .await
        .map_err(|e| format!("create {name}: {e}"))?;
    }
    let all: Vec<String> = plain.iter().chain(disk.iter()).cloned().collect();
    settle(&cl, &all).await?;
    let names: Vec<&str> = all.iter().map(String::as_str).collect();
    let runs = RunChecker::start(&cl, &names);
    let writer = Writer::start(&cl, &cl.ids(), "chaos", WRITE_EVERY);
    let events_before = cl.events(l).await.map(|e| e.len()).unwrap_or(0);

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < Duration::from_secs(args.duration_s) {
        rounds += 1;
        if let Err(e) = round(&mut cl, &part, &mut rng, &mut tally, &plain, &disk).await {
            eprintln!("round {rounds}: {e}");
        }
        if let Err(e) = settle(&cl, &all).await {
            tally.unsettled_rounds += 1;
            eprintln!("round {rounds}: not settled within {SETTLE_MAX:?}: {e}");
            for id in cl.ids() {
                let mut state = process_state(cl.pid(id));
                // An agent that died on its own: how (a signal, an exit code). The
                // next round restarts it.
                if state.ends_with("state Z") {
                    if let Ok(status) = cl.wait_exit(id, Duration::ZERO).await {
                        state = format!("{state}, exited: {status}");
                    }
                }
                eprintln!(
                    "--- node {id} ({state}) ---\n{}",
                    cl.log_tail(id, UNSETTLED_LOG_LINES)
                );
            }
        }
        for id in cl.ids() {
            if !cl.running().contains(&id) {
                if let Err(e) = cl.start(id).await {
                    eprintln!("round {rounds}: restarting node {id}: {e}");
                }
            }
        }
    }

    part.heal().map_err(|e| e.to_string())?;
    for id in cl.ids() {
        if !cl.running().contains(&id) {
            cl.start(id).await.map_err(|e| e.to_string())?;
        }
    }
    // A cluster that does not settle at the end is reported with the rest: the numbers
    // that must be zero are still counted.
    let settled_at_end = settle(&cl, &all).await;
    if let Err(e) = &settled_at_end {
        tally.unsettled_rounds += 1;
        eprintln!("the end: not settled within {SETTLE_MAX:?}: {e}");
    }
    let l = leader(&cl).await?;
    cl.barrier().await;
    runs.sync(&cl).await;
    let doubles = runs.double_runs();
    let writes = writer.stop();
    let missing = writes.missing(&cl, l).await;
    let mut guest_bad = 0;
    let mut lines = 0;
    for vm in &all {
        for s in runs.sightings(vm) {
            lines += 1;
            if s.text.contains(" mem=bad")
                || s.text.contains(" disk=bad")
                || s.text.starts_with("ERR ")
            {
                guest_bad += 1;
            }
        }
    }
    let events = cl.events(l).await.map_err(|e| e.to_string())?;
    let failovers = events
        .iter()
        .skip(events_before)
        .filter(|e| e.message.contains(" owner node ") && e.message.contains(" -> node "))
        .count();
    let mut migrations = BTreeMap::new();
    let mut m = cluster_proto::migrations::migration_service_client::MigrationServiceClient::new(
        cl.try_channel(l).await?,
    );
    if let Ok(list) = m
        .list_migrations(cluster_proto::migrations::ListMigrationsRequest::default())
        .await
    {
        for r in list.into_inner().migrations {
            *migrations
                .entry(format!("{} {}", r.kind().name(), r.state().name()))
                .or_insert(0u64) += 1;
        }
    }

    println!(
        "chaos: {} nodes, {} VMs ({} with a disk), seed {}, {} s, {rounds} rounds",
        args.nodes,
        all.len(),
        disk.len(),
        args.seed,
        start.elapsed().as_secs()
    );
    println!("faults injected:");
    for (k, v) in &tally.faults {
        println!("  {k:<36} {v}");
    }
    println!(
        "migrations requested: {} live, {} quick ({} refused at the request)",
        tally.live_requested, tally.quick_requested, tally.migrate_refused
    );
    for (k, v) in &migrations {
        println!("  {k:<36} {v}");
    }
    println!("failovers (owner changes by failover): {failovers}");
    println!(
        "rounds not settled within {SETTLE_MAX:?}: {}",
        tally.unsettled_rounds
    );
    println!(
        "acknowledged writes: {} ({} failed or unknown)",
        writes.acked.len(),
        writes.failed
    );
    println!("guest console lines judged: {lines}");
    println!("MUST BE ZERO  VM double runs:           {}", doubles.len());
    println!("MUST BE ZERO  lost acknowledged writes: {}", missing.len());
    println!("MUST BE ZERO  guest memory/disk errors: {guest_bad}");
    for d in &doubles {
        println!("  double run: {d:?}");
        for s in runs.sightings(&d.vm) {
            let inside = |r: &cluster_tests::checker::Run| {
                s.node == r.node && (r.from_unix_us..=r.to_unix_us).contains(&s.at_unix_us)
            };
            if inside(&d.a) && s.at_unix_us >= d.b.from_unix_us.saturating_sub(500_000)
                || inside(&d.b)
            {
                println!("    node {} at {} us: {}", s.node, s.at_unix_us, s.text);
            }
        }
    }
    if let Some(dir) = &args.keep_logs {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for id in cl.ids() {
            let from = cl.spec(id).map_err(|e| e.to_string())?.log_path.clone();
            let to = dir.join(format!("node-{id}.log"));
            std::fs::copy(&from, &to).map_err(|e| format!("{}: {e}", to.display()))?;
        }
        println!("agent logs copied to {}", dir.display());
    }
    for w in missing.iter().take(10) {
        println!("  lost write: {w}");
    }
    if let Err(e) = &settled_at_end {
        println!("NOT SETTLED at the end: {e}");
    }
    Ok(doubles.is_empty() && missing.is_empty() && guest_bad == 0 && settled_at_end.is_ok())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Its partitions cut 127.0.1.x links: never beside a test cluster on this machine
    // (the test processes take the same lock).
    let _serial = cluster_tests::serial().await;
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chaos: error: {e}");
            ExitCode::from(2)
        }
    }
}
