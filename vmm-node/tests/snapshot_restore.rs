//! Snapshot → restore keeps the guest running exactly where it stopped.

mod common;

use std::time::Duration;

use common::*;
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
