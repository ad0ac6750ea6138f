//! Migration management end to end with real `cluster-agent` processes on loopback:
//! replicated migration records, the progress stream (proxied from the source agent),
//! cancel with rollback, a deadline that is too short, options validation, list/show.

use std::time::{Duration, Instant};

use cluster_proto::migrations as mpb;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_tests::vm::{expect_code, guest_spec, hb_seq, vm_or_default};
use cluster_tests::{Cluster, Options};
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(60);

fn guest(name: &str, workload: &str, memory_mib: u64, wss_mib: u64, rate_mbps: u64) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        workload: workload.into(),
        wss_mib,
        rate_mbps,
        hb_ms: 100,
        ..Default::default()
    };
    guest_spec(name, memory_mib, boot)
}

async fn wait_running(cl: &Cluster, c: &mut VmServiceClient<Channel>, name: &str) -> pb::VmInfo {
    let start = Instant::now();
    loop {
        let v = vm_or_default(c, name).await;
        if v.runtime == "running" && v.migrating_to == 0 {
            return v;
        }
        assert!(
            start.elapsed() < WAIT,
            "{name} not running: {v:?}{}",
            cl.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Highest heartbeat sequence number of `name` seen through `via` within a few seconds,
/// and the node that produced it.
async fn heartbeat_after(cl: &Cluster, via: u64, name: &str, after: u64) -> (u64, u64) {
    let mut c = cl.vms(via).await;
    let mut s = c
        .stream_console(pb::ConsoleRequest {
            name: name.into(),
            follow: true,
        })
        .await
        .unwrap_or_else(|e| panic!("console: {e}{}", cl.logs()))
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(5), s.message()).await
        else {
            break;
        };
        for line in chunk.text.lines() {
            if let Some(seq) = hb_seq(line) {
                if seq > after && line.contains("mem_errors=0") {
                    return (chunk.node_id, seq);
                }
            }
        }
    }
    panic!("no heartbeat of {name} after {after}{}", cl.logs())
}

/// The finished record that the last message of a progress stream carries.
async fn final_record(
    cl: &Cluster,
    stream: &mut tonic::Streaming<mpb::MigrationProgress>,
) -> mpb::MigrationInfo {
    loop {
        let p = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .unwrap_or_else(|_| panic!("no end of stream{}", cl.logs()))
            .unwrap_or_else(|e| panic!("progress stream: {e}"))
            .unwrap_or_else(|| panic!("stream ended without a final message"));
        if let Some(f) = p.finished {
            return f;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_cancel_deadline_records_and_bad_input() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"));
    let formed = cl.form(2).await;
    cl.check(formed);
    let mut vm = cl.vms(1).await;
    // A guest that dirties memory fast: with a 1 ms downtime goal pre-copy keeps going
    // round after round (until cancelled or the deadline), and an easy one.
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
    let busy = wait_running(&cl, &mut vm, "busy").await;
    let calm = wait_running(&cl, &mut vm, "calm").await;
    let (src, other) = (busy.owner_id, 3 - busy.owner_id);
    // Watch through the node that is *not* the source: the stream is proxied.
    let mut mig = cl.migrations(other).await;

    // Bad options and ids are refused and change nothing.
    let bad = |max_downtime_ms, deadline_ms| pb::MigrateVmRequest {
        name: "busy".into(),
        max_downtime_ms,
        deadline_ms,
        ..Default::default()
    };
    expect_code(
        vm.migrate_vm(bad(Some(0), None)).await,
        Code::InvalidArgument,
        "max_downtime_ms 0",
    );
    expect_code(
        vm.migrate_vm(bad(Some(500), Some(400))).await,
        Code::InvalidArgument,
        "must exceed the max downtime",
    );
    expect_code(
        mig.cancel_migration(mpb::MigrationId { id: 999 }).await,
        Code::NotFound,
        "no migration with id 999",
    );
    expect_code(
        mig.get_migration(mpb::MigrationId { id: 999 }).await,
        Code::NotFound,
        "999",
    );
    let none = mig
        .list_migrations(mpb::ListMigrationsRequest::default())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert!(none.migrations.is_empty(), "{none:?}");
    assert_eq!(vm_or_default(&mut vm, "busy").await.migrating_to, 0);

    // 1. Progress, then cancel: rounds increase, the VM stays on the source.
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "busy".into(),
        to_node_id: other,
        max_downtime_ms: Some(1),
        deadline_ms: Some(120_000),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate busy: {e}{}", cl.logs()));
    let rec = cl.running_migration(other, "busy", WAIT).await;
    assert_eq!(
        (
            rec.source_node_id,
            rec.target_node_id,
            rec.kind.as_str(),
            rec.max_downtime_ms,
            rec.deadline_ms
        ),
        (src, other, "live", 1, 120_000)
    );
    let mut stream = mig
        .watch_migration(mpb::MigrationId { id: rec.id })
        .await
        .unwrap_or_else(|e| panic!("watch: {e}{}", cl.logs()))
        .into_inner();
    let mut rounds = Vec::new();
    let mut sent = Vec::new();
    let start = Instant::now();
    while rounds.last().copied().unwrap_or(0) < 3 {
        let p = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .unwrap_or_else(|_| panic!("no progress within 10 s (rounds {rounds:?}){}", cl.logs()))
            .unwrap_or_else(|e| panic!("progress stream: {e}"))
            .unwrap_or_else(|| panic!("stream ended early (rounds {rounds:?}){}", cl.logs()));
        assert!(
            p.finished.is_none(),
            "ended before the cancel: {p:?}{}",
            cl.logs()
        );
        rounds.push(p.round);
        sent.push(p.bytes_sent);
        assert!(start.elapsed() < WAIT, "rounds {rounds:?}");
    }
    assert!(
        rounds.windows(2).all(|w| w[0] <= w[1]),
        "rounds went back: {rounds:?}"
    );
    assert!(
        sent.windows(2).all(|w| w[0] <= w[1]),
        "bytes went back: {sent:?}"
    );
    let (_, seq_before) = heartbeat_after(&cl, src, "busy", 0).await;
    let c = mig
        .cancel_migration(mpb::MigrationId { id: rec.id })
        .await
        .unwrap_or_else(|e| panic!("cancel: {e}{}", cl.logs()))
        .into_inner()
        .migration
        .unwrap_or_default();
    assert!(c.cancel_requested, "{c:?}");
    expect_code(
        mig.cancel_migration(mpb::MigrationId { id: rec.id }).await,
        Code::FailedPrecondition,
        "",
    );
    // The stream's last message carries the finished record.
    let last = final_record(&cl, &mut stream).await;
    assert_eq!(last.state, "cancelled", "{last:?}");
    assert!(last.reason.contains("cancel"), "{last:?}");
    let v = wait_running(&cl, &mut vm, "busy").await;
    assert_eq!(v.owner_id, src, "cancelled migration moved the VM: {v:?}");
    let (node, seq_after) = heartbeat_after(&cl, other, "busy", seq_before).await;
    assert_eq!(node, src, "heartbeat not from the source");
    assert!(seq_after > seq_before);
    expect_code(
        mig.cancel_migration(mpb::MigrationId { id: rec.id }).await,
        Code::FailedPrecondition,
        "already cancelled",
    );

    // 2. A deadline too short to converge: fails cleanly, VM still on the source.
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "busy".into(),
        to_node_id: other,
        max_downtime_ms: Some(1),
        deadline_ms: Some(1_500),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate busy: {e}{}", cl.logs()));
    let rec2 = cl.running_migration(other, "busy", WAIT).await;
    let done2 = cl.migration_end(other, rec2.id, WAIT).await;
    assert_eq!(done2.state, "failed", "{done2:?}");
    assert!(
        done2.reason.contains("deadline") || done2.reason.contains("converge"),
        "{done2:?}"
    );
    let v = wait_running(&cl, &mut vm, "busy").await;
    assert_eq!(v.owner_id, src);
    heartbeat_after(&cl, src, "busy", 0).await;

    // 3. A migration that succeeds: final message with blackout and matching receipts.
    vm.migrate_vm(pb::MigrateVmRequest {
        name: "calm".into(),
        to_node_id: 3 - calm.owner_id,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate calm: {e}{}", cl.logs()));
    let rec3 = cl.running_migration(other, "calm", WAIT).await;
    let mut stream = mig
        .watch_migration(mpb::MigrationId { id: rec3.id })
        .await
        .unwrap_or_else(|e| panic!("watch: {e}"))
        .into_inner();
    let fin = final_record(&cl, &mut stream).await;
    assert_eq!(fin.state, "succeeded", "{fin:?}");
    let s = fin.stats.unwrap_or_default();
    assert!(
        s.blackout_us > 0 && s.rounds >= 1 && s.wire_bytes > 0,
        "{s:?}"
    );
    assert!(
        s.has_target_digest && s.source_digest == s.target_digest && s.receipt_matches,
        "{s:?}"
    );
    let moved = wait_running(&cl, &mut vm, "calm").await;
    assert_eq!(moved.owner_id, 3 - calm.owner_id);
    expect_code(
        mig.cancel_migration(mpb::MigrationId { id: rec3.id }).await,
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
            .map(|r| (r.vm.as_str(), r.state.as_str()))
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
            .list_migrations(mpb::ListMigrationsRequest { vm: "calm".into() })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner()
            .migrations;
        assert_eq!(only_calm.len(), 1);
        assert!(all
            .iter()
            .all(|r| r.ended_unix_ms >= r.started_unix_ms && r.ended_unix_ms > 0));
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
    let mut cl = Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"));
    let formed = cl.form(3).await;
    let leader = cl.check(formed);
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
        let v = wait_running(&cl, &mut vm, name).await;
        assert_eq!(v.owner_id, a, "{name}");
    }
    let mut mig = cl.migrations(b_node).await;
    let migrate = |name: &str, to: u64| pb::MigrateVmRequest {
        name: name.into(),
        to_node_id: to,
        max_downtime_ms: Some(1),
        deadline_ms: Some(120_000),
        ..Default::default()
    };

    // The hog cannot converge under 1 ms: its migration holds both followers' slots.
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
            max_downtime_ms: None,
            deadline_ms: None,
            ..migrate("b", b_node)
        })
        .await
        .unwrap_or_else(|e| panic!("migrate b: {e}{}", cl.logs()))
        .into_inner();
    assert_ne!(qb.queued_migration_id, 0, "{qb:?}");
    assert_eq!(qb.vm.as_ref().map(|v| v.migrating_to), Some(0));
    let qc = vm
        .migrate_vm(pb::MigrateVmRequest {
            max_downtime_ms: None,
            deadline_ms: None,
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
        .map(|m| (m.vm.clone(), m.state.clone()))
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
        .cancel_migration(mpb::MigrationId {
            id: qc.queued_migration_id,
        })
        .await
        .unwrap_or_else(|e| panic!("cancel c: {e}"))
        .into_inner()
        .migration
        .unwrap_or_default();
    assert_eq!(cancelled.state, "cancelled", "{cancelled:?}");
    vm.stop_vm(pb::VmName { name: "d".into() })
        .await
        .unwrap_or_else(|e| panic!("stop d: {e}"));
    let dropped = cl.migration_end(b_node, qd.queued_migration_id, WAIT).await;
    assert_eq!(dropped.state, "failed", "{dropped:?}");
    assert!(
        dropped.reason.contains("dropped from the queue"),
        "{dropped:?}"
    );

    // The leader dies: the queue is replicated, the new leader runs it. The hog's migration
    // ends (cancelled, unless the auto-converge throttle got it under 1 ms by itself
    // meanwhile): b starts on the freed slots and moves.
    let killed = cl.kill9(leader);
    cl.check(killed);
    let _ = mig.cancel_migration(mpb::MigrationId { id: hog.id }).await;
    let hog_end = cl.migration_end(b_node, hog.id, WAIT).await;
    assert!(
        matches!(hog_end.state.as_str(), "cancelled" | "succeeded"),
        "{hog_end:?}"
    );
    let b = cl.migration_end(b_node, qb.queued_migration_id, WAIT).await;
    assert_eq!(b.state, "succeeded", "{b:?}{}", cl.logs());
    assert_eq!((b.source_node_id, b.target_node_id), (a, b_node));
    assert!(
        b.started_unix_ms >= hog_end.ended_unix_ms,
        "b started at {} while the hog's migration ran until {}",
        b.started_unix_ms,
        hog_end.ended_unix_ms
    );
    let v = wait_running(&cl, &mut vm, "b").await;
    assert_eq!(v.owner_id, b_node);
    let c = vm_or_default(&mut vm, "c").await;
    assert_eq!((c.owner_id, c.runtime.as_str()), (a, "running"));
}
