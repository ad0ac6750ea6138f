//! Migration management end to end with real `cluster-agent` processes on loopback:
//! replicated migration records, the progress stream (proxied from the source agent),
//! cancel with rollback, a deadline that is too short, options validation, list/show.

use cluster_proto::migrations as mpb;
use cluster_proto::vms as pb;
use cluster_proto::EnumName;
use cluster_tests::vm::{expect_code, guest_spec, vm_or_default};
use cluster_tests::{Cluster, WAIT};
use tonic::Code;

/// The bandwidth cap that holds a migration of the VM named by [`cluster_holding`] in
/// pre-copy: with a 1 ms blackout cap the budget is 1 KiB, which the page its source
/// always finds dirty never fits — on any machine, fast or slow, whatever the guest does.
const HOLD_BYTES_PER_S: u64 = 1 << 20;
/// Deadline of the held migrations: far beyond any test step.
const HOLD_DEADLINE_MS: u64 = 600_000;

fn guest(name: &str, workload: &str, memory_mib: u64, wss_mib: u64, rate_mbps: u64) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        workload: pb::Workload::from_name(workload).map_or(0, |w| w as i32),
        wss_mib,
        rate_mbps,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    guest_spec(name, memory_mib, boot)
}

/// A heartbeat of `name` (through `via`) above `after` with no memory error: the node
/// that produced it and its sequence number.
async fn heartbeat_after(cl: &Cluster, via: u64, name: &str, after: u64) -> (u64, u64) {
    let (node, hb) = cl
        .wait_heartbeat(via, name, |h| h.seq > after && h.mem_errors == 0)
        .await;
    (node, hb.seq)
}

/// A cluster of `n` VM agents whose live migrations of `held` never converge under a
/// 1 ms blackout cap ([`Cluster::hold_precopy`]).
async fn cluster_holding(n: u64, held: &str) -> (Cluster, u64) {
    let mut cl = Cluster::vm_agents();
    for id in 1..=n {
        let added = cl.add_node(id);
        cl.check(added);
    }
    let set = cl.hold_precopy(held);
    cl.check(set);
    let formed = cl.form(n).await;
    let leader = cl.check(formed);
    (cl, leader)
}

/// The finished record that the last message of migration `id`'s progress stream carries.
async fn final_record(cl: &Cluster, via: u64, id: u64) -> mpb::MigrationInfo {
    cl.watch_migration_until(via, id, "its end", |p| p.finished.is_some())
        .await
        .finished
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_cancel_deadline_records_and_bad_input() {
    let _serial = cluster_tests::serial().await;
    let (cl, _) = cluster_holding(2, "busy").await;
    let mut vm = cl.vms(1).await;
    // A guest that dirties memory fast (its migrations are held in pre-copy by a bandwidth
    // cap until cancelled or the deadline), and an easy one.
    for spec in [
        guest("busy", "dirty", 128, 64, 4000),
        guest("calm", "mem", 64, 8, 0),
    ] {
        vm.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    }
    let busy = cl.wait_settled(1, "busy").await;
    let calm = cl.wait_settled(1, "calm").await;
    let (src, other) = (busy.owner_id, 3 - busy.owner_id);
    // Watch through the node that is *not* the source: the stream is proxied.
    let mut mig = cl.migrations(other).await;

    // Bad options and ids are refused and change nothing.
    let bad = |max_downtime_ms: Option<u64>,
               deadline_ms: Option<u64>,
               bandwidth_bytes_per_s_max| pb::MigrateVmRequest {
        name: "busy".into(),
        max_downtime: max_downtime_ms.map(cluster_proto::times::duration_from_ms),
        deadline: deadline_ms.map(cluster_proto::times::duration_from_ms),
        bandwidth_bytes_per_s_max,
        ..Default::default()
    };
    for (req, needle) in [
        (bad(Some(0), None, None), "max_downtime_ms 0"),
        (
            pb::MigrateVmRequest {
                name: "busy".into(),
                max_downtime: Some(cluster_proto::times::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "max_downtime -1s is negative",
        ),
        (
            bad(Some(500), Some(400), None),
            "must exceed the max downtime",
        ),
        (
            bad(None, None, Some(4096)),
            "bandwidth_bytes_per_s_max 4096 is below the minimum",
        ),
    ] {
        expect_code(vm.migrate_vm(req).await, Code::InvalidArgument, needle);
    }
    expect_code(
        mig.cancel_migration(mpb::CancelMigrationRequest { id: 999 })
            .await,
        Code::NotFound,
        "no migration with id 999",
    );
    expect_code(
        mig.get_migration(mpb::GetMigrationRequest { id: 999 })
            .await,
        Code::NotFound,
        "999",
    );
    cl.barrier().await;
    let none = mig
        .list_migrations(mpb::ListMigrationsRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert!(none.migrations.is_empty(), "{none:?}");
    assert_eq!(vm_or_default(&mut vm, "busy").await.migrating_to, 0);

    // 1. Progress, then cancel: bytes sent grow while it is held in pre-copy, the VM
    // stays on the source.
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "busy".into(),
        to_node_id: other,
        max_downtime: Some(cluster_proto::times::duration_from_ms(1)),
        deadline: Some(cluster_proto::times::duration_from_ms(HOLD_DEADLINE_MS)),
        bandwidth_bytes_per_s_max: Some(HOLD_BYTES_PER_S),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate busy: {e}{}", cl.logs()));
    let rec = cl.running_migration(other, "busy", WAIT).await;
    assert_eq!(
        (
            rec.source_node_id,
            rec.target_node_id,
            rec.kind().name(),
            rec.max_downtime
                .as_ref()
                .map(cluster_proto::times::duration_string),
            rec.deadline
                .as_ref()
                .map(cluster_proto::times::duration_string),
            rec.bandwidth_bytes_per_s_max,
        ),
        (
            src,
            other,
            "live",
            Some("0.001s".to_owned()),
            Some(format!("{}s", HOLD_DEADLINE_MS / 1000)),
            HOLD_BYTES_PER_S
        )
    );
    let mut stream = cl.watch_migration(other, rec.id).await;
    let mut seen: Vec<mpb::WatchMigrationResponse> = Vec::new();
    let watched = tokio::time::timeout(WAIT, async {
        // Three growing figures of guest memory on the wire in pre-copy.
        while seen
            .iter()
            .filter(|p| {
                p.phase() == cluster_proto::migrations::MigrationPhase::PreCopy && p.bytes_sent > 0
            })
            .map(|p| p.bytes_sent)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            < 3
        {
            match stream.message().await {
                Ok(Some(p)) => seen.push(p),
                other => return Err(format!("{other:?}")),
            }
        }
        Ok(())
    })
    .await;
    assert!(
        matches!(watched, Ok(Ok(()))),
        "no growing pre-copy progress ({watched:?}): {seen:?}{}",
        cl.logs()
    );
    assert!(
        seen.iter().all(|p| p.finished.is_none()),
        "ended before the cancel: {seen:?}{}",
        cl.logs()
    );
    assert!(
        seen.windows(2)
            .all(|w| w[0].round <= w[1].round && w[0].bytes_sent <= w[1].bytes_sent),
        "progress went back: {seen:?}"
    );
    let (_, seq_before) = heartbeat_after(&cl, src, "busy", 0).await;
    let c = mig
        .cancel_migration(mpb::CancelMigrationRequest { id: rec.id })
        .await
        .unwrap_or_else(|e| panic!("cancel: {e}{}", cl.logs()))
        .into_inner()
        .migration
        .unwrap_or_default();
    assert!(c.cancel_requested, "{c:?}");
    expect_code(
        mig.cancel_migration(mpb::CancelMigrationRequest { id: rec.id })
            .await,
        Code::FailedPrecondition,
        "",
    );
    // The stream's last message carries the finished record.
    let last = final_record(&cl, other, rec.id).await;
    assert_eq!(last.state().name(), "cancelled", "{last:?}");
    assert!(last.reason.contains("cancel"), "{last:?}");
    let v = cl.wait_settled(1, "busy").await;
    assert_eq!(v.owner_id, src, "cancelled migration moved the VM: {v:?}");
    let (node, seq_after) = heartbeat_after(&cl, other, "busy", seq_before).await;
    assert_eq!(node, src, "heartbeat not from the source");
    assert!(seq_after > seq_before);
    expect_code(
        mig.cancel_migration(mpb::CancelMigrationRequest { id: rec.id })
            .await,
        Code::FailedPrecondition,
        "already cancelled",
    );

    // 2. A deadline too short to converge: the capped pre-copy round is cut at the
    // deadline, the migration fails cleanly, the VM is still on the source.
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "busy".into(),
        to_node_id: other,
        max_downtime: Some(cluster_proto::times::duration_from_ms(1)),
        deadline: Some(cluster_proto::times::duration_from_ms(1_500)),
        bandwidth_bytes_per_s_max: Some(HOLD_BYTES_PER_S),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate busy: {e}{}", cl.logs()));
    let rec2 = cl.running_migration(other, "busy", WAIT).await;
    let done2 = cl.migration_end(other, rec2.id, WAIT).await;
    assert_eq!(done2.state().name(), "failed", "{done2:?}");
    assert!(
        done2.reason.contains("deadline") && done2.reason.contains("converge"),
        "{done2:?}"
    );
    let v = cl.wait_settled(1, "busy").await;
    assert_eq!(v.owner_id, src);
    heartbeat_after(&cl, src, "busy", seq_after).await;

    // 3. A migration that succeeds: final message with blackout and matching receipts.
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "calm".into(),
        to_node_id: 3 - calm.owner_id,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate calm: {e}{}", cl.logs()));
    let rec3 = cl.running_migration(other, "calm", WAIT).await;
    let fin = final_record(&cl, other, rec3.id).await;
    assert_eq!(fin.state().name(), "succeeded", "{fin:?}");
    assert_eq!(fin.bandwidth_bytes_per_s_max, 0, "no cap: {fin:?}");
    let s = fin.stats.unwrap_or_default();
    assert!(
        cluster_proto::times::duration_us(s.blackout.as_ref().unwrap_or(&Default::default()))
            .unwrap_or(0)
            > 0
            && s.rounds >= 1
            && s.wire_bytes > 0,
        "{s:?}"
    );
    assert!(
        s.has_target_digest && s.source_digest == s.target_digest && s.receipt_matches,
        "{s:?}"
    );
    let moved = cl.wait_settled(1, "calm").await;
    assert_eq!(moved.owner_id, 3 - calm.owner_id);
    expect_code(
        mig.cancel_migration(mpb::CancelMigrationRequest { id: rec3.id })
            .await,
        Code::FailedPrecondition,
        "already succeeded",
    );

    // The records, from either replica.
    for via in [1, 2] {
        let mut m = cl.migrations(via).await;
        let all = m
            .list_migrations(mpb::ListMigrationsRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner()
            .migrations;
        let states: Vec<(&str, &str)> = all
            .iter()
            .map(|r| (r.vm.as_str(), r.state().name()))
            .collect();
        assert_eq!(
            states,
            vec![
                ("busy", "cancelled"),
                ("busy", "failed"),
                ("calm", "succeeded")
            ],
            "via {via}"
        );
        let only_calm = m
            .list_migrations(mpb::ListMigrationsRequest {
                vm: "calm".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner()
            .migrations;
        assert_eq!(only_calm.len(), 1);
        assert!(all
            .iter()
            .all(|r| cluster_proto::times::unix_ms(r.ended_at.as_ref())
                >= cluster_proto::times::unix_ms(r.started_at.as_ref())
                && cluster_proto::times::unix_ms(r.ended_at.as_ref()) > 0));
    }
}

/// One live migration per node at a time: `vm migrate` while a slot of the source or the
/// target is busy queues the migration instead of refusing it (unless `no_queue`); queued
/// migrations start in order as the slot frees up — also after the leader was killed (the
/// queue is replicated state; the new leader runs it) —, a queued one can be cancelled at
/// once, and one whose VM was stopped meanwhile is dropped with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_slots_queue_migrations_that_start_in_order() {
    let _serial = cluster_tests::serial().await;
    let (mut cl, leader) = cluster_holding(3, "hog").await;
    // Every VM on follower `a`; `b_node` the other follower; the leader dies later on.
    let mut followers = [1, 2, 3].into_iter().filter(|n| *n != leader);
    let (a, b_node) = (followers.next().unwrap_or(2), followers.next().unwrap_or(3));
    let mut vm = cl.vms(a).await;
    let mut specs = vec![guest("hog", "dirty", 128, 64, 4000)];
    for name in ["b", "c", "d", "e"] {
        specs.push(guest(name, "mem", 64, 8, 0));
    }
    for mut spec in specs {
        spec.preferred_owners = vec![a];
        vm.create_vm(pb::CreateVmRequest {
            spec: Some(spec),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    }
    for name in ["hog", "b", "c", "d", "e"] {
        let v = cl.wait_settled(a, name).await;
        assert_eq!(v.owner_id, a, "{name}");
    }
    let mut mig = cl.migrations(b_node).await;
    let migrate = |name: &str, to: u64| pb::MigrateVmRequest {
        name: name.into(),
        to_node_id: to,
        max_downtime: Some(cluster_proto::times::duration_from_ms(1)),
        deadline: Some(cluster_proto::times::duration_from_ms(HOLD_DEADLINE_MS)),
        bandwidth_bytes_per_s_max: Some(HOLD_BYTES_PER_S),
        ..Default::default()
    };

    // The hog is held in pre-copy by its bandwidth cap: its migration holds both
    // followers' slots until cancelled.
    let r = vm
        .migrate_vm(migrate("hog", b_node))
        .await
        .unwrap_or_else(|e| panic!("migrate hog: {e}{}", cl.logs()))
        .into_inner();
    assert_eq!(r.queued_migration_id, 0);
    let hog = cl.running_migration(b_node, "hog", WAIT).await;

    // b to node 3 and c anywhere: queued, holding no slot.
    let qb = vm
        .migrate_vm(pb::MigrateVmRequest {
            max_downtime: (None).map(cluster_proto::times::duration_from_ms),
            deadline: (None).map(cluster_proto::times::duration_from_ms),
            bandwidth_bytes_per_s_max: None,
            ..migrate("b", b_node)
        })
        .await
        .unwrap_or_else(|e| panic!("migrate b: {e}{}", cl.logs()))
        .into_inner();
    assert_ne!(qb.queued_migration_id, 0, "{qb:?}");
    assert_eq!(qb.vm.as_ref().map(|v| v.migrating_to), Some(0));
    let qc = vm
        .migrate_vm(pb::MigrateVmRequest {
            max_downtime: (None).map(cluster_proto::times::duration_from_ms),
            deadline: (None).map(cluster_proto::times::duration_from_ms),
            bandwidth_bytes_per_s_max: None,
            ..migrate("c", 0)
        })
        .await
        .unwrap_or_else(|e| panic!("migrate c: {e}{}", cl.logs()))
        .into_inner();
    assert!(qc.queued_migration_id > qb.queued_migration_id);
    let qd = vm
        .migrate_vm(migrate("d", leader))
        .await
        .unwrap_or_else(|e| panic!("migrate d: {e}{}", cl.logs()))
        .into_inner();
    assert_ne!(qd.queued_migration_id, 0);
    // Refusals: a second migration of a queued VM; `no_queue` while a slot is busy.
    expect_code(
        vm.migrate_vm(migrate("b", leader)).await,
        Code::FailedPrecondition,
        &format!("already has migration {} queued", qb.queued_migration_id),
    );
    expect_code(
        vm.migrate_vm(pb::MigrateVmRequest {
            no_queue: true,
            ..migrate("e", b_node)
        })
        .await,
        Code::FailedPrecondition,
        "live migration(s) and the policy allows 1 at a time",
    );
    let listed = mig
        .list_migrations(mpb::ListMigrationsRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner()
        .migrations;
    let states: Vec<(String, String)> = listed
        .iter()
        .map(|m| (m.vm.clone(), m.state().name().to_owned()))
        .collect();
    assert_eq!(
        states,
        [
            ("hog", "running"),
            ("b", "queued"),
            ("c", "queued"),
            ("d", "queued")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .to_vec()
    );

    // A queued migration is cancelled at once; one whose VM stops is dropped.
    let cancelled = mig
        .cancel_migration(mpb::CancelMigrationRequest {
            id: qc.queued_migration_id,
        })
        .await
        .unwrap_or_else(|e| panic!("cancel c: {e}"))
        .into_inner()
        .migration
        .unwrap_or_default();
    assert_eq!(cancelled.state().name(), "cancelled", "{cancelled:?}");
    vm.stop_vm(pb::StopVmRequest { name: "d".into() })
        .await
        .unwrap_or_else(|e| panic!("stop d: {e}"));
    let dropped = cl.migration_end(b_node, qd.queued_migration_id, WAIT).await;
    assert_eq!(dropped.state().name(), "failed", "{dropped:?}");
    assert!(
        dropped.reason.contains("dropped from the queue"),
        "{dropped:?}"
    );

    // The leader dies: the queue is replicated, the new leader runs it. The hog's
    // migration is cancelled (through the new leader, once there is one): b starts on the
    // freed slots and moves.
    let killed = cl.kill9(leader);
    cl.check(killed);
    cl.wait_until(
        "the hog's cancel accepted",
        WAIT,
        || {
            let mut mig = mig.clone();
            async move {
                match mig
                    .cancel_migration(mpb::CancelMigrationRequest { id: hog.id })
                    .await
                {
                    Ok(_) => Ok("accepted"),
                    // An earlier attempt that timed out may have committed it.
                    Err(s) if s.code() == Code::FailedPrecondition => Ok("already cancelling"),
                    Err(s) => Err(s),
                }
            }
        },
        |_| true,
    )
    .await;
    let hog_end = cl.migration_end(b_node, hog.id, WAIT).await;
    assert_eq!(hog_end.state().name(), "cancelled", "{hog_end:?}");
    let b = cl.migration_end(b_node, qb.queued_migration_id, WAIT).await;
    assert_eq!(b.state().name(), "succeeded", "{b:?}{}", cl.logs());
    assert_eq!((b.source_node_id, b.target_node_id), (a, b_node));
    assert!(
        cluster_proto::times::unix_ms(b.started_at.as_ref())
            >= cluster_proto::times::unix_ms(hog_end.ended_at.as_ref()),
        "b started at {} while the hog's migration ran until {}",
        cluster_proto::times::unix_ms(b.started_at.as_ref()),
        cluster_proto::times::unix_ms(hog_end.ended_at.as_ref())
    );
    let v = cl.wait_settled(a, "b").await;
    assert_eq!(v.owner_id, b_node);
    let c = vm_or_default(&mut vm, "c").await;
    assert_eq!((c.owner_id, c.runtime().name()), (a, "running"));
}
