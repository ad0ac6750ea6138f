//! Failures, cancels and refusals: whatever goes wrong before switchover, the VM keeps
//! running on the source with nothing lost; the target never crashes on bad input.

mod common;
mod migration_support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration_support::*;
use serde_json::json;
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};
use vmm_node::migration::protocol::{self, Command};

fn mem_workload() -> Workload {
    Workload {
        wss_mib: 16,
        ..Workload::new(WorkloadKind::Mem)
    }
}

fn start_mem_source(dir: &std::path::Path) -> Proc {
    let src = spawn_source(dir, "src", &guest_config(2, 64, &mem_workload()));
    wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| h.len() >= 2 && h.last().is_some_and(|h| h.mem == "ok"),
    );
    src
}

/// The source still runs the guest: new heartbeats, continuous, memory pattern ok.
fn assert_still_running_on_source(src: &Proc, what: &str) {
    assert_eq!(
        src.status(),
        "running",
        "{what}: VM not running on the source"
    );
    let n = heartbeats(&src.console()).len();
    let hb = wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| h.len() >= n + 3,
    );
    assert_continuous(&hb, true);
    let last = hb.last().unwrap();
    assert_eq!(last.mem, "ok", "{what}: {last:?}");
    let st = src.ok(json!({"cmd": "migrate-status"}));
    assert_eq!(st["state"], "failed", "{what}: {st}");
}

/// The target at `addr` still runs and answers: a session in protocol version 7 (over TLS
/// with the test CA) gets its refusal naming both versions (a live answer, not a wait for
/// a crash).
fn assert_serving(dir: &std::path::Path, target: &mut Proc, addr: std::net::SocketAddr) {
    use vmm_node::migration::{conn::Conn, tls::Transport};
    let tls = Transport::Tls(common::migration_tls(dir));
    let t = Duration::from_secs(10);
    let mut s = Conn::connect(&tls, None, addr, t, t).unwrap();
    protocol::write_frame_versioned(&mut s, 7, Command::Hello, b"").unwrap();
    let e = protocol::read_frame(&mut s).unwrap_err().to_string();
    assert!(e.contains("version 7") && e.contains("version 2"), "{e}");
    assert!(
        target.child.try_wait().unwrap().is_none(),
        "the target exited"
    );
}

#[test]
fn target_killed_at_each_phase_leaves_vm_running_on_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = start_mem_source(dir.path());
    for phase in ["setup", "precopy", "stopcopy", "before-resume"] {
        let (mut tgt, addr) = spawn_target(
            dir.path(),
            &format!("t-{phase}"),
            "127.0.2.2",
            &[],
            &[("VMM_NODE_MIGRATION_FAILPOINT", phase)],
        );
        let r = migrate(&src, addr, json!({}));
        assert_eq!(r["ok"], false, "{phase}: migration must fail: {r}");
        let status = tgt
            .wait_exit(Duration::from_secs(10))
            .expect("target must have died");
        assert!(!status.success(), "{phase}: target exit {status}");
        eprintln!("target killed at {phase}: source error: {}", r["error"]);
        assert_still_running_on_source(&src, phase);
    }
    // And the VM can still migrate afterwards.
    let (mut tgt, addr) = spawn_target(dir.path(), "t-ok", "127.0.2.2", &[], &[]);
    let r = migrate(&src, addr, json!({}));
    assert_eq!(r["ok"], true, "{r}");
    wait_target_running(&mut tgt);
    let all = {
        wait_heartbeats(|| tgt.console(), Duration::from_secs(30), |h| h.len() >= 2);
        stitched(r["console"].as_str().unwrap(), &tgt.console())
    };
    assert_continuous(&all, true);
}

/// Forwards every connection to `to`, and cuts all of them once `limit` bytes went from
/// the source to the target.
fn cutting_proxy(to: std::net::SocketAddr, limit: u64) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.2.3:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let all: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(a) = c else { return };
            let Ok(b) = TcpStream::connect(to) else {
                return;
            };
            all.lock()
                .unwrap()
                .extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (sent, cut2, all2) = (sent.clone(), cut.clone(), all.clone());
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > limit
                        && !cut2.swap(true, Ordering::SeqCst)
                    {
                        for s in all2.lock().unwrap().iter() {
                            let _ = s.shutdown(Shutdown::Both);
                        }
                        break;
                    }
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut b2, &mut a2);
            });
        }
    });
    addr
}

#[test]
fn connection_cut_mid_stream_leaves_vm_running_on_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = start_mem_source(dir.path());
    let (tgt, addr) = spawn_target(dir.path(), "tgt", "127.0.2.2", &[], &[]);
    let proxy = cutting_proxy(addr, 4 << 20);
    let r = migrate(&src, proxy, json!({}));
    assert_eq!(r["ok"], false, "{r}");
    eprintln!("connection cut: source error: {}", r["error"]);
    assert_still_running_on_source(&src, "connection cut");
    drop(tgt);
}

#[test]
fn cancel_during_precopy_leaves_vm_running_on_source() {
    let dir = tempfile::tempdir().unwrap();
    let w = Workload {
        wss_mib: 16,
        rate_mbps: 400,
        ..Workload::new(WorkloadKind::Dirty)
    };
    let src = spawn_source(dir.path(), "src", &guest_config(2, 64, &w));
    wait_heartbeats(|| src.console(), Duration::from_secs(30), |h| h.len() >= 2);
    let (_tgt, addr) = spawn_target(dir.path(), "tgt", "127.0.2.2", &[], &[]);
    let sock = src.sock.clone();
    let canceller = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = vmm_node::control::request(&sock, &json!({"cmd": "migrate-status"})).unwrap();
            if st["state"] == "running"
                && st["phase"] == "pre-copy"
                && st["progress"]["bytes_sent"].as_u64() > Some(0)
            {
                let r =
                    vmm_node::control::request(&sock, &json!({"cmd": "migrate", "cancel": true}))
                        .unwrap();
                return (st, r);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pre-copy never sent guest memory: {st}"
            );
            // Paces the status poll.
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    // A 1 MiB/s cap: the 16 MiB working set alone keeps round 0 going for ~16 s, and a
    // 1 ms blackout budget (1 KiB at that rate) is never met while the guest dirties
    // memory: pre-copy goes on until cancelled, on any machine.
    let r = migrate(
        &src,
        addr,
        json!({"max_downtime_ms": 1, "throttle": false, "bandwidth_bytes_per_s_max": 1 << 20}),
    );
    let (st, cr) = canceller.join().unwrap();
    assert_eq!(cr["ok"], true, "{cr}");
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
    assert!(
        st["prediction"].is_object(),
        "prediction reported during pre-copy: {st}"
    );
    assert_eq!(src.status(), "running");
    let n = heartbeats(&src.console()).len();
    let hb = wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| h.len() >= n + 3,
    );
    assert_continuous(&hb, false);
}

#[test]
fn refusals_are_explained_and_the_target_survives_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let src = start_mem_source(dir.path());

    // Another CPU vendor: the one this host does not have.
    let other = other_cpu_vendor();
    let (mut t1, a1) = spawn_target(
        dir.path(),
        "t1",
        "127.0.2.2",
        &["--fake-cpu-vendor", other],
        &[],
    );
    let r = migrate(&src, a1, json!({}));
    assert_eq!(r["ok"], false);
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("refused") && e.contains(other), "{e}");
    assert_serving(dir.path(), &mut t1, a1);

    // Not enough memory on the target.
    let (_t2, a2) = spawn_target(
        dir.path(),
        "t2",
        "127.0.2.2",
        &["--fake-memory-available-mib", "16"],
        &[],
    );
    let r = migrate(&src, a2, json!({}));
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("refused") && e.contains("memory"), "{e}");

    // A target on t1's address also refuses garbage, and survives.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xffu8; 4096][..],
        b"VMIG\x01\x00",
    ] {
        let mut s = TcpStream::connect(a1).unwrap();
        let _ = s.write_all(garbage);
        let _ = s.shutdown(Shutdown::Write);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    assert_serving(dir.path(), &mut t1, a1);
    assert_still_running_on_source(&src, "after refusals");
}

#[test]
fn guest_dirtying_faster_than_allowed_converges_with_throttle_or_stays_on_source() {
    let dir = tempfile::tempdir().unwrap();
    let w = Workload {
        wss_mib: 32,
        rate_mbps: 2000,
        ..Workload::new(WorkloadKind::Dirty)
    };
    let src = spawn_source(dir.path(), "src", &guest_config(2, 64, &w));
    wait_heartbeats(|| src.console(), Duration::from_secs(30), |h| h.len() >= 2);
    let (mut tgt, addr) = spawn_target(dir.path(), "tgt", "127.0.2.2", &[], &[]);
    let r = migrate(
        &src,
        addr,
        json!({"max_downtime_ms": 1, "deadline_ms": 8000}),
    );
    let events = src.ok(json!({"cmd": "migrate-status"}));
    eprintln!(
        "fast dirtier: {}",
        if r["ok"] == true {
            "converged".to_string()
        } else {
            r["error"].to_string()
        }
    );
    if r["ok"] == true {
        assert!(
            r["stats"]["max_throttle_percent"].as_u64().unwrap() > 0,
            "{r}"
        );
        assert_eq!(r["stats"]["receipt_matches"], true);
        wait_target_running(&mut tgt);
        wait_heartbeats(|| tgt.console(), Duration::from_secs(30), |h| h.len() >= 2);
        assert_continuous(
            &stitched(r["console"].as_str().unwrap(), &tgt.console()),
            false,
        );
    } else {
        let e = r["error"].as_str().unwrap();
        assert!(
            e.contains("did not converge") && e.contains("deadline"),
            "{e}"
        );
        let throttled = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.get("throttle_percent").is_some());
        assert!(throttled, "gave up without throttling: {events}");
        assert_eq!(src.status(), "running");
        let n = heartbeats(&src.console()).len();
        let hb = wait_heartbeats(
            || src.console(),
            Duration::from_secs(30),
            |h| h.len() >= n + 3,
        );
        assert_continuous(&hb, false);
    }
}

#[test]
fn target_killed_after_storage_handoff_gives_the_disk_back_to_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk0.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut cfg = guest_config(1, 64, &Workload::new(WorkloadKind::Disk));
    cfg.disks = vec![vmm_node::DiskSlotConfig {
        slot: 0,
        path: image,
        read_only: false,
    }];
    let passes = |h: &vmm_node::guest_protocol::Heartbeat| -> u64 {
        h.fields
            .get("disk_passes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let src = spawn_source(dir.path(), "src", &cfg);
    let hb = wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| h.last().is_some_and(|h| h.disk == "ok" && passes(h) >= 2),
    );
    let before = passes(hb.last().unwrap());
    // The target dies after it acquired and opened the disk, before reporting ready.
    let (mut tgt, addr) = spawn_target(
        dir.path(),
        "tgt",
        "127.0.2.2",
        &[],
        &[("VMM_NODE_MIGRATION_FAILPOINT", "before-resume")],
    );
    let r = migrate(&src, addr, json!({}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(tgt.wait_exit(Duration::from_secs(10)).is_some());
    assert_eq!(src.status(), "running");
    let hb = wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| {
            h.last()
                .is_some_and(|h| h.disk == "ok" && passes(h) >= before + 3)
        },
    );
    assert_continuous(&hb, false);
    assert!(hb.iter().all(|h| h.disk != "bad"), "{:?}", hb.last());
}
