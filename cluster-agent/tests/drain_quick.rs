//! A drain whose only target cannot take a live migration (another migration subnet)
//! moves the VM by quick migration: saved to the shared volume, restored on the target,
//! with the guest's memory intact (its heartbeat sequence continues, its memory check
//! still passes) — "live where possible, quick otherwise", end to end. By hand, a live
//! migration across the subnets is refused with the reason and `--quick` goes.

use cluster_proto::drain as dpb;
use cluster_proto::migrations as gpb;
use cluster_proto::vms as pb;
use cluster_proto::EnumName;
use cluster_tests::vm::{guest_spec, mem_boot};
use cluster_tests::{Cluster, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_migrate_use_quick_migration_where_live_is_impossible() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let (_csv, volume) = cl.shared_volume();
    for id in [1, 2] {
        let added = cl.add_node_with(id, &volume);
        cl.check(added);
    }
    // Node 3 migrates on another subnet: nothing can live-migrate to it.
    let added = cl.add_node_with(3, &format!("migration_subnet = \"127.0.2.0/25\"\n{volume}"));
    cl.check(added);
    let formed = cl.form(3).await;
    cl.check(formed);

    let mut vms = cl.vms(2).await;
    let mut spec = guest_spec(
        "q",
        64,
        pb::TestGuestBoot {
            heartbeat_interval: Some(cluster_proto::times::duration_from_ms(50)),
            ..mem_boot()
        },
    );
    spec.preferred_owners = vec![1];
    vms.create_vm(pb::CreateVmRequest {
        spec: Some(spec),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    let (node, before) = cl.heartbeat_after(2, "q", 5).await;
    assert_eq!(node, 1, "created on its preferred owner");

    // Node 2 takes no new VMs, so node 3 is the drain's only target.
    let paused = cl.pause(2, 2).await;
    cl.check(paused);

    let mut drains = cl.drains(2).await;
    let plan = drains
        .drain_node(dpb::DrainNodeRequest {
            node_id: 1,
            dry_run: true,
        })
        .await
        .unwrap_or_else(|e| panic!("dry run: {e}{}", cl.logs()))
        .into_inner()
        .plan;
    assert_eq!(plan.len(), 1, "{plan:?}");
    assert_eq!(
        (plan[0].to_node_id, plan[0].kind().name()),
        (3, "quick"),
        "{plan:?}"
    );
    assert!(
        plan[0]
            .why_not_live
            .iter()
            .any(|r| r.contains("127.0.2.0/25")),
        "{plan:?}"
    );

    drains
        .drain_node(dpb::DrainNodeRequest {
            node_id: 1,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()));
    let job = cl
        .wait_until(
            "the drain of node 1 ended",
            WAIT,
            || {
                let mut d = drains.clone();
                async move {
                    d.get_drain(dpb::GetDrainRequest { node_id: 1 })
                        .await
                        .map(|r| r.into_inner().job)
                }
            },
            |j| j.as_ref().is_some_and(|j| j.status().name() != "running"),
        )
        .await
        .unwrap_or_default();
    assert_eq!(job.status().name(), "done", "{job:?}{}", cl.logs());
    assert_eq!(job.moves.len(), 1, "{job:?}");
    assert_eq!(
        (
            job.moves[0].kind().name(),
            job.moves[0].status().name(),
            job.moves[0].to_node_id
        ),
        ("quick", "done", 3),
        "{job:?}"
    );

    // The guest was restored, not rebooted: its heartbeat sequence carries on, on node 3.
    let (node, after) = cl.heartbeat_after(2, "q", before).await;
    assert_eq!(node, 3, "the VM runs on node 3 now");
    assert!(after > before, "heartbeat went from {before} to {after}");

    let mut migs = cl.migrations(2).await;
    let recs = migs
        .list_migrations(gpb::ListMigrationsRequest {
            vm: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("list migrations: {e}"))
        .into_inner()
        .migrations;
    assert!(
        recs.iter().any(|m| m.kind().name() == "quick"
            && m.state().name() == "succeeded"
            && m.target_node_id == 3),
        "{recs:?}"
    );

    // By hand, back across the subnets: live is refused with the reason, quick goes.
    drains
        .resume_node(dpb::ResumeNodeRequest {
            node_id: 1,
            failback: false,
        })
        .await
        .unwrap_or_else(|e| panic!("resume node 1: {e}{}", cl.logs()));
    let live = vms
        .migrate_vm(pb::MigrateVmRequest {
            name: "q".into(),
            to_node_id: 1,
            ..Default::default()
        })
        .await;
    match live {
        Err(s) => assert!(s.message().contains("127.0.2.0/25"), "{s:?}"),
        Ok(r) => panic!("live migration across subnets was accepted: {r:?}"),
    }
    let plan = vms
        .plan_migration(pb::PlanMigrationRequest {
            name: "q".into(),
            to_node_id: 1,
            quick: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("quick dry run: {e}"))
        .into_inner();
    assert!(plan.go && plan.to_node_id == 1, "{plan:?}");
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "q".into(),
        to_node_id: 1,
        quick: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("quick migration back: {e}{}", cl.logs()));
    cl.wait_vm(2, "q", "back on node 1", |v| {
        v.owner_id == 1 && v.migrating_to == 0 && v.runtime().name() == "running"
    })
    .await;
    let (node, last) = cl.heartbeat_after(2, "q", after).await;
    assert_eq!(node, 1);
    assert!(last > after, "heartbeat went from {after} to {last}");
}
