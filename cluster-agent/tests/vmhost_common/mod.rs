//! Helpers shared by the `vmhost_*` integration tests: two `VmHost`s in this process
//! over one temp dir as the shared volume, an in-process lock table, and console /
//! heartbeat helpers.
#![allow(dead_code)]

use std::sync::Arc;

use vmm_node::migration::target::ReceiveOptions;
use vmm_node::migration::tls::{AllowAll, Transport};

use cluster_agent::vmhost::{DiskSpec, LocalLocks, TestWorkload, VmHost, VmSpec, WorkloadName};
use csv_volume::{DiskName, LockCommand, LockGrant, LockMode, NodeId, VolumeRegistry};
use vmm_node::guest_protocol::{heartbeats, Heartbeat};

pub const NODE_A: NodeId = 1;
pub const NODE_B: NodeId = 2;
pub const VOLUME: &str = "vol";
pub use cluster_tests::WAIT;
/// The guest's disk workload writes, flushes and verifies its first 64 KiB.
pub const WORKLOAD_BYTES: usize = 64 << 10;

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

pub struct TwoHosts {
    pub dir: tempfile::TempDir,
    pub locks: Arc<LocalLocks>,
    pub a: Arc<VmHost>,
    pub b: Arc<VmHost>,
}

fn registry(root: &std::path::Path) -> VolumeRegistry {
    let mut r = VolumeRegistry::new();
    r.register(VOLUME, root).expect("register volume");
    r
}

impl TwoHosts {
    pub fn new() -> TwoHosts {
        require_kvm();
        let dir = tempfile::tempdir().unwrap();
        let h = TwoHosts {
            locks: Arc::new(LocalLocks::new()),
            a: VmHost::new(NODE_A, registry(dir.path())),
            b: VmHost::new(NODE_B, registry(dir.path())),
            dir,
        };
        // These in-process hosts share one machine: plaintext, chosen explicitly (the
        // agents' TLS and tickets are covered by the cluster tests).
        h.a.set_migration_transport(Transport::Plaintext);
        h.b.set_migration_transport(Transport::Plaintext);
        h
    }

    /// Creates a 1 MiB disk `vol/vms/<name>.img`.
    pub fn disk(&self, name: &str) -> DiskSpec {
        let n = DiskName::parse(&format!("{VOLUME}/vms/{name}.img")).unwrap();
        self.a.registry().create_disk(&n, 1 << 20).unwrap();
        DiskSpec {
            name: n,
            read_only: false,
        }
    }

    pub fn acquire(&self, disk: &DiskSpec, node: NodeId) -> LockGrant {
        self.locks
            .grant(LockCommand::Acquire {
                disk: disk.name.clone(),
                node,
                mode: LockMode::Exclusive,
            })
            .unwrap()
    }

    pub fn disk_bytes(&self, disk: &DiskSpec) -> Vec<u8> {
        std::fs::read(self.a.registry().disk_path(&disk.name).unwrap()).unwrap()
    }
}

pub fn disk_guest(name: &str, disks: Vec<DiskSpec>) -> VmSpec {
    let mut s = VmSpec::test_guest(name, 1, 64, TestWorkload::new(WorkloadName::Disk));
    s.disks = disks;
    s
}

pub fn disk_passes(h: &Heartbeat) -> u64 {
    h.fields
        .get("disk_passes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn console_text(host: &VmHost, name: &str) -> String {
    host.console(name).expect("console").recent
}

/// Waits until `pred` holds for the heartbeats on `name`'s console on `host`.
pub fn wait_hb(host: &VmHost, name: &str, pred: impl Fn(&[Heartbeat]) -> bool) -> Vec<Heartbeat> {
    cluster_tests::Wait::new(WAIT)
        .until_blocking(
            &format!("heartbeats of {name}"),
            || Ok::<_, String>(heartbeats(&console_text(host, name))),
            |hb| pred(hb),
        )
        .unwrap_or_else(|e| panic!("{e}; console:\n{}", console_text(host, name)))
}

pub fn last(hb: &[Heartbeat]) -> &Heartbeat {
    hb.last().expect("at least one heartbeat")
}

/// Drops the repeat a console subscription can produce at its seam, then checks that
/// sequence numbers go up by exactly one.
pub fn assert_continuous(hb: &[Heartbeat]) {
    let mut v: Vec<&Heartbeat> = Vec::new();
    for h in hb {
        if v.last()
            .is_some_and(|p| p.seq == h.seq && p.tsc_us == h.tsc_us)
        {
            continue;
        }
        v.push(h);
    }
    for w in v.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq + 1,
            "heartbeat sequence gap/repeat: {w:?}"
        );
        assert!(w[1].tsc_us > w[0].tsc_us, "guest time not monotonic: {w:?}");
    }
}

/// Target options for [`TwoHosts`]: plaintext, every session allowed.
pub fn plain() -> ReceiveOptions {
    ReceiveOptions::new(Transport::Plaintext, Arc::new(AllowAll))
}
