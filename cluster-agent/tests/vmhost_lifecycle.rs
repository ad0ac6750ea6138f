//! VmHost lifecycle on real KVM VMs running the PVH test guest: start/stop with a disk
//! pattern workload, console, hot attach/detach, bad input, fence_all, and failover
//! takeover fencing (the old, partitioned owner can no longer write the disk).

mod vmhost_common;

use std::time::{Duration, Instant};

use cluster_agent::vmhost::{DiskSpec, VmHostError};
use csv_volume::{LockCommand, LockMode};
use vmhost_common::*;
use vmm_node::guest_protocol::heartbeats;
use vmm_node::VmStatus;

#[test]
fn start_disk_workload_then_stop_releases_the_lock() {
    let h = TwoHosts::new();
    let disk = h.disk("life");
    let grant = h.acquire(&disk, NODE_A);
    let info =
        h.a.start(
            disk_guest("life", vec![disk.clone()]),
            std::slice::from_ref(&grant),
        )
        .unwrap();
    assert_eq!(info.status, VmStatus::Running);
    assert_eq!(info.disks.len(), 1);
    assert_eq!(info.disks[0].token, grant.token);
    assert_eq!(h.a.list().len(), 1);

    let hb = wait_hb(&h.a, "life", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= 3)
    });
    assert!(hb.iter().all(|x| x.disk != "bad"), "{:?}", last(&hb));
    assert_continuous(&hb);
    // Status reads race the guest's disk I/O (slot and disk locks) without deadlock.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let host = h.a.clone();
    std::thread::spawn(move || {
        for _ in 0..20_000 {
            host.state("life").unwrap();
        }
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(WAIT)
        .expect("state() while the guest does disk I/O deadlocked or starved");
    let st = h.a.state("life").unwrap();
    assert!(
        st.disks[0].written_bytes >= 3 * WORKLOAD_BYTES as u64,
        "{st:?}"
    );
    assert_eq!(st.disks[0].requests_failed, 0);
    assert_eq!(st.disks[0].fenced_by, None);

    let stopped = h.a.stop("life").unwrap();
    assert!(stopped.disk_errors.is_empty(), "{:?}", stopped.disk_errors);
    assert_eq!(
        stopped.release,
        vec![LockCommand::Release {
            disk: disk.name.clone(),
            node: NODE_A
        }]
    );
    h.locks.apply(stopped.release[0].clone()).unwrap();
    assert_eq!(h.locks.owner(&disk.name), None);
    assert!(matches!(h.a.state("life"), Err(VmHostError::NotFound(_))));
    assert!(h.a.list().is_empty());
    // Flushed data reached the image.
    assert!(h.disk_bytes(&disk)[..WORKLOAD_BYTES]
        .iter()
        .any(|b| *b != 0));
}

#[test]
fn console_streams_live_lines_after_the_recent_log() {
    let h = TwoHosts::new();
    h.a.start(disk_guest("con", vec![]), &[]).unwrap();
    wait_hb(&h.a, "con", |hb| !hb.is_empty());
    let c = h.a.console("con").unwrap();
    assert!(!heartbeats(&c.recent).is_empty());
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let l = c.lines.recv_timeout(WAIT).expect("a live console line");
        if l.starts_with("HB ") {
            break l;
        }
        assert!(Instant::now() < deadline, "no heartbeat on the live stream");
    };
    let seq_live = heartbeats(&format!("{line}\n"))[0].seq;
    assert!(seq_live >= last(&heartbeats(&c.recent)).seq, "{line}");
    h.a.stop("con").unwrap();
    // The stream ends once the VM is gone.
    let end = Instant::now() + WAIT;
    loop {
        match c.lines.recv_timeout(Duration::from_millis(200)) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            _ => assert!(Instant::now() < end, "console stream did not end"),
        }
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let h = TwoHosts::new();
    let disk = h.disk("bad");
    // Missing grant: refused before anything is created.
    let e =
        h.a.start(disk_guest("bad", vec![disk.clone()]), &[])
            .unwrap_err();
    assert!(matches!(e, VmHostError::MissingGrant { .. }), "{e}");
    assert!(e.to_string().contains("vol/vms/bad.img"), "{e}");
    // A grant for the other node.
    let gb = h.acquire(&disk, NODE_B);
    let e =
        h.a.start(
            disk_guest("bad", vec![disk.clone()]),
            std::slice::from_ref(&gb),
        )
        .unwrap_err();
    assert!(matches!(e, VmHostError::GrantMismatch { .. }), "{e}");
    // Invalid spec.
    let mut s = disk_guest("bad", vec![]);
    s.vcpus = 0;
    assert!(matches!(h.a.start(s, &[]), Err(VmHostError::Spec(_))));
    assert!(h.a.list().is_empty());
    // Duplicate name.
    h.a.start(disk_guest("dup", vec![]), &[]).unwrap();
    let e = h.a.start(disk_guest("dup", vec![]), &[]).unwrap_err();
    assert!(
        matches!(e, VmHostError::AlreadyExists(ref n) if n == "dup"),
        "{e}"
    );
    assert_eq!(h.a.list().len(), 1);
    // Unknown VM everywhere.
    assert!(matches!(h.a.stop("nope"), Err(VmHostError::NotFound(_))));
    assert!(matches!(h.a.console("nope"), Err(VmHostError::NotFound(_))));
    assert!(matches!(
        h.a.detach_disk("dup", &disk.name),
        Err(VmHostError::DiskNotAttached { .. })
    ));
    // A kernel that does not exist (in an image dir of this host): a clear error naming
    // the VM, nothing registered. One outside the image dirs is refused unread.
    let images = h.dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    h.a.set_image_dirs(vec![images.clone()]);
    let mut k = disk_guest("kern", vec![]);
    k.boot = cluster_agent::vmhost::BootSpec::Kernel {
        kernel: images.join("vmlinux"),
        cmdline: "console=ttyS0".into(),
        initrd: None,
    };
    let e = h.a.start(k.clone(), &[]).unwrap_err();
    assert!(
        matches!(e, VmHostError::Image { ref vm, .. } if vm == "kern"),
        "{e}"
    );
    k.boot = cluster_agent::vmhost::BootSpec::Kernel {
        kernel: "/etc/shadow".into(),
        cmdline: "console=ttyS0".into(),
        initrd: None,
    };
    let e = h.a.start(k, &[]).unwrap_err();
    let chain = vmm_node::migration::target::error_chain(&e);
    assert!(chain.contains("outside this node's image_dirs"), "{chain}");
    assert!(matches!(h.a.state("kern"), Err(VmHostError::NotFound(_))));
    // Migration and quick migration of unknown VMs / to unknown volumes.
    let to: std::net::SocketAddr = "127.0.2.9:1".parse().unwrap();
    assert!(matches!(
        h.a.migrate_out("nope", NODE_B, to, Default::default(), h.locks.clone()),
        Err(VmHostError::NotFound(_))
    ));
    let e = h.a.quick_save("dup", "novolume", NODE_B).unwrap_err();
    assert!(matches!(e, VmHostError::Volume { .. }), "{e}");
    assert_eq!(h.a.state("dup").unwrap().status, VmStatus::Running);
    // The lock of the disk is untouched by all this.
    assert_eq!(h.locks.owner(&disk.name).map(|o| o.0), Some(NODE_B));
    h.a.stop("dup").unwrap();
}

#[test]
fn hot_attach_and_detach_through_vmhost() {
    let h = TwoHosts::new();
    h.a.start(disk_guest("hot", vec![]), &[]).unwrap();
    let hb = wait_hb(&h.a, "hot", |hb| hb.len() >= 2);
    assert!(hb.iter().all(|x| x.disk == "nodisk"), "{:?}", last(&hb));

    let disk = h.disk("hot");
    let grant = h.acquire(&disk, NODE_A);
    // A grant of the wrong mode for a read-only attach is refused.
    let ro = DiskSpec {
        read_only: true,
        ..disk.clone()
    };
    let e = h.a.attach_disk("hot", ro, &grant).unwrap_err();
    assert!(
        matches!(
            e,
            VmHostError::GrantMismatch {
                want_mode: LockMode::Shared,
                ..
            }
        ),
        "{e}"
    );

    let slot = h.a.attach_disk("hot", disk.clone(), &grant).unwrap();
    assert_eq!(slot, 0);
    let e = h.a.attach_disk("hot", disk.clone(), &grant).unwrap_err();
    assert!(matches!(e, VmHostError::DiskAlreadyAttached { .. }), "{e}");
    let hb = wait_hb(&h.a, "hot", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= 2)
    });
    let passes = disk_passes(last(&hb));
    assert_eq!(h.a.state("hot").unwrap().spec.disks, vec![disk.clone()]);

    let cmd = h.a.detach_disk("hot", &disk.name).unwrap();
    assert_eq!(
        cmd,
        LockCommand::Release {
            disk: disk.name.clone(),
            node: NODE_A
        }
    );
    h.locks.apply(cmd).unwrap();
    assert_eq!(h.locks.owner(&disk.name), None);
    let seen = hb.len();
    let hb = wait_hb(&h.a, "hot", |hb| {
        hb.len() >= seen + 2 && hb.last().is_some_and(|l| l.disk == "nodisk")
    });
    assert!(disk_passes(last(&hb)) >= passes);
    assert_continuous(&hb);
    assert_eq!(h.a.state("hot").unwrap().status, VmStatus::Running);
    assert!(h.a.state("hot").unwrap().spec.disks.is_empty());
    assert!(h.disk_bytes(&disk)[..WORKLOAD_BYTES]
        .iter()
        .any(|b| *b != 0));
    h.a.stop("hot").unwrap();
}

#[test]
fn failover_takeover_fences_the_partitioned_old_owner() {
    let h = TwoHosts::new();
    let disk = h.disk("fo");
    let ga = h.acquire(&disk, NODE_A);
    let spec = disk_guest("fo", vec![disk.clone()]);
    h.a.start(spec.clone(), std::slice::from_ref(&ga)).unwrap();
    wait_hb(&h.a, "fo", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= 2)
    });

    // Node A is declared Down (simulated partition: its VM is NOT stopped) and node B
    // takes the disk over with a newer fencing token.
    h.locks.set_down(NODE_A, true);
    let gb = h
        .locks
        .grant(LockCommand::ForceTakeover {
            disk: disk.name.clone(),
            node: NODE_B,
            mode: LockMode::Exclusive,
        })
        .unwrap();
    assert!(gb.token > ga.token);
    let lease_deadline = Instant::now() + Duration::from_millis(300);
    let t = Instant::now();
    h.b.start_after_takeover(spec, std::slice::from_ref(&gb), lease_deadline)
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "lease not waited out"
    );

    // The old owner's next write is refused at the fence.
    let fenced = cluster_tests::Wait::new(WAIT)
        .until_blocking(
            "the old owner's disk fenced and a write refused",
            || h.a.state("fo"),
            |st| st.disks[0].fenced_by.is_some() && st.disks[0].requests_failed > 0,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(fenced.disks[0].fenced_by, Some(gb.token));
    // The guest on A sees its writes fail (its workload reports the disk as lost) and
    // completes no further pass.
    let hb = wait_hb(&h.a, "fo", |hb| {
        hb.last().is_some_and(|l| l.disk == "nodisk")
    });
    let stuck = disk_passes(last(&hb));
    let seen = hb.len();
    let hb = wait_hb(&h.a, "fo", |hb| hb.len() >= seen + 3);
    assert_eq!(
        disk_passes(last(&hb)),
        stuck,
        "old owner still completes disk passes"
    );

    // The guest on B verifies its pattern round after round.
    let hb = wait_hb(&h.b, "fo", |hb| {
        hb.last()
            .is_some_and(|l| l.disk == "ok" && disk_passes(l) >= 3)
    });
    assert!(hb.iter().all(|x| x.disk != "bad"), "{:?}", last(&hb));
    let sb = h.b.state("fo").unwrap();
    assert_eq!(sb.disks[0].fenced_by, None);
    assert_eq!(sb.disks[0].requests_failed, 0);

    // A's stop cannot release a lock it no longer holds: the fenced disk is reported.
    let stopped = h.a.stop("fo").unwrap();
    assert!(stopped.release.is_empty(), "{:?}", stopped.release);
    assert_eq!(stopped.disk_errors.len(), 1);
    assert_eq!(h.locks.owner(&disk.name).map(|o| o.0), Some(NODE_B));
    h.b.stop("fo").unwrap();
}

#[test]
fn fence_all_stops_every_vm_without_releasing() {
    let h = TwoHosts::new();
    let disk = h.disk("f1");
    let g = h.acquire(&disk, NODE_A);
    h.a.start(disk_guest("f1", vec![disk.clone()]), &[g])
        .unwrap();
    h.a.start(disk_guest("f2", vec![]), &[]).unwrap();
    wait_hb(&h.a, "f1", |hb| !hb.is_empty());
    let mut names = h.a.fence_all();
    names.sort();
    assert_eq!(names, vec!["f1".to_string(), "f2".to_string()]);
    assert!(h.a.list().is_empty());
    // Nothing was released: the lock still names A until the cluster takes it over.
    assert_eq!(h.locks.owner(&disk.name).map(|o| o.0), Some(NODE_A));
}
