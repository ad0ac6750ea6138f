//! Live migration between two `vmm-node` processes over loopback: the guest continues
//! without a gap or repeat in its heartbeat sequence, its memory pattern verifies and its
//! TSC time keeps running.

mod common;
mod migration_support;

use std::time::{Duration, Instant};

use migration_support::*;
use serde_json::json;
use vmm_node::guest_protocol::{heartbeats, Workload, WorkloadKind};

/// Migrates a guest once over TLS and verifies it; returns the migrate reply's stats.
fn migrate_and_verify(
    vcpus: u8,
    memory_mib: u64,
    w: Workload,
    opts: serde_json::Value,
) -> serde_json::Value {
    migrate_and_verify_over(vcpus, memory_mib, w, opts, false)
}

/// [`migrate_and_verify`], over plaintext (both ends `--insecure-plaintext`) if asked.
fn migrate_and_verify_over(
    vcpus: u8,
    memory_mib: u64,
    w: Workload,
    opts: serde_json::Value,
    plaintext: bool,
) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let mem_checked = w.kind == WorkloadKind::Mem;
    let plain = ["--insecure-plaintext".to_string()];
    let security = if plaintext {
        plain.to_vec()
    } else {
        migration_tls_args(dir.path())
    };
    let cfg = guest_config(vcpus, memory_mib, &w);
    let mut src = spawn_source_with(dir.path(), "src", &cfg, &security);
    let t_first = Instant::now();
    let first = wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| {
            h.len() >= 3
                && h.last()
                    .is_some_and(|h| h.cpus == u64::from(vcpus) && (!mem_checked || h.mem == "ok"))
        },
    );
    let extra: &[&str] = if plaintext {
        &["--insecure-plaintext"]
    } else {
        &[]
    };
    let (mut tgt, addr) = spawn_target(dir.path(), "tgt", "127.0.2.2", extra, &[]);
    let r = migrate(&src, addr, opts);
    assert_eq!(r["ok"], true, "migrate failed: {r}");
    let stats = r["stats"].clone();
    assert_eq!(
        stats["receipt_matches"], true,
        "memory receipts differ: {stats}"
    );
    let before = r["console"].as_str().unwrap().to_string();
    // The source destroys its VM and exits.
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "source did not exit after migrating away"
    );
    wait_target_running(&mut tgt);
    assert_eq!(tgt.status(), "running");
    let n_before = heartbeats(&before).len();
    wait_heartbeats(|| tgt.console(), Duration::from_secs(30), |h| h.len() >= 4);
    let after = tgt.console();
    let all = assert_continuous_text(&stitch(&before, &after), mem_checked);
    assert!(all.len() >= n_before + 4);
    let first_hb = first.first().unwrap();
    let pos = all.iter().position(|h| h.seq == first_hb.seq).unwrap();
    assert_guest_time_kept(&all[pos], all.last().unwrap(), t_first.elapsed(), 400_000);
    if mem_checked {
        let last = all.last().unwrap();
        assert_eq!(last.mem, "ok", "{last:?}");
        assert!(
            last.mem_passes > first.last().unwrap().mem_passes,
            "memory verification keeps running"
        );
    }
    assert_eq!(all.last().unwrap().cpus, u64::from(vcpus));
    let b = &stats["blackout"];
    eprintln!(
        "migrated {vcpus} vCPU / {memory_mib} MiB {:?}: total {} us, blackout {} us (copy {} state {} handoff {} resume {}), rounds {}",
        w.kind, stats["total_us"], b["total_us"], b["final_copy_us"], b["state_us"], b["handoff_us"], b["resume_us"],
        stats["rounds"].as_array().map_or(0, Vec::len)
    );
    stats
}

#[test]
fn idle_guest_migrates_and_continues() {
    let stats = migrate_and_verify(1, 64, Workload::new(WorkloadKind::Idle), json!({}));
    assert!(stats["zero_pages_skipped"].as_u64().unwrap() > 0);
}

/// The old unauthenticated protocol still works, but only when both ends ask for it.
#[test]
fn plaintext_migration_when_both_ends_ask_for_it() {
    let w = Workload {
        wss_mib: 8,
        ..Workload::new(WorkloadKind::Mem)
    };
    migrate_and_verify_over(1, 64, w, json!({}), true);
}

/// `receive` without TLS files or `--insecure-plaintext` does not start, and says why.
#[test]
fn receive_without_tls_or_plaintext_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-node"))
        .args(["receive", "--listen", "127.0.2.2:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-ca") && err.contains("--insecure-plaintext"),
        "{err}"
    );
}

#[test]
fn memory_pattern_guest_with_two_vcpus_migrates_and_verifies() {
    let w = Workload {
        wss_mib: 24,
        ..Workload::new(WorkloadKind::Mem)
    };
    migrate_and_verify(2, 64, w, json!({}));
}

#[test]
fn dirtying_guest_with_four_vcpus_migrates() {
    let w = Workload {
        wss_mib: 8,
        rate_mbps: 20,
        ..Workload::new(WorkloadKind::Dirty)
    };
    // Debug builds on 2 shared cores move ~50-150 MB/s: a generous blackout budget keeps
    // this test about correctness under dirtying, not about convergence speed (that is
    // migration_faults' fast-dirtier test and the benchmark).
    let stats = migrate_and_verify(4, 96, w, json!({"max_downtime_ms": 500}));
    assert!(stats["rounds"].as_array().unwrap().len() >= 2);
}

#[test]
fn back_and_forth_twenty_times_then_verify() {
    let dir = tempfile::tempdir().unwrap();
    let w = Workload {
        wss_mib: 16,
        ..Workload::new(WorkloadKind::Mem)
    };
    let mut cur = spawn_source(dir.path(), "n0", &guest_config(2, 64, &w));
    wait_heartbeats(
        || cur.console(),
        Duration::from_secs(30),
        |h| h.len() >= 2 && h.last().is_some_and(|h| h.mem == "ok"),
    );
    let mut text = String::new();
    for i in 1..=20 {
        let ip = if i % 2 == 1 { "127.0.2.2" } else { "127.0.2.1" };
        let (mut next, addr) = spawn_target(dir.path(), &format!("n{i}"), ip, &[], &[]);
        let r = migrate(&cur, addr, json!({"max_downtime_ms": 100}));
        assert_eq!(r["ok"], true, "migration {i} failed: {r}");
        assert_eq!(r["stats"]["receipt_matches"], true, "migration {i}: {r}");
        text = stitch(&text, r["console"].as_str().unwrap());
        assert!(
            cur.wait_exit(Duration::from_secs(10)).is_some(),
            "source {i} did not exit"
        );
        wait_target_running(&mut next);
        // Let the guest print at least one heartbeat on every host.
        wait_heartbeats(
            || next.console(),
            Duration::from_secs(30),
            |h| !h.is_empty(),
        );
        cur = next;
    }
    wait_heartbeats(|| cur.console(), Duration::from_secs(30), |h| h.len() >= 3);
    text = stitch(&text, &cur.console());
    let all = assert_continuous_text(&text, true);
    let last = all.last().unwrap();
    assert_eq!(last.mem, "ok");
    assert_eq!(last.cpus, 2);
}

fn disk_passes(h: &vmm_node::guest_protocol::Heartbeat) -> u64 {
    h.fields
        .get("disk_passes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn disk_pattern_guest_migrates_with_its_disk() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk0.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut cfg = guest_config(1, 64, &Workload::new(WorkloadKind::Disk));
    cfg.disks = vec![vmm_node::DiskSlotConfig {
        slot: 0,
        path: image.clone(),
        read_only: false,
    }];
    let mut src = spawn_source(dir.path(), "src", &cfg);
    let first = wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| {
            h.last()
                .is_some_and(|h| h.disk == "ok" && disk_passes(h) >= 2)
        },
    );
    let passes_before = disk_passes(first.last().unwrap());
    let (mut tgt, addr) = spawn_target(dir.path(), "tgt", "127.0.2.2", &[], &[]);
    let r = migrate(&src, addr, json!({}));
    assert_eq!(r["ok"], true, "migrate failed: {r}");
    assert_eq!(r["stats"]["receipt_matches"], true, "{r}");
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "source did not exit"
    );
    wait_target_running(&mut tgt);
    let before = r["console"].as_str().unwrap().to_string();
    let after = wait_heartbeats(
        || tgt.console(),
        Duration::from_secs(30),
        |h| h.len() >= 3 && h.last().is_some_and(|h| disk_passes(h) > passes_before + 2),
    );
    let all = stitched(&before, &tgt.console());
    assert_continuous(&all, false);
    assert!(
        all.iter().all(|h| h.disk != "bad"),
        "disk pattern failed: {:?}",
        all.last()
    );
    let last = after.last().unwrap();
    assert_eq!(last.disk, "ok", "{last:?}");
}

#[test]
fn quick_migration_through_a_shared_directory_continues_the_guest() {
    let dir = tempfile::tempdir().unwrap();
    let w = Workload {
        wss_mib: 16,
        ..Workload::new(WorkloadKind::Mem)
    };
    let mut src = spawn_source(dir.path(), "src", &guest_config(2, 64, &w));
    wait_heartbeats(
        || src.console(),
        Duration::from_secs(30),
        |h| h.len() >= 2 && h.last().is_some_and(|h| h.mem == "ok"),
    );
    let shared = dir.path().join("shared");
    let t = Instant::now();
    let r = src.req(json!({"cmd": "quick-migrate", "dir": shared}));
    assert_eq!(r["ok"], true, "{r}");
    assert!(
        r["save"]["memory_bytes"].as_u64().unwrap() == 64 << 20,
        "{r}"
    );
    assert!(
        src.wait_exit(Duration::from_secs(10)).is_some(),
        "source did not exit"
    );
    // The target node restores from the shared directory.
    let sock = dir.path().join("tgt.sock");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vmm-node"))
        .args([
            "restore",
            "--snapshot",
            shared.to_str().unwrap(),
            "--control",
            sock.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut tgt = Proc { child, sock };
    wait_target_running(&mut tgt);
    eprintln!(
        "quick migration downtime (save + process start + restore): {:?}",
        t.elapsed()
    );
    wait_heartbeats(|| tgt.console(), Duration::from_secs(30), |h| h.len() >= 3);
    let all = stitched(r["console"].as_str().unwrap(), &tgt.console());
    assert_continuous(&all, true);
    assert_eq!(all.last().unwrap().mem, "ok");
    assert_eq!(all.last().unwrap().cpus, 2);
}
