//! Migration primitives: dirty page tracking (KVM log + device writes) and throttling.

mod common;

use std::time::Duration;

use common::*;
use vm_memory::{Bytes, GuestAddress};
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};

fn count(bits: &[Vec<u64>]) -> u64 {
    bits.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn page_set(bits: &[Vec<u64>], gpa: u64) -> bool {
    let p = (gpa / 4096) as usize;
    bits[0][p / 64] & (1 << (p % 64)) != 0
}

#[test]
fn dirty_pages_report_guest_and_device_writes_and_clear_on_read() {
    // 8 MiB working set at 4 MiB..12 MiB, rewritten at 200 MB/s.
    let w = Workload {
        wss_mib: 8,
        rate_mbps: 200,
        ..Workload::new(WorkloadKind::Dirty)
    };
    let vm = start_test_guest(1, 64, &w);
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= 2,
    );
    vm.start_dirty_log().unwrap();
    // A device (VMM) write far from the guest's working set.
    let device_gpa = 40 << 20;
    vm.memory()
        .write_obj(0xfeed_u64, GuestAddress(device_gpa))
        .unwrap();
    // Read (and clear) the log until it has shown most of the 8 MiB (2048 pages) the
    // guest rewrites, this page among them: however slow the machine, the pages come.
    let working_set_page = (4 << 20) + 4096;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut bits = vm.dirty_pages().unwrap();
    let device_seen = page_set(&bits, device_gpa);
    while count(&bits) < 1500 || !page_set(&bits, working_set_page) {
        assert!(
            std::time::Instant::now() < deadline,
            "{} dirty pages, the working set's page at {working_set_page:#x} {}",
            count(&bits),
            if page_set(&bits, working_set_page) {
                "among them"
            } else {
                "not among them"
            }
        );
        // Paces the reads of the log.
        std::thread::sleep(Duration::from_millis(20));
        for (acc, more) in bits.iter_mut().zip(vm.dirty_pages().unwrap()) {
            for (a, m) in acc.iter_mut().zip(more) {
                *a |= m;
            }
        }
    }
    assert!(device_seen, "device write not reported");
    assert!(!page_set(&bits, 50 << 20), "untouched page reported dirty");
    // Cleared on read: the device page is not reported again.
    let again = vm.dirty_pages().unwrap();
    assert!(!page_set(&again, device_gpa));
    // Paused guest dirties nothing.
    vm.pause().unwrap();
    let _ = vm.dirty_pages().unwrap();
    // A window in which the running guest would rewrite its whole working set (8 MiB at
    // 200 MB/s: every 40 ms); a paused vCPU has no event to wait for.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count(&vm.dirty_pages().unwrap()), 0);
    vm.resume().unwrap();
    vm.stop_dirty_log().unwrap();
    // Guest keeps running after logging stops.
    let n = heartbeats(&vm.console().text()).len();
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= n + 2,
    );
    vm.destroy().unwrap();
}

#[test]
fn throttle_slows_the_guest_down() {
    // Unreachable rate: the guest dirties as fast as it can.
    let w = Workload {
        wss_mib: 16,
        rate_mbps: 1_000_000,
        ..Workload::new(WorkloadKind::Dirty)
    };
    let vm = start_test_guest(1, 64, &w);
    // The throttle is a rate: measured over windows of guest time (the heartbeats' TSC),
    // so host load slows both windows alike.
    let progress = |ms: u64| {
        let hb0 = heartbeats(&vm.console().text()).last().cloned().unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        let hb1 = heartbeats(&vm.console().text()).last().cloned().unwrap();
        (hb1.dirty_mib - hb0.dirty_mib) as f64 / ((hb1.tsc_us - hb0.tsc_us).max(1) as f64)
    };
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= 2,
    );
    let free = progress(1000);
    vm.set_throttle(90);
    assert_eq!(vm.throttle(), 90);
    // Lets the throttle take hold before the throttled window starts.
    std::thread::sleep(Duration::from_millis(200));
    let throttled = progress(1000);
    vm.set_throttle(0);
    assert!(
        throttled < free * 0.5,
        "throttle 90% did not slow the guest: {free:.3} vs {throttled:.3} MiB/us"
    );
    vm.destroy().unwrap();
}
