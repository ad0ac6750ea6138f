//! Prometheus `/metrics` of real agents: scraped after a live migration, parsed with a
//! small exposition-format parser, values checked against what happened.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use cluster_proto::vms as pb;
use cluster_tests::vm::{guest_spec, mem_boot};
use cluster_tests::{http_get, Cluster};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_a_migration_parse_and_match() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let mut maddr = BTreeMap::new();
    for id in 1..=2u64 {
        let a = free_port([127, 0, 1, id as u8]);
        cl.add_node_with(id, &format!("metrics_addr = \"{a}\""))
            .unwrap_or_else(|e| panic!("{e}"));
        maddr.insert(id, a);
    }
    let formed = cl.form(2).await;
    cl.check(formed);
    let src = cl
        .create_running(1, guest_spec("m", 64, mem_boot()))
        .await
        .owner_id;
    let dst = 3 - src;
    let mut vm = cl.vms(1).await;
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "m".into(),
        to_node_id: dst,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}"));
    cl.wait_vm(1, "m", "running on the target", |v| {
        v.owner_id == dst && v.runtime == "running" && v.migrating_to == 0
    })
    .await;
    // Both replicas applied the end of the migration (the figures below read them).
    cl.barrier().await;

    let scrape = |id: u64| {
        let (head, body) = http_get(maddr[&id], "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        parse(&body)
    };
    let s = scrape(src);
    let d = scrape(dst);
    // The source ran one successful migration; its figures are in the histogram.
    assert_eq!(
        value(&s, "cluster_migrations_total", Some(("result", "started"))),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "cluster_migrations_total",
            Some(("result", "succeeded"))
        ),
        1.0
    );
    assert_eq!(
        value(&s, "cluster_migrations_total", Some(("result", "failed"))),
        0.0
    );
    assert_eq!(
        value(&d, "cluster_migrations_total", Some(("result", "started"))),
        0.0
    );
    assert!(value(&s, "cluster_migration_wire_bytes_total", None) > 0.0);
    assert_eq!(
        value(&s, "cluster_migration_blackout_seconds_count", None),
        1.0
    );
    let sum = value(&s, "cluster_migration_blackout_seconds_sum", None);
    assert!(sum > 0.0 && sum < 60.0, "{sum}");
    let buckets: Vec<f64> = s
        .iter()
        .filter(|(n, _, _)| n == "cluster_migration_blackout_seconds_bucket")
        .map(|x| x.2)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(
        value(
            &s,
            "cluster_migration_blackout_seconds_bucket",
            Some(("le", "+Inf"))
        ),
        1.0
    );
    // The VM runs on the target now, not on the source.
    assert_eq!(value(&d, "cluster_vms", Some(("state", "running"))), 1.0);
    assert_eq!(value(&s, "cluster_vms", Some(("state", "running"))), 0.0);
    assert_eq!(
        value(&d, "cluster_owned_vms", Some(("state", "running"))),
        1.0
    );
    // Raft: one leader, the same term and leader everywhere; committed on the leader.
    let leaders =
        value(&s, "cluster_raft_is_leader", None) + value(&d, "cluster_raft_is_leader", None);
    assert_eq!(leaders, 1.0);
    assert_eq!(
        value(&s, "cluster_raft_leader_id", None),
        value(&d, "cluster_raft_leader_id", None)
    );
    assert_eq!(
        value(&s, "cluster_raft_term", None),
        value(&d, "cluster_raft_term", None)
    );
    let lead = if value(&s, "cluster_raft_is_leader", None) == 1.0 {
        &s
    } else {
        &d
    };
    assert!(value(lead, "cluster_raft_committed_index", None) > 0.0);
    assert!(value(&s, "cluster_raft_last_applied_index", None) > 0.0);
    for m in [&s, &d] {
        assert_eq!(value(m, "cluster_nodes", Some(("state", "up"))), 2.0);
        assert_eq!(value(m, "cluster_nodes", Some(("state", "down"))), 0.0);
        assert_eq!(value(m, "cluster_lease_held", None), 1.0);
        assert_eq!(value(m, "cluster_migration_records", None), 1.0);
        assert_eq!(value(m, "cluster_migrations_queued", None), 0.0);
    }
    // Anything but GET /metrics is refused.
    let (head, _) = http_get(maddr[&src], "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
