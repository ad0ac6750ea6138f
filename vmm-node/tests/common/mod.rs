//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use vmm_node::guest_protocol::{heartbeats, Heartbeat, Workload};
use vmm_node::{Vm, VmConfig};

#[path = "../../src/migration/test_pki.rs"]
pub mod test_pki;

/// Loopback addresses the tests' node certificate is valid for.
pub fn test_node_ips() -> Vec<std::net::IpAddr> {
    let mut v: Vec<std::net::IpAddr> = vec![[127, 0, 0, 1].into()];
    v.extend((1..=8).map(|i| std::net::IpAddr::from([127, 0, 2, i])));
    v
}

/// The `vmm-node` flags for mutual TLS with a throwaway CA whose files live in `dir`
/// (created on the first call for `dir`, reused after: every process of a test trusts the
/// same CA). One node certificate, valid for [`test_node_ips`], serves every process.
pub fn migration_tls_args(dir: &Path) -> Vec<String> {
    let (ca, cert, key) = (
        dir.join("migration-ca.pem"),
        dir.join("migration-node.pem"),
        dir.join("migration-node-key.pem"),
    );
    if !ca.exists() {
        let authority = test_pki::TestCa::new("vmm-node tests CA");
        let node = authority.node("test-node", &test_node_ips());
        std::fs::write(&cert, &node.cert_pem).unwrap();
        std::fs::write(&key, &node.key_pem).unwrap();
        std::fs::write(&ca, authority.ca_pem()).unwrap();
    }
    let s = |p: std::path::PathBuf| p.to_str().unwrap().to_owned();
    vec![
        "--tls-ca".into(),
        s(ca),
        "--tls-cert".into(),
        s(cert),
        "--tls-key".into(),
        s(key),
    ]
}

/// The TLS configuration of [`migration_tls_args`]`(dir)` in-process (to talk to the
/// processes as a member of the same cluster).
pub fn migration_tls(dir: &Path) -> vmm_node::migration::tls::MigrationTls {
    let a = migration_tls_args(dir);
    let read = |i: usize| std::fs::read(&a[i]).unwrap();
    vmm_node::migration::tls::MigrationTls::from_pem(&read(1), &read(3), &read(5)).unwrap()
}

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
