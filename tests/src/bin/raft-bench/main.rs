//! Raft benchmark: starts a local 3-node cluster of real agents and measures
//! state-machine write latency (p50/p99) and throughput, sequential and with
//! concurrent clients, against a baseline measured in the same run (a local read
//! through the same gRPC stack, which does not go through Raft), then the leader
//! failover time after kill -9.
//!
//! The same run measures etcd (Debian's `etcd-server`, when `etcd` is on the PATH and
//! `--no-etcd` is not given) the same way first: three members on loopback, data on the
//! same disk, sequential and concurrent puts and linearizable reads over gRPC (see
//! `etcd.rs`).
//!
//! With `--compare-plaintext`, the write measurements run twice in the same run: on a
//! cluster whose peer (Raft) plane is mutual TLS (the default) and on one whose peer
//! plane is plaintext (`raft_insecure_plaintext`), printed side by side; the management
//! plane (client → agent) is TLS in both.
//!
//! Usage: `raft-bench [--writes N] [--clients C] [--failovers F] [--no-etcd]
//! [--compare-plaintext]` (the `cluster-agent` binary must be built in the same target
//! directory; the agents of `target/<profile>/` run, the profile this program was built
//! with). A breakdown of each write: `RAFT_BENCH_AGENT_LOG=info,openraft=warn,raft_timing=debug`
//! makes the agents log each log append, WAL sync, apply, peer call and `client_write`
//! with its duration, and each measurement prints its wall-clock window; with
//! `CLUSTER_TESTS_KEEP=1` the agents' logs stay in the cluster directory.

mod etcd;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_proto::management as pb;
use cluster_tests::{locate_binary, Cluster, Options};

struct Args {
    writes: usize,
    clients: usize,
    failovers: usize,
    etcd: bool,
    compare_plaintext: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        writes: 1_000,
        clients: 8,
        failovers: 3,
        etcd: true,
        compare_plaintext: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--compare-plaintext" {
            a.compare_plaintext = true;
            continue;
        }
        if flag == "--no-etcd" {
            a.etcd = false;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let n: usize = v
            .parse()
            .map_err(|_| format!("{flag}: {v:?} is not a number"))?;
        match flag.as_str() {
            "--writes" => a.writes = n.max(1),
            "--clients" => a.clients = n.max(1),
            "--failovers" => a.failovers = n,
            _ => {
                return Err(format!(
                    "unknown flag {flag}; use --writes, --clients, --failovers, --no-etcd, --compare-plaintext"
                ))
            }
        }
    }
    Ok(a)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    vmm_node::bench_stats::percentile(&mut sorted.to_vec(), p).unwrap_or(Duration::ZERO)
}

/// One measured row: its label, p50, p99 and throughput.
struct Row {
    label: String,
    p50: Duration,
    p99: Duration,
    per_s: f64,
}

fn report(name: &str, mut lat: Vec<Duration>, wall: Duration) -> Row {
    lat.sort();
    let n = lat.len();
    let row = Row {
        label: name.to_owned(),
        p50: pct(&lat, 0.50),
        p99: pct(&lat, 0.99),
        per_s: n as f64 / wall.as_secs_f64(),
    };
    println!(
        "{name:<34} n={n:<6} p50={:>8.3} ms  p99={:>8.3} ms  max={:>8.3} ms  throughput={:>8.0} ops/s",
        row.p50.as_secs_f64() * 1e3,
        row.p99.as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        row.per_s
    );
    if std::env::var_os("RAFT_BENCH_AGENT_LOG").is_some() {
        // The measurement's wall-clock window, to pick its lines out of the agents' logs.
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let start = end.saturating_sub(wall);
        println!(
            "  window (unix ms): {}..{}",
            start.as_millis(),
            end.as_millis()
        );
    }
    row
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("raft-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("raft-bench: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raft-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn options() -> Options {
    Options {
        raft_heartbeat_interval_ms: 100,
        election_timeout_min_ms: 600,
        election_timeout_max_ms: 1_200,
        snapshot_logs_since_last: 5_000,
        max_logs_kept_after_snapshot: 1_000,
        ..Options::default()
    }
}

/// A formed 3-node cluster (peer plane plaintext when `plaintext`) and its leader.
async fn cluster(plaintext: bool) -> Result<(Cluster, u64), Box<dyn std::error::Error>> {
    let bin = locate_binary("cluster-agent", "cluster-agent")?;
    let opts = options();
    let mut c = Cluster::new(bin, opts.clone())?;
    let extra = if plaintext {
        "raft_insecure_plaintext = true\n"
    } else {
        ""
    };
    for id in 1..=3 {
        c.add_node_with(id, extra)?;
        // A breakdown of each write: `RAFT_BENCH_AGENT_LOG=info,raft_timing=debug` logs the
        // store's and the peer plane's per-operation timings (with CLUSTER_TESTS_KEEP=1
        // the agents' logs stay in the cluster directory).
        if let Ok(filter) = std::env::var("RAFT_BENCH_AGENT_LOG") {
            c.set_env(id, "RUST_LOG", &filter)?;
        }
    }
    let leader = c.form(3).await?;
    println!(
        "cluster: 3 agents on loopback, peer plane {}, leader {leader}; election timeout {}-{} ms, raft heartbeat {} ms; WAL synced per append (applies durable through the log)",
        if plaintext { "PLAINTEXT" } else { "mutual TLS" },
        opts.election_timeout_min_ms,
        opts.election_timeout_max_ms,
        opts.raft_heartbeat_interval_ms
    );
    Ok((c, leader))
}

/// The read baseline and the write measurements on `c`.
async fn measure(
    c: Cluster,
    leader: u64,
    args: &Args,
) -> Result<(Cluster, Vec<Row>), Box<dyn std::error::Error>> {
    let follower = (1..=3).find(|i| *i != leader).unwrap_or(2);
    let mut rows = Vec::new();
    // Baseline 2: local reads through the same gRPC stack (no Raft, no fsync).
    let mut cl = c.client(leader).await?;
    let mut lat = Vec::with_capacity(args.writes);
    let t0 = Instant::now();
    for i in 0..args.writes {
        let s = Instant::now();
        cl.get_kv(pb::GetKvRequest {
            key: format!("k{i}"),
        })
        .await?;
        lat.push(s.elapsed());
    }
    rows.push(report("read via leader (linearizable)", lat, t0.elapsed()));

    for (label, target) in [
        ("sequential writes via leader", leader),
        ("sequential writes via follower", follower),
    ] {
        let mut cl = c.client(target).await?;
        let mut lat = Vec::with_capacity(args.writes);
        let t0 = Instant::now();
        for i in 0..args.writes {
            let s = Instant::now();
            cl.put_kv(pb::PutKvRequest {
                key: format!("seq-{target}-{i}"),
                value: "x".repeat(64),
            })
            .await?;
            lat.push(s.elapsed());
        }
        rows.push(report(label, lat, t0.elapsed()));
    }

    // Concurrent clients, all through the leader.
    let per = args.writes.div_ceil(args.clients);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let c_ref = Arc::new(c);
    for k in 0..args.clients {
        let mut cl = c_ref.client(leader).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let s = Instant::now();
                cl.put_kv(pb::PutKvRequest {
                    key: format!("conc-{k}-{i}"),
                    value: "x".repeat(64),
                })
                .await?;
                lat.push(s.elapsed());
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    rows.push(report(
        &format!("concurrent writes, {} clients", args.clients),
        all,
        t0.elapsed(),
    ));
    let c = Arc::try_unwrap(c_ref).map_err(|_| "cluster handle still shared")?;
    Ok((c, rows))
}

async fn bench(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // etcd first, before any agent runs (its data in the same temporary directory the
    // agents' go to: the same disk).
    if args.etcd && etcd::available() {
        let dir = tempfile::Builder::new()
            .prefix("raft-bench-etcd-")
            .tempdir()?;
        bench_etcd(&args, dir.path()).await?;
    } else if args.etcd {
        println!("etcd: not on the PATH (apt-get install etcd-server): no etcd baseline");
    }
    // Baseline 1: one synced 4 KiB write on the disk the agents use (each Raft write
    // needs at least two in series: leader append + follower append, plus the apply).
    let (c, leader) = cluster(false).await?;
    let probe = c.dir().join("fsync-probe");
    let mut f = std::fs::File::create(&probe)?;
    let mut lat = Vec::with_capacity(200);
    let t0 = Instant::now();
    for _ in 0..200 {
        let s = Instant::now();
        std::io::Write::write_all(&mut f, &[0u8; 4096])?;
        f.sync_data()?;
        lat.push(s.elapsed());
    }
    report("baseline: 4 KiB write + fdatasync", lat, t0.elapsed());
    drop(f);
    std::fs::remove_file(&probe)?;

    let (mut c, tls_rows) = measure(c, leader, &args).await?;

    if args.compare_plaintext {
        // The same measurements on a cluster whose peer plane is plaintext, then the two
        // side by side.
        let (p, leader) = cluster(true).await?;
        let (p, plain_rows) = measure(p, leader, &args).await?;
        drop(p);
        println!();
        println!(
            "{:<34} {:>27}   {:>27}   {:>9}",
            "peer plane:",
            "mutual TLS (p50 / p99 / ops/s)",
            "plaintext (p50 / p99 / ops/s)",
            "TLS/plain p50"
        );
        for (t, p) in tls_rows.iter().zip(&plain_rows) {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{:<34} {:>8.2} / {:>7.2} / {:>6.0}   {:>8.2} / {:>7.2} / {:>6.0}   {:>8.2}x",
                t.label,
                ms(t.p50),
                ms(t.p99),
                t.per_s,
                ms(p.p50),
                ms(p.p99),
                p.per_s,
                ms(t.p50) / ms(p.p50).max(1e-9)
            );
        }
    }

    // Failover after kill -9 of the leader (on the TLS cluster): time until a write
    // through a survivor commits. The killed agent is restarted before the next round.
    let opts = options();
    let mut times = Vec::new();
    for round in 0..args.failovers {
        let leader = c.wait_leader(&[1, 2, 3], Duration::from_secs(20)).await?;
        let survivor = (1..=3).find(|i| *i != leader).unwrap_or(1);
        let mut cl = c.client(survivor).await?;
        c.kill9(leader)?;
        let t0 = Instant::now();
        loop {
            let r = cl
                .put_kv(pb::PutKvRequest {
                    key: format!("failover-{round}"),
                    value: "x".into(),
                })
                .await;
            if r.is_ok() {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(
                    format!("no write committed 30 s after killing leader {leader}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let took = t0.elapsed();
        println!("failover round {round}: killed leader {leader}, write via node {survivor} committed after {:.0} ms", took.as_secs_f64() * 1e3);
        times.push(took);
        c.start(leader).await?;
    }
    if !times.is_empty() {
        times.sort();
        println!(
            "failover after kill -9: median {:.0} ms, max {:.0} ms over {} rounds (election timeout {}-{} ms)",
            pct(&times, 0.5).as_secs_f64() * 1e3,
            times.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
            times.len(),
            opts.election_timeout_min_ms,
            opts.election_timeout_max_ms
        );
    }
    Ok(())
}

/// etcd measured like the agents below: sequential puts through the leader and through a
/// follower, linearizable reads through the leader, concurrent puts through the leader.
async fn bench_etcd(args: &Args, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let e = etcd::Etcd::start(dir)?;
    let leader = e.wait_leader(Duration::from_secs(30)).await?;
    let follower = (leader + 1) % 3;
    println!("etcd: 3 members on loopback (plain gRPC, no TLS), leader e{leader}; heartbeat 100 ms, election 1000 ms; WAL fsynced per append");
    let mut cl = e.client(leader).await?;
    cl.put("k0", "x").await?;
    let mut lat = Vec::with_capacity(args.writes);
    let t0 = Instant::now();
    for i in 0..args.writes {
        let s = Instant::now();
        cl.get(&format!("k{}", i % 2)).await?;
        lat.push(s.elapsed());
    }
    report("etcd: read via leader (linearizable)", lat, t0.elapsed());
    for (label, target) in [
        ("etcd: sequential puts via leader", leader),
        ("etcd: sequential puts via follower", follower),
    ] {
        let mut cl = e.client(target).await?;
        let mut lat = Vec::with_capacity(args.writes);
        let t0 = Instant::now();
        for i in 0..args.writes {
            let s = Instant::now();
            cl.put(&format!("seq-{target}-{i}"), &"x".repeat(64))
                .await?;
            lat.push(s.elapsed());
        }
        report(label, lat, t0.elapsed());
    }
    let per = args.writes.div_ceil(args.clients);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..args.clients {
        let mut cl = e.client(leader).await?;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let s = Instant::now();
                cl.put(&format!("conc-{k}-{i}"), &"x".repeat(64)).await?;
                lat.push(s.elapsed());
            }
            Ok::<_, tonic::Status>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    report(
        &format!("etcd: concurrent puts, {} clients", args.clients),
        all,
        t0.elapsed(),
    );
    Ok(())
}
