//! The control socket answers every request with a JSON line, rejects bad input clearly,
//! and streams the console.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use vmm_node::control::{self, request, REQUEST_BYTES_MAX};
use vmm_node::guest_protocol::{Workload, WorkloadKind};

#[test]
fn control_commands_bad_requests_and_console_stream() {
    let vm = Arc::new(start_test_guest(1, 16, &Workload::new(WorkloadKind::Idle)));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let ext: control::Extension =
        Arc::new(|req, _vm| (req["cmd"] == "ping").then(|| json!({"ok": true, "pong": true})));
    control::serve(&sock, vm.clone(), vec![ext]).unwrap();

    let st = request(&sock, &json!({"cmd": "status"})).unwrap();
    assert_eq!(st["ok"], true);
    assert_eq!(st["status"]["state"], "running");
    assert_eq!(st["config"]["vcpus"], 1);

    // Extension command.
    assert_eq!(
        request(&sock, &json!({"cmd": "ping"})).unwrap()["pong"],
        true
    );
    // Unknown command, unknown field, wrong type: clear errors.
    let r = request(&sock, &json!({"cmd": "frobnicate"})).unwrap();
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("frobnicate"), "{r}");
    let r = request(&sock, &json!({"cmd": "pause", "bogus": 1})).unwrap();
    assert!(r["error"].as_str().unwrap().contains("bogus"), "{r}");
    let r = request(&sock, &json!({"cmd": "snapshot", "dir": 5})).unwrap();
    assert_eq!(r["ok"], false, "{r}");

    // Not JSON, then an oversized line: error responses, server keeps running.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"this is not json\n").unwrap();
    let mut rd = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    rd.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":false"), "{line}");
    let big = vec![b'x'; REQUEST_BYTES_MAX as usize + 10];
    let _ = s.write_all(&big);
    let _ = s.write_all(b"\n");
    line.clear();
    rd.read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");

    // Pause / resume through the socket.
    assert_eq!(
        request(&sock, &json!({"cmd": "pause"})).unwrap()["ok"],
        true
    );
    assert_eq!(
        request(&sock, &json!({"cmd": "status"})).unwrap()["status"]["state"],
        "paused"
    );
    assert_eq!(
        request(&sock, &json!({"cmd": "resume"})).unwrap()["ok"],
        true
    );

    // Live console stream delivers heartbeats as they are printed.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"cmd\":\"console\",\"stream\":true,\"tail_bytes\":0}\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rd = BufReader::new(s);
    let mut first = String::new();
    rd.read_line(&mut first).unwrap();
    assert!(first.contains("\"ok\":true"), "{first}");
    let mut hb = 0;
    while hb < 2 {
        let mut l = String::new();
        rd.read_line(&mut l).unwrap();
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["line"].as_str().unwrap_or("").starts_with("HB ") {
            hb += 1;
        }
    }

    assert_eq!(request(&sock, &json!({"cmd": "stop"})).unwrap()["ok"], true);
    assert!(matches!(vm.status(), vmm_node::VmStatus::Stopped { .. }));
}
