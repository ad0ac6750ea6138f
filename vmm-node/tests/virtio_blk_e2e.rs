//! End to end: the test guest's polling virtio-blk driver (guest/virtio_blk.c) against
//! the VMM's virtio-blk slots on a real KVM VM, including hot-add and hot-remove while
//! the guest runs.
//!
//! The slots are created and registered here through the `Vm` API
//! (`register_mmio_device`, `irq_line`), exactly as the VMM core does.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use vmm_node::devices::virtio::VirtioBlkState;
use vmm_node::devices::virtio::{slot_irq, slot_mmio_base, VirtioBlk, SLOT_MMIO_SIZE_BYTES};
use vmm_node::devices::{IrqLine, MmioDevice};
use vmm_node::disk::RawFileDisk;
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
fn disk_guest() -> (Vm, Vec<Arc<Mutex<VirtioBlk>>>) {
    require_kvm();
    let cfg = test_guest_config(1, 64, &Workload::new(WorkloadKind::Disk));
    let vm = Vm::create(cfg).expect("create VM");
    let slots = add_slots(&vm);
    (vm, slots)
}

/// Put 8 empty slots on `vm`'s MMIO bus.
fn add_slots(vm: &Vm) -> Vec<Arc<Mutex<VirtioBlk>>> {
    let mut slots = Vec::new();
    for i in 0..SLOTS {
        let irq: Arc<dyn IrqLine> = vm.irq_line(slot_irq(i)).expect("irq line");
        let dev = Arc::new(Mutex::new(VirtioBlk::new(
            i as u8,
            vm.memory().clone(),
            irq,
        )));
        let bus_dev: Arc<Mutex<dyn MmioDevice>> = dev.clone();
        vm.register_mmio_device(slot_mmio_base(i), SLOT_MMIO_SIZE_BYTES, bus_dev)
            .expect("register slot");
        slots.push(dev);
    }
    slots
}

fn last(hb: &[Heartbeat]) -> &Heartbeat {
    hb.last().expect("at least one heartbeat")
}

#[test]
fn guest_disk_pattern_workload_reports_ok() {
    let (vm, slots) = disk_guest();
    let img = image(1);
    slots[2]
        .lock()
        .unwrap()
        .attach(
            Box::new(RawFileDisk::open(img.path(), false).unwrap()),
            false,
        )
        .unwrap();
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
    let stats = slots[2].lock().unwrap().stats();
    assert!(stats.flushes >= 3, "{stats:?}");
    assert!(
        stats.written_bytes >= 3 * WORKLOAD_BYTES as u64,
        "{stats:?}"
    );
    assert!(stats.read_bytes >= 3 * WORKLOAD_BYTES as u64, "{stats:?}");
    assert_eq!(stats.requests_failed, 0, "{stats:?}");
    assert_eq!(stats.guest_errors, 0, "{stats:?}");
    // Flushed data is in the file; past the workload's range the image is untouched.
    let file = std::fs::read(img.path()).unwrap();
    assert!(file[..WORKLOAD_BYTES].iter().any(|b| *b != 0));
    assert!(file[WORKLOAD_BYTES..].iter().all(|b| *b == 0));
    // The other slots were probed by the guest but never used.
    for (i, s) in slots.iter().enumerate().filter(|(i, _)| *i != 2) {
        let st = s.lock().unwrap().stats();
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
    slots[5]
        .lock()
        .unwrap()
        .attach(
            Box::new(RawFileDisk::open(first.path(), false).unwrap()),
            false,
        )
        .unwrap();
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
    let disk = slots[5].lock().unwrap().detach().unwrap();
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
    slots[1]
        .lock()
        .unwrap()
        .attach(
            Box::new(RawFileDisk::open(second.path(), false).unwrap()),
            false,
        )
        .unwrap();
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
    let s1 = slots[1].lock().unwrap().stats();
    assert!(s1.flushes >= 2, "{s1:?}");
    let s5 = slots[5].lock().unwrap().stats();
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
    slots[3]
        .lock()
        .unwrap()
        .attach(
            Box::new(RawFileDisk::open(img.path(), false).unwrap()),
            false,
        )
        .unwrap();
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
    let saved: Vec<Vec<u8>> = slots
        .iter()
        .map(|s| {
            let mut s = s.lock().unwrap();
            s.quiesce();
            s.save_state().encode()
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    snapshot::save(&vm, dir.path()).unwrap();
    // Storage handoff: the source closes its disk before the target opens it.
    drop(slots[3].lock().unwrap().detach().unwrap());
    vm.destroy().unwrap();

    let restored = snapshot::restore(dir.path()).unwrap();
    let new_slots = add_slots(&restored);
    for (slot, bytes) in new_slots.iter().zip(&saved) {
        let state = VirtioBlkState::decode(bytes).unwrap();
        let disk = state.backing.as_ref().map(|b| {
            assert_eq!(b.description, img.path().display().to_string());
            Box::new(RawFileDisk::open(&b.description, b.read_only).unwrap())
                as Box<dyn vmm_node::disk::DiskBackend>
        });
        slot.lock().unwrap().restore_in_place(&state, disk).unwrap();
    }
    assert_eq!(new_slots[3].lock().unwrap().capacity_sectors(), 2048);
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
    let st = new_slots[3].lock().unwrap().stats();
    assert!(st.flushes >= 3, "{st:?}");
    assert_eq!(
        st.requests_failed + st.chains_skipped + st.guest_errors,
        0,
        "{st:?}"
    );
    restored.destroy().unwrap();
}
