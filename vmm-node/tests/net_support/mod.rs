//! Helpers for the virtio-net tests: a network namespace per test (bridge, TAPs, a host
//! address on the bridge, all inside it), `vmm-node` processes started inside it, and the
//! Python probe (`netprobe.py`) run inside it. Nothing here touches the root namespace's
//! interfaces or sends traffic off the machine.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_node::control::request;

/// The line `vmm-node receive` prints once it listens (the binary's `LISTEN_LINE_PREFIX`).
const LISTEN_LINE_PREFIX: &str = "MIGRATION-LISTEN ";

/// The probe script, written into each test's directory.
pub const NETPROBE: &str = include_str!("netprobe.py");

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (these tests need iproute2 and root)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace that is deleted when dropped (also when the test fails). Declare
/// it before the processes that run inside it, so they are killed first.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace with `lo` up, unique to this process and test.
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "vnt{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            tag
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS args...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Output {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command run inside the namespace (`ip netns exec NS prog`).
    pub fn exec(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// Bridge `br0` with `host_cidr` (e.g. `10.77.0.1/24`) and `mtu`, up.
    pub fn bridge(&self, host_cidr: &str, mtu: u16) {
        let mtu = mtu.to_string();
        self.ip(&["link", "add", "br0", "mtu", &mtu, "type", "bridge"]);
        self.ip(&["addr", "add", host_cidr, "dev", "br0"]);
        self.ip(&["link", "set", "br0", "up"]);
    }

    /// TAP `name` on `br0` with `mtu`, up.
    pub fn tap(&self, name: &str, mtu: u16) {
        let mtu = mtu.to_string();
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "mtu", &mtu, "master", "br0", "up"]);
    }

    /// The bridge port `br0` forwards `mac` to, per its FDB (`None` if not learned).
    pub fn fdb_port(&self, mac: &str) -> Option<String> {
        let out = run_ok(self.exec("bridge").args(["fdb", "show", "br", "br0"]));
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(mac)).then(|| {
                let mut w = l.split_whitespace().skip_while(|x| *x != "dev");
                w.nth(1).unwrap_or("").to_string()
            })
        })
    }

    /// Run a one-shot probe mode; returns its JSON result.
    pub fn probe(&self, dir: &Path, args: &[&str]) -> Value {
        let out = run_ok(self.exec(python()).arg(probe_path(dir)).args(args));
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or("");
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("probe {args:?} printed {text:?}: {e}"))
    }

    /// Start a long-running probe mode (`stream`, `capture`); returns once it printed READY.
    pub fn spawn_probe(&self, dir: &Path, args: &[&str]) -> Probe {
        let mut child = self
            .exec(python())
            .arg(probe_path(dir))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the probe");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = Probe {
            child,
            lines: rx,
            seen: Vec::new(),
        };
        p.wait_line(|l| l == "READY", Duration::from_secs(20));
        p
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let ok = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("warning: could not delete network namespace {}", self.name);
        }
    }
}

/// The Python interpreter (Debian's, else the first on `PATH`).
pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn probe_path(dir: &Path) -> PathBuf {
    let p = dir.join("netprobe.py");
    if !p.exists() {
        std::fs::write(&p, NETPROBE).unwrap();
    }
    p
}

/// A running probe: its stdout lines arrive on a channel.
pub struct Probe {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Probe {
    /// Wait for a line matching `pred`; panics with what was seen on timeout.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "probe: no matching line within {timeout:?}; saw {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Create `stop_file` and return the probe's final JSON line.
    pub fn finish(mut self, stop_file: &Path) -> Value {
        std::fs::File::create(stop_file).unwrap().flush().unwrap();
        let line = self.wait_line(|l| l.starts_with('{'), Duration::from_secs(30));
        let _ = self.child.wait();
        serde_json::from_str(&line).unwrap()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `vmm-node` process inside a namespace, with its control socket.
pub struct Vmm {
    pub child: Child,
    pub sock: PathBuf,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Vmm {
    pub fn req(&self, v: Value) -> Value {
        request(&self.sock, &v).unwrap_or_else(|e| panic!("control request {v} failed: {e}"))
    }

    pub fn ok(&self, v: Value) -> Value {
        let r = self.req(v.clone());
        assert_eq!(r["ok"], true, "{v} -> {r}");
        r
    }

    pub fn console(&self) -> String {
        self.ok(json!({"cmd": "console", "tail_bytes": 1 << 20}))["text"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Wait until the console holds a complete line (the guest may be writing the last one)
    /// for which `pred` is true; returns the latest such line.
    pub fn wait_console(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console();
            let complete = text.rfind('\n').map_or("", |i| &text[..i]);
            if let Some(l) = complete.lines().filter(|l| pred(l)).last() {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; console tail:\n{}",
                &text[text.len().saturating_sub(3000)..]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "vmm-node did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn wait_socket(p: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while request(p, &json!({"cmd": "status"})).is_err() {
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "vmm-node exited with {s} before its control socket {} came up",
                p.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "control socket {} never came up",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vmm-node ARGS --control DIR/NAME.sock` inside `ns`; returns once the socket answers.
pub fn spawn_vmm(ns: &NetNs, dir: &Path, name: &str, args: &[&str]) -> Vmm {
    crate::common::require_kvm();
    let sock = dir.join(format!("{name}.sock"));
    let mut child = ns
        .exec(env!("CARGO_BIN_EXE_vmm-node"))
        .args(args)
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm-node");
    wait_socket(&sock, &mut child);
    Vmm { child, sock }
}

/// `vmm-node run` of `cfg` inside `ns`.
pub fn run_vm(ns: &NetNs, dir: &Path, name: &str, cfg: &vmm_node::VmConfig) -> Vmm {
    let cfg_path = dir.join(format!("{name}.json"));
    std::fs::write(&cfg_path, serde_json::to_string(cfg).unwrap()).unwrap();
    let mut args = vec![
        "run".to_owned(),
        "--config".into(),
        cfg_path.to_str().unwrap().into(),
    ];
    args.extend(crate::common::migration_tls_args(dir));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    spawn_vmm(ns, dir, name, &args)
}

/// `vmm-node receive --listen 127.0.0.1:0 EXTRA...` inside `ns`; returns it (its control
/// socket comes up once a VM arrived) and its migration address.
pub fn spawn_target(ns: &NetNs, dir: &Path, name: &str, extra: &[&str]) -> (Vmm, SocketAddr) {
    crate::common::require_kvm();
    let sock = dir.join(format!("{name}.sock"));
    let mut child = ns
        .exec(env!("CARGO_BIN_EXE_vmm-node"))
        .args(["receive", "--listen", "127.0.0.1:0", "--control"])
        .arg(&sock)
        .args(extra)
        .args(crate::common::migration_tls_args(dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm-node receive");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix(LISTEN_LINE_PREFIX)
        .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
        .parse()
        .unwrap();
    (Vmm { child, sock }, addr)
}

/// Wait until a received VM's control socket answers.
pub fn wait_target_running(t: &mut Vmm) {
    let sock = t.sock.clone();
    wait_socket(&sock, &mut t.child);
}

/// `vmm-node ARGS` inside `ns` that must fail; returns its stderr.
pub fn run_failing(ns: &NetNs, args: &[&str]) -> String {
    let out = ns
        .exec(env!("CARGO_BIN_EXE_vmm-node"))
        .args(args)
        .stdout(Stdio::null())
        .output()
        .expect("spawn vmm-node");
    assert!(
        !out.status.success(),
        "vmm-node {args:?} succeeded but should have failed"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A heartbeat field of a console line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}
