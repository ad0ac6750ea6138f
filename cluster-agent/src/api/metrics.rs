//! Prometheus `/metrics` per agent: a tiny HTTP/1.1 handler on tokio (no framework),
//! text exposition format 0.0.4, served on `metrics_addr` when configured.
//!
//! Series: VMs on this node by VMM state and by recorded runtime state, outgoing
//! migrations (started / succeeded / failed / cancelled), their wire bytes and blackout
//! histogram, queued migrations, Raft (term, leader id, is-leader, last log, last applied, committed on the
//! leader), node liveness counts by state, and this node's lease.
//!
//! **Architecture Invariant:** the metrics listener only reads: it renders from the
//! applied state, Raft metrics, the VMM's list and in-memory counters, and never writes
//! through Raft; requests are bounded (head ≤ [`REQUEST_HEAD_BYTES_MAX`], one read
//! timeout, at most [`CONNECTIONS_MAX`] at a time).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use vmm_node::VmStatus;

use crate::control::progress::{ProgressBoard, BLACKOUT_BUCKETS_US};
use crate::node::Agent;
use crate::state::NodeState;
use crate::vmhost::VmHost;

/// Longest request head read.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Connections served at once; more wait for the accept loop.
pub const CONNECTIONS_MAX: usize = 16;
/// A client has this long to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on metrics_addr {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Bind the listener (so a bad address fails the start) and serve until `shutdown`.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    progress: Arc<ProgressBoard>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let (mut sock, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let (agent, host, progress) = (agent.clone(), host.clone(), progress.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let head = tokio::time::timeout(READ_TIMEOUT, async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n")
                    && !buf.windows(2).any(|w| w == b"\n\n")
                {
                    let n = sock.read(&mut chunk).await.ok()?;
                    if n == 0 || buf.len() + n > REQUEST_HEAD_BYTES_MAX {
                        return None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Some(())
            })
            .await;
            let (status, body) = match head {
                Ok(Some(())) => {
                    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
                    let line = String::from_utf8_lossy(line);
                    let mut parts = line.split_whitespace();
                    match (parts.next(), parts.next()) {
                        (Some("GET"), Some("/metrics")) => {
                            let h = host.clone();
                            let vms = tokio::task::spawn_blocking(move || h.list())
                                .await
                                .unwrap_or_default();
                            ("200 OK", render(&agent, &progress, &vms))
                        }
                        (Some("GET"), Some(_)) => ("404 Not Found", "only /metrics\n".into()),
                        _ => ("405 Method Not Allowed", "GET /metrics\n".into()),
                    }
                }
                _ => ("400 Bad Request", "bad request\n".into()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// The exposition text.
pub fn render(agent: &Agent, progress: &ProgressBoard, vms: &[crate::vmhost::VmInfo]) -> String {
    let me = agent.node_id();
    let mut out = String::new();
    let node = format!("node=\"{me}\"");

    family(
        &mut out,
        "cluster_vms",
        "gauge",
        "VMs in this node's VMM by state.",
    );
    let mut by_state: BTreeMap<&str, u64> = ["running", "paused", "stopped"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for v in vms {
        let s = match v.status {
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Stopped { .. } => "stopped",
        };
        *by_state.entry(s).or_default() += 1;
    }
    for (s, n) in &by_state {
        let _ = writeln!(out, "cluster_vms{{{node},state=\"{s}\"}} {n}");
    }

    let (owned, nodes, records, queued) = agent.read_sm(|d| {
        let mut owned: BTreeMap<String, u64> = BTreeMap::new();
        for v in d.state.vms.values().filter(|v| v.owner == Some(me)) {
            *owned.entry(v.runtime.to_string()).or_default() += 1;
        }
        let mut nodes: BTreeMap<&'static str, u64> = [
            (NodeState::Up.as_str(), 0),
            (NodeState::Down.as_str(), 0),
            (NodeState::Paused.as_str(), 0),
            (NodeState::Standby.as_str(), 0),
            (NodeState::Waking.as_str(), 0),
        ]
        .into_iter()
        .collect();
        for n in d.state.nodes.values() {
            *nodes.entry(n.state.as_str()).or_default() += 1;
        }
        let queued = crate::state::migrations::queue(&d.state).len();
        (owned, nodes, d.state.migrations.len(), queued)
    });
    family(
        &mut out,
        "cluster_owned_vms",
        "gauge",
        "VMs whose committed owner is this node, by recorded runtime state.",
    );
    for (s, n) in &owned {
        let _ = writeln!(out, "cluster_owned_vms{{{node},state=\"{s}\"}} {n}");
    }

    let c = progress.counters();
    family(
        &mut out,
        "cluster_migrations_total",
        "counter",
        "Live migrations this node ran the source of, by result (started counts every attempt).",
    );
    for (r, n) in [
        ("started", c.started),
        ("succeeded", c.succeeded),
        ("failed", c.failed),
        ("cancelled", c.cancelled),
    ] {
        let _ = writeln!(out, "cluster_migrations_total{{{node},result=\"{r}\"}} {n}");
    }
    family(
        &mut out,
        "cluster_migration_wire_bytes_total",
        "counter",
        "Bytes put on the migration network by successful outgoing migrations.",
    );
    let _ = writeln!(
        out,
        "cluster_migration_wire_bytes_total{{{node}}} {}",
        c.wire_bytes
    );
    family(
        &mut out,
        "cluster_migration_blackout_seconds",
        "histogram",
        "Blackout (guest paused) of successful outgoing live migrations.",
    );
    let mut cum = 0;
    for (i, b) in BLACKOUT_BUCKETS_US.iter().enumerate() {
        cum += c.blackout_buckets[i];
        let le = *b as f64 / 1e6;
        let _ = writeln!(
            out,
            "cluster_migration_blackout_seconds_bucket{{{node},le=\"{le}\"}} {cum}"
        );
    }
    cum += c.blackout_buckets[BLACKOUT_BUCKETS_US.len()];
    let _ = writeln!(
        out,
        "cluster_migration_blackout_seconds_bucket{{{node},le=\"+Inf\"}} {cum}"
    );
    let _ = writeln!(
        out,
        "cluster_migration_blackout_seconds_sum{{{node}}} {}",
        c.blackout_sum_us as f64 / 1e6
    );
    let _ = writeln!(
        out,
        "cluster_migration_blackout_seconds_count{{{node}}} {}",
        c.blackout_count
    );
    family(
        &mut out,
        "cluster_migration_records",
        "gauge",
        "Migration records in the replicated history.",
    );
    let _ = writeln!(out, "cluster_migration_records{{{node}}} {records}");
    family(
        &mut out,
        "cluster_migrations_queued",
        "gauge",
        "Migrations waiting in the queue for a migration slot.",
    );
    let _ = writeln!(out, "cluster_migrations_queued{{{node}}} {queued}");

    let m = agent.metrics();
    let leading = m.current_leader == Some(me);
    let last_log = m.last_log_index.unwrap_or(0);
    for (name, kind, help, v) in [
        (
            "cluster_raft_term",
            "gauge",
            "Current Raft term.",
            m.current_term,
        ),
        (
            "cluster_raft_leader_id",
            "gauge",
            "Node id of the known leader (0: none).",
            m.current_leader.unwrap_or(0),
        ),
        (
            "cluster_raft_is_leader",
            "gauge",
            "1 when this node leads.",
            u64::from(leading),
        ),
        (
            "cluster_raft_last_log_index",
            "gauge",
            "Index of the last log entry.",
            last_log,
        ),
        (
            "cluster_raft_last_applied_index",
            "gauge",
            "Index of the last applied entry.",
            m.last_applied.map(|l| l.index).unwrap_or(0),
        ),
    ] {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name}{{{node}}} {v}");
    }
    if let Some(rep) = &m.replication {
        // On the leader: the highest index a majority of voters holds.
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
        let mut matched: Vec<u64> = voters
            .iter()
            .map(|v| {
                if *v == me {
                    last_log
                } else {
                    rep.get(v).copied().flatten().map(|l| l.index).unwrap_or(0)
                }
            })
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(c) = matched.get(voters.len() / 2) {
            family(
                &mut out,
                "cluster_raft_committed_index",
                "gauge",
                "Index a majority of voters holds (leader only).",
            );
            let _ = writeln!(out, "cluster_raft_committed_index{{{node}}} {c}");
        }
    }

    family(
        &mut out,
        "cluster_nodes",
        "gauge",
        "Registered nodes by liveness state (this replica's view).",
    );
    for (s, n) in &nodes {
        let _ = writeln!(out, "cluster_nodes{{{node},state=\"{s}\"}} {n}");
    }
    let lease = agent.lease();
    family(
        &mut out,
        "cluster_lease_held",
        "gauge",
        "1 while this node holds its self-fence lease (may run VMs).",
    );
    let _ = writeln!(
        out,
        "cluster_lease_held{{{node}}} {}",
        u64::from(lease.held)
    );
    family(
        &mut out,
        "cluster_lease_lapses_total",
        "counter",
        "Times this node's lease lapsed (its VMs were fenced).",
    );
    let _ = writeln!(out, "cluster_lease_lapses_total{{{node}}} {}", lease.lapses);
    family(
        &mut out,
        "cluster_balance_rounds_total",
        "counter",
        "Looks the periodic balancer took on this agent while it led (moves planned or not).",
    );
    let _ = writeln!(
        out,
        "cluster_balance_rounds_total{{{node}}} {}",
        agent.balance_rounds()
    );
    render_power(&mut out, &node, agent);
    render_demand(&mut out, &node, agent.demand().get(&me));
    out
}

/// Standby nodes, power commands this agent ran (as leader) and how long it has not
/// heard each peer.
fn render_power(out: &mut String, node: &str, agent: &Agent) {
    let (standby, peers) = agent.read_sm(|d| {
        (
            d.state
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Standby)
                .count(),
            d.state.nodes.keys().copied().collect::<Vec<u64>>(),
        )
    });
    family(
        out,
        "cluster_nodes_standby",
        "gauge",
        "Nodes in standby (powered off by power saving or by hand; they own no VM).",
    );
    let _ = writeln!(out, "cluster_nodes_standby{{{node}}} {standby}");
    family(
        out,
        "cluster_power_commands_total",
        "counter",
        "Power-off and power-on commands this agent ran as leader, by outcome (failed: start error, non-zero exit or timeout).",
    );
    for ((action, outcome), n) in agent.power_commands() {
        let _ = writeln!(
            out,
            "cluster_power_commands_total{{{node},action=\"{action}\",outcome=\"{outcome}\"}} {n}"
        );
    }
    family(
        out,
        "cluster_peer_silence_ms",
        "gauge",
        "Time since this agent last heard each node's heartbeat (since it started, if never).",
    );
    for p in peers.into_iter().filter(|p| *p != agent.node_id()) {
        let _ = writeln!(
            out,
            "cluster_peer_silence_ms{{{node},peer=\"{p}\"}} {}",
            agent.silence_of(p).as_millis()
        );
    }
}

/// `value` as a Prometheus label value (backslash, quote and newline escaped).
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A demand series: name suffix, help text, and the figure it shows.
type DemandSeries = (
    &'static str,
    &'static str,
    fn(&crate::node::demand::VmDemand) -> u64,
);

/// This node's measured demand (its latest report): totals and per VM.
fn render_demand(out: &mut String, node: &str, report: Option<&crate::node::demand::NodeDemand>) {
    let Some(r) = report else { return };
    let t = r.total();
    let per_vm: [DemandSeries; 3] = [
        (
            "cpu_demand_millicores",
            "vCPU run + runnable-wait time per second, smoothed (1000 = one busy vCPU).",
            |d| d.cpu_demand_mc,
        ),
        (
            "cpu_run_millicores",
            "vCPU run time per second, smoothed (the part of the demand that got a CPU).",
            |d| d.cpu_run_mc,
        ),
        (
            "memory_touched_mib",
            "Guest memory resident on this host (touched by the guest).",
            |d| d.memory_touched_mib,
        ),
    ];
    for (what, help, get) in per_vm {
        let name = format!("cluster_node_{what}");
        family(
            out,
            &name,
            "gauge",
            &format!("{help} Sum over this node's VMs."),
        );
        let _ = writeln!(out, "{name}{{{node}}} {}", get(&t));
        let name = format!("cluster_vm_{what}");
        family(out, &name, "gauge", help);
        for (vm, d) in &r.vms {
            let _ = writeln!(
                out,
                "{name}{{{node},vm=\"{}\"}} {}",
                label_value(vm),
                get(d)
            );
        }
    }
}

#[cfg(test)]
mod demand_tests {
    use super::*;
    use crate::node::demand::{NodeDemand, VmDemand};

    #[test]
    fn demand_series_per_vm_and_totals_with_escaped_names() {
        let mut r = NodeDemand::default();
        for (name, cpu) in [("a", 900), ("b\"x", 100)] {
            r.vms.insert(
                name.into(),
                VmDemand {
                    cpu_demand_mc: cpu,
                    cpu_run_mc: cpu / 2,
                    memory_touched_mib: 64,
                },
            );
        }
        let mut out = String::new();
        render_demand(&mut out, "node=\"2\"", Some(&r));
        for line in [
            "cluster_node_cpu_demand_millicores{node=\"2\"} 1000",
            "cluster_node_cpu_run_millicores{node=\"2\"} 500",
            "cluster_node_memory_touched_mib{node=\"2\"} 128",
            "cluster_vm_cpu_demand_millicores{node=\"2\",vm=\"a\"} 900",
            "cluster_vm_cpu_demand_millicores{node=\"2\",vm=\"b\\\"x\"} 100",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
        let mut none = String::new();
        render_demand(&mut none, "node=\"2\"", None);
        assert!(none.is_empty());
    }
}
