//! `clusterctl node drain|resume --failback`, `clusterctl drain ...` and `clusterctl
//! policy ...`: maintenance drain, failback and load-balancing jobs
//! (`cluster.drain.v1.DrainService`). Tables by default, `-o json` for scripts.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use cluster_proto::drain as pb;
use cluster_proto::drain::drain_service_client::DrainServiceClient;
use cluster_proto::times;
use cluster_proto::EnumName;
use serde::Serialize;

use crate::client::{call, service, CtlError};
use crate::output::{dur_ms, json, local_time, ms, table, time_text};
use crate::{Cli, Format};

/// Longest `--watch` follows a job.
const WATCH_MAX: Duration = Duration::from_secs(3600);
/// Past `WATCH_MAX` by this much, `--watch` stops waiting for the job's next update.
const WATCH_SLACK: Duration = Duration::from_millis(10);

#[derive(Debug, Subcommand)]
pub enum DrainCmd {
    /// Progress of the newest drain of NODE (moves, waves, status).
    Show {
        node_id: crate::nodes::NodeArg,
        /// Follow until the drain ends.
        #[arg(long)]
        watch: bool,
    },
    /// Abort the running drain of NODE: queued moves are dropped, in-flight migrations
    /// finish or roll back. `clusterctl node drain NODE` resumes it.
    Abort { node_id: crate::nodes::NodeArg },
    /// Every job the cluster keeps (drain, failback, balance).
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    None,
    #[value(alias = "even-distribution", alias = "even_distribution")]
    Even,
    #[value(alias = "power_saving")]
    PowerSaving,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Aggressiveness {
    Low,
    Medium,
    High,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCmd {
    /// Set the load-balancing policy the leader applies periodically.
    Set {
        #[command(subcommand)]
        what: PolicySet,
    },
    /// The current policy.
    Show,
    /// The moves the balancer would make now.
    Balance {
        /// Print the moves without making them (the only mode: the leader moves VMs
        /// by itself every interval when the policy is not none).
        #[arg(long)]
        dry_run: bool,
        /// Plan as if this mode were set (default: the current policy).
        #[arg(long, value_enum)]
        mode: Option<Mode>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicySet {
    /// `policy set balance even|power-saving|none --aggressiveness low|medium|high`.
    Balance {
        #[arg(value_enum)]
        mode: Mode,
        #[arg(long, value_enum, default_value_t = Aggressiveness::Medium)]
        aggressiveness: Aggressiveness,
        /// How often the leader runs the balancer, e.g. 30s (default: keep, 30s initially;
        /// a bare number is seconds; --interval-s is the old name).
        #[arg(long, alias = "interval-s", value_name = "DURATION", value_parser = crate::duration::bare_s)]
        interval: Option<Duration>,
        /// A VM moved by migration stays at least this long before the balancer moves it
        /// again, e.g. 5m (default: keep, 300s initially; a bare number is seconds;
        /// --min-dwell-s is the old name).
        #[arg(long, alias = "min-dwell-s", value_name = "DURATION", value_parser = crate::duration::bare_s)]
        min_dwell: Option<Duration>,
        /// What a move costs per second of its estimated migration, in basis points of load
        /// (a move is made only if it gains more; default: keep, 100 initially).
        #[arg(long)]
        migration_cost_bp_per_s: Option<u32>,
    },
}

fn mode_pb(m: Mode) -> pb::BalanceMode {
    match m {
        Mode::None => pb::BalanceMode::None,
        Mode::Even => pb::BalanceMode::Even,
        Mode::PowerSaving => pb::BalanceMode::PowerSaving,
    }
}

fn aggr_pb(a: Aggressiveness) -> pb::Aggressiveness {
    match a {
        Aggressiveness::Low => pb::Aggressiveness::Low,
        Aggressiveness::Medium => pb::Aggressiveness::Medium,
        Aggressiveness::High => pb::Aggressiveness::High,
    }
}

#[derive(Serialize)]
struct MoveView<'a> {
    vm: &'a str,
    from_node_id: u64,
    to_node_id: u64,
    kind: &'a str,
    why_not_live: &'a [String],
    wave: u32,
    planned_start_at: Option<String>,
    planned_end_at: Option<String>,
    status: &'a str,
    started_at: Option<String>,
    ended_at: Option<String>,
    reason: &'a str,
}

fn move_view(m: &pb::MoveInfo) -> MoveView<'_> {
    MoveView {
        vm: &m.vm,
        from_node_id: m.from_node_id,
        to_node_id: m.to_node_id,
        kind: m.kind().name(),
        why_not_live: &m.why_not_live,
        wave: m.wave,
        planned_start_at: time_text(&m.planned_start_at),
        planned_end_at: time_text(&m.planned_end_at),
        status: m.status().name(),
        started_at: time_text(&m.started_at),
        ended_at: time_text(&m.ended_at),
        reason: &m.reason,
    }
}

#[derive(Serialize)]
struct JobView<'a> {
    id: u64,
    kind: &'a str,
    node_id: u64,
    status: &'a str,
    reason: &'a str,
    moves: Vec<MoveView<'a>>,
    planned_finish_at: Option<String>,
    created_at: Option<String>,
    updated_at: Option<String>,
    finished_at: Option<String>,
    failed_back: bool,
}

fn job_view(j: &pb::JobInfo) -> JobView<'_> {
    JobView {
        id: j.id,
        kind: j.kind().name(),
        node_id: j.node_id,
        status: j.status().name(),
        reason: &j.reason,
        moves: j.moves.iter().map(move_view).collect(),
        planned_finish_at: time_text(&j.planned_finish_at),
        created_at: time_text(&j.created_at),
        updated_at: time_text(&j.updated_at),
        finished_at: time_text(&j.finished_at),
        failed_back: j.failed_back,
    }
}

/// A duration as JSON shows it (`"1.500s"`; `None`: absent).
fn duration_text(d: &Option<times::Duration>) -> Option<String> {
    d.as_ref().map(times::duration_string)
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn kind_text(m: &pb::MoveInfo) -> String {
    if m.kind() == pb::MoveKind::Quick && !m.why_not_live.is_empty() {
        format!("quick ({})", m.why_not_live.join("; "))
    } else {
        m.kind().name().to_owned()
    }
}

/// The plan as waves: each move with its planned start and end relative to `start`;
/// `-o wide` adds both as local times.
pub fn render_plan(fmt: Format, moves: &[pb::MoveInfo], start: u64) -> String {
    let wide = fmt == Format::Wide;
    let rows: Vec<Vec<String>> = moves
        .iter()
        .map(|m| {
            let mut row = vec![
                m.wave.to_string(),
                m.vm.clone(),
                m.from_node_id.to_string(),
                m.to_node_id.to_string(),
                kind_text(m),
                format!("+{}", secs(ms(&m.planned_start_at).saturating_sub(start))),
                format!("+{}", secs(ms(&m.planned_end_at).saturating_sub(start))),
            ];
            if wide {
                row.push(local_time(ms(&m.planned_start_at)));
                row.push(local_time(ms(&m.planned_end_at)));
            }
            row
        })
        .collect();
    let mut headers = vec!["WAVE", "VM", "FROM", "TO", "KIND", "START", "ETA"];
    if wide {
        headers.extend(["START_AT", "ETA_AT"]);
    }
    table(&headers, &rows)
}

pub fn render_drain(fmt: Format, r: &pb::DrainNodeResponse, node: u64) -> Result<String, CtlError> {
    if fmt == Format::Json {
        #[derive(Serialize)]
        struct V<'a> {
            job: Option<JobView<'a>>,
            plan: Vec<MoveView<'a>>,
            planned_start_at: Option<String>,
            planned_finish_at: Option<String>,
            lower_bound: Option<String>,
            incoming_in_flight: &'a [String],
        }
        return json(&V {
            job: r.job.as_ref().map(job_view),
            plan: r.plan.iter().map(move_view).collect(),
            planned_start_at: time_text(&r.planned_start_at),
            planned_finish_at: time_text(&r.planned_finish_at),
            lower_bound: duration_text(&r.lower_bound),
            incoming_in_flight: &r.incoming_in_flight,
        });
    }
    let waves = r.plan.iter().map(|m| m.wave).max().unwrap_or(0);
    let head = match &r.job {
        Some(j) => format!("drain of node {node} started (job {}): node paused", j.id),
        None => format!("dry run: drain of node {node} (nothing changed)"),
    };
    let mut s = format!(
        "{head}\n{} moves in {waves} waves, ETA {} (lower bound {})\n",
        r.plan.len(),
        secs(ms(&r.planned_finish_at).saturating_sub(ms(&r.planned_start_at))),
        secs(dur_ms(&r.lower_bound))
    );
    if !r.plan.is_empty() {
        s.push_str(&render_plan(fmt, &r.plan, ms(&r.planned_start_at)));
    }
    if !r.incoming_in_flight.is_empty() {
        s.push_str(&format!(
            "migrating into the node now (moved again once they arrive): {}\n",
            r.incoming_in_flight.join(", ")
        ));
    }
    Ok(s)
}

fn progress(j: &pb::JobInfo) -> String {
    let n = |s: &str| j.moves.iter().filter(|m| m.status().name() == s).count();
    let what = match j.kind() {
        pb::JobKind::Drain => format!("drain of node {}", j.node_id),
        pb::JobKind::Failback => format!("failback to node {}", j.node_id),
        _ => "balancing".to_string(),
    };
    let mut s = format!(
        "job {}: {what}: {} — {}/{} moved, {} in flight, {} queued, {} failed",
        j.id,
        j.status().name(),
        n("done"),
        j.moves.len(),
        n("in_flight"),
        n("queued"),
        n("failed")
    );
    if n("dropped") > 0 {
        s.push_str(&format!(", {} dropped", n("dropped")));
    }
    if n("skipped") > 0 {
        s.push_str(&format!(", {} skipped", n("skipped")));
    }
    if !j.reason.is_empty() {
        s.push_str(&format!(" ({})", j.reason));
    }
    s
}

/// How long a move took (`-` until it ended).
fn took(m: &pb::MoveInfo) -> String {
    let (started, ended) = (ms(&m.started_at), ms(&m.ended_at));
    if ended > started && started > 0 {
        secs(ended - started)
    } else {
        "-".into()
    }
}

/// A job's progress line and its moves; `-o wide` adds each move's planned duration
/// beside the time it took, and when it started and ended (local times).
pub fn render_job(fmt: Format, j: &pb::JobInfo) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&job_view(j));
    }
    let wide = fmt == Format::Wide;
    let mut s = progress(j);
    s.push('\n');
    let rows: Vec<Vec<String>> = j
        .moves
        .iter()
        .map(|m| {
            let mut row = vec![
                m.wave.to_string(),
                m.vm.clone(),
                m.from_node_id.to_string(),
                m.to_node_id.to_string(),
                kind_text(m),
                m.status().name().to_owned(),
            ];
            if wide {
                row.push(secs(
                    ms(&m.planned_end_at).saturating_sub(ms(&m.planned_start_at)),
                ));
            }
            row.push(took(m));
            if wide {
                row.push(local_time(ms(&m.started_at)));
                row.push(local_time(ms(&m.ended_at)));
            }
            row.push(m.reason.clone());
            row
        })
        .collect();
    let mut headers = vec!["WAVE", "VM", "FROM", "TO", "KIND", "STATUS"];
    if wide {
        headers.push("PLANNED");
    }
    headers.push("TOOK");
    if wide {
        headers.extend(["STARTED", "ENDED"]);
    }
    headers.push("REASON");
    if !rows.is_empty() {
        s.push_str(&table(&headers, &rows));
    }
    Ok(s)
}

/// Every job; `-o wide` adds the moves in flight, queued and failed, when the job was
/// created, when it was planned to finish and when it did (local times), and whether its
/// drained VMs were moved back.
pub fn render_jobs(fmt: Format, jobs: &[pb::JobInfo]) -> Result<String, CtlError> {
    if fmt == Format::Json {
        let v: Vec<JobView<'_>> = jobs.iter().map(job_view).collect();
        return json(&v);
    }
    let wide = fmt == Format::Wide;
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let n = |st: &str| j.moves.iter().filter(|m| m.status().name() == st).count();
            let mut row = vec![
                j.id.to_string(),
                j.kind().name().to_owned(),
                if j.node_id == 0 {
                    "-".into()
                } else {
                    j.node_id.to_string()
                },
                j.status().name().to_owned(),
                format!("{}/{}", n("done"), j.moves.len()),
            ];
            if wide {
                row.extend([
                    n("in_flight").to_string(),
                    n("queued").to_string(),
                    n("failed").to_string(),
                    local_time(ms(&j.created_at)),
                    local_time(ms(&j.planned_finish_at)),
                    local_time(ms(&j.finished_at)),
                    if j.kind() == pb::JobKind::Drain {
                        if j.failed_back { "yes" } else { "no" }.into()
                    } else {
                        "-".into()
                    },
                ]);
            }
            row.push(j.reason.clone());
            row
        })
        .collect();
    let mut headers = vec!["ID", "KIND", "NODE", "STATUS", "MOVED"];
    if wide {
        headers.extend([
            "IN_FLIGHT",
            "QUEUED",
            "FAILED",
            "CREATED",
            "PLANNED_FINISH",
            "FINISHED",
            "FAILED_BACK",
        ]);
    }
    headers.push("REASON");
    Ok(table(&headers, &rows))
}

fn render_policy(fmt: Format, p: &pb::PolicySpec) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(p);
    }
    Ok(format!(
        "balance: {} (aggressiveness {}, every {}); a moved VM stays at least {}; a move costs {} bp of load per second of migration\n",
        p.mode().name(),
        p.aggressiveness().name(),
        secs(dur_ms(&p.interval)),
        secs(dur_ms(&p.min_dwell)),
        p.migration_cost_bp_per_s.unwrap_or(0)
    ))
}

fn render_balance(fmt: Format, p: &pb::PlanBalanceResponse) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&serde_json::json!({
            "mode": p.mode().name(),
            "moves": p.moves.iter().map(move_view).collect::<Vec<_>>(),
            "spread_before_bp": p.spread_before_bp,
            "spread_after_bp": p.spread_after_bp,
            "max_util_before_bp": p.max_util_before_bp,
            "max_util_after_bp": p.max_util_after_bp,
            "empty_nodes_may_power_off": p.empty_nodes_may_power_off,
            "steps": p.steps.iter().map(|s| serde_json::json!({
                "vm": s.vm,
                "from_node_id": s.from_node,
                "to_node_id": s.to_node,
                "from_load_bp": [s.from_load_before_bp, s.from_load_after_bp],
                "to_load_bp": [s.to_load_before_bp, s.to_load_after_bp],
                "gain_bp": s.gain_bp,
                "cost_bp": s.cost_bp,
            })).collect::<Vec<_>>(),
            "stopped": p.stopped,
            "stop_code": p.stop_code().name(),
        }));
    }
    let pct = |bp: u64| format!("{:.1}%", bp as f64 / 100.0);
    let mut s = format!(
        "dry run: balance {}: {} moves; load spread {} -> {}, busiest node {} -> {}\n",
        p.mode().name(),
        p.moves.len(),
        pct(p.spread_before_bp),
        pct(p.spread_after_bp),
        pct(p.max_util_before_bp),
        pct(p.max_util_after_bp)
    );
    let start = p
        .moves
        .iter()
        .map(|m| ms(&m.planned_start_at))
        .min()
        .unwrap_or(0);
    if !p.moves.is_empty() {
        s.push_str(&render_plan(fmt, &p.moves, start));
    }
    if !p.steps.is_empty() {
        s.push_str("why (demand load: the higher of CPU and memory demand over capacity):\n");
        for st in &p.steps {
            s.push_str(&format!(
                "  {}: node {} -> node {}: node {} {} -> {}, node {} {} -> {}; gain {} > cost {}\n",
                st.vm,
                st.from_node,
                st.to_node,
                st.from_node,
                pct(st.from_load_before_bp),
                pct(st.from_load_after_bp),
                st.to_node,
                pct(st.to_load_before_bp),
                pct(st.to_load_after_bp),
                pct(st.gain_bp),
                pct(st.cost_bp)
            ));
        }
    }
    if !p.stopped.is_empty() {
        s.push_str(&format!("stopped: {}\n", p.stopped));
    }
    if !p.empty_nodes_may_power_off.is_empty() {
        let ids: Vec<String> = p
            .empty_nodes_may_power_off
            .iter()
            .map(ToString::to_string)
            .collect();
        s.push_str(&format!(
            "nodes that may be powered off: {}\n",
            ids.join(", ")
        ));
    }
    Ok(s)
}

/// Follow the newest drain of `node` (its `WatchJob` stream) and print a progress line
/// whenever it changes, until the job ends; returns the final rendering.
async fn watch(
    c: &mut DrainServiceClient<crate::client::Conn>,
    cli: &Cli,
    node: u64,
) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let started = std::time::Instant::now();
    let mut last = String::new();
    let mut bars =
        (std::io::stdout().is_terminal() && cli.output != Format::Json).then(JobBars::default);
    let r = call(
        ep,
        timeout,
        c.get_drain(pb::GetDrainRequest { node_id: node }),
    )
    .await?;
    let Some(mut j) = r.job else {
        return Err(CtlError::Render("the agent answered without a job".into()));
    };
    // The job's updates, opened after the first rendering; the stream has no deadline.
    let mut stream = None;
    loop {
        if j.status() != pb::JobStatus::Running || started.elapsed() > WATCH_MAX {
            if let Some(b) = bars.take() {
                b.clear();
            }
            let text = render_job(cli.output, &j)?;
            if let Err(e) = watch_outcome(&j) {
                // The job's rendering (with its reason) first, then a non-zero exit.
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                return Err(e);
            }
            return Ok(text);
        }
        let line = progress(&j);
        if let Some(b) = bars.as_mut() {
            b.update(&j, &line);
        } else if line != last && cli.output != Format::Json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            last = line;
        }
        let updates = match &mut stream {
            Some(s) => s,
            None => {
                let mut w = crate::client::service(ep, timeout, DrainServiceClient::new).await?;
                let s = w
                    .watch_job(pb::WatchJobRequest { id: j.id })
                    .await
                    .map_err(|s| crate::client::status_error(ep, timeout, s))?
                    .into_inner();
                stream.insert(s)
            }
        };
        // Past WATCH_MAX the loop ends with the job as last seen.
        let left = WATCH_MAX.saturating_sub(started.elapsed()) + WATCH_SLACK;
        match tokio::time::timeout(left, updates.message()).await {
            Err(_) => {}
            Ok(Err(s)) => return Err(crate::client::status_error(ep, timeout, s)),
            Ok(Ok(Some(u))) => j = u.job.unwrap_or(j),
            Ok(Ok(None)) => {
                return Err(CtlError::Unreachable {
                    endpoint: ep.to_owned(),
                    cause: "the agent ended the job stream before the job ended".into(),
                })
            }
        }
    }
}

/// `--watch` on a terminal: one bar for the job (moves finished of all) and one row per
/// move with its status, redrawn in place (indicatif fits rows to the terminal's width).
#[derive(Default)]
struct JobBars {
    multi: indicatif::MultiProgress,
    job: Option<indicatif::ProgressBar>,
    moves: std::collections::HashMap<String, indicatif::ProgressBar>,
}

impl JobBars {
    fn update(&mut self, j: &pb::JobInfo, line: &str) {
        let finished = |status: pb::MoveStatus| {
            matches!(
                status,
                pb::MoveStatus::Done
                    | pb::MoveStatus::Failed
                    | pb::MoveStatus::Dropped
                    | pb::MoveStatus::Skipped
            )
        };
        let multi = &self.multi;
        let job = self.job.get_or_insert_with(|| {
            let b = multi.add(indicatif::ProgressBar::new(0));
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} {wide_msg}")
            {
                b.set_style(style.progress_chars("#>-"));
            }
            b
        });
        job.set_length(j.moves.len() as u64);
        job.set_position(j.moves.iter().filter(|m| finished(m.status())).count() as u64);
        job.set_message(line.to_owned());
        for m in &j.moves {
            let bar = self.moves.entry(m.vm.clone()).or_insert_with(|| {
                let b = multi.add(indicatif::ProgressBar::new_spinner());
                if let Ok(style) = indicatif::ProgressStyle::with_template("  {spinner} {wide_msg}")
                {
                    b.set_style(style);
                }
                b
            });
            if bar.is_finished() {
                continue;
            }
            let mut msg = format!(
                "{}: node {} -> node {} ({}, wave {}): {}",
                m.vm,
                m.from_node_id,
                m.to_node_id,
                m.kind().name(),
                m.wave,
                m.status().name()
            );
            if !m.reason.is_empty() {
                msg.push_str(&format!(" ({})", m.reason));
            }
            if finished(m.status()) {
                bar.finish_with_message(msg);
            } else {
                bar.set_message(msg);
                bar.tick();
            }
        }
    }

    /// Remove the bars before the final rendering is printed.
    fn clear(self) {
        let _ = self.multi.clear();
    }
}

/// How a watched job that stopped running ends the command: a failed or aborted job is an
/// error (exit 5), so scripts that `--watch` a drain can tell it did not happen.
fn watch_outcome(j: &pb::JobInfo) -> Result<(), CtlError> {
    match j.status() {
        pb::JobStatus::Failed | pb::JobStatus::Aborted => Err(CtlError::Ended {
            what: format!("the {} of node {}", j.kind().name(), j.node_id),
            status: j.status().name().to_owned(),
        }),
        _ => Ok(()),
    }
}

/// `clusterctl node drain NODE [--dry-run] [--watch]`.
pub async fn drain(cli: &Cli, node: u64, dry_run: bool, follow: bool) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, DrainServiceClient::new).await?;
    let r = call(
        ep,
        timeout,
        c.drain_node(pb::DrainNodeRequest {
            node_id: node,
            dry_run,
        }),
    )
    .await?;
    let text = render_drain(cli.output, &r, node)?;
    if !follow || dry_run {
        return Ok(text);
    }
    if cli.output != Format::Json {
        print!("{text}");
    }
    watch(&mut c, cli, node).await
}

/// `clusterctl node resume NODE --failback`.
pub async fn resume(cli: &Cli, node: u64, failback: bool) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, DrainServiceClient::new).await?;
    let r = call(
        ep,
        timeout,
        c.resume_node(pb::ResumeNodeRequest {
            node_id: node,
            failback,
        }),
    )
    .await?;
    if cli.output == Format::Json {
        return json(&serde_json::json!({
            "message": r.message,
            "job": r.job.as_ref().map(job_view),
        }));
    }
    let mut s = format!("{}\n", r.message);
    if let Some(j) = &r.job {
        s.push_str(&render_job(Format::Table, j)?);
    }
    Ok(s)
}

/// `clusterctl drain ...`.
pub async fn run(cli: &Cli, cmd: &DrainCmd) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, DrainServiceClient::new).await?;
    match cmd {
        DrainCmd::Show { node_id, watch: w } => {
            if *w {
                return watch(&mut c, cli, crate::nodes::node_id(cli, node_id).await?).await;
            }
            let r = call(
                ep,
                timeout,
                c.get_drain(pb::GetDrainRequest {
                    node_id: crate::nodes::node_id(cli, node_id).await?,
                }),
            )
            .await?;
            match r.job {
                Some(j) => render_job(cli.output, &j),
                None => Err(CtlError::Render("the agent answered without a job".into())),
            }
        }
        DrainCmd::Abort { node_id } => {
            let r = call(
                ep,
                timeout,
                c.abort_drain(pb::AbortDrainRequest {
                    node_id: crate::nodes::node_id(cli, node_id).await?,
                }),
            )
            .await?;
            match r.job {
                Some(j) => render_job(cli.output, &j),
                None => Err(CtlError::Render("the agent answered without a job".into())),
            }
        }
        DrainCmd::List => {
            let jobs = crate::client::all_pages(|page_token| {
                let mut c = c.clone();
                async move {
                    let req = pb::ListJobsRequest {
                        page_size: crate::client::PAGE_SIZE,
                        page_token,
                    };
                    let r = call(ep, timeout, c.list_jobs(req)).await?;
                    Ok((r.jobs, r.next_page_token))
                }
            })
            .await?;
            render_jobs(cli.output, &jobs)
        }
    }
}

/// `clusterctl policy ...`.
pub async fn policy(cli: &Cli, cmd: &PolicyCmd) -> Result<String, CtlError> {
    let timeout = cli.timeout();
    let ep = cli.endpoint.as_str();
    let mut c = service(ep, timeout, DrainServiceClient::new).await?;
    match cmd {
        PolicyCmd::Set {
            what:
                PolicySet::Balance {
                    mode,
                    aggressiveness,
                    interval,
                    min_dwell,
                    migration_cost_bp_per_s,
                },
        } => {
            // Absent on the wire keeps the current interval: a zero one is refused here.
            let interval = match interval {
                None => None,
                Some(d) if crate::duration::ms(*d) > 0 => Some(crate::duration::pb(*d)),
                Some(d) => {
                    return Err(CtlError::Local(format!(
                        "--interval {d:?} is not a positive duration (at least 1ms)"
                    )))
                }
            };
            let r = call(
                ep,
                timeout,
                c.set_policy(pb::SetPolicyRequest {
                    policy: Some(pb::PolicySpec {
                        mode: mode_pb(*mode) as i32,
                        aggressiveness: aggr_pb(*aggressiveness) as i32,
                        interval,
                        min_dwell: min_dwell.map(crate::duration::pb),
                        migration_cost_bp_per_s: *migration_cost_bp_per_s,
                    }),
                }),
            )
            .await?;
            render_policy(cli.output, &crate::client::required(r.policy, "policy")?)
        }
        PolicyCmd::Show => {
            let r = call(ep, timeout, c.get_policy(pb::GetPolicyRequest {})).await?;
            render_policy(cli.output, &crate::client::required(r.policy, "policy")?)
        }
        PolicyCmd::Balance { dry_run: _, mode } => {
            let r = call(
                ep,
                timeout,
                c.plan_balance(pb::PlanBalanceRequest {
                    mode: mode.map_or(pb::BalanceMode::Unspecified, mode_pb) as i32,
                    aggressiveness: pb::Aggressiveness::Unspecified as i32,
                }),
            )
            .await?;
            render_balance(cli.output, &r)
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_watched_job_that_failed_or_was_aborted_exits_non_zero() {
        let job = |status: &str| pb::JobInfo {
            kind: pb::JobKind::Drain as i32,
            node_id: 3,
            status: pb::JobStatus::from_name(status).map_or(0, |s| s as i32),
            ..Default::default()
        };
        for status in ["failed", "aborted"] {
            let e = watch_outcome(&job(status)).expect_err(status);
            assert_eq!(e.exit_code(), crate::client::exit::JOB_FAILED, "{status}");
            assert_eq!(e.to_string(), format!("the drain of node 3 ended {status}"));
        }
        assert!(watch_outcome(&job("done")).is_ok());
    }
    use super::*;

    fn mv(vm: &str, wave: u32, status: &str) -> pb::MoveInfo {
        pb::MoveInfo {
            vm: vm.into(),
            from_node_id: 1,
            to_node_id: 2,
            kind: pb::MoveKind::Live as i32,
            wave,
            planned_start_at: times::timestamp_from_unix_ms(1000 + u64::from(wave) * 500),
            planned_end_at: times::timestamp_from_unix_ms(1400 + u64::from(wave) * 500),
            status: pb::MoveStatus::from_name(status).map_or(0, |s| s as i32),
            ..Default::default()
        }
    }

    #[test]
    fn balance_dry_run_explains_steps_and_stop() {
        let r = pb::PlanBalanceResponse {
            mode: pb::BalanceMode::Even as i32,
            moves: vec![mv("a", 1, "queued")],
            spread_before_bp: 10_000,
            spread_after_bp: 5_000,
            max_util_before_bp: 10_000,
            max_util_after_bp: 7_500,
            steps: vec![pb::BalanceStep {
                vm: "a".into(),
                from_node: 1,
                to_node: 2,
                from_load_before_bp: 10_000,
                from_load_after_bp: 7_500,
                to_load_before_bp: 0,
                to_load_after_bp: 2_500,
                gain_bp: 2_500,
                cost_bp: 50,
            }],
            stopped: "balanced: load spread 5.00 % is within the target 10.00 %".into(),
            stop_code: pb::BalanceStop::Balanced as i32,
            ..Default::default()
        };
        let t = render_balance(Format::Table, &r).unwrap_or_default();
        assert!(
            t.contains("a: node 1 -> node 2: node 1 100.0% -> 75.0%, node 2 0.0% -> 25.0%; gain 25.0% > cost 0.5%"),
            "{t}"
        );
        assert!(t.contains("stopped: balanced: load spread 5.00 %"), "{t}");
        let j = render_balance(Format::Json, &r).unwrap_or_default();
        assert!(j.contains("\"stop_code\": \"balanced\""), "{j}");
        assert!(j.contains("\"mode\": \"even\""), "{j}");
        assert!(j.contains("\"gain_bp\": 2500"), "{j}");
    }

    #[test]
    fn plan_and_job_render_as_tables_and_json() {
        let r = pb::DrainNodeResponse {
            job: None,
            plan: vec![mv("a", 1, "queued"), mv("b", 2, "queued")],
            planned_start_at: times::timestamp_from_unix_ms(1000),
            planned_finish_at: times::timestamp_from_unix_ms(2400),
            lower_bound: Some(times::duration_from_ms(800)),
            incoming_in_flight: vec![],
        };
        let t = render_drain(Format::Table, &r, 1).unwrap_or_default();
        assert!(t.contains("dry run: drain of node 1"), "{t}");
        assert!(t.contains("2 moves in 2 waves, ETA 1.4s"), "{t}");
        assert!(t.contains("+1.0s"), "{t}");
        let j = render_drain(Format::Json, &r, 1).unwrap_or_default();
        assert!(j.contains("\"lower_bound\": \"0.800s\""), "{j}");
        assert!(
            j.contains("\"planned_start_at\": \"1970-01-01T00:00:01Z\""),
            "{j}"
        );
        let job = pb::JobInfo {
            id: 4,
            kind: pb::JobKind::Drain as i32,
            node_id: 1,
            status: pb::JobStatus::Running as i32,
            moves: vec![mv("a", 1, "done"), mv("b", 2, "in_flight")],
            ..Default::default()
        };
        let t = render_job(Format::Table, &job).unwrap_or_default();
        assert!(
            t.contains("job 4: drain of node 1: running — 1/2 moved, 1 in flight"),
            "{t}"
        );
        let l = render_jobs(Format::Table, &[job]).unwrap_or_default();
        assert!(l.contains("1/2"), "{l}");
    }

    #[test]
    fn wide_job_tables_add_planned_times_and_counts() {
        let mut done = mv("a", 1, "done");
        done.started_at = times::timestamp_from_unix_ms(1_000);
        done.ended_at = times::timestamp_from_unix_ms(1_700);
        let job = pb::JobInfo {
            id: 4,
            kind: pb::JobKind::Drain as i32,
            node_id: 1,
            status: pb::JobStatus::Running as i32,
            moves: vec![done, mv("b", 2, "in_flight"), mv("c", 3, "queued")],
            created_at: times::timestamp_from_unix_ms(900),
            planned_finish_at: times::timestamp_from_unix_ms(2_900),
            ..Default::default()
        };
        let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();

        // `drain list`: counts per status, times, failback; REASON stays last.
        let t = render_jobs(Format::Wide, std::slice::from_ref(&job)).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            cells(lines[0]),
            [
                "ID",
                "KIND",
                "NODE",
                "STATUS",
                "MOVED",
                "IN_FLIGHT",
                "QUEUED",
                "FAILED",
                "CREATED",
                "PLANNED_FINISH",
                "FINISHED",
                "FAILED_BACK",
                "REASON"
            ],
            "{t}"
        );
        assert_eq!(
            cells(lines[1])[..8],
            ["4", "drain", "1", "running", "1/3", "1", "1", "0"],
            "{t}"
        );
        assert!(
            lines[1].contains(&local_time(2_900)) && lines[1].trim_end().ends_with("no"),
            "{t}"
        );
        let plain = render_jobs(Format::Table, std::slice::from_ref(&job)).unwrap_or_default();
        assert_eq!(
            cells(plain.lines().next().unwrap_or_default()),
            ["ID", "KIND", "NODE", "STATUS", "MOVED", "REASON"],
            "{plain}"
        );

        // `drain show`: the planned duration beside the time taken.
        let t = render_job(Format::Wide, &job).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            cells(lines[1]),
            [
                "WAVE", "VM", "FROM", "TO", "KIND", "STATUS", "PLANNED", "TOOK", "STARTED",
                "ENDED", "REASON"
            ],
            "{t}"
        );
        assert_eq!(cells(lines[2])[5..8], ["done", "0.4s", "0.7s"], "{t}");
        assert!(lines[2].contains(&local_time(1_700)), "{t}");
        assert_eq!(
            cells(lines[3])[5..9],
            ["in_flight", "0.4s", "-", "-"],
            "{t}"
        );
        let plain = render_job(Format::Table, &job).unwrap_or_default();
        assert!(!plain.contains("PLANNED"), "{plain}");

        // Plans (`node drain --dry-run`, `policy balance --dry-run`): absolute times.
        let p = render_plan(Format::Wide, &job.moves, 1_000);
        assert_eq!(
            cells(p.lines().next().unwrap_or_default())[5..],
            ["START", "ETA", "START_AT", "ETA_AT"],
            "{p}"
        );
        assert!(p.contains(&local_time(1_400)), "{p}");
        assert!(!render_plan(Format::Table, &job.moves, 1_000).contains("START_AT"));
    }
}
