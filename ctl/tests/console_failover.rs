//! `clusterctl vm console --follow` keeps streaming across a failover: the VM's owner is
//! killed with -9, the stream through another agent breaks, clusterctl reopens it and the
//! heartbeats continue from the node the VM was restarted on.

mod common;

use std::time::{Duration, Instant};

use common::{ctl, endpoint, follow_console, text, wait_json};

use cluster_tests::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_follow_survives_a_failover_of_the_owner() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(3).await.unwrap_or_else(|e| panic!("{e}"));
    // Watch through node 1; the VM runs on node 3 (preferred owner), which is killed.
    let ep = endpoint(&c, 1);
    let o = ctl(
        &ep,
        &[
            "vm",
            "create",
            "phoenix",
            "--memory-mib",
            "64",
            "--wss-mib",
            "8",
            "--preferred-owner",
            "3",
            "--restart-priority",
            "high",
        ],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let v = wait_json(
        &c,
        &ep,
        &["vm", "show", "phoenix"],
        "phoenix running",
        |v| v["runtime"] == "running",
    );
    assert_eq!(v["owner_id"], 3, "{v}");

    let (mut follower, rx) = follow_console(&ep, "phoenix");
    // Streaming from node 3 first.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline && !seen.iter().any(|l: &String| l.starts_with("HB seq=")) {
        if let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) {
            seen.push(l);
        }
    }
    assert!(
        seen.iter().any(|l| l.starts_with("HB seq=")),
        "no heartbeat before the kill: {seen:?}"
    );

    c.kill9(3).unwrap_or_else(|e| panic!("{e}"));

    // The follower reports the switch and heartbeats come again, from a survivor (a
    // restart: the guest boots anew, so its sequence starts over).
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut switched_to = None;
    let mut after_switch = 0;
    while Instant::now() < deadline && after_switch < 3 {
        let Ok(l) = rx.recv_timeout(Duration::from_secs(1)) else {
            continue;
        };
        if let Some(rest) =
            l.strip_prefix("ERR clusterctl: console of phoenix now streams from node ")
        {
            switched_to = rest.trim().parse::<u64>().ok();
        } else if switched_to.is_some() && l.starts_with("HB seq=") && l.contains("mem=ok") {
            after_switch += 1;
        }
        seen.push(l);
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert!(
        matches!(switched_to, Some(1 | 2)) && after_switch >= 3,
        "console did not follow the failover (switched to {switched_to:?}): {:?}",
        &seen[seen.len().saturating_sub(30)..]
    );
}
