//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use vmm_node::guest_protocol::{heartbeats, Heartbeat, Workload};
use vmm_node::{Vm, VmConfig};

/// Fail loudly when KVM is missing (never skip).
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm cannot be opened ({e}): these tests need KVM");
    }
}

/// Config for the test guest with `workload`.
pub fn test_guest_config(vcpus: u8, memory_mib: u64, workload: &Workload) -> VmConfig {
    let mut c = VmConfig::new(vcpus, memory_mib, vmm_node::test_guest::PATH);
    c.cmdline = workload.cmdline();
    c
}

/// Create and start the test guest.
pub fn start_test_guest(vcpus: u8, memory_mib: u64, workload: &Workload) -> Vm {
    require_kvm();
    let vm = Vm::create(test_guest_config(vcpus, memory_mib, workload)).expect("create VM");
    vm.start().expect("start VM");
    vm
}

/// Wait until `pred` holds for the heartbeats in `console_text()`; panics with the console
/// on timeout.
pub fn wait_heartbeats(
    console_text: impl Fn() -> String,
    timeout: Duration,
    pred: impl Fn(&[Heartbeat]) -> bool,
) -> Vec<Heartbeat> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console_text();
        let hb = heartbeats(&text);
        if pred(&hb) {
            return hb;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for heartbeats; console:\n{text}");
        }
        // Paces the poll (the loop waits for state, with a deadline).
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sequence numbers strictly consecutive and TSC time monotonic.
pub fn assert_continuous(hb: &[Heartbeat]) {
    for w in hb.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "heartbeat sequence gap/repeat: {w:?}"
        );
        assert!(
            w[1].tsc_us > w[0].tsc_us,
            "guest TSC time not monotonic: {w:?}"
        );
    }
}
