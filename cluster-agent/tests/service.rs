//! The agent as a systemd service, with real agent processes: its log written to a file
//! carries no ANSI escape codes, `log_format = "json"` gives one JSON object per line (the
//! VM worker's log too), a bad format is refused naming the key; the sd_notify protocol
//! (`READY=1` once it serves, `STATUS=`, `WATCHDOG=1` only while the process runs,
//! `STOPPING=1` on SIGTERM) is read from a Unix datagram socket the test binds as
//! `NOTIFY_SOCKET`; and `systemd-analyze verify` accepts the shipped unit.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cluster_tests::{Cluster, Options, WAIT};
use tokio::net::UnixDatagram;

/// Every non-empty line of `text` as a JSON object with string `level`, `target` and
/// `message`; panics naming the first line that is not.
fn json_lines(text: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("not a JSON object: {l:?}"))
                .clone();
            for key in ["level", "target", "message", "timestamp"] {
                assert!(
                    obj.get(key).is_some_and(serde_json::Value::is_string),
                    "no string {key:?} in {l:?}"
                );
            }
            obj
        })
        .collect()
}

fn assert_no_escape(what: &str, bytes: &[u8]) {
    if let Some(i) = bytes.iter().position(|b| *b == 0x1b) {
        let from = i.saturating_sub(80);
        panic!(
            "{what} has an ESC byte at {i}: {:?}",
            String::from_utf8_lossy(&bytes[from..(i + 40).min(bytes.len())])
        );
    }
}

/// Run the agent binary with `args` until it exits (at most `WAIT`); (success, stderr).
fn run_agent(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let bin = cluster_tests::locate_binary("cluster-agent", "cluster-agent")
        .unwrap_or_else(|e| panic!("harness: {e}"));
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start the agent: {e}"));
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() {
        if start.elapsed() > WAIT {
            let _ = child.kill();
            panic!("the agent with {args:?} kept running");
        }
        // Paces the poll for the exit.
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("collect the agent's output: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn logs_to_a_file_are_plain_text_or_json_lines() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.add_node(1);
    let text = c.check(r);
    let r = c.add_node_with(2, "log_format = \"json\"\n");
    let json = c.check(r);

    // Text: the log (stderr to a file, as under systemd) has no escape codes, though the
    // agent logged its start, an init and a stop.
    let r = c.start(1).await;
    c.check(r);
    c.check(c.init(1).await);
    c.check(c.wait_leader(&[1], WAIT).await);
    let r = c.stop(1);
    assert!(c.check(r), "node 1 did not stop cleanly");
    let bytes = std::fs::read(&text.log_path).unwrap_or_else(|e| panic!("read log: {e}"));
    let log = String::from_utf8_lossy(&bytes);
    assert!(log.contains("agent serving"), "text log: {log}");
    assert!(log.contains("agent stopped"), "text log: {log}");
    assert_no_escape("the text log", &bytes);

    // JSON: every line is an object with level, target and message; the lifecycle events
    // are there with their structured fields.
    let r = c.start(2).await;
    c.check(r);
    c.check(c.init(2).await);
    c.check(c.wait_leader(&[2], WAIT).await);
    let r = c.stop(2);
    assert!(c.check(r), "node 2 did not stop cleanly");
    let bytes = std::fs::read(&json.log_path).unwrap_or_else(|e| panic!("read log: {e}"));
    assert_no_escape("the JSON log", &bytes);
    let lines = json_lines(&String::from_utf8_lossy(&bytes));
    let serving = lines
        .iter()
        .find(|l| l["message"] == "agent serving")
        .unwrap_or_else(|| panic!("no \"agent serving\" line in {lines:?}"));
    assert_eq!(serving["node_id"], 2, "{serving:?}");
    assert_eq!(serving["level"], "INFO", "{serving:?}");
    assert!(
        lines.iter().any(|l| l["message"] == "agent stopped"),
        "{lines:?}"
    );

    // A VM worker logs in the format it is given (the agent passes its own): here one
    // that fails at once on an empty directory.
    let dir = c.dir().join("empty-worker");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let (ok, err) = run_agent(&[
        "--log-format".as_ref(),
        "json".as_ref(),
        "vm-worker".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
    ]);
    assert!(!ok, "a worker without start.json must fail: {err}");
    assert_no_escape("the worker's log", err.as_bytes());
    let lines = json_lines(&err);
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "vm worker failed" && l["level"] == "ERROR"),
        "{lines:?}"
    );

    // A bad format is refused before anything starts, naming the key: in the config file
    // and as a flag.
    let r = c.add_node_with(3, "log_format = \"xml\"\n");
    let bad = c.check(r);
    let (ok, out) = c.check(c.run_to_exit(3, WAIT));
    assert!(!ok, "log_format = \"xml\" accepted: {out}");
    assert!(
        out.contains("log_format") && out.contains("xml"),
        "the refusal must name the key and the value: {out}"
    );
    let (ok, out) = run_agent(&[
        "--config".as_ref(),
        text.config_path.as_os_str(),
        "--log-format".as_ref(),
        "yaml".as_ref(),
    ]);
    assert!(!ok, "--log-format yaml accepted: {out}");
    assert!(
        out.contains("log_format") && out.contains("yaml"),
        "the refusal must name the key and the value: {out}"
    );
    assert!(
        !bad.data_dir.exists(),
        "a refused config created its data dir"
    );
}

/// The next datagram on `sock` within `limit`, as text; `None` when none came.
async fn next_message(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(limit, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Ok(Err(e)) => panic!("read the notify socket: {e}"),
        Err(_) => None,
    }
}

/// Read datagrams until one has a line for which `pred` holds (within `WAIT`); returns
/// it and every datagram read before it.
async fn wait_message(
    sock: &UnixDatagram,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + WAIT;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_message(sock, left).await {
            Some(m) if m.lines().any(&pred) => return (m, before),
            Some(m) => before.push(m),
            None => panic!("no {what} within {WAIT:?}; got {before:?}"),
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap_or_else(|e| panic!("kill -{sig}: {e}"));
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Whether process `pid` is stopped (state T in /proc/PID/stat).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// `WATCHDOG_USEC` the test gives the agent: it pings every 200 ms.
const WATCHDOG_USEC: u64 = 400_000;

#[tokio::test]
async fn notifies_systemd_ready_status_watchdog_and_stopping() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.add_node(1);
    c.check(r);
    let path = c.dir().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind {path:?}: {e}"));
    let path_s = path
        .to_str()
        .unwrap_or_else(|| panic!("{path:?} not UTF-8"));
    let r = c.set_env(1, "NOTIFY_SOCKET", path_s);
    c.check(r);
    let r = c.set_env(1, "WATCHDOG_USEC", &WATCHDOG_USEC.to_string());
    c.check(r);
    let r = c.spawn(1);
    c.check(r);

    // READY=1 once it serves: the management port answers at that moment, and a fresh
    // node says it waits for a cluster.
    let (ready, before) = wait_message(&sock, "READY=1", |l| l == "READY=1").await;
    assert!(
        !before.iter().any(|m| m.contains("WATCHDOG=1")),
        "watchdog pings before READY: {before:?}"
    );
    assert!(
        ready
            .lines()
            .any(|l| l == "STATUS=waiting for a cluster (init or join)"),
        "{ready:?}"
    );
    c.check(c.status(1).await);

    // The status follows the cluster: after init it names the leader.
    c.check(c.init(1).await);
    wait_message(&sock, "STATUS naming leader 1", |l| {
        l == "STATUS=serving, leader 1"
    })
    .await;

    // WATCHDOG=1 keeps coming while the agent runs.
    for _ in 0..3 {
        wait_message(&sock, "WATCHDOG=1", |l| l == "WATCHDOG=1").await;
    }

    // A stopped agent sends nothing. Stop it, wait (on the kernel's word, not a sleep)
    // until it is stopped, then drain what it sent before. The absence is then observed
    // for three full WATCHDOG_USEC (six ping periods): a negative assertion bounded by
    // the test's own interval, not a guess at how long something takes.
    let pid = c.pid(1).unwrap_or_else(|| panic!("node 1 has no process"));
    signal(pid, "STOP");
    let since = Instant::now();
    while !stopped(pid) {
        assert!(since.elapsed() < WAIT, "node 1 never stopped");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    while next_message(&sock, Duration::ZERO).await.is_some() {}
    let quiet = Duration::from_micros(3 * WATCHDOG_USEC);
    let end = Instant::now() + quiet;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Some(m) = next_message(&sock, left).await {
            panic!("a stopped agent sent {m:?}");
        }
    }
    signal(pid, "CONT");
    wait_message(&sock, "WATCHDOG=1 after SIGCONT", |l| l == "WATCHDOG=1").await;

    // SIGTERM: STOPPING=1, and the agent exits cleanly.
    let r = c.stop(1);
    assert!(c.check(r), "node 1 did not stop cleanly");
    wait_message(&sock, "STOPPING=1", |l| l == "STOPPING=1").await;
}

#[test]
fn the_shipped_unit_passes_systemd_analyze_verify() {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster-agent.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("read unit: {e}"));
    for line in [
        "Type=notify",
        "KillMode=process",
        "ProtectSystem=strict",
        "NoNewPrivileges=true",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line} missing from {unit:?}"
        );
    }
    assert!(text.lines().any(|l| l.starts_with("WatchdogSec=")));
    // verify also checks that ExecStart's binary exists and is executable: a copy of the
    // unit names the binary this test run built.
    let bin = cluster_tests::locate_binary("cluster-agent", "cluster-agent")
        .unwrap_or_else(|e| panic!("harness: {e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let copy = dir.path().join("cluster-agent.service");
    let replaced = text.replace("/usr/bin/cluster-agent", &bin.display().to_string());
    assert_ne!(
        replaced, text,
        "ExecStart no longer names /usr/bin/cluster-agent (where the Debian package puts it)"
    );
    std::fs::write(&copy, replaced).unwrap_or_else(|e| panic!("write unit: {e}"));
    let Ok(out) = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
    else {
        eprintln!("systemd-analyze is not installed: unit not verified");
        return;
    };
    assert!(
        out.status.success() && out.stderr.iter().all(u8::is_ascii_whitespace),
        "systemd-analyze verify: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
}
