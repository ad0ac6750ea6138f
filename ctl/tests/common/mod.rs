//! Helpers shared by the clusterctl process tests.
// Each test binary uses a subset of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};

use cluster_tests::{Cluster, Wait, WAIT};

/// Run clusterctl against `endpoint` (ignoring any `CLUSTERCTL_ENDPOINT` of the caller).
pub fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .envs(cluster_tests::pki::pki().admin_env())
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .env_remove("CLUSTERCTL_ENDPOINT")
        .output()
        .unwrap_or_else(|e| panic!("cannot run clusterctl: {e}"))
}

/// stdout and stderr of a finished clusterctl run.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The management address of node `id`, as clusterctl's `--endpoint`.
pub fn endpoint(c: &Cluster, id: u64) -> String {
    c.spec(id)
        .map(|s| s.mgmt_addr.to_string())
        .unwrap_or_default()
}

/// stdout of a clusterctl run that must succeed.
pub fn ok(ep: &str, args: &[&str]) -> String {
    let o = ctl(ep, args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "clusterctl {args:?} failed: {err}{out}");
    out
}

/// A clusterctl run that the agent must refuse (exit 4) with `needle` on stderr.
pub fn refused(ep: &str, args: &[&str], needle: &str) {
    let o = ctl(ep, args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(4), "clusterctl {args:?}: {out}{err}");
    assert!(
        err.contains(needle),
        "clusterctl {args:?}: {err:?} lacks {needle:?}"
    );
}

/// The `-o json` output of a clusterctl run that must succeed.
pub fn json(ep: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let out = ok(ep, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The `-o json` output of `args`, or why there is none (for waits).
pub fn try_json(ep: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    let o = ctl(ep, &all);
    let (out, err) = text(&o);
    if !o.status.success() {
        return Err(format!("clusterctl {args:?}: {err}"));
    }
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

/// The `-o json` output of `args` once `pred` holds for it (the harness wait: one
/// deadline; on timeout the last output seen and the agents' logs).
pub fn wait_json(
    c: &Cluster,
    ep: &str,
    args: &[&str],
    what: &str,
    pred: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let r = Wait::new(WAIT).until_blocking(what, || try_json(ep, args), pred);
    c.check(r)
}

/// `vm create NAME` (64 MiB, 8 MiB working set) and wait until it runs; returns its
/// owner.
pub fn create_running(c: &Cluster, ep: &str, name: &str) -> u64 {
    let o = ctl(
        ep,
        &["vm", "create", name, "--memory-mib", "64", "--wss-mib", "8"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    wait_json(c, ep, &["vm", "show", name], "running", |v| {
        v["runtime"] == "running"
    })["owner_id"]
        .as_u64()
        .unwrap_or(0)
}

/// Start `clusterctl vm console NAME --follow` against `endpoint`; its lines arrive on the
/// receiver as they are printed (stderr lines prefixed with `ERR `). Kill the child when done.
pub fn follow_console(endpoint: &str, name: &str) -> (Child, Receiver<String>) {
    spawn_lines(endpoint, &["vm", "console", name, "--follow"])
}

/// Start `clusterctl ARGS` against `endpoint`; its lines arrive on the receiver as they
/// are printed (stderr lines prefixed with `ERR `). Kill the child when done.
pub fn spawn_lines(endpoint: &str, args: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .envs(cluster_tests::pki::pki().admin_env())
        .args(["--endpoint", endpoint])
        .args(args)
        .env_remove("CLUSTERCTL_ENDPOINT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn clusterctl: {e}"));
    let (tx, rx) = channel::<String>();
    let forward = |r: Option<Box<dyn std::io::Read + Send>>, prefix: &'static str| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in r
                .map(BufReader::new)
                .into_iter()
                .flat_map(|r| r.lines())
                .map_while(Result::ok)
            {
                let _ = tx.send(format!("{prefix}{l}"));
            }
        });
    };
    forward(child.stderr.take().map(|e| Box::new(e) as _), "ERR ");
    forward(child.stdout.take().map(|o| Box::new(o) as _), "");
    (child, rx)
}

/// Lines from a [`spawn_lines`] receiver until one satisfies `pred` (returned last),
/// within [`WAIT`]; panics with the lines seen.
pub fn recv_until(rx: &Receiver<String>, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = pred(&l);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!("{what} not seen in the output: {seen:?}")
}
