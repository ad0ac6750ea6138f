//! Prometheus `/metrics`, `/healthz` and `/readyz` per agent, served by axum (HTTP/1.1,
//! plain) on `metrics_addr` when configured. Series are built with the `prometheus` crate
//! and written in the text exposition format 0.0.4, which `promtool check metrics` lints
//! clean (`cluster-agent/tests/metrics.rs` runs it on a live agent).
//!
//! Every series carries `node="<this node's id>"`. Series: build info; VMs in this node's
//! VMM by state, VMs this node owns by recorded state and each one's state
//! (`cluster_vm_state{vm,state}`, 1 for the current one); outgoing migrations (started,
//! finished by result, wire bytes, receipt mismatches, blackout and duration histograms)
//! and the progress of those running from here (bytes remaining, rate, round); the
//! replicated migration history and queue; jobs by kind and status and how long each
//! running one has been running; Raft (term, leader id, is-leader, last log, last applied,
//! committed on the leader; AppendEntries sent and served by transport); node liveness (counts by state, each node's state, peer
//! silence, standby, power commands); this node's lease (held, lapses, seconds left);
//! balancer rounds; measured demand.
//!
//! `/healthz` answers 200 while the process serves requests. `/readyz` answers 200 once
//! this agent is a registered member of a cluster, knows a Raft leader, and holds its
//! lease or runs no VM; else 503 with the first unmet condition as the body.
//!
//! **Architecture Invariant:** the metrics listener only reads: it renders from the
//! applied state, Raft metrics, the VMM's list and in-memory counters, and never writes
//! through Raft; requests are bounded (head ≤ [`REQUEST_HEAD_BYTES_MAX`], one header read
//! timeout, at most [`CONNECTIONS_MAX`] connections at a time, GET only).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use vmm_node::VmStatus;

use crate::control::progress::ProgressBoard;
use crate::node::Agent;
use crate::state::jobs::{JobKind, JobStatus};
use crate::state::migrations::MigrationState;
use crate::state::vms::RuntimeState;
use crate::state::NodeState;
use crate::vmhost::VmHost;

/// Longest request head read (hyper's smallest read buffer).
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;
/// Connections served at once; more are closed at once.
pub const CONNECTIONS_MAX: usize = 16;
/// A client has this long to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

const NODE_STATES: [NodeState; 5] = [
    NodeState::Up,
    NodeState::Down,
    NodeState::Paused,
    NodeState::Standby,
    NodeState::Waking,
];
const RUNTIME_STATES: [RuntimeState; 6] = [
    RuntimeState::Pending,
    RuntimeState::Starting,
    RuntimeState::Running,
    RuntimeState::Stopping,
    RuntimeState::Stopped,
    RuntimeState::Failed,
];
const JOB_KINDS: [JobKind; 3] = [JobKind::Drain, JobKind::Failback, JobKind::Balance];
const JOB_STATUSES: [JobStatus; 4] = [
    JobStatus::Running,
    JobStatus::Done,
    JobStatus::Aborted,
    JobStatus::Failed,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on metrics_addr {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the metrics")]
    Build(#[source] prometheus::Error),
}

impl From<prometheus::Error> for MetricsError {
    fn from(e: prometheus::Error) -> Self {
        MetricsError::Build(e)
    }
}

/// Bind the listener (so a bad address fails the start).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

#[derive(Clone)]
struct Ctx {
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    progress: Arc<ProgressBoard>,
}

fn router(ctx: Ctx) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this listener serves GET /metrics, /healthz and /readyz\n",
            )
        })
        .with_state(ctx)
}

/// Serve until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    progress: Arc<ProgressBoard>,
    shutdown: watch::Receiver<bool>,
) {
    let app = router(Ctx {
        agent,
        host,
        progress,
    });
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let mut stop = shutdown.clone();
    loop {
        let sock = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => match a {
                Ok((sock, _)) => sock,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(max = CONNECTIONS_MAX, "metrics connection limit reached");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(READ_TIMEOUT)
                .max_buf_size(REQUEST_HEAD_BYTES_MAX);
            let conn = builder.serve_connection(TokioIo::new(sock), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(error = %e, "metrics connection ended");
                },
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    let h = ctx.host.clone();
    let vms = tokio::task::spawn_blocking(move || h.list())
        .await
        .unwrap_or_default();
    match render(&ctx.agent, &ctx.progress, &vms) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            let msg = crate::error_chain(&e);
            tracing::warn!(error = %msg, "metrics not rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{msg}\n")).into_response()
        }
    }
}

async fn readyz(State(ctx): State<Ctx>) -> Response {
    match readiness(&ctx.agent) {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// `Ok` when this agent is a registered member of a cluster, knows a leader and holds its
/// lease or runs no VM; else the first condition not met, as a sentence.
pub fn readiness(agent: &Agent) -> Result<(), String> {
    let me = agent.node_id();
    let (formed, member, active) = agent.read_sm(|d| {
        let active = d
            .state
            .vms
            .values()
            .filter(|v| v.owner == Some(me))
            .filter(|v| {
                matches!(
                    v.runtime,
                    RuntimeState::Starting | RuntimeState::Running | RuntimeState::Stopping
                )
            })
            .count();
        (
            d.state.cluster.is_some(),
            d.state.nodes.contains_key(&me),
            active,
        )
    });
    if !formed {
        return Err("this agent has not joined a cluster (no cluster applied yet)".into());
    }
    if !member {
        return Err(format!(
            "node {me} is not a registered member of the cluster yet"
        ));
    }
    let m = agent.metrics();
    if m.current_leader.is_none() {
        return Err(format!("no Raft leader known (term {})", m.current_term));
    }
    if active > 0 && !agent.lease().held {
        return Err(format!(
            "node {me} owns {active} active VM(s) but does not hold its lease"
        ));
    }
    Ok(())
}

/// Families of one scrape: a registry whose every series carries `node`.
struct Scrape {
    reg: Registry,
}

impl Scrape {
    fn new(node: u64) -> Result<Scrape, prometheus::Error> {
        let labels = HashMap::from([("node".to_string(), node.to_string())]);
        Ok(Scrape {
            reg: Registry::new_custom(None, Some(labels))?,
        })
    }

    fn gauge(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<GaugeVec, prometheus::Error> {
        let g = GaugeVec::new(Opts::new(name, help), labels)?;
        self.reg.register(Box::new(g.clone()))?;
        Ok(g)
    }

    /// A gauge with one unlabelled series set to `v`.
    fn gauge1(&self, name: &str, help: &str, v: f64) -> Result<(), prometheus::Error> {
        self.gauge(name, help, &[])?
            .with_label_values::<&str>(&[])
            .set(v);
        Ok(())
    }

    fn counter(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, prometheus::Error> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.reg.register(Box::new(c.clone()))?;
        Ok(c)
    }

    fn counter1(&self, name: &str, help: &str, v: u64) -> Result<(), prometheus::Error> {
        self.counter(name, help, &[])?
            .with_label_values::<&str>(&[])
            .inc_by(v);
        Ok(())
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The exposition text.
pub fn render(
    agent: &Agent,
    progress: &ProgressBoard,
    vms: &[crate::vmhost::VmInfo],
) -> Result<String, MetricsError> {
    let me = agent.node_id();
    let sc = Scrape::new(me)?;
    sc.gauge(
        "cluster_build_info",
        "Always 1; the labels name the agent's build.",
        &["version"],
    )?
    .with_label_values(&[env!("CARGO_PKG_VERSION")])
    .set(1.0);

    let g = sc.gauge(
        "cluster_vms",
        "VMs in this node's VMM by state.",
        &["state"],
    )?;
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
        g.with_label_values(&[*s]).set(*n as f64);
    }

    render_state(&sc, agent, progress)?;

    let c = progress.counters();
    sc.counter1(
        "cluster_migrations_started_total",
        "Migrations (live or quick) this node began as the source.",
        c.started,
    )?;
    let f = sc.counter(
        "cluster_migrations_finished_total",
        "Migrations this node ran the source of that ended, by result.",
        &["result"],
    )?;
    for (r, n) in [
        ("succeeded", c.succeeded),
        ("failed", c.failed),
        ("cancelled", c.cancelled),
    ] {
        f.with_label_values(&[r]).inc_by(n);
    }
    sc.counter1(
        "cluster_migration_wire_bytes_total",
        "Bytes put on the migration network by successful outgoing live migrations.",
        c.wire_bytes,
    )?;
    sc.counter1(
        "cluster_migration_receipt_mismatches_total",
        "Successful outgoing live migrations whose memory receipt did not match.",
        c.receipt_mismatches,
    )?;
    let h = progress.histograms();
    sc.reg.register(Box::new(h.blackout_seconds.clone()))?;
    sc.reg.register(Box::new(h.duration_seconds.clone()))?;

    render_raft(&sc, agent)?;
    let ae = sc.counter(
        "cluster_peer_append_entries_total",
        "Raft AppendEntries calls (replication and Raft's heartbeats) this agent sent and served, by direction and transport (unary: one gRPC call each; stream: a message on a long-lived AppendEntriesStream).",
        &["direction", "transport"],
    )?;
    for (direction, transport, n) in crate::api::peer::APPEND_ENTRIES.snapshot() {
        ae.with_label_values(&[direction, transport]).inc_by(n);
    }
    let lease = agent.lease();
    sc.gauge1(
        "cluster_lease_held",
        "1 while this node holds its self-fence lease (may run VMs).",
        f64::from(u8::from(lease.held)),
    )?;
    sc.counter1(
        "cluster_lease_lapses_total",
        "Times this node's lease lapsed (its VMs were fenced).",
        lease.lapses,
    )?;
    let left = lease
        .until
        .filter(|_| lease.held)
        .map(|u| u.saturating_duration_since(Instant::now()).as_secs_f64())
        .unwrap_or(0.0);
    sc.gauge1(
        "cluster_lease_seconds_left",
        "Seconds until this node's lease ends unless renewed (0 when not held).",
        left,
    )?;
    sc.counter1(
        "cluster_balance_rounds_total",
        "Looks the periodic balancer took on this agent while it led (moves planned or not).",
        agent.balance_rounds(),
    )?;
    let failures = sc.counter(
        "cluster_vm_failures_total",
        "VMs of this node that failed while running (then restarted or left failed per their restart policy), by kind: process_gone (the VM's worker died), vcpu_error, guest_reset.",
        &["kind"],
    )?;
    let mut seen = agent.vm_failures();
    for kind in ["process_gone", "vcpu_error", "guest_reset"] {
        seen.entry(kind).or_default();
    }
    for (kind, n) in seen {
        failures.with_label_values(&[kind]).inc_by(n);
    }
    render_power(&sc, agent)?;
    render_demand(&sc, agent.demand().get(&me))?;

    let mut text = String::new();
    TextEncoder::new().encode_utf8(&sc.reg.gather(), &mut text)?;
    Ok(text)
}

/// Series read from the applied state: owned VMs, migrations, jobs, nodes.
fn render_state(sc: &Scrape, agent: &Agent, progress: &ProgressBoard) -> Result<(), MetricsError> {
    let me = agent.node_id();
    let now_ms = now_unix_ms();
    agent.read_sm(|d| -> Result<(), MetricsError> {
        let st = &d.state;
        let owned = sc.gauge(
            "cluster_owned_vms",
            "VMs whose committed owner is this node, by recorded runtime state.",
            &["state"],
        )?;
        let per_vm = sc.gauge(
            "cluster_vm_state",
            "1 for the recorded runtime state of each VM this node owns, 0 for the others.",
            &["vm", "state"],
        )?;
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for v in st.vms.values().filter(|v| v.owner == Some(me)) {
            *counts.entry(v.runtime.as_str()).or_default() += 1;
            for s in RUNTIME_STATES {
                per_vm
                    .with_label_values(&[v.spec.name.as_str(), s.as_str()])
                    .set(f64::from(u8::from(s == v.runtime)));
            }
        }
        for (s, n) in counts {
            owned.with_label_values(&[s]).set(n as f64);
        }

        sc.gauge1(
            "cluster_migration_records",
            "Migration records in the replicated history.",
            st.migrations.len() as f64,
        )?;
        sc.gauge1(
            "cluster_migrations_queued",
            "Migrations waiting in the queue for a migration slot.",
            crate::state::migrations::queue(st).len() as f64,
        )?;
        let running: Vec<_> = st
            .migrations
            .values()
            .filter(|m| m.state == MigrationState::Running)
            .collect();
        sc.gauge1(
            "cluster_migrations_running",
            "Migrations running in the cluster (this replica's view).",
            running.len() as f64,
        )?;
        let remaining = sc.gauge(
            "cluster_migration_bytes_remaining",
            "Bytes the latest round of each live migration running from this node has left.",
            &["vm"],
        )?;
        let rate = sc.gauge(
            "cluster_migration_rate_bytes_per_second",
            "Send rate of each live migration running from this node.",
            &["vm"],
        )?;
        let round = sc.gauge(
            "cluster_migration_round",
            "Copy round of each live migration running from this node.",
            &["vm"],
        )?;
        for m in running.iter().filter(|m| m.source == me) {
            if let Some(p) = progress.get(m.id) {
                remaining
                    .with_label_values(&[m.vm.as_str()])
                    .set(p.bytes_remaining as f64);
                rate.with_label_values(&[m.vm.as_str()])
                    .set(p.rate_bytes_per_s);
                round
                    .with_label_values(&[m.vm.as_str()])
                    .set(f64::from(p.round));
            }
        }

        let jobs = sc.gauge(
            "cluster_jobs",
            "Jobs (drain, failback, balance) in the replicated state, by kind and status.",
            &["kind", "status"],
        )?;
        let mut jc: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for k in JOB_KINDS {
            for s in JOB_STATUSES {
                jc.insert((k.as_str(), s.as_str()), 0);
            }
        }
        let age = sc.gauge(
            "cluster_job_running_seconds",
            "How long each running job has been running.",
            &["job_id", "kind"],
        )?;
        for j in st.jobs.jobs.values() {
            *jc.entry((j.kind.as_str(), j.status.as_str())).or_default() += 1;
            if j.status == JobStatus::Running {
                age.with_label_values(&[j.id.to_string().as_str(), j.kind.as_str()])
                    .set(now_ms.saturating_sub(j.created_unix_ms) as f64 / 1e3);
            }
        }
        for ((k, s), n) in jc {
            jobs.with_label_values(&[k, s]).set(n as f64);
        }

        let nodes = sc.gauge(
            "cluster_nodes",
            "Registered nodes by liveness state (this replica's view).",
            &["state"],
        )?;
        let node_state = sc.gauge(
            "cluster_node_state",
            "1 for each registered node's liveness state, 0 for the others (this replica's view).",
            &["peer", "state"],
        )?;
        let mut nc: BTreeMap<&str, u64> = NODE_STATES.iter().map(|s| (s.as_str(), 0)).collect();
        for (id, n) in &st.nodes {
            *nc.entry(n.state.as_str()).or_default() += 1;
            for s in NODE_STATES {
                node_state
                    .with_label_values(&[id.to_string().as_str(), s.as_str()])
                    .set(f64::from(u8::from(s == n.state)));
            }
        }
        for (s, n) in nc {
            nodes.with_label_values(&[s]).set(n as f64);
        }
        Ok(())
    })
}

fn render_raft(sc: &Scrape, agent: &Agent) -> Result<(), MetricsError> {
    let me = agent.node_id();
    let m = agent.metrics();
    let leading = m.current_leader == Some(me);
    let last_log = m.last_log_index.unwrap_or(0);
    for (name, help, v) in [
        ("cluster_raft_term", "Current Raft term.", m.current_term),
        (
            "cluster_raft_leader_id",
            "Node id of the known leader (0: none).",
            m.current_leader.unwrap_or(0),
        ),
        (
            "cluster_raft_is_leader",
            "1 when this node leads.",
            u64::from(leading),
        ),
        (
            "cluster_raft_last_log_index",
            "Index of the last log entry.",
            last_log,
        ),
        (
            "cluster_raft_last_applied_index",
            "Index of the last applied entry.",
            m.last_applied.map(|l| l.index).unwrap_or(0),
        ),
    ] {
        sc.gauge1(name, help, v as f64)?;
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
            sc.gauge1(
                "cluster_raft_committed_index",
                "Index a majority of voters holds (leader only).",
                *c as f64,
            )?;
        }
    }
    Ok(())
}

/// Standby nodes, power commands this agent ran (as leader) and how long it has not
/// heard each peer.
fn render_power(sc: &Scrape, agent: &Agent) -> Result<(), MetricsError> {
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
    sc.gauge1(
        "cluster_nodes_standby",
        "Nodes in standby (powered off by power saving or by hand; they own no VM).",
        standby as f64,
    )?;
    let pc = sc.counter(
        "cluster_power_commands_total",
        "Power-off and power-on commands this agent ran as leader, by outcome (failed: start error, non-zero exit or timeout).",
        &["action", "outcome"],
    )?;
    for ((action, outcome), n) in agent.power_commands() {
        pc.with_label_values(&[action, outcome]).inc_by(n);
    }
    let silence = sc.gauge(
        "cluster_peer_silence_seconds",
        "Time since this agent last heard each node's heartbeat (since it started, if never).",
        &["peer"],
    )?;
    for p in peers.into_iter().filter(|p| *p != agent.node_id()) {
        silence
            .with_label_values(&[p.to_string().as_str()])
            .set(agent.silence_of(p).as_secs_f64());
    }
    Ok(())
}

/// A demand series: name suffix, help text, and the figure it shows.
type DemandSeries = (
    &'static str,
    &'static str,
    fn(&crate::node::demand::VmDemand) -> u64,
);

/// This node's measured demand (its latest report): totals and per VM.
fn render_demand(
    sc: &Scrape,
    report: Option<&crate::node::demand::NodeDemand>,
) -> Result<(), MetricsError> {
    let Some(r) = report else { return Ok(()) };
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
        sc.gauge1(
            &format!("cluster_node_{what}"),
            &format!("{help} Sum over this node's VMs."),
            get(&t) as f64,
        )?;
        let g = sc.gauge(&format!("cluster_vm_{what}"), help, &["vm"])?;
        for (vm, d) in &r.vms {
            g.with_label_values(&[vm.as_str()]).set(get(d) as f64);
        }
    }
    Ok(())
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
        let sc = Scrape::new(2).unwrap();
        render_demand(&sc, Some(&r)).unwrap();
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&sc.reg.gather(), &mut out)
            .unwrap();
        for line in [
            "cluster_node_cpu_demand_millicores{node=\"2\"} 1000",
            "cluster_node_cpu_run_millicores{node=\"2\"} 500",
            "cluster_node_memory_touched_mib{node=\"2\"} 128",
            // The library prints a series' own labels first, the agent's `node` last.
            "cluster_vm_cpu_demand_millicores{vm=\"a\",node=\"2\"} 900",
            "cluster_vm_cpu_demand_millicores{vm=\"b\\\"x\",node=\"2\"} 100",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing in\n{out}");
        }
        let none = Scrape::new(2).unwrap();
        render_demand(&none, None).unwrap();
        assert!(none.reg.gather().is_empty());
    }
}
