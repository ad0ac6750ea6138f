//! `clusterctl node drain|resume`, `drain ...` and `policy ...` against a real 3-node
//! cluster running test-guest VMs.

mod common;

use common::*;

use cluster_tests::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_resume_and_policy_commands_against_real_agents() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(3).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 2);
    for n in ["cd0", "cd1"] {
        ok(
            &ep,
            &[
                "vm",
                "create",
                n,
                "--memory-mib",
                "64",
                "--wss-mib",
                "8",
                "--preferred-owner",
                "node-3",
            ],
        );
    }
    wait_json(&c, &ep, &["vm", "list"], "VMs running on node 3", |v| {
        v.as_array().is_some_and(|a| {
            a.len() == 2
                && a.iter()
                    .all(|v| v["runtime"] == "running" && v["owner_id"] == 3)
        })
    });

    // Bad input: unknown node, node 0, abort without a drain, never drained.
    refused(&ep, &["node", "drain", "9"], "unknown node id 9");
    refused(&ep, &["node", "drain", "0", "--dry-run"], "node_id is 0");
    refused(&ep, &["drain", "abort", "3"], "no running drain");
    refused(&ep, &["drain", "show", "3"], "never been drained");
    refused(&ep, &["node", "resume", "3", "--failback"], "not paused");

    // Dry run: the plan with waves and ETAs; nothing changes.
    let out = ok(&ep, &["node", "drain", "3", "--dry-run"]);
    assert!(out.contains("dry run: drain of node 3"), "{out}");
    assert!(out.contains("2 moves in 2 waves"), "{out}");
    assert!(
        out.contains("WAVE") && out.contains("cd0") && out.contains("ETA"),
        "{out}"
    );
    let nodes = json(&ep, &["node", "list"]);
    assert!(
        nodes
            .as_array()
            .is_some_and(|a| a.iter().all(|n| n["state"] == "up")),
        "{nodes}"
    );

    // Drain and watch it to the end.
    let out = ok(&ep, &["node", "drain", "3", "--watch"]);
    assert!(out.contains("drain of node 3 started"), "{out}");
    assert!(
        out.contains("job 1: drain of node 3: done — 2/2 moved"),
        "{out}"
    );
    let show = json(&ep, &["drain", "show", "3"]);
    assert_eq!(show["status"], "done");
    assert_eq!(show["moves"].as_array().map(Vec::len), Some(2));
    let vms = json(&ep, &["vm", "list"]);
    assert!(
        vms.as_array()
            .is_some_and(|a| a.iter().all(|v| v["owner_id"] != 3)),
        "{vms}"
    );
    let list = ok(&ep, &["drain", "list"]);
    assert!(
        list.contains("drain") && list.contains("done") && list.contains("2/2"),
        "{list}"
    );
    let wide = ok(&ep, &["-o", "wide", "drain", "list"]);
    assert!(
        wide.lines().next().is_some_and(|h| h.contains("IN_FLIGHT")
            && h.contains("PLANNED_FINISH")
            && h.contains("FAILED_BACK")),
        "{wide}"
    );
    let wide = ok(&ep, &["-o", "wide", "drain", "show", "3"]);
    assert!(
        wide.lines()
            .nth(1)
            .is_some_and(|h| h.contains("PLANNED  TOOK") && h.contains("ENDED")),
        "{wide}"
    );
    let events = ok(&ep, &["events"]);
    assert!(
        events.contains("drain of node 3 started (job 1)"),
        "{events}"
    );
    let wide = ok(&ep, &["-o", "wide", "events"]);
    assert!(
        wide.lines().next().is_some_and(|h| h.contains("AT_UTC")) && wide.contains("Z  "),
        "{wide}"
    );
    assert!(events.contains("drain of node 3 (job 1) done"), "{events}");

    // Resume with failback: both VMs come home.
    let out = ok(&ep, &["node", "resume", "3", "--failback"]);
    assert!(out.contains("node 3 resumed; 2 VMs move back"), "{out}");
    wait_json(&c, &ep, &["vm", "list"], "VMs back on node 3", |v| {
        v.as_array().is_some_and(|a| {
            a.iter()
                .all(|v| v["owner_id"] == 3 && v["runtime"] == "running" && v["migrating_to"] == 0)
        })
    });

    // Policy: show, set, dry run, bad input.
    let out = ok(&ep, &["policy", "show"]);
    assert!(
        out.contains(
            "balance: none (aggressiveness medium, every 30.0s); a moved VM stays at least 300.0s"
        ),
        "{out}"
    );
    let out = ok(
        &ep,
        &[
            "policy",
            "set",
            "balance",
            "power-saving",
            "--aggressiveness",
            "high",
        ],
    );
    assert!(
        out.contains("balance: power_saving (aggressiveness high"),
        "{out}"
    );
    let p = json(&ep, &["policy", "show"]);
    assert_eq!(p["mode"], "power_saving", "{p}");
    assert!(
        p["interval"].as_str().is_some_and(|d| d.ends_with('s')),
        "{p}"
    );
    // Whether the two busy guests on node 3 are worth spreading depends on the host's CPUs
    // (demand is measured; cluster-agent/tests/demand.rs fakes them): the dry run names its
    // stop reason either way, and changes nothing.
    let out = ok(&ep, &["policy", "balance", "--dry-run", "--mode", "even"]);
    assert!(out.contains("dry run: balance even: "), "{out}");
    assert!(out.contains("\nstopped: "), "{out}");
    let p = json(&ep, &["policy", "balance", "--dry-run", "--mode", "even"]);
    assert!(
        p["stop_code"].as_str().is_some_and(|c| !c.is_empty()),
        "{p}"
    );
    refused(
        &ep,
        &["policy", "set", "balance", "even", "--interval-s", "0.01"],
        "below the minimum",
    );
    let o = ctl(&ep, &["policy", "set", "balance", "sideways"]);
    assert_eq!(
        o.status.code(),
        Some(64),
        "clap refuses an unknown mode (usage error)"
    );
    ok(&ep, &["policy", "set", "balance", "none"]);
}
