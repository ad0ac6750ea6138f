//! Helpers shared by the clusterctl process tests.
// Each test binary uses a subset of them.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use cluster_tests::Cluster;

/// Run clusterctl against `endpoint` (ignoring any `CLUSTERCTL_ENDPOINT` of the caller).
pub fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clusterctl"))
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

/// A clusterctl run that the agent must refuse (exit 1) with `needle` on stderr.
pub fn refused(ep: &str, args: &[&str], needle: &str) {
    let o = ctl(ep, args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "clusterctl {args:?}: {out}{err}");
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

/// `vm create NAME` (64 MiB, 8 MiB working set) and wait up to 30 s until it runs;
/// returns its owner.
pub fn create_running(ep: &str, name: &str) -> u64 {
    let o = ctl(
        ep,
        &["vm", "create", name, "--memory-mib", "64", "--wss-mib", "8"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let start = Instant::now();
    loop {
        let v = json(ep, &["vm", "show", name]);
        if v["runtime"] == "running" {
            break v["owner_id"].as_u64().unwrap_or(0);
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never ran: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Start `clusterctl vm console NAME --follow` against `endpoint`; its lines arrive on the
/// receiver as they are printed (stderr lines prefixed with `ERR `). Kill the child when done.
pub fn follow_console(endpoint: &str, name: &str) -> (Child, Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clusterctl"))
        .args(["--endpoint", endpoint, "vm", "console", name, "--follow"])
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
