//! Power saving for real (issue 17): real agents with real test guests. The power-saving
//! policy empties node 5 and puts it in standby by running its power-off command (a
//! script that records the call and SIGKILLs the agent, as a power cut would); node 5's
//! silence is not a failure (never Down, nothing failed over, no VM lost). A VM that
//! fits on no awake node wakes it: its power-on command records the call and the test,
//! playing the BMC, starts the agent again with its data dir; node 5 comes back up and
//! takes the VM. `node standby` drains first (and gives up, with the reason, when the
//! drain cannot be planned), `node wake` by hand, and a failing power command is reported
//! with its stderr and leaves the node up.

use cluster_proto::EnumName;
use std::net::SocketAddr;
use std::path::Path;

use cluster_proto::drain as dpb;
use cluster_proto::management as mpb;
use cluster_proto::vms as pb;
use cluster_tests::vm::{guest_spec, vm_name};
use cluster_tests::{http_get, metric_sample, Cluster, WAIT};

fn free_port(ip: [u8; 4]) -> SocketAddr {
    cluster_tests::free_port(ip).unwrap_or_else(|e| panic!("{e}"))
}

fn idle(name: &str, memory_mib: u64, preferred: u64) -> pb::VmSpec {
    pb::VmSpec {
        preferred_owners: vec![preferred],
        ..guest_spec(
            name,
            memory_mib,
            pb::TestGuestBoot {
                workload: cluster_proto::vms::Workload::Idle as i32,
                heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
                ..Default::default()
            },
        )
    }
}

async fn set_policy(cl: &Cluster, mode: &str) {
    cl.drains(1)
        .await
        .set_policy(dpb::SetPolicyRequest {
            policy: Some(dpb::PolicySpec {
                mode: dpb::BalanceMode::from_name(mode).map_or(99, |m| m as i32),
                aggressiveness: dpb::Aggressiveness::from_name("medium").map_or(99, |a| a as i32),
                interval: Some(cluster_proto::times::duration_from_ms(1_000)),
                min_dwell: Some(cluster_proto::times::duration_from_ms(1_000)),
                migration_cost_bp_per_s: Some(1),
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("policy: {e}{}", cl.logs()));
}

/// The calls recorded by node 5's power commands ("off", "on", "off-failed").
fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("power-calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_pid(cl: &Cluster, dir: &Path) {
    let pid = cl.pid(5).expect("node 5 runs");
    std::fs::write(dir.join("pid-5"), pid.to_string()).expect("pid file");
}

async fn wait_calls(cl: &Cluster, dir: &Path, what: &str, n: usize) {
    cl.wait_until(
        &format!("{n} {what:?} power call(s) recorded"),
        WAIT,
        || async { Ok::<_, String>(calls(dir)) },
        |c: &Vec<String>| c.iter().filter(|l| *l == what).count() >= n,
    )
    .await;
}

async fn node(cl: &Cluster, via: u64, id: u64) -> mpb::NodeInfo {
    cl.check(cl.nodes(via).await)
        .into_iter()
        .find(|n| n.node_id == id)
        .expect("node listed")
}

/// Wait until every awake node has not heard node 5 for three `down_after`s (each
/// reports it in `cluster_peer_silence_seconds`): long past when silence would mark it Down.
async fn wait_silence(cl: &Cluster, metrics: &[SocketAddr]) {
    for (i, addr) in metrics.iter().take(4).enumerate() {
        let series = format!(
            "cluster_peer_silence_seconds{{node=\"{}\",peer=\"5\"}}",
            i + 1
        );
        cl.wait_until(
            &format!("node {} has not heard node 5 for 6 s", i + 1),
            WAIT,
            || async { Ok::<_, String>(http_get(*addr, "/metrics").1) },
            |body: &String| metric_sample(body, &series).is_some_and(|v| v >= 6.0),
        )
        .await;
    }
}

async fn all_running(cl: &Cluster, names: &[&str]) -> Vec<pb::VmInfo> {
    cl.wait_until(
        "every VM running",
        WAIT,
        || cl.read_vms(1),
        |all: &Vec<pb::VmInfo>| {
            names.iter().all(|n| {
                all.iter()
                    .any(|v| vm_name(v) == *n && v.runtime().name() == "running")
            })
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_saving_puts_a_node_in_standby_and_wakes_it_for_load() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let dir = cl.dir().to_path_buf();
    // Node 5's power-off: record, then fail if told to (a BMC that does not answer), else
    // SIGKILL its agent. Its power-on: record (the test starts the agent).
    let off = dir.join("power-off.sh");
    std::fs::write(
        &off,
        format!(
            "d={}\nif [ -e \"$d/fail-off\" ]; then echo off-failed >> \"$d/power-calls\"; echo \"no BMC answers for $VMCLUSTER_NODE_NAME\" >&2; exit 3; fi\necho off >> \"$d/power-calls\"\nkill -9 \"$(cat \"$d/pid-5\")\"\n",
            dir.display()
        ),
    )
    .expect("script");
    let on = format!("echo on >> {}/power-calls", dir.display());
    let mut metrics = Vec::new();
    // Nodes 1-4: 1 GiB each, always on (no power commands). Node 5: 4 GiB, power-managed.
    for id in 1..=5u64 {
        let a = free_port([127, 0, 1, id as u8]);
        let (mem, power) = if id == 5 {
            (
                4u64 << 30,
                format!(
                    "power_off_command = [\"sh\", \"{}\"]\npower_on_command = [\"sh\", \"-c\", \"{on}\"]\n",
                    off.display()
                ),
            )
        } else {
            (1 << 30, String::new())
        };
        let added = cl.add_node_with(
            id,
            &format!(
                "metrics_addr = \"{a}\"\n{power}[facts_override]\nlogical_cpus = 4\nmemory_bytes = {mem}\n"
            ),
        );
        cl.check(added);
        metrics.push(a);
    }
    let formed = cl.form(5).await;
    cl.check(formed);
    write_pid(&cl, &dir);
    let shown = node(&cl, 1, 5).await;
    assert!(shown.power_control, "{shown:?}");
    assert!(!node(&cl, 1, 4).await.power_control);

    // Two small VMs on node 1, one on node 5.
    let mut c = cl.vms(1).await;
    for (n, on) in [("a1", 1), ("a2", 1), ("b", 5)] {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(idle(n, 128, on)),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create {n}: {e}{}", cl.logs()));
    }
    let placed = all_running(&cl, &["a1", "a2", "b"]).await;
    assert!(placed.iter().any(|v| vm_name(v) == "b" && v.owner_id == 5));

    // Power saving: node 5's VM moves to a node that runs VMs, node 5 goes to standby and
    // its power-off command runs once, stopping its agent.
    set_policy(&cl, "power-saving").await;
    let n5 = cl.check(cl.wait_node_state(1, 5, "standby", WAIT).await);
    assert!(n5.state_reason.contains("power saving"), "{n5:?}");
    wait_calls(&cl, &dir, "off", 1).await;
    let exited = cl.wait_exit(5, WAIT).await;
    cl.check(exited);
    // Its silence is expected: never Down, nothing failed over, no VM lost.
    wait_silence(&cl, &metrics).await;
    assert_eq!(node(&cl, 1, 5).await.state().name(), "standby");
    let all = all_running(&cl, &["a1", "a2", "b"]).await;
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|v| v.owner_id != 5), "{all:?}");
    let events = cl.check(cl.events(1).await);
    assert!(
        !events
            .iter()
            .any(|e| e.node_id == 5 && e.message.contains("-> down")),
        "{events:?}"
    );
    let (_, body) = http_get(metrics[0], "/metrics");
    assert_eq!(
        metric_sample(&body, "cluster_nodes_standby{node=\"1\"}"),
        Some(1.0),
        "{body}"
    );

    // Load that fits on no awake node (2 GiB; they have 1 GiB each) wakes node 5: the
    // create is refused with the reason, the power-on command runs, and once the agent is
    // back node 5 is up and takes the VM.
    set_policy(&cl, "none").await;
    let refused = c
        .create_vm(pb::CreateVmRequest {
            spec: Some(idle("big", 2048, 1)),
            start: true,
        })
        .await
        .expect_err("no awake node fits 2 GiB");
    assert!(
        refused.message().contains("being woken"),
        "{}",
        refused.message()
    );
    wait_calls(&cl, &dir, "on", 1).await;
    let woken = node(&cl, 1, 5).await;
    assert_eq!(woken.state().name(), "waking", "{woken:?}");
    assert!(woken.state_reason.contains("no room"), "{woken:?}");
    let started = cl.start(5).await;
    cl.check(started);
    write_pid(&cl, &dir);
    cl.check(cl.wait_node_state(1, 5, "up", WAIT).await);
    let big = cl.create_running(1, idle("big", 2048, 1)).await;
    assert_eq!(big.owner_id, 5, "{big:?}");

    // By hand: standby of a node whose VM cannot go anywhere is given up with the reason.
    let mut m = cl.check(cl.client(1).await);
    m.standby_node(mpb::StandbyNodeRequest {
        node_id: 5,
        reason: "maintenance window".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("standby: {e}{}", cl.logs()));
    cl.wait_until(
        "standby of node 5 cancelled",
        WAIT,
        || cl.events(1),
        |ev: &Vec<mpb::Event>| {
            ev.iter()
                .any(|e| e.node_id == 5 && e.message.contains("standby cancelled: cannot drain"))
        },
    )
    .await;
    assert_eq!(node(&cl, 1, 5).await.state().name(), "up");
    assert_eq!(calls(&dir).iter().filter(|c| *c == "off").count(), 1);

    // A failing power-off command: reported with its stderr, the node back up.
    c.stop_vm(pb::StopVmRequest { name: "big".into() })
        .await
        .unwrap_or_else(|e| panic!("stop: {e}{}", cl.logs()));
    cl.wait_runtime(1, "big", "stopped").await;
    c.delete_vm(pb::DeleteVmRequest { name: "big".into() })
        .await
        .unwrap_or_else(|e| panic!("delete: {e}{}", cl.logs()));
    std::fs::write(dir.join("fail-off"), "").expect("flag");
    m.standby_node(mpb::StandbyNodeRequest {
        node_id: 5,
        reason: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("standby: {e}{}", cl.logs()));
    wait_calls(&cl, &dir, "off-failed", 1).await;
    let failed = cl
        .wait_until(
            "the failed power-off reported",
            WAIT,
            || cl.events(1),
            |ev: &Vec<mpb::Event>| {
                ev.iter().any(|e| {
                    e.node_id == 5
                        && e.message
                            .contains("standby -> up: power-off command failed")
                        && e.message.contains("no BMC answers for node-5")
                })
            },
        )
        .await;
    assert!(!failed.is_empty());
    assert_eq!(node(&cl, 1, 5).await.state().name(), "up");
    let leader = cl.check(cl.wait_leader(&[1, 2, 3, 4, 5], WAIT).await);
    let (_, body) = http_get(metrics[leader as usize - 1], "/metrics");
    let series = format!(
        "cluster_power_commands_total{{action=\"off\",node=\"{leader}\",outcome=\"failed\"}}"
    );
    assert!(
        metric_sample(&body, &series).is_some_and(|v| v >= 1.0),
        "{body}"
    );

    // By hand, working: standby, then wake.
    std::fs::remove_file(dir.join("fail-off")).expect("flag");
    m.standby_node(mpb::StandbyNodeRequest {
        node_id: 5,
        reason: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("standby: {e}{}", cl.logs()));
    wait_calls(&cl, &dir, "off", 2).await;
    let exited = cl.wait_exit(5, WAIT).await;
    cl.check(exited);
    let n5 = node(&cl, 1, 5).await;
    assert_eq!(n5.state().name(), "standby", "{n5:?}");
    assert!(n5.state_reason.contains("by an operator"), "{n5:?}");
    // Standby cannot be left by `node resume`; `node wake` runs the power-on command.
    let e = m
        .set_node_state(mpb::SetNodeStateRequest {
            node_id: 5,
            state: cluster_proto::management::NodeState::Up as i32,
            reason: String::new(),
        })
        .await
        .expect_err("standby is left by wake only");
    assert!(e.message().contains("node wake 5"), "{}", e.message());
    m.wake_node(mpb::WakeNodeRequest {
        node_id: 5,
        reason: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("wake: {e}{}", cl.logs()));
    wait_calls(&cl, &dir, "on", 2).await;
    let started = cl.start(5).await;
    cl.check(started);
    cl.check(cl.wait_node_state(1, 5, "up", WAIT).await);
    all_running(&cl, &["a1", "a2", "b"]).await;
    // Neither wake-up passed through Down: a woken node is Up once its peers hear it too,
    // not Up on the leader's word and Down again on the peers' stale reports.
    let events = cl.check(cl.events(1).await);
    let downs: Vec<_> = events
        .iter()
        .filter(|e| e.node_id == 5 && e.message.contains("-> down"))
        .collect();
    assert!(downs.is_empty(), "{downs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_is_refused_without_power_commands_or_a_spare_majority() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::agents(Default::default());
    for id in 1..=3u64 {
        let power = if id == 3 {
            "power_off_command = [\"true\"]\npower_on_command = [\"true\"]\n"
        } else {
            ""
        };
        let added = cl.add_node_with(id, power);
        cl.check(added);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    let mut m = cl.check(cl.client(1).await);
    for (id, needle) in [
        (2, "no power_off_command"),
        (3, "at least 3 must stay up"),
        (9, "unknown node id 9"),
    ] {
        let e = m
            .standby_node(mpb::StandbyNodeRequest {
                node_id: id,
                reason: String::new(),
            })
            .await
            .expect_err("refused");
        assert!(e.message().contains(needle), "{id}: {}", e.message());
    }
    let e = m
        .wake_node(mpb::WakeNodeRequest {
            node_id: 3,
            reason: String::new(),
        })
        .await
        .expect_err("not in standby");
    assert!(
        e.message().contains("only a standby node can be woken"),
        "{}",
        e.message()
    );
    // A half-configured node is refused at start with the key named.
    let bad = cl.add_node_with(4, "power_off_command = [\"true\"]\n");
    cl.check(bad);
    let (ok, out) = cl.check(cl.run_to_exit(4, WAIT));
    assert!(
        !ok && out.contains("power_off_command") && out.contains("set together"),
        "{out}"
    );
}
