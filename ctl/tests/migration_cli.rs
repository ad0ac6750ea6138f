//! `clusterctl vm migrate` (progress bar, options) and `clusterctl migration
//! list|show|cancel` against a real two-node cluster.

mod common;

use common::*;

use cluster_tests::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_with_progress_then_list_show_and_refusals() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(2).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let owner = create_running(&c, &ep, "mover");
    let other = 3 - owner;

    // Bad options: refused with the option named, nothing recorded or moved.
    let o = ctl(&ep, &["vm", "migrate", "mover", "--max-downtime", "0"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("max_downtime_ms 0 is out of range"), "{err}");
    let o = ctl(
        &ep,
        &[
            "vm",
            "migrate",
            "mover",
            "--max-downtime",
            "2000",
            "--deadline",
            "1",
        ],
    );
    let (_, err) = text(&o);
    assert!(err.contains("must exceed the max downtime"), "{err}");
    assert_eq!(json(&ep, &["migration", "list"]), serde_json::json!([]));

    // The migration with its progress bar (stderr is not a terminal: one line per update)
    // and the final line with the blackout and the receipt. The target by name, the
    // blackout budget as a humantime duration.
    let o = ctl(
        &ep,
        &[
            "vm",
            "migrate",
            "mover",
            "--to",
            &format!("node-{other}"),
            "--max-downtime",
            "200ms",
            "--deadline",
            "2m",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("mover"), "{out}");
    assert!(
        err.contains(&format!(
            "migration 1: VM mover node {owner} -> node {other}"
        )),
        "{err}"
    );
    assert!(
        err.contains("migration 1 succeeded:")
            && err.contains("blackout")
            && err.contains("receipt matches"),
        "{err}"
    );
    assert_eq!(
        json(&ep, &["vm", "show", "mover"])["owner_id"].as_u64(),
        Some(other)
    );

    // list / show, table and JSON.
    let o = ctl(&ep, &["migration", "list"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("mover") && out.contains("succeeded") && out.contains("match"),
        "{out}"
    );
    // -o wide: the bounds asked for beside what happened, from a real agent.
    let wide = ok(&ep, &["-o", "wide", "migration", "list"]);
    let mut lines = wide.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header[8..],
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
        "{wide}"
    );
    let row: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(row[8..11], ["match", "200", "120000"], "{wide}");
    let m = json(&ep, &["migration", "show", "1"]);
    assert_eq!(m["state"], "succeeded");
    assert_eq!(m["source"].as_u64(), Some(owner));
    assert_eq!(m["target"].as_u64(), Some(other));
    // `--max-downtime`/`--deadline` reached the agent as Durations; JSON spells them as
    // protobuf-JSON durations and the times as RFC 3339.
    assert_eq!(m["max_downtime"], "0.200s", "{m}");
    assert_eq!(m["deadline"], "120s", "{m}");
    assert!(
        m["started_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.contains('T')),
        "{m}"
    );
    assert_eq!(m["stats"]["receipt_matches"], true);
    // The leader's prediction is kept beside the actual figures.
    assert!(
        m["predicted_duration"]
            .as_str()
            .is_some_and(|d| d.ends_with('s'))
            && m["predicted_blackout"]
                .as_str()
                .is_some_and(|d| d.ends_with('s')),
        "{m}"
    );
    assert_eq!(m["stats"]["source_digest"], m["stats"]["target_digest"]);
    assert!(
        m["stats"]["blackout"]
            .as_str()
            .is_some_and(|d| d.ends_with('s') && d != "0s"),
        "{m}"
    );
    let o = ctl(&ep, &["migration", "show", "1"]);
    let (out, _) = text(&o);
    assert!(out.contains("receipt            matches"), "{out}");

    // Refusals: unknown id, cancelling a finished migration.
    let o = ctl(&ep, &["migration", "show", "42"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4));
    assert!(err.contains("no migration with id 42"), "{err}");
    let o = ctl(&ep, &["migration", "cancel", "1"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(4));
    assert!(err.contains("migration 1 already succeeded"), "{err}");
    assert_eq!(json(&ep, &["migration", "show", "1"])["state"], "succeeded");

    // On a 60-column terminal (a pty from script(1)) the bar is redrawn within the width:
    // no row of it is wider, so none wraps and leaves a stale row behind.
    const COLS: usize = 60;
    let o = std::process::Command::new("script")
        .envs(cluster_tests::pki::pki().admin_env())
        .env_remove("CLUSTERCTL_ENDPOINT")
        .args(["-qfec"])
        .arg(format!(
            "stty cols {COLS} rows 20; exec '{}' --endpoint {ep} vm migrate mover --to {owner} \
             --max-bandwidth 16",
            env!("CARGO_BIN_EXE_clusterctl")
        ))
        .arg("/dev/null")
        .output()
        .unwrap_or_else(|e| panic!("script (util-linux): {e}"));
    let (tty, _) = text(&o);
    assert!(o.status.success(), "{tty}");
    assert!(tty.contains("migration 2 succeeded"), "{tty}");
    let visible = strip_ansi(&tty);
    let bar_rows: Vec<&str> = visible
        .split(['\r', '\n'])
        .filter(|r| r.starts_with('[') && r.contains("% left"))
        .collect();
    assert!(!bar_rows.is_empty(), "no bar drawn: {tty:?}");
    for r in &bar_rows {
        assert!(
            r.chars().count() <= COLS,
            "{} columns: {r:?}",
            r.chars().count()
        );
    }
    assert_eq!(
        json(&ep, &["vm", "show", "mover"])["owner_id"].as_u64(),
        Some(owner)
    );
}

/// `s` without ANSI escape sequences (CSI `ESC [ ... letter` and two-byte `ESC x`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if it.next() == Some('[') {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

/// `clusterctl vm migrate` while node slots are busy: it waits in the queue (saying so on
/// stderr), then moves the VM with the usual progress and final line once the slot is
/// free; `--no-queue` refuses instead, `--no-wait` returns the queued migration's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_waits_in_the_queue_for_a_busy_slot() {
    use cluster_proto::vms as pb;
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    c.form(2).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    // A guest that dirties memory, migrated at 1 MiB/s with a 1 ms blackout budget: its
    // migration stays in pre-copy, holding both nodes' slots, until cancelled.
    let boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Dirty as i32,
        wss_mib: 64,
        rate_mbps: 4000,
        ..Default::default()
    };
    c.vms(1)
        .await
        .create_vm(pb::CreateVmRequest {
            spec: Some(cluster_tests::vm::guest_spec("hog", 128, boot)),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create hog: {e}"));
    let owner = create_running(&c, &ep, "waiter");
    let hog_owner = wait_json(&c, &ep, &["vm", "show", "hog"], "hog running", |v| {
        v["runtime"] == "running"
    })["owner_id"]
        .as_u64()
        .unwrap_or(0);
    let o = ctl(&ep, &["vm", "migrate", "hog", "--deadline", "soon"]);
    assert_eq!(o.status.code(), Some(64), "usage error: {}", text(&o).1);
    assert!(
        text(&o)
            .1
            .contains("\"soon\" is not a duration such as 50ms"),
        "{}",
        text(&o).1
    );
    let o = ctl(&ep, &["vm", "migrate", "hog", "--max-bandwidth", "lots"]);
    assert_eq!(o.status.code(), Some(64), "usage error: {}", text(&o).1);
    assert!(
        text(&o).1.contains("not a whole number of MiB/s"),
        "{}",
        text(&o).1
    );
    ok(
        &ep,
        &[
            "vm",
            "migrate",
            "hog",
            "--to",
            &(3 - hog_owner).to_string(),
            "--max-downtime",
            "1",
            "--deadline",
            "600",
            "--max-bandwidth",
            "1",
            "--no-wait",
        ],
    );
    let hog = json(&ep, &["migration", "show", "1"]);
    assert_eq!(
        hog["bandwidth_bytes_per_s_max"].as_u64(),
        Some(1 << 20),
        "{hog}"
    );
    let shown = ok(&ep, &["migration", "show", "1"]);
    assert!(shown.contains("max_bandwidth      1 MiB/s"), "{shown}");
    let to = (3 - owner).to_string();
    refused(
        &ep,
        &["vm", "migrate", "waiter", "--to", &to, "--no-queue"],
        "and the policy allows 1 at a time",
    );
    let out = ok(
        &ep,
        &[
            "-o",
            "json",
            "vm",
            "migrate",
            "waiter",
            "--to",
            &to,
            "--no-wait",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let queued = v["queued_migration_id"].as_u64().unwrap_or(0);
    assert_eq!(queued, 2, "{v}");
    assert_eq!(json(&ep, &["migration", "show", "2"])["state"], "queued");
    ok(&ep, &["migration", "cancel", "2"]);
    assert_eq!(json(&ep, &["migration", "show", "2"])["state"], "cancelled");

    // Exit 5: a migration clusterctl waits for ends cancelled (here while queued).
    let spawn = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_clusterctl"))
            .envs(cluster_tests::pki::pki().admin_env())
            .arg("--endpoint")
            .arg(&ep)
            .args(args)
            .env_remove("CLUSTERCTL_ENDPOINT")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let doomed = spawn(&["vm", "migrate", "waiter", "--to", &to]);
    wait_json(
        &c,
        &ep,
        &["migration", "show", "3"],
        "migration 3 queued",
        |m| m["state"] == "queued",
    );
    ok(&ep, &["migration", "cancel", "3"]);
    let o = doomed.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(
        err.contains("clusterctl: error: migration 3 of VM waiter ended cancelled"),
        "{err}"
    );

    // Exit 5: a watched drain that is aborted (its move waits for the busy slots).
    let watched = spawn(&["node", "drain", &owner.to_string(), "--watch"]);
    wait_json(
        &c,
        &ep,
        &["drain", "show", &owner.to_string()],
        "the drain running",
        |j| j["status"] == "running",
    );
    ok(&ep, &["drain", "abort", &owner.to_string()]);
    let o = watched.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("ended aborted"), "{err}");
    ok(&ep, &["node", "resume", &owner.to_string()]);

    // Waiting in the queue: the command returns once the VM has moved.
    let waiter = std::process::Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .envs(cluster_tests::pki::pki().admin_env())
        .args(["--endpoint", &ep, "vm", "migrate", "waiter", "--to", &to])
        .env_remove("CLUSTERCTL_ENDPOINT")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    wait_json(
        &c,
        &ep,
        &["migration", "list", "--vm", "waiter"],
        "waiter's migration queued",
        |l| {
            l.as_array()
                .is_some_and(|l| l.iter().any(|m| m["state"] == "queued"))
        },
    );
    ok(&ep, &["migration", "cancel", "1"]);
    let o = waiter.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("migration 4 of VM waiter queued: a migration slot is busy"),
        "{err}"
    );
    assert!(err.contains("migration 4 succeeded:"), "{err}");
    assert!(out.contains("waiter"), "{out}");
    assert_eq!(
        json(&ep, &["vm", "show", "waiter"])["owner_id"].as_u64(),
        Some(3 - owner)
    );
    let hog = json(&ep, &["migration", "show", "1"]);
    assert_eq!(hog["state"], "cancelled", "{hog}");
}
