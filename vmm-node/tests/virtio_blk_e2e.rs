//! End to end: the test guest's polling virtio-blk driver (guest/virtio_blk.c) against
//! the VMM's virtio-blk slots on a real KVM VM, including hot-add and hot-remove while
//! the guest runs.
//!
//! The slots (`BlkSlots`) are created and registered here through the `Vm` API
//! (`register_mmio_device`, `irq_line`), as the VMM core does.

mod common;

use std::time::Duration;

use common::*;
use vmm_node::devices::virtio::BlkSlots;
use vmm_node::disk::{DiskBackend, RawFileDisk};
use vmm_node::guest_protocol::{heartbeats, Heartbeat, Workload, WorkloadKind};
use vmm_node::snapshot;
use vmm_node::{Vm, VmStatus};

const SLOTS: usize = 8;
/// The guest's disk workload writes, flushes and verifies its first 64 KiB.
const WORKLOAD_BYTES: usize = 64 << 10;

fn disk_passes(h: &Heartbeat) -> u64 {
    h.fields
        .get("disk_passes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn image(mib: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(mib << 20).unwrap();
    f
}

/// Create the disk-workload guest (paused) with all 8 slots on its MMIO bus.
fn disk_guest() -> (Vm, BlkSlots) {
    require_kvm();
    let cfg = test_guest_config(1, 64, &Workload::new(WorkloadKind::Disk));
    let vm = Vm::create(cfg).expect("create VM");
    let slots = add_slots(&vm);
    (vm, slots)
}

/// Put 8 empty slots on `vm`'s MMIO bus, as the VMM core does.
fn add_slots(vm: &Vm) -> BlkSlots {
    let slots = BlkSlots::new(vm.memory(), |gsi| vm.irq_line(gsi)).expect("slots");
    for (base, len, dev) in slots.bus_devices() {
        vm.register_mmio_device(base, len, dev)
            .expect("register slot");
    }
    slots
}

fn raw(path: &std::path::Path) -> Box<dyn DiskBackend> {
    Box::new(RawFileDisk::open(path, false).unwrap())
}

fn stats(slots: &BlkSlots, i: usize) -> vmm_node::devices::virtio::BlkStats {
    slots.slot(i).unwrap().lock().unwrap().stats()
}

fn last(hb: &[Heartbeat]) -> &Heartbeat {
    hb.last().expect("at least one heartbeat")
}

#[test]
fn guest_disk_pattern_workload_reports_ok() {
    let (vm, slots) = disk_guest();
    let img = image(1);
    slots.attach(2, raw(img.path()), false).unwrap();
    vm.start().unwrap();
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| disk_passes(h) >= 3),
    );
    assert_eq!(last(&hb).disk, "ok");
    assert!(
        hb.iter().all(|h| h.disk != "bad"),
        "a pass failed to verify"
    );
    assert_continuous(&hb);
    vm.pause().unwrap();
    let st2 = stats(&slots, 2);
    assert!(st2.flushes >= 3, "{st2:?}");
    assert!(st2.written_bytes >= 3 * WORKLOAD_BYTES as u64, "{st2:?}");
    assert!(st2.read_bytes >= 3 * WORKLOAD_BYTES as u64, "{st2:?}");
    assert_eq!(st2.requests_failed, 0, "{st2:?}");
    assert_eq!(st2.guest_errors, 0, "{st2:?}");
    // Flushed data is in the file; past the workload's range the image is untouched.
    let file = std::fs::read(img.path()).unwrap();
    assert!(file[..WORKLOAD_BYTES].iter().any(|b| *b != 0));
    assert!(file[WORKLOAD_BYTES..].iter().all(|b| *b == 0));
    // The other slots were probed by the guest but never used.
    for i in (0..SLOTS).filter(|i| *i != 2) {
        let st = stats(&slots, i);
        assert_eq!(st.requests_ok + st.requests_failed, 0, "slot {i}: {st:?}");
    }
    vm.destroy().unwrap();
}

#[test]
fn hot_add_and_remove_on_a_running_guest() {
    let (vm, slots) = disk_guest();
    vm.start().unwrap();
    // No disk: the guest says so and keeps running.
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.len() >= 3,
    );
    assert!(hb.iter().all(|h| h.disk == "nodisk"), "{:?}", last(&hb));

    // Hot-add into slot 5 while the guest runs: it finds the disk and passes.
    let first = image(2);
    slots.attach(5, raw(first.path()), false).unwrap();
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| {
            h.last()
                .is_some_and(|h| h.disk == "ok" && disk_passes(h) >= 2)
        },
    );
    let passes_with_first = disk_passes(last(&hb));
    assert_continuous(&hb);

    // Hot-remove: the device flushes and hands the disk back; the guest loses it.
    let disk = slots.detach(5).unwrap();
    assert_eq!(disk.describe(), first.path().display().to_string());
    drop(disk);
    let seen = hb.len();
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.len() >= seen + 3 && h.last().is_some_and(|h| h.disk == "nodisk"),
    );
    assert_eq!(vm.status(), VmStatus::Running);
    let after_remove = disk_passes(last(&hb));
    assert!(after_remove >= passes_with_first);
    let data = std::fs::read(first.path()).unwrap();
    assert!(
        data[..WORKLOAD_BYTES].iter().any(|b| *b != 0),
        "flushed before detach"
    );

    // A different disk in a different slot: the guest finds that one too.
    let second = image(1);
    slots.attach(1, raw(second.path()), false).unwrap();
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| {
            h.last()
                .is_some_and(|h| h.disk == "ok" && disk_passes(h) >= after_remove + 2)
        },
    );
    assert_continuous(&hb);
    assert!(hb.iter().all(|h| h.disk != "bad"));
    vm.pause().unwrap();
    let s1 = stats(&slots, 1);
    assert!(s1.flushes >= 2, "{s1:?}");
    let s5 = stats(&slots, 5);
    assert_eq!(s5.guest_errors, 0, "{s5:?}");
    assert!(std::fs::read(second.path()).unwrap()[..WORKLOAD_BYTES]
        .iter()
        .any(|b| *b != 0));
    vm.destroy().unwrap();
}

#[test]
fn snapshot_restore_mid_workload_keeps_disk_pattern_verifying() {
    let (vm, slots) = disk_guest();
    let img = image(1);
    slots.attach(3, raw(img.path()), false).unwrap();
    vm.start().unwrap();
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| {
            h.last()
                .is_some_and(|h| h.disk == "ok" && disk_passes(h) >= 2)
        },
    );
    // Pause, drain, save: vCPUs + memory through core's snapshot, slots through ours.
    vm.pause().unwrap();
    let before = heartbeats(&vm.console().text());
    let saved = slots.save();
    let dir = tempfile::tempdir().unwrap();
    snapshot::save(&vm, dir.path()).unwrap();
    // Storage handoff: the source closes its disk before the target opens it.
    drop(slots.detach_all().unwrap());
    vm.destroy().unwrap();

    let restored = snapshot::restore(dir.path()).unwrap();
    let new_slots = add_slots(&restored);
    new_slots
        .restore(&saved, |_, b| {
            assert_eq!(b.description, img.path().display().to_string());
            RawFileDisk::open(&b.description, b.read_only)
                .map(|d| Box::new(d) as Box<dyn DiskBackend>)
        })
        .unwrap();
    assert_eq!(
        new_slots
            .slot(3)
            .unwrap()
            .lock()
            .unwrap()
            .capacity_sectors(),
        2048
    );
    restored.resume().unwrap();
    let last_before = disk_passes(last(&before));
    let after = wait_heartbeats(
        || restored.console().text(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| disk_passes(h) >= last_before + 3),
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_continuous(&all);
    assert!(after.iter().all(|h| h.disk == "ok"), "{:?}", last(&after));
    restored.pause().unwrap();
    let st = stats(&new_slots, 3);
    assert!(st.flushes >= 3, "{st:?}");
    assert_eq!(
        st.requests_failed + st.chains_skipped + st.guest_errors,
        0,
        "{st:?}"
    );
    restored.destroy().unwrap();
}

/// The slots installed as the VM's `DiskSlots` (what the debug binary and the
/// cluster-agent do): a configured disk is attached at boot, hot-plug goes through
/// `Vm::attach_disk`/`detach_disk`, and a snapshot restored into a new VM reopens both the
/// configured and the hot-added disk, whose guest-side patterns keep verifying.
#[test]
fn installed_slots_route_config_hotplug_and_snapshot_through_the_vm() {
    use vmm_node::config::DiskSlotConfig;
    use vmm_node::devices::virtio::{install_virtio_slots, raw_file_opener};
    require_kvm();
    let boot_disk = image(1);
    let extra = image(1);
    let mut cfg = test_guest_config(1, 64, &Workload::new(WorkloadKind::Disk));
    cfg.disks.push(DiskSlotConfig {
        slot: 0,
        path: boot_disk.path().to_path_buf(),
        read_only: false,
    });
    let vm = Vm::create(cfg).expect("create VM");
    let installed = install_virtio_slots(&vm, raw_file_opener(), true).expect("install slots");
    vm.start().unwrap();
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| disk_passes(h) >= 2),
    );
    assert_eq!(last(&hb).disk, "ok");
    assert!(stats(installed.slots(), 0).written_bytes > 0);

    // Hot-add through the VM; detaching an empty slot is a clear error.
    vm.attach_disk(&DiskSlotConfig {
        slot: 3,
        path: extra.path().to_path_buf(),
        read_only: false,
    })
    .unwrap();
    let err = vm.detach_disk(6).unwrap_err();
    assert!(format!("{err:#}").contains("slot 6"), "{err:#}");

    let dir = tempfile::tempdir().unwrap();
    vm.pause().unwrap();
    let seq_before = last(&heartbeats(&vm.console().text())).seq;
    snapshot::save(&vm, dir.path()).unwrap();
    vm.destroy().unwrap();

    let restored = snapshot::restore_with(dir.path(), |vm| {
        install_virtio_slots(vm, raw_file_opener(), false).map(|_| ())
    })
    .expect("restore with disks");
    restored.resume().unwrap();
    let hb = wait_heartbeats(
        || restored.console().text(),
        Duration::from_secs(30),
        |h| h.iter().filter(|h| h.seq > seq_before).count() >= 3,
    );
    let after: Vec<_> = hb.into_iter().filter(|h| h.seq > seq_before).collect();
    assert_eq!(after[0].seq, seq_before + 1, "heartbeat gap after restore");
    assert_continuous(&after);
    assert!(
        after.iter().all(|h| h.disk == "ok" || h.disk == "-"),
        "{:?}",
        last(&after)
    );
    restored.detach_disk(3).unwrap();
    restored.destroy().unwrap();
}
