//! `clusterctl vm ...` and `clusterctl node why-not` against a real one-node cluster.

mod common;

use common::*;
use std::time::{Duration, Instant};

use cluster_tests::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_commands_against_a_real_agent() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.add_node(1).unwrap_or_else(|e| panic!("{e}"));
    c.start(1).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let o = ctl(&ep, &["cluster", "init"]);
    assert!(o.status.success(), "{}", text(&o).1);

    let o = ctl(
        &ep,
        &[
            "vm",
            "create",
            "web1",
            "--memory-mib",
            "64",
            "--wss-mib",
            "8",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("web1") && out.contains("owner"), "{out}");

    let v = wait_json(&c, &ep, &["vm", "show", "web1"], "web1 running", |v| {
        v["runtime"] == "running"
    });
    assert_eq!(v["owner_id"], 1);

    let o = ctl(&ep, &["vm", "list"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("NAME") && out.contains("web1") && out.contains("running"),
        "{out}"
    );

    let o = ctl(
        &ep,
        &["vm", "console", "web1", "--follow", "--max-lines", "3"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // (The first heartbeats may still say `mem=fill` while the guest fills its working set.)
    assert!(out.contains("HB seq=") && out.contains("mem="), "{out}");

    // A workload is one of a fixed set (an enum in the API): refused before any call.
    let o = ctl(&ep, &["vm", "create", "x", "--workload", "spin"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("possible values: idle, dirty, mem, disk, net"),
        "{err}"
    );
    let o = ctl(&ep, &["vm", "create", "x", "--max-restarts", "0"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("--max-restarts") && err.contains("1..=100"),
        "{err}"
    );
    // Bad input: one sentence on stderr, exit 4 (refused by the cluster), nothing changed.
    for (args, needle) in [
        (vec!["vm", "create", "web1"], "already exists"),
        (vec!["vm", "create", "x", "--vcpus", "0"], "vcpus"),
        (
            vec!["vm", "create", "x", "--restart-window", "2d"],
            "window_s 1..=86400",
        ),
        (vec!["vm", "stop", "ghost"], "no VM named \"ghost\""),
        (vec!["vm", "delete", "web1"], "stop it before deleting"),
        (vec!["node", "why-not", "web1", "7"], "7"),
    ] {
        let o = ctl(&ep, &args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(4), "{args:?}: {err}");
        assert!(
            err.starts_with("clusterctl: error: ") && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    let o = ctl(&ep, &["node", "why-not", "web1", "1"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("web1") && out.contains("node 1"), "{out}");

    // The restart policy as given, shown by `vm show`.
    let o = ctl(
        &ep,
        &[
            "vm",
            "create",
            "batch1",
            "--restart-policy",
            "never",
            "--no-start",
        ],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let v = json(&ep, &["vm", "show", "batch1"]);
    assert_eq!(v["restart_policy"], "never", "{v}");
    assert_eq!(
        json(&ep, &["vm", "show", "web1"])["restart_policy"],
        "on_failure (3 in 10m)"
    );
    let o = ctl(&ep, &["vm", "delete", "batch1"]);
    assert!(o.status.success(), "{}", text(&o).1);

    let o = ctl(&ep, &["vm", "stop", "web1"]);
    assert!(o.status.success(), "{}", text(&o).1);
    wait_json(&c, &ep, &["vm", "show", "web1"], "web1 stopped", |v| {
        v["runtime"] == "stopped"
    });
    let o = ctl(&ep, &["vm", "delete", "web1"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = ctl(&ep, &["-o", "json", "vm", "list"]);
    let (out, _) = text(&o);
    assert_eq!(out.trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_migrate_and_console_follows_the_vm() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(2).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let owner = create_running(&c, &ep, "mover");
    let other = if owner == 1 { 2 } else { 1 };

    // Follow the console from before the move; the stream must continue from the target.
    let (mut follower, rx) = follow_console(&ep, "mover");
    recv_until(&rx, "a heartbeat from the source", |l| {
        l.starts_with("HB seq=")
    });

    // Dry run: go, a prediction, nothing moves.
    let o = ctl(&ep, &["vm", "migrate", "mover", "--dry-run"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains(&format!("node {owner} -> node {other}: GO")) && out.contains("predicted"),
        "{out}"
    );
    assert_eq!(
        json(&ep, &["vm", "show", "mover"])["owner_id"].as_u64(),
        Some(owner)
    );
    let o = ctl(
        &ep,
        &[
            "vm",
            "migrate",
            "mover",
            "--to",
            &other.to_string(),
            "-o",
            "json",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    assert_eq!(v["owner_id"].as_u64(), Some(other), "{out}");
    let o = ctl(&ep, &["vm", "migrate", "mover", "--to", &other.to_string()]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        text(&o).1.contains("already runs on node"),
        "{}",
        text(&o).1
    );

    // After the switch notice, heartbeats keep coming (from the target).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut switched = false;
    let mut after_switch = 0;
    let mut seen = Vec::new();
    while Instant::now() < deadline && after_switch < 3 {
        let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if l.starts_with("ERR ") && l.contains(&format!("now streams from node {other}")) {
            switched = true;
        } else if switched && l.starts_with("HB seq=") && l.contains("mem=ok") {
            after_switch += 1;
        }
        seen.push(l);
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        switched && after_switch >= 3,
        "console did not follow: {:?}",
        &seen[seen.len().saturating_sub(20)..]
    );
}
