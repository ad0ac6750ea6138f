//! Live migration of the project's test guest: vmm-node's engine against QEMU, measured the
//! same way from outside.
//!
//! ```text
//! apt-get install -y qemu-system-x86     # QEMU 7.2 on Debian 12 (bench only)
//! cargo build --release -p vmm-node --bins
//! target/release/qemu-bench [--memory-mib 1024] [--repeats 3] [--cases idle,full,200]
//!     [--max-downtime-ms 300] [--connections 4] [--hb-ms 10] [--each]
//! ```
//! Both sides run the same guest ELF (PVH; QEMU boots it with `-kernel`, through SeaBIOS and
//! its PVH option ROM) with the same memory size, one vCPU and the same command line, and
//! migrate it over loopback (plaintext) with the same downtime goal; the repeats alternate
//! (ours, QEMU, ours, ...). QEMU: `-accel kvm -cpu host,-arch-capabilities`, target started
//! with `-incoming tcp:127.0.0.1:PORT`, `migrate-set-parameters` `downtime-limit` and an
//! unlimited `max-bandwidth` (QEMU's default cap is 32 MiB/s), `migrate` over QMP, then
//! `query-migrate` polled every 2 ms. Ours: the engine as `migration-bench` drives it.
//!
//! Measured from outside for both:
//! * **total**: from the migrate command to completion (QEMU: the first `query-migrate`
//!   that says `completed`; ours: `migrate()` returning, less the after-switchover memory
//!   verification it does outside its own total).
//! * **gap**: host-clock time between the last heartbeat line the guest printed on the
//!   source's serial console and the first one on the target's (lines timestamped by a
//!   thread as they arrive: QEMU's serial is its stdout pipe, ours the console's line
//!   stream). It is the blackout plus up to one heartbeat period (`--hb-ms`).
//!
//! The engines' own figures (QEMU's `total-time` and `downtime`, ours `total_us` and the
//! blackout) are printed next to them. Cases: `idle` (idle guest, memory never written),
//! `full` (3/4 of memory filled with a pattern, then only read: populated and idle),
//! `N` (a 256 MiB working set rewritten at N MB/s).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use vmm_node::guest_protocol::{heartbeats, Heartbeat, Workload, WorkloadKind};
use vmm_node::migration::adapter::{LocalFactory, LocalSource};
use vmm_node::migration::convergence::ConvergenceConfig;
use vmm_node::migration::seam::NoHandoff;
use vmm_node::migration::source::{migrate, CancelToken, MigrateOptions};
use vmm_node::migration::target::{receive_one, ReceiveOptions};
use vmm_node::migration::tls::{AllowAll, Transport};
use vmm_node::{Vm, VmConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    #[arg(long, default_value = "idle,full,200")]
    cases: String,
    /// Downtime goal of both (QEMU's `downtime-limit`, the engine's maximum downtime).
    #[arg(long, default_value_t = 300)]
    max_downtime_ms: u64,
    /// Data connections of the engine (QEMU uses one).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Heartbeat period of the guest (the resolution of the gap measured from outside).
    #[arg(long, default_value_t = 10)]
    hb_ms: u64,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Print every migration, not only the medians.
    #[arg(long)]
    each: bool,
}

/// One migration, measured from outside and as the engine reports it.
#[derive(Debug, Clone, Copy)]
struct Run {
    total_us: u64,
    gap_us: u64,
    /// Heartbeats between the source's last and the target's first (see [`gap`]).
    split: u64,
    engine_total_us: u64,
    engine_downtime_us: u64,
    bytes: u64,
}

fn workload(case: &str, memory_mib: u64, hb_ms: u64) -> anyhow::Result<Workload> {
    let w = match case {
        "idle" => Workload::new(WorkloadKind::Idle),
        "full" => Workload {
            wss_mib: memory_mib * 3 / 4,
            ..Workload::new(WorkloadKind::Mem)
        },
        rate => Workload {
            wss_mib: 256.min(memory_mib / 2),
            rate_mbps: rate
                .parse()
                .context("a case is idle, full or a rate in MB/s")?,
            ..Workload::new(WorkloadKind::Dirty)
        },
    };
    Ok(Workload { hb_ms, ..w })
}

/// Heartbeat lines with the host time each arrived.
#[derive(Clone, Default)]
struct Beats(Arc<Mutex<Vec<(Instant, Heartbeat)>>>);

impl Beats {
    fn push_line(&self, line: &str) {
        let at = Instant::now();
        if let Some(h) = heartbeats(&format!("{line}\n")).pop() {
            self.0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((at, h));
        }
    }

    fn last(&self) -> Option<(Instant, Heartbeat)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last()
            .cloned()
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The guest printed two heartbeats and, for `mem`, finished filling its memory, for
    /// `dirty`, wrote its working set once.
    fn ready(&self, w: &Workload) -> bool {
        self.count() >= 2
            && self.last().is_some_and(|(_, h)| match w.kind {
                WorkloadKind::Mem => h.mem == "ok",
                WorkloadKind::Dirty => h.dirty_mib >= w.wss_mib,
                _ => true,
            })
    }

    /// Waits until the guest is ready (see [`Beats::ready`]).
    fn wait_ready(
        &self,
        w: &Workload,
        what: &str,
        child: Option<&mut Child>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut child = child;
        while !self.ready(w) {
            if let Some(c) = child.as_mut() {
                if let Some(st) = c.try_wait()? {
                    bail!("{what} exited before the guest was ready: {st}");
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: guest not ready after 300 s (last heartbeat {:?})",
                self.last().map(|(_, h)| h)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for a heartbeat after `seq` and returns its arrival time and the heartbeat.
    fn wait_after(&self, seq: u64, what: &str) -> anyhow::Result<(Instant, Heartbeat)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((at, h)) = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(_, h)| h.seq > seq)
            {
                return Ok((*at, h.clone()));
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: no heartbeat after seq {seq} on the target within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The gap between the source's last heartbeat and the target's next one, and how many
/// heartbeats lie between them (a line cut in two by the switchover is not parsed on
/// either side; the gap then spans one more heartbeat period).
fn gap(source: &Beats, target: &Beats, what: &str) -> anyhow::Result<(u64, u64)> {
    let (src_at, last) = source
        .last()
        .with_context(|| format!("{what}: no heartbeat on the source"))?;
    let (dst_at, first) = target.wait_after(last.seq, what)?;
    ensure!(
        first.mem != "bad" && first.mem_errors == 0,
        "{what}: the guest reports memory errors after the migration: {first:?}"
    );
    let seq = first.seq;
    Ok((
        dst_at.saturating_duration_since(src_at).as_micros() as u64,
        seq.saturating_sub(last.seq + 1),
    ))
}

// --- vmm-node ------------------------------------------------------------------------

fn tsc_khz(args: &Args) -> anyhow::Result<u32> {
    let cfg = VmConfig::new(1, args.memory_mib, vmm_node::test_guest::PATH);
    Ok(Vm::create(cfg)?.tsc_khz())
}

/// Forwards the lines of `vm`'s console to `beats` until `stop`.
fn follow_console(vm: &Vm, beats: Beats, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let rx = vm.console().subscribe();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => beats.push_line(&line),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    })
}

fn ours_once(args: &Args, w: &Workload) -> anyhow::Result<Run> {
    let mut cfg = VmConfig::new(1, args.memory_mib, vmm_node::test_guest::PATH);
    cfg.cmdline = w.cmdline();
    cfg.name = "bench".into();
    let vm = Arc::new(Vm::create(cfg)?);
    let stop = Arc::new(AtomicBool::new(false));
    let src_beats = Beats::default();
    let src_follow = follow_console(&vm, src_beats.clone(), stop.clone());
    vm.start()?;
    src_beats.wait_ready(w, "vmm-node", None)?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let ropts = ReceiveOptions::new(Transport::Plaintext, Arc::new(AllowAll));
    let factory = Arc::new(LocalFactory::default());
    let f = factory.clone();
    let target = std::thread::spawn(move || -> anyhow::Result<Arc<Vm>> {
        let r = receive_one(&listener, f.as_ref(), &NoHandoff, &ropts)?;
        // Hold the running VM before the session (its other holder) is dropped.
        let vm = f.last_vm().context("target VM gone")?;
        drop(r);
        Ok(vm)
    });
    // Subscribe to the target VM's console as soon as it exists (created paused at setup).
    let dst_beats = Beats::default();
    let (f, b, s) = (factory.clone(), dst_beats.clone(), stop.clone());
    let dst_follow = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            if let Some(vm) = f.last_vm() {
                return Some(follow_console(&vm, b, s));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    });
    let opts = MigrateOptions {
        connections: args.connections,
        convergence: ConvergenceConfig {
            max_downtime: Duration::from_millis(args.max_downtime_ms),
            deadline: Duration::from_secs(120),
            throttle: true,
        },
        ..MigrateOptions::new(Transport::Plaintext)
    };
    let t0 = Instant::now();
    let stats = migrate(
        &LocalSource::new(vm.clone()),
        addr,
        &opts,
        &NoHandoff,
        &CancelToken::default(),
        &mut |_| {},
    );
    let outside = t0.elapsed();
    let received = target
        .join()
        .map_err(|_| anyhow::anyhow!("target thread panicked"))?;
    let stats = stats?;
    let target_vm = received?;
    ensure!(stats.receipt_matches(), "memory receipts differ");
    let gap = gap(&src_beats, &dst_beats, "vmm-node");
    stop.store(true, Ordering::Relaxed);
    let _ = src_follow.join();
    if let Ok(Some(h)) = dst_follow.join() {
        let _ = h.join();
    }
    target_vm.stop()?;
    vm.stop()?;
    let (gap_us, split) = gap?;
    Ok(Run {
        total_us: (outside.as_micros() as u64).saturating_sub(stats.verify_us),
        gap_us,
        split,
        engine_total_us: stats.total_us,
        engine_downtime_us: stats.blackout.total_us,
        bytes: stats.wire_bytes,
    })
}

// --- QEMU ----------------------------------------------------------------------------

/// A QEMU process, killed when dropped.
struct Qemu {
    child: Child,
    beats: Beats,
    qmp: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
    }
}

fn qemu_start(
    args: &Args,
    w: &Workload,
    tsc_khz: u32,
    name: &str,
    incoming: Option<u16>,
) -> anyhow::Result<Qemu> {
    let qmp = std::env::temp_dir().join(format!("qemu-bench-{}-{name}.qmp", std::process::id()));
    let _ = std::fs::remove_file(&qmp);
    // The VMM appends these to the test guest's command line; QEMU does not.
    let append = format!(
        "{} tsc_khz={tsc_khz} vcpus=1 mem_mib={}",
        w.cmdline(),
        args.memory_mib
    );
    let mut cmd = Command::new(&args.qemu);
    cmd.args([
        "-accel",
        "kvm",
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
    ])
    .args(["-m", &args.memory_mib.to_string()])
    .args(["-nodefaults", "-display", "none", "-monitor", "none"])
    .args(["-serial", "stdio"])
    .args(["-kernel", vmm_node::test_guest::PATH, "-append", &append])
    .arg("-qmp")
    .arg(format!("unix:{},server=on,wait=off", qmp.display()));
    if let Some(port) = incoming {
        cmd.args(["-incoming", &format!("tcp:127.0.0.1:{port}")]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} (apt-get install qemu-system-x86)",
            args.qemu
        )
    })?;
    let beats = Beats::default();
    let out = child.stdout.take().context("no stdout pipe")?;
    let b = beats.clone();
    std::thread::spawn(move || {
        let mut out = out;
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        // Serial output is bytes; a line ends at '\n'.
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            for &c in &buf[..n] {
                if c == b'\n' {
                    b.push_line(String::from_utf8_lossy(&line).trim_end());
                    line.clear();
                } else if line.len() < 64 << 10 {
                    line.push(c);
                }
            }
        }
    });
    Ok(Qemu { child, beats, qmp })
}

/// A QMP connection (capabilities negotiated).
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context(format!("QMP socket {}", path.display())),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        let greeting = q.read()?;
        ensure!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        q.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        ensure!(
            self.reader.read_line(&mut line)? > 0,
            "QMP connection closed"
        );
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command` and returns its `return` value (events in between are skipped).
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {command}: {e}");
            }
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn qemu_once(args: &Args, w: &Workload, tsc_khz: u32) -> anyhow::Result<Run> {
    let port = free_port()?;
    let mut src = qemu_start(args, w, tsc_khz, "source", None)?;
    let dst = qemu_start(args, w, tsc_khz, "target", Some(port))?;
    src.beats
        .wait_ready(w, "QEMU source", Some(&mut src.child))?;
    let mut qmp = Qmp::connect(&src.qmp)?;
    qmp.execute(
        "migrate-set-parameters",
        serde_json::json!({
            "downtime-limit": args.max_downtime_ms,
            // Unlimited (QEMU's default cap is 32 MiB/s).
            "max-bandwidth": i64::MAX / 2,
        }),
    )?;
    let t0 = Instant::now();
    qmp.execute(
        "migrate",
        serde_json::json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    )?;
    let info = loop {
        let info = qmp.execute("query-migrate", serde_json::json!({}))?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("QEMU migration ended: {info}"),
            _ => {}
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "QEMU migration not done after 300 s: {info}"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let outside = t0.elapsed();
    let (gap_us, split) = gap(&src.beats, &dst.beats, "QEMU")?;
    let num = |k: &str| info.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let bytes = info
        .get("ram")
        .and_then(|r| r.get("transferred"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    Ok(Run {
        total_us: outside.as_micros() as u64,
        gap_us,
        split,
        engine_total_us: num("total-time") * 1000,
        engine_downtime_us: num("downtime") * 1000,
        bytes,
    })
}

// --- main ----------------------------------------------------------------------------

fn median(mut v: Vec<u64>) -> u64 {
    vmm_node::bench_stats::median(&mut v).unwrap_or(0)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn ratio(a: u64, b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.2}", a as f64 / b as f64)
    }
}

fn print_run(who: &str, case: &str, r: &Run) {
    println!(
        "  {case:>5} {who:<8} total {:>8.1} ms (engine {:>8.1}), heartbeat gap {:>7.1} ms{} (engine downtime {:>7.1} ms), {:>6.1} MB sent",
        ms(r.total_us),
        ms(r.engine_total_us),
        ms(r.gap_us),
        if r.split > 0 { " (a line cut)" } else { "" },
        ms(r.engine_downtime_us),
        r.bytes as f64 / 1e6
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.repeats >= 1, "--repeats must be at least 1");
    ensure!(
        (1..=vmm_node::migration::MAX_CONNECTIONS).contains(&args.connections),
        "--connections must be 1..={}",
        vmm_node::migration::MAX_CONNECTIONS
    );
    ensure!(args.hb_ms >= 1, "--hb-ms must be at least 1");
    ensure!(
        args.max_downtime_ms >= 1,
        "--max-downtime-ms must be at least 1"
    );
    let cases: Vec<(String, Workload)> = args
        .cases
        .split(',')
        .map(|c| Ok((c.to_string(), workload(c, args.memory_mib, args.hb_ms)?)))
        .collect::<anyhow::Result<_>>()?;
    let version = Command::new(&args.qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} (apt-get install qemu-system-x86)", args.qemu))?;
    let tsc = tsc_khz(&args)?;
    println!(
        "{} | guest {} MiB, 1 vCPU, heartbeat every {} ms, downtime goal {} ms, engine over {} \
         plaintext connections, QEMU one; tsc_khz {tsc}; median of {}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("QEMU"),
        args.memory_mib,
        args.hb_ms,
        args.max_downtime_ms,
        args.connections,
        args.repeats
    );
    let mut table = Vec::new();
    for (case, w) in &cases {
        let mut ours = Vec::new();
        let mut qemu = Vec::new();
        for _ in 0..args.repeats {
            let r = ours_once(&args, w).with_context(|| format!("vmm-node, case {case}"))?;
            if args.each {
                print_run("vmm-node", case, &r);
            }
            ours.push(r);
            let r = qemu_once(&args, w, tsc).with_context(|| format!("QEMU, case {case}"))?;
            if args.each {
                print_run("QEMU", case, &r);
            }
            qemu.push(r);
        }
        let m = |v: &[Run], f: fn(&Run) -> u64| median(v.iter().map(f).collect());
        let row = (
            case.clone(),
            [
                m(&ours, |r| r.total_us),
                m(&qemu, |r| r.total_us),
                m(&ours, |r| r.gap_us),
                m(&qemu, |r| r.gap_us),
                m(&ours, |r| r.engine_total_us),
                m(&qemu, |r| r.engine_total_us),
                m(&ours, |r| r.engine_downtime_us),
                m(&qemu, |r| r.engine_downtime_us),
                m(&ours, |r| r.bytes),
                m(&qemu, |r| r.bytes),
            ],
        );
        table.push(row);
    }
    println!();
    println!("| case | total ours / QEMU | ratio | heartbeat gap ours / QEMU | ratio | engines' own total | engines' own downtime | MB sent ours / QEMU |");
    println!("|---|---|---|---|---|---|---|---|");
    for (case, v) in &table {
        println!(
            "| {case} | {:.1} / {:.1} ms | {} | {:.1} / {:.1} ms | {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} |",
            ms(v[0]),
            ms(v[1]),
            ratio(v[0], v[1]),
            ms(v[2]),
            ms(v[3]),
            ratio(v[2], v[3]),

            ms(v[4]),
            ms(v[5]),
            ms(v[6]),
            ms(v[7]),
            v[8] as f64 / 1e6,
            v[9] as f64 / 1e6
        );
    }
    Ok(())
}
