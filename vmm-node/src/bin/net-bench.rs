//! virtio-net benchmark, two parts in one run:
//!
//! 1. host ↔ guest UDP echo packets/s and throughput with 1500- and 9000-byte IP packets,
//!    each next to the same traffic between two network namespaces over a veth pair.
//! 2. the network gap of a live migration: a 1 kHz UDP echo stream from a namespace to a
//!    VM that is live-migrated between two `vmm-node` processes (source and target TAP on
//!    one bridge, migration over loopback, plaintext) `--repeats` times back and forth; per
//!    migration the lost echoes and the longest silence between two replies, beside the
//!    memory blackout of the same migration and the goal (silence ≤ blackout + 5 ms). The
//!    processes' logs time the source's pause and the target's announcement and resume,
//!    so each silence is placed against them. The vCPU threads run at `--vcpu-nice` (10,
//!    as in the cluster's VM workers; the migration threads keep nice 0).
//!
//! ```text
//! cargo build --release -p vmm-node --bins && sudo target/release/net-bench [--seconds 3] [--window 16] [--repeats 5]
//! ```
//!
//! Needs root and KVM. Everything happens in network namespaces the program creates and
//! deletes again (`netbench<pid>`: bridge, TAP, host address; `netbench<pid>a`/`b`: the
//! veth pair); no address is added to the root namespace, nothing leaves the machine. The
//! guest is the test guest's `net` workload (polling driver at CPL3, UDP echo on port 7)
//! run by `vmm-node run` inside the namespace; the client is this program re-run inside
//! the namespace (`client` subcommand), keeping `--window` echoes in flight. The veth
//! baseline's echo server is this program too (`echo-server`).

use std::collections::HashMap;
use std::io::BufRead;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

const GUEST_IP: &str = "10.78.0.2";
const HOST_CIDR: &str = "10.78.0.1/24";
const VETH_A: &str = "10.79.0.1/24";
const VETH_B_IP: &str = "10.79.0.2";
const VETH_B: &str = "10.79.0.2/24";
const MAC: &str = "52:54:00:78:00:02";
const MTU: u16 = 9000;
/// UDP payloads: a 1500-byte and a 9000-byte IP packet.
const PAYLOADS: [(usize, &str); 2] = [(1472, "1500"), (8972, "9000")];

#[derive(Parser)]
#[command(
    name = "net-bench",
    about = "virtio-net packets/s against a veth baseline"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Echoes kept in flight.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Live migrations under the 1 kHz echo stream (0: skip that part).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Nice value of the vCPU threads during the migrations.
    #[arg(long, default_value_t = 10)]
    vcpu_nice: i32,
    /// Nice value of the other threads of both `vmm-node` processes (the migration
    /// engine's, the NIC's) during the migrations; default: left at 0.
    #[arg(long)]
    engine_nice: Option<i32>,
    /// Nice value of the source's pre-copy send threads (the engine's `precopy_nice`;
    /// default: the engine's, the process's own priority; 19 yields to the guest).
    #[arg(long)]
    precopy_nice: Option<i32>,
    /// Nice value of the source's after-switchover memory re-hash (the engine's
    /// `verify_nice`; default: the engine's, 19; 0: the process's priority).
    #[arg(long)]
    verify_nice: Option<i32>,
    /// Leave the vCPU threads at their nice during the migrations (default: the engine
    /// runs them at its own priority from the start to the pause, and on the target for
    /// 100 ms after the resume).
    #[arg(long)]
    no_vcpu_boost: bool,
    /// Only the target's boost after the resume off (the source's until the pause stays).
    #[arg(long)]
    no_target_vcpu_boost: bool,
    /// Skip the packets/s part.
    #[arg(long)]
    no_throughput: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// (internal) UDP echo client; prints one JSON line.
    Client {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        seconds: f64,
        #[arg(long)]
        window: usize,
    },
    /// (internal) UDP echo server on `port` until killed.
    EchoServer {
        #[arg(long)]
        port: u16,
    },
    /// (internal) sequence-numbered echoes at `rate` Hz until `stop` exists (then 1 s for
    /// late replies); prints `READY`, then one JSON line.
    Stream {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        rate: f64,
        #[arg(long)]
        stop: PathBuf,
    },
}

/// Network namespace deleted on drop.
struct Ns(String);

impl Ns {
    fn new(name: String) -> anyhow::Result<Self> {
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        sh(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Ns(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        sh(Command::new("ip").arg("-n").arg(&self.0).args(args))
    }
    fn exec(&self, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(prog);
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Killed(Child);

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Wait until `s` is readable or `timeout` passed (`ppoll`: a high-resolution timer).
fn wait_readable(s: &UdpSocket, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let mut fds = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // SAFETY: one valid pollfd, a valid timespec, no signal mask.
    unsafe { libc::ppoll(&mut fds, 1, &ts, std::ptr::null()) };
}

/// The echo stream: lost echoes and the longest silence between two replies (arrival
/// times, unix seconds).
fn stream(dst: SocketAddr, rate: f64, stop: &Path) -> anyhow::Result<Value> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    // Non-blocking, waited on with `ppoll` until the next send: a socket read timeout
    // counts in scheduler ticks (4 ms at HZ=250), which sent the requests in bursts a
    // tick apart and made silences of the client's own.
    s.set_nonblocking(true)?;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut sent: Vec<f64> = Vec::new();
    let mut got: HashMap<u32, f64> = HashMap::new();
    let mut buf = [0u8; 2048];
    let mut payload = [0x78u8; 64];
    let mut next = Instant::now();
    let mut stop_at: Option<Instant> = None;
    println!("READY");
    loop {
        let now = Instant::now();
        if stop_at.is_none() && stop.exists() {
            stop_at = Some(now + Duration::from_secs(1));
        }
        if stop_at.is_some_and(|t| now >= t) {
            break;
        }
        if stop_at.is_none() && now >= next {
            let seq = sent.len() as u32;
            payload[..4].copy_from_slice(&seq.to_le_bytes());
            s.send_to(&payload, dst)?;
            sent.push(unix_now());
            next += period;
            if next + Duration::from_secs(1) < now {
                next = now;
            }
        }
        while let Ok(n) = s.recv(&mut buf) {
            if n == payload.len() {
                let seq = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                if (seq as usize) < sent.len() {
                    got.entry(seq).or_insert_with(unix_now);
                }
            }
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(1));
        wait_readable(&s, wait);
    }
    let mut arrivals: Vec<f64> = got.values().copied().collect();
    arrivals.sort_by(f64::total_cmp);
    let (mut longest, mut from, mut to) = (0.0, 0.0, 0.0);
    // Every silence longer than 2 ms (the stream's period is 1 ms).
    let mut gaps: Vec<[f64; 2]> = Vec::new();
    for w in arrivals.windows(2) {
        if w[1] - w[0] > longest {
            (longest, from, to) = (w[1] - w[0], w[0], w[1]);
        }
        if w[1] - w[0] > 0.002 && gaps.len() < 5000 {
            gaps.push([w[0], w[1]]);
        }
    }
    // Lost requests sent inside the silence, and outside it.
    let lost: Vec<f64> = (0..sent.len() as u32)
        .filter(|q| !got.contains_key(q))
        .map(|q| sent[q as usize])
        .collect();
    Ok(json!({
        "sent": sent.len(),
        "received": got.len(),
        "lost": lost.len(),
        "lost_outside_silence": lost.iter().filter(|t| **t < from - 0.05 || **t > to).count(),
        "longest_silence_ms": longest * 1e3,
        "silence_from_unix": from,
        "silence_to_unix": to,
        "gaps": gaps,
        "first_unix": arrivals.first(),
        "last_unix": arrivals.last(),
        "lost_sent_unix": lost,
    }))
}
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Keep `window` echoes in flight for `seconds`; an echo not back within 200 ms counts as
/// lost and its slot is refilled.
fn client(dst: SocketAddr, size: usize, seconds: f64, window: usize) -> anyhow::Result<Value> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut payload = vec![0x5au8; size.max(8)];
    let mut seq: u64 = 0;
    let mut inflight = 0usize;
    let (mut replies, mut lost) = (0u64, 0u64);
    let mut buf = vec![0u8; 65536];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        while inflight < window {
            payload[..8].copy_from_slice(&seq.to_le_bytes());
            s.send_to(&payload, dst)?;
            seq += 1;
            inflight += 1;
        }
        match s.recv(&mut buf) {
            Ok(n) if n == payload.len() => {
                replies += 1;
                inflight -= 1;
            }
            Ok(_) => {}
            Err(_) => {
                lost += inflight as u64;
                inflight = 0;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(json!({
        "pps": replies as f64 / secs,
        "payload_mb_per_s": (replies as f64 * size as f64 * 2.0) / secs / 1e6,
        "replies": replies,
        "lost": lost,
    }))
}

fn echo_server(port: u16) -> anyhow::Result<()> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], from)?;
    }
}

fn measure(
    ns: &Ns,
    me: &Path,
    dst: &str,
    size: usize,
    seconds: f64,
    window: usize,
) -> anyhow::Result<Value> {
    let out = ns
        .exec(me)
        .args([
            "client",
            "--dst",
            &format!("{dst}:7"),
            "--size",
            &size.to_string(),
        ])
        .args([
            "--seconds",
            &seconds.to_string(),
            "--window",
            &window.to_string(),
        ])
        .output()?;
    if !out.status.success() {
        bail!("client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn wait_net_up(sock: &Path, vmm: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = vmm_node::control::request(sock, &json!({"cmd": "console"})) {
            if v["text"].as_str().is_some_and(|t| t.contains("NET up")) {
                return Ok(());
            }
        }
        if let Some(s) = vmm.try_wait()? {
            bail!("vmm-node exited with {s}");
        }
        if Instant::now() > deadline {
            bail!("the guest's NIC did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Client {
            dst,
            size,
            seconds,
            window,
        }) => {
            println!("{}", client(dst, size, seconds, window)?);
            return Ok(());
        }
        Some(Cmd::EchoServer { port }) => return echo_server(port),
        Some(Cmd::Stream { dst, rate, stop }) => {
            println!("{}", stream(dst, rate, &stop)?);
            return Ok(());
        }
        None => {}
    }
    let me = std::env::current_exe()?;
    let vmm_bin: PathBuf = me.with_file_name("vmm-node");
    if !vmm_bin.exists() {
        bail!(
            "{} not found: build all binaries (cargo build -p vmm-node --bins)",
            vmm_bin.display()
        );
    }
    let pid = std::process::id();
    let dir = tempfile::tempdir()?;
    if !cli.no_throughput {
        throughput(&cli, &me, &vmm_bin, pid, dir.path())?;
    }
    if cli.repeats > 0 {
        migration_gap(&cli, &me, &vmm_bin, pid, dir.path())?;
    }
    if std::env::var_os("NET_BENCH_KEEP").is_some() {
        // For a closer look: the processes' logs and every migration's statistics.
        println!("logs and statistics kept in {}", dir.keep().display());
    }
    Ok(())
}

fn vm_config(tap: &str, mtu: u16) -> anyhow::Result<vmm_node::VmConfig> {
    let mut cfg = vmm_node::VmConfig::new(1, 64, vmm_node::test_guest::PATH);
    cfg.name = "net-bench".into();
    cfg.cmdline = format!(
        "{} {}",
        vmm_node::guest_protocol::Workload::new(vmm_node::guest_protocol::WorkloadKind::Net)
            .cmdline(),
        vmm_node::guest_protocol::net_cmdline(GUEST_IP.parse()?)
    );
    cfg.nics = vec![vmm_node::config::NicConfig {
        mtu,
        ..vmm_node::config::NicConfig::new(tap, MAC)
    }];
    Ok(cfg)
}

fn throughput(cli: &Cli, me: &Path, vmm_bin: &Path, pid: u32, dir: &Path) -> anyhow::Result<()> {
    // The VM: bridge + TAP in one namespace.
    let ns = Ns::new(format!("netbench{pid}"))?;
    let mtu = MTU.to_string();
    ns.ip(&["link", "add", "br0", "mtu", &mtu, "type", "bridge"])?;
    ns.ip(&["addr", "add", HOST_CIDR, "dev", "br0"])?;
    ns.ip(&["link", "set", "br0", "up"])?;
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
    ns.ip(&["link", "set", "tap0", "mtu", &mtu, "master", "br0", "up"])?;
    let cfg = vm_config("tap0", MTU)?;
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let sock = dir.join("vm.sock");
    let mut vmm = Killed(
        ns.exec(vmm_bin)
            .args(["run", "--config"])
            .arg(&cfg_path)
            .arg("--control")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    wait_net_up(&sock, &mut vmm.0)?;

    // The baseline: two namespaces joined by a veth pair, echo server in the second.
    let a = Ns::new(format!("netbench{pid}a"))?;
    let b = Ns::new(format!("netbench{pid}b"))?;
    sh(Command::new("ip").args([
        "link", "add", "va", "netns", &a.0, "mtu", &mtu, "type", "veth", "peer", "name", "vb",
        "netns", &b.0, "mtu", &mtu,
    ]))?;
    a.ip(&["addr", "add", VETH_A, "dev", "va"])?;
    a.ip(&["link", "set", "va", "up"])?;
    b.ip(&["addr", "add", VETH_B, "dev", "vb"])?;
    b.ip(&["link", "set", "vb", "up"])?;
    let _server = Killed(b.exec(me).args(["echo-server", "--port", "7"]).spawn()?);
    std::thread::sleep(Duration::from_millis(200)); // the server binds; then warm both paths
    measure(&a, me, VETH_B_IP, 64, 0.3, cli.window)?;
    measure(&ns, me, GUEST_IP, 64, 0.3, cli.window)?;

    println!(
        "UDP echo, {} in flight, {:.1} s each (MB/s counts payload both ways)",
        cli.window, cli.seconds
    );
    println!(
        "{:>9}  {:<22} {:>12} {:>10} {:>6}",
        "IP bytes", "path", "echoes/s", "MB/s", "lost"
    );
    for (size, label) in PAYLOADS {
        for (name, n, dst) in [
            ("host <-> guest (TAP)", &ns, GUEST_IP),
            ("veth pair (baseline)", &a, VETH_B_IP),
        ] {
            let r = measure(n, me, dst, size, cli.seconds, cli.window)?;
            println!(
                "{:>9}  {:<22} {:>12.0} {:>10.1} {:>6}",
                label,
                name,
                r["pps"].as_f64().unwrap_or(0.0),
                r["payload_mb_per_s"].as_f64().unwrap_or(0.0),
                r["lost"]
            );
        }
    }
    Ok(())
}

/// A `vmm-node` process in a namespace: its control socket and its log file.
struct VmmProc {
    child: Killed,
    sock: PathBuf,
    log: PathBuf,
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    Ok(cmd
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stderr(f)
        .spawn()?)
}

fn wait_socket(sock: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while vmm_node::control::request(sock, &json!({"cmd": "status"})).is_err() {
        if let Some(s) = child.try_wait()? {
            bail!("vmm-node exited with {s}");
        }
        if Instant::now() > deadline {
            bail!("control socket {} never came up", sock.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Unix seconds of a log line's RFC 3339 UTC timestamp (`2026-12-07T04:36:12.123456Z ...`).
fn log_time(line: &str) -> Option<f64> {
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, mi, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + mi * 60.0 + sec)
}

/// Time of the last log line containing `what`, and that line.
fn last_logged(log: &Path, what: &str) -> Option<(f64, String)> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rfind(|l| l.contains(what))
        .and_then(|l| Some((log_time(l)?, l.to_string())))
}

/// Renice the threads of `pid` other than its vCPUs (named `vcpu<N>`: they set their own
/// nice, `vmm-node --vcpu-nice`, as a VM worker's do) to `others` until `stop`, picking up
/// threads that start later.
fn renice_others(
    pid: u32,
    others: Option<i32>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut done: Vec<String> = Vec::new();
        loop {
            if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
                for e in rd.flatten() {
                    let tid = e.file_name().to_string_lossy().into_owned();
                    if done.contains(&tid) {
                        continue;
                    }
                    let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
                    let n = if comm.starts_with("vcpu") {
                        None
                    } else {
                        others
                    };
                    if let Some(n) = n {
                        let _ = Command::new("renice")
                            .args(["-n", &n.to_string(), "-p", &tid])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status();
                    }
                    done.push(tid);
                }
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

fn median(v: &mut [f64]) -> f64 {
    vmm_node::bench_stats::median(v).unwrap_or(f64::NAN)
}

/// Part 2: the network gap of live migrations beside their memory blackout.
fn migration_gap(cli: &Cli, me: &Path, vmm_bin: &Path, pid: u32, dir: &Path) -> anyhow::Result<()> {
    let ns = Ns::new(format!("netbench{pid}m"))?;
    ns.ip(&["link", "add", "br0", "type", "bridge"])?;
    // A fixed address: a bridge following its lowest port would change it when a TAP goes.
    ns.ip(&["link", "set", "br0", "address", "02:00:00:78:00:01"])?;
    ns.ip(&["addr", "add", HOST_CIDR, "dev", "br0"])?;
    ns.ip(&["link", "set", "br0", "up"])?;
    for t in ["tap1", "tap2"] {
        ns.ip(&["tuntap", "add", "dev", t, "mode", "tap"])?;
        ns.ip(&["link", "set", t, "master", "br0", "up"])?;
    }
    let cfg_path = dir.join("mig.json");
    std::fs::write(&cfg_path, serde_json::to_string(&vm_config("tap1", 1500)?)?)?;
    let log = dir.join("vmm0.log");
    let sock = dir.join("vmm0.sock");
    let mut child = spawn_logged(
        ns.exec(vmm_bin)
            .args(["run", "--insecure-plaintext", "--config"])
            .arg(&cfg_path)
            .arg("--control")
            .arg(&sock)
            .arg(format!("--vcpu-nice={}", cli.vcpu_nice))
            .stdout(Stdio::null()),
        &log,
    )?;
    wait_net_up(&sock, &mut child)?;
    let mut src = VmmProc {
        child: Killed(child),
        sock,
        log,
    };
    println!();
    println!(
        "Live migration under a 1 kHz UDP echo stream (64 MiB guest, vCPU threads at nice {}, \
         other vmm-node threads at nice {}, pre-copy send threads at nice {}, \
         after-switchover re-hash at nice {}, vCPU boost {}, migration over loopback); times in ms; \
         pause and resume from the processes' logs (written just after \
         the events; late under load)",
        cli.vcpu_nice,
        cli.engine_nice.unwrap_or(0),
        cli.precopy_nice
            .map_or_else(|| "the caller's (0)".to_owned(), |n| n.to_string()),
        cli.verify_nice
            .unwrap_or(vmm_node::migration::source::DEFAULT_VERIFY_NICE),
        match (cli.no_vcpu_boost, cli.no_target_vcpu_boost) {
            (true, _) => "off",
            (false, true) => "source only",
            (false, false) => "on",
        },
    );
    println!(
        "{:>3} {:>8} {:>6} {:>8} {:>6} {:>4} {:>5} {:>8} {:>8} {:>8} {:>6} {:>8} {:>8} {:>8} {:>7}",
        "#",
        "blackout",
        "pause",
        "gap",
        "ratio",
        "goal",
        "lost",
        "gap-pse",
        "res-pse",
        "end-res",
        "sham",
        "base",
        "precopy",
        "after",
        "carried"
    );
    let (mut blackouts, mut silences, mut losts) = (Vec::new(), Vec::new(), Vec::new());
    let mut met = 0;
    let (mut shams, mut sham_met) = (Vec::new(), 0);
    for k in 1..=cli.repeats {
        let tap = if k % 2 == 1 { "tap2" } else { "tap1" };
        let log = dir.join(format!("vmm{k}.log"));
        let sock = dir.join(format!("vmm{k}.sock"));
        let mut child = spawn_logged(
            ns.exec(vmm_bin)
                .args([
                    "receive",
                    "--insecure-plaintext",
                    "--listen",
                    "127.0.0.1:0",
                    "--nic-tap",
                    tap,
                    "--control",
                ])
                .arg(&sock)
                .arg(format!("--vcpu-nice={}", cli.vcpu_nice))
                .args((cli.no_vcpu_boost || cli.no_target_vcpu_boost).then_some("--no-vcpu-boost"))
                .stdout(Stdio::piped()),
            &log,
        )?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("target stdout")?)
            .read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("MIGRATION-LISTEN ")
            .with_context(|| format!("unexpected first line {line:?} from vmm-node receive"))?
            .to_string();
        let mut dst = VmmProc {
            child: Killed(child),
            sock,
            log,
        };
        let stop_renice = Arc::new(AtomicBool::new(false));
        let r1 = renice_others(src.child.0.id(), cli.engine_nice, stop_renice.clone());
        let r2 = renice_others(dst.child.0.id(), cli.engine_nice, stop_renice.clone());
        let stop = dir.join(format!("stream{k}.stop"));
        let mut stream = Killed(
            ns.exec(me)
                .args([
                    "stream",
                    "--dst",
                    &format!("{GUEST_IP}:7"),
                    "--rate",
                    "1000",
                ])
                .arg("--stop")
                .arg(&stop)
                .stdout(Stdio::piped())
                .spawn()?,
        );
        let mut out = std::io::BufReader::new(stream.0.stdout.take().context("stream stdout")?);
        let mut ready = String::new();
        out.read_line(&mut ready)?;
        std::thread::sleep(Duration::from_millis(1500));
        let asked = unix_now();
        let r = vmm_node::control::request(
            &src.sock,
            &json!({"cmd": "migrate", "addr": addr, "deadline_ms": 60_000,
                "precopy_nice": cli.precopy_nice, "verify_nice": cli.verify_nice,
                "vcpu_boost": !cli.no_vcpu_boost}),
        )
        .map_err(|e| anyhow::anyhow!("migrate request: {e}"))?;
        if r["ok"] != true {
            bail!("migration {k} failed: {r}");
        }
        wait_socket(&dst.sock, &mut dst.child.0)?;
        std::thread::sleep(Duration::from_millis(1500));
        std::fs::write(&stop, b"")?;
        let mut res = String::new();
        out.read_line(&mut res)?;
        let res: Value = serde_json::from_str(&res).context("stream result")?;
        std::fs::write(dir.join(format!("stream{k}.json")), res.to_string())?;
        stop_renice.store(true, Ordering::SeqCst);
        let _ = (r1.join(), r2.join());
        // The source exits once the target runs.
        let deadline = Instant::now() + Duration::from_secs(30);
        while src.child.0.try_wait()?.is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(dir.join(format!("migrate{k}.json")), r.to_string())?;
        let blackout = r["stats"]["blackout"]["total_us"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e3;
        // The blackout starts when the engine asks for the pause: the logged end of the
        // pause less the pause's duration.
        let pause_ms = r["stats"]["blackout"]["pause_us"]
            .as_f64()
            .unwrap_or(f64::NAN)
            / 1e3;
        let paused = last_logged(&src.log, "vm paused").map_or(f64::NAN, |x| x.0) - pause_ms / 1e3;
        let resumed = last_logged(&dst.log, "vm resumed").map_or(f64::NAN, |x| x.0);
        let carried = last_logged(&src.log, "nic frames carried")
            .and_then(|(_, l)| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("carried=")?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        let gaps: Vec<(f64, f64)> = res["gaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| Some((g[0].as_f64()?, g[1].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        // The switchover's gap: the silence around the pause (replies stop at the latest
        // there and resume from the target); 1 ms (the stream's period) if none is longer
        // than 2 ms.
        let gap = gaps
            .iter()
            .find(|(a, b)| *a <= resumed && *b >= paused)
            .copied();
        let gap_ms = gap.map_or(1.0, |(a, b)| (b - a) * 1e3);
        let longest_in = |from: f64, to: f64| {
            gaps.iter()
                .filter(|(a, b)| *a >= from && *b <= to && Some((*a, *b)) != gap)
                .map(|(a, b)| (b - a) * 1e3)
                .fold(1.0, f64::max)
        };
        // The same measure around a moment without any migration (0.5 s before it was
        // asked, as long as its blackout): what the machine's own noise alone scores.
        let sham_at = asked - 0.5;
        let sham_ms = gaps
            .iter()
            .find(|(a, b)| *a <= sham_at && *b >= sham_at - blackout / 1e3)
            .map_or(1.0, |(a, b)| (b - a) * 1e3);
        sham_met += usize::from(sham_ms <= blackout + 5.0);
        shams.push(sham_ms);
        let first = res["first_unix"].as_f64().unwrap_or(asked);
        let last = res["last_unix"].as_f64().unwrap_or(f64::MAX);
        let base = longest_in(first + 0.2, asked);
        let precopy = longest_in(asked, paused);
        let after = longest_in(resumed, last);
        let lost_in_gap = res["lost_sent_unix"].as_array().map_or(0, |a| {
            a.iter()
                .filter_map(Value::as_f64)
                .filter(|t| gap.is_some_and(|(a, b)| *t >= a - 0.05 && *t <= b))
                .count()
        });
        let lost = res["lost"].as_u64().unwrap_or(0);
        let ok = gap_ms <= blackout + 5.0;
        met += usize::from(ok);
        println!(
            "{:>3} {:>8.1} {:>6.1} {:>8.1} {:>6.2} {:>4} {:>5} {:>8} {:>8.1} {:>8} {:>6.1} {:>8.1} {:>8.1} {:>8.1} {:>7}",
            k,
            blackout,
            pause_ms,
            gap_ms,
            gap_ms / (blackout + 5.0),
            if ok { "met" } else { "no" },
            format!("{lost_in_gap}/{lost}"),
            gap.map_or("-".into(), |g| format!("{:.1}", (g.0 - paused) * 1e3)),
            (resumed - paused) * 1e3,
            gap.map_or("-".into(), |g| format!("{:.1}", (g.1 - resumed) * 1e3)),
            sham_ms,
            base,
            precopy,
            after,
            carried
        );
        let silence = gap_ms;
        blackouts.push(blackout);
        silences.push(silence);
        losts.push(res["lost"].as_f64().unwrap_or(f64::NAN));
        src = dst;
    }
    println!(
        "median: blackout {:.1} ms, switchover gap {:.1} ms, lost {:.0}; goal (gap <= blackout + 5 ms) met in {met} of {}; \
         sham gap (no migration) {:.1} ms, within blackout + 5 ms in {sham_met} of {}",
        median(&mut blackouts),
        median(&mut silences),
        median(&mut losts),
        cli.repeats,
        median(&mut shams),
        cli.repeats,
    );
    println!(
        "columns: gap = the silence around the switchover (last reply before the source's \
         pause .. first reply after the target's resume; 1 ms and '-' when replies never \
         stopped for more than 2 ms); ratio = gap / (blackout + 5 ms); \
         pause = of the blackout, the source's vCPU pause (kick and wait for the vCPUs); lost = \
         lost echoes sent in that gap / all lost; gap-pse = gap start - blackout start (the \
         engine asks for the pause); res-pse = target resume - blackout start (its first \
         announcement went out when the source's state arrived); \
         end-res = first reply after the gap - target resume; sham = the same measure \
         as gap around a moment 0.5 s before the migration (no migration; as long as its \
         blackout): what the machine's noise alone scores; base / precopy / after = the \
         longest other silence in the 1.3 s before the migration (same stream, no migration: \
         the machine's own noise) / during pre-copy / after the resume; carried = frames \
         taken from the source's TAP with the NIC state"
    );
    drop(src);
    Ok(())
}
