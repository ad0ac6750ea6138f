//! clusterctl against no agent and against a real one.

mod common;

use common::*;

use cluster_tests::{Cluster, Options};

#[test]
fn no_agent_reachable_is_one_clear_sentence_and_exit_2() {
    let o = ctl("127.0.1.251:9", &["cluster", "status"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "stdout {out} stderr {err}");
    assert!(
        err.starts_with("clusterctl: error: no cluster agent reachable at 127.0.1.251:9: "),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(out.is_empty());

    let o = ctl("not-an-address", &["node", "list"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("\"not-an-address\" is not a valid agent address"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tour_against_a_real_agent() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.add_node(1).unwrap_or_else(|e| panic!("{e}"));
    c.start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);

    let o = ctl(&ep, &["cluster", "init", "--name", "tour"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("initialized"), "{out}");

    let o = ctl(&ep, &["-o", "json", "cluster", "status"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["leader_id"], 1);
    assert_eq!(v["cluster_name"], "tour");
    assert_eq!(v["voter_ids"], serde_json::json!([1]));

    let o = ctl(&ep, &["node", "list"]);
    let (out, _) = text(&o);
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("ID") && header.contains("STATE") && header.contains("MIGRATION"),
        "{out}"
    );
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with('1') && row.contains("up") && row.contains("voter"),
        "{out}"
    );

    let o = ctl(&ep, &["-o", "json", "node", "show", "1"]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "up");
    assert!(v["facts"]["logical_cpus"].as_u64().unwrap_or(0) >= 1);

    let o = ctl(&ep, &["node", "show", "99"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("unknown node id 99"), "{err}");

    let o = ctl(
        &ep,
        &[
            "-o",
            "json",
            "node",
            "pause",
            "1",
            "--reason",
            "maintenance",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "paused");
    let o = ctl(&ep, &["-o", "json", "node", "resume", "1"]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["state"], "up");
    let o = ctl(&ep, &["node", "pause", "7"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("unknown node id 7"));

    let o = ctl(&ep, &["kv", "put", "motd", "hello"]);
    assert!(o.status.success(), "{:?}", text(&o));
    let o = ctl(&ep, &["kv", "get", "motd"]);
    assert_eq!(text(&o).0, "hello\n");
    // The agent's own view on request (a one-node cluster's is current anyway).
    let o = ctl(&ep, &["--stale", "kv", "get", "motd"]);
    assert_eq!(text(&o).0, "hello\n");

    let o = ctl(&ep, &["-o", "json", "events"]);
    let (out, _) = text(&o);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v[0]["kind"], "cluster_initialized");
    assert_eq!(v[1]["kind"], "node_joined");
    assert_eq!(v[2]["kind"], "node_state_changed");
    assert!(
        v[2]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("up -> paused: maintenance"),
        "{out}"
    );

    let o = ctl(&ep, &["cluster", "join", "--via", "127.0.1.252:9"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("already a member"), "{err}");
}

#[test]
fn a_bad_command_line_is_a_usage_error_not_an_unreachable_agent() {
    let o = ctl("127.0.1.251:9", &["vm", "migrate"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(64), "stdout {out} stderr {err}");
    assert!(err.contains("Usage:"), "{err}");
    let o = ctl("127.0.1.251:9", &["--help"]);
    assert_eq!(o.status.code(), Some(0), "--help is an answer");
    assert!(text(&o).0.contains("Usage:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_serving_agent_and_an_unreachable_one() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.add_node(1).unwrap_or_else(|e| panic!("{e}"));
    c.start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let o = ctl(&ep, &["health"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout {out} stderr {err}");
    assert!(out.contains("serving"), "{out}");
    let o = ctl(&ep, &["health", "--service", "cluster.vms.v1.VmService"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let o = ctl(&ep, &["health", "--service", "no.such.Service"]);
    assert_eq!(o.status.code(), Some(1), "unknown service: {:?}", text(&o));
    let o = ctl("127.0.1.251:9", &["health"]);
    assert_eq!(o.status.code(), Some(2), "unreachable: {:?}", text(&o));
}
