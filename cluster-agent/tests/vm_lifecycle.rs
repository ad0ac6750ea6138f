//! VM lifecycle end to end with real `cluster-agent` processes on loopback: VMs are
//! placed by the scheduler on the leader, committed through Raft, run by the owning
//! agent's embedded VMM (the PVH test guest), and their consoles are streamed from any
//! agent.

use cluster_proto::EnumName;
use std::time::Instant;

use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_tests::vm::{cpu_vendor_toml, expect_code, get_vm, guest_spec, mem_boot};
use cluster_tests::{Cluster, WAIT};
use tonic::transport::Channel;
use tonic::Code;

fn spec(name: &str, vcpus: u32, memory_mib: u64) -> pb::VmSpec {
    pb::VmSpec {
        vcpus,
        anti_affinity: vec!["lifecycle-test".into()],
        ..guest_spec(name, memory_mib, mem_boot())
    }
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
    let mut cl = Cluster::vm_agents();
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
    let a = cl.wait_runtime(3, "vm-a", "running").await;
    let b = cl.wait_runtime(3, "vm-b", "running").await;
    assert_ne!(
        a.owner_id, b.owner_id,
        "anti-affinity keeps the two VMs apart"
    );

    // Consoles stream from the owner, whichever agent is asked.
    let (node_a, seq_a) = cl.heartbeat_after(1, "vm-a", 0).await;
    assert_eq!(node_a, a.owner_id);
    let (node_b, seq_b) = cl.heartbeat_after(a.owner_id, "vm-b", 0).await;
    assert_eq!(node_b, b.owner_id);

    // Bad input: clear errors, nothing changes.
    // What a refused request could change: the records, not the demand measured meanwhile.
    let state = |mut vms: Vec<pb::VmInfo>| {
        for v in &mut vms {
            v.demand = None;
        }
        vms
    };
    let before = state(cl.list_vms(2).await);
    let create = |s: pb::VmSpec| pb::CreateVmRequest {
        spec: Some(s),
        start: true,
    };
    let mut bad_workload = spec("badwl", 1, 64);
    bad_workload.boot = Some(pb::vm_spec::Boot::TestGuest(pb::TestGuestBoot {
        workload: 42,
        ..Default::default()
    }));
    for (req, code, needle) in [
        (spec("vm-a", 1, 64), Code::AlreadyExists, "already exists"),
        (spec("zero", 0, 64), Code::InvalidArgument, "vcpus"),
        (spec("many", 33, 64), Code::InvalidArgument, "vcpus"),
        (spec("nomem", 1, 0), Code::InvalidArgument, "memory_mib"),
        (
            spec("huge", 1, 1 << 20),
            Code::InvalidArgument,
            "largest node",
        ),
        (bad_workload, Code::InvalidArgument, "workload"),
    ] {
        expect_code(c2.create_vm(create(req)).await, code, needle);
    }
    for (call, name, code, needle) in [
        ("stop", "ghost", Code::NotFound, "ghost"),
        (
            "delete",
            "vm-a",
            Code::FailedPrecondition,
            "stop it before deleting",
        ),
        ("start", "vm-a", Code::FailedPrecondition, "already started"),
    ] {
        let r = match call {
            "stop" => c2
                .stop_vm(pb::StopVmRequest { name: name.into() })
                .await
                .map(|_| ()),
            "delete" => c2
                .delete_vm(pb::DeleteVmRequest { name: name.into() })
                .await
                .map(|_| ()),
            _ => c2
                .start_vm(pb::StartVmRequest { name: name.into() })
                .await
                .map(|_| ()),
        };
        expect_code(r, code, needle);
    }
    expect_code(
        c2.why_not(pb::WhyNotRequest {
            vm: "vm-a".into(),
            node_id: 99,
        })
        .await,
        Code::NotFound,
        "99",
    );
    cl.barrier().await;
    let after = state(cl.list_vms(2).await);
    assert_eq!(before, after, "refused requests changed nothing");
    assert_eq!(after.len(), 2);

    // kill -9 of the agent that runs neither VM does not disturb them: once the cluster
    // has declared it down (the only decision its loss leads to), both VMs still run on
    // their owners, same generation, their guests still counting.
    let bystander = [1, 2, 3]
        .into_iter()
        .find(|n| *n != a.owner_id && *n != b.owner_id)
        .unwrap_or(0);
    let killed = cl.kill9(bystander);
    cl.check(killed);
    let survivor = a.owner_id;
    cl.check(cl.wait_node_state(survivor, bystander, "down", WAIT).await);
    cl.barrier().await;
    let (_, seq_a2) = cl.heartbeat_after(survivor, "vm-a", seq_a).await;
    assert!(seq_a2 > seq_a);
    cl.heartbeat_after(survivor, "vm-b", seq_b).await;
    let a2 = cl.wait_runtime(survivor, "vm-a", "running").await;
    assert_eq!((a2.owner_id, a2.generation), (a.owner_id, a.generation));
    let b2 = cl.wait_runtime(survivor, "vm-b", "running").await;
    assert_eq!((b2.owner_id, b2.generation), (b.owner_id, b.generation));

    // Stop: the owner stops the VM, reports Stopped, and its VMM no longer has it.
    let mut cs = cl.vms(survivor).await;
    let r = cs
        .stop_vm(pb::StopVmRequest {
            name: "vm-a".into(),
        })
        .await
        .unwrap_or_else(|s| panic!("stop: {s}{}", cl.logs()));
    assert_eq!(
        r.into_inner().vm.unwrap_or_default().desired().name(),
        "stopped"
    );
    let stopped = cl.wait_runtime(survivor, "vm-a", "stopped").await;
    assert_eq!(stopped.owner_id, a.owner_id);
    expect_code(
        cs.stream_console(pb::StreamConsoleRequest {
            name: "vm-a".into(),
            follow: false,
            ..Default::default()
        })
        .await
        .map(|_| ()),
        Code::FailedPrecondition,
        "not running",
    );
    // The other VM keeps running; the stopped one can be deleted.
    cl.heartbeat_after(survivor, "vm-b", seq_b).await;
    cs.delete_vm(pb::DeleteVmRequest {
        name: "vm-a".into(),
    })
    .await
    .unwrap_or_else(|s| panic!("delete: {s}{}", cl.logs()));
    let left = cl.list_vms(survivor).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].spec.as_ref().map(|s| s.name.as_str()), Some("vm-b"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_kill9_restarts_its_vm_on_a_survivor() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let formed = cl.form(3).await;
    cl.check(formed);
    let mut s = spec("vm-f", 1, 64);
    s.restart_priority = cluster_proto::vms::RestartPriority::High as i32;
    let before = cl.create_running(1, s).await;
    let owner = before.owner_id;
    let survivor = [1, 2, 3].into_iter().find(|n| *n != owner).unwrap_or(0);
    let (_, seq) = cl.heartbeat_after(survivor, "vm-f", 0).await;
    assert!(seq > 0);

    let killed_at = Instant::now();
    let killed = cl.kill9(owner);
    cl.check(killed);
    // Wait for a new owner to report Running, then for its first heartbeat.
    let after = cl
        .wait_vm(survivor, "vm-f", "restarted elsewhere", |v| {
            v.owner_id != owner && v.runtime().name() == "running"
        })
        .await;
    let (node, _) = cl.heartbeat_after(survivor, "vm-f", 0).await;
    let elapsed = killed_at.elapsed();
    assert_eq!(node, after.owner_id, "heartbeats come from the new owner");
    assert!(after.generation > before.generation);
    eprintln!(
        "failover: kill -9 of node {owner} -> first heartbeat of vm-f on node {} after {} ms",
        after.owner_id,
        elapsed.as_millis()
    );
    // The restarted VM is the only copy the cluster knows of; it keeps running.
    let (_, first) = cl.heartbeat_after(after.owner_id, "vm-f", 0).await;
    cl.heartbeat_after(after.owner_id, "vm-f", first).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_moves_a_running_vm_and_the_guest_keeps_counting() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
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
    let before = cl.wait_runtime(3, "vm-m", "running").await;
    let (_, seq_before) = cl.heartbeat_after(3, "vm-m", 0).await;

    // Refusals: same node, a VM that is not running, unknown VM.
    for (name, to_node_id, code, needle) in [
        (
            "vm-m",
            before.owner_id,
            Code::FailedPrecondition,
            "already runs on node",
        ),
        (
            "vm-off",
            0,
            Code::FailedPrecondition,
            "only a running VM can be migrated",
        ),
        ("ghost", 0, Code::NotFound, "ghost"),
    ] {
        let req = pb::MigrateVmRequest {
            name: name.into(),
            to_node_id,
            ..Default::default()
        };
        expect_code(c.migrate_vm(req).await, code, needle);
    }

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
    let after = cl
        .wait_vm(3, "vm-m", "migrated", |v| {
            v.migrating_to == 0 && v.runtime().name() == "running" && v.owner_id != before.owner_id
        })
        .await;
    assert_eq!(after.owner_id, target);
    assert!(after.generation > before.generation);
    // The guest continues where it was (its heartbeat sequence goes on, its memory
    // checks pass) and now runs on the target; the source no longer has it.
    let (node, seq_after) = cl
        .heartbeat_after(before.owner_id, "vm-m", seq_before)
        .await;
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
    let mut cl = Cluster::vm_agents();
    // Every node reports its CPU vendor (whatever the host has): nodes 1, 2 and 4 AMD,
    // node 3 Intel — a live migration between vendors is not possible.
    let amd = cpu_vendor_toml("AuthenticAMD");
    for (id, extra) in [
        (1, amd.clone()),
        (2, amd.clone()),
        (3, cpu_vendor_toml("GenuineIntel")),
        // Node 4 has the same CPUs but sits on another migration subnet.
        (4, format!("migration_subnet = \"127.0.2.0/25\"\n{amd}")),
    ] {
        let added = cl.add_node_with(id, &extra);
        cl.check(added);
    }
    let formed = cl.form(4).await;
    cl.check(formed);
    let mut c = cl.vms(2).await;
    let mut s = spec("amd-vm", 1, 64);
    s.preferred_owners = vec![1];
    let v = cl.create_running(2, s).await;
    assert_eq!(v.owner_id, 1, "preferred owner honoured");

    let why = why_not(&mut c, "amd-vm", 3).await;
    assert!(
        why.iter()
            .any(|r| r.contains("Intel CPUs") && r.contains("needs AMD")),
        "{why:?}"
    );
    let ok = why_not(&mut c, "amd-vm", 2).await;
    assert!(ok.is_empty(), "{ok:?}");
    let to = |to_node_id| pb::MigrateVmRequest {
        name: "amd-vm".into(),
        to_node_id,
        ..Default::default()
    };
    let plan = c
        .plan_migration(pb::PlanMigrationRequest {
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
    for (node, needle) in [(3, "Intel CPUs"), (4, "migrates on 127.0.2.0/25")] {
        expect_code(
            c.migrate_vm(to(node)).await,
            Code::FailedPrecondition,
            needle,
        );
    }
    cl.barrier().await;
    let after = get_vm(&mut c, "amd-vm").await.unwrap_or_default();
    assert_eq!(
        (after.owner_id, after.migrating_to),
        (1, 0),
        "state unchanged"
    );
}
