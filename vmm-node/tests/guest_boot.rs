//! The test guest boots through PVH, drops to CPL3 and runs its workloads.

mod common;

use std::time::Duration;

use common::*;
use vmm_node::guest_protocol::{parse_line, GuestLine, Workload, WorkloadKind};
use vmm_node::{StopReason, VmStatus};

#[test]
fn test_guest_boots_and_heartbeats() {
    let vm = start_test_guest(1, 32, &Workload::new(WorkloadKind::Idle));
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= 5,
    );
    assert_continuous(&hb);
    assert_eq!(hb[0].seq, 1);
    assert_eq!(hb[0].cpus, 1);
    let text = vm.console().text();
    let boot = text.lines().find_map(|l| match parse_line(l) {
        Some(GuestLine::Boot(f)) => Some(f),
        _ => None,
    });
    let boot = boot.expect("BOOT line");
    assert_eq!(boot["vcpus"], "1");
    assert_eq!(boot["tsc_khz"], vm.tsc_khz().to_string());
    // ~100 ms per heartbeat in guest time.
    let span_us = hb[4].tsc_us - hb[0].tsc_us;
    assert!(
        (300_000..=600_000).contains(&span_us),
        "4 heartbeats took {span_us} us of guest time"
    );
    assert_eq!(vm.status(), VmStatus::Running);
    vm.destroy().unwrap();
}

#[test]
fn memory_pattern_workload_verifies() {
    let w = Workload {
        wss_mib: 32,
        ..Workload::new(WorkloadKind::Mem)
    };
    let vm = start_test_guest(1, 64, &w);
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| h.mem_passes >= 3),
    );
    let last = hb.last().unwrap();
    assert_eq!(last.mem, "ok");
    assert_eq!(last.mem_errors, 0);
    vm.destroy().unwrap();
}

#[test]
fn dirty_workload_writes_at_the_requested_rate() {
    let w = Workload {
        wss_mib: 16,
        rate_mbps: 50,
        ..Workload::new(WorkloadKind::Dirty)
    };
    let vm = start_test_guest(1, 64, &w);
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| h.len() >= 11,
    );
    // 1 s of guest time at 50 MB/s ≈ 47 MiB (±).
    let mib = hb[10].dirty_mib - hb[0].dirty_mib;
    assert!(
        (30..=60).contains(&mib),
        "dirtied {mib} MiB in 1 s at 50 MB/s"
    );
    vm.destroy().unwrap();
}

#[test]
fn multi_vcpu_guest_runs_all_vcpus() {
    let w = Workload {
        wss_mib: 32,
        ..Workload::new(WorkloadKind::Mem)
    };
    let vm = start_test_guest(4, 128, &w);
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(30),
        |h| {
            h.last()
                .is_some_and(|h| h.cpus == 4 && h.mem != "fill" && h.mem_passes >= 8)
        },
    );
    assert_eq!(hb.last().unwrap().mem, "ok");
    vm.destroy().unwrap();
}

#[test]
fn thirty_two_vcpus_all_check_in() {
    let vm = start_test_guest(32, 64, &Workload::new(WorkloadKind::Idle));
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(60),
        |h| h.last().is_some_and(|h| h.cpus == 32) && h.len() >= 3,
    );
    assert_continuous(&hb);
    vm.pause().unwrap();
    assert_eq!(vm.save_state().unwrap().vcpus.len(), 32);
    vm.destroy().unwrap();
}

#[test]
fn pause_really_stops_the_guest_and_resume_continues() {
    let vm = start_test_guest(2, 32, &Workload::new(WorkloadKind::Idle));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= 2,
    );
    vm.pause().unwrap();
    assert_eq!(vm.status(), VmStatus::Paused);
    let frozen = vm.console().total_bytes();
    // A paused vCPU has no event to wait for: the window spans several heartbeats a
    // running guest would have printed.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        vm.console().total_bytes(),
        frozen,
        "guest produced output while paused"
    );
    vm.pause().unwrap(); // idempotent
    vm.resume().unwrap();
    let n = vmm_node::guest_protocol::heartbeats(&vm.console().text()).len();
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= n + 3,
    );
    assert_continuous(&hb);
    vm.destroy().unwrap();
}

#[test]
fn guest_exit_port_stops_the_vm_and_state_ops_then_fail_cleanly() {
    // The idle guest never exits by itself, so stop it from the host and check that
    // operations on a stopped VM give errors, not panics.
    let vm = start_test_guest(1, 16, &Workload::new(WorkloadKind::Idle));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    vm.stop().unwrap();
    assert_eq!(
        vm.status(),
        VmStatus::Stopped {
            reason: StopReason::Requested
        }
    );
    assert!(vm.resume().is_err());
    assert!(vm.pause().is_err());
    assert!(vm.save_state().is_err());
    vm.stop().unwrap(); // idempotent
}

#[test]
fn concurrent_pause_resume_and_stop_do_not_deadlock() {
    let vm = std::sync::Arc::new(start_test_guest(4, 32, &Workload::new(WorkloadKind::Idle)));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    let workers: Vec<_> = (0..3)
        .map(|i| {
            let vm = vm.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    // Errors are expected once the VM is stopped; panics or hangs are not.
                    let _ = if i % 2 == 0 { vm.pause() } else { vm.resume() };
                    let _ = vm.status();
                }
            })
        })
        .collect();
    // Stops the VM while the workers are mid-way through their toggles (the race is the
    // point of the test).
    std::thread::sleep(Duration::from_millis(50));
    vm.stop().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    assert!(matches!(vm.status(), VmStatus::Stopped { .. }));
    assert!(vm.resume().is_err());
}

#[test]
fn a_vcpu_boost_raises_the_vcpu_threads_priority_for_a_while_and_gives_it_back() {
    use vmm_node::kvm::{set_thread_nice, thread_nice};
    let vm = start_test_guest(2, 32, &Workload::new(WorkloadKind::Idle));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    let tids = vm.vcpu_thread_ids();
    assert_eq!(tids.len(), 2, "both vCPU threads started");
    for t in &tids {
        set_thread_nice(*t, 12).unwrap();
    }
    if set_thread_nice(tids[0], 11).is_err() {
        eprintln!("skipped: raising a thread's priority needs CAP_SYS_NICE");
        return;
    }
    set_thread_nice(tids[0], 12).unwrap();
    let nices = || -> Vec<i32> { tids.iter().map(|t| thread_nice(*t).unwrap()).collect() };

    assert_eq!(vm.boost_vcpus(3, Duration::from_secs(600)), 2);
    assert_eq!(nices(), [3, 3]);
    vm.end_vcpu_boost();
    assert_eq!(nices(), [12, 12], "each thread gets its own priority back");
    // Its timer ends with it instead of sleeping out the 600 s.
    let boost_timers = || {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "vcpu-boost")
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while boost_timers() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the boost's timer outlived it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A "boost" to a lower priority than the threads have leaves them alone.
    assert_eq!(vm.boost_vcpus(15, Duration::from_secs(600)), 0);
    assert_eq!(nices(), [12, 12]);

    // A timed boost ends by itself, each thread back at what it had when it began.
    set_thread_nice(tids[1], 14).unwrap();
    assert_eq!(vm.boost_vcpus(0, Duration::from_millis(100)), 2);
    assert_eq!(nices(), [0, 0]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while nices() != [12, 14] {
        assert!(
            std::time::Instant::now() < deadline,
            "the boost did not end: {:?}",
            nices()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vm.status(), VmStatus::Running);
    vm.destroy().unwrap();
}
