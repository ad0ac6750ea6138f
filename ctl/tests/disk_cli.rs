//! `clusterctl disk create|list|locks`, `vm create --disk`, `vm migrate --quick` and
//! `vm disk attach|detach` against a real two-node cluster whose agents share one
//! directory as volume `vol`.

mod common;

use common::*;
use std::time::{Duration, Instant};

use cluster_tests::{locate_binary, Cluster, Options};

const WAIT: Duration = Duration::from_secs(90);

fn wait(c: &Cluster, what: &str, mut pred: impl FnMut() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(
            start.elapsed() < WAIT,
            "{what} did not happen\n{}\n{}",
            c.log_tail(1, 30),
            c.log_tail(2, 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn holders(ep: &str, disk: &str) -> Vec<u64> {
    let locks = json(ep, &["disk", "locks"]);
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
    let bin = locate_binary("cluster-agent", "cluster-agent").unwrap_or_else(|e| panic!("{e}"));
    let mut c = Cluster::new(bin, Options::default()).unwrap_or_else(|e| panic!("{e}"));
    let csv = c.dir().join("csv");
    std::fs::create_dir_all(&csv).unwrap_or_else(|e| panic!("{e}"));
    for id in 1..=2 {
        let extra = format!(
            "[[volumes]]\nname = \"vol\"\npath = \"{}\"\n",
            csv.display()
        );
        c.add_node_with(id, &extra)
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
    let mut owner = 0;
    wait(&c, "q1 running", || {
        let v = json(&ep, &["vm", "show", "q1"]);
        owner = v["owner_id"].as_u64().unwrap_or(0);
        v["runtime"] == "running"
    });
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
    wait(&c, "d2 locked by the owner", || {
        holders(&ep, "vol/vms/d2.img") == vec![other]
    });
    refused(
        &ep,
        &["vm", "disk", "attach", "q1", "vol/vms/d2.img"],
        "already attached",
    );
    let o = ctl(&ep, &["vm", "disk", "detach", "q1", "vol/vms/d2.img"]);
    assert!(o.status.success(), "{}", text(&o).1);
    wait(&c, "d2 released", || {
        holders(&ep, "vol/vms/d2.img").is_empty()
    });
    refused(
        &ep,
        &["vm", "disk", "detach", "q1", "vol/vms/d2.img"],
        "not attached",
    );

    let o = ctl(&ep, &["vm", "stop", "q1"]);
    assert!(o.status.success(), "{}", text(&o).1);
    wait(&c, "d1 released", || {
        holders(&ep, "vol/vms/d1.img").is_empty()
    });

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
    wait(&c, "r1 and r2 running", || {
        ["r1", "r2"]
            .iter()
            .all(|v| json(&ep, &["vm", "show", v])["runtime"] == "running")
    });
    wait(&c, "both readers hold the shared lock", || {
        let mut h = holders(&ep, "vol/vms/ro.img");
        h.sort_unstable();
        h == vec![1, 2]
    });
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
