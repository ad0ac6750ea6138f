//! Snapshot a VM run by the `vmm-node` binary and restore it in a new process.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use vmm_node::control::request;
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_vmm-node"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vmm-node"),
    )
}

fn wait_socket(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(p, &json!({"cmd": "status"})).is_err() {
        assert!(
            Instant::now() < deadline,
            "control socket {} never came up",
            p.display()
        );
        // Paces the poll (the loop waits for state, with a deadline).
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn console(p: &Path) -> String {
    let v = request(p, &json!({"cmd": "console", "tail_bytes": 1 << 20}))
        .unwrap_or_else(|e| panic!("console request to {}: {e:?}", p.display()));
    assert_eq!(v["ok"], true, "{v}");
    v["text"].as_str().unwrap().to_string()
}

fn cmd(p: &Path, v: Value) -> Value {
    let r = request(p, &v).unwrap();
    assert_eq!(r["ok"], true, "{v} -> {r}");
    r
}

fn wait_exit(mut p: Proc) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "vmm-node did not exit");
        // Paces the poll (the loop waits for state, with a deadline).
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn snapshot_then_restore_in_a_new_process_continues_the_guest() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let w = Workload {
        wss_mib: 24,
        ..Workload::new(WorkloadKind::Mem)
    };
    let cfg = test_guest_config(2, 64, &w);
    let cfg_path = dir.path().join("vm.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg).unwrap()).unwrap();
    let sock1: PathBuf = dir.path().join("a.sock");
    let p1 = spawn(&[
        "run",
        "--config",
        cfg_path.to_str().unwrap(),
        "--control",
        sock1.to_str().unwrap(),
    ]);
    wait_socket(&sock1);
    wait_heartbeats(
        || console(&sock1),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| h.mem == "ok" && h.mem_passes >= 2),
    );
    let snap = dir.path().join("snap");
    let r = cmd(&sock1, json!({"cmd": "snapshot", "dir": snap}));
    assert_eq!(r["memory_bytes"], 64u64 << 20);
    let before = heartbeats(&console(&sock1));
    assert_eq!(
        cmd(&sock1, json!({"cmd": "status"}))["status"]["state"],
        "paused"
    );
    cmd(&sock1, json!({"cmd": "stop"}));
    assert!(wait_exit(p1).success());

    // The time the VM spends saved: what the guest clock must show below (a stimulus,
    // not a wait).
    let gap = Duration::from_millis(700);
    std::thread::sleep(gap);
    let sock2 = dir.path().join("b.sock");
    let _p2 = spawn(&[
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--control",
        sock2.to_str().unwrap(),
    ]);
    wait_socket(&sock2);
    let after = wait_heartbeats(
        || console(&sock2),
        Duration::from_secs(30),
        |h| h.len() >= 5,
    );
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    // No gap, no repeat, monotonic guest time.
    assert_continuous(&all);
    // Guest time advanced by (at least) the real time the VM spent saved.
    let jump_us = after[0].tsc_us - before.last().unwrap().tsc_us;
    assert!(
        jump_us >= gap.as_micros() as u64,
        "guest time advanced {jump_us} us across a {gap:?} gap"
    );
    let last = after.last().unwrap();
    assert_eq!(last.mem, "ok", "{last:?}");
    assert_eq!(last.mem_errors, 0);
    assert_eq!(last.cpus, 2);
    cmd(&sock2, json!({"cmd": "stop"}));
}

#[test]
fn corrupted_snapshot_is_rejected_by_a_new_process_with_a_clear_error() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let vm = start_test_guest(1, 16, &Workload::new(WorkloadKind::Idle));
    wait_heartbeats(
        || vm.console().text(),
        Duration::from_secs(20),
        |h| !h.is_empty(),
    );
    vm.pause().unwrap();
    vmm_node::snapshot::save(&vm, dir.path()).unwrap();
    vm.destroy().unwrap();
    let state = dir.path().join("state.bin");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&state, &bytes).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-node"))
        .args(["restore", "--snapshot", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("corrupted") && err.contains("CRC32"),
        "stderr: {err}"
    );
}
