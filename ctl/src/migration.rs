//! `clusterctl migration list|show|cancel` and the live progress bar of `clusterctl vm
//! migrate` (`cluster.migrations.v1.MigrationService`).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Subcommand;
use cluster_proto::migrations as pb;
use cluster_proto::migrations::migration_service_client::MigrationServiceClient;
use cluster_proto::times;
use cluster_proto::EnumName;
use serde::Serialize;

use crate::client::{call, service, status_error, CtlError};
use crate::output::{dur_ms, dur_us, json, ms, table, time_text};
use crate::{Cli, Format};

#[derive(Debug, Subcommand)]
pub enum MigrationCmd {
    /// Migrations, oldest first (running and the recent history).
    List {
        /// Only this VM's migrations.
        #[arg(long)]
        vm: Option<String>,
    },
    /// One migration in detail: options, state, statistics and the receipt digests.
    Show { id: u64 },
    /// Abort a running migration (the VM keeps running on the source) or drop a queued one.
    Cancel { id: u64 },
}

#[derive(Serialize)]
struct SummaryJson {
    rounds: u32,
    guest_bytes: u64,
    wire_bytes: u64,
    /// `"1.500s"`.
    total: Option<String>,
    blackout: Option<String>,
    max_throttle_percent: u32,
    source_digest: String,
    target_digest: Option<String>,
    receipt_matches: bool,
}

#[derive(Serialize)]
struct MigrationJson {
    id: u64,
    vm: String,
    source: u64,
    target: u64,
    kind: String,
    state: String,
    cancel_requested: bool,
    /// As asked (`null`: the engine's default), `"0.100s"`.
    max_downtime: Option<String>,
    deadline: Option<String>,
    bandwidth_bytes_per_s_max: Option<u64>,
    /// RFC 3339 (UTC).
    started_at: Option<String>,
    ended_at: Option<String>,
    reason: String,
    stats: Option<SummaryJson>,
    /// The leader's prediction at the start (`null`: none), `"0.150s"`.
    predicted_duration: Option<String>,
    predicted_blackout: Option<String>,
}

fn to_json(m: &pb::MigrationInfo) -> MigrationJson {
    MigrationJson {
        id: m.id,
        vm: m.vm.clone(),
        source: m.source_node_id,
        target: m.target_node_id,
        kind: m.kind().name().to_owned(),
        state: m.state().name().to_owned(),
        cancel_requested: m.cancel_requested,
        max_downtime: m.max_downtime.as_ref().map(times::duration_string),
        deadline: m.deadline.as_ref().map(times::duration_string),
        bandwidth_bytes_per_s_max: (m.bandwidth_bytes_per_s_max != 0)
            .then_some(m.bandwidth_bytes_per_s_max),
        started_at: time_text(&m.started_at),
        ended_at: time_text(&m.ended_at),
        reason: m.reason.clone(),
        stats: m.stats.as_ref().map(|s| SummaryJson {
            rounds: s.rounds,
            guest_bytes: s.guest_bytes,
            wire_bytes: s.wire_bytes,
            total: s.total.as_ref().map(times::duration_string),
            blackout: s.blackout.as_ref().map(times::duration_string),
            max_throttle_percent: s.max_throttle_percent,
            source_digest: format!("{:016x}", s.source_digest),
            target_digest: s
                .has_target_digest
                .then(|| format!("{:016x}", s.target_digest)),
            receipt_matches: s.receipt_matches,
        }),
        predicted_duration: m.predicted_duration.as_ref().map(times::duration_string),
        predicted_blackout: m.predicted_blackout.as_ref().map(times::duration_string),
    }
}

fn duration_ms(m: &pb::MigrationInfo) -> String {
    if m.ended_at.is_none() {
        "-".into()
    } else {
        ms(&m.ended_at)
            .saturating_sub(ms(&m.started_at))
            .to_string()
    }
}

/// An option's value in a table: `default` (0: the engine's default) or the number.
fn or_default(v: u64) -> String {
    if v == 0 {
        "default".to_string()
    } else {
        v.to_string()
    }
}

/// `--max-bandwidth` as asked: `unlimited`, MiB/s when whole, else bytes/s.
fn bandwidth(b: u64) -> String {
    match b {
        0 => "unlimited".to_string(),
        b if b % (1 << 20) == 0 => format!("{} MiB/s", b >> 20),
        b => format!("{b} B/s"),
    }
}

/// Migrations as a table; `-o wide` adds what was asked next to what happened (downtime
/// bound vs blackout, deadline vs duration, bandwidth cap) and the statistics (rounds,
/// guest and wire MiB, the highest throttle), the local start time and the reason.
fn render_list(fmt: Format, ms: &[pb::MigrationInfo]) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&ms.iter().map(to_json).collect::<Vec<_>>());
    }
    let wide = fmt == Format::Wide;
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            let mut row = vec![
                m.id.to_string(),
                m.vm.clone(),
                m.source_node_id.to_string(),
                m.target_node_id.to_string(),
                m.kind().name().to_owned(),
                m.state().name().to_owned(),
                duration_ms(m),
                m.stats
                    .as_ref()
                    .map_or("-".into(), |s| dur_us(&s.blackout).to_string()),
                m.stats.as_ref().map_or("-".into(), |s| {
                    if s.receipt_matches {
                        "match".into()
                    } else {
                        "MISMATCH".into()
                    }
                }),
            ];
            if wide {
                row.extend([
                    or_default(dur_ms(&m.max_downtime)),
                    or_default(dur_ms(&m.deadline)),
                    bandwidth(m.bandwidth_bytes_per_s_max),
                ]);
                match &m.stats {
                    Some(s) => row.extend([
                        s.rounds.to_string(),
                        format!("{:.1}", mib(s.guest_bytes)),
                        format!("{:.1}", mib(s.wire_bytes)),
                        format!("{}%", s.max_throttle_percent),
                    ]),
                    None => row.extend(["-", "-", "-", "-"].map(String::from)),
                }
                row.push(
                    m.predicted_duration
                        .as_ref()
                        .map_or("-".into(), |_| dur_ms(&m.predicted_duration).to_string()),
                );
                row.push(
                    m.predicted_blackout
                        .as_ref()
                        .map_or("-".into(), |_| dur_us(&m.predicted_blackout).to_string()),
                );
                row.push(crate::output::local_time(crate::output::ms(&m.started_at)));
                row.push(if m.reason.is_empty() {
                    "-".into()
                } else {
                    m.reason.clone()
                });
            }
            row
        })
        .collect();
    let mut headers = vec![
        "ID",
        "VM",
        "FROM",
        "TO",
        "KIND",
        "STATE",
        "DURATION_MS",
        "BLACKOUT_US",
        "RECEIPT",
    ];
    if wide {
        headers.extend([
            "MAX_DOWNTIME_MS",
            "DEADLINE_MS",
            "MAX_BANDWIDTH",
            "ROUNDS",
            "GUEST_MIB",
            "WIRE_MIB",
            "THROTTLE_MAX",
            "PREDICTED_MS",
            "PREDICTED_BLACKOUT_US",
            "STARTED",
            "REASON",
        ]);
    }
    Ok(table(&headers, &rows))
}

fn render_one(fmt: Format, m: &pb::MigrationInfo) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&to_json(m));
    }
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18} {v}\n"));
    line("id", m.id.to_string());
    line("vm", m.vm.clone());
    line("source", m.source_node_id.to_string());
    line("target", m.target_node_id.to_string());
    line("kind", m.kind().name().to_owned());
    line(
        "state",
        if m.cancel_requested && m.state() == pb::MigrationState::Running {
            "running (cancelling)".into()
        } else {
            m.state().name().to_owned()
        },
    );
    line("max_downtime_ms", or_default(dur_ms(&m.max_downtime)));
    line("deadline_ms", or_default(dur_ms(&m.deadline)));
    line("max_bandwidth", bandwidth(m.bandwidth_bytes_per_s_max));
    line(
        "started",
        time_text(&m.started_at).unwrap_or_else(|| "-".into()),
    );
    line("duration_ms", duration_ms(m));
    if m.predicted_duration.is_some() {
        line("predicted_ms", dur_ms(&m.predicted_duration).to_string());
    }
    if m.predicted_blackout.is_some() {
        line(
            "predicted_blackout_us",
            dur_us(&m.predicted_blackout).to_string(),
        );
    }
    if !m.reason.is_empty() {
        line("reason", m.reason.clone());
    }
    if let Some(s) = &m.stats {
        line("rounds", s.rounds.to_string());
        line("guest_bytes", s.guest_bytes.to_string());
        line("wire_bytes", s.wire_bytes.to_string());
        line("total_us", dur_us(&s.total).to_string());
        line("blackout_us", dur_us(&s.blackout).to_string());
        line("max_throttle_pct", s.max_throttle_percent.to_string());
        line("source_digest", format!("{:016x}", s.source_digest));
        line(
            "target_digest",
            if s.has_target_digest {
                format!("{:016x}", s.target_digest)
            } else {
                "-".into()
            },
        );
        line(
            "receipt",
            if s.receipt_matches {
                "matches".into()
            } else {
                "MISMATCH".into()
            },
        );
    }
    Ok(out)
}

pub async fn run(cli: &Cli, cmd: &MigrationCmd) -> Result<String, CtlError> {
    let ep = cli.endpoint.as_str();
    let timeout = cli.timeout();
    let mut c = service(ep, timeout, MigrationServiceClient::new).await?;
    match cmd {
        MigrationCmd::List { vm } => {
            let migrations = all_migrations(&c, ep, timeout, vm.as_deref().unwrap_or("")).await?;
            render_list(cli.output, &migrations)
        }
        MigrationCmd::Show { id } => {
            let r = call(
                ep,
                timeout,
                c.get_migration(pb::GetMigrationRequest { id: *id }),
            )
            .await?;
            render_one(cli.output, &r.migration.unwrap_or_default())
        }
        MigrationCmd::Cancel { id } => {
            let r = call(
                ep,
                timeout,
                c.cancel_migration(pb::CancelMigrationRequest { id: *id }),
            )
            .await?;
            render_one(cli.output, &r.migration.unwrap_or_default())
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// One progress line: bar, bytes left, rate, ETA, round, phase.
pub fn progress_line(p: &pb::WatchMigrationResponse) -> String {
    const WIDTH: usize = 30;
    let done = ((p.fraction_done.clamp(0.0, 1.0)) * WIDTH as f64).round() as usize;
    format!(
        "[{}{}] {:5.1}% | left {:8.1} MiB | {:8.1} MiB/s | ETA {:6} ms | round {:3} | throttle {:3}% | {}",
        "#".repeat(done),
        "-".repeat(WIDTH - done),
        p.fraction_done * 100.0,
        mib(p.bytes_remaining),
        p.rate_bytes_per_s / (1024.0 * 1024.0),
        dur_ms(&p.eta),
        p.round,
        p.throttle_percent,
        p.phase().name()
    )
}

/// The final line: state, blackout, rounds, receipt.
pub fn final_line(m: &pb::MigrationInfo) -> String {
    match &m.stats {
        Some(s) => format!(
            "migration {} {}: {} rounds, {:.1} MiB on the wire, blackout {} us, receipt {}",
            m.id,
            m.state().name(),
            s.rounds,
            mib(s.wire_bytes),
            dur_us(&s.blackout),
            if s.receipt_matches {
                "matches"
            } else {
                "MISMATCH"
            }
        ),
        None => format!("migration {} {}: {}", m.id, m.state().name(), m.reason),
    }
}

/// Wait while migration `id` of `vm` is queued (a migration slot is busy); returns its
/// target once it runs, or why it left the queue without running.
pub async fn wait_queued(
    ep: &str,
    timeout: Duration,
    id: u64,
    vm: &str,
    wait_max: Duration,
) -> Result<u64, CtlError> {
    let mut c = service(ep, timeout, MigrationServiceClient::new).await?;
    let fail = |s| status_error(ep, timeout, s);
    eprintln!(
        "migration {id} of VM {vm} queued: a migration slot is busy; waiting \
         (`clusterctl migration cancel {id}` drops it)"
    );
    let deadline = std::time::Instant::now() + wait_max;
    loop {
        let m = c
            .get_migration(pb::GetMigrationRequest { id })
            .await
            .map_err(fail)?
            .into_inner()
            .migration
            .unwrap_or_default();
        match m.state() {
            pb::MigrationState::Queued => {}
            pb::MigrationState::Failed | pb::MigrationState::Cancelled => {
                return Err(CtlError::Ended {
                    what: format!("migration {id} of VM {vm}"),
                    status: format!("{}: {}", m.state().name(), m.reason),
                })
            }
            _ => return Ok(m.target_node_id),
        }
        if std::time::Instant::now() > deadline {
            return Err(CtlError::Timeout {
                endpoint: ep.to_owned(),
                timeout_s: wait_max.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every migration record (of `vm`, unless empty), following the pages.
async fn all_migrations(
    c: &MigrationServiceClient<crate::client::Conn>,
    ep: &str,
    timeout: Duration,
    vm: &str,
) -> Result<Vec<pb::MigrationInfo>, CtlError> {
    crate::client::all_pages(|page_token| {
        let mut c = c.clone();
        async move {
            let req = pb::ListMigrationsRequest {
                vm: vm.to_owned(),
                page_size: crate::client::PAGE_SIZE,
                page_token,
            };
            let r = call(ep, timeout, c.list_migrations(req)).await?;
            Ok((r.migrations, r.next_page_token))
        }
    })
    .await
}

/// Draw the progress of `vm`'s newest migration on stderr until it ends (a bar redrawn in
/// place on a terminal, one line per update otherwise), or only its final line when it
/// ended already (a short migration can end before this looks). Best effort: a lost
/// stream ends the drawing, the caller still waits for the VM's record.
pub async fn follow_progress(ep: &str, timeout: Duration, vm: &str) -> Result<(), CtlError> {
    let mut c = service(ep, timeout, MigrationServiceClient::new).await?;
    let fail = |s| status_error(ep, timeout, s);
    let migrations = all_migrations(&c, ep, timeout, vm).await?;
    let Some(m) = migrations.iter().max_by_key(|m| m.id) else {
        return Ok(());
    };
    match m.state() {
        pb::MigrationState::Running => {}
        pb::MigrationState::Succeeded
        | pb::MigrationState::Failed
        | pb::MigrationState::Cancelled => {
            eprintln!("{}", final_line(m));
            return Ok(());
        }
        _ => return Ok(()),
    }
    let mut stream = c
        .watch_migration(pb::WatchMigrationRequest { id: m.id })
        .await
        .map_err(fail)?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "migration {}: VM {} node {} -> node {}",
        m.id, m.vm, m.source_node_id, m.target_node_id
    );
    if tty {
        drop(err);
        return draw_bar(&mut stream).await;
    }
    while let Ok(Some(p)) = stream.message().await {
        if let Some(done) = &p.finished {
            let _ = writeln!(err, "{}", final_line(done));
            break;
        }
        let _ = writeln!(err, "{}", progress_line(&p));
        let _ = err.flush();
    }
    Ok(())
}

/// Steps of the terminal bar (per mille of the migration done).
const BAR_STEPS: u64 = 1000;

/// The progress of `stream` as an indicatif bar on a terminal: fitted to the terminal's
/// width (a narrow one gets a shorter line, never a wrapped one that leaves stale rows),
/// replaced by the final line when the migration ends.
async fn draw_bar(
    stream: &mut tonic::Streaming<pb::WatchMigrationResponse>,
) -> Result<(), CtlError> {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(BAR_STEPS),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("[{bar:30}] {percent:>3}% {wide_msg}")
            .map_err(|e| CtlError::Render(e.to_string()))?
            .progress_chars("#>-"),
    );
    while let Ok(Some(p)) = stream.message().await {
        if let Some(done) = &p.finished {
            bar.finish_and_clear();
            eprintln!("{}", final_line(done));
            return Ok(());
        }
        bar.set_position((p.fraction_done.clamp(0.0, 1.0) * BAR_STEPS as f64).round() as u64);
        bar.set_message(format!(
            "left {:.1} MiB | {:.1} MiB/s | ETA {} | round {} | throttle {}% | {}",
            mib(p.bytes_remaining),
            p.rate_bytes_per_s / (1024.0 * 1024.0),
            humantime::format_duration(Duration::from_millis(dur_ms(&p.eta))),
            p.round,
            p.throttle_percent,
            p.phase().name()
        ));
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(id: u64, stats: Option<pb::MigrationSummary>) -> pb::MigrationInfo {
        pb::MigrationInfo {
            id,
            vm: "web1".into(),
            source_node_id: 1,
            target_node_id: 2,
            kind: pb::MigrationKind::Live as i32,
            state: if stats.is_some() {
                pb::MigrationState::Succeeded
            } else {
                pb::MigrationState::Running
            } as i32,
            max_downtime: Some(times::duration_from_ms(100)),
            bandwidth_bytes_per_s_max: 200 << 20,
            started_at: times::timestamp_from_unix_ms(1_767_323_045_678),
            ended_at: if stats.is_some() {
                times::timestamp_from_unix_ms(1_767_323_047_678)
            } else {
                None
            },
            stats,
            ..Default::default()
        }
    }

    #[test]
    fn wide_list_shows_asked_bounds_and_statistics() {
        let done = migration(
            7,
            Some(pb::MigrationSummary {
                rounds: 4,
                guest_bytes: 128 << 20,
                wire_bytes: 96 << 20,
                blackout: Some(times::duration_from_us(8_500)),
                max_throttle_percent: 20,
                receipt_matches: true,
                ..Default::default()
            }),
        );
        let done = pb::MigrationInfo {
            predicted_duration: Some(times::duration_from_ms(1_800)),
            predicted_blackout: Some(times::duration_from_us(9_000)),
            ..done
        };
        let ms = [done, migration(8, None)];
        let t = render_list(Format::Wide, &ms).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        let cells = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[0])[8..],
            [
                "RECEIPT",
                "MAX_DOWNTIME_MS",
                "DEADLINE_MS",
                "MAX_BANDWIDTH",
                "ROUNDS",
                "GUEST_MIB",
                "WIRE_MIB",
                "THROTTLE_MAX",
                "PREDICTED_MS",
                "PREDICTED_BLACKOUT_US",
                "STARTED",
                "REASON"
            ],
            "{t}"
        );
        assert_eq!(
            cells(lines[1])[6..19],
            [
                "2000", "8500", "match", "100", "default", "200", "MiB/s", "4", "128.0", "96.0",
                "20%", "1800", "9000"
            ],
            "{t}"
        );
        assert!(
            lines[1].contains(&crate::output::local_time(1_767_323_045_678)),
            "{t}"
        );
        // Running: no statistics yet.
        assert_eq!(
            cells(lines[2])[6..17],
            ["-", "-", "-", "100", "default", "200", "MiB/s", "-", "-", "-", "-"],
            "{t}"
        );
        // The default table keeps its columns.
        let plain = render_list(Format::Table, &ms).unwrap_or_default();
        assert!(
            plain.lines().next().is_some_and(|h| h.ends_with("RECEIPT")),
            "{plain}"
        );
        assert!(!plain.contains("ROUNDS"), "{plain}");
        // JSON: RFC 3339 times and protobuf-JSON durations.
        let j: serde_json::Value =
            serde_json::from_str(&render_list(Format::Json, &ms).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(j[0]["started_at"], "2026-01-02T03:04:05.678Z", "{j}");
        assert_eq!(j[0]["max_downtime"], "0.100s", "{j}");
        assert_eq!(j[0]["stats"]["blackout"], "0.008500s", "{j}");
        assert!(j[1]["ended_at"].is_null(), "{j}");
    }
}
