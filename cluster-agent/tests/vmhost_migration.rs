//! Live and quick migration between two `VmHost`s in this process (real KVM VMs, the
//! PVH test guest's disk pattern workload, a temp dir as the shared volume, the
//! migration listener on a 127.0.2.x loopback address).

mod vmhost_common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_agent::vmhost::{
    DiskLocks, IncomingEvent, LiveOptions, MigrationListener, TestWorkload, VmHost, VmHostError,
    VmSpec, WorkloadName,
};
use vmhost_common::*;
use vmm_node::guest_protocol::{heartbeats, Heartbeat};
use vmm_node::migration::seam::NodeFacts;
use vmm_node::migration::source::MigrationEvent;
use vmm_node::migration::target::ReceiveOptions;
use vmm_node::migration::MigrationError;
use vmm_node::VmStatus;

fn listen(host: &Arc<VmHost>, h: &TwoHosts, ip: &str, opts: ReceiveOptions) -> MigrationListener {
    let addr: SocketAddr = format!("{ip}:0").parse().unwrap();
    host.listen_migrations(addr, h.locks.clone(), opts)
        .expect("listen on loopback")
}

fn opts() -> LiveOptions {
    LiveOptions {
        max_downtime_ms: 300,
        deadline_ms: 120_000,
        connections: 2,
        bandwidth_bytes_per_s_max: 0,
        source_ip: None,
        ticket: 0,
    }
}

fn wait_event(l: &MigrationListener) -> IncomingEvent {
    l.events
        .recv_timeout(WAIT)
        .expect("an incoming migration event")
}

/// All heartbeats seen on the source's console stream (recent log + live lines).
fn drained(stream: cluster_agent::vmhost::ConsoleStream) -> Vec<Heartbeat> {
    let mut text = stream.recent;
    for l in stream.lines.try_iter() {
        text.push('\n');
        text.push_str(&l);
    }
    text.push('\n');
    heartbeats(&text)
}

#[test]
fn live_migration_with_disk_handoff() {
    let h = TwoHosts::new();
    let listener = listen(&h.b, &h, "127.0.2.2", plain());
    let disk = h.disk("live");
    let ga = h.acquire(&disk, NODE_A);
    h.a.start(
        disk_guest("live", vec![disk.clone()]),
        std::slice::from_ref(&ga),
    )
    .unwrap();
    wait_hb(&h.a, "live", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= 2)
    });
    let source_console = h.a.console("live").unwrap();

    let handle =
        h.a.migrate_out(
            "live",
            NODE_B,
            listener.local_addr(),
            opts(),
            h.locks.clone(),
        )
        .unwrap();
    // Another operation while migrating is refused.
    assert!(matches!(h.a.stop("live"), Err(VmHostError::Busy(_))));
    // Read the progress stream the way a progress bar would, until the worker ends.
    let mut phases = Vec::new();
    let mut progress = Vec::new();
    loop {
        match handle.progress.recv_timeout(WAIT) {
            Ok(MigrationEvent::Phase(p)) => phases.push(p),
            Ok(MigrationEvent::Progress(p)) => progress.push(p),
            Ok(_) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("progress stream stalled: {e}"),
        }
    }
    for p in ["setup", "pre-copy", "stop-and-copy", "storage-handoff"] {
        assert!(phases.contains(&p), "phase {p} missing from {phases:?}");
    }
    assert!(!progress.is_empty());
    assert!(progress
        .windows(2)
        .all(|w| w[1].bytes_sent >= w[0].bytes_sent));
    let report = handle.wait().expect("migration");
    assert!(report.receipt_matches(), "{:?}", report.stats);
    assert_eq!(report.stats.target_digest, Some(report.stats.source_digest));
    assert_eq!(report.handed_off.len(), 1);
    match wait_event(&listener) {
        IncomingEvent::Arrived { vm, stats } => {
            assert_eq!(vm, "live");
            assert_eq!(stats.memory_digest, report.stats.source_digest);
        }
        other => panic!("{other:?}"),
    }

    // Source VM gone, target VM running, lock owner moved with a newer token.
    assert!(matches!(h.a.state("live"), Err(VmHostError::NotFound(_))));
    let st = h.b.state("live").unwrap();
    assert_eq!(st.status, VmStatus::Running);
    let (owner, token) = h.locks.owner(&disk.name).unwrap();
    assert_eq!(owner, NODE_B);
    assert!(token > ga.token);
    assert_eq!(st.disks[0].token, token);

    // The heartbeat sequence continues on the target and the disk pattern verifies.
    let before = drained(source_console);
    let last_before = last(&before).clone();
    let after = wait_hb(&h.b, "live", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= disk_passes(&last_before) + 2)
    });
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_continuous(&all);
    assert!(after.iter().all(|x| x.disk == "ok"), "{:?}", last(&after));
    let sb = h.b.state("live").unwrap();
    assert_eq!(sb.disks[0].requests_failed, 0);
    assert_eq!(sb.disks[0].fenced_by, None);

    let stopped = h.b.stop("live").unwrap();
    h.locks.commit("live", &stopped.release).unwrap();
    assert_eq!(h.locks.owner(&disk.name), None);
}

#[test]
fn cancelled_migration_leaves_the_vm_running_on_the_source() {
    let h = TwoHosts::new();
    let listener = listen(&h.b, &h, "127.0.2.3", plain());
    let disk = h.disk("cancel");
    let ga = h.acquire(&disk, NODE_A);
    // A guest that dirties memory, a 1 ms downtime goal and a 1 MiB/s bandwidth cap: its
    // 64 MiB working set keeps pre-copy going for about a minute per round, so the cancel
    // lands before switchover on any machine.
    let mut w = TestWorkload::new(WorkloadName::Dirty);
    w.wss_mib = 64;
    w.rate_mbps = 4000;
    let mut spec = VmSpec::test_guest("cancel", 1, 128, w);
    spec.disks = vec![disk.clone()];
    h.a.start(spec, std::slice::from_ref(&ga)).unwrap();
    wait_hb(&h.a, "cancel", |hb| hb.len() >= 2);
    let handle =
        h.a.migrate_out(
            "cancel",
            NODE_B,
            listener.local_addr(),
            LiveOptions {
                max_downtime_ms: 1,
                deadline_ms: 120_000,
                connections: 1,
                bandwidth_bytes_per_s_max: 1 << 20,
                source_ip: None,
                ticket: 0,
            },
            h.locks.clone(),
        )
        .unwrap();
    // Cancel as soon as pre-copy has begun.
    let deadline = Instant::now() + WAIT;
    loop {
        match handle.progress.recv_timeout(Duration::from_secs(5)) {
            Ok(MigrationEvent::Phase("pre-copy")) | Ok(MigrationEvent::Progress(_)) => break,
            Ok(_) => {}
            Err(e) => panic!("no pre-copy event: {e}"),
        }
        assert!(Instant::now() < deadline);
    }
    handle.cancel();
    let e = handle.wait().unwrap_err();
    assert!(
        matches!(
            e,
            VmHostError::Migration {
                source: MigrationError::Cancelled(_),
                ..
            }
        ),
        "{e}"
    );
    assert!(matches!(
        wait_event(&listener),
        IncomingEvent::Failed { .. }
    ));

    // Still here, still running, still owning its disk with the same token.
    assert_eq!(h.a.state("cancel").unwrap().status, VmStatus::Running);
    assert!(matches!(h.b.state("cancel"), Err(VmHostError::NotFound(_))));
    assert_eq!(h.locks.owner(&disk.name), Some((NODE_A, ga.token)));
    let seen = heartbeats(&console_text(&h.a, "cancel")).len();
    let hb = wait_hb(&h.a, "cancel", |hb| hb.len() >= seen + 3);
    assert_continuous(&hb);
    assert_eq!(h.a.state("cancel").unwrap().disks[0].token, ga.token);
    h.a.stop("cancel").unwrap();
}

#[test]
fn incompatible_target_refuses_with_the_reason() {
    let h = TwoHosts::new();
    let other_vendor = NodeFacts {
        cpu_vendor: "SomeOtherVendor".into(),
        cpu_features: vec![],
        memory_available_bytes: 1 << 40,
    };
    let listener = listen(
        &h.b,
        &h,
        "127.0.2.4",
        ReceiveOptions {
            facts_override: Some(other_vendor),
            ..plain()
        },
    );
    h.a.start(disk_guest("incompat", vec![]), &[]).unwrap();
    wait_hb(&h.a, "incompat", |hb| !hb.is_empty());
    let e =
        h.a.migrate_out(
            "incompat",
            NODE_B,
            listener.local_addr(),
            opts(),
            h.locks.clone(),
        )
        .unwrap()
        .wait()
        .unwrap_err();
    let chain = vmm_node::migration::target::error_chain(&e);
    assert!(chain.contains("SomeOtherVendor"), "{chain}");
    assert_eq!(h.a.state("incompat").unwrap().status, VmStatus::Running);
    assert!(h.b.list().is_empty());
    h.a.stop("incompat").unwrap();
}

#[test]
fn quick_migration_through_the_shared_volume() {
    let h = TwoHosts::new();
    let disk = h.disk("quick");
    let ga = h.acquire(&disk, NODE_A);
    h.a.start(
        disk_guest("quick", vec![disk.clone()]),
        std::slice::from_ref(&ga),
    )
    .unwrap();
    wait_hb(&h.a, "quick", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= 2)
    });
    let source_console = h.a.console("quick").unwrap();

    let image = h.a.quick_save("quick", VOLUME, NODE_B).unwrap();
    assert!(image.dir.starts_with(h.dir.path().join(".quick")));
    assert!(matches!(h.a.state("quick"), Err(VmHostError::NotFound(_))));
    // The agent commits the handoff, the target gets its grant and restores.
    h.locks.commit("quick", &image.release).unwrap();
    let grants = h
        .locks
        .acquire("quick", NODE_B, std::slice::from_ref(&disk))
        .unwrap();
    let (info, stats) = h.b.quick_restore(&image.dir, &grants).unwrap();
    assert_eq!(info.status, VmStatus::Running);
    assert!(stats.restore_us > 0);
    assert!(!image.dir.exists(), "image left behind");
    let (owner, token) = h.locks.owner(&disk.name).unwrap();
    assert_eq!(owner, NODE_B);
    assert!(token > ga.token);

    let before = drained(source_console);
    let last_before = last(&before).clone();
    let after = wait_hb(&h.b, "quick", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= disk_passes(&last_before) + 2)
    });
    let mut all = before;
    all.extend(after.iter().cloned());
    assert_continuous(&all);
    assert!(after.iter().all(|x| x.disk == "ok"), "{:?}", last(&after));

    // Bad input: an image directory that is not one.
    let e = h.b.quick_restore(h.dir.path(), &grants).unwrap_err();
    assert!(matches!(e, VmHostError::Quick { .. }), "{e}");
    assert_eq!(h.b.list().len(), 1);
    h.b.stop("quick").unwrap();
}

#[test]
fn memory_pattern_guest_migrates_there_and_back() {
    let h = TwoHosts::new();
    let to_b = listen(&h.b, &h, "127.0.2.5", plain());
    let to_a = listen(&h.a, &h, "127.0.2.6", plain());
    let mut w = TestWorkload::new(WorkloadName::Mem);
    w.wss_mib = 32;
    h.a.start(VmSpec::test_guest("mem", 2, 64, w), &[]).unwrap();
    wait_hb(&h.a, "mem", |hb| {
        hb.last()
            .is_some_and(|l| l.mem == "ok" && l.mem_passes >= 2)
    });
    let mut all = Vec::new();
    let hops = [(&h.a, &h.b, NODE_B, &to_b), (&h.b, &h.a, NODE_A, &to_a)];
    for (from, to, to_node, listener) in hops {
        let console = from.console("mem").unwrap();
        let report = from
            .migrate_out(
                "mem",
                to_node,
                listener.local_addr(),
                opts(),
                h.locks.clone(),
            )
            .unwrap()
            .wait()
            .expect("migration");
        assert!(report.receipt_matches(), "{:?}", report.stats);
        assert!(report.handed_off.is_empty());
        assert!(matches!(
            wait_event(listener),
            IncomingEvent::Arrived { .. }
        ));
        assert!(matches!(from.state("mem"), Err(VmHostError::NotFound(_))));
        all.extend(drained(console));
        let passes = last(&all).mem_passes;
        wait_hb(to, "mem", |hb| {
            hb.last()
                .is_some_and(|l| l.mem == "ok" && l.mem_passes >= passes + 2)
        });
    }
    let after = heartbeats(&console_text(&h.a, "mem"));
    all.extend(after.iter().cloned());
    assert_continuous(&all);
    assert!(
        all.iter().all(|x| x.mem_errors == 0 && x.mem != "bad"),
        "{:?}",
        last(&all)
    );
    assert_eq!(last(&all).cpus, 2);
    h.a.stop("mem").unwrap();
}
