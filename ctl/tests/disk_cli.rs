//! `clusterctl disk create|list|locks`, `vm create --disk`, `vm migrate --quick` and
//! `vm disk attach|detach` against a real two-node cluster whose agents share one
//! directory as volume `vol`.

mod common;

use common::*;

use cluster_tests::{Cluster, Options, Wait, WAIT};

/// The holders of `disk`'s lock once `pred` holds for them.
fn wait_holders(c: &Cluster, ep: &str, disk: &str, what: &str, pred: impl Fn(&[u64]) -> bool) {
    let r = Wait::new(WAIT).until_blocking(
        &format!("lock of {disk}: {what}"),
        || try_json(ep, &["disk", "locks"]).map(|l| holders_in(&l, disk)),
        |h| pred(h),
    );
    c.check(r);
}

fn holders(ep: &str, disk: &str) -> Vec<u64> {
    holders_in(&json(ep, &["disk", "locks"]), disk)
}

fn holders_in(locks: &serde_json::Value, disk: &str) -> Vec<u64> {
    locks
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["disk"] == disk)
        .flat_map(|l| l["holders"].as_array().cloned().unwrap_or_default())
        .filter_map(|h| h.as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_commands_against_real_agents() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let (csv, volume) = c.shared_volume();
    for id in 1..=2 {
        c.add_node_with(id, &volume)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    c.form(2).await.unwrap_or_else(|e| panic!("{e}"));
    let ep = endpoint(&c, 1);

    let o = ctl(
        &ep,
        &["disk", "create", "vol/vms/d1.img", "--size-mib", "4"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("disk vol/vms/d1.img created (4 MiB)"), "{out}");
    assert!(csv.join("vms/d1.img").is_file());
    refused(
        &ep,
        &["disk", "create", "vol/vms/d1.img", "--size-mib", "4"],
        "already exists",
    );
    refused(
        &ep,
        &["disk", "create", "vol/a/../b.img", "--size-mib", "4"],
        "vol/a/../b.img",
    );
    refused(
        &ep,
        &["disk", "create", "vol/vms/d9.img", "--size-mib", "0"],
        "size_mib 0",
    );
    refused(
        &ep,
        &[
            "vm",
            "create",
            "q0",
            "--workload",
            "disk",
            "--disk",
            "vol/vms/nope.img",
        ],
        "does not exist",
    );

    let o = ctl(
        &ep,
        &[
            "vm",
            "create",
            "q1",
            "--workload",
            "disk",
            "--hb-ms",
            "100",
            "--disk",
            "vol/vms/d1.img",
        ],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let owner = wait_json(&c, &ep, &["vm", "show", "q1"], "q1 running", |v| {
        v["runtime"] == "running"
    })["owner_id"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(holders(&ep, "vol/vms/d1.img"), vec![owner]);
    let o = ctl(&ep, &["disk", "locks"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("DISK") && out.contains("vol/vms/d1.img") && out.contains("exclusive"),
        "{out}"
    );
    let list = json(&ep, &["disk", "list"]);
    assert_eq!(list["volumes"], serde_json::json!(["vol"]));
    let d1 = &list["disks"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["name"] == "vol/vms/d1.img").cloned())
        .unwrap_or_default();
    assert_eq!(d1["used_by"], serde_json::json!(["q1"]));

    // Quick migration to the other node; clusterctl waits for the end.
    let other = if owner == 1 { 2 } else { 1 };
    refused(&ep, &["vm", "migrate", "q1", "--quick", "--to", "99"], "99");
    let o = ctl(&ep, &["vm", "migrate", "q1", "--quick"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}\n{}", c.log_tail(owner, 30));
    let v = json(&ep, &["vm", "show", "q1"]);
    assert_eq!(v["owner_id"], other);
    assert_eq!(v["runtime"], "running");
    assert_eq!(holders(&ep, "vol/vms/d1.img"), vec![other]);

    // Hot-plug.
    let o = ctl(
        &ep,
        &["disk", "create", "vol/vms/d2.img", "--size-mib", "4"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let o = ctl(&ep, &["vm", "disk", "attach", "q1", "vol/vms/d2.img"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("VM q1 disks: vol/vms/d1.img, vol/vms/d2.img"),
        "{out}"
    );
    wait_holders(&c, &ep, "vol/vms/d2.img", "locked by the owner", |h| {
        h == [other]
    });
    refused(
        &ep,
        &["vm", "disk", "attach", "q1", "vol/vms/d2.img"],
        "already attached",
    );
    let o = ctl(&ep, &["vm", "disk", "detach", "q1", "vol/vms/d2.img"]);
    assert!(o.status.success(), "{}", text(&o).1);
    wait_holders(&c, &ep, "vol/vms/d2.img", "released", |h| h.is_empty());
    refused(
        &ep,
        &["vm", "disk", "detach", "q1", "vol/vms/d2.img"],
        "not attached",
    );

    let o = ctl(&ep, &["vm", "stop", "q1"]);
    assert!(o.status.success(), "{}", text(&o).1);
    wait_holders(&c, &ep, "vol/vms/d1.img", "released", |h| h.is_empty());

    // Read-only disks: two VMs share one (shared lock); a writer is refused.
    let o = ctl(
        &ep,
        &["disk", "create", "vol/vms/ro.img", "--size-mib", "4"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    for (vm, node) in [("r1", "1"), ("r2", "2")] {
        let o = ctl(
            &ep,
            &[
                "vm",
                "create",
                vm,
                "--workload",
                "idle",
                "--disk-ro",
                "vol/vms/ro.img",
                "--preferred-owner",
                node,
            ],
        );
        assert!(o.status.success(), "{}", text(&o).1);
    }
    for vm in ["r1", "r2"] {
        wait_json(&c, &ep, &["vm", "show", vm], "running", |v| {
            v["runtime"] == "running"
        });
    }
    wait_holders(
        &c,
        &ep,
        "vol/vms/ro.img",
        "both readers hold the shared lock",
        |h| {
            let mut h = h.to_vec();
            h.sort_unstable();
            h == [1, 2]
        },
    );
    let locks = json(&ep, &["disk", "locks"]);
    let ro = locks
        .as_array()
        .and_then(|a| a.iter().find(|l| l["disk"] == "vol/vms/ro.img").cloned())
        .unwrap_or_default();
    assert_eq!(ro["mode"], "shared");
    refused(
        &ep,
        &[
            "vm",
            "create",
            "w1",
            "--workload",
            "disk",
            "--disk",
            "vol/vms/ro.img",
        ],
        "used by VM(s)",
    );
}
