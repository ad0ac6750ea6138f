//! A network namespace per test for the VM network: it holds the bridge (with a host-side
//! address), the agents (started with `ip netns exec`, so their TAPs are created there),
//! and the probe that talks to the VMs. Nothing here touches an interface of the root
//! namespace or sends traffic off the machine. The test process itself stays in the root
//! namespace and reaches the agents' loopback addresses through sockets opened from a
//! thread that entered the namespace (a socket keeps the namespace it was created in).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The UDP/ICMP/ARP probe: vmm-node's (`vmm-node/tests/net_support/netprobe.py`), one copy.
pub const NETPROBE: &str = include_str!("../../vmm-node/tests/net_support/netprobe.py");

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (VM network tests need iproute2 and root)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop. Keep it alive longer than the cluster whose
/// agents run in it (declare it first).
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace with `lo` up.
    pub fn new(tag: &str) -> NetNs {
        let name = format!(
            "cnt{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
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

    /// A bridge `name` with `host_cidr` (e.g. `10.78.0.1/24`) on it, up.
    pub fn bridge(&self, name: &str, host_cidr: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["addr", "add", host_cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// Whether interface `name` exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", "dev", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// `ip netns exec NS prog`.
    pub fn exec(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(prog);
        c
    }

    /// The MTU of interface `name` in the namespace (`None`: no such interface).
    pub fn link_mtu(&self, name: &str) -> Option<u32> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", "dev", name])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut w = text.split_whitespace().skip_while(|x| *x != "mtu");
        w.nth(1)?.parse().ok()
    }

    /// The bridge port the FDB of `bridge` has for `mac` (lower case), if any.
    pub fn fdb_port(&self, bridge: &str, mac: &str) -> Option<String> {
        let out = run_ok(self.exec("bridge").args(["fdb", "show", "br", bridge]));
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some(mac)).then(|| {
                let mut w = l.split_whitespace().skip_while(|x| *x != "dev");
                w.nth(1).unwrap_or("").to_string()
            })
        })
    }

    /// Starts a long-running probe mode (`stream`, `capture`, `migwatch`) inside the
    /// namespace; returns once it printed READY.
    pub fn spawn_probe(&self, dir: &Path, args: &[&str]) -> Probe {
        let p = dir.join("netprobe.py");
        if !p.exists() {
            std::fs::write(&p, NETPROBE).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
        let mut child = self
            .exec("python3")
            .arg(&p)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the probe {args:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
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

    /// Runs a one-shot probe mode inside the namespace (`udp DST PORT SIZE COUNT TIMEOUT_S`,
    /// `arp ...`, see the probe's docstring); returns its JSON result.
    pub fn probe(&self, dir: &Path, args: &[&str]) -> Value {
        let p = dir.join("netprobe.py");
        if !p.exists() {
            std::fs::write(&p, NETPROBE).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        }
        let out = run_ok(self.exec("python3").arg(&p).args(args));
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or("");
        serde_json::from_str(last)
            .unwrap_or_else(|e| panic!("probe {args:?} printed {text:?}: {e}"))
    }

    /// The path of the namespace (for entering it).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// A TCP connection to `addr` made inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let path = self.path();
        let std_stream = tokio::task::spawn_blocking(move || {
            // A fresh thread enters the namespace, so no pooled thread is left in it.
            std::thread::spawn(move || -> std::io::Result<std::net::TcpStream> {
                let f = std::fs::File::open(&path)?;
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&f),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                let s =
                    std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .join()
            .map_err(|_| std::io::Error::other("namespace connect thread panicked"))?
        })
        .await
        .map_err(std::io::Error::other)??;
        tokio::net::TcpStream::from_std(std_stream)
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

/// A running probe: its stdout lines arrive on a channel. Killed on drop.
pub struct Probe {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Probe {
    /// Waits for a line matching `pred` (also among the lines already seen); panics with
    /// what was seen on timeout.
    pub fn wait_line(&mut self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        if let Some(l) = self.seen.iter().find(|l| pred(l)) {
            return l.clone();
        }
        let deadline = Instant::now() + timeout;
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
                    self.seen.iter().rev().take(20).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Creates `stop_file` and returns the probe's final JSON line.
    pub fn finish(mut self, stop_file: &Path) -> Value {
        let mut f = std::fs::File::create(stop_file)
            .unwrap_or_else(|e| panic!("create {}: {e}", stop_file.display()));
        let _ = f.flush();
        let line = self.wait_line(|l| l.starts_with('{'), Duration::from_secs(30));
        let _ = self.child.wait();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("probe printed {line:?}: {e}"))
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
