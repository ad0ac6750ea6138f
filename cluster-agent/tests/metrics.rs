//! Prometheus `/metrics`, `/healthz` and `/readyz` of real agents: scraped before the
//! cluster forms, during a held live migration and after it, linted by the real
//! `promtool check metrics`, parsed with a small exposition-format parser and checked
//! against what happened; the shipped alert rules and dashboard are checked too.

use cluster_proto::EnumName;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use cluster_proto::migrations as mpb;
use cluster_proto::vms as pb;
use cluster_tests::vm::{guest_spec, mem_boot};
use cluster_tests::{http_get, Cluster, WAIT};

/// One sample: metric name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parse the text exposition format (0.0.4): `# HELP`/`# TYPE` lines, then
/// `name{label="value",...} number` samples. Panics on anything malformed.
fn parse(text: &str) -> Vec<Sample> {
    let mut types = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut p = rest.splitn(3, ' ');
            let (kw, name, tail) = (p.next(), p.next(), p.next());
            assert!(
                matches!(kw, Some("HELP") | Some("TYPE")) && name.is_some() && tail.is_some(),
                "bad comment line {line:?}"
            );
            if kw == Some("TYPE") {
                let t = tail.unwrap_or_default();
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "bad type {line:?}"
                );
                types.insert(name.unwrap_or_default().to_string(), t.to_string());
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line:?}"));
                let mut labels = BTreeMap::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?}"));
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| panic!("unquoted label value {pair:?}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "{k:?}"
                    );
                    labels.insert(k.to_string(), v.to_string());
                }
                (n.to_string(), labels)
            }
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name {name:?}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&name);
        assert!(
            types.contains_key(family),
            "sample {name} before its # TYPE"
        );
        out.push((name, labels, value));
    }
    out
}

fn value(samples: &[Sample], name: &str, label: Option<(&str, &str)>) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .map(|s| s.2)
        .unwrap_or_else(|| panic!("no sample {name} {label:?}"))
}

fn free_port(ip: [u8; 4]) -> SocketAddr {
    cluster_tests::free_port(ip).unwrap_or_else(|e| panic!("{e}"))
}

/// `promtool` (Debian's `prometheus` package; `deploy/setup.sh` installs it) with `args`
/// and `stdin`: whether it succeeded, and everything it printed.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (apt-get install prometheus): {e}"));
    child
        .stdin
        .take()
        .map(|mut i| i.write_all(stdin.as_bytes()))
        .transpose()
        .unwrap_or_else(|e| panic!("{e}"));
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `promtool check metrics` passes on `body` with no lint problem.
fn assert_promtool_clean(body: &str) {
    let (ok, out) = promtool(&["check", "metrics"], body);
    assert!(ok && out.trim().is_empty(), "promtool: {out}\n{body}");
}

fn deploy_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name)
}

/// Every `cluster_*` metric name the dashboard's queries name.
fn dashboard_metric_names() -> Vec<String> {
    let text = std::fs::read_to_string(deploy_file("grafana-dashboard.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let dash: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    let mut names = Vec::new();
    for p in dash["panels"]
        .as_array()
        .unwrap_or_else(|| panic!("no panels"))
    {
        for t in p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("no targets: {p}"))
        {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("no expr: {t}"));
            let mut rest = expr;
            while let Some(i) = rest.find("cluster_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.push(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(names.len() > 10, "{names:?}");
    names
}

fn names_of(samples: &[Sample]) -> std::collections::BTreeSet<String> {
    samples.iter().map(|s| s.0.clone()).collect()
}

#[test]
fn alert_rules_pass_promtool_and_dashboard_parses() {
    let rules = deploy_file("prometheus-alerts.yml");
    let (ok, out) = promtool(&["check", "rules", &rules.to_string_lossy()], "");
    assert!(ok && out.contains("SUCCESS"), "{out}");
    for alert in [
        "ClusterNodeDown",
        "ClusterLeaseLapsed",
        "ClusterVmsFenced",
        "ClusterVmFailures",
        "ClusterMigrationReceiptMismatch",
        "ClusterMigrationFailures",
        "ClusterDrainStuck",
    ] {
        assert!(
            out.contains("rules found")
                && std::fs::read_to_string(&rules)
                    .unwrap_or_default()
                    .contains(&format!("alert: {alert}")),
            "{alert}"
        );
    }
    // A broken rule file is refused (the check is real).
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "groups:\n  - name: x\n    rules:\n      - alert: A\n        expr: cluster_lease_held ==\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (ok, out) = promtool(&["check", "rules", &bad.to_string_lossy()], "");
    assert!(!ok, "{out}");
    dashboard_metric_names();
}

fn scrape(addr: SocketAddr) -> (String, Vec<Sample>) {
    let (head, body) = http_get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let samples = parse(&body);
    (body, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_before_during_and_after_migrations_pass_promtool_and_match() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let mut maddr = BTreeMap::new();
    for id in 1..=2u64 {
        let a = free_port([127, 0, 1, id as u8]);
        cl.add_node_with(id, &format!("metrics_addr = \"{a}\""))
            .unwrap_or_else(|e| panic!("{e}"));
        maddr.insert(id, a);
    }
    // `busy`'s capped migration below stays in pre-copy whatever its guest does.
    let held = cl.hold_precopy("busy");
    cl.check(held);
    for id in 1..=2 {
        let s = cl.start(id).await;
        cl.check(s);
    }
    // Alive but not ready before the cluster exists; the reason says why.
    for id in 1..=2 {
        let (head, body) = http_get(maddr[&id], "/healthz");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "ok\n");
        let (head, body) = http_get(maddr[&id], "/readyz");
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(body.contains("has not joined a cluster"), "{body}");
        let (_, samples) = scrape(maddr[&id]);
        assert_eq!(value(&samples, "cluster_build_info", None), 1.0);
    }
    let i = cl.init(1).await;
    cl.check(i);
    let j = cl.join(2, 1).await;
    cl.check(j);
    let l = cl.wait_leader(&[1, 2], WAIT).await;
    cl.check(l);
    for id in 1..=2 {
        cl.wait_until(
            &format!("node {id} ready"),
            WAIT,
            || async { Ok::<_, String>(http_get(maddr[&id], "/readyz")) },
            |(head, body)| head.starts_with("HTTP/1.1 200") && body == "ready\n",
        )
        .await;
    }

    // A guest that dirties memory fast, its migration held in pre-copy by a bandwidth cap
    // and a 1 ms blackout cap (and the pre-copy hold set above).
    let busy = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Dirty as i32,
        wss_mib: 64,
        rate_mbps: 4000,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    let src = cl
        .create_running(1, guest_spec("busy", 128, busy))
        .await
        .owner_id;
    let dst = 3 - src;
    let mut vm = cl.vms(1).await;
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "busy".into(),
        to_node_id: dst,
        max_downtime: Some(cluster_proto::times::duration_from_ms(1)),
        deadline: Some(cluster_proto::times::duration_from_ms(600_000)),
        bandwidth_bytes_per_s_max: Some(1 << 20),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate busy: {e}{}", cl.logs()));
    let rec = cl.running_migration(dst, "busy", WAIT).await;
    let (body, s) = cl
        .wait_until(
            "progress of the held migration on the source's /metrics",
            WAIT,
            || async { Ok::<_, String>(scrape(maddr[&src])) },
            |(_, s)| {
                s.iter().any(|(n, l, v)| {
                    n == "cluster_migration_rate_bytes_per_second"
                        && l.get("vm").map(String::as_str) == Some("busy")
                        && *v > 0.0
                })
            },
        )
        .await;
    assert_promtool_clean(&body);
    let busy_label = Some(("vm", "busy"));
    assert!(value(&s, "cluster_migration_bytes_remaining", busy_label) > 0.0);
    // Rounds count from 0 (the first full copy).
    let round = value(&s, "cluster_migration_round", busy_label);
    assert!(round >= 0.0 && round.fract() == 0.0, "{round}");
    assert_eq!(value(&s, "cluster_migrations_running", None), 1.0);
    assert_eq!(value(&s, "cluster_migrations_started_total", None), 1.0);
    assert_eq!(
        value(
            &s,
            "cluster_migrations_finished_total",
            Some(("result", "succeeded"))
        ),
        0.0
    );
    let busy_state = |state: &str| {
        s.iter()
            .find(|(n, l, _)| {
                n == "cluster_vm_state"
                    && l.get("vm").map(String::as_str) == Some("busy")
                    && l.get("state").map(String::as_str) == Some(state)
            })
            .map(|x| x.2)
    };
    assert_eq!(busy_state("running"), Some(1.0));
    assert_eq!(busy_state("stopped"), Some(0.0));
    assert_eq!(value(&s, "cluster_build_info", None), 1.0);
    assert!(value(&s, "cluster_lease_seconds_left", None) > 0.0);
    assert_eq!(value(&s, "cluster_lease_held", None), 1.0);
    // Every metric the dashboard queries is exported (either node; the committed
    // index only by the leader).
    let (dbody, d) = scrape(maddr[&dst]);
    assert_promtool_clean(&dbody);
    assert!(
        d.iter()
            .all(|(n, _, _)| n != "cluster_migration_bytes_remaining"),
        "the target shows no outgoing progress"
    );
    let mut exported = names_of(&s);
    exported.extend(names_of(&d));
    for name in dashboard_metric_names() {
        assert!(
            exported.contains(&name),
            "dashboard queries {name}, not exported: {exported:?}"
        );
    }

    // Cancel it: a finished counter by result, the VM stays on the source.
    let mut mig = cl.migrations(dst).await;
    mig.cancel_migration(mpb::CancelMigrationRequest { id: rec.id })
        .await
        .unwrap_or_else(|e| panic!("cancel: {e}{}", cl.logs()));
    cl.wait_until(
        "the cancel counted on the source",
        WAIT,
        || async { Ok::<_, String>(scrape(maddr[&src]).1) },
        |s| {
            s.iter().any(|(n, l, v)| {
                n == "cluster_migrations_finished_total"
                    && l.get("result").map(String::as_str) == Some("cancelled")
                    && *v == 1.0
            })
        },
    )
    .await;

    // An easy VM migrates through: succeeded, with its blackout and duration observed.
    let m_owner = cl
        .create_running(1, guest_spec("m", 64, mem_boot()))
        .await
        .owner_id;
    let to = 3 - m_owner;
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "m".into(),
        to_node_id: to,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}"));
    cl.wait_vm(1, "m", "running on the target", |v| {
        v.owner_id == to && v.runtime().name() == "running" && v.migrating_to == 0
    })
    .await;
    cl.barrier().await;
    let (sbody, s) = scrape(maddr[&m_owner]);
    let (tbody, t) = scrape(maddr[&to]);
    assert_promtool_clean(&sbody);
    assert_promtool_clean(&tbody);
    let started = if m_owner == src { 2.0 } else { 1.0 };
    assert_eq!(value(&s, "cluster_migrations_started_total", None), started);
    assert_eq!(
        value(
            &s,
            "cluster_migrations_finished_total",
            Some(("result", "succeeded"))
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "cluster_migrations_finished_total",
            Some(("result", "failed"))
        ),
        0.0
    );
    assert_eq!(
        value(&s, "cluster_migration_receipt_mismatches_total", None),
        0.0
    );
    assert!(value(&s, "cluster_migration_wire_bytes_total", None) > 0.0);
    for h in [
        "cluster_migration_blackout_seconds",
        "cluster_migration_duration_seconds",
    ] {
        assert_eq!(value(&s, &format!("{h}_count"), None), 1.0, "{h}");
        let sum = value(&s, &format!("{h}_sum"), None);
        assert!(sum > 0.0 && sum < 600.0, "{h} {sum}");
        let buckets: Vec<f64> = s
            .iter()
            .filter(|(n, _, _)| *n == format!("{h}_bucket"))
            .map(|x| x.2)
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
        assert_eq!(value(&s, &format!("{h}_bucket"), Some(("le", "+Inf"))), 1.0);
    }
    assert_eq!(value(&s, "cluster_migrations_running", None), 0.0);
    assert!(s
        .iter()
        .all(|(n, _, _)| n != "cluster_migration_bytes_remaining"));
    // "m" runs on its new owner, which reports its state.
    assert!(t.iter().any(|(n, l, v)| n == "cluster_vm_state"
        && l.get("vm").map(String::as_str) == Some("m")
        && l.get("state").map(String::as_str) == Some("running")
        && *v == 1.0));
    assert!(s.iter().all(
        |(n, l, _)| !(n == "cluster_vm_state" && l.get("vm").map(String::as_str) == Some("m"))
    ));
    // Raft: one leader, the same term and leader everywhere; committed on the leader.
    let leaders =
        value(&s, "cluster_raft_is_leader", None) + value(&t, "cluster_raft_is_leader", None);
    assert_eq!(leaders, 1.0);
    assert_eq!(
        value(&s, "cluster_raft_leader_id", None),
        value(&t, "cluster_raft_leader_id", None)
    );
    assert_eq!(
        value(&s, "cluster_raft_term", None),
        value(&t, "cluster_raft_term", None)
    );
    let lead = if value(&s, "cluster_raft_is_leader", None) == 1.0 {
        &s
    } else {
        &t
    };
    assert!(value(lead, "cluster_raft_committed_index", None) > 0.0);
    for m in [&s, &t] {
        assert!(value(m, "cluster_raft_last_applied_index", None) > 0.0);
        assert_eq!(value(m, "cluster_nodes", Some(("state", "up"))), 2.0);
        assert_eq!(value(m, "cluster_nodes", Some(("state", "down"))), 0.0);
        assert_eq!(value(m, "cluster_lease_held", None), 1.0);
        assert_eq!(value(m, "cluster_migration_records", None), 2.0);
        assert_eq!(value(m, "cluster_migrations_queued", None), 0.0);
        assert_eq!(value(m, "cluster_jobs", Some(("status", "running"))), 0.0);
    }
    // Anything but GET on the three paths is refused with a reason.
    let (head, body) = http_get(maddr[&src], "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(body.contains("/metrics"), "{body}");
}

/// The sum of `name`'s samples with every label of `labels`.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.2)
        .sum()
}

/// AppendEntries `direction` ("sent", "served") by `transport` ("unary", "stream").
fn appends(addr: SocketAddr, direction: &str, transport: &str) -> f64 {
    let (_, samples) = scrape(addr);
    sum(
        &samples,
        "cluster_peer_append_entries_total",
        &[("direction", direction), ("transport", transport)],
    )
}

/// Raft's replication and its heartbeats go over the AppendEntries stream, not unary
/// calls: the leader's unary count stays 0 while its stream count follows writes and
/// idle heartbeat rounds, and the followers serve them on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_replication_and_heartbeats_ride_the_append_entries_stream() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::agents(cluster_tests::Options::default());
    let mut maddr = BTreeMap::new();
    for id in 1..=3u64 {
        let a = free_port([127, 0, 1, id as u8]);
        cl.add_node_with(id, &format!("metrics_addr = \"{a}\""))
            .unwrap_or_else(|e| panic!("{e}"));
        maddr.insert(id, a);
        let s = cl.start(id).await;
        cl.check(s);
    }
    let i = cl.init(1).await;
    cl.check(i);
    for id in 2..=3 {
        let j = cl.join(id, 1).await;
        cl.check(j);
    }
    let leader = cl.wait_leader(&[1, 2, 3], WAIT).await;
    let leader = cl.check(leader);
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let (body, _) = scrape(maddr[&leader]);
    assert_promtool_clean(&body);

    let before = appends(maddr[&leader], "sent", "stream");
    const WRITES: usize = 20;
    for k in 0..WRITES {
        let p = cl.put(leader, &format!("stream-{k}"), "v").await;
        cl.check(p);
    }
    let after_writes = appends(maddr[&leader], "sent", "stream");
    assert!(
        after_writes >= before + WRITES as f64,
        "{WRITES} writes but the leader's stream count went {before} -> {after_writes}"
    );
    // Idle: Raft's heartbeats alone (every raft_heartbeat_interval_ms to each follower).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = appends(maddr[&leader], "sent", "stream");
    assert!(
        idle >= after_writes + 10.0,
        "2 s idle but the leader's stream count went {after_writes} -> {idle}"
    );
    assert_eq!(
        appends(maddr[&leader], "sent", "unary"),
        0.0,
        "the leader sent unary AppendEntries"
    );
    for f in followers {
        let served = appends(maddr[&f], "served", "stream");
        assert!(served >= 10.0, "follower {f} served {served} on the stream");
        assert_eq!(
            appends(maddr[&f], "served", "unary"),
            0.0,
            "follower {f} served unary AppendEntries"
        );
    }
}
