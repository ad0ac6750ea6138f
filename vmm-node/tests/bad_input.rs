//! Bad input is rejected with clear errors or contained; the VMM never crashes or hangs.

mod common;

use std::time::Duration;

use common::*;
use vmm_node::devices::serial::CONSOLE_LOG_BYTES_MAX;
use vmm_node::guest_protocol::{Workload, WorkloadKind};
use vmm_node::snapshot::{self, SnapshotError};
use vmm_node::{Vm, VmConfig, VmError, VmStatus};

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

#[test]
fn guest_touching_ports_and_mmio_without_devices_is_contained() {
    let vm = start_test_guest(1, 16, &Workload::new(WorkloadKind::BadIo));
    let hb = wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| {
            h.len() >= 3
                && h.last()
                    .unwrap()
                    .fields
                    .get("badio_rounds")
                    .unwrap_or_else(|| panic!("no badio_rounds in {h:?}"))
                    .parse::<u64>()
                    .unwrap()
                    > 100
        },
    );
    let last = hb.last().unwrap();
    assert_eq!(
        last.fields["badio_wrong"], "0",
        "reads without device must return all ones"
    );
    assert_eq!(vm.status(), VmStatus::Running);
    vm.destroy().unwrap();
}

#[test]
fn console_flood_is_bounded_and_the_vm_stays_controllable() {
    let vm = start_test_guest(1, 16, &Workload::new(WorkloadKind::Flood));
    let rx = vm.console().subscribe();
    // Never read from `rx`: a stuck reader must not block the guest.
    // Every byte is a port I/O exit (~30 us on the software KVM), so ~30 KB/s on an idle
    // machine; wait for the volume rather than a fixed time (CI machines are loaded).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while vm.console().total_bytes() <= 30_000 {
        assert!(std::time::Instant::now() < deadline, "guest did not flood");
        assert!(vm.console().log().len() <= CONSOLE_LOG_BYTES_MAX);
        // Paces the poll (the loop waits for state, with a deadline).
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(vm.console().log().len() <= CONSOLE_LOG_BYTES_MAX);
    vm.pause().unwrap();
    vm.resume().unwrap();
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| h.len() >= 2,
    );
    assert_eq!(vm.status(), VmStatus::Running);
    drop(rx);
    vm.destroy().unwrap();
}

#[test]
fn guest_triple_fault_exit_port_and_i8042_reset_stop_the_vm_cleanly() {
    use vmm_node::StopReason;
    let vm = start_test_guest(2, 16, &Workload::new(WorkloadKind::Crash));
    let reason = vm
        .wait_stopped(Duration::from_secs(20))
        .expect("VM did not stop");
    assert_eq!(reason, StopReason::GuestReset);
    assert!(vm.console().text().contains("BOOT "));
    assert!(vm.resume().is_err());
    vm.destroy().unwrap();

    let w = Workload {
        seed: 7,
        ..Workload::new(WorkloadKind::Exit)
    };
    let vm = start_test_guest(1, 16, &w);
    let reason = vm
        .wait_stopped(Duration::from_secs(20))
        .expect("VM did not stop");
    assert_eq!(reason, StopReason::GuestExit { code: 7 });
    vm.destroy().unwrap();

    let vm = start_test_guest(1, 16, &Workload::new(WorkloadKind::Reset));
    let reason = vm
        .wait_stopped(Duration::from_secs(20))
        .expect("VM did not stop");
    assert_eq!(reason, StopReason::GuestReset);
    vm.destroy().unwrap();
}

#[test]
fn missing_and_garbage_kernels_give_clear_errors() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-kernel");
    let e = Vm::create(VmConfig::new(1, 16, &missing)).err().unwrap();
    let msg = chain(&e);
    assert!(
        msg.contains("no-such-kernel") && msg.contains("No such file"),
        "{msg}"
    );
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, vec![0xa5u8; 100_000]).unwrap();
    let e = Vm::create(VmConfig::new(1, 16, &garbage)).err().unwrap();
    assert!(chain(&e).contains("not a kernel image"), "{}", chain(&e));
    // An ELF that is cut short.
    let trunc = dir.path().join("trunc.elf");
    let guest = std::fs::read(vmm_node::test_guest::PATH).unwrap();
    std::fs::write(&trunc, &guest[..100]).unwrap();
    let e = Vm::create(VmConfig::new(1, 16, &trunc)).err().unwrap();
    assert!(matches!(e, VmError::Boot(_)), "{}", chain(&e));
}

#[test]
fn invalid_configs_are_rejected() {
    require_kvm();
    let e = Vm::create(VmConfig::new(0, 16, vmm_node::test_guest::PATH))
        .err()
        .unwrap();
    assert!(
        chain(&e).contains("vcpus must be between 1 and 32"),
        "{}",
        chain(&e)
    );
    let e = Vm::create(VmConfig::new(1, 1 << 40, vmm_node::test_guest::PATH))
        .err()
        .unwrap();
    assert!(chain(&e).contains("memory_mib"), "{}", chain(&e));
}

fn saved_snapshot() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let vm = start_test_guest(1, 16, &Workload::new(WorkloadKind::Idle));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    vm.pause().unwrap();
    snapshot::save(&vm, dir.path()).unwrap();
    vm.destroy().unwrap();
    dir
}

#[test]
fn bad_snapshots_are_rejected() {
    let dir = saved_snapshot();
    let state = dir.path().join(snapshot::STATE_FILE);
    let good = std::fs::read(&state).unwrap();

    // Newer format version.
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(snapshot::FORMAT_VERSION + 1).to_le_bytes());
    std::fs::write(&state, &newer).unwrap();
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(
        matches!(e, SnapshotError::NewerVersion { .. }),
        "{}",
        chain(&e)
    );

    // Truncated state file.
    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(
        matches!(e, SnapshotError::Truncated { .. }),
        "{}",
        chain(&e)
    );

    // Truncated memory file.
    std::fs::write(&state, &good).unwrap();
    let mem = dir.path().join(snapshot::MEMORY_FILE);
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(4096).unwrap();
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(chain(&e).contains("expected 16777216"), "{}", chain(&e));

    // Missing memory file.
    std::fs::remove_file(&mem).unwrap();
    let e = snapshot::restore(dir.path()).err().unwrap();
    assert!(chain(&e).contains("memory.bin"), "{}", chain(&e));
}
