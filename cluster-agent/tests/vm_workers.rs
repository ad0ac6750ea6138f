//! VM worker processes (`vm_workers = true`): a VM runs in a process of its own and
//! outlives its agent. Real agents, real workers, real KVM test guests; the guest's
//! heartbeat sequence is the proof that a VM kept running (a reboot starts it again at 1).
//! The worker's console is also read straight from its control socket, so the test sees
//! the guest while no agent runs.

use cluster_proto::EnumName;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;

use cluster_agent::vmhost::worker::WorkerVm;
use cluster_proto::vms as pb;
use cluster_tests::checker::{self, RunChecker, Sighting};
use cluster_tests::vm::{get_vm, guest_spec, hb_seq, mem_boot};
use cluster_tests::{require_kvm, Cluster, Options};

const WORKERS: &str = "vm_workers = true\n";

fn spec(name: &str, preferred: u64) -> pb::VmSpec {
    pb::VmSpec {
        preferred_owners: vec![preferred],
        restart_priority: cluster_proto::vms::RestartPriority::High as i32,
        ..guest_spec(name, 64, mem_boot())
    }
}

fn worker_dir(cl: &Cluster, node: u64, vm: &str) -> PathBuf {
    cl.check(cl.spec(node)).data_dir.join("vms").join(vm)
}

async fn cluster_with_workers(opts: Options) -> Cluster {
    cluster_with_config(opts, WORKERS).await
}

async fn cluster_with_config(opts: Options, toml: &str) -> Cluster {
    require_kvm();
    form_three(Cluster::agents(opts), toml).await
}

/// Three nodes with workers and one shared volume (for quick migration and disks).
async fn cluster_with_workers_and_volume() -> Cluster {
    require_kvm();
    let cl = Cluster::agents(Options::default());
    let (_csv, volume) = cl.shared_volume();
    form_three(cl, &format!("{WORKERS}{volume}")).await
}

/// [`cluster_with_workers_and_volume`] whose live migrations of `held` stay in pre-copy
/// under a 1 ms blackout cap, whatever the guest does ([`Cluster::hold_precopy`]).
async fn cluster_with_workers_and_volume_holding(held: &str) -> Cluster {
    require_kvm();
    let mut cl = Cluster::agents(Options::default());
    let (_csv, volume) = cl.shared_volume();
    for id in 1..=3 {
        let added = cl.add_node_with(id, &format!("{WORKERS}{volume}"));
        cl.check(added);
    }
    let set = cl.hold_precopy(held);
    cl.check(set);
    let formed = cl.form(3).await;
    cl.check(formed);
    cl
}

async fn form_three(mut cl: Cluster, toml: &str) -> Cluster {
    for id in 1..=3 {
        let added = cl.add_node_with(id, toml);
        cl.check(added);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    cl
}

/// Creates the 4 MiB disk `name` on the shared volume.
async fn create_disk(cl: &Cluster, name: &str) {
    cl.vols(1)
        .await
        .create_disk(cluster_proto::volumes::CreateDiskRequest {
            name: name.into(),
            size_mib: 4,
        })
        .await
        .unwrap_or_else(|e| panic!("create disk: {e}{}", cl.logs()));
}

/// A 64 MiB guest running the `disk` workload on node 2, with `disks` from its start.
fn disk_guest(name: &str, disks: &[&str]) -> pb::VmSpec {
    let boot = pb::TestGuestBoot {
        workload: cluster_proto::vms::Workload::Disk as i32,
        heartbeat_interval: Some(cluster_proto::times::duration_from_ms(100)),
        ..Default::default()
    };
    pb::VmSpec {
        preferred_owners: vec![2],
        disks: disks
            .iter()
            .map(|d| pb::DiskSpec {
                name: (*d).into(),
                read_only: false,
            })
            .collect(),
        ..guest_spec(name, 64, boot)
    }
}

/// Quick-migrates `vm` to node `to` and waits until it runs there.
async fn quick_migrate(cl: &Cluster, vm: &str, to: u64) {
    cl.vms(1)
        .await
        .migrate_vm(pb::MigrateVmRequest {
            name: vm.into(),
            to_node_id: to,
            quick: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    cl.wait_vm(1, vm, &format!("running on node {to}"), |v| {
        v.owner_id == to && v.runtime().name() == "running" && v.migrating_to == 0
    })
    .await;
}

/// The worker's own console stream (no agent in between): its lines as they arrive,
/// stamped with this machine's clock. Ends when the worker exits.
fn worker_console(cl: &Cluster, dir: &std::path::Path) -> Receiver<String> {
    let w = WorkerVm::attach(dir).unwrap_or_else(|e| {
        panic!(
            "attach to the worker in {}: {e:?}{}",
            dir.display(),
            cl.logs()
        )
    });
    w.console()
        .unwrap_or_else(|e| panic!("worker console: {e:?}"))
        .1
}

/// Reads `lines` until a heartbeat with a sequence number above `after` (blocking, on a
/// thread of its own); the heartbeats seen, each stamped on arrival. Panics after the
/// harness's wait with what was seen.
async fn worker_heartbeat_after(lines: Receiver<String>, after: u64) -> (Receiver<String>, u64) {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + cluster_tests::WAIT;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(seq) = hb_seq(&l) {
                        if seq > after {
                            return (lines, seq);
                        }
                        seen.push(seq);
                    }
                }
                Err(e) => panic!(
                    "worker console ended ({e}) before a heartbeat above {after}; saw {seen:?}"
                ),
            }
        }
        panic!("no heartbeat above {after} from the worker; saw {seen:?}")
    })
    .await
    .unwrap_or_else(|e| panic!("reader thread: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_is_stopped_or_killed_and_its_vm_keeps_running_then_is_adopted() {
    let _serial = cluster_tests::serial().await;
    // A silence of 10 s before Down: the agent comes back well within it.
    let mut cl = cluster_with_workers(Options {
        down_after_ms: 10_000,
        ..Options::default()
    })
    .await;
    let before = cl.create_running(1, spec("vm-w", 2)).await;
    assert_eq!(before.owner_id, 2, "{before:?}");
    let (_, mut seq) = cl.heartbeat_after(1, "vm-w", 0).await;
    let dir = worker_dir(&cl, 2, "vm-w");
    let pid = WorkerVm::attach(&dir)
        .unwrap_or_else(|e| panic!("{e:?}{}", cl.logs()))
        .pid();
    assert_ne!(Some(pid), cl.pid(2), "the VM runs in a process of its own");

    for how in ["SIGTERM", "kill -9"] {
        let lines = worker_console(&cl, &dir);
        if how == "SIGTERM" {
            let clean = cl.stop(2);
            assert!(
                cl.check(clean),
                "the agent exits cleanly on SIGTERM:\n{}",
                cl.log_tail(2, 40)
            );
        } else {
            let killed = cl.kill9(2);
            cl.check(killed);
        }
        // No agent runs on node 2: the guest keeps counting in its worker.
        let (_lines, during) = worker_heartbeat_after(lines, seq).await;
        eprintln!("{how}: agent gone, the worker's guest printed heartbeat {during}");
        let log_from = cl.log_len(2);
        let started = cl.start(2).await;
        cl.check(started);
        let line = cl
            .wait_log_line(2, "worker adopted", |l| {
                l.contains("vm worker adopted") && l.contains("vm-w")
            })
            .await;
        assert!(
            cl.log_since(2, log_from).contains("vm workers adopted"),
            "{line}"
        );
        // Through the cluster again: the same guest (no reset), the same decision.
        let (node, after) = cl.heartbeat_after(1, "vm-w", during).await;
        assert_eq!(node, 2);
        seq = after;
        let rec = get_vm(&mut cl.vms(1).await, "vm-w")
            .await
            .unwrap_or_else(|e| panic!("vm-w: {e}{}", cl.logs()));
        assert_eq!(
            (rec.owner_id, rec.generation, rec.runtime().name()),
            (2, before.generation, "running"),
            "no failover happened: {rec:?}"
        );
        let now = WorkerVm::attach(&dir).unwrap_or_else(|e| panic!("{e:?}{}", cl.logs()));
        assert_eq!(now.pid(), pid, "still the first worker");
    }

    // A stop through the cluster ends the worker and releases the VM for good.
    cl.vms(1)
        .await
        .stop_vm(pb::StopVmRequest {
            name: "vm-w".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("stop: {e}{}", cl.logs()));
    cl.wait_runtime(1, "vm-w", "stopped").await;
    let sock = dir.join("sock");
    cluster_tests::Wait::new(cluster_tests::WAIT)
        .until(
            "the worker's socket is gone",
            || async { Ok::<_, String>(sock.exists()) },
            |exists| !exists,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
}

/// Journals, with this machine's clock, every console line the worker in `dir` prints
/// until it exits (node `node`'s own journal lives in its agent, which the test stops).
fn journal_worker(
    cl: &Cluster,
    dir: &std::path::Path,
    node: u64,
) -> tokio::task::JoinHandle<Vec<Sighting>> {
    let lines = worker_console(cl, dir);
    tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        while let Ok(text) = lines.recv() {
            seen.push(Sighting {
                at_unix_us: checker::now_unix_us(),
                node,
                text,
            });
        }
        seen
    })
}

/// The old copy in `dir` on `old_node` (journaled by `old`) stopped on its own — its
/// console ended, its socket is gone, its log says why — and never ran at the same time
/// as the copy on `new_node` (judged from the lines every journal saw, one clock).
async fn assert_old_copy_stopped_first(
    cl: &Cluster,
    checker: &RunChecker,
    vm: &str,
    (dir, old_node, old): (
        &std::path::Path,
        u64,
        tokio::task::JoinHandle<Vec<Sighting>>,
    ),
    new_node: u64,
) {
    let old = tokio::time::timeout(cluster_tests::WAIT, old)
        .await
        .unwrap_or_else(|_| panic!("the worker on node {old_node} still runs{}", cl.logs()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!dir.join("sock").exists(), "the worker removed its socket");
    let log = std::fs::read_to_string(dir.join("worker.log")).unwrap_or_default();
    assert!(log.contains("lease ran out"), "worker log:\n{log}");
    checker.sync(cl).await;
    let mut sightings = checker.sightings(vm);
    assert!(!old.is_empty(), "the test saw the old copy run");
    sightings.extend(old);
    sightings.sort();
    let runs = checker::runs(&sightings);
    let doubles = checker::double_runs(vm, &runs);
    assert!(
        doubles.is_empty(),
        "two copies ran at once: {doubles:?}\nruns: {runs:?}"
    );
    assert!(
        runs.iter().any(|r| r.node == old_node) && runs.iter().any(|r| r.node == new_node),
        "{runs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_for_good_its_worker_stops_the_vm_before_the_cluster_restarts_it() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster_with_workers(Options::default()).await;
    let before = cl.create_running(1, spec("vm-k", 2)).await;
    assert_eq!(before.owner_id, 2);
    cl.heartbeat_after(1, "vm-k", 0).await;
    let checker = RunChecker::start(&cl, &["vm-k"]);
    let dir = worker_dir(&cl, 2, "vm-k");
    let old = journal_worker(&cl, &dir, 2);
    let killed = cl.kill9(2);
    cl.check(killed);

    let after = cl
        .wait_vm(1, "vm-k", "restarted on a survivor", |v| {
            v.owner_id != 2 && v.runtime().name() == "running"
        })
        .await;
    let (node, _) = cl.heartbeat_after(1, "vm-k", 0).await;
    assert_eq!(node, after.owner_id);
    assert_old_copy_stopped_first(&cl, &checker, "vm-k", (&dir, 2, old), after.owner_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_thawed_after_failover_adopts_nothing_the_cluster_moved() {
    let _serial = cluster_tests::serial().await;
    let cl = cluster_with_workers(Options::default()).await;
    let before = cl.create_running(1, spec("vm-f", 2)).await;
    assert_eq!(before.owner_id, 2);
    cl.heartbeat_after(1, "vm-f", 0).await;
    let checker = RunChecker::start(&cl, &["vm-f"]);
    let dir = worker_dir(&cl, 2, "vm-f");
    let old = journal_worker(&cl, &dir, 2);
    // A stuck host: the agent stops in place; its worker runs on until its lease ends.
    cl.check(cl.freeze(2));
    let after = cl
        .wait_vm(1, "vm-f", "restarted on a survivor", |v| {
            v.owner_id != 2 && v.runtime().name() == "running"
        })
        .await;
    let (_, seq) = cl.heartbeat_after(1, "vm-f", 0).await;

    cl.check(cl.thaw(2));
    // (Its worker stopped the VM at its lease deadline: the thawed agent finds that, or
    // fences what still runs.)
    cl.wait_log_line(2, "lapse seen by the thawed agent", |l| {
        l.contains("vms fenced") || l.contains("its lease ran out (fenced)")
    })
    .await;
    cl.barrier().await;
    // (Judged once node 2 answers again: the checker reads every running node.)
    assert_old_copy_stopped_first(&cl, &checker, "vm-f", (&dir, 2, old), after.owner_id).await;
    // Nothing runs on node 2, the VM keeps running where the cluster put it.
    assert!(WorkerVm::attach(&dir).is_err(), "no worker on node 2");
    let (node, _) = cl.heartbeat_after(1, "vm-f", seq).await;
    assert_eq!(node, after.owner_id);
    let rec = get_vm(&mut cl.vms(1).await, "vm-f")
        .await
        .unwrap_or_else(|e| panic!("{e}{}", cl.logs()));
    assert_eq!(
        (rec.owner_id, rec.generation),
        (after.owner_id, after.generation)
    );
    checker.assert_no_double_run(&cl).await;
}

/// kill -9 of one worker: only that VM is affected. Its restart policy restarts it on its
/// node in a new worker (a new boot), once per the policy's bound; one failure more within
/// the window is a crash loop and leaves it failed with the reason; a VM whose policy is
/// `never` stays failed. Each failure is an event and counted in `/metrics`
/// (`cluster_vm_failures_total{kind="process_gone"}`). The other VM on the node keeps its
/// worker and its guest keeps counting.
/// Also: each worker runs in a cgroup of its own with its VM's limits, removed when the
/// worker is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_restarted_per_its_policy_and_no_other_vm_is_touched() {
    let _serial = cluster_tests::serial().await;
    require_kvm();
    let mut cl = Cluster::agents(Options::default());
    let maddr = cluster_tests::free_port([127, 0, 1, 3]).unwrap_or_else(|e| panic!("{e}"));
    for id in 1..=3 {
        let extra = if id == 3 {
            format!("metrics_addr = \"{maddr}\"\n")
        } else {
            String::new()
        };
        let added = cl.add_node_with(id, &format!("{WORKERS}{extra}"));
        cl.check(added);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    let once = pb::RestartPolicy {
        mode: pb::RestartMode::OnFailure as i32,
        max_restarts: 1,
        window: Some(cluster_proto::times::duration_from_ms(600_000)),
    };
    cl.create_running(
        1,
        pb::VmSpec {
            restart_policy: Some(once),
            ..spec("vm-x", 3)
        },
    )
    .await;
    cl.create_running(1, spec("vm-y", 3)).await;
    let never = pb::RestartPolicy {
        mode: pb::RestartMode::Never as i32,
        ..Default::default()
    };
    cl.create_running(
        1,
        pb::VmSpec {
            restart_policy: Some(never),
            ..spec("vm-z", 3)
        },
    )
    .await;
    let (_, y_seq) = cl.heartbeat_after(1, "vm-y", 0).await;
    cl.heartbeat_after(1, "vm-x", 0).await;
    let x = WorkerVm::attach(&worker_dir(&cl, 3, "vm-x")).unwrap_or_else(|e| panic!("{e:?}"));
    let y_pid = WorkerVm::attach(&worker_dir(&cl, 3, "vm-y"))
        .unwrap_or_else(|e| panic!("{e:?}"))
        .pid();
    let x_cgroups = vm_cgroups(&cl, 3, x.pid(), "vm-x");
    assert_only_vcpus_lowered(x.pid());
    let before = get_vm(&mut cl.vms(1).await, "vm-x")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    kill9(x.pid());

    // Restarted on its node in a new worker: a new boot (its heartbeats start over).
    let restarted = cl
        .wait_vm(1, "vm-x", "restarted after its worker died", |v| {
            v.runtime().name() == "running" && v.generation > before.generation
        })
        .await;
    assert_eq!(restarted.owner_id, 3, "{restarted:?}");
    assert_eq!(restarted.restarts.len(), 1, "{restarted:?}");
    let again = WorkerVm::attach(&worker_dir(&cl, 3, "vm-x")).unwrap_or_else(|e| panic!("{e:?}"));
    assert_ne!(again.pid(), x.pid());
    // Its guest runs in the new worker (its own console, no agent in between).
    worker_heartbeat_after(worker_console(&cl, &worker_dir(&cl, 3, "vm-x")), 0).await;
    // The dead worker's cgroup was removed and the new worker has its own of the same name.
    assert_eq!(vm_cgroups(&cl, 3, again.pid(), "vm-x"), x_cgroups);
    let events = cl.check(cl.events(1).await);
    assert!(
        events.iter().any(|e| e.message.contains("vm-x")
            && e.message.contains("worker process")
            && e.message.contains("restarting it there (restart 1 of 1")),
        "{events:#?}"
    );
    let failures = || {
        let (_, body) = cluster_tests::http_get(maddr, "/metrics");
        body.lines()
            .find(|l| l.starts_with("cluster_vm_failures_total{") && l.contains("process_gone"))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no process_gone failure series in {body}"))
    };
    assert_eq!(failures(), 1.0);

    // A second failure within the window is a crash loop: left failed, saying why.
    kill9(again.pid());
    let failed = cl
        .wait_vm(1, "vm-x", "failed for good in a crash loop", |v| {
            v.runtime().name() == "failed"
        })
        .await;
    assert!(
        failed.reason.contains("worker process")
            && failed
                .reason
                .contains("not restarted: restarted 1 times within 600 s"),
        "{failed:?}"
    );
    assert_eq!(failures(), 2.0);
    for d in &x_cgroups {
        cluster_tests::Wait::new(cluster_tests::WAIT)
            .until(
                "the dead worker's cgroup removed",
                || async { Ok::<_, String>(d.exists()) },
                |exists| !exists,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}: {}{}", d.display(), cl.logs()));
    }

    // A VM whose policy is `never` stays failed after its worker died.
    let z = WorkerVm::attach(&worker_dir(&cl, 3, "vm-z")).unwrap_or_else(|e| panic!("{e:?}"));
    kill9(z.pid());
    let z_failed = cl
        .wait_vm(1, "vm-z", "failed (policy never)", |v| {
            v.runtime().name() == "failed"
        })
        .await;
    assert!(
        z_failed.reason.contains("its restart policy is never"),
        "{z_failed:?}"
    );

    // The other VM on that node is untouched: same worker, same guest, still counting.
    let (node, _) = cl.heartbeat_after(1, "vm-y", y_seq).await;
    assert_eq!(node, 3);
    let y_now = WorkerVm::attach(&worker_dir(&cl, 3, "vm-y")).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(y_now.pid(), y_pid);
    let y = get_vm(&mut cl.vms(1).await, "vm-y").await;
    assert_eq!(y.map(|v| v.runtime().name()).ok(), Some("running"));

    // Started again by the operator, it runs in a new worker and its count starts over.
    cl.vms(1)
        .await
        .start_vm(pb::StartVmRequest {
            name: "vm-x".into(),
        })
        .await
        .unwrap_or_else(|e| panic!("start: {e}{}", cl.logs()));
    let started = cl.wait_runtime(1, "vm-x", "running").await;
    assert!(started.restarts.is_empty(), "{started:?}");
    cl.heartbeat_after(1, "vm-x", 0).await;
    let third = WorkerVm::attach(&worker_dir(&cl, 3, "vm-x")).unwrap_or_else(|e| panic!("{e:?}"));
    assert_ne!(third.pid(), again.pid());
}

fn kill9(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill: {e}"));
    assert!(st.success());
}

/// Worker `pid` runs its vCPU threads at nice 10 and its other threads (control socket,
/// lease watchdog) at the agent's 0: a spinning guest never delays its own lease.
fn assert_only_vcpus_lowered(pid: u32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap_or_else(|e| panic!("{e}"));
    let mut seen = Vec::new();
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... : the fields after the comm's closing parenthesis.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c).to_string();
        let nice: i64 = rest
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no nice in {stat}"));
        seen.push((comm, nice));
    }
    assert!(
        seen.iter().any(|(c, _)| c.starts_with("vcpu")),
        "no vCPU thread: {seen:?}"
    );
    // The kernel's own threads for the VM (`kvm-nx-lpage-recovery`) follow the vCPU.
    for (comm, nice) in seen.iter().filter(|(c, _)| !c.starts_with("kvm-")) {
        let want = if comm.starts_with("vcpu") { 10 } else { 0 };
        assert_eq!(*nice, want, "thread {comm} of worker {pid}: {seen:?}");
    }
}

/// The cgroup directories worker `pid` of VM `vm` on node `node` runs in, checked: one
/// named after the VM below the node's `cluster-vms-node-<id>`, with the VM's limits (a
/// 64 MiB guest: 64 + 256 MiB; one vCPU: one core on cgroup v1, where only the vCPU
/// threads are in the VM's cpu cgroup and the worker's other threads stay at the agent's
/// weight; two cores on v2, the whole worker), the node's VMs weighted as
/// `cgroup::vms_weight` says, and the guest's memory accounted there. Empty where the host's cgroup tree cannot be
/// written by the agent (cgroup v2 with the agent's own cgroup holding processes): the
/// agent then says so in its log, which this checks instead.
fn vm_cgroups(cl: &Cluster, node: u64, pid: u32, vm: &str) -> Vec<PathBuf> {
    use cluster_agent::vmhost::worker::cgroup;
    let log = cl.log_tail(node, 2000);
    if log.contains("vm workers run without cgroups of their own") {
        assert!(
            log.contains("cgroup v2 enables controllers only below"),
            "cgroups refused for another reason than cgroup v2's rule{}",
            cl.logs()
        );
        eprintln!("this host's cgroup v2 tree is not delegated to the agent: no cgroup checks");
        return Vec::new();
    }
    let root = std::path::Path::new("/sys/fs/cgroup");
    let v2 = root.join("cgroup.controllers").exists();
    let base = format!("cluster-vms-node-{node}/{vm}");
    let mut dirs = Vec::new();
    // cgroup v1's cpu controller: the vCPU threads only.
    let threads = worker_threads(pid);
    let mut placement = cgroup::of_process(pid).unwrap_or_else(|e| panic!("{e}"));
    if !v2 {
        let vcpu = threads
            .iter()
            .find(|(_, comm)| comm.starts_with("vcpu"))
            .map(|(tid, _)| *tid)
            .unwrap_or_else(|| panic!("no vCPU thread in worker {pid}: {threads:?}"));
        let in_cpu = |tid: u32| {
            let all = cgroup::of_thread(pid, tid).unwrap_or_else(|e| panic!("{e}"));
            all.iter()
                .find(|(cs, _)| cs.split(',').any(|c| c == "cpu"))
                .cloned()
                .unwrap_or_else(|| panic!("thread {tid} of {pid} has no cpu cgroup: {all:?}"))
        };
        // (The kernel's own threads for the VM, `kvm-*`, go where their creator was.)
        for (tid, comm) in threads.iter().filter(|(_, c)| !c.starts_with("kvm-")) {
            let (_, path) = in_cpu(*tid);
            assert_eq!(
                path.ends_with(&base),
                comm.starts_with("vcpu"),
                "thread {comm} of the worker of {vm} is in cpu:{path}"
            );
        }
        placement.retain(|(cs, _)| !cs.split(',').any(|c| c == "cpu"));
        placement.push(in_cpu(vcpu));
    }
    for (controllers, path) in placement {
        let cs: Vec<&str> = controllers.split(',').collect();
        let wanted = if v2 {
            controllers.is_empty()
        } else {
            cs.contains(&"cpu") || cs.contains(&"memory")
        };
        if !wanted {
            continue;
        }
        assert!(
            path.ends_with(&base),
            "worker of {vm} in {controllers}:{path}, not in .../{base}"
        );
        let mount = if v2 || root.join(&controllers).is_dir() {
            root.join(&controllers)
        } else {
            root.join(cs[0])
        };
        dirs.push(mount.join(path.trim_start_matches('/')));
    }
    assert_eq!(dirs.len(), if v2 { 1 } else { 2 }, "{dirs:?}");
    let read = |d: &PathBuf, f: &str| {
        std::fs::read_to_string(d.join(f))
            .unwrap_or_else(|e| panic!("{}/{f}: {e}", d.display()))
            .trim()
            .to_string()
    };
    let limit = ((64 + cgroup::MEMORY_OVERHEAD_MIB) << 20).to_string();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // /proc lists hierarchies in no fixed order: the cpu one first.
    dirs.sort_by_key(|d| !d.to_string_lossy().starts_with("/sys/fs/cgroup/cpu"));
    let (cpu, mem) = (&dirs[0], dirs.last().unwrap_or(&dirs[0]));
    let usage: u64 = if v2 {
        assert_eq!(read(cpu, "cpu.max"), "200000 100000");
        let vms = cpu.parent().map(PathBuf::from).unwrap_or_default();
        assert_eq!(
            read(&vms, "cpu.weight"),
            cgroup::vms_weight(true, cores).to_string()
        );
        assert_eq!(read(mem, "memory.max"), limit);
        read(mem, "memory.current").parse().unwrap_or(0)
    } else {
        assert_eq!(read(cpu, "cpu.cfs_quota_us"), "100000");
        let vms = cpu.parent().map(PathBuf::from).unwrap_or_default();
        assert_eq!(
            read(&vms, "cpu.shares"),
            cgroup::vms_weight(false, cores).to_string()
        );
        assert_eq!(read(mem, "memory.limit_in_bytes"), limit);
        read(mem, "memory.usage_in_bytes").parse().unwrap_or(0)
    };
    // The worker joined before it mapped guest memory: the guest's pages count here.
    assert!(
        usage >= 4 << 20,
        "{vm}'s cgroup accounts only {usage} bytes"
    );
    dirs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_saturating_every_core_do_not_starve_the_agents() {
    let _serial = cluster_tests::serial().await;
    let cl = cluster_with_workers(Options::default()).await;
    // One VM per node with a vCPU per host core, each vCPU busy checking memory: three
    // times more runnable guest threads than the host has cores.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let vcpus = u32::try_from(cores.clamp(1, 16)).unwrap_or(16);
    let names = ["busy-1", "busy-2", "busy-3"];
    let mut before = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let node = i as u64 + 1;
        let s = pb::VmSpec {
            vcpus,
            ..spec(name, node)
        };
        let v = cl.create_running(1, s).await;
        assert_eq!(v.owner_id, node, "{v:?}");
        before.push(v);
    }
    // Let the guests run: every VM prints 30 more heartbeats (3 s at 100 ms each, longer
    // on a slow host — the load lasts as long as the guests take, whatever the machine).
    for name in names {
        let (_, first) = cl.heartbeat_after(1, name, 0).await;
        cl.heartbeat_after(1, name, first + 30).await;
    }
    // No node lost its lease, fenced anything or was taken for dead; no VM restarted.
    for id in 1..=3u64 {
        let log = cl.log_tail(id, 100_000);
        assert!(
            !log.contains("lease lost"),
            "node {id} lost its lease:{}",
            cl.logs()
        );
    }
    let events = cl.check(cl.events(1).await);
    assert!(
        !events
            .iter()
            .any(|e| e.kind().name() == "node_fenced" || e.message.contains("Down")),
        "{events:#?}"
    );
    for v in before {
        let now = get_vm(&mut cl.vms(1).await, cluster_tests::vm::vm_name(&v))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (now.owner_id, now.generation, now.runtime().name()),
            (v.owner_id, v.generation, "running"),
            "{now:?}"
        );
    }
    // The workers measure their own vCPU threads: each busy VM shows CPU demand.
    cl.wait_vms(1, "every busy VM measured as busy", |all| {
        all.iter().all(|v| {
            v.demand
                .as_ref()
                .is_some_and(|d| d.cpu_demand_millicores >= 500)
        })
    })
    .await;
}

/// The state of node `node` as node `via` lists it.
async fn node_state(cl: &Cluster, via: u64, node: u64) -> String {
    cl.check(cl.nodes(via).await)
        .into_iter()
        .find(|n| n.node_id == node)
        .map(|n| n.state().name().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_announces_the_restart_and_the_vm_runs_on_past_down_after() {
    let _serial = cluster_tests::serial().await;
    // The default 2 s silence before Down; the restart takes longer than that.
    let mut cl = cluster_with_config(
        Options::default(),
        "vm_workers = true\nrestart_window_ms = 60000\n",
    )
    .await;
    let before = cl.create_running(1, spec("vm-r", 2)).await;
    let (_, seq) = cl.heartbeat_after(1, "vm-r", 0).await;
    let dir = worker_dir(&cl, 2, "vm-r");
    let lines = worker_console(&cl, &dir);
    let clean = cl.stop(2);
    assert!(
        cl.check(clean),
        "node 2 did not stop cleanly:\n{}",
        cl.log_tail(2, 40)
    );
    let events = cl.check(cl.events(1).await);
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("node 2 restarts its agent")),
        "{events:#?}"
    );
    // 50 heartbeats at 100 ms: more than twice `down_after` without the agent.
    let (_lines, during) = worker_heartbeat_after(lines, seq + 50).await;
    assert_eq!(
        node_state(&cl, 1, 2).await,
        "up",
        "a node restarting is not Down"
    );
    let rec = get_vm(&mut cl.vms(1).await, "vm-r")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((rec.owner_id, rec.generation), (2, before.generation));

    let started = cl.start(2).await;
    cl.check(started);
    let (node, _) = cl.heartbeat_after(1, "vm-r", during).await;
    assert_eq!(node, 2);
    let back = cluster_tests::Wait::new(cluster_tests::WAIT)
        .until(
            "the restart window ended",
            || async { cl.events(1).await },
            |ev| {
                ev.iter()
                    .any(|e| e.message.contains("node 2 is back from its agent restart"))
            },
        )
        .await;
    cl.check(back);
    let rec = get_vm(&mut cl.vms(1).await, "vm-r")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (rec.owner_id, rec.generation),
        (2, before.generation),
        "{rec:?}"
    );
    // Its agent stopped again, the worker would run on for the window: the harness ends
    // a test's workers with the test, so none runs a guest into the next test.
    let clean = cl.stop(2);
    cl.check(clean);
    let root = cl.dir().to_path_buf();
    assert!(
        !cluster_tests::worker_pids_below(&root).is_empty(),
        "the worker keeps its VM through the announced window"
    );
    drop(cl);
    assert_eq!(cluster_tests::worker_pids_below(&root), Vec::<u32>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_restart_that_never_ends_fails_the_vm_over_after_the_window() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster_with_config(
        Options::default(),
        "vm_workers = true\nrestart_window_ms = 3000\n",
    )
    .await;
    cl.create_running(1, spec("vm-n", 2)).await;
    cl.heartbeat_after(1, "vm-n", 0).await;
    let checker = RunChecker::start(&cl, &["vm-n"]);
    let dir = worker_dir(&cl, 2, "vm-n");
    let old = journal_worker(&cl, &dir, 2);
    let clean = cl.stop(2);
    assert!(
        cl.check(clean),
        "node 2 did not stop cleanly:\n{}",
        cl.log_tail(2, 40)
    );
    let after = cl
        .wait_vm(1, "vm-n", "restarted on a survivor", |v| {
            v.owner_id != 2 && v.runtime().name() == "running"
        })
        .await;
    assert_eq!(node_state(&cl, 1, 2).await, "down");
    cl.heartbeat_after(1, "vm-n", 0).await;
    assert_old_copy_stopped_first(&cl, &checker, "vm-n", (&dir, 2, old), after.owner_id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_migration_moves_a_worker_vm_into_a_worker_on_the_target() {
    let _serial = cluster_tests::serial().await;
    let cl = cluster_with_workers_and_volume().await;
    cl.create_running(1, spec("vm-q", 2)).await;
    let (_, seq) = cl.heartbeat_after(1, "vm-q", 0).await;
    let old = WorkerVm::attach(&worker_dir(&cl, 2, "vm-q")).unwrap_or_else(|e| panic!("{e:?}"));
    // The worker runs under its syscall filter, with no way to gain privileges.
    let status = std::fs::read_to_string(format!("/proc/{}/status", old.pid()))
        .unwrap_or_else(|e| panic!("worker status: {e}"));
    assert!(
        status.lines().any(|l| l == "Seccomp:\t2") && status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "{status}"
    );
    quick_migrate(&cl, "vm-q", 3).await;
    // The same guest (its memory came along: the heartbeat count goes on), in a worker on
    // node 3; the worker on node 2 is gone.
    let (node, _) = cl.heartbeat_after(1, "vm-q", seq).await;
    assert_eq!(node, 3);
    let new = WorkerVm::attach(&worker_dir(&cl, 3, "vm-q"))
        .unwrap_or_else(|e| panic!("{e:?}{}", cl.logs()));
    assert_ne!(new.pid(), old.pid());
    assert!(WorkerVm::attach(&worker_dir(&cl, 2, "vm-q")).is_err());
}

fn disk_passes(h: &vmm_node::guest_protocol::Heartbeat) -> u64 {
    h.fields
        .get("disk_passes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_vm_hot_plugs_its_disk_and_quick_migrates_with_it() {
    use cluster_proto::volumes as vpb;
    let _serial = cluster_tests::serial().await;
    let cl = cluster_with_workers_and_volume().await;
    create_disk(&cl, "vol/vms/w.img").await;
    let v = cl.create_running(1, disk_guest("vm-d", &[])).await;
    assert_eq!(v.owner_id, 2);
    cl.wait_heartbeat(1, "vm-d", |h| h.disk == "nodisk").await;
    // Hot add through the worker: the guest finds the disk and writes it.
    let mut vols = cl.vols(1).await;
    vols.attach_disk(vpb::AttachDiskRequest {
        vm: "vm-d".into(),
        disk: "vol/vms/w.img".into(),
        read_only: false,
    })
    .await
    .unwrap_or_else(|e| panic!("attach: {e}{}", cl.logs()));
    let (node, hb) = cl
        .wait_heartbeat(1, "vm-d", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    assert_eq!(node, 2);
    cl.wait_lock(1, "vol/vms/w.img", "held by node 2", |l| {
        l.is_some_and(|l| l.holders == vec![2])
    })
    .await;
    // Quick migration moves it with its disk into a worker on node 3.
    quick_migrate(&cl, "vm-d", 3).await;
    let passes = disk_passes(&hb);
    let (node, _) = cl
        .wait_heartbeat(1, "vm-d", |h| {
            h.seq > hb.seq && h.disk == "ok" && disk_passes(h) > passes
        })
        .await;
    assert_eq!(node, 3);
    cl.wait_lock(1, "vol/vms/w.img", "held by node 3", |l| {
        l.is_some_and(|l| l.holders == vec![3])
    })
    .await;
    assert!(WorkerVm::attach(&worker_dir(&cl, 3, "vm-d")).is_ok());
    // Hot remove through the worker on node 3: flushed, closed, released.
    vols.detach_disk(vpb::DetachDiskRequest {
        vm: "vm-d".into(),
        disk: "vol/vms/w.img".into(),
    })
    .await
    .unwrap_or_else(|e| panic!("detach: {e}{}", cl.logs()));
    cl.wait_lock(1, "vol/vms/w.img", "released", |l| l.is_none())
        .await;
    cl.wait_heartbeat(1, "vm-d", |h| h.disk == "nodisk").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_worker_stalls_nothing_and_stops_its_vm_once_thawed_past_its_lease() {
    let _serial = cluster_tests::serial().await;
    let cl = cluster_with_workers(Options::default()).await;
    cl.create_running(1, spec("vm-s", 3)).await;
    cl.create_running(1, spec("vm-t", 3)).await;
    let (_, t_seq) = cl.heartbeat_after(1, "vm-t", 0).await;
    let s = WorkerVm::attach(&worker_dir(&cl, 3, "vm-s")).unwrap_or_else(|e| panic!("{e:?}"));
    let signal = |sig: &str| {
        let st = std::process::Command::new("kill")
            .args([sig, &s.pid().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("kill: {e}"));
        assert!(st.success());
    };
    signal("-STOP");
    // While it is stopped (30 heartbeats of the other VM: longer than the worker's lease),
    // node 3's agent goes on: the other VM runs, a new VM starts there.
    let (node, _) = cl.heartbeat_after(1, "vm-t", t_seq + 30).await;
    assert_eq!(node, 3);
    cl.create_running(1, spec("vm-u", 3)).await;
    cl.heartbeat_after(1, "vm-u", 0).await;
    // Thawed past its lease, the worker cannot know its agent still holds it: it stops
    // its VM (a renewal read late grants nothing beyond the time it was sent for). That is
    // a fence, not a failure: the node reports it, and as the VM is still its own and it
    // holds its lease, starts the VM again in a new worker (as after an in-process fence).
    let old_pid = s.pid();
    signal("-CONT");
    cl.wait_until(
        "the fence of vm-s recorded",
        cluster_tests::WAIT,
        || cl.events(1),
        |events| {
            events.iter().any(|e| {
                e.kind().name() == "node_fenced"
                    && e.message.contains("vm-s")
                    && e.message.contains("lease ran out")
            })
        },
    )
    .await;
    let log =
        std::fs::read_to_string(worker_dir(&cl, 3, "vm-s").join("worker.log")).unwrap_or_default();
    assert!(log.contains("lease ran out"), "worker log:\n{log}");
    cl.wait_vm(1, "vm-s", "running again on node 3", |v| {
        v.runtime().name() == "running" && v.owner_id == 3
    })
    .await;
    // Booted again in a new worker (the record may say running a moment before the new
    // worker's directory is there: the old one is removed when the fenced worker is dropped).
    let deadline = std::time::Instant::now() + cluster_tests::WAIT;
    let again = loop {
        match WorkerVm::attach(&worker_dir(&cl, 3, "vm-s")) {
            Ok(w) if w.pid() != old_pid => break w,
            other if std::time::Instant::now() >= deadline => {
                panic!(
                    "no new worker for vm-s: {:?}{}",
                    other.map(|w| w.pid()),
                    cl.logs()
                )
            }
            _ => tokio::time::sleep(cluster_tests::wait::POLL).await,
        }
    };
    assert_ne!(again.pid(), old_pid, "vm-s still in its fenced worker");
    let (node, _) = cl.heartbeat_after(1, "vm-t", 0).await;
    assert_eq!(node, 3);
}

/// Holds a live migration in pre-copy until cancelled: 1 MiB/s and a 1 ms blackout budget
/// (1 KiB at that rate) that a running guest never meets, on any machine.
const HOLD_BYTES_PER_S: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_of_a_worker_vm_rolls_back_on_cancel_then_moves_it_with_its_disk() {
    use cluster_proto::migrations as mpb;
    let _serial = cluster_tests::serial().await;
    let cl = cluster_with_workers_and_volume_holding("vm-l").await;
    create_disk(&cl, "vol/vms/l.img").await;
    let v = cl
        .create_running(1, disk_guest("vm-l", &["vol/vms/l.img"]))
        .await;
    assert_eq!(v.owner_id, 2);
    let (_, hb) = cl
        .wait_heartbeat(1, "vm-l", |h| h.disk == "ok" && disk_passes(h) >= 1)
        .await;
    let old = WorkerVm::attach(&worker_dir(&cl, 2, "vm-l")).unwrap_or_else(|e| panic!("{e:?}"));
    let mut vms = cl.vms(1).await;

    // 1. Held in pre-copy (the worker runs the engine; its progress reaches the cluster's
    // stream), then cancelled: rolled back, the VM runs on in the same worker.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "vm-l".into(),
        to_node_id: 3,
        max_downtime: Some(cluster_proto::times::duration_from_ms(1)),
        deadline: Some(cluster_proto::times::duration_from_ms(600_000)),
        bandwidth_bytes_per_s_max: Some(HOLD_BYTES_PER_S),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let rec = cl.running_migration(1, "vm-l", cluster_tests::WAIT).await;
    cl.watch_migration_until(1, rec.id, "pre-copy progress from the worker", |p| {
        p.phase() == cluster_proto::migrations::MigrationPhase::PreCopy && p.bytes_sent > 0
    })
    .await;
    cl.migrations(1)
        .await
        .cancel_migration(mpb::CancelMigrationRequest { id: rec.id })
        .await
        .unwrap_or_else(|e| panic!("cancel: {e}{}", cl.logs()));
    let end = cl.migration_end(1, rec.id, cluster_tests::WAIT).await;
    assert_eq!(end.state().name(), "cancelled", "{end:?}");
    let v = cl.wait_settled(1, "vm-l").await;
    assert_eq!(v.owner_id, 2, "a cancelled migration moved the VM: {v:?}");
    let (node, hb2) = cl
        .wait_heartbeat(1, "vm-l", |h| {
            h.seq > hb.seq && h.disk == "ok" && disk_passes(h) > disk_passes(&hb)
        })
        .await;
    assert_eq!(node, 2);
    let same = WorkerVm::attach(&worker_dir(&cl, 2, "vm-l")).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        same.pid(),
        old.pid(),
        "the VM was restarted, not rolled back"
    );
    cl.wait_lock(1, "vol/vms/l.img", "still held by node 2", |l| {
        l.is_some_and(|l| l.holders == vec![2])
    })
    .await;

    // 2. Live migration to node 3: the same guest (its heartbeat count and disk passes
    // go on) in a new worker there, receipts match, the disk lock moved, the old worker
    // is gone.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "vm-l".into(),
        to_node_id: 3,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let rec = cl.running_migration(1, "vm-l", cluster_tests::WAIT).await;
    let end = cl.migration_end(1, rec.id, cluster_tests::WAIT).await;
    assert_eq!(end.state().name(), "succeeded", "{end:?}{}", cl.logs());
    let st = end.stats.unwrap_or_default();
    assert!(
        st.has_target_digest
            && st.receipt_matches
            && cluster_proto::times::duration_us(
                st.blackout.as_ref().unwrap_or(&Default::default())
            )
            .unwrap_or(0)
                > 0,
        "{st:?}"
    );
    let (node, _) = cl
        .wait_heartbeat(1, "vm-l", |h| {
            h.seq > hb2.seq && h.disk == "ok" && disk_passes(h) > disk_passes(&hb2)
        })
        .await;
    assert_eq!(node, 3);
    cl.wait_lock(1, "vol/vms/l.img", "held by node 3", |l| {
        l.is_some_and(|l| l.holders == vec![3])
    })
    .await;
    let new = WorkerVm::attach(&worker_dir(&cl, 3, "vm-l"))
        .unwrap_or_else(|e| panic!("no worker runs the VM on node 3: {e:?}{}", cl.logs()));
    assert_ne!(new.pid(), old.pid());
    // The worker on node 2 exits once its copy is stopped (reaped by its agent).
    let src_dir = worker_dir(&cl, 2, "vm-l");
    cl.wait_until(
        "the source worker gone",
        cluster_tests::WAIT,
        || {
            let gone = WorkerVm::attach(&src_dir).is_err();
            async move { Ok::<bool, String>(gone) }
        },
        |gone| *gone,
    )
    .await;
    // It is node 3's worker that runs the guest: its own console keeps counting.
    let (_, now) = cl.wait_heartbeat(1, "vm-l", |_| true).await;
    worker_heartbeat_after(worker_console(&cl, &worker_dir(&cl, 3, "vm-l")), now.seq).await;

    // 3. And on again from the worker that received it (its memory is the memfd the
    // target agent filled): back to node 2.
    vms.migrate_vm(pb::MigrateVmRequest {
        name: "vm-l".into(),
        to_node_id: 2,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("migrate: {e}{}", cl.logs()));
    let rec = cl.running_migration(1, "vm-l", cluster_tests::WAIT).await;
    let end = cl.migration_end(1, rec.id, cluster_tests::WAIT).await;
    assert_eq!(
        end.state().name(),
        "succeeded",
        "{end:?}{}\n--- worker log on node 3 ---\n{}",
        cl.logs(),
        cluster_agent::vmhost::worker::log_tail(&worker_dir(&cl, 3, "vm-l"), 40)
    );
    let (node, _) = cl
        .wait_heartbeat(1, "vm-l", |h| h.seq > now.seq && h.disk == "ok")
        .await;
    assert_eq!(node, 2);
}

/// The threads of process `pid` as (tid, name), kernel threads of the VM included.
fn worker_threads(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let dir = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"));
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        out.push((tid, comm.trim().to_string()));
    }
    out
}
