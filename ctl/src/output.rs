//! Rendering: human tables by default, JSON with `-o json`.

use cluster_proto::management as pb;
use cluster_proto::times;
use cluster_proto::EnumName;
use serde::Serialize;

use crate::client::CtlError;
use crate::Format;

/// `v` as pretty JSON with a final newline (`-o json`).
pub fn json<T: Serialize>(v: &T) -> Result<String, CtlError> {
    serde_json::to_string_pretty(v)
        .map(|s| s + "\n")
        .map_err(|e| CtlError::Render(e.to_string()))
}

/// A plain text table with left-aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

#[derive(Serialize)]
struct Facts {
    cpu_vendor: String,
    cpu_model: String,
    logical_cpus: u32,
    memory_bytes: u64,
    kvm_kind: String,
}

#[derive(Serialize)]
struct Node {
    node_id: u64,
    name: String,
    state: String,
    raft_role: String,
    mgmt_addr: String,
    raft_addr: String,
    migration_addr: String,
    mgmt_subnet: String,
    migration_subnet: String,
    /// The last state change, RFC 3339 (UTC).
    state_since: Option<String>,
    #[serde(skip)]
    state_since_ms: u64,
    facts: Facts,
    /// VM networks: name → host bridge.
    networks: std::collections::BTreeMap<String, String>,
    /// "tls" or "insecure_plaintext".
    migration_transport: String,
    /// "tls" or "insecure_plaintext": the peer (Raft) plane.
    raft_transport: String,
    /// SHA-256 of the CA that issued its node certificate ("": not reported).
    cert_ca_fingerprint: String,
    /// When the node's certificate expires, RFC 3339 (`null`: not reported).
    cert_expires_at: Option<String>,
    /// Σ measured demand of its VMs; `null`: no fresh report.
    demand: Option<NodeDemand>,
    /// Why it is in its state.
    state_reason: String,
    /// Standby asked for, the node being drained first (its reason); `null`: none.
    standby_requested: Option<String>,
    /// It registered power-off and power-on commands (it can be put in standby).
    power_control: bool,
}

#[derive(Serialize)]
struct NodeDemand {
    cpu_demand_millicores: u64,
    cpu_run_millicores: u64,
    memory_touched_mib: u64,
    vms: u32,
    /// CPU demand over the node's logical CPUs, percent.
    cpu_demand_percent: f64,
    /// Touched memory over the node's memory, percent.
    memory_touched_percent: f64,
}

fn node_view(n: &pb::NodeInfo) -> Node {
    let f = n.facts.clone().unwrap_or_default();
    Node {
        node_id: n.node_id,
        name: n.name.clone(),
        state: n.state().name().to_owned(),
        raft_role: n.raft_role().name().to_owned(),
        mgmt_addr: n.mgmt_addr.clone(),
        raft_addr: n.raft_addr.clone(),
        migration_addr: n.migration_addr.clone(),
        mgmt_subnet: n.mgmt_subnet.clone(),
        migration_subnet: n.migration_subnet.clone(),
        state_since: n.state_since.as_ref().map(times::rfc3339),
        state_since_ms: ms(&n.state_since),
        facts: Facts {
            kvm_kind: f.kvm_kind().name().to_owned(),
            cpu_vendor: f.cpu_vendor,
            cpu_model: f.cpu_model,
            logical_cpus: f.logical_cpus,
            memory_bytes: f.memory_bytes,
        },
        networks: n
            .networks
            .iter()
            .map(|v| (v.name.clone(), v.bridge.clone()))
            .collect(),
        migration_transport: n.migration_transport().name().to_owned(),
        raft_transport: if n.raft_plaintext {
            "insecure_plaintext".into()
        } else {
            "tls".into()
        },
        cert_ca_fingerprint: n.cert_ca_fingerprint.clone(),
        cert_expires_at: n.cert_expires_at.as_ref().map(times::rfc3339),
        state_reason: n.state_reason.clone(),
        standby_requested: (!n.standby_requested.is_empty()).then(|| n.standby_requested.clone()),
        power_control: n.power_control,
        demand: n.demand.as_ref().map(|d| NodeDemand {
            cpu_demand_millicores: d.cpu_demand_millicores,
            cpu_run_millicores: d.cpu_run_millicores,
            memory_touched_mib: d.memory_touched_mib,
            vms: d.vms,
            cpu_demand_percent: percent(d.cpu_demand_millicores, u64::from(f.logical_cpus) * 1000),
            memory_touched_percent: percent(d.memory_touched_mib, f.memory_bytes >> 20),
        }),
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 1000.0 / whole as f64).round() / 10.0
    }
}

fn demand_cells(d: Option<&NodeDemand>) -> [String; 2] {
    match d {
        Some(d) => [
            format!(
                "{} ({:.1}%)",
                crate::vm::cpus(d.cpu_demand_millicores),
                d.cpu_demand_percent
            ),
            format!(
                "{} MiB ({:.1}%)",
                d.memory_touched_mib, d.memory_touched_percent
            ),
        ],
        None => ["-".into(), "-".into()],
    }
}

/// The state column: the state, and a pending standby.
fn state_cell(n: &Node) -> String {
    match &n.standby_requested {
        Some(_) => format!("{} (standby requested)", n.state),
        None => n.state.clone(),
    }
}

/// How long ago `unix_ms` was, roughly (`-` when unknown).
fn ago(unix_ms: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if unix_ms == 0 || now < unix_ms {
        return "-".into();
    }
    let s = (now - unix_ms) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

pub fn nodes(fmt: Format, nodes: &[pb::NodeInfo]) -> Result<String, CtlError> {
    let views: Vec<Node> = nodes.iter().map(node_view).collect();
    if fmt == Format::Json {
        return json(&views);
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|n| {
            let mut row = vec![
                n.node_id.to_string(),
                n.name.clone(),
                state_cell(n),
                ago(n.state_since_ms),
                n.raft_role.clone(),
                n.mgmt_addr.clone(),
                n.migration_addr.clone(),
                n.facts.cpu_vendor.clone(),
                n.facts.logical_cpus.to_string(),
                gib(n.facts.memory_bytes),
                n.facts.kvm_kind.clone(),
            ];
            if fmt == Format::Wide {
                row.extend(demand_cells(n.demand.as_ref()));
                row.push(n.state_reason.clone());
            }
            row
        })
        .collect();
    let mut headers = vec![
        "ID",
        "NAME",
        "STATE",
        "SINCE",
        "ROLE",
        "MGMT",
        "MIGRATION",
        "CPU",
        "CPUS",
        "MEMORY",
        "KVM",
    ];
    if fmt == Format::Wide {
        headers.extend(["CPU_DEMAND", "MEM_TOUCHED", "REASON"]);
    }
    Ok(table(&headers, &rows))
}

pub fn node(fmt: Format, n: &pb::NodeInfo) -> Result<String, CtlError> {
    let v = node_view(n);
    if fmt == Format::Json {
        return json(&v);
    }
    let [cpu_demand, mem_touched] = demand_cells(v.demand.as_ref());
    let state = state_cell(&v);
    let rows = vec![
        vec!["id".into(), v.node_id.to_string()],
        vec!["name".into(), v.name],
        vec!["state".into(), state],
        vec!["state reason".into(), v.state_reason.clone()],
        vec![
            "standby requested".into(),
            v.standby_requested.clone().unwrap_or_else(|| "-".into()),
        ],
        vec![
            "power control".into(),
            if v.power_control {
                "power-off and power-on commands registered".into()
            } else {
                "none (never put in standby)".into()
            },
        ],
        vec!["raft role".into(), v.raft_role],
        vec![
            "state since".into(),
            match &v.state_since {
                Some(t) => format!("{t} ({} ago)", ago(ms(&n.state_since))),
                None => "-".into(),
            },
        ],
        vec![
            "management".into(),
            format!("{} ({})", v.mgmt_addr, v.mgmt_subnet),
        ],
        vec![
            "migration".into(),
            format!("{} ({})", v.migration_addr, v.migration_subnet),
        ],
        vec!["raft".into(), v.raft_addr],
        vec![
            "peer plane".into(),
            if v.raft_transport == "insecure_plaintext" {
                "PLAINTEXT, callers known by address only (raft_insecure_plaintext)".into()
            } else {
                "tls (mutual, node certificates)".into()
            },
        ],
        vec![
            "migration plane".into(),
            match v.migration_transport.as_str() {
                "insecure_plaintext" => {
                    "PLAINTEXT, unauthenticated (migration_insecure_plaintext)".into()
                }
                "" => "-".into(),
                t => format!("{t} (mutual, node certificates)"),
            },
        ],
        vec![
            "certificate CA".into(),
            if v.cert_ca_fingerprint.is_empty() {
                "-".into()
            } else {
                v.cert_ca_fingerprint.clone()
            },
        ],
        vec![
            "certificate expires".into(),
            match &n.cert_expires_at {
                None => "-".into(),
                Some(t) => cluster_proto::pki::utc(times::unix_ms(Some(t))),
            },
        ],
        vec!["cpu vendor".into(), v.facts.cpu_vendor],
        vec!["cpu model".into(), v.facts.cpu_model],
        vec!["logical cpus".into(), v.facts.logical_cpus.to_string()],
        vec!["memory".into(), gib(v.facts.memory_bytes)],
        vec!["kvm".into(), v.facts.kvm_kind],
        vec!["cpu demand (vCPUs)".into(), cpu_demand],
        vec!["memory touched".into(), mem_touched],
        vec![
            "networks".into(),
            if v.networks.is_empty() {
                "-".into()
            } else {
                v.networks
                    .iter()
                    .map(|(name, bridge)| format!("{name} (bridge {bridge})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ],
    ];
    Ok(table(&["FIELD", "VALUE"], &rows))
}

#[derive(Serialize)]
struct Status {
    cluster_id: String,
    cluster_name: String,
    initialized: bool,
    this_node_id: u64,
    raft_state: String,
    leader_id: Option<u64>,
    leader_mgmt_addr: String,
    term: u64,
    voter_ids: Vec<u64>,
    learner_ids: Vec<u64>,
    last_log_index: u64,
    last_applied_index: u64,
    snapshot_index: u64,
    ca_fingerprint: String,
    previous_ca_fingerprint: Option<String>,
}

pub fn status(fmt: Format, r: &pb::ClusterStatusResponse) -> Result<String, CtlError> {
    let s = Status {
        cluster_id: r.cluster_id.clone(),
        cluster_name: r.cluster_name.clone(),
        initialized: r.initialized,
        this_node_id: r.this_node_id,
        raft_state: r.raft_state().name().to_owned(),
        leader_id: (r.leader_id != 0).then_some(r.leader_id),
        leader_mgmt_addr: r.leader_mgmt_addr.clone(),
        term: r.term,
        voter_ids: r.voter_ids.clone(),
        learner_ids: r.learner_ids.clone(),
        last_log_index: r.last_log_index,
        last_applied_index: r.last_applied_index,
        snapshot_index: r.snapshot_index,
        ca_fingerprint: r.ca_fingerprint.clone(),
        previous_ca_fingerprint: (!r.previous_ca_fingerprint.is_empty())
            .then(|| r.previous_ca_fingerprint.clone()),
    };
    if fmt == Format::Json {
        return json(&s);
    }
    let ids = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let rows = vec![
        vec![
            "cluster".into(),
            if s.initialized {
                format!("{} ({})", s.cluster_name, s.cluster_id)
            } else {
                "not initialized (run `clusterctl cluster init` or `cluster join`)".into()
            },
        ],
        vec![
            "this node".into(),
            format!("{} ({})", s.this_node_id, s.raft_state),
        ],
        vec![
            "leader".into(),
            match s.leader_id {
                Some(l) => format!("{l} at {}", s.leader_mgmt_addr),
                None => "none".into(),
            },
        ],
        vec!["term".into(), s.term.to_string()],
        vec![
            "voters".into(),
            format!("{} [{}]", s.voter_ids.len(), ids(&s.voter_ids)),
        ],
        vec![
            "learners".into(),
            format!("{} [{}]", s.learner_ids.len(), ids(&s.learner_ids)),
        ],
        vec![
            "log".into(),
            format!(
                "last {} applied {} snapshot {}",
                s.last_log_index, s.last_applied_index, s.snapshot_index
            ),
        ],
        vec!["ca".into(), s.ca_fingerprint.clone()],
    ];
    let mut rows = rows;
    if let Some(p) = &s.previous_ca_fingerprint {
        rows.push(vec![
            "old ca".into(),
            format!("{p} (rotation in progress: `clusterctl cluster ca show`)"),
        ]);
    }
    Ok(table(&["FIELD", "VALUE"], &rows))
}

/// Milliseconds since the Unix epoch of an API time (0: absent).
pub fn ms(t: &Option<times::Timestamp>) -> u64 {
    times::unix_ms(t.as_ref())
}

/// Milliseconds of an API duration (0: absent or unusable).
pub fn dur_ms(d: &Option<times::Duration>) -> u64 {
    d.as_ref()
        .and_then(|d| times::duration_ms(d).ok())
        .unwrap_or(0)
}

/// Microseconds of an API duration (0: absent or unusable).
pub fn dur_us(d: &Option<times::Duration>) -> u64 {
    d.as_ref()
        .and_then(|d| times::duration_us(d).ok())
        .unwrap_or(0)
}

/// An API time as JSON and YAML show it: RFC 3339 in UTC (`None`: absent).
pub fn time_text(t: &Option<times::Timestamp>) -> Option<String> {
    t.as_ref().map(times::rfc3339)
}

/// `at_unix_ms` as RFC 3339 in UTC with milliseconds ("" when unknown: 0).
pub fn rfc3339(at_unix_ms: u64) -> String {
    i64::try_from(at_unix_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(String::new, |t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })
}

/// `at_unix_ms` in the local time zone, to the second ("-" when unknown: 0).
pub fn local_time(at_unix_ms: u64) -> String {
    i64::try_from(at_unix_ms)
        .ok()
        .filter(|ms| *ms > 0)
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(
            || "-".to_string(),
            |t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M:%S")
                    .to_string()
            },
        )
}

/// How long before `now_unix_ms` `at_unix_ms` was, the way `kubectl` shows ages: `42s`,
/// `5m12s`, `3h4m`, `6d2h` ("-" when unknown; "0s" for a clock slightly ahead).
pub fn age(at_unix_ms: u64, now_unix_ms: u64) -> String {
    if at_unix_ms == 0 {
        return "-".into();
    }
    let s = now_unix_ms.saturating_sub(at_unix_ms) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3_599 => format!("{}m{}s", s / 60, s % 60),
        3_600..=86_399 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// Now, in ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An event as `-o json|yaml` shows it: `at` in RFC 3339 (UTC).
#[derive(Serialize)]
pub struct Event {
    seq: u64,
    at: String,
    kind: String,
    node_id: u64,
    message: String,
}

impl From<&pb::Event> for Event {
    fn from(e: &pb::Event) -> Event {
        Event {
            seq: e.seq,
            at: rfc3339(ms(&e.at)),
            kind: e.kind().name().to_owned(),
            node_id: e.node_id,
            message: e.message.clone(),
        }
    }
}

/// Column headers of the events table (`events`, and `events -f` with fixed widths);
/// `-o wide` adds `AT_UTC` (the exact time, RFC 3339 in UTC with milliseconds) before
/// the message.
const EVENT_HEADERS: [&str; 6] = ["SEQ", "TIME", "AGE", "KIND", "NODE", "MESSAGE"];
const EVENT_HEADERS_WIDE: [&str; 7] = ["SEQ", "TIME", "AGE", "KIND", "NODE", "AT_UTC", "MESSAGE"];

fn event_row(fmt: Format, e: &pb::Event, now_unix_ms: u64) -> Vec<String> {
    let mut row = vec![
        e.seq.to_string(),
        local_time(ms(&e.at)),
        age(ms(&e.at), now_unix_ms),
        e.kind().name().to_owned(),
        e.node_id.to_string(),
    ];
    if fmt == Format::Wide {
        row.push(match rfc3339(ms(&e.at)) {
            t if t.is_empty() => "-".into(),
            t => t,
        });
    }
    row.push(e.message.clone());
    row
}

/// Events, oldest first: a table with local times and ages (as of `now_unix_ms`), or a
/// JSON array.
pub fn events(fmt: Format, evs: &[pb::Event], now_unix_ms: u64) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&evs.iter().map(Event::from).collect::<Vec<_>>());
    }
    let rows: Vec<Vec<String>> = evs.iter().map(|e| event_row(fmt, e, now_unix_ms)).collect();
    if fmt == Format::Wide {
        return Ok(table(&EVENT_HEADERS_WIDE, &rows));
    }
    Ok(table(&EVENT_HEADERS, &rows))
}

/// Lines of `events -f`: one per event as it arrives (with fixed column widths, since
/// later rows are not known yet), or one compact JSON object per line (JSON Lines).
/// `header` prints the table's header first.
pub fn event_lines(fmt: Format, evs: &[pb::Event], header: bool) -> Result<String, CtlError> {
    let mut out = String::new();
    if fmt == Format::Json {
        for e in evs {
            let line = serde_json::to_string(&Event::from(e))
                .map_err(|e| CtlError::Render(e.to_string()))?;
            out.push_str(&line);
            out.push('\n');
        }
        return Ok(out);
    }
    let line = |c: &[String]| {
        let head = format!(
            "{:>6}  {:<19}  {:<6}  {:<24}  {:>4}",
            c[0], c[1], c[2], c[3], c[4]
        );
        match c {
            [.., at, message] if c.len() == EVENT_HEADERS_WIDE.len() => {
                format!("{head}  {at:<24}  {message}\n")
            }
            [.., message] => format!("{head}  {message}\n"),
            [] => String::new(),
        }
    };
    if header {
        if fmt == Format::Wide {
            out.push_str(&line(&EVENT_HEADERS_WIDE.map(String::from)));
        } else {
            out.push_str(&line(&EVENT_HEADERS.map(String::from)));
        }
    }
    let now = now_unix_ms();
    for e in evs {
        out.push_str(&line(&event_row(fmt, e, now)));
    }
    Ok(out)
}

#[derive(Serialize)]
struct Init<'a> {
    cluster_id: &'a str,
    leader_id: u64,
}

pub fn init(fmt: Format, r: &pb::InitClusterResponse) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&Init {
            cluster_id: &r.cluster_id,
            leader_id: r.leader_id,
        });
    }
    Ok(format!(
        "cluster {} initialized; node {} leads\n",
        r.cluster_id, r.leader_id
    ))
}

#[derive(Serialize)]
struct Join<'a> {
    cluster_id: &'a str,
    leader_id: u64,
    voter_count: u64,
}

pub fn join(fmt: Format, r: &pb::JoinClusterResponse) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&Join {
            cluster_id: &r.cluster_id,
            leader_id: r.leader_id,
            voter_count: r.voter_count,
        });
    }
    Ok(format!(
        "joined cluster {}; {} voters, leader {}\n",
        r.cluster_id, r.voter_count, r.leader_id
    ))
}

#[derive(Serialize)]
struct Leave {
    node_id: u64,
    voter_count: u64,
}

pub fn leave(fmt: Format, node_id: u64, r: &pb::LeaveClusterResponse) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&Leave {
            node_id,
            voter_count: r.voter_count,
        });
    }
    Ok(format!(
        "node {node_id} removed; {} voters remain\n",
        r.voter_count
    ))
}

#[derive(Serialize)]
struct Put<'a> {
    log_index: u64,
    previous: Option<&'a str>,
}

pub fn put(fmt: Format, r: &pb::PutKvResponse) -> Result<String, CtlError> {
    let p = Put {
        log_index: r.log_index,
        previous: r.had_previous.then_some(r.previous.as_str()),
    };
    if fmt == Format::Json {
        return json(&p);
    }
    Ok(format!("committed at log index {}\n", r.log_index))
}

#[derive(Serialize)]
struct Get<'a> {
    key: &'a str,
    value: &'a str,
}

pub fn get(fmt: Format, key: &str, r: &pb::GetKvResponse) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&Get {
            key,
            value: &r.value,
        });
    }
    Ok(format!("{}\n", r.value))
}

#[cfg(test)]
mod tests {

    #[test]
    fn event_times_are_rfc3339_in_json_and_ages_in_tables() {
        assert_eq!(rfc3339(1_767_323_045_678), "2026-01-02T03:04:05.678Z");
        assert_eq!(rfc3339(0), "");
        assert_eq!(age(0, 5_000), "-");
        assert_eq!(age(1_000, 43_999), "42s");
        assert_eq!(age(1, 1 + 312_000), "5m12s");
        assert_eq!(age(1, 1 + 11_040_000), "3h4m");
        assert_eq!(age(1, 1 + 525_600_000), "6d2h");
        assert_eq!(age(10_000, 9_000), "0s", "a clock slightly behind");
        let ev = pb::Event {
            seq: 7,
            at: times::timestamp_from_unix_ms(1_767_323_045_678),
            kind: pb::EventKind::NodeJoined as i32,
            node_id: 2,
            message: "node 2 joined".into(),
        };
        let t =
            events(Format::Table, std::slice::from_ref(&ev), 1_767_323_047_678).unwrap_or_default();
        let mut lines = t.lines();
        let header = lines.next().unwrap_or_default();
        assert!(
            header.starts_with("SEQ") && header.contains("TIME") && header.contains("AGE"),
            "{t}"
        );
        let row = lines.next().unwrap_or_default();
        assert!(
            row.contains(" 2s ")
                && row.contains("node_joined")
                && row.contains(&local_time(ms(&ev.at))),
            "{t}"
        );
        let j: serde_json::Value = serde_json::from_str(
            &events(Format::Json, std::slice::from_ref(&ev), 0).unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(j[0]["at"], "2026-01-02T03:04:05.678Z", "{j}");
        assert_eq!(j[0]["seq"], 7, "{j}");
        let l = event_lines(Format::Json, &[ev.clone(), ev], false).unwrap_or_default();
        assert_eq!(l.lines().count(), 2, "JSON Lines: {l}");
        assert!(
            l.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
            "{l}"
        );
    }
    use super::*;

    #[test]
    fn wide_events_and_revocations_add_exact_times_and_whole_digests() {
        let ev = pb::Event {
            seq: 7,
            at: times::timestamp_from_unix_ms(1_767_323_045_678),
            kind: pb::EventKind::NodeJoined as i32,
            node_id: 2,
            message: "node 2 joined".into(),
        };
        let t =
            events(Format::Wide, std::slice::from_ref(&ev), 1_767_323_047_678).unwrap_or_default();
        let mut lines = t.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(header, EVENT_HEADERS_WIDE, "{t}");
        let row = lines.next().unwrap_or_default();
        assert!(
            row.ends_with("2026-01-02T03:04:05.678Z  node 2 joined"),
            "{t}"
        );
        let plain = events(Format::Table, std::slice::from_ref(&ev), 0).unwrap_or_default();
        assert!(
            !plain.contains("AT_UTC") && !plain.contains(".678Z"),
            "{plain}"
        );
        // `events -f -o wide`: the same column in the fixed-width lines.
        let l = event_lines(Format::Wide, std::slice::from_ref(&ev), true).unwrap_or_default();
        let l: Vec<&str> = l.lines().collect();
        assert!(
            l[0].contains("AT_UTC") && l[0].ends_with("MESSAGE"),
            "{l:?}"
        );
        assert!(
            l[1].ends_with("2026-01-02T03:04:05.678Z  node 2 joined"),
            "{l:?}"
        );
        let l = event_lines(Format::Table, &[ev], true).unwrap_or_default();
        assert!(!l.contains("AT_UTC") && !l.contains(".678Z"), "{l}");

        let digest = "ab".repeat(32);
        let rev = pb::Revocation {
            user_name: "alice".into(),
            role: pb::UserRole::Admin as i32,
            cert_sha256: digest.clone(),
            revoked_at: times::timestamp_from_unix_ms(1_767_323_045_678),
            by: "root".into(),
            expires_at: times::timestamp_from_unix_ms(1_798_859_045_678),
        };
        let j: serde_json::Value = serde_json::from_str(
            &revocations(Format::Json, std::slice::from_ref(&rev)).unwrap_or_default(),
        )
        .unwrap_or_default();
        assert_eq!(j[0]["revoked_at"], "2026-01-02T03:04:05.678Z", "{j}");
        assert_eq!(j[0]["role"], "admin", "{j}");
        let t = revocations(Format::Wide, std::slice::from_ref(&rev)).unwrap_or_default();
        assert!(
            t.lines()
                .next()
                .is_some_and(|h| h.contains("ROLE") && h.ends_with("EXPIRES")),
            "{t}"
        );
        assert!(
            t.contains(&format!("sha256:{digest}"))
                && t.contains("admin")
                && t.contains(&cluster_proto::pki::utc(1_798_859_045_678)),
            "{t}"
        );
        let plain = revocations(Format::Table, &[rev]).unwrap_or_default();
        assert!(
            !plain.contains(&digest) && !plain.contains("EXPIRES"),
            "{plain}"
        );
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }

    #[test]
    fn nodes_render_as_table_and_json() {
        let n = pb::NodeInfo {
            node_id: 2,
            name: "n2".into(),
            state: pb::NodeState::Down as i32,
            ..Default::default()
        };
        let t = nodes(Format::Table, std::slice::from_ref(&n)).unwrap_or_default();
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("2") && l.contains("down")),
            "{t}"
        );
        let j = nodes(Format::Json, &[n]).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_default();
        assert_eq!(v[0]["state"], "down");
        assert_eq!(v[0]["node_id"], 2);
    }

    #[test]
    fn node_demand_shows_in_wide_list_show_and_json() {
        let n = pb::NodeInfo {
            node_id: 1,
            name: "n1".into(),
            state: pb::NodeState::Up as i32,
            facts: Some(pb::NodeFacts {
                logical_cpus: 4,
                memory_bytes: 8 << 30,
                ..Default::default()
            }),
            demand: Some(pb::NodeDemand {
                cpu_demand_millicores: 3_000,
                cpu_run_millicores: 2_000,
                memory_touched_mib: 2_048,
                sampled_at: times::timestamp_from_unix_ms(1),
                vms: 3,
            }),
            ..Default::default()
        };
        let wide = nodes(Format::Wide, std::slice::from_ref(&n)).unwrap_or_default();
        assert!(
            wide.lines()
                .next()
                .is_some_and(|h| h.contains("CPU_DEMAND") && h.contains("MEM_TOUCHED")),
            "{wide}"
        );
        assert!(
            wide.contains("3.00 (75.0%)") && wide.contains("2048 MiB (25.0%)"),
            "{wide}"
        );
        let plain = nodes(Format::Table, std::slice::from_ref(&n)).unwrap_or_default();
        assert!(!plain.contains("CPU_DEMAND"), "{plain}");
        let show = node(Format::Table, &n).unwrap_or_default();
        assert!(
            show.contains("cpu demand (vCPUs)") && show.contains("3.00 (75.0%)"),
            "{show}"
        );
        let j = node(Format::Json, &n).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&j).unwrap_or_default();
        assert_eq!(v["demand"]["cpu_demand_percent"], 75.0);
        // No fresh report: a dash, and null in JSON.
        let none = pb::NodeInfo { demand: None, ..n };
        let show = node(Format::Table, &none).unwrap_or_default();
        assert!(
            show.lines()
                .any(|l| l.starts_with("cpu demand (vCPUs)") && l.ends_with(" -")),
            "{show}"
        );
        let j = node(Format::Json, &none).unwrap_or_default();
        assert!(j.contains("\"demand\": null"), "{j}");
    }
}

#[derive(Serialize)]
struct Revoked {
    user_name: String,
    /// "admin", "viewer"; "" for a user name revocation.
    role: String,
    cert_sha256: String,
    revoked_at: Option<String>,
    by: String,
    expires_at: Option<String>,
}

fn revoked_row(r: &pb::Revocation) -> Revoked {
    Revoked {
        user_name: r.user_name.clone(),
        role: role_text(r),
        cert_sha256: r.cert_sha256.clone(),
        revoked_at: time_text(&r.revoked_at),
        by: r.by.clone(),
        expires_at: time_text(&r.expires_at),
    }
}

/// The role a revocation names ("" for none).
fn role_text(r: &pb::Revocation) -> String {
    match r.role() {
        pb::UserRole::Unspecified => String::new(),
        role => role.name().to_owned(),
    }
}

/// What one revocation revokes, in words.
fn revoked_what(r: &pb::Revocation) -> String {
    if r.cert_sha256.is_empty() {
        format!("every certificate of user {:?}", r.user_name)
    } else {
        format!(
            "certificate sha256:{} of user {:?} ({})",
            r.cert_sha256,
            r.user_name,
            role_text(r)
        )
    }
}

/// `user revoke`: what was revoked.
pub fn revoked(fmt: Format, r: &pb::Revocation) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&revoked_row(r));
    }
    Ok(format!(
        "revoked {} (every agent refuses it from now on)\n",
        revoked_what(r)
    ))
}

/// `user list-revoked`; `-o wide` adds the role, the whole certificate digest and when
/// the revoked certificate(s) expire (then the entry may be dropped).
pub fn revocations(fmt: Format, list: &[pb::Revocation]) -> Result<String, CtlError> {
    if fmt == Format::Json {
        return json(&list.iter().map(revoked_row).collect::<Vec<_>>());
    }
    let wide = fmt == Format::Wide;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let mut row = vec![r.user_name.clone()];
            if wide {
                row.push(match role_text(r) {
                    role if role.is_empty() => "-".into(),
                    role => role,
                });
            }
            row.extend([
                if r.cert_sha256.is_empty() {
                    "(every certificate)".into()
                } else if wide {
                    format!("sha256:{}", r.cert_sha256)
                } else {
                    format!("sha256:{}", &r.cert_sha256[..r.cert_sha256.len().min(16)])
                },
                cluster_proto::pki::utc(ms(&r.revoked_at)),
                r.by.clone(),
            ]);
            if wide {
                row.push(match &r.expires_at {
                    None => "-".into(),
                    Some(t) => cluster_proto::pki::utc(times::unix_ms(Some(t))),
                });
            }
            row
        })
        .collect();
    if wide {
        return Ok(table(
            &["USER", "ROLE", "CERTIFICATE", "REVOKED_AT", "BY", "EXPIRES"],
            &rows,
        ));
    }
    Ok(table(&["USER", "CERTIFICATE", "REVOKED_AT", "BY"], &rows))
}
