//! Idle-cost benchmark: starts N real agents on loopback with no VM, lets them settle and
//! reads each agent's CPU time (utime + stime from `/proc/PID/stat`) over a fixed window:
//! the % of one core each agent uses while the cluster does nothing, leader and followers
//! apart. CPU time is what the agent spent, whatever else the machine runs. The same run
//! then measures failure detection: kill -9 of a follower, then of the leader, until the
//! (new) leader's replica shows the killed node Down.
//!
//! Each cluster size runs against every agent binary found: `target/debug/cluster-agent`
//! and `target/fast/cluster-agent` (the `fast` profile `deploy/local-cluster.sh` runs), or
//! the ones named with `--agent`. The agents use the agent's default timings
//! ([`Options::agent_defaults`]: heartbeats 200 ms, Down after 1200 ms, Raft heartbeat
//! 200 ms, elections 400–800 ms) unless the flags below change them.
//!
//! Usage: `idle-bench [--nodes 16,3] [--settle-s 10] [--window-s 20] [--agent PATH]...
//! [--heartbeat-ms 200] [--raft-heartbeat-ms 200] [--elections-ms 400-800] [--no-kill]`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cluster_proto::EnumName;
use cluster_tests::{Cluster, Options};

struct Args {
    nodes: Vec<u64>,
    settle: Duration,
    window: Duration,
    agents: Vec<PathBuf>,
    kill: bool,
    /// The agents' liveness heartbeat interval (their default: 200 ms).
    heartbeat_ms: u64,
    /// openraft's heartbeat interval.
    raft_heartbeat_ms: u64,
    /// The election timeout range.
    elections_ms: (u64, u64),
}

fn parse_args() -> Result<Args, String> {
    let d = Options::agent_defaults();
    let mut a = Args {
        nodes: vec![16, 3],
        settle: Duration::from_secs(10),
        window: Duration::from_secs(20),
        agents: Vec::new(),
        kill: true,
        heartbeat_ms: d.heartbeat_interval_ms,
        raft_heartbeat_ms: d.raft_heartbeat_interval_ms,
        elections_ms: (d.election_timeout_min_ms, d.election_timeout_max_ms),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--no-kill" {
            a.kill = false;
            continue;
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let secs = |v: &str| {
            v.parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| format!("{flag}: {v:?} is not a number of seconds"))
        };
        match flag.as_str() {
            "--nodes" => {
                a.nodes = v
                    .split(',')
                    .map(|n| match n.parse::<u64>() {
                        Ok(n) if (1..=16).contains(&n) => Ok(n),
                        _ => Err(format!("--nodes: {n:?} is not a number from 1 to 16")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--settle-s" => a.settle = secs(&v)?,
            "--window-s" => a.window = secs(&v)?.max(Duration::from_secs(1)),
            "--agent" => a.agents.push(PathBuf::from(v)),
            // Down stays at 1200 ms, so at most 600 ms (half of it, the lease).
            "--heartbeat-ms" => match v.parse::<u64>() {
                Ok(ms) if (10..=600).contains(&ms) => a.heartbeat_ms = ms,
                _ => return Err(format!("--heartbeat-ms: {v:?} is not a number from 10 to 600")),
            },
            "--raft-heartbeat-ms" => match v.parse::<u64>() {
                Ok(ms) if (10..=10_000).contains(&ms) => a.raft_heartbeat_ms = ms,
                _ => {
                    return Err(format!(
                        "--raft-heartbeat-ms: {v:?} is not a number from 10 to 10000"
                    ))
                }
            },
            "--elections-ms" => {
                let range = v
                    .split_once('-')
                    .and_then(|(lo, hi)| Some((lo.parse::<u64>().ok()?, hi.parse::<u64>().ok()?)));
                match range {
                    Some((lo, hi)) if 50 <= lo && lo < hi => a.elections_ms = (lo, hi),
                    _ => {
                        return Err(format!(
                            "--elections-ms: {v:?} is not MIN-MAX in ms with 50 <= MIN < MAX"
                        ))
                    }
                }
            }
            _ => {
                return Err(format!(
                    "unknown flag {flag}; use --nodes, --settle-s, --window-s, --agent, --heartbeat-ms, --raft-heartbeat-ms, --elections-ms, --no-kill"
                ))
            }
        }
    }
    if a.elections_ms.1 < 2 * a.heartbeat_ms {
        return Err(format!(
            "--elections-ms maximum {} must be at least twice --heartbeat-ms {}",
            a.elections_ms.1, a.heartbeat_ms
        ));
    }
    if a.agents.is_empty() {
        // target/<profile>/idle-bench → target/{debug,fast}/cluster-agent
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let target = exe
            .parent()
            .and_then(|p| p.parent())
            .ok_or("cannot find the target directory")?;
        for profile in ["debug", "fast"] {
            let p = target.join(profile).join("cluster-agent");
            if p.is_file() {
                a.agents.push(p);
            }
        }
        if a.agents.is_empty() {
            return Err(format!(
                "no cluster-agent in {}/{{debug,fast}}: build it first",
                target.display()
            ));
        }
    }
    Ok(a)
}

/// utime + stime of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `/proc` counts CPU time in USER_HZ ticks, 100 per second on Linux whatever the
/// kernel's own tick rate.
const TICKS_PER_S: f64 = 100.0;

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("idle-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("idle-bench: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut ok = true;
    for agent in &args.agents {
        for &n in &args.nodes {
            if let Err(e) = rt.block_on(run(agent, n, &args)) {
                eprintln!("idle-bench: {} with {n} agents: {e}", agent.display());
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn run(agent: &Path, n: u64, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let profile = agent
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let opts = Options {
        heartbeat_interval_ms: args.heartbeat_ms,
        raft_heartbeat_interval_ms: args.raft_heartbeat_ms,
        election_timeout_min_ms: args.elections_ms.0,
        election_timeout_max_ms: args.elections_ms.1,
        snapshot_logs_since_last: 5_000,
        max_logs_kept_after_snapshot: 1_000,
        ..Options::agent_defaults()
    };
    let mut c = Cluster::new(agent.to_path_buf(), opts.clone())?;
    let t0 = Instant::now();
    let leader = form(&mut c, n).await?;
    let formed = t0.elapsed();
    tokio::time::sleep(args.settle).await;
    let leader = c
        .wait_leader(&c.ids(), Duration::from_secs(20))
        .await
        .unwrap_or(leader);

    let pids: Vec<(u64, u32)> = c
        .ids()
        .into_iter()
        .filter_map(|id| c.pid(id).map(|p| (id, p)))
        .collect();
    let before: Vec<Option<u64>> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let w0 = Instant::now();
    tokio::time::sleep(args.window).await;
    let after: Vec<Option<u64>> = pids.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let window = w0.elapsed().as_secs_f64();
    let still = c.wait_leader(&c.ids(), Duration::from_secs(5)).await.ok();

    let mut leader_pct = None;
    let mut followers = Vec::new();
    for (((id, _), b), a) in pids.iter().zip(&before).zip(&after) {
        let (Some(b), Some(a)) = (b, a) else {
            return Err(format!("agent {id} exited during the window").into());
        };
        let pct = (a - b) as f64 / TICKS_PER_S / window * 100.0;
        if *id == leader {
            leader_pct = Some(pct);
        } else {
            followers.push(pct);
        }
    }
    let total: f64 = followers.iter().sum::<f64>() + leader_pct.unwrap_or(0.0);
    println!(
        "{profile:<6} {n:>2} agents (formed in {:.1} s), idle {:.0} s window: leader {:.2} % of a core; followers median {:.2} %, max {:.2} %; all agents {:.2} cores{}",
        formed.as_secs_f64(),
        window,
        leader_pct.unwrap_or(0.0),
        median(&mut followers.clone()),
        max(&followers),
        total / 100.0,
        if still == Some(leader) { "" } else { " (leader changed during the window)" }
    );

    if !args.kill || n < 3 {
        return Ok(());
    }
    // Failure detection: kill -9 a follower, then the leader; time until the (new) leader's
    // replica shows it Down.
    let follower = c.ids().into_iter().rfind(|id| *id != leader).unwrap_or(2);
    let follower_ms = time_to_down(&mut c, leader, follower, &[]).await?;
    let survivors: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();
    // The follower comes back first: a 3-node cluster needs it for a quorum.
    c.start(follower).await?;
    c.wait_node_state(leader, follower, "up", Duration::from_secs(30))
        .await?;
    let via = survivors[0];
    let leader_ms = time_to_down(&mut c, via, leader, &survivors).await?;
    println!(
        "{profile:<6} {n:>2} agents: kill -9 → Down on the leader: follower {follower_ms} ms, leader {leader_ms} ms (down_after {} ms)",
        opts.down_after_ms
    );
    Ok(())
}

/// Start nodes 1..=n, init on 1, join the rest through 1 (again when a join timed out:
/// on a loaded machine a debug agent may not catch up within the join's deadline).
async fn form(c: &mut Cluster, n: u64) -> Result<u64, Box<dyn std::error::Error>> {
    for id in 1..=n {
        c.add_node(id)?;
        c.start(id).await?;
    }
    c.init(1).await?;
    for id in 2..=n {
        let mut tries = 0;
        while let Err(e) = c.join(id, 1).await {
            // A join whose answer timed out may have gone through all the same.
            if e.to_string().contains("already a member") {
                break;
            }
            tries += 1;
            if tries == 3 {
                return Err(e.into());
            }
            eprintln!("idle-bench: join of node {id} failed, again: {e}");
        }
    }
    let ids: Vec<u64> = (1..=n).collect();
    Ok(c.wait_leader(&ids, Duration::from_secs(20)).await?)
}

/// Kill -9 `victim`, then poll `via` (or, when `among` is not empty, the leader those
/// survivors agree on) until its replica shows `victim` Down; the elapsed ms.
async fn time_to_down(
    c: &mut Cluster,
    via: u64,
    victim: u64,
    among: &[u64],
) -> Result<u128, Box<dyn std::error::Error>> {
    c.kill9(victim)?;
    let t0 = Instant::now();
    loop {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!("node {victim} not Down 30 s after kill -9").into());
        }
        let ask = if among.is_empty() {
            via
        } else {
            match c.status(via).await {
                Ok(s) if among.contains(&s.leader_id) => s.leader_id,
                _ => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        };
        if let Ok(nodes) = c.nodes(ask).await {
            if nodes
                .iter()
                .any(|n| n.node_id == victim && n.state().name() == "down")
            {
                return Ok(t0.elapsed().as_millis());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
