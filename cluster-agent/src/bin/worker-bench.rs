//! Benchmark of VM worker processes (`vm_workers`), printed as figures with an in-process
//! baseline measured in the same run:
//!
//! 1. VM start → first guest heartbeat, in a worker vs in the agent's process;
//! 2. resident memory of a worker beyond its guest's RAM (anchor: Firecracker < 5 MiB);
//! 3. an agent restart: a fresh `VmHost` adopting 1, 10 and 50 running workers.
//!
//! The test guest (1 vCPU, 64 MiB, idle workload); no cluster, no disks: the VmHost is
//! driven directly, its worker lease renewed far ahead.
//!
//! ```text
//! cargo build --release -p cluster-agent --bin cluster-agent --bin worker-bench
//! target/release/worker-bench [ROUNDS]
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_agent::vmhost::worker::Settings;
use cluster_agent::vmhost::{TestWorkload, VmHost, VmSpec, WorkloadName};
use csv_volume::VolumeRegistry;
use vmm_node::guest_protocol::heartbeats;

const WAIT: Duration = Duration::from_secs(120);
const GUEST_MIB: u64 = 64;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), v[0], v[v.len() - 1])
}

fn spec(name: &str) -> VmSpec {
    let mut w = TestWorkload::new(WorkloadName::Idle);
    w.hb_ms = 20;
    VmSpec::test_guest(name, 1, GUEST_MIB, w)
}

fn host(dir: Option<&PathBuf>) -> Arc<VmHost> {
    let h = VmHost::new(1, VolumeRegistry::new());
    if let Some(dir) = dir {
        let exe = std::env::current_exe()
            .expect("own path")
            .with_file_name("cluster-agent");
        assert!(
            exe.exists(),
            "build the cluster-agent binary first: {}",
            exe.display()
        );
        h.enable_workers(Settings {
            exe,
            dir: dir.clone(),
            down_after: Duration::from_secs(3600),
            volumes: Vec::new(),
            networks: Default::default(),
            image_dirs: Vec::new(),
            migration_tls: None,
            log_format: Default::default(),
            cgroups: None,
        });
        h.renew_workers(Instant::now() + Duration::from_secs(3600));
    }
    h
}

/// Start `name` on `h` and wait for its first heartbeat: milliseconds.
fn start_to_heartbeat(h: &VmHost, name: &str) -> f64 {
    let t0 = Instant::now();
    h.start(spec(name), &[]).expect("start");
    let console = h.console(name).expect("console");
    let mut text = console.recent;
    while heartbeats(&text).is_empty() {
        let left = WAIT.checked_sub(t0.elapsed()).expect("no heartbeat");
        let line = console.lines.recv_timeout(left).expect("console ended");
        text.push_str(&line);
        text.push('\n');
    }
    t0.elapsed().as_secs_f64() * 1e3
}

/// Resident KiB of process `pid`: anonymous memory outside the guest's RAM (heap,
/// stacks: what each worker costs), file-backed pages (the binary's code, in the page
/// cache and shared with every process that maps the same binary), and the guest-RAM
/// mapping (the anonymous mapping of exactly the guest's size).
fn rss_kib(pid: u32) -> (u64, u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let (mut anon, mut rss, mut guest) = (0, 0, 0);
    let mut size = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let v = |x: Option<&str>| x.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        match f.next() {
            Some("Size:") => size = v(f.next()),
            Some("Rss:") => {
                let r = v(f.next());
                rss += r;
                if size == GUEST_MIB * 1024 {
                    guest += r;
                }
            }
            Some("Anonymous:") => anon += v(f.next()),
            _ => {}
        }
    }
    (anon.saturating_sub(guest), rss.saturating_sub(anon), guest)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("ROUNDS"))
        .unwrap_or(5);
    let scratch = std::env::temp_dir().join(format!("worker-bench-{}", std::process::id()));
    let dir = scratch.join("vms");

    println!("VM start -> first heartbeat (1 vCPU, {GUEST_MIB} MiB test guest), {rounds} rounds each, alternating:");
    let (inproc, workers) = (host(None), host(Some(&dir)));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut rss = Vec::new();
    for r in 0..rounds {
        let n = format!("in-{r}");
        a.push(start_to_heartbeat(&inproc, &n));
        inproc.stop(&n).expect("stop");
        let n = format!("wk-{r}");
        b.push(start_to_heartbeat(&workers, &n));
        let pid = cluster_agent::vmhost::worker::WorkerVm::attach(&dir.join(&n))
            .expect("attach")
            .pid();
        rss.push(rss_kib(pid));
        workers.stop(&n).expect("stop");
    }
    let (m, lo, hi) = stats(a);
    println!("  in the agent's process (baseline): median {m:.1} ms (min {lo:.1}, max {hi:.1})");
    let (m, lo, hi) = stats(b);
    println!("  in a worker process:               median {m:.1} ms (min {lo:.1}, max {hi:.1})");
    let over: Vec<f64> = rss.iter().map(|(a, _, _)| *a as f64 / 1024.0).collect();
    let (m, lo, hi) = stats(over);
    let file = rss.iter().map(|(_, f, _)| *f).max().unwrap_or(0) as f64 / 1024.0;
    let guest = rss.iter().map(|(_, _, g)| *g).max().unwrap_or(0) as f64 / 1024.0;
    println!("worker memory beyond guest RAM: anonymous median {m:.1} MiB (min {lo:.1}, max {hi:.1}); \
        file-backed (the binary's code, page cache, shared by every process of the binary) up to {file:.1} MiB; \
        guest RAM resident up to {guest:.1} MiB");
    println!("agent restart: a new VmHost adopts N running workers (baseline: N = 1):");
    for n in [1usize, 10, 50] {
        let h = host(Some(&dir));
        for i in 0..n {
            h.start(spec(&format!("ad-{n}-{i}")), &[]).expect("start");
        }
        drop(h);
        let fresh = host(Some(&dir));
        let t0 = Instant::now();
        let adopted = fresh.adopt_workers();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        assert_eq!(adopted.len(), n, "adopted {adopted:?}");
        println!(
            "  {n:>3} VMs: adopted in {ms:.1} ms ({:.2} ms per VM)",
            ms / n as f64
        );
        for name in adopted {
            fresh.stop(&name).expect("stop");
        }
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
