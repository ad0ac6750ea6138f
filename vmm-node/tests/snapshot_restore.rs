//! Snapshot → restore keeps the guest running exactly where it stopped.

mod common;

use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};
use vmm_node::snapshot;

#[test]
fn snapshot_restore_in_process_continues_guest() {
    let w = Workload {
        wss_mib: 24,
        ..Workload::new(WorkloadKind::Mem)
    };
    let vm = start_test_guest(2, 64, &w);
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| h.mem == "ok" && h.mem_passes >= 2),
    );
    vm.pause().unwrap();
    let before = heartbeats(&vm.console().text());
    let dir = tempfile::tempdir().unwrap();
    snapshot::save(&vm, dir.path()).unwrap();
    vm.destroy().unwrap();

    let restored = snapshot::restore(dir.path()).unwrap();
    restored.resume().unwrap();
    let after = wait_heartbeats(
        || restored.console().text(),
        Duration::from_secs(30),
        |h| h.len() >= 5,
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    assert_continuous(&all);
    let last = after.last().unwrap();
    assert_eq!(last.mem, "ok", "{last:?}");
    assert!(last.mem_passes > before.last().unwrap().mem_passes);
    assert_eq!(last.cpus, 2);
    restored.destroy().unwrap();
}

#[test]
fn guest_above_the_mmio_gap_boots_snapshots_and_restores() {
    // 4 GiB: RAM below 3 GiB plus 1 GiB above 4 GiB (two memory slots, two file parts).
    let w = Workload {
        wss_mib: 16,
        ..Workload::new(WorkloadKind::Mem)
    };
    let vm = start_test_guest(1, 4096, &w);
    assert_eq!(vm.memory().num_regions(), 2);
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| h.mem == "ok"),
    );
    vm.start_dirty_log().unwrap();
    let bits = vm.dirty_pages().unwrap();
    assert_eq!(bits.len(), 2);
    assert_eq!(bits[1].len(), (1usize << 30) / 4096 / 64);
    // A device write above the gap is found in the second region's bitmap, page 1.
    vm.memory()
        .write_obj(1u64, GuestAddress((4u64 << 30) + 4096))
        .unwrap();
    assert_eq!(vm.dirty_pages().unwrap()[1][0] & 0b10, 0b10);
    vm.stop_dirty_log().unwrap();
    vm.pause().unwrap();
    let before = heartbeats(&vm.console().text());
    let dir = tempfile::tempdir().unwrap();
    snapshot::save(&vm, dir.path()).unwrap();
    vm.destroy().unwrap();
    let restored = snapshot::restore(dir.path()).unwrap();
    assert_eq!(
        restored
            .memory()
            .read_obj::<u64>(GuestAddress((4u64 << 30) + 4096))
            .unwrap(),
        1
    );
    restored.resume().unwrap();
    let after = wait_heartbeats(
        || restored.console().text(),
        Duration::from_secs(30),
        |h| h.len() >= 3,
    );
    let mut all = before;
    all.extend(after.iter().cloned());
    assert_continuous(&all);
    assert_eq!(after.last().unwrap().mem, "ok");
    restored.destroy().unwrap();
}
