//! VM lifecycle end to end with real `cluster-agent` processes on loopback: VMs are
//! placed by the scheduler on the leader, committed through Raft, run by the owning
//! agent's embedded VMM (the PVH test guest), and their consoles are streamed from any
//! agent.

use std::time::{Duration, Instant};

use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_tests::vm::{expect_code, get_vm, guest_spec, hb_seq, mem_boot};
use cluster_tests::{Cluster, Options};
use tonic::transport::Channel;
use tonic::Code;

fn cluster() -> Cluster {
    Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"))
}

fn spec(name: &str, vcpus: u32, memory_mib: u64) -> pb::VmSpec {
    pb::VmSpec {
        vcpus,
        anti_affinity: vec!["lifecycle-test".into()],
        ..guest_spec(name, memory_mib, mem_boot())
    }
}

async fn wait_runtime(cl: &Cluster, via: u64, name: &str, want: &str) -> pb::VmInfo {
    let mut c = cl.vms(via).await;
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(60) {
        match get_vm(&mut c, name).await {
            Ok(v) if v.runtime == want => return v,
            Ok(v) => last = format!("{} ({})", v.runtime, v.reason),
            Err(s) => last = s.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "VM {name} did not become {want} (last: {last}){}",
        cl.logs()
    )
}

/// Read the console of `name` through node `via` until a heartbeat with `mem=ok` and a
/// sequence number above `after_seq` arrives; returns (node that produced it, seq).
async fn heartbeat(cl: &Cluster, via: u64, name: &str, after_seq: u64) -> (u64, u64) {
    let mut c = cl.vms(via).await;
    let mut stream = c
        .stream_console(pb::ConsoleRequest {
            name: name.into(),
            follow: true,
        })
        .await
        .unwrap_or_else(|s| panic!("console of {name} via {via}: {s}{}", cl.logs()))
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while Instant::now() < deadline {
        let next = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
        let Ok(Ok(Some(chunk))) = next else { break };
        for line in chunk.text.lines() {
            if let Some(seq) = hb_seq(line) {
                if line.contains("mem=ok") && seq > after_seq {
                    return (chunk.node_id, seq);
                }
            }
        }
        seen.push_str(&chunk.text);
        if seen.len() > 4096 {
            seen.drain(..seen.len() - 4096);
        }
    }
    panic!("no mem=ok heartbeat after seq {after_seq} from {name} via node {via}; console tail: {seen}{}", cl.logs())
}

/// The reasons `vm` cannot run on `node_id` (empty: it can).
async fn why_not(c: &mut VmServiceClient<Channel>, vm: &str, node_id: u64) -> Vec<String> {
    c.why_not(pb::WhyNotRequest {
        vm: vm.into(),
        node_id,
    })
    .await
    .unwrap_or_else(|e| panic!("why-not: {e}"))
    .into_inner()
    .reasons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_run_on_scheduled_nodes_stream_consoles_and_stop() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    let formed = cl.form(3).await;
    cl.check(formed);

    // Create two VMs through a follower-or-leader agent: the leader places them.
    let mut c2 = cl.vms(2).await;
    for name in ["vm-a", "vm-b"] {
        let r = c2
            .create_vm(pb::CreateVmRequest {
                spec: Some(spec(name, 1, 64)),
                start: true,
            })
            .await
            .unwrap_or_else(|s| panic!("create {name}: {s}{}", cl.logs()));
        let vm = r.into_inner().vm.unwrap_or_default();
        assert_ne!(vm.owner_id, 0, "{name} was placed");
    }
    let a = wait_runtime(&cl, 3, "vm-a", "running").await;
    let b = wait_runtime(&cl, 3, "vm-b", "running").await;
    assert_ne!(
        a.owner_id, b.owner_id,
        "anti-affinity keeps the two VMs apart"
    );

    // Consoles stream from the owner, whichever agent is asked.
    let (node_a, seq_a) = heartbeat(&cl, 1, "vm-a", 0).await;
    assert_eq!(node_a, a.owner_id);
    let (node_b, _) = heartbeat(&cl, a.owner_id, "vm-b", 0).await;
    assert_eq!(node_b, b.owner_id);

    // Bad input: clear errors, nothing changes.
    let before = c2
        .list_vms(pb::ListVmsRequest {})
        .await
        .map(|r| r.into_inner().vms)
        .unwrap_or_default();
    let create = |s: pb::VmSpec| pb::CreateVmRequest {
        spec: Some(s),
        start: true,
    };
    expect_code(
        c2.create_vm(create(spec("vm-a", 1, 64))).await,
        Code::AlreadyExists,
        "already exists",
    );
    expect_code(
        c2.create_vm(create(spec("zero", 0, 64))).await,
        Code::InvalidArgument,
        "vcpus",
    );
    expect_code(
        c2.create_vm(create(spec("many", 33, 64))).await,
        Code::InvalidArgument,
        "vcpus",
    );
    expect_code(
        c2.create_vm(create(spec("nomem", 1, 0))).await,
        Code::InvalidArgument,
        "memory_mib",
    );
    expect_code(
        c2.create_vm(create(spec("huge", 1, 1 << 20))).await,
        Code::InvalidArgument,
        "largest node",
    );
    let mut bad_workload = spec("badwl", 1, 64);
    bad_workload.boot = Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
        workload: "spin".into(),
        ..Default::default()
    }));
    expect_code(
        c2.create_vm(create(bad_workload)).await,
        Code::InvalidArgument,
        "workload",
    );
    expect_code(
        c2.stop_vm(pb::VmName {
            name: "ghost".into(),
        })
        .await,
        Code::NotFound,
        "ghost",
    );
    expect_code(
        c2.delete_vm(pb::VmName {
            name: "vm-a".into(),
        })
        .await,
        Code::FailedPrecondition,
        "stop it before deleting",
    );
    expect_code(
        c2.start_vm(pb::VmName {
            name: "vm-a".into(),
        })
        .await,
        Code::FailedPrecondition,
        "already started",
    );
    expect_code(
        c2.why_not(pb::WhyNotRequest {
            vm: "vm-a".into(),
            node_id: 99,
        })
        .await,
        Code::NotFound,
        "99",
    );
    let after = c2
        .list_vms(pb::ListVmsRequest {})
        .await
        .map(|r| r.into_inner().vms)
        .unwrap_or_default();
    assert_eq!(before, after, "refused requests changed nothing");
    assert_eq!(after.len(), 2);

    // kill -9 of the agent that runs neither VM does not disturb them.
    let bystander = [1, 2, 3]
        .into_iter()
        .find(|n| *n != a.owner_id && *n != b.owner_id)
        .unwrap_or(0);
    let killed = cl.kill9(bystander);
    cl.check(killed);
    let survivor = a.owner_id;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, seq_a2) = heartbeat(&cl, survivor, "vm-a", seq_a).await;
    assert!(seq_a2 > seq_a);
    heartbeat(&cl, survivor, "vm-b", 0).await;
    let a2 = wait_runtime(&cl, survivor, "vm-a", "running").await;
    assert_eq!((a2.owner_id, a2.generation), (a.owner_id, a.generation));

    // Stop: the owner stops the VM, reports Stopped, and its VMM no longer has it.
    let mut cs = cl.vms(survivor).await;
    let r = cs
        .stop_vm(pb::VmName {
            name: "vm-a".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("stop: {s}{}", cl.logs()));
    assert_eq!(r.into_inner().vm.unwrap_or_default().desired, "stopped");
    let stopped = wait_runtime(&cl, survivor, "vm-a", "stopped").await;
    assert_eq!(stopped.owner_id, a.owner_id);
    expect_code(
        cs.stream_console(pb::ConsoleRequest {
            name: "vm-a".into(),
            follow: false,
        })
        .await
        .map(|_| ()),
        Code::FailedPrecondition,
        "not running",
    );
    // The other VM keeps running; the stopped one can be deleted.
    heartbeat(&cl, survivor, "vm-b", 0).await;
    cs.delete_vm(pb::VmName {
        name: "vm-a".into(),
    })
    .await
    .unwrap_or_else(|s| panic!("delete: {s}{}", cl.logs()));
    let left = cs
        .list_vms(pb::ListVmsRequest {})
        .await
        .map(|r| r.into_inner().vms)
        .unwrap_or_default();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].spec.as_ref().map(|s| s.name.as_str()), Some("vm-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_kill9_restarts_its_vm_on_a_survivor() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    let formed = cl.form(3).await;
    cl.check(formed);
    let mut c1 = cl.vms(1).await;
    let mut s = spec("vm-f", 1, 64);
    s.restart_priority = "high".into();
    c1.create_vm(pb::CreateVmRequest {
        spec: Some(s),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    let before = wait_runtime(&cl, 1, "vm-f", "running").await;
    let owner = before.owner_id;
    let survivor = [1, 2, 3].into_iter().find(|n| *n != owner).unwrap_or(0);
    let (_, seq) = heartbeat(&cl, survivor, "vm-f", 0).await;
    assert!(seq > 0);

    let killed_at = Instant::now();
    let killed = cl.kill9(owner);
    cl.check(killed);
    // Wait for a new owner to report Running, then for its first heartbeat.
    let mut c = cl.vms(survivor).await;
    let after = loop {
        if let Ok(v) = get_vm(&mut c, "vm-f").await {
            if v.owner_id != owner && v.runtime == "running" {
                break v;
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "vm-f was not restarted elsewhere{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (node, _) = heartbeat(&cl, survivor, "vm-f", 0).await;
    let elapsed = killed_at.elapsed();
    assert_eq!(node, after.owner_id, "heartbeats come from the new owner");
    assert!(after.generation > before.generation);
    eprintln!(
        "failover: kill -9 of node {owner} -> first heartbeat of vm-f on node {} after {} ms",
        after.owner_id,
        elapsed.as_millis()
    );
    // The restarted VM is the only copy the cluster knows of; it keeps running.
    let (_, later) = heartbeat(&cl, after.owner_id, "vm-f", 0).await;
    assert!(later > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_moves_a_running_vm_and_the_guest_keeps_counting() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    let formed = cl.form(3).await;
    cl.check(formed);
    let mut c = cl.vms(3).await;
    for name in ["vm-m", "vm-off"] {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(spec(name, 1, 64)),
            start: name == "vm-m",
        })
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}{}", cl.logs()));
    }
    let before = wait_runtime(&cl, 3, "vm-m", "running").await;
    let (_, seq_before) = heartbeat(&cl, 3, "vm-m", 0).await;

    // Refusals: same node, a VM that is not running, unknown VM.
    expect_code(
        c.migrate_vm(pb::MigrateVmRequest {
            name: "vm-m".into(),
            to_node_id: before.owner_id,
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "already runs on node",
    );
    expect_code(
        c.migrate_vm(pb::MigrateVmRequest {
            name: "vm-off".into(),
            to_node_id: 0,
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "only a running VM can be migrated",
    );
    expect_code(
        c.migrate_vm(pb::MigrateVmRequest {
            name: "ghost".into(),
            to_node_id: 0,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "ghost",
    );

    let r = c
        .migrate_vm(pb::MigrateVmRequest {
            name: "vm-m".into(),
            to_node_id: 0,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()))
        .into_inner()
        .vm
        .unwrap_or_default();
    let target = r.migrating_to;
    assert!(target != 0 && target != before.owner_id, "{r:?}");
    let start = Instant::now();
    let after = loop {
        let v = get_vm(&mut c, "vm-m").await.unwrap_or_default();
        if v.migrating_to == 0 && v.runtime == "running" && v.owner_id != before.owner_id {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "migration did not finish: {v:?}{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(after.owner_id, target);
    assert!(after.generation > before.generation);
    // The guest continues where it was (its heartbeat sequence goes on, its memory
    // checks pass) and now runs on the target; the source no longer has it.
    let (node, seq_after) = heartbeat(&cl, before.owner_id, "vm-m", seq_before).await;
    assert_eq!(node, target);
    assert!(seq_after > seq_before);
    let events = cl.check(cl.events(1).await);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("vm-m migrated to node")
                && e.message.contains("receipt matches")),
        "{events:?}"
    );
    let mut src = cl.vms(before.owner_id).await;
    let v = get_vm(&mut src, "vm-m").await.unwrap_or_default();
    assert_eq!(v.owner_id, target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_cpu_vendor_or_subnet_target_is_refused_with_the_reason() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    for id in [1, 2] {
        let added = cl.add_node(id);
        cl.check(added);
    }
    // Node 3 claims Intel CPUs (the test machines are AMD): a live migration between
    // vendors is not possible.
    let added = cl.add_node_with(3, "[facts_override]\ncpu_vendor = \"GenuineIntel\"\n");
    cl.check(added);
    // Node 4 has the same CPUs but sits on another migration subnet.
    let added = cl.add_node_with(4, "migration_subnet = \"127.0.2.0/25\"\n");
    cl.check(added);
    let formed = cl.form(4).await;
    cl.check(formed);
    let mut c = cl.vms(2).await;
    let mut s = spec("amd-vm", 1, 64);
    s.preferred_owners = vec![1];
    c.create_vm(pb::CreateVmRequest {
        spec: Some(s),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    let v = wait_runtime(&cl, 2, "amd-vm", "running").await;
    assert_eq!(v.owner_id, 1, "preferred owner honoured");

    let why = why_not(&mut c, "amd-vm", 3).await;
    assert!(
        why.iter()
            .any(|r| r.contains("Intel CPUs") && r.contains("needs AMD")),
        "{why:?}"
    );
    let ok = why_not(&mut c, "amd-vm", 2).await;
    assert!(ok.is_empty(), "{ok:?}");
    expect_code(
        c.migrate_vm(pb::MigrateVmRequest {
            name: "amd-vm".into(),
            to_node_id: 3,
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "Intel CPUs",
    );
    let plan = c
        .plan_migration(pb::MigrateVmRequest {
            name: "amd-vm".into(),
            to_node_id: 3,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"))
        .into_inner();
    assert!(!plan.go, "{plan:?}");
    assert!(
        plan.reasons.iter().any(|r| r.contains("Intel CPUs")),
        "{plan:?}"
    );
    let why = why_not(&mut c, "amd-vm", 4).await;
    assert!(
        why.iter()
            .any(|r| r.contains("migrates on 127.0.2.0/25") && r.contains("127.0.2.0/24")),
        "{why:?}"
    );
    expect_code(
        c.migrate_vm(pb::MigrateVmRequest {
            name: "amd-vm".into(),
            to_node_id: 4,
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "migrates on 127.0.2.0/25",
    );
    let after = get_vm(&mut c, "amd-vm").await.unwrap_or_default();
    assert_eq!(
        (after.owner_id, after.migrating_to),
        (1, 0),
        "state unchanged"
    );
}
