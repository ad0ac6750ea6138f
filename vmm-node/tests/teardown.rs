//! Creating and destroying VMs leaks no threads, fds or guest memory mappings.
//! (Alone in its test binary so that other tests do not disturb the counts.)

mod common;

use std::time::Duration;

use common::*;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_node::guest_protocol::{Workload, WorkloadKind};

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}
/// Whether any mapping of this process overlaps `[start, start + len)`.
fn mapped(start: u64, len: u64) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let a = u64::from_str_radix(a, 16).unwrap();
            let b = u64::from_str_radix(b, 16).unwrap();
            a < start + len && start < b
        })
}

#[test]
fn create_destroy_loop_leaks_nothing() {
    require_kvm();
    const MEM_MIB: u64 = 200;
    // Warm up once (lazy statics, signal handler, logging).
    let vm = start_test_guest(2, MEM_MIB, &Workload::new(WorkloadKind::Idle));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    vm.destroy().unwrap();
    let (fd0, th0) = (fds(), threads());
    for _ in 0..5 {
        let vm = start_test_guest(4, MEM_MIB, &Workload::new(WorkloadKind::Idle));
        wait_heartbeats(
            || vm.console().text(),
            Duration::from_secs(20),
            |h| !h.is_empty(),
        );
        assert!(threads() >= th0 + 4, "vCPU threads not visible");
        let host = vm.memory().get_host_address(GuestAddress(0)).unwrap() as u64;
        assert!(mapped(host, MEM_MIB << 20));
        vm.pause().unwrap();
        vm.resume().unwrap();
        vm.destroy().unwrap();
        assert!(
            !mapped(host, MEM_MIB << 20),
            "guest memory still mapped after destroy"
        );
    }
    assert_eq!(fds(), fd0, "file descriptors leaked");
    assert_eq!(threads(), th0, "threads leaked");
}
