//! Fail-stop: an agent whose Raft storage fails (here: its data dir's file system fills
//! up) must not go on heartbeating and holding its lease with a replica that applies
//! nothing. It fences its VMs and exits non-zero, naming the storage error.
//!
//! Needs root (it mounts a small tmpfs as the node's data dir).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cluster_tests::{Cluster, Options};

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
    assert!(
        refused.contains("No space left on device") || refused.contains("unavailable"),
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
