//! Shared-volume disks through the cluster, with real `cluster-agent` processes on
//! loopback: one temp directory stands in for the shared storage every agent names in
//! `[[volumes]]`. The lock table lives in the Raft state machine; the owner commits the
//! locks before it starts a VM from its disk; failover takes the lock over with a newer
//! fencing token; live and quick migration hand the disk off; hot-plug attaches and
//! detaches disks of running VMs. The PVH test guest's `disk` workload writes, flushes
//! and verifies its disk and reports `disk=ok|bad|nodisk` in its heartbeats.

use cluster_proto::EnumName;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster_proto::vms as pb;
use cluster_proto::volumes as vpb;
use cluster_tests::vm::{expect_code, get_vm, guest_spec};
use cluster_tests::{Cluster, WAIT};
use tonic::Code;
use vmm_node::guest_protocol::Heartbeat;

/// A cluster of `n` agents that all see `<test dir>/csv` as volume `vol`.
async fn disk_cluster(n: u64) -> (Cluster, PathBuf) {
    disk_cluster_with_env(n, &[]).await
}

/// [`disk_cluster`] with `env` set for every agent.
async fn disk_cluster_with_env(n: u64, env: &[(&str, &str)]) -> (Cluster, PathBuf) {
    disk_cluster_with(n, "", env).await
}

/// [`disk_cluster`] with `extra_toml` (top-level keys) in every agent's config and `env` set for it.
async fn disk_cluster_with(n: u64, extra_toml: &str, env: &[(&str, &str)]) -> (Cluster, PathBuf) {
    let mut cl = Cluster::vm_agents();
    let (csv, volume) = cl.shared_volume();
    for id in 1..=n {
        let added = cl.add_node_with(id, &format!("{extra_toml}{volume}"));
        cl.check(added);
        for (k, v) in env {
            let set = cl.set_env(id, k, v);
            cl.check(set);
        }
    }
    let formed = cl.form(n).await;
    cl.check(formed);
    (cl, csv)
}

fn disk_spec(name: &str, disks: &[&str]) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Disk as i32,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    pb::VmSpec {
        disks: disks
            .iter()
            .map(|d| pb::DiskSpec {
                name: (*d).into(),
                read_only: false,
            })
            .collect(),
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        ..guest_spec(name, 64, boot)
    }
}

async fn create_disk(cl: &Cluster, via: u64, name: &str) {
    cl.vols(via)
        .await
        .create_disk(vpb::CreateDiskRequest {
            name: name.into(),
            size_mib: 4,
        })
        .await
        .unwrap_or_else(|e| panic!("create disk {name}: {e}{}", cl.logs()));
}

/// The two nodes of a three-node cluster other than `leader`.
fn followers(leader: u64) -> (u64, u64) {
    let mut others = [1, 2, 3].into_iter().filter(|n| *n != leader);
    (others.next().unwrap_or(2), others.next().unwrap_or(3))
}

fn disk_passes(h: &Heartbeat) -> u64 {
    h.fields
        .get("disk_passes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fence_token(csv: &std::path::Path, disk: &str) -> u64 {
    let rel = disk.strip_prefix("vol/").unwrap_or(disk);
    let rec = csv_volume::fence::read_fence_record(&csv.join(rel))
        .unwrap_or_else(|e| panic!("fence record of {disk}: {e}"));
    rec.map_or(0, |r| r.token.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_vm_locks_through_raft_hot_plug_and_bad_input_changes_nothing() {
    let _serial = cluster_tests::serial().await;
    let (cl, csv) = disk_cluster(3).await;
    let mut v2 = cl.vols(2).await;

    // Disk creation and its refusals.
    create_disk(&cl, 2, "vol/vms/a.img").await;
    for (name, size, code, needle) in [
        ("vol/vms/a.img", 4, Code::AlreadyExists, "already exists"),
        ("vol/../x.img", 4, Code::InvalidArgument, "vol/../x.img"),
        ("vol/x.img", 0, Code::InvalidArgument, "size_mib 0"),
        ("nope/x.img", 4, Code::NotFound, "nope"),
        ("", 4, Code::InvalidArgument, "name is empty"),
    ] {
        expect_code(
            v2.create_disk(vpb::CreateDiskRequest {
                name: name.into(),
                size_mib: size,
            })
            .await,
            code,
            needle,
        );
    }

    // A VM with a disk: the owner commits the lock before it starts the VM.
    let mut c = cl.vms(3).await;
    c.create_vm(pb::CreateVmRequest {
        spec: Some(disk_spec("vm-d", &["vol/vms/a.img"])),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create vm-d: {e}{}", cl.logs()));
    let running = cl
        .wait_vm(3, "vm-d", "running", |v| v.runtime().name() == "running")
        .await;
    let owner = running.owner_id;
    let lock = cl
        .wait_lock(1, "vol/vms/a.img", "locked by the owner", |l| {
            l.is_some_and(|l| l.holders == vec![owner])
        })
        .await
        .unwrap_or_else(|| panic!("vol/vms/a.img is not locked{}", cl.logs()));
    assert_eq!(lock.holders, vec![owner]);
    assert_eq!(lock.mode().name(), "exclusive");
    assert!(lock.token > 0);
    assert_eq!(fence_token(&csv, "vol/vms/a.img"), lock.token);
    let (node, hb) = cl
        .wait_heartbeat(1, "vm-d", |h| h.disk == "ok" && disk_passes(h) >= 2)
        .await;
    assert_eq!(node, owner);
    assert_eq!(hb.disk, "ok");
    let listed = v2
        .list_disks(vpb::ListDisksRequest::default())
        .await
        .unwrap_or_else(|e| panic!("list disks: {e}"))
        .into_inner();
    assert_eq!(listed.volumes, vec!["vol".to_string()]);
    let a = listed.disks.iter().find(|d| d.name == "vol/vms/a.img");
    assert_eq!(a.map(|d| d.used_by.clone()), Some(vec!["vm-d".to_string()]));

    // Bad input through the API changes nothing.
    let before_vms = cl.list_vms(3).await;
    for (name, disk, code, needle) in [
        (
            "vm-x",
            "vol/vms/missing.img",
            Code::InvalidArgument,
            "does not exist",
        ),
        (
            "vm-y",
            "vol/vms/a.img",
            Code::FailedPrecondition,
            "used by VM(s) [\"vm-d\"]",
        ),
        ("vm-z", "/abs/x.img", Code::InvalidArgument, "disks"),
    ] {
        let req = pb::CreateVmRequest {
            spec: Some(disk_spec(name, &[disk])),
            start: true,
        };
        expect_code(c.create_vm(req).await, code, needle);
    }
    cl.barrier().await;
    assert_eq!(before_vms, cl.list_vms(3).await);
    assert_eq!(cl.locks(2).await.len(), 1);

    // Hot-plug: a disk-workload VM without a disk sees none, then one once attached.
    c.create_vm(pb::CreateVmRequest {
        spec: Some(disk_spec("vm-h", &[])),
        start: true,
    })
    .await
    .unwrap_or_else(|e| panic!("create vm-h: {e}{}", cl.logs()));
    let h = cl
        .wait_vm(3, "vm-h", "running", |v| v.runtime().name() == "running")
        .await;
    cl.wait_heartbeat(3, "vm-h", |h| h.disk == "nodisk").await;
    create_disk(&cl, 1, "vol/vms/hot.img").await;
    let mut v3 = cl.vols(3).await;
    for (vm, disk, code, needle) in [
        ("ghost", "vol/vms/hot.img", Code::NotFound, "ghost"),
        ("vm-h", "vol/vms/none.img", Code::NotFound, "does not exist"),
        (
            "vm-h",
            "vol/vms/a.img",
            Code::FailedPrecondition,
            "used by VM(s)",
        ),
        ("", "vol/vms/hot.img", Code::InvalidArgument, "vm is empty"),
    ] {
        expect_code(
            v3.attach_disk(vpb::AttachDiskRequest {
                vm: vm.into(),
                disk: disk.into(),
                read_only: false,
            })
            .await,
            code,
            needle,
        );
    }
    expect_code(
        v3.detach_disk(vpb::DetachDiskRequest {
            vm: "vm-h".into(),
            disk: "vol/vms/hot.img".into(),
        })
        .await,
        Code::FailedPrecondition,
        "not attached",
    );
    let r = v3
        .attach_disk(vpb::AttachDiskRequest {
            vm: "vm-h".into(),
            disk: "vol/vms/hot.img".into(),
            read_only: false,
        })
        .await
        .unwrap_or_else(|e| panic!("attach: {e}{}", cl.logs()))
        .into_inner();
    assert_eq!(r.disks, vec!["vol/vms/hot.img".to_string()]);
    let hot = cl
        .wait_lock(2, "vol/vms/hot.img", "locked by the owner", |l| {
            l.is_some_and(|l| l.holders == vec![h.owner_id])
        })
        .await;
    let (node, _) = cl
        .wait_heartbeat(2, "vm-h", |hb| hb.disk == "ok" && disk_passes(hb) >= 1)
        .await;
    assert_eq!(node, h.owner_id);
    assert_eq!(
        fence_token(&csv, "vol/vms/hot.img"),
        hot.map_or(0, |l| l.token)
    );
    v3.detach_disk(vpb::DetachDiskRequest {
        vm: "vm-h".into(),
        disk: "vol/vms/hot.img".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("detach: {e}{}", cl.logs()));
    // Released only after the owner's VMM flushed and closed it; the guest loses it.
    cl.wait_lock(2, "vol/vms/hot.img", "released", |l| l.is_none())
        .await;
    cl.wait_heartbeat(3, "vm-h", |h| h.disk == "nodisk").await;

    // Stop: the owner flushes, closes and releases the disk.
    c.stop_vm(pb::StopVmRequest {
        name: "vm-d".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("stop: {e}"));
    cl.wait_vm(1, "vm-d", "stopped", |v| v.runtime().name() == "stopped")
        .await;
    cl.wait_lock(1, "vol/vms/a.img", "released", |l| l.is_none())
        .await;
    let events = cl.check(cl.events(1).await);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("disk vol/vms/a.img released by node")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_kill9_fails_over_from_the_disk_with_a_newer_fencing_token() {
    let _serial = cluster_tests::serial().await;
    let (mut cl, csv) = disk_cluster(3).await;
    create_disk(&cl, 1, "vol/vms/f.img").await;
    let before = cl
        .create_running(1, disk_spec("vm-f", &["vol/vms/f.img"]))
        .await;
    let owner = before.owner_id;
    let survivor = [1, 2, 3].into_iter().find(|n| *n != owner).unwrap_or(0);
    cl.wait_heartbeat(survivor, "vm-f", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    let old = cl
        .lock_of(survivor, "vol/vms/f.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(old.holders, vec![owner]);

    let killed_at = Instant::now();
    let killed = cl.kill9(owner);
    cl.check(killed);
    let after = cl
        .wait_vm(survivor, "vm-f", "restart elsewhere", |v| {
            v.owner_id != owner && v.runtime().name() == "running"
        })
        .await;
    let (node, hb) = cl
        .wait_heartbeat(survivor, "vm-f", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    eprintln!(
        "failover with disk: kill -9 of node {owner} -> disk=ok heartbeat on node {node} after {} ms",
        killed_at.elapsed().as_millis()
    );
    assert_eq!(node, after.owner_id, "heartbeats come from the new owner");
    assert_eq!(hb.disk, "ok");
    let new = cl
        .lock_of(survivor, "vol/vms/f.img")
        .await
        .unwrap_or_else(|| panic!("not locked after failover{}", cl.logs()));
    assert_eq!(
        new.holders,
        vec![after.owner_id],
        "one holder: the new owner"
    );
    assert!(
        new.token > old.token,
        "takeover token {} must be above {}",
        new.token,
        old.token
    );
    // The disk's fence record carries the new epoch: a late write of the old owner's
    // grant (token old.token) is refused by FencedDisk.
    assert_eq!(fence_token(&csv, "vol/vms/f.img"), new.token);
    let events = cl.check(cl.events(survivor).await);
    let takeover = events
        .iter()
        .position(|e| e.message.contains("disk vol/vms/f.img taken over by node"));
    let owner_change = events
        .iter()
        .position(|e| e.message.contains("VM vm-f owner"));
    assert!(
        takeover.is_some() && takeover < owner_change,
        "the lock takeover is committed before the new owner: {events:?}"
    );

    // The old owner comes back: it does not run the VM again (one copy), the lock stays.
    // Once it is up and has applied a write made after its return, its replica names the
    // new owner: from then on its reconciler has no reason to start the VM.
    let log_before = cl.log_len(owner);
    let restarted = cl.start(owner).await;
    cl.check(restarted);
    cl.check(cl.wait_node_state(survivor, owner, "up", WAIT).await);
    cl.barrier().await;
    let (node, _) = cl.wait_heartbeat(owner, "vm-f", |h| h.disk == "ok").await;
    assert_eq!(node, after.owner_id);
    let still = cl.lock_of(owner, "vol/vms/f.img").await;
    assert_eq!(
        still.map(|l| (l.holders, l.token)),
        Some((new.holders, new.token))
    );
    let since = cl.log_since(owner, log_before);
    assert!(
        !since
            .lines()
            .any(|l| l.contains("vm started by reconciler") && l.contains("vm-f")),
        "the old owner started vm-f again:\n{since}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_then_quick_migration_hand_the_disk_off() {
    let _serial = cluster_tests::serial().await;
    let (cl, csv) = disk_cluster(2).await;
    create_disk(&cl, 1, "vol/vms/m.img").await;
    let mut c = cl.vms(2).await;
    let before = cl
        .create_running(2, disk_spec("vm-m", &["vol/vms/m.img"]))
        .await;
    let src = before.owner_id;
    let dst = if src == 1 { 2 } else { 1 };
    let (_, hb0) = cl
        .wait_heartbeat(1, "vm-m", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    let t0 = cl.lock_of(1, "vol/vms/m.img").await.map_or(0, |l| l.token);

    // Live: the disk is handed off at the storage stage.
    c.migrate_vm(pb::MigrateVmRequest {
        name: "vm-m".into(),
        to_node_id: dst,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    cl.wait_vm(2, "vm-m", "live migration", |v| {
        v.owner_id == dst && v.migrating_to == 0 && v.runtime().name() == "running"
    })
    .await;
    let l1 = cl
        .wait_lock(1, "vol/vms/m.img", "handed off", |l| {
            l.is_some_and(|l| l.holders == vec![dst])
        })
        .await
        .map_or(0, |l| l.token);
    assert!(l1 > t0, "handoff token {l1} must be above {t0}");
    assert_eq!(fence_token(&csv, "vol/vms/m.img"), l1);
    // Staged: the target's token was reserved while the VM still ran on the source (no
    // lock entry inside the blackout), and the completion after the resume kept it.
    let events = cl.check(cl.events(1).await);
    let reserved = format!("disk vol/vms/m.img handoff from node {src} to node {dst} reserved");
    let token_of = |m: &str| -> Option<u64> {
        let rest = &m[m.find("fencing token ")? + "fencing token ".len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    let reserved_token = events
        .iter()
        .find(|e| e.message.contains(&reserved))
        .and_then(|e| token_of(&e.message));
    assert_eq!(reserved_token, Some(l1), "{events:?}");
    let handed: Vec<_> = events
        .iter()
        .filter(|e| e.message.contains("disk vol/vms/m.img handed off"))
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        handed.len() == 1 && handed[0].contains("(reserved)"),
        "one completion of the reserved handoff, no handoff committed in the blackout: {handed:?}"
    );
    let l = cl.lock_of(1, "vol/vms/m.img").await;
    assert_eq!(l.map(|l| (l.handoff_to, l.handoff_token)), Some((0, 0)));
    // The target's staged fence record was installed by its rename: nothing is left.
    let leftovers: Vec<_> = std::fs::read_dir(csv.join("vms"))
        .unwrap_or_else(|e| panic!("list the volume: {e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".fence.tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (node, hb1) = cl
        .wait_heartbeat(1, "vm-m", |h| {
            h.seq > hb0.seq && h.disk == "ok" && disk_passes(h) > disk_passes(&hb0)
        })
        .await;
    assert_eq!(node, dst);
    let events = cl.check(cl.events(1).await);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("vm-m migrated to node")
                && e.message.contains("receipt matches")),
        "{events:?}"
    );

    // Quick: saved to the shared volume, restored (not rebooted) on the source.
    let mut quick = pb::MigrateVmRequest {
        name: "vm-m".into(),
        to_node_id: src,
        ..Default::default()
    };
    quick.quick = true;
    let r = c
        .migrate_vm(quick)
        .await
        .unwrap_or_else(|e| panic!("quick migrate: {e}{}", cl.logs()))
        .into_inner();
    assert_eq!(r.vm.map(|v| v.migrating_to), Some(src));
    cl.wait_vm(1, "vm-m", "quick migration", |v| {
        v.owner_id == src && v.migrating_to == 0 && v.runtime().name() == "running"
    })
    .await;
    let l2 = cl
        .wait_lock(2, "vol/vms/m.img", "handed back", |l| {
            l.is_some_and(|l| l.holders == vec![src])
        })
        .await
        .map_or(0, |l| l.token);
    assert!(l2 > l1);
    // The restored guest goes on counting from where it was saved (its memory came
    // along): the first heartbeat the new owner shows is already past the old ones.
    let (node, hb2) = cl.wait_heartbeat(2, "vm-m", |_| true).await;
    assert_eq!(node, src);
    assert!(
        hb2.seq > hb1.seq,
        "restored guest restarted counting: {} after {}",
        hb2.seq,
        hb1.seq
    );
    cl.wait_heartbeat(2, "vm-m", |h| h.seq > hb2.seq && h.disk == "ok")
        .await;
    let events = cl.check(cl.events(2).await);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("vm-m migrated to node") && e.message.contains("quick:")),
        "{events:?}"
    );
    // The image was consumed by the restore.
    assert!(!csv.join(".quick").join("vm-m").join("vmhost.bin").exists());
}

fn signal(cl: &Cluster, id: u64, sig: &str) {
    let pid = cl
        .pid(id)
        .unwrap_or_else(|| panic!("node {id} is not running"));
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// The old owner is frozen (SIGSTOP: a stuck host that oversleeps its lease, so it cannot
/// fence itself), the VM fails over with a new fencing token, then the old owner thaws
/// with its VM still running. Two fences race on the thaw, and one of them must stop the
/// stale copy before it writes: the agent's lease watcher (it finds its lease lapsed
/// within 20 ms and stops the VM) or, if the vCPU writes first, the disk's fence record
/// (the write is refused). Either is logged; the new owner's guest keeps verifying its
/// disk (a write slipping through would break the guest's read-back check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_old_owner_is_fenced_at_the_disk_when_it_thaws() {
    let _serial = cluster_tests::serial().await;
    let (cl, csv) = disk_cluster(3).await;
    let leader = cl.check(cl.status(1).await).leader_id;
    let victim = [1, 2, 3].into_iter().find(|n| *n != leader).unwrap_or(2);
    let watcher = [1, 2, 3].into_iter().find(|n| *n != victim).unwrap_or(1);
    create_disk(&cl, watcher, "vol/vms/z.img").await;
    let mut s = disk_spec("vm-z", &["vol/vms/z.img"]);
    s.preferred_owners = vec![victim];
    cl.vms(watcher)
        .await
        .create_vm(pb::CreateVmRequest {
            spec: Some(s),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create: {e}{}", cl.logs()));
    let before = cl
        .wait_vm(watcher, "vm-z", "running", |v| {
            v.runtime().name() == "running"
        })
        .await;
    assert_eq!(before.owner_id, victim);
    cl.wait_heartbeat(watcher, "vm-z", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    let old = cl
        .lock_of(watcher, "vol/vms/z.img")
        .await
        .map_or(0, |l| l.token);

    signal(&cl, victim, "STOP");
    let after = cl
        .wait_vm(watcher, "vm-z", "restart elsewhere", |v| {
            v.owner_id != victim && v.runtime().name() == "running"
        })
        .await;
    let (_, hb) = cl
        .wait_heartbeat(watcher, "vm-z", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    let new = cl
        .lock_of(watcher, "vol/vms/z.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(new.holders, vec![after.owner_id]);
    assert!(new.token > old);

    signal(&cl, victim, "CONT");
    // The thawed copy is stopped by its lapsed lease or its next write meets the newer
    // fence record, whichever comes first.
    cl.wait_log_line(victim, "its copy of vm-z fenced", |l| {
        l.contains("disk fenced: stale writer refused")
            || (l.contains("lease lost; vms fenced") && l.contains("vm-z"))
            || (l.contains("its lease ran out (fenced)") && l.contains("vm-z"))
    })
    .await;
    // The new owner's guest goes on verifying its disk; the fence record keeps the new
    // epoch (the old owner never rolls it back); the lock stays with the new owner.
    let (node, later) = cl
        .wait_heartbeat(watcher, "vm-z", |h| {
            h.disk == "ok" && disk_passes(h) >= disk_passes(&hb) + 5
        })
        .await;
    assert_eq!(node, after.owner_id);
    assert_eq!(later.disk, "ok");
    assert_eq!(fence_token(&csv, "vol/vms/z.img"), new.token);
    // The thawed node's replica catches up to the same lock.
    cl.wait_lock(victim, "vol/vms/z.img", "seen by the thawed node", |l| {
        l.is_some_and(|l| l.holders == new.holders && l.token == new.token)
    })
    .await;
}

/// A VM that failover does not restart (restart priority none) whose owner died: the
/// operator stops it and starts it again; the node the scheduler picks takes the disk lock
/// over from the dead node (Down longer than the failover grace) and boots it from its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_restarted_by_hand_after_its_owner_died_takes_the_disk_over() {
    let _serial = cluster_tests::serial().await;
    let (mut cl, csv) = disk_cluster(3).await;
    create_disk(&cl, 1, "vol/vms/n.img").await;
    let mut s = disk_spec("vm-n", &["vol/vms/n.img"]);
    s.restart_priority = cluster_proto::vms::RestartPriority::None as i32;
    let before = cl.create_running(1, s).await;
    let owner = before.owner_id;
    let via = [1, 2, 3].into_iter().find(|n| *n != owner).unwrap_or(1);
    // A witness on the same node that failover does restart: once it runs elsewhere,
    // failover has planned for the dead node's VMs, and left vm-n alone in that plan.
    let witness = pb::VmSpec {
        preferred_owners: vec![owner],
        ..disk_spec("witness", &[])
    };
    let w = cl.create_running(via, witness).await;
    assert_eq!(w.owner_id, owner);
    cl.wait_heartbeat(via, "vm-n", |h| h.disk == "ok").await;
    let old = cl
        .lock_of(via, "vol/vms/n.img")
        .await
        .map_or(0, |l| l.token);

    let killed = cl.kill9(owner);
    cl.check(killed);
    // Down, and left alone by failover (priority none).
    cl.check(cl.wait_node_state(via, owner, "down", WAIT).await);
    cl.wait_vm(via, "witness", "failed over", |v| {
        v.owner_id != owner && v.runtime().name() == "running"
    })
    .await;
    let mut c = cl.vms(via).await;
    assert_eq!(
        get_vm(&mut c, "vm-n").await.map(|v| v.owner_id).ok(),
        Some(owner)
    );

    c.stop_vm(pb::StopVmRequest {
        name: "vm-n".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("stop: {e}{}", cl.logs()));
    c.start_vm(pb::StartVmRequest {
        name: "vm-n".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("start: {e}{}", cl.logs()));
    let after = cl
        .wait_vm(via, "vm-n", "running elsewhere", |v| {
            v.owner_id != owner && v.runtime().name() == "running"
        })
        .await;
    let (node, _) = cl
        .wait_heartbeat(via, "vm-n", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    assert_eq!(node, after.owner_id);
    let new = cl
        .lock_of(via, "vol/vms/n.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(new.holders, vec![after.owner_id]);
    assert!(new.token > old);
    assert_eq!(fence_token(&csv, "vol/vms/n.img"), new.token);
}

/// A live migration of a VM with a disk to a target that died just before (still Up in
/// the registry) fails: the VM keeps running on the source from its disk, and its lock
/// never moved (same holder, same token: no new epoch was started).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_migration_leaves_the_disk_with_the_source() {
    let _serial = cluster_tests::serial().await;
    let (mut cl, _csv) = disk_cluster(3).await;
    create_disk(&cl, 1, "vol/vms/r.img").await;
    let leader = cl.check(cl.status(1).await).leader_id;
    let mut s = disk_spec("vm-r", &["vol/vms/r.img"]);
    s.preferred_owners = vec![leader];
    let mut c = cl.vms(leader).await;
    let before = cl.create_running(leader, s).await;
    let src = before.owner_id;
    let dst = [1, 2, 3]
        .into_iter()
        .find(|n| *n != src && *n != leader)
        .unwrap_or(3);
    cl.wait_heartbeat(leader, "vm-r", |h| h.disk == "ok").await;
    let old = cl
        .lock_of(leader, "vol/vms/r.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));

    let killed = cl.kill9(dst);
    cl.check(killed);
    c.migrate_vm(pb::MigrateVmRequest {
        name: "vm-r".into(),
        to_node_id: dst,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    cl.wait_vm(leader, "vm-r", "migration failure", |v| {
        v.migrating_to == 0 && v.owner_id == src
    })
    .await;
    let events = cl.check(cl.events(leader).await);
    assert!(
        events.iter().any(|e| e
            .message
            .contains(&format!("vm-r migration to node {dst} failed"))),
        "{events:?}"
    );
    let (node, _) = cl.wait_heartbeat(leader, "vm-r", |h| h.disk == "ok").await;
    assert_eq!(node, src);
    let now = cl.lock_of(leader, "vol/vms/r.img").await;
    // Same epoch, and the reservation for the dead target was dropped (the target never
    // got the disk released to it).
    assert_eq!(
        now.map(|l| (l.holders, l.token, l.handoff_to)),
        Some((old.holders, old.token, 0))
    );
}

/// The owner is lost in the middle of a live migration of a VM with a disk (held in
/// pre-copy by a bandwidth cap): the migration record ends failed and failover gives the VM to the
/// migration target, which drops its half-received copy and boots the VM from its disk
/// with a newer fencing token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_kill9_mid_migration_the_target_boots_the_vm_from_its_disk() {
    owner_lost_mid_migration(Loss::Kill9).await;
}

/// As above, but the owner's agent goes silent (SIGSTOP: a frozen host sends no
/// connection reset). The VM runs in a worker, which goes on sending until the frozen
/// agent's lease deadline passes; then the worker stops its VM and its migration (it
/// fences itself), so the target's receive fails at once instead of waiting out its
/// 30 s I/O timeout, and the target boots the VM from its disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_silent_mid_migration_its_worker_fences_and_the_target_boots_the_vm() {
    owner_lost_mid_migration(Loss::Freeze).await;
}

/// As above with the VM inside the agent (`vm_workers = false`): the whole source,
/// migration included, freezes with the agent (a host that lost power) — the target
/// does not wait out its 30 s I/O timeout: its agent abandons the receive as soon as
/// the VM is failed over to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_silent_mid_migration_in_process_the_target_abandons_the_receive() {
    owner_lost_mid_migration(Loss::FreezeInProcess).await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Loss {
    Kill9,
    /// SIGSTOP of the source agent; its VM in a worker.
    Freeze,
    /// SIGSTOP of the source agent, which runs its VM itself.
    FreezeInProcess,
}

/// A 3-node disk cluster with VM `vm-m` (disk `vol/vms/m.img`) on a follower, in the
/// middle of a live migration to the other follower, provably in pre-copy: its progress
/// shows guest memory on the wire, and a 1 MiB/s bandwidth cap keeps the 64 MiB working
/// set of a guest that dirties memory in pre-copy for minutes (with a 1 ms blackout
/// budget, 1 KiB at that rate, that the dirtying guest never meets).
struct MidMigration {
    cl: Cluster,
    csv: PathBuf,
    leader: u64,
    src: u64,
    dst: u64,
    /// The running migration record's id.
    rec: u64,
    before: pb::VmInfo,
    /// The lock's token before the migration.
    old: u64,
}

async fn disk_vm_in_endless_precopy(extra_toml: &str) -> MidMigration {
    // The capped migration below stays in pre-copy whatever the guest does.
    let hold = [(cluster_tests::HOLD_PRECOPY_ENV, "vm-m")];
    let (cl, csv) = disk_cluster_with(3, extra_toml, &hold).await;
    create_disk(&cl, 1, "vol/vms/m.img").await;
    let leader = cl.check(cl.status(1).await).leader_id;
    let (src, dst) = followers(leader);
    let boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Dirty as i32,
        wss_mib: 64,
        rate_mbps: 4000,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    let spec = pb::VmSpec {
        preferred_owners: vec![src],
        memory_mib: 128,
        boot: Some(pb::vm_spec::Boot::TestGuest(boot)),
        ..disk_spec("vm-m", &["vol/vms/m.img"])
    };
    let mut c = cl.vms(leader).await;
    let before = cl.create_running(leader, spec).await;
    assert_eq!(before.owner_id, src);
    let old = cl
        .wait_lock(leader, "vol/vms/m.img", "locked by the owner", |l| {
            l.is_some_and(|l| l.holders == vec![src])
        })
        .await
        .map_or(0, |l| l.token);
    c.migrate_vm(pb::MigrateVmRequest {
        name: "vm-m".into(),
        to_node_id: dst,
        max_downtime: Some(cluster_proto::times::duration_from_ms(1)),
        deadline: Some(cluster_proto::times::duration_from_ms(600_000)),
        bandwidth_bytes_per_s_max: Some(1 << 20),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let rec = cl.running_migration(leader, "vm-m", WAIT).await.id;
    cl.wait_precopy(leader, rec).await;
    let v = get_vm(&mut c, "vm-m")
        .await
        .unwrap_or_else(|e| panic!("get: {e}"));
    assert_eq!((v.owner_id, v.migrating_to), (src, dst), "{v:?}");
    MidMigration {
        cl,
        csv,
        leader,
        src,
        dst,
        rec,
        before,
        old,
    }
}

async fn owner_lost_mid_migration(loss: Loss) {
    let _serial = cluster_tests::serial().await;
    let MidMigration {
        mut cl,
        csv,
        leader,
        src,
        dst,
        rec,
        before,
        old,
    } = disk_vm_in_endless_precopy(match loss {
        Loss::Freeze => "vm_workers = true\n",
        Loss::FreezeInProcess => "vm_workers = false\n",
        Loss::Kill9 => "",
    })
    .await;
    let lost = Instant::now();
    match loss {
        Loss::Kill9 => {
            let killed = cl.kill9(src);
            cl.check(killed);
        }
        Loss::Freeze | Loss::FreezeInProcess => signal(&cl, src, "STOP"),
    }
    let after = cl
        .wait_vm(leader, "vm-m", "restart on the migration target", |v| {
            v.owner_id == dst && v.migrating_to == 0 && v.runtime().name() == "running"
        })
        .await;
    assert!(after.generation > before.generation, "{after:?}");
    eprintln!(
        "vm-m running on the migration target {} ms after its source was lost",
        lost.elapsed().as_millis()
    );
    let (node, _) = cl.wait_heartbeat(leader, "vm-m", |_| true).await;
    assert_eq!(node, dst);
    let ended = cl.migration_end(leader, rec, WAIT).await;
    assert_eq!(ended.state().name(), "failed", "{ended:?}");
    let new = cl
        .lock_of(leader, "vol/vms/m.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(new.holders, vec![dst]);
    assert!(new.token > old, "token {} after {old}", new.token);
    assert_eq!(fence_token(&csv, "vol/vms/m.img"), new.token);
    let dst_log = cl.log_tail(dst, 400);
    match loss {
        Loss::Kill9 => assert!(
            dst_log.contains("incoming migration failed"),
            "{}",
            cl.logs()
        ),
        Loss::Freeze | Loss::FreezeInProcess => {
            // With a worker, the receive ends when the worker fences itself and closes
            // its connections (or, if the failover came first, when the target's agent
            // abandons it); in-process, only abandoning it ends the wait.
            let ended = dst_log.contains("incoming migration abandoned")
                || (loss == Loss::Freeze && dst_log.contains("incoming migration failed"));
            assert!(
                ended,
                "the target waited for its silent source{}",
                cl.logs()
            );
            assert!(
                lost.elapsed() < Duration::from_secs(20),
                "the target waited out its I/O timeout{}",
                cl.logs()
            );
            // The frozen source thaws with its lease long lapsed: it stops its copy, and
            // the VM stays with the target.
            signal(&cl, src, "CONT");
            let (node, _) = cl.wait_heartbeat(leader, "vm-m", |_| true).await;
            assert_eq!(node, dst);
            let v = cl
                .wait_vm(leader, "vm-m", "still on the target", |v| {
                    v.owner_id == dst && v.runtime().name() == "running"
                })
                .await;
            assert_eq!(v.generation, after.generation, "{v:?}");
        }
    }
}

/// The source dies right after a successful switchover, before it commits the end of
/// the migration (crash point `migrate-out-after-switchover`, as abrupt as kill -9): the
/// record still names the dead source as owner, but the VM already runs on the target.
/// Failover gives it to the target, where it keeps running — the guest keeps counting,
/// its disk lock stays with the handoff's token. The same crash after a quick
/// migration's save and handoff: the target, which holds the disk, boots the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_dying_after_the_switchover_leaves_the_vm_on_the_target() {
    let _serial = cluster_tests::serial().await;
    let crash = [("CLUSTER_AGENT_CRASH_AT", "migrate-out-after-switchover")];
    let (mut cl, csv) = disk_cluster_with_env(3, &crash).await;
    create_disk(&cl, 1, "vol/vms/w.img").await;
    let leader = cl.check(cl.status(1).await).leader_id;
    let (src, dst) = followers(leader);
    let spec = pb::VmSpec {
        preferred_owners: vec![src],
        ..disk_spec("vm-w", &["vol/vms/w.img"])
    };
    let mut c = cl.vms(leader).await;
    let before = cl.create_running(leader, spec).await;
    assert_eq!(before.owner_id, src);
    // Long enough on the source that a guest rebooted on the target could not have
    // counted this far by the time the failover is done.
    let (_, hb) = cl
        .wait_heartbeat(leader, "vm-w", |h| h.disk == "ok" && h.seq >= 40)
        .await;
    let seq_before = hb.seq;

    c.migrate_vm(pb::MigrateVmRequest {
        name: "vm-w".into(),
        to_node_id: dst,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let after = cl
        .wait_vm(leader, "vm-w", "owner change to the target", |v| {
            v.owner_id == dst && v.migrating_to == 0 && v.runtime().name() == "running"
        })
        .await;
    assert!(
        cl.log_tail(src, 200).contains("crash point reached"),
        "the source did not crash at the crash point{}",
        cl.logs()
    );
    let (node, hb) = cl.wait_heartbeat(leader, "vm-w", |_| true).await;
    assert_eq!(node, dst);
    assert!(
        hb.seq > seq_before,
        "the guest restarted on the target (seq {} after {seq_before}){}",
        hb.seq,
        cl.logs()
    );
    cl.wait_heartbeat(leader, "vm-w", |h| h.disk == "ok" && h.seq > hb.seq)
        .await;
    let handed = cl
        .lock_of(leader, "vol/vms/w.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(handed.holders, vec![dst]);
    assert_eq!(handed.handoff_to, 0);
    assert_eq!(fence_token(&csv, "vol/vms/w.img"), handed.token);
    let events = cl.check(cl.events(leader).await);
    assert!(
        events.iter().any(|e| e
            .message
            .contains(&format!("VM vm-w owner node {src} -> node {dst}"))),
        "{events:?}"
    );
    eprintln!(
        "vm-w kept running on node {dst}: generation {} -> {}, seq {seq_before} -> {}",
        before.generation, after.generation, hb.seq
    );

    // The same crash on a quick migration back to the restarted source node.
    let restarted = cl.start(src).await;
    cl.check(restarted);
    cl.wait_node_state(leader, src, "up", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    c.migrate_vm(pb::MigrateVmRequest {
        name: "vm-w".into(),
        to_node_id: src,
        quick: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("quick migrate: {e}{}", cl.logs()));
    let back = cl
        .wait_vm(leader, "vm-w", "owner change to the quick target", |v| {
            v.owner_id == src && v.migrating_to == 0 && v.runtime().name() == "running"
        })
        .await;
    assert!(back.generation > after.generation);
    let (node, _) = cl.wait_heartbeat(leader, "vm-w", |h| h.disk == "ok").await;
    assert_eq!(node, src);
    let held = cl
        .lock_of(leader, "vol/vms/w.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(held.holders, vec![src]);
    assert!(held.token > handed.token);
    assert_eq!(fence_token(&csv, "vol/vms/w.img"), held.token);
}

/// The target dies (kill -9) in the middle of a live migration of a VM with a disk: the
/// VM runs on at the source, and the disk lock never left it (same holder, same token,
/// the same fence record: locks move only at the storage stage); the source can release
/// and take the lock again as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_kill9_mid_migration_leaves_the_vm_and_its_lock_with_the_source() {
    let _serial = cluster_tests::serial().await;
    let MidMigration {
        mut cl,
        csv,
        leader,
        src,
        dst,
        rec,
        before,
        old,
    } = disk_vm_in_endless_precopy("").await;
    let held = cl.lock_of(leader, "vol/vms/m.img").await;
    assert_eq!(held.map(|l| (l.holders, l.token)), Some((vec![src], old)));
    let killed = cl.kill9(dst);
    cl.check(killed);
    let ended = cl.migration_end(leader, rec, WAIT).await;
    assert_eq!(ended.state().name(), "failed", "{ended:?}");
    let kept = cl.lock_of(leader, "vol/vms/m.img").await;
    assert_eq!(kept.map(|l| (l.holders, l.token)), Some((vec![src], old)));
    assert_eq!(fence_token(&csv, "vol/vms/m.img"), old);
    let v = cl
        .wait_vm(leader, "vm-m", "running on the source", |v| {
            v.owner_id == src && v.migrating_to == 0 && v.runtime().name() == "running"
        })
        .await;
    assert_eq!(v.generation, before.generation, "{v:?}");
    let (node, _) = cl.wait_heartbeat(leader, "vm-m", |_| true).await;
    assert_eq!(node, src);
    // The table and the host agree: stop releases the lock, start takes it again.
    let mut c = cl.vms(leader).await;
    c.stop_vm(pb::StopVmRequest {
        name: "vm-m".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("stop: {e}"));
    cl.wait_lock(leader, "vol/vms/m.img", "released", |l| l.is_none())
        .await;
    c.start_vm(pb::StartVmRequest {
        name: "vm-m".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("start: {e}"));
    let again = cl
        .wait_vm(leader, "vm-m", "running again", |v| {
            v.runtime().name() == "running"
        })
        .await;
    let relocked = cl
        .lock_of(leader, "vol/vms/m.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(relocked.holders, vec![again.owner_id]);
    assert_eq!(fence_token(&csv, "vol/vms/m.img"), relocked.token);
}

/// The source of a quick migration dies before it saves the VM (crash point
/// `quick-migrate-out-before-save`, as abrupt as kill -9) and is restarted at once: its
/// record still names it the owner and the target, nothing was handed off, nothing runs
/// here. It ends the migration as failed and boots the VM again — or, if it was marked
/// Down before it was back, failover moved the VM. Either way the migration ends and the
/// VM runs, verifying its disk. (A chaos run found such a record open for minutes, the
/// VM running nowhere: the source had fenced the VM just before the migration started.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_migration_source_dying_before_the_save_and_restarting() {
    let _serial = cluster_tests::serial().await;
    let crash = [("CLUSTER_AGENT_CRASH_AT", "quick-migrate-out-before-save")];
    let (mut cl, _csv) = disk_cluster_with_env(3, &crash).await;
    create_disk(&cl, 1, "vol/vms/q.img").await;
    let leader = cl.check(cl.status(1).await).leader_id;
    let (src, dst) = followers(leader);
    let spec = pb::VmSpec {
        preferred_owners: vec![src],
        ..disk_spec("vm-q", &["vol/vms/q.img"])
    };
    let before = cl.create_running(leader, spec).await;
    assert_eq!(before.owner_id, src);
    cl.wait_heartbeat(leader, "vm-q", |h| h.disk == "ok").await;
    cl.vms(leader)
        .await
        .migrate_vm(pb::MigrateVmRequest {
            name: "vm-q".into(),
            to_node_id: dst,
            quick: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let exited = cl.wait_exit(src, WAIT).await;
    let status = cl.check(exited);
    assert!(!status.success(), "{status}");
    assert!(
        cl.log_tail(src, 200).contains("crash point reached"),
        "the source did not crash at the crash point{}",
        cl.logs()
    );
    let removed = cl.remove_env(src, "CLUSTER_AGENT_CRASH_AT");
    cl.check(removed);
    let started = cl.start(src).await;
    cl.check(started);
    let after = cl
        .wait_vm(leader, "vm-q", "the migration ended and the VM runs", |v| {
            v.migrating_to == 0 && v.runtime().name() == "running" && v.owner_id != 0
        })
        .await;
    let resolved = cl
        .log_tail(src, 400)
        .contains("orphaned migration resolved");
    eprintln!(
        "vm-q runs on node {} (source {src}); ended by the restarted source: {resolved}",
        after.owner_id
    );
    let (node, _) = cl
        .wait_heartbeat(leader, "vm-q", |h| h.disk == "ok" && h.seq >= 3)
        .await;
    assert_eq!(node, after.owner_id);
}

/// The token a lock event names (`... fencing token N ...`).
fn event_token(message: &str) -> Option<u64> {
    let rest = &message[message.find("fencing token ")? + "fencing token ".len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The target dies after it opened the disk with the staged handoff's reserved token
/// (crash point `migrate-in-after-restore`: VM restored, disks open, `Ready` not sent):
/// the source rolls back and takes the disk back with a token above the reserved one, so
/// its fence record refuses the target's token from then on; the guest goes on where it
/// was on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_dying_after_opening_with_the_reserved_token_gives_the_disk_back_above_it() {
    let _serial = cluster_tests::serial().await;
    // Only a migration target reaches this point.
    let crash = [("CLUSTER_AGENT_CRASH_AT", "migrate-in-after-restore")];
    let (cl, csv) = disk_cluster_with_env(3, &crash).await;
    create_disk(&cl, 1, "vol/vms/t.img").await;
    let leader = cl.check(cl.status(1).await).leader_id;
    let (src, dst) = followers(leader);
    let spec = pb::VmSpec {
        preferred_owners: vec![src],
        ..disk_spec("vm-t", &["vol/vms/t.img"])
    };
    let mut c = cl.vms(leader).await;
    let before = cl.create_running(leader, spec).await;
    assert_eq!(before.owner_id, src);
    let (_, hb) = cl
        .wait_heartbeat(leader, "vm-t", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    let old = cl
        .lock_of(leader, "vol/vms/t.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));

    c.migrate_vm(pb::MigrateVmRequest {
        name: "vm-t".into(),
        to_node_id: dst,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    cl.wait_vm(leader, "vm-t", "rollback to the source", |v| {
        v.migrating_to == 0 && v.owner_id == src
    })
    .await;
    assert!(
        cl.log_tail(dst, 200).contains("crash point reached"),
        "the target did not crash at the crash point{}",
        cl.logs()
    );
    let events = cl.check(cl.events(leader).await);
    let reserved = format!("disk vol/vms/t.img handoff from node {src} to node {dst} reserved");
    let reserved_token = events
        .iter()
        .find(|e| e.message.contains(&reserved))
        .and_then(|e| event_token(&e.message))
        .unwrap_or_else(|| panic!("no reservation event: {events:?}"));
    assert!(reserved_token > old.token);
    // The guest runs on the source again, writing its disk, without a reboot.
    let (node, after) = cl
        .wait_heartbeat(leader, "vm-t", |h| {
            h.seq > hb.seq && h.disk == "ok" && disk_passes(h) > disk_passes(&hb)
        })
        .await;
    assert_eq!(node, src);
    assert!(after.seq > hb.seq);
    let now = cl
        .lock_of(leader, "vol/vms/t.img")
        .await
        .unwrap_or_else(|| panic!("not locked{}", cl.logs()));
    assert_eq!(now.holders, vec![src]);
    assert_eq!(now.handoff_to, 0, "{now:?}");
    assert!(
        now.token > reserved_token,
        "token {} taken back at or below the reserved {reserved_token}",
        now.token
    );
    assert_eq!(fence_token(&csv, "vol/vms/t.img"), now.token);
}
