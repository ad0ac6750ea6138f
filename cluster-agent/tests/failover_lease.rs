//! Failover timing and fencing with real agents (see `liveness.rs`): the leader owning a
//! VM is killed — the VM restarts elsewhere while the survivors' VMs keep running through
//! the election (no fencing on a leader change); a node cut off from the majority fences
//! its own VMs.

use cluster_proto::EnumName;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Instant;

use cluster_proto::vms as pb;
use cluster_tests::vm::{guest_spec, mem_boot, vm_or_default};
use cluster_tests::{http_get, Cluster, WAIT};

fn guest(name: &str, owner: u64) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(50)),
        ..mem_boot()
    };
    pb::VmSpec {
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        preferred_owners: vec![owner],
        ..guest_spec(name, 64, boot)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_owner_kill9_fails_over_and_survivors_keep_their_vms() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let lead = cl.form(3).await;
    let lead = cl.check(lead);
    let follower = [1, 2, 3].into_iter().find(|n| *n != lead).unwrap_or(1);
    let mut c = cl.vms(follower).await;
    for (name, owner) in [("on-leader", lead), ("on-follower", follower)] {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(guest(name, owner)),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}{}", cl.logs()));
    }
    let a = cl.wait_runtime(follower, "on-leader", "running").await;
    let b = cl.wait_runtime(follower, "on-follower", "running").await;
    assert_eq!((a.owner_id, b.owner_id), (lead, follower));
    let (_, seq_b) = cl.heartbeat_after(follower, "on-follower", 0).await;

    let killed = Instant::now();
    let k = cl.kill9(lead);
    cl.check(k);
    let moved = cl
        .wait_vm(follower, "on-leader", "failed over", |v| {
            v.owner_id != lead && v.runtime().name() == "running"
        })
        .await;
    let (node, _) = cl.heartbeat_after(follower, "on-leader", 0).await;
    assert_eq!(node, moved.owner_id);
    eprintln!(
        "leader kill -9 -> on-leader heartbeat on node {node} after {} ms",
        killed.elapsed().as_millis()
    );
    // The follower's VM was never fenced or restarted through the election: same
    // generation, and its guest keeps counting from where it was.
    let v = vm_or_default(&mut c, "on-follower").await;
    assert_eq!(
        (v.owner_id, v.generation, v.runtime().name()),
        (follower, b.generation, "running"),
        "{v:?}{}",
        cl.logs()
    );
    let (node, seq) = cl.heartbeat_after(follower, "on-follower", seq_b).await;
    assert_eq!(node, follower);
    assert!(seq > seq_b);
    let log = cl.log_tail(follower, 400);
    let fenced = log.contains("vms fenced") || log.contains("its lease ran out (fenced)");
    assert!(!fenced, "a survivor fenced its VMs{}", cl.logs());
}

fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (_, body) = http_get(addr, "/metrics");
    body.lines()
        .filter(|l| l.starts_with("cluster_"))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| {
            v.parse()
                .ok()
                .map(|v| (cluster_tests::canonical_series(k), v))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_cut_off_from_the_majority_fences_its_vms() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let l = TcpListener::bind("127.0.1.3:0").unwrap_or_else(|e| panic!("{e}"));
    let maddr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop(l);
    let added = cl.add_node_with(3, &format!("metrics_addr = \"{maddr}\""));
    cl.check(added);
    let formed = cl.form(3).await;
    cl.check(formed);
    let mut c = cl.vms(3).await;
    c.create_vm(pb::CreateVmRequest {
        spec: Some(guest("alone", 3)),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    let v = cl.wait_runtime(3, "alone", "running").await;
    assert_eq!(v.owner_id, 3);
    let m = scrape(maddr);
    assert_eq!(m.get("cluster_lease_held{node=\"3\"}"), Some(&1.0), "{m:?}");
    assert_eq!(
        m.get("cluster_vms{node=\"3\",state=\"running\"}"),
        Some(&1.0),
        "{m:?}"
    );

    // Node 3 loses the majority: it must stop its VM on its own (nobody can tell it to).
    let k1 = cl.kill9(1);
    cl.check(k1);
    let k2 = cl.kill9(2);
    cl.check(k2);
    let start = Instant::now();
    cl.wait_until(
        "node 3 without its lease and without a running VM",
        WAIT,
        || async { Ok::<_, String>(scrape(maddr)) },
        |m| {
            m.get("cluster_lease_held{node=\"3\"}") == Some(&0.0)
                && m.get("cluster_vms{node=\"3\",state=\"running\"}") == Some(&0.0)
        },
    )
    .await;
    eprintln!(
        "isolated node fenced its VM {} ms after losing the majority",
        start.elapsed().as_millis()
    );
    // The fence watcher logs after the VMs are gone, so the metrics can show the fence a
    // moment before the log line is written.
    // (Its agent fences its worker, or the worker stopped the VM at its own deadline.)
    cl.wait_log_line(3, "vms fenced", |l| {
        l.contains("vms fenced") || l.contains("its lease ran out (fenced)")
    })
    .await;

    // The majority comes back: node 3 records that it fenced itself, and the VM (its
    // record still names node 3, which is Up again) runs again.
    for id in [1, 2] {
        let started = cl.start(id).await;
        cl.check(started);
    }
    let fenced = cl
        .wait_for(3, "a node_fenced event of node 3", WAIT, || async {
            let evs = cl.events(3).await?;
            Ok(evs
                .into_iter()
                .find(|e| e.kind().name() == "node_fenced" && e.node_id == 3))
        })
        .await;
    let fenced = cl.check(fenced);
    assert!(
        fenced.message.contains("alone") && fenced.message.contains("lease lapsed"),
        "{fenced:?}"
    );
    let v = cl.wait_runtime(1, "alone", "running").await;
    eprintln!(
        "after the majority returned, VM alone runs on node {}",
        v.owner_id
    );
}
