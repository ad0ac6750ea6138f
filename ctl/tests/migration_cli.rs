//! `clusterctl vm migrate` (progress bar, options) and `clusterctl migration
//! list|show|cancel` against a real two-node cluster.

mod common;

use common::*;

use cluster_tests::{locate_binary, Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_with_progress_then_list_show_and_refusals() {
    let _serial = cluster_tests::serial().await;
    let bin = locate_binary("cluster-agent", "cluster-agent").unwrap_or_else(|e| panic!("{e}"));
    let mut c = Cluster::new(bin, Options::default()).unwrap_or_else(|e| panic!("{e}"));
    c.form(2).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);
    let owner = create_running(&ep, "mover");
    let other = 3 - owner;

    // Bad options: refused with the option named, nothing recorded or moved.
    let o = ctl(&ep, &["vm", "migrate", "mover", "--max-downtime", "0"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
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
    // and the final line with the blackout and the receipt.
    let o = ctl(
        &ep,
        &[
            "vm",
            "migrate",
            "mover",
            "--to",
            &other.to_string(),
            "--max-downtime",
            "200",
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
    let m = json(&ep, &["migration", "show", "1"]);
    assert_eq!(m["state"], "succeeded");
    assert_eq!(m["source"].as_u64(), Some(owner));
    assert_eq!(m["target"].as_u64(), Some(other));
    assert_eq!(m["max_downtime_ms"].as_u64(), Some(200));
    assert_eq!(m["stats"]["receipt_matches"], true);
    assert_eq!(m["stats"]["source_digest"], m["stats"]["target_digest"]);
    assert!(m["stats"]["blackout_us"].as_u64().unwrap_or(0) > 0, "{m}");
    let o = ctl(&ep, &["migration", "show", "1"]);
    let (out, _) = text(&o);
    assert!(out.contains("receipt            matches"), "{out}");

    // Refusals: unknown id, cancelling a finished migration.
    let o = ctl(&ep, &["migration", "show", "42"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("no migration with id 42"), "{err}");
    let o = ctl(&ep, &["migration", "cancel", "1"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("migration 1 already succeeded"), "{err}");
    assert_eq!(json(&ep, &["migration", "show", "1"])["state"], "succeeded");
}
