//! virtio-net benchmark: host ↔ guest UDP echo packets/s and throughput with 1500- and
//! 9000-byte IP packets, each next to the same traffic between two network namespaces over
//! a veth pair, measured in the same run.
//!
//! ```text
//! cargo build --release -p vmm-node --bins && sudo target/release/net-bench [--seconds 3] [--window 16]
//! ```
//!
//! Needs root and KVM. Everything happens in network namespaces the program creates and
//! deletes again (`netbench<pid>`: bridge, TAP, host address; `netbench<pid>a`/`b`: the
//! veth pair); no address is added to the root namespace, nothing leaves the machine. The
//! guest is the test guest's `net` workload (polling driver at CPL3, UDP echo on port 7)
//! run by `vmm-node run` inside the namespace; the client is this program re-run inside
//! the namespace (`client` subcommand), keeping `--window` echoes in flight. The veth
//! baseline's echo server is this program too (`echo-server`).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    // The VM: bridge + TAP in one namespace.
    let ns = Ns::new(format!("netbench{pid}"))?;
    let mtu = MTU.to_string();
    ns.ip(&["link", "add", "br0", "mtu", &mtu, "type", "bridge"])?;
    ns.ip(&["addr", "add", HOST_CIDR, "dev", "br0"])?;
    ns.ip(&["link", "set", "br0", "up"])?;
    ns.ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"])?;
    ns.ip(&["link", "set", "tap0", "mtu", &mtu, "master", "br0", "up"])?;
    let mut cfg = vmm_node::VmConfig::new(1, 64, vmm_node::test_guest::PATH);
    cfg.name = "net-bench".into();
    cfg.cmdline = format!(
        "{} {}",
        vmm_node::guest_protocol::Workload::new(vmm_node::guest_protocol::WorkloadKind::Net)
            .cmdline(),
        vmm_node::guest_protocol::net_cmdline(GUEST_IP.parse()?)
    );
    cfg.nics = vec![vmm_node::config::NicConfig {
        mtu: MTU,
        ..vmm_node::config::NicConfig::new("tap0", MAC)
    }];
    let cfg_path = dir.path().join("vm.json");
    std::fs::write(&cfg_path, serde_json::to_string(&cfg)?)?;
    let sock = dir.path().join("vm.sock");
    let mut vmm = Killed(
        ns.exec(&vmm_bin)
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
    let _server = Killed(b.exec(&me).args(["echo-server", "--port", "7"]).spawn()?);
    std::thread::sleep(Duration::from_millis(200)); // the server binds; then warm both paths
    measure(&a, &me, VETH_B_IP, 64, 0.3, cli.window)?;
    measure(&ns, &me, GUEST_IP, 64, 0.3, cli.window)?;

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
            let r = measure(n, &me, dst, size, cli.seconds, cli.window)?;
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
