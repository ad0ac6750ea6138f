//! Migration engine tests over loopback TCP with a simulated VM: guest memory is a real
//! [`GuestMem`] written by a workload thread; dirty tracking is vm-memory's write bitmap
//! (the same bitmap the real VM ORs into KVM's dirty log for device writes). These test
//! the engine (protocol, transport, convergence, rollback); the real-VM tests are in
//! `tests/migration_*.rs`.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::convergence::ConvergenceConfig;
use super::protocol::{self, Command};
use super::seam::*;
use super::source::{migrate, CancelToken, MigrateOptions, MigrationEvent};
use super::target::{receive_one, serve, FailAction, Failpoint, ReceiveOptions};
use super::test_pki::TestCa;
use super::tls::{AllowAll, MigrationTls, Transport};
use super::transport::{DirtyPages, PageHashes, PageMap};
use super::MigrationError;
use crate::GuestMem;

#[path = "security_tests.rs"]
mod security_tests;

fn new_mem(bytes: usize) -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), bytes)]).unwrap()
}

struct Shared {
    mem: GuestMem,
    gate: Mutex<bool>, // paused
    throttle: AtomicU8,
    dirty_log: AtomicBool,
    disks_attached: AtomicBool,
    seq: AtomicU64,
    stop: AtomicBool,
    span_pages: AtomicUsize,
    /// The engine's vCPU boost calls, each with whether the guest was paused then.
    boosts: Mutex<Vec<(&'static str, bool)>>,
}

struct SimVm {
    s: Arc<Shared>,
    worker: Option<std::thread::JoinHandle<()>>,
    vendor: String,
}

impl SimVm {
    /// `span_pages` pages rewritten in a loop (0 = idle guest), `rate_pages_per_ms` limit.
    fn start(bytes: usize, span_pages: usize) -> SimVm {
        Self::start_on(new_mem(bytes), span_pages)
    }

    /// [`SimVm::start`] on the guest memory `mem`.
    fn start_on(mem: GuestMem, span_pages: usize) -> SimVm {
        let bytes = PageMap::from_memory(&mem).total_bytes() as usize;
        let s = Arc::new(Shared {
            mem,
            gate: Mutex::new(false),
            throttle: AtomicU8::new(0),
            dirty_log: AtomicBool::new(false),
            disks_attached: AtomicBool::new(true),
            seq: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            span_pages: AtomicUsize::new(span_pages),
            boosts: Mutex::new(Vec::new()),
        });
        // Some static content: every 4th page of the first half.
        for i in (0..bytes / 8192).step_by(4) {
            s.mem
                .write_obj(0xABCD_0000_0000 | i as u64, GuestAddress(i as u64 * 4096))
                .unwrap();
        }
        let w = s.clone();
        let worker = std::thread::spawn(move || {
            let mut i = 0usize;
            while !w.stop.load(Ordering::Relaxed) {
                let span = w.span_pages.load(Ordering::Relaxed);
                {
                    let paused = w.gate.lock().unwrap();
                    if !*paused && span > 0 {
                        for _ in 0..64 {
                            let seq = w.seq.fetch_add(1, Ordering::Relaxed) + 1;
                            let page = (bytes / 2 / 4096) + (i % span);
                            w.mem
                                .write_obj(seq, GuestAddress(page as u64 * 4096 + 64))
                                .unwrap();
                            i += 1;
                        }
                    }
                }
                let t = w.throttle.load(Ordering::Relaxed);
                if span == 0 || t > 0 {
                    std::thread::sleep(Duration::from_micros(50 + 100 * u64::from(t)));
                }
            }
        });
        SimVm {
            s,
            worker: Some(worker),
            vendor: "SimVendor".into(),
        }
    }

    fn paused(&self) -> bool {
        *self.s.gate.lock().unwrap()
    }
}

impl Drop for SimVm {
    fn drop(&mut self) {
        self.s.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl SourceVm for SimVm {
    fn memory(&self) -> &GuestMem {
        &self.s.mem
    }
    fn config_blob(&self) -> Result<Vec<u8>, OpError> {
        Ok(bincode::serialize(
            &(self
                .s
                .mem
                .iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>()),
        )?)
    }
    fn requirements(&self) -> Requirements {
        Requirements {
            vm_name: "sim".into(),
            cpu_vendor: self.vendor.clone(),
            cpu_features: vec!["sse2".into()],
            memory_bytes: PageMap::from_memory(&self.s.mem).total_bytes(),
            vcpus: 1,
            disks: vec!["disk0".into()],
        }
    }
    fn start_dirty_log(&self) -> Result<(), OpError> {
        for r in self.s.mem.iter() {
            r.bitmap().reset();
        }
        self.s.dirty_log.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn dirty_pages(&self, map: &PageMap) -> Result<DirtyPages, OpError> {
        let mut d = DirtyPages::empty(map.total_pages());
        for (r, &(_, pages, first)) in self.s.mem.iter().zip(map.regions()) {
            d.merge_region_bitmap(first, pages, &r.bitmap().get_and_reset());
        }
        Ok(d)
    }
    fn stop_dirty_log(&self) -> Result<(), OpError> {
        self.s.dirty_log.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn pause(&self) -> Result<(), OpError> {
        *self.s.gate.lock().unwrap() = true;
        Ok(())
    }
    fn resume(&self) -> Result<(), OpError> {
        *self.s.gate.lock().unwrap() = false;
        Ok(())
    }
    fn set_throttle(&self, percent: u8) {
        self.s.throttle.store(percent, Ordering::SeqCst);
    }
    fn save_state(&self) -> Result<Vec<u8>, OpError> {
        Ok(bincode::serialize(&self.s.seq.load(Ordering::SeqCst))?)
    }
    fn detach_disks(&self) -> Result<(), OpError> {
        self.s.disks_attached.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn reattach_disks(&self) -> Result<(), OpError> {
        self.s.disks_attached.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn boost_vcpus(&self, _nice: i32, _for_at_most: Duration) {
        let paused = *self.s.gate.lock().unwrap();
        self.s.boosts.lock().unwrap().push(("boost", paused));
    }
    fn end_vcpu_boost(&self) {
        let paused = *self.s.gate.lock().unwrap();
        self.s.boosts.lock().unwrap().push(("end", paused));
    }
}

struct SimTarget {
    mem: GuestMem,
    seq: Mutex<Option<u64>>,
    running: AtomicBool,
    /// The engine's calls, in order: `announce`, `restore`, `resume`, `boost`.
    steps: Mutex<Vec<&'static str>>,
}

impl TargetVm for SimTarget {
    fn memory(&self) -> &GuestMem {
        &self.mem
    }
    fn restore(&self, state: &[u8]) -> Result<(), OpError> {
        self.steps.lock().unwrap().push("restore");
        *self.seq.lock().unwrap() = Some(bincode::deserialize(state)?);
        Ok(())
    }
    fn resume(&self) -> Result<(), OpError> {
        self.steps.lock().unwrap().push("resume");
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn announce_nics(&self) {
        self.steps.lock().unwrap().push("announce");
    }
    fn boost_vcpus(&self, _nice: i32, for_at_most: Duration) {
        assert_eq!(for_at_most, super::target::VCPU_BOOST_AFTER_RESUME);
        self.steps.lock().unwrap().push("boost");
    }
}

struct SimFactory {
    created: Mutex<Vec<Arc<SimTarget>>>,
}

struct TargetHandle(Arc<SimTarget>);
impl TargetVm for TargetHandle {
    fn memory(&self) -> &GuestMem {
        &self.0.mem
    }
    fn restore(&self, state: &[u8]) -> Result<(), OpError> {
        self.0.restore(state)
    }
    fn resume(&self) -> Result<(), OpError> {
        self.0.resume()
    }
    fn announce_nics(&self) {
        self.0.announce_nics()
    }
    fn boost_vcpus(&self, nice: i32, for_at_most: Duration) {
        self.0.boost_vcpus(nice, for_at_most)
    }
}

impl TargetFactory for SimFactory {
    fn facts(&self) -> NodeFacts {
        NodeFacts {
            cpu_vendor: "SimVendor".into(),
            cpu_features: vec!["sse2".into(), "avx".into()],
            memory_available_bytes: 1 << 30,
        }
    }
    fn create_paused(&self, config: &[u8]) -> Result<Box<dyn TargetVm>, OpError> {
        let bytes: u64 = bincode::deserialize(config)?;
        let t = Arc::new(SimTarget {
            mem: new_mem(bytes as usize),
            seq: Mutex::new(None),
            running: AtomicBool::new(false),
            steps: Mutex::new(Vec::new()),
        });
        self.created.lock().unwrap().push(t.clone());
        Ok(Box::new(TargetHandle(t)))
    }
}

#[derive(Default)]
struct RecordingHandoff {
    log: Mutex<Vec<String>>,
}
impl StorageHandoff for RecordingHandoff {
    fn release(&self, vm: &str, d: &[String]) -> Result<(), OpError> {
        self.log.lock().unwrap().push(format!("release {vm} {d:?}"));
        Ok(())
    }
    fn reclaim(&self, vm: &str, d: &[String]) -> Result<(), OpError> {
        self.log.lock().unwrap().push(format!("reclaim {vm} {d:?}"));
        Ok(())
    }
    fn acquire(&self, vm: &str, d: &[String]) -> Result<(), OpError> {
        self.log.lock().unwrap().push(format!("acquire {vm} {d:?}"));
        Ok(())
    }
}

fn factory() -> SimFactory {
    SimFactory {
        created: Mutex::new(Vec::new()),
    }
}

fn listener() -> TcpListener {
    TcpListener::bind("127.0.2.1:0").unwrap()
}

/// The throwaway CA of the simulated cluster.
fn ca() -> &'static TestCa {
    static CA: std::sync::OnceLock<TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| TestCa::new("engine tests CA"))
}

/// `node`'s TLS configuration with the CA `ca`.
fn tls_of(ca: &TestCa, node: &super::test_pki::NodeCert) -> MigrationTls {
    MigrationTls::from_pem(
        ca.ca_pem().as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    )
    .unwrap()
}

/// The certificate of every simulated node (both ends present it), valid for the
/// listener address.
fn node_cert() -> &'static super::test_pki::NodeCert {
    static NODE: std::sync::OnceLock<super::test_pki::NodeCert> = std::sync::OnceLock::new();
    NODE.get_or_init(|| ca().node("sim-node", &["127.0.2.1".parse().unwrap()]))
}

/// The TLS configuration of every simulated node.
fn tls() -> Transport {
    static TLS: std::sync::OnceLock<MigrationTls> = std::sync::OnceLock::new();
    Transport::Tls(TLS.get_or_init(|| tls_of(ca(), node_cert())).clone())
}

fn opts(downtime_ms: u64, deadline_ms: u64) -> MigrateOptions {
    MigrateOptions {
        connections: 4,
        convergence: ConvergenceConfig {
            max_downtime: Duration::from_millis(downtime_ms),
            deadline: Duration::from_millis(deadline_ms),
            throttle: true,
        },
        ..MigrateOptions::new(tls())
    }
}

fn ropts() -> ReceiveOptions {
    ReceiveOptions {
        io_timeout: Duration::from_secs(10),
        ..ReceiveOptions::new(tls(), Arc::new(AllowAll))
    }
}

/// Source memory (paused) and target memory must be identical, and both receipts agree.
fn assert_same_memory(src: &GuestMem, dst: &GuestMem) {
    let map = PageMap::from_memory(src);
    let a = PageHashes::digest_of_memory(src, &map).unwrap();
    let b = PageHashes::digest_of_memory(dst, &map).unwrap();
    assert_eq!(a, b, "guest memory differs after migration");
}

type Outcome = (
    Result<super::stats::MigrationStats, MigrationError>,
    Result<super::target::Received, MigrationError>,
    Arc<SimFactory>,
    Arc<RecordingHandoff>,
);

/// The simulated guest keeps writing (polls up to 5 s: the machine may be busy).
fn assert_workload_runs(vm: &SimVm, what: &str) {
    let before = vm.s.seq.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while vm.s.seq.load(Ordering::SeqCst) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: workload stopped on the source"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_migration(
    vm: &SimVm,
    o: &MigrateOptions,
    ro: ReceiveOptions,
    cancel: &CancelToken,
    events: &mut Vec<MigrationEvent>,
) -> Outcome {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(factory());
    let th = Arc::new(RecordingHandoff::default());
    let (f2, th2) = (f.clone(), th.clone());
    let t = std::thread::spawn(move || receive_one(&l, f2.as_ref(), th2.as_ref(), &ro));
    let sh = RecordingHandoff::default();
    let r = migrate(vm, addr, o, &sh, cancel, &mut |e| events.push(e.clone()));
    th.log
        .lock()
        .unwrap()
        .extend(sh.log.lock().unwrap().drain(..));
    (r, t.join().unwrap(), f, th)
}

#[test]
fn idle_guest_moves_with_identical_memory_and_receipt() {
    let vm = SimVm::start(32 << 20, 0);
    let mut ev = Vec::new();
    let (r, t, f, h) = run_migration(
        &vm,
        &opts(50, 10_000),
        ropts(),
        &CancelToken::default(),
        &mut ev,
    );
    let stats = r.unwrap();
    let received = t.unwrap();
    assert!(vm.paused());
    assert!(stats.receipt_matches(), "{stats:?}");
    assert_eq!(received.stats.memory_digest, stats.source_digest);
    let target = f.created.lock().unwrap()[0].clone();
    assert!(target.running.load(Ordering::SeqCst));
    // The NICs are announced once the (paused) source's state arrived, before the restore
    // and the resume; the resumed vCPUs are boosted for a while.
    assert_eq!(
        *target.steps.lock().unwrap(),
        ["announce", "restore", "resume", "boost"]
    );
    // The source's vCPUs ran boosted from the start until the pause.
    assert_eq!(
        *vm.s.boosts.lock().unwrap(),
        [("boost", false), ("end", true)]
    );
    assert_same_memory(&vm.s.mem, &target.mem);
    assert!(stats.zero_pages_skipped > 0);
    assert!(stats.blackout.total_us > 0);
    assert!(stats.rounds.len() >= 2);
    let log = h.log.lock().unwrap().join("|");
    assert!(
        log.contains("release sim") && log.contains("acquire sim"),
        "{log}"
    );
    // A prediction was made before the first round finished.
    let first_pred = ev
        .iter()
        .position(|e| matches!(e, MigrationEvent::Prediction(p) if p.remaining.is_some()));
    let first_prog = ev
        .iter()
        .position(|e| matches!(e, MigrationEvent::Progress(_)));
    assert!(first_pred.unwrap() < first_prog.unwrap(), "{ev:?}");
    // Progress never went backwards and ended at 100 %.
    let prog: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            MigrationEvent::Progress(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert!(prog
        .windows(2)
        .all(|w| w[1].fraction_done >= w[0].fraction_done
            && w[1].bytes_remaining <= w[0].bytes_remaining));
    assert_eq!(prog.last().unwrap().fraction_done, 1.0);
}

/// The engine's record layer and rustls' (the fallback, and what a node without secret
/// extraction uses) each carry a migration of a dirtying guest, in every combination of
/// the two ends, with identical memory and matching receipts.
#[test]
fn both_record_layers_carry_a_migration_in_every_combination() {
    let Transport::Tls(direct) = tls() else {
        unreachable!()
    };
    let rustls_records = direct.with_rustls_records();
    for (source, target) in [
        (&rustls_records, &rustls_records),
        (&direct, &rustls_records),
        (&rustls_records, &direct),
    ] {
        let vm = SimVm::start(16 << 20, 256);
        let o = MigrateOptions {
            transport: Transport::Tls(source.clone()),
            ..opts(50, 20_000)
        };
        let ro = ReceiveOptions {
            transport: Transport::Tls(target.clone()),
            ..ropts()
        };
        let (r, t, f, _) = run_migration(&vm, &o, ro, &CancelToken::default(), &mut Vec::new());
        let stats = r.unwrap();
        t.unwrap();
        assert!(stats.receipt_matches(), "{stats:?}");
        assert!(stats.wire_bytes > 0);
        let dst = f.created.lock().unwrap()[0].clone();
        assert_same_memory(&vm.s.mem, &dst.mem);
    }
}

#[test]
fn dirtying_guest_converges_and_state_matches_memory() {
    let vm = SimVm::start(32 << 20, 512);
    std::thread::sleep(Duration::from_millis(20));
    let mut ev = Vec::new();
    let (r, t, f, _) = run_migration(
        &vm,
        &opts(20, 20_000),
        ropts(),
        &CancelToken::default(),
        &mut ev,
    );
    let stats = r.unwrap();
    t.unwrap();
    let target = f.created.lock().unwrap()[0].clone();
    assert_same_memory(&vm.s.mem, &target.mem);
    assert!(stats.receipt_matches());
    // The state (last sequence number) was captured after the last write: it is in memory.
    let seq = target.seq.lock().unwrap().unwrap();
    assert_eq!(seq, vm.s.seq.load(Ordering::SeqCst));
    assert!(seq > 0);
}

#[test]
fn cancel_during_precopy_leaves_vm_running_on_source() {
    let vm = SimVm::start(32 << 20, 4096);
    let cancel = CancelToken::default();
    let c2 = cancel.clone();
    let mut seen_precopy = false;
    let l = listener();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(factory());
    let f2 = f.clone();
    let t = std::thread::spawn(move || receive_one(&l, f2.as_ref(), &NoHandoff, &ropts()));
    // Downtime 1 ms and a busy guest: pre-copy goes on until cancelled.
    let r = migrate(&vm, addr, &opts(1, 60_000), &NoHandoff, &cancel, &mut |e| {
        if let MigrationEvent::Progress(p) = e {
            if p.round >= 1 && !seen_precopy {
                seen_precopy = true;
                c2.cancel();
            }
        }
    });
    assert!(matches!(r, Err(MigrationError::Cancelled(_))), "{r:?}");
    assert!(t.join().unwrap().is_err());
    assert!(!vm.paused());
    assert_eq!(vm.s.throttle.load(Ordering::SeqCst), 0);
    assert!(!vm.s.dirty_log.load(Ordering::SeqCst));
    assert!(vm.s.disks_attached.load(Ordering::SeqCst));
    assert_workload_runs(&vm, "after cancel");
}

/// A source that goes silent mid-pre-copy (its host lost power: no reset ever arrives)
/// is given up by the target as soon as its node says so, not after `io_timeout`.
#[test]
fn abandoned_target_gives_up_at_once_and_the_source_rolls_back() {
    let vm = SimVm::start(32 << 20, 4096);
    let l = listener();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(factory());
    let f2 = f.clone();
    let ro = ReceiveOptions {
        io_timeout: Duration::from_secs(600),
        ..ropts()
    };
    let abandon = ro.abandon.clone();
    let target = std::thread::spawn(move || receive_one(&l, f2.as_ref(), &NoHandoff, &ro));
    let (silent_tx, silent_rx) = std::sync::mpsc::channel::<()>();
    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
    let source = std::thread::spawn(move || {
        let mut silent = false;
        // Downtime 1 ms and a busy guest: pre-copy goes on; after round 1 the source
        // stops talking (its progress callback blocks) until the test wakes it.
        let r = migrate(
            &vm,
            addr,
            &opts(1, 600_000),
            &NoHandoff,
            &CancelToken::default(),
            &mut |e| {
                if let MigrationEvent::Progress(p) = e {
                    if p.round >= 1 && !silent {
                        silent = true;
                        let _ = silent_tx.send(());
                        let _ = wake_rx.recv();
                    }
                }
            },
        );
        (r, vm)
    });
    silent_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!target.is_finished(), "the target gave up on its own");
    abandon.set();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !target.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned target kept waiting for its silent source"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = target.join().unwrap();
    assert!(
        matches!(&r, Err(MigrationError::Cancelled(Some(why))) if why.contains("abandoned")),
        "{:?}",
        r.err()
    );
    assert!(f
        .created
        .lock()
        .unwrap()
        .iter()
        .all(|v| !v.running.load(Ordering::SeqCst)));
    wake_tx.send(()).unwrap();
    let (r, vm) = source.join().unwrap();
    assert!(r.is_err(), "{r:?}");
    assert!(!vm.paused());
    assert_workload_runs(&vm, "after the target gave up");
}

#[test]
fn target_failure_at_each_phase_rolls_back_to_source() {
    for fp in [
        Failpoint::Setup,
        Failpoint::Precopy,
        Failpoint::StopCopy,
        Failpoint::BeforeResume,
    ] {
        let vm = SimVm::start(16 << 20, 64);
        let mut ro = ropts();
        ro.failpoint = Some((fp, FailAction::Error));
        let mut ev = Vec::new();
        let (r, t, _, h) =
            run_migration(&vm, &opts(50, 10_000), ro, &CancelToken::default(), &mut ev);
        assert!(r.is_err(), "{fp:?}: source must fail");
        assert!(matches!(t, Err(MigrationError::Failpoint(p)) if p == fp));
        assert!(!vm.paused(), "{fp:?}: VM must run on the source");
        assert!(
            vm.s.disks_attached.load(Ordering::SeqCst),
            "{fp:?}: disks re-attached"
        );
        assert!(!vm.s.dirty_log.load(Ordering::SeqCst));
        // The boost ended however the migration did (at the pause, or on the way out).
        let boosts = vm.s.boosts.lock().unwrap().clone();
        assert_eq!(boosts.len(), 2, "{fp:?}: {boosts:?}");
        assert_eq!(boosts[0], ("boost", false), "{fp:?}");
        assert_eq!(boosts[1].0, "end", "{fp:?}");
        let log = h.log.lock().unwrap().join("|");
        if fp == Failpoint::BeforeResume {
            assert!(log.contains("reclaim sim"), "{fp:?}: {log}");
        }
        assert_workload_runs(&vm, &format!("{fp:?}"));
    }
}

#[test]
fn refusals_name_the_reason_and_target_keeps_serving() {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(factory());
    let f2 = f.clone();
    let server = std::thread::spawn(move || serve(&l, f2.as_ref(), &NoHandoff, &ropts()));

    // 1. Garbage bytes.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n and some more garbage bytes")
            .unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    // 2. An old (version 1, plaintext) source: told that TLS is required.
    {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        protocol::write_frame_versioned(&mut s, 1, Command::Hello, b"").unwrap();
        let e = protocol::read_frame(&mut s).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("requires TLS") && msg.contains("version 2"),
            "{msg}"
        );
    }
    // 2b. Protocol version mismatch inside TLS.
    {
        let t = Duration::from_secs(5);
        let mut s = super::conn::Conn::connect(&tls(), None, addr, t, t).unwrap();
        protocol::write_frame_versioned(&mut s, 7, Command::Hello, b"").unwrap();
        let e = protocol::read_frame(&mut s).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("version 7") && msg.contains("version 2"),
            "{msg}"
        );
    }
    // 3. Another CPU vendor.
    let mut vm = SimVm::start(16 << 20, 0);
    vm.vendor = "OtherVendor".into();
    let e = migrate(
        &vm,
        addr,
        &opts(50, 10_000),
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&e, MigrationError::Refused(r) if r.contains("OtherVendor")),
        "{e}"
    );
    assert!(!vm.paused());
    // 4. Not enough memory on the target: the SimFactory offers 1 GiB.
    let big = SimVm::start((1 << 30) + 4096 * 16, 0);
    let e = migrate(
        &big,
        addr,
        &opts(50, 10_000),
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&e, MigrationError::Refused(r) if r.contains("memory")),
        "{e}"
    );
    drop(big);
    // 5. Still serving: a good migration succeeds.
    vm.vendor = "SimVendor".into();
    let stats = migrate(
        &vm,
        addr,
        &opts(50, 10_000),
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(stats.receipt_matches());
    let r = server.join().unwrap().unwrap();
    assert_eq!(r.vm_name, "sim");
    assert_eq!(
        f.created.lock().unwrap().len(),
        1,
        "refused sessions built no VM"
    );
}

#[test]
fn guest_faster_than_allowed_downtime_throttles_or_stays_on_source() {
    // 8 MiB rewritten continuously, a 1 ms blackout budget and a 5 s deadline.
    let vm = SimVm::start(32 << 20, 2048);
    let mut ev = Vec::new();
    let (r, t, f, _) = run_migration(
        &vm,
        &opts(1, 5000),
        ropts(),
        &CancelToken::default(),
        &mut ev,
    );
    let throttled = ev.iter().any(|e| matches!(e, MigrationEvent::Throttle(_)));
    match r {
        Ok(stats) => {
            t.unwrap();
            assert!(stats.receipt_matches());
            let target = f.created.lock().unwrap()[0].clone();
            assert_same_memory(&vm.s.mem, &target.mem);
        }
        Err(MigrationError::GaveUp(reason)) => {
            assert!(t.is_err());
            assert!(reason.contains("deadline"), "{reason}");
            assert!(throttled, "gave up without trying to throttle");
            assert!(!vm.paused());
            assert_eq!(vm.s.throttle.load(Ordering::SeqCst), 0, "throttle removed");
        }
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn connection_killed_mid_stream_rolls_back() {
    // A fake (plaintext) target that accepts, answers setup, then drops everything mid
    // pre-copy.
    let l = listener();
    let addr = l.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        use protocol::*;
        let (mut c, _) = l.accept().unwrap();
        let _ = read_frame(&mut c).unwrap();
        let p = encode_payload(
            Command::Welcome,
            &Welcome {
                session_id: [7; 16],
            },
        )
        .unwrap();
        write_frame(&mut c, Command::Welcome, &p).unwrap();
        let _ = read_frame(&mut c).unwrap();
        write_frame(&mut c, Command::SetupOk, &[]).unwrap();
        let mut data = Vec::new();
        for _ in 0..4 {
            data.push(l.accept().unwrap().0);
        }
        let mut buf = vec![0u8; 1 << 20];
        use std::io::Read;
        let _ = data[0].read(&mut buf);
        // Connection killed.
        drop(data);
        drop(c);
    });
    let vm = SimVm::start(32 << 20, 256);
    let r = migrate(
        &vm,
        addr,
        &MigrateOptions {
            transport: Transport::Plaintext,
            ..opts(50, 10_000)
        },
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    );
    fake.join().unwrap();
    assert!(r.is_err());
    assert!(!vm.paused());
    assert!(!vm.s.dirty_log.load(Ordering::SeqCst));
}

#[test]
fn connection_count_is_validated() {
    let vm = SimVm::start(16 << 20, 0);
    let mut o = opts(50, 10_000);
    o.connections = 0;
    let e = migrate(
        &vm,
        "127.0.0.1:1".parse().unwrap(),
        &o,
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("connections"), "{e}");
}

fn capped(cap_bytes_per_s: u64, downtime_ms: u64, deadline_ms: u64) -> MigrateOptions {
    MigrateOptions {
        bandwidth_bytes_per_s_max: Some(cap_bytes_per_s),
        ..opts(downtime_ms, deadline_ms)
    }
}

/// A bandwidth cap holds a migration in pre-copy: at 1 MiB/s the 8 MiB of data of this
/// 64 MiB guest cannot all go within the 2 s deadline, so round 0 is cut there and the
/// migration gives up and rolls back (on any machine: a slower one sends less). No
/// progress report ever shows more bytes than the cap allows for the time elapsed.
#[test]
fn bandwidth_cap_holds_precopy_until_the_deadline_cuts_the_round() {
    let vm = SimVm::start(64 << 20, 0);
    let cap = 1u64 << 20;
    let l = listener();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(factory());
    let f2 = f.clone();
    let t = std::thread::spawn(move || receive_one(&l, f2.as_ref(), &NoHandoff, &ropts()));
    let start = std::time::Instant::now();
    let mut progress = Vec::new();
    let r = migrate(
        &vm,
        addr,
        &capped(cap, 50, 2_000),
        &NoHandoff,
        &CancelToken::default(),
        &mut |e| {
            if let MigrationEvent::Progress(p) = e {
                progress.push((start.elapsed(), *p));
            }
        },
    );
    match &r {
        Err(MigrationError::GaveUp(why)) => {
            assert!(why.contains("deadline") && why.contains("round 0"), "{why}")
        }
        other => panic!("expected the deadline to cut round 0: {other:?}"),
    }
    // One 64 KiB chunk per connection and the frame headers may lead the timeline.
    let slack = 4.0 * (64 << 10) as f64 + 65536.0;
    for (at, p) in &progress {
        assert!(
            p.bytes_sent as f64 <= cap as f64 * at.as_secs_f64() + slack,
            "{} bytes sent after {at:?} at a cap of {cap} B/s",
            p.bytes_sent
        );
    }
    assert!(t.join().unwrap().is_err());
    assert!(!vm.paused());
    assert!(!vm.s.dirty_log.load(Ordering::SeqCst));
    assert!(vm.s.disks_attached.load(Ordering::SeqCst));
}

/// A capped round lasting longer than the target's I/O timeout completes: the target
/// counts that timeout from the last bytes any data connection received (a connection
/// done with its share of the round waits idle for the others), and the source reports
/// progress while the round runs.
#[test]
fn capped_round_longer_than_the_target_io_timeout_completes() {
    let vm = SimVm::start(64 << 20, 0);
    // Generous against a loaded host (TLS in a debug build shares 2 cores with the other
    // tests): the round still lasts ~2.7× longer.
    let io_timeout = Duration::from_millis(3_000);
    let ro = ReceiveOptions {
        io_timeout,
        ..ropts()
    };
    let mut ev = Vec::new();
    let (r, t, f, _) = run_migration(
        &vm,
        &capped(1 << 20, 50, 60_000),
        ro,
        &CancelToken::default(),
        &mut ev,
    );
    let t = t.map_err(|e| super::target::error_chain(&e));
    let stats = r.unwrap_or_else(|e| panic!("source: {e}; target: {:?}", t.as_ref().err()));
    t.unwrap();
    assert!(stats.receipt_matches(), "{stats:?}");
    let target = f.created.lock().unwrap()[0].clone();
    assert_same_memory(&vm.s.mem, &target.mem);
    // 8 MiB at 1 MiB/s: the pacer makes round 0 last ~8 s on any machine.
    assert!(
        stats.rounds[0].duration_us > io_timeout.as_micros() as u64,
        "{stats:?}"
    );
    let during_round_0 = ev
        .iter()
        .filter(
            |e| matches!(e, MigrationEvent::Progress(p) if p.round == 0 && p.bytes_remaining > 0),
        )
        .count();
    assert!(during_round_0 >= 1, "no progress while round 0 ran: {ev:?}");
}

#[test]
fn bandwidth_cap_below_the_minimum_is_refused_with_the_reason() {
    let vm = SimVm::start(16 << 20, 0);
    for cap in [1, 4096, (1 << 20) - 1] {
        let e = migrate(
            &vm,
            "127.0.0.1:1".parse().unwrap(),
            &capped(cap, 50, 10_000),
            &NoHandoff,
            &CancelToken::default(),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(
            matches!(e, MigrationError::InvalidOptions(_))
                && e.to_string().contains("below the minimum")
                && e.to_string().contains(&cap.to_string()),
            "{e}"
        );
    }
    // 0 is no cap at all.
    assert_eq!(capped(0, 50, 10_000).bandwidth_cap(), None);
    assert!(capped(0, 50, 10_000).validate().is_ok());
}

/// Pages of the first half [`SimVm::start`] writes (every 4th).
fn static_pages(bytes: usize) -> usize {
    (bytes / 8192).div_ceil(4)
}

/// Transparent huge pages set to `always` may make a written page's neighbours present.
fn thp_always() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|s| s.contains("[always]"))
}

/// Migrates `vm` like [`run_migration`], calling `before_round_0` once the engine has
/// looked at which pages were never written (the first prediction) and before round 0.
fn run_migration_with_hook(vm: &SimVm, before_round_0: &mut dyn FnMut()) -> Outcome {
    let l = listener();
    let addr = l.local_addr().unwrap();
    let f = Arc::new(factory());
    let th = Arc::new(RecordingHandoff::default());
    let (f2, th2) = (f.clone(), th.clone());
    let ro = ropts();
    let t = std::thread::spawn(move || receive_one(&l, f2.as_ref(), th2.as_ref(), &ro));
    let sh = RecordingHandoff::default();
    let mut hooked = false;
    let r = migrate(
        vm,
        addr,
        &opts(50, 10_000),
        &sh,
        &CancelToken::default(),
        &mut |e| {
            if matches!(e, MigrationEvent::Prediction(_)) && !hooked {
                hooked = true;
                before_round_0();
            }
        },
    );
    assert!(hooked, "no prediction before round 0");
    (r, t.join().unwrap(), f, th)
}

#[test]
fn never_written_pages_are_skipped_unread_and_arrive_as_zero() {
    let bytes = 8 << 20;
    let pages = bytes / 4096;
    let vm = SimVm::start(bytes, 0);
    // A page written after the engine's look at the page tables, before round 0: it was
    // never written at the look, so round 0 skips it; the dirty log must bring it.
    let late = GuestAddress((pages as u64 - 10) * 4096 + 16);
    let (r, t, f, _) = run_migration_with_hook(&vm, &mut || {
        vm.s.mem.write_obj(0x1a7e_u64, late).unwrap();
    });
    let stats = r.unwrap();
    t.unwrap();
    assert!(stats.receipt_matches(), "{stats:?}");
    let target = f.created.lock().unwrap()[0].clone();
    assert_eq!(target.mem.read_obj::<u64>(late).unwrap(), 0x1a7e);
    assert_same_memory(&vm.s.mem, &target.mem);
    let r0 = stats.rounds[0];
    let written = static_pages(bytes);
    if thp_always() {
        assert!(r0.untouched_pages >= (pages / 2) as u64, "{r0:?}");
    } else {
        // Every page but the written ones, the late one included.
        assert_eq!(r0.untouched_pages, (pages - written) as u64, "{r0:?}");
        assert_eq!(r0.data_pages, written as u64, "{r0:?}");
    }
    assert_eq!(stats.untouched_pages, r0.untouched_pages);
    assert!(r0.zero_pages_skipped >= r0.untouched_pages, "{r0:?}");
    // The late page came with a later round.
    assert!(
        stats.rounds[1..].iter().any(|r| r.data_pages > 0),
        "{:?}",
        stats.rounds
    );
}

#[test]
fn snapshot_restored_memory_is_read_page_by_page() {
    let bytes = 8 << 20;
    let pages = bytes / 4096;
    // Data in the second half that the restored mapping never touches: it comes from the
    // file, so those pages are not zero although this process never wrote them.
    let image = new_mem(bytes);
    for p in (pages / 2..pages).step_by(3) {
        image
            .write_obj(0x5eed_0000_u64 | p as u64, GuestAddress(p as u64 * 4096))
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem");
    crate::memory::save_to_file(&image, &path).unwrap();
    let restored = crate::memory::map_file(&path, bytes as u64).unwrap();
    let vm = SimVm::start_on(restored, 0);
    let (r, t, f, _) = run_migration_with_hook(&vm, &mut || {});
    let stats = r.unwrap();
    t.unwrap();
    assert!(stats.receipt_matches(), "{stats:?}");
    assert_eq!(stats.untouched_pages, 0, "{:?}", stats.rounds[0]);
    let target = f.created.lock().unwrap()[0].clone();
    let last = GuestAddress((pages as u64 - 1 - (pages / 2 - 1) as u64 % 3) * 4096);
    assert_ne!(target.mem.read_obj::<u64>(last).unwrap(), 0);
    assert_same_memory(&vm.s.mem, &target.mem);
}
