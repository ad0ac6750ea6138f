//! Fail-stop: an agent whose Raft storage fails (here: its data dir's file system fills
//! up) must not go on heartbeating and holding its lease with a replica that applies
//! nothing. It fences its VMs and exits non-zero, naming the storage error. An agent
//! whose store is damaged refuses to start, naming it, and the cluster loses nothing.
//!
//! Needs root (it mounts a small tmpfs as the node's data dir) and KVM.

use cluster_proto::EnumName;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster_proto::vms as pb;
use cluster_tests::checker::{now_unix_us, RunChecker, Writer};
use cluster_tests::vm::{guest_spec, mem_boot};
use cluster_tests::{Cluster, Options, WAIT};

/// A tmpfs mounted at a path for the life of the guard.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap_or_else(|e| panic!("mkdir {}: {e}", at.display()));
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(
            out.status.success(),
            "mount tmpfs at {} (this test needs root): {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Take all the space that is left (another process filling the disk).
    fn fill(&self) {
        let out = Command::new("df")
            .args(["--output=avail", "-k"])
            .arg(&self.0)
            .output()
            .unwrap_or_else(|e| panic!("df: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let avail_kib: u64 = text
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("df output {text:?}"));
        let filler = self.0.join("filler");
        let out = Command::new("fallocate")
            .args(["-l", &format!("{}k", avail_kib.saturating_sub(64))])
            .arg(&filler)
            .output()
            .unwrap_or_else(|e| panic!("fallocate: {e}"));
        assert!(
            out.status.success(),
            "fallocate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_makes_the_agent_fence_and_exit_non_zero() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"));
    let spec = c.add_node(1);
    let spec = c.check(spec);
    // RocksDB preallocates its write-ahead logs (tens of MiB) when it opens.
    let fs = Tmpfs::mount(&spec.data_dir, 160);
    let r = c.start(1).await;
    c.check(r);
    let r = c.init(1).await;
    c.check(r);
    c.check(c.put(1, "before", "the disk filled").await);
    fs.fill();
    // Writes go on until the preallocated log runs out; the first one the store cannot
    // persist stops Raft.
    let value = "x".repeat(60_000);
    let mut refused = None;
    for i in 0..5_000 {
        if let Err(e) = c.put(1, &format!("k{i}"), &value).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.unwrap_or_else(|| panic!("5000 writes of 60 kB fit on a full disk"));
    // The write that found the disk full answers with the storage error (or unavailable,
    // once Raft stopped). When the append that failed was not a client's (an entry the
    // agent wrote itself between two puts), the next put finds the agent already
    // stopping and its connection closed: the log below still has to name the cause.
    assert!(
        refused.contains("No space left on device")
            || refused.contains("unavailable")
            || refused.contains("transport error"),
        "{refused}"
    );
    let status = c.wait_exit(1, Duration::from_secs(20)).await;
    let status = c.check(status);
    assert!(!status.success(), "the agent must exit non-zero: {status}");
    let log = c.log_tail(1, 30);
    assert!(
        log.contains("Raft stopped with a fatal error") && log.contains("No space left on device"),
        "the exit names the storage error:\n{log}"
    );
    assert!(log.contains("fencing every vm"), "{log}");
    drop(c);
    drop(fs);
}

/// Overwrites 64 bytes in the middle of the largest file of `dir` whose name ends in
/// `ext`; returns its path.
fn corrupt_largest(dir: &Path, ext: &str) -> PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let path = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .unwrap_or_else(|| panic!("no *{ext} file in {}", dir.display()));
    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(len >= 4096, "{} is only {len} bytes", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(len / 2))
        .unwrap_or_else(|e| panic!("seek: {e}"));
    f.write_all(&[0x5a; 64])
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// The bytes of every file of the store (RocksDB's own info logs aside), by name.
fn store_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            if name.starts_with("LOG") {
                return None;
            }
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            Some((name, bytes))
        })
        .collect()
}

/// The owner of a VM is killed (kill -9) and its Raft store is damaged while it is down:
/// bytes in the middle of its write-ahead log (which holds everything: the process never
/// flushed) are overwritten. RocksDB's default recovery would replay the log up to the
/// damage and open a replica missing every later write — its votes and log entries
/// included, though each was synced and acknowledged. Restarted, the agent refuses
/// instead: it exits non-zero without a panic, naming the damaged store, and leaves the
/// files as they were. The rest of the cluster lost nothing: the VM failed over and runs
/// once (checker), every acknowledged write is there, the cluster takes writes, and the
/// damaged node stays Down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_is_refused_at_start_and_the_cluster_keeps_its_data() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::vm_agents();
    let formed = c.form(3).await;
    let leader = c.check(formed);
    let owner = c.ids().into_iter().find(|n| *n != leader).unwrap_or(2);
    let spec = pb::VmSpec {
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        preferred_owners: vec![owner],
        ..guest_spec("vm-s", 64, mem_boot())
    };
    let v = c.create_running(owner, spec).await;
    assert_eq!(v.owner_id, owner, "{v:?}");
    let runs = RunChecker::start(&c, &["vm-s"]);
    runs.wait_line(&c, "vm-s", "a heartbeat on the owner", 0, |s| {
        s.node == owner && s.text.starts_with("HB ")
    })
    .await;
    let writer = Writer::start(&c, &c.ids(), "w", Duration::from_millis(20));
    writer.wait_acked(&c, 0, 30).await;

    let killed_us = now_unix_us();
    let k = c.kill9(owner);
    c.check(k);
    let store = c.check(c.spec(owner)).data_dir.join("raft");
    let damaged = corrupt_largest(&store, ".log");
    let before = store_files(&store);

    let (ok, out) = c.check(c.run_to_exit(owner, Duration::from_secs(60)));
    eprintln!(
        "restart of node {owner} with {} damaged:\n{out}",
        damaged.display()
    );
    assert!(!ok, "the agent started on a damaged store:\n{out}");
    assert!(
        out.contains("is damaged") && out.contains(&store.display().to_string()),
        "the refusal names the damaged store:\n{out}"
    );
    assert!(out.contains("Corruption"), "{out}");
    assert!(
        !out.contains("panicked") && !out.contains("stack backtrace"),
        "{out}"
    );
    assert!(
        store_files(&store) == before,
        "the refused start changed the store's files"
    );

    let others: Vec<u64> = c.ids().into_iter().filter(|n| *n != owner).collect();
    let leader = c.check(c.wait_leader(&others, WAIT).await);
    let moved = c
        .wait_vm(leader, "vm-s", "running on another node", |v| {
            v.owner_id != owner && v.owner_id != 0 && v.runtime().name() == "running"
        })
        .await;
    runs.wait_line(&c, "vm-s", "a heartbeat on the new owner", killed_us, |s| {
        s.node == moved.owner_id && s.text.starts_with("HB ")
    })
    .await;
    writer.wait_acked(&c, writer.acked(), 30).await;
    let r = runs.assert_no_double_run(&c).await;
    eprintln!("vm-s ran: {:?}", r.get("vm-s"));
    let writes = writer.stop();
    let checked = writes.verify(&c, leader).await;
    eprintln!(
        "{checked} acknowledged writes present ({} failed or unknown)",
        writes.failed
    );
    c.check(c.wait_node_state(leader, owner, "down", WAIT).await);
}
