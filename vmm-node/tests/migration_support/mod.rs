//! Helpers for the migration tests: `vmm-node` source and target processes on loopback,
//! driven through the control socket; guest output stitched across hosts.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_node::control::request;
use vmm_node::guest_protocol::{heartbeats, Heartbeat, Workload};
use vmm_node::VmConfig;

/// What `vmm-node receive` prints on stdout once it listens (then the bound address).
pub const LISTEN_LINE_PREFIX: &str = "MIGRATION-LISTEN ";

/// The x86 CPU vendor this host does *not* have: a target faking it is a real vendor
/// mismatch on an AMD and on an Intel host alike.
pub fn other_cpu_vendor() -> &'static str {
    if vmm_node::facts::cpu_vendor() == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    }
}

pub struct Proc {
    pub child: Child,
    pub sock: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn req(&self, v: Value) -> Value {
        request(&self.sock, &v).unwrap_or_else(|e| panic!("control request {v} failed: {e}"))
    }

    pub fn ok(&self, v: Value) -> Value {
        let r = self.req(v.clone());
        assert_eq!(r["ok"], true, "{v} -> {r}");
        r
    }

    pub fn console(&self) -> String {
        let r = self.ok(json!({"cmd": "console", "tail_bytes": 1 << 20}));
        r["text"].as_str().unwrap().to_string()
    }

    pub fn status(&self) -> String {
        self.ok(json!({"cmd": "status"}))["status"]["state"]
            .as_str()
            .unwrap_or("?")
            .to_string()
    }

    /// Waits for the process to exit (after a migration away) and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            // Paces the poll (the loop waits for state, with a deadline).
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
        // Paces the poll (the loop waits for state, with a deadline).
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub use crate::common::require_kvm;

pub fn guest_config(vcpus: u8, memory_mib: u64, w: &Workload) -> VmConfig {
    let mut c = crate::common::test_guest_config(vcpus, memory_mib, w);
    c.name = "mig-test".into();
    c
}

/// The flags that make a process migrate over mutual TLS (the default of these tests).
pub use crate::common::migration_tls_args;

/// Starts a source running `cfg`, migrating over TLS.
pub fn spawn_source(dir: &Path, name: &str, cfg: &VmConfig) -> Proc {
    spawn_source_with(dir, name, cfg, &migration_tls_args(dir))
}

/// Starts a source running `cfg` with the migration flags `security` (TLS or
/// `--insecure-plaintext`).
pub fn spawn_source_with(dir: &Path, name: &str, cfg: &VmConfig, security: &[String]) -> Proc {
    require_kvm();
    let cfg_path = dir.join(format!("{name}.json"));
    std::fs::write(&cfg_path, serde_json::to_string(cfg).unwrap()).unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-node"))
        .args([
            "run",
            "--config",
            cfg_path.to_str().unwrap(),
            "--control",
            sock.to_str().unwrap(),
        ])
        .args(security)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm-node run");
    wait_socket(&sock, &mut child);
    Proc { child, sock }
}

/// Starts a target (`vmm-node receive`) on `ip:0`; returns it and its migration address.
/// It uses TLS unless `extra` holds `--insecure-plaintext`.
pub fn spawn_target(
    dir: &Path,
    name: &str,
    ip: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, SocketAddr) {
    require_kvm();
    let sock = dir.join(format!("{name}.sock"));
    let listen = format!("{ip}:0");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmm-node"));
    cmd.args([
        "receive",
        "--listen",
        &listen,
        "--control",
        sock.to_str().unwrap(),
    ])
    .args(extra)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if !extra.contains(&"--insecure-plaintext") {
        cmd.args(migration_tls_args(dir));
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn vmm-node receive");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix(LISTEN_LINE_PREFIX)
        .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
        .parse()
        .unwrap();
    (Proc { child, sock }, addr)
}

/// Waits until the target's control socket is up (the VM arrived).
pub fn wait_target_running(p: &mut Proc) {
    let sock = p.sock.clone();
    wait_socket(&sock, &mut p.child);
}

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
            panic!(
                "timed out waiting for heartbeats; console tail:\n{}",
                &text[text.len().saturating_sub(2000)..]
            );
        }
        // Paces the poll (the loop waits for state, with a deadline).
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sequence strictly consecutive, TSC time monotonic, checks ok.
pub fn assert_continuous(hb: &[Heartbeat], mem_checked: bool) {
    assert!(!hb.is_empty());
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
    for h in hb {
        assert_eq!(h.mem_errors, 0, "memory pattern error: {h:?}");
        if mem_checked {
            assert_ne!(h.mem, "bad", "memory pattern bad: {h:?}");
        }
    }
}

/// [`assert_continuous`] over a console text; on a gap, the panic message lists every
/// console line that is not a well-formed BOOT/HB line (a garbled heartbeat shows up there).
pub fn assert_continuous_text(text: &str, mem_checked: bool) -> Vec<Heartbeat> {
    let hb = heartbeats(text);
    if hb.windows(2).any(|w| w[1].seq != w[0].seq + 1) {
        let odd: Vec<&str> = text
            .lines()
            .filter(|l| {
                !l.starts_with("BOOT ") && vmm_node::guest_protocol::parse_line(l).is_none()
            })
            .collect();
        let seqs: Vec<u64> = hb.iter().map(|h| h.seq).collect();
        panic!("heartbeat gap/repeat: seqs {seqs:?}; other console lines: {odd:?}");
    }
    assert_continuous(&hb, mem_checked);
    hb
}

/// A migrated guest's full console text: the source's output up to switchover (returned by
/// `migrate`) followed by the target's output. A line the switchover split is carried in
/// the serial state, so the target's log starts with the whole line again: the source's
/// unfinished last line is left out here.
pub fn stitch(before: &str, after: &str) -> String {
    let whole = before.rfind('\n').map_or(0, |i| i + 1);
    format!("{}{after}", &before[..whole])
}

/// The heartbeats of [`stitch`]`(before, after)`.
pub fn stitched(before: &str, after: &str) -> Vec<Heartbeat> {
    heartbeats(&stitch(before, after))
}

/// Guest time advanced at least as much as host time between two observations, with
/// `slack_us` for observation latency (heartbeat period + polling).
pub fn assert_guest_time_kept(first: &Heartbeat, last: &Heartbeat, wall: Duration, slack_us: u64) {
    let guest_us = last.tsc_us - first.tsc_us;
    assert!(
        guest_us + slack_us >= wall.as_micros() as u64,
        "guest time advanced {guest_us} us while {wall:?} passed on the host"
    );
}

/// Runs `migrate` on `src` towards `addr`; returns the reply.
pub fn migrate(src: &Proc, addr: SocketAddr, extra: Value) -> Value {
    let mut req = json!({
        "cmd": "migrate",
        "addr": addr.to_string(),
        "max_downtime_ms": 100,
        "deadline_ms": 60_000
    });
    if let (Some(r), Some(e)) = (req.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            r.insert(k.clone(), v.clone());
        }
    }
    src.req(req)
}
