//! Benchmark of the agent-local VM runtime (`cluster_agent::vmhost`), printed as figures.
//!
//! Live-migration blackout of the same guest (1 vCPU, 64 MiB, test guest) measured in
//! the same run, alternating:
//! 1. baseline: vmm-node's engine alone (`LocalSource` → `serve(LocalFactory, NoHandoff)`),
//!    no disk;
//! 2. through `VmHost::migrate_out` → `MigrationListener`, no disk;
//! 3. through `VmHost` with one disk: slot save/restore, flush + close, `Handoff` applied
//!    to a lock table, fence record + reopen on the target.
//!
//! Then quick migration through `VmHost` (save to the shared volume → handoff → restore)
//! with one disk: downtime from pause to resumed on the target.
//!
//! ```text
//! cargo run --release -p cluster-agent --features test-hooks --bin vmhost-bench [-- ROUNDS]
//! ```

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_agent::vmhost::{
    DiskLocks, DiskSpec, IncomingEvent, LiveOptions, LocalLocks, TestWorkload, VmHost, VmSpec,
    WorkloadName,
};
use csv_volume::{DiskName, LockCommand, LockMode, VolumeRegistry};
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};
use vmm_node::migration::adapter::{LocalFactory, LocalSource};
use vmm_node::migration::seam::NoHandoff;
use vmm_node::migration::source::{migrate, CancelToken, MigrateOptions};
use vmm_node::migration::target::{serve, ReceiveOptions};
use vmm_node::migration::tls::{AllowAll, Transport};
use vmm_node::{Vm, VmConfig};

const WAIT: Duration = Duration::from_secs(60);

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), v[0], v[v.len() - 1])
}

fn opts() -> LiveOptions {
    LiveOptions {
        max_downtime_ms: 300,
        deadline_ms: 60_000,
        connections: 2,
        bandwidth_bytes_per_s_max: 0,
        source_ip: None,
        ticket: 0,
    }
}

fn wait_hb(text: impl Fn() -> String, n: usize) {
    let deadline = Instant::now() + WAIT;
    while heartbeats(&text()).len() < n {
        assert!(Instant::now() < deadline, "guest heartbeats missing");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// vmm-node alone: blackout in µs.
fn engine_alone() -> f64 {
    let listener = TcpListener::bind("127.0.2.10:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let target = std::thread::spawn(move || {
        let factory = LocalFactory::default();
        let r = serve(
            &listener,
            &factory,
            &NoHandoff,
            &ReceiveOptions::new(Transport::Plaintext, Arc::new(AllowAll)),
        )
        .expect("receive");
        drop(r);
    });
    let mut c = VmConfig::new(1, 64, vmm_node::test_guest::PATH);
    c.cmdline = Workload::new(WorkloadKind::Idle).cmdline();
    let vm = Arc::new(Vm::create(c).expect("create"));
    vm.start().unwrap();
    wait_hb(|| vm.console().text(), 2);
    let o = opts();
    let mo = MigrateOptions {
        connections: o.connections,
        convergence: vmm_node::migration::convergence::ConvergenceConfig {
            max_downtime: Duration::from_millis(o.max_downtime_ms),
            deadline: Duration::from_millis(o.deadline_ms),
            throttle: true,
        },
        ..MigrateOptions::new(Transport::Plaintext)
    };
    let st = migrate(
        &LocalSource::new(vm.clone()),
        addr,
        &mo,
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
    .expect("migrate");
    vm.stop().unwrap();
    target.join().unwrap();
    st.blackout.total_us as f64
}

/// A scratch directory removed on drop (the binary has no dev-dependencies).
struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vmhost-bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("scratch dir");
        ScratchDir(p)
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Pair {
    _dir: ScratchDir,
    locks: Arc<LocalLocks>,
    a: Arc<VmHost>,
    b: Arc<VmHost>,
}

fn pair() -> Pair {
    let dir = ScratchDir::new();
    let reg = || {
        let mut r = VolumeRegistry::new();
        r.register("vol", dir.path()).unwrap();
        r
    };
    let p = Pair {
        locks: Arc::new(LocalLocks::new()),
        a: VmHost::new(1, reg()),
        b: VmHost::new(2, reg()),
        _dir: dir,
    };
    // One machine, plaintext chosen explicitly (the agents carry migrations over TLS).
    p.a.set_migration_transport(Transport::Plaintext);
    p.b.set_migration_transport(Transport::Plaintext);
    p
}

fn spec(p: &Pair, name: &str, with_disk: bool) -> (VmSpec, Vec<csv_volume::LockGrant>) {
    let kind = if with_disk {
        WorkloadName::Disk
    } else {
        WorkloadName::Idle
    };
    let mut s = VmSpec::test_guest(name, 1, 64, TestWorkload::new(kind));
    let mut grants = Vec::new();
    if with_disk {
        let n = DiskName::parse(&format!("vol/{name}.img")).unwrap();
        p.a.registry().create_disk(&n, 1 << 20).unwrap();
        grants.push(
            p.locks
                .grant(LockCommand::Acquire {
                    disk: n.clone(),
                    node: 1,
                    mode: LockMode::Exclusive,
                })
                .unwrap(),
        );
        s.disks.push(DiskSpec {
            name: n,
            read_only: false,
        });
    }
    (s, grants)
}

/// Through VmHost: (blackout µs, handoff µs).
fn through_vmhost(with_disk: bool, round: usize) -> (f64, f64) {
    let p = pair();
    let listener =
        p.b.listen_migrations(
            "127.0.2.11:0".parse::<SocketAddr>().unwrap(),
            p.locks.clone(),
            ReceiveOptions::new(Transport::Plaintext, Arc::new(AllowAll)),
        )
        .expect("listen");
    let name = format!("bench{round}");
    let (s, grants) = spec(&p, &name, with_disk);
    p.a.start(s, &grants).expect("start");
    wait_hb(|| p.a.console(&name).unwrap().recent, 2);
    let report =
        p.a.migrate_out(&name, 2, listener.local_addr(), opts(), p.locks.clone())
            .expect("migrate")
            .wait()
            .expect("migration");
    assert!(report.receipt_matches());
    match listener.events.recv_timeout(WAIT) {
        Ok(IncomingEvent::Arrived { .. }) => {}
        other => panic!("{other:?}"),
    }
    let stopped = p.b.stop(&name).unwrap();
    p.locks.commit(&name, &stopped.release).unwrap();
    (
        report.stats.blackout.total_us as f64,
        report.stats.blackout.handoff_us as f64,
    )
}

/// Quick migration through VmHost with one disk: downtime µs (pause → resumed on B).
fn quick(round: usize) -> f64 {
    let p = pair();
    let name = format!("quick{round}");
    let (s, grants) = spec(&p, &name, true);
    let disks = s.disks.clone();
    p.a.start(s, &grants).expect("start");
    wait_hb(|| p.a.console(&name).unwrap().recent, 2);
    let t = Instant::now();
    let image = p.a.quick_save(&name, "vol", 2).expect("save");
    p.locks.commit(&name, &image.release).unwrap();
    let g = p.locks.acquire(&name, 2, &disks).unwrap();
    p.b.quick_restore(&image.dir, &g).expect("restore");
    let us = t.elapsed().as_secs_f64() * 1e6;
    p.b.stop(&name).unwrap();
    us
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let (mut base, mut host, mut host_disk, mut handoff) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        base.push(engine_alone());
        host.push(through_vmhost(false, r).0);
        let (b, h) = through_vmhost(true, r);
        host_disk.push(b);
        handoff.push(h);
    }
    println!(
        "## live migration blackout, 1 vCPU 64 MiB test guest, {rounds} alternating rounds (µs)"
    );
    println!("| path | median | min | max |");
    println!("|---|---|---|---|");
    for (label, v) in [
        ("vmm-node engine alone (baseline), no disk", base.clone()),
        ("VmHost, no disk", host),
        ("VmHost, 1 disk with lock handoff", host_disk),
        ("  of which storage handoff", handoff),
    ] {
        let (m, lo, hi) = stats(v);
        println!("| {label} | {m:.0} | {lo:.0} | {hi:.0} |");
    }
    let q: Vec<f64> = (0..rounds).map(quick).collect();
    let (m, lo, hi) = stats(q);
    println!();
    println!("## quick migration through VmHost, 1 disk, 64 MiB (pause → resumed on target, µs)");
    println!("| median | min | max |");
    println!("|---|---|---|");
    println!("| {m:.0} | {lo:.0} | {hi:.0} |");
    let (bm, _, _) = stats(base);
    println!();
    println!("baseline median blackout: {bm:.0} µs");
}
