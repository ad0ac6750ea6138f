//! Maintenance drain, failback and balancing jobs end to end with real `cluster-agent`
//! processes on loopback: the leader plans with the scheduler, commits the job through
//! Raft and runs it with at most one migration per node; the guests (the PVH test guest)
//! keep their heartbeats and memory checks across every move.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cluster_proto::drain as dpb;
use cluster_proto::vms as pb;
use cluster_tests::vm::{expect_code, guest_spec, hb_seq, mem_boot};
use cluster_tests::{Cluster, Options};
use tonic::Code;

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm cannot be opened ({e}): these tests need KVM");
    }
}

fn cluster() -> Cluster {
    require_kvm();
    Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"))
}

fn spec(name: &str, memory_mib: u64, preferred: u64) -> pb::VmSpec {
    pb::VmSpec {
        preferred_owners: vec![preferred],
        ..guest_spec(name, memory_mib, mem_boot())
    }
}

async fn list(cl: &Cluster, via: u64) -> Vec<pb::VmInfo> {
    let mut c = cl.vms(via).await;
    c.list_vms(pb::ListVmsRequest {})
        .await
        .map(|r| r.into_inner().vms)
        .unwrap_or_default()
}

fn name(v: &pb::VmInfo) -> String {
    v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default()
}

/// Create `names` on `node` (preferred owner) and wait until all run there.
async fn create_on(cl: &Cluster, via: u64, node: u64, names: &[String], memory_mib: u64) {
    let mut c = cl.vms(via).await;
    for n in names {
        c.create_vm(pb::CreateVmRequest {
            spec: Some(spec(n, memory_mib, node)),
            start: true,
        })
        .await
        .unwrap_or_else(|e| panic!("create {n}: {e}{}", cl.logs()));
    }
    wait_until(
        cl,
        "VMs running on their node",
        Duration::from_secs(90),
        || async {
            let all = list(cl, via).await;
            names.iter().all(|n| {
                all.iter()
                    .any(|v| &name(v) == n && v.runtime == "running" && v.owner_id == node)
            })
        },
    )
    .await;
}

async fn wait_until<F, Fut>(cl: &Cluster, what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}{}", cl.logs())
}

async fn drain_job(cl: &Cluster, via: u64, node: u64) -> Option<dpb::JobInfo> {
    let mut d = cl.drains(via).await;
    d.get_drain(dpb::NodeRef { node_id: node })
        .await
        .ok()
        .and_then(|r| r.into_inner().job)
}

async fn wait_job_end(cl: &Cluster, via: &[u64], node: u64, timeout: Duration) -> dpb::JobInfo {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < timeout {
        for v in via {
            if let Some(j) = drain_job(cl, *v, node).await {
                if j.status != "running" {
                    return j;
                }
                last = Some(j);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("drain of node {node} did not end: {last:?}{}", cl.logs())
}

/// A heartbeat with `mem=ok` from `vm`, read from its console through node `via`;
/// returns (node that produced it, seq).
async fn heartbeat(cl: &Cluster, via: u64, vm: &str) -> (u64, u64) {
    let mut c = cl.vms(via).await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = String::new();
    while Instant::now() < deadline {
        let Ok(r) = c
            .stream_console(pb::ConsoleRequest {
                name: vm.into(),
                follow: true,
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = r.into_inner();
        let mut first = true;
        while let Ok(Ok(Some(chunk))) =
            tokio::time::timeout(Duration::from_secs(5), stream.message()).await
        {
            // The first chunk is the retained log: wait for a live line.
            if !first {
                for line in chunk.text.lines() {
                    if let Some(seq) = hb_seq(line) {
                        if line.contains("mem=ok") {
                            return (chunk.node_id, seq);
                        }
                    }
                }
            }
            first = false;
            seen.push_str(&chunk.text);
            if seen.len() > 4096 {
                seen.drain(..seen.len() - 4096);
            }
        }
    }
    panic!(
        "no live mem=ok heartbeat from {vm} via node {via}; console tail: {seen}{}",
        cl.logs()
    )
}

/// One migration as the event log recorded it.
#[derive(Debug, Clone)]
struct Span {
    vm: String,
    from: u64,
    to: u64,
    start_ms: u64,
    end_ms: u64,
}

/// Migrations from the replicated event log: "VM x migration to node T started" (event
/// node = source) up to "VM x migrated to node T" / "... migration to node T failed".
fn migrations(events: &[cluster_proto::management::Event]) -> Vec<Span> {
    let mut open: BTreeMap<String, Span> = BTreeMap::new();
    let mut out = Vec::new();
    for e in events.iter().filter(|e| e.kind == "vm") {
        let Some(rest) = e.message.strip_prefix("VM ") else {
            continue;
        };
        let Some((vm, tail)) = rest.split_once(' ') else {
            continue;
        };
        let target = |s: &str| -> u64 {
            s.split_whitespace()
                .next()
                .and_then(|t| t.trim_end_matches([':', ',']).parse().ok())
                .unwrap_or(0)
        };
        if let Some(t) = tail.strip_prefix("migration to node ") {
            if t.ends_with("started") {
                open.insert(
                    vm.to_owned(),
                    Span {
                        vm: vm.to_owned(),
                        from: e.node_id,
                        to: target(t),
                        start_ms: e.at_unix_ms,
                        end_ms: u64::MAX,
                    },
                );
                continue;
            }
        }
        let ended = tail.starts_with("migrated to node ")
            || (tail.starts_with("migration to node ") && tail.contains(" failed"));
        if ended {
            if let Some(mut s) = open.remove(vm) {
                s.end_ms = e.at_unix_ms;
                out.push(s);
            }
        }
    }
    out.extend(open.into_values());
    out
}

/// No node ever takes part in two migrations at once.
fn assert_no_overlap(spans: &[Span]) {
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            let share = [a.from, a.to].iter().any(|n| *n == b.from || *n == b.to);
            let overlap = a.start_ms < b.end_ms && b.start_ms < a.end_ms;
            assert!(
                !(share && overlap),
                "two migrations on one node at once: {a:?} and {b:?}\nall: {spans:#?}"
            );
        }
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_empties_the_node_one_migration_per_node_and_failback_returns_the_vms() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    let formed = cl.form(4).await;
    cl.check(formed);
    let vm_names = names("dr", 4);
    create_on(&cl, 2, 1, &vm_names, 64).await;
    let mut before = BTreeMap::new();
    for n in &vm_names {
        before.insert(n.clone(), heartbeat(&cl, 3, n).await.1);
    }
    let mut d = cl.drains(3).await;

    // Dry run: the plan (every VM off node 1), nothing committed.
    let dry = d
        .drain_node(dpb::DrainRequest {
            node_id: 1,
            dry_run: true,
        })
        .await
        .unwrap_or_else(|e| panic!("dry run: {e}{}", cl.logs()))
        .into_inner();
    assert!(dry.job.is_none());
    assert_eq!(dry.plan.len(), 4, "{dry:?}");
    assert!(dry
        .plan
        .iter()
        .all(|m| m.from_node_id == 1 && m.to_node_id != 1));
    assert!(dry.planned_finish_unix_ms > dry.planned_start_unix_ms);
    let nodes = cl.check(cl.nodes(3).await);
    assert!(nodes.iter().all(|n| n.state == "up"), "{nodes:?}");

    let started = d
        .drain_node(dpb::DrainRequest {
            node_id: 1,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()))
        .into_inner();
    let job = started.job.unwrap_or_default();
    assert_eq!((job.kind.as_str(), job.node_id), ("drain", 1), "{job:?}");
    // A second drain of the same node is refused while the first runs.
    let again = d
        .drain_node(dpb::DrainRequest {
            node_id: 1,
            dry_run: false,
        })
        .await;
    match again {
        Err(s) => {
            assert_eq!(s.code(), Code::AlreadyExists, "{s}");
            assert!(s.message().contains("already being drained"), "{s}");
        }
        Ok(r) => {
            // The drain may already have finished on a fast machine: then this starts
            // (and at once finishes) a new, empty one.
            let j = r.into_inner().job.unwrap_or_default();
            assert!(j.moves.is_empty(), "{j:?}");
        }
    }
    cl.check(
        cl.wait_node_state(2, 1, "paused", Duration::from_secs(10))
            .await,
    );

    let done = wait_job_end(&cl, &[3], 1, Duration::from_secs(180)).await;
    let done = if done.id != job.id {
        drain_job(&cl, 3, 1).await.unwrap_or_default()
    } else {
        done
    };
    assert_eq!(done.status, "done", "{done:?}");
    let all = list(&cl, 3).await;
    assert!(
        all.iter()
            .all(|v| v.owner_id != 1 && v.runtime == "running"),
        "{all:?}"
    );
    // Every guest continues (heartbeat sequence goes on, memory checks pass) elsewhere.
    for n in &vm_names {
        let (node, seq) = heartbeat(&cl, 3, n).await;
        assert_ne!(node, 1, "{n}");
        assert!(seq > before[n], "{n}: {seq} <= {}", before[n]);
    }
    let events = cl.check(cl.events(2).await);
    let spans = migrations(&events);
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert!(
        spans
            .iter()
            .all(|s| vm_names.contains(&s.vm) && s.from == 1),
        "{spans:#?}"
    );
    assert_no_overlap(&spans);
    for want in [
        "drain of node 1 started",
        "wave 1 of",
        "moved to node",
        "done (4 moved",
    ] {
        assert!(
            events
                .iter()
                .any(|e| e.kind == "job" && e.message.contains(want)),
            "no job event with {want:?}: {:#?}",
            events.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
    }

    // Resume with failback: the node is up again and the drained VMs come back.
    let r = d
        .resume_node(dpb::ResumeRequest {
            node_id: 1,
            failback: true,
        })
        .await
        .unwrap_or_else(|e| panic!("resume: {e}{}", cl.logs()))
        .into_inner();
    let fb = r.job.clone().unwrap_or_default();
    assert_eq!(fb.kind, "failback", "{r:?}");
    assert!(!fb.moves.is_empty(), "{r:?}");
    cl.check(
        cl.wait_node_state(2, 1, "up", Duration::from_secs(10))
            .await,
    );
    let fb_moves: Vec<String> = fb.moves.iter().map(|m| m.vm.clone()).collect();
    wait_until(
        &cl,
        "failback job done",
        Duration::from_secs(180),
        || async {
            let mut d = cl.drains(2).await;
            let jobs = d
                .list_jobs(dpb::ListJobsRequest {})
                .await
                .map(|r| r.into_inner().jobs)
                .unwrap_or_default();
            jobs.iter().any(|j| j.id == fb.id && j.status == "done")
        },
    )
    .await;
    let all = list(&cl, 2).await;
    for n in &fb_moves {
        let v = all
            .iter()
            .find(|v| &name(v) == n)
            .cloned()
            .unwrap_or_default();
        assert_eq!(v.owner_id, 1, "{n} back home: {v:?}");
    }
    for n in &vm_names {
        heartbeat(&cl, 4, n).await;
    }
    let events = cl.check(cl.events(2).await);
    assert_no_overlap(&migrations(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_midway_keeps_moved_vms_drops_queued_and_draining_again_resumes() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    let formed = cl.form(4).await;
    cl.check(formed);
    let vm_names = names("ab", 5);
    create_on(&cl, 1, 2, &vm_names, 64).await;
    let mut d = cl.drains(1).await;
    let job = d
        .drain_node(dpb::DrainRequest {
            node_id: 2,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    // Abort as soon as the first VM has moved.
    wait_until(&cl, "first move done", Duration::from_secs(120), || async {
        drain_job(&cl, 1, 2)
            .await
            .is_some_and(|j| j.moves.iter().any(|m| m.status == "done"))
    })
    .await;
    let aborted = d
        .abort_drain(dpb::NodeRef { node_id: 2 })
        .await
        .unwrap_or_else(|e| panic!("abort: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    assert_eq!((aborted.id, aborted.status.as_str()), (job.id, "aborted"));
    let dropped = aborted
        .moves
        .iter()
        .filter(|m| m.status == "dropped")
        .count();
    assert!(dropped >= 1, "queued moves dropped: {aborted:?}");
    // Aborting again: nothing runs.
    let again = d.abort_drain(dpb::NodeRef { node_id: 2 }).await;
    assert!(
        matches!(&again, Err(s) if s.code() == Code::FailedPrecondition && s.message().contains("no running drain")),
        "{again:?}"
    );
    // In-flight migrations finish; then no further move starts and nothing is lost.
    wait_until(
        &cl,
        "no migration in flight",
        Duration::from_secs(60),
        || async { list(&cl, 1).await.iter().all(|v| v.migrating_to == 0) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_abort = list(&cl, 1).await;
    assert_eq!(after_abort.len(), 5);
    assert!(
        after_abort.iter().all(|v| v.desired == "running"),
        "{after_abort:?}"
    );
    let moved: Vec<String> = after_abort
        .iter()
        .filter(|v| v.owner_id != 2)
        .map(name)
        .collect();
    let stayed = after_abort.len() - moved.len();
    assert!(!moved.is_empty() && stayed >= 1, "{after_abort:?}");
    let j = drain_job(&cl, 1, 2).await.unwrap_or_default();
    assert!(
        j.moves
            .iter()
            .all(|m| m.status != "queued" && m.status != "in_flight"),
        "{j:?}"
    );
    let nodes = cl.check(cl.nodes(1).await);
    assert!(nodes.iter().any(|n| n.node_id == 2 && n.state == "paused"));
    for n in &vm_names {
        heartbeat(&cl, 3, n).await;
    }

    // Draining again resumes: a new job moves only the VMs still there.
    let resumed = d
        .drain_node(dpb::DrainRequest {
            node_id: 2,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain again: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    assert_ne!(resumed.id, job.id);
    assert_eq!(resumed.moves.len(), stayed, "{resumed:?}");
    let done = wait_job_end(&cl, &[1], 2, Duration::from_secs(180)).await;
    assert_eq!(done.status, "done", "{done:?}");
    let all = list(&cl, 1).await;
    assert!(
        all.iter()
            .all(|v| v.owner_id != 2 && v.runtime == "running"),
        "{all:?}"
    );
    let events = cl.check(cl.events(1).await);
    assert!(events.iter().any(|e| e
        .message
        .contains(&format!("drain of node 2 resumed (job {})", resumed.id))));
    assert!(events
        .iter()
        .any(|e| e.message.contains("aborted: aborted by the operator")));
    assert_no_overlap(&migrations(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_during_a_drain_the_new_leader_finishes_it() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    let formed = cl.form(4).await;
    let leader = cl.check(formed);
    let victim = if leader == 2 { 3 } else { 2 };
    let others: Vec<u64> = (1..=4).filter(|n| *n != leader).collect();
    let vm_names = names("lk", 4);
    create_on(&cl, victim, victim, &vm_names, 64).await;
    let mut d = cl.drains(others[0]).await;
    let job = d
        .drain_node(dpb::DrainRequest {
            node_id: victim,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    wait_until(&cl, "a move started", Duration::from_secs(60), || async {
        drain_job(&cl, others[0], victim)
            .await
            .is_some_and(|j| j.moves.iter().any(|m| m.status != "queued"))
    })
    .await;
    let killed = cl.kill9(leader);
    cl.check(killed);
    let new_leader = cl.check(cl.wait_leader(&others, Duration::from_secs(30)).await);
    assert_ne!(new_leader, leader);
    let done = wait_job_end(&cl, &others, victim, Duration::from_secs(240)).await;
    assert_eq!(
        (done.id, done.status.as_str()),
        (job.id, "done"),
        "{done:?}"
    );
    // The drained node is empty; every VM runs (those that had landed on the killed
    // leader were failed over by the new leader).
    wait_until(
        &cl,
        "every VM running off the drained node",
        Duration::from_secs(60),
        || async {
            let all = list(&cl, others[0]).await;
            all.len() == vm_names.len()
                && all
                    .iter()
                    .all(|v| v.owner_id != victim && v.owner_id != leader && v.runtime == "running")
        },
    )
    .await;
    // No move was started twice: each VM has at most one done move in the job.
    for n in &vm_names {
        let k = done
            .moves
            .iter()
            .filter(|m| &m.vm == n && m.status == "done")
            .count();
        assert!(k <= 1, "{n} moved {k} times: {done:?}");
    }
    for n in &vm_names {
        heartbeat(&cl, others[0], n).await;
    }
    let events = cl.check(cl.events(others[0]).await);
    assert_no_overlap(&migrations(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_drain_requests_are_refused_and_change_nothing() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    for id in [1, 2] {
        let added = cl.add_node(id);
        cl.check(added);
    }
    // Node 3 claims Intel CPUs: no VM of the AMD nodes can move there.
    let added = cl.add_node_with(3, "[facts_override]\ncpu_vendor = \"GenuineIntel\"\n");
    cl.check(added);
    let formed = cl.form(3).await;
    cl.check(formed);
    create_on(&cl, 1, 1, &["stuck".to_string()], 64).await;
    let mut d = cl.drains(2).await;
    let before_nodes = cl.check(cl.nodes(1).await);
    let req = |node_id, dry_run| dpb::DrainRequest { node_id, dry_run };
    expect_code(
        d.drain_node(req(0, false)).await,
        Code::InvalidArgument,
        "node_id is 0",
    );
    expect_code(
        d.drain_node(req(9, false)).await,
        Code::NotFound,
        "unknown node id 9",
    );
    expect_code(
        d.drain_node(req(9, true)).await,
        Code::NotFound,
        "unknown node id 9",
    );
    // Node 2 paused: draining node 1 would leave its VM only the Intel node.
    let paused = cl.pause(1, 2).await;
    cl.check(paused);
    expect_code(
        d.drain_node(req(1, false)).await,
        Code::FailedPrecondition,
        "VM stuck cannot go anywhere",
    );
    expect_code(
        d.drain_node(req(1, true)).await,
        Code::FailedPrecondition,
        "Intel CPUs",
    );
    // Node 3 paused too: node 1 is the last up node.
    let paused = cl.pause(1, 3).await;
    cl.check(paused);
    expect_code(
        d.drain_node(req(1, false)).await,
        Code::FailedPrecondition,
        "last up node",
    );
    // Resume refusals.
    let r = d
        .resume_node(dpb::ResumeRequest {
            node_id: 1,
            failback: true,
        })
        .await;
    assert!(
        matches!(&r, Err(s) if s.code() == Code::FailedPrecondition && s.message().contains("not paused")),
        "{r:?}"
    );
    let r = d
        .resume_node(dpb::ResumeRequest {
            node_id: 7,
            failback: false,
        })
        .await;
    assert!(matches!(&r, Err(s) if s.code() == Code::NotFound), "{r:?}");
    let r = d.get_drain(dpb::NodeRef { node_id: 1 }).await;
    assert!(
        matches!(&r, Err(s) if s.code() == Code::NotFound && s.message().contains("never been drained")),
        "{r:?}"
    );
    // Policy: bad mode / aggressiveness / interval.
    for (mode, aggr, interval_ms, text) in [
        ("sideways", "low", 0, "not a balancing mode"),
        ("even", "extreme", 0, "aggressiveness"),
        ("even", "low", 5, "below the minimum"),
    ] {
        let r = d
            .set_policy(dpb::PolicySpec {
                mode: mode.into(),
                aggressiveness: aggr.into(),
                interval_ms,
            })
            .await;
        assert!(
            matches!(&r, Err(s) if s.message().contains(text)),
            "{mode}/{aggr}/{interval_ms}: {r:?}"
        );
    }
    // Nothing changed: no job, policy none, node 1 still up and still running its VM.
    let jobs = d
        .list_jobs(dpb::ListJobsRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:?}");
    let p = d
        .get_policy(dpb::GetPolicyRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(p.mode, "none");
    let nodes = cl.check(cl.nodes(1).await);
    let n1 = |ns: &[cluster_proto::management::NodeInfo]| {
        ns.iter().find(|n| n.node_id == 1).map(|n| n.state.clone())
    };
    assert_eq!(n1(&nodes), n1(&before_nodes));
    let all = list(&cl, 1).await;
    assert!(
        all.iter()
            .all(|v| v.owner_id == 1 && v.runtime == "running"),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_policy_balances_an_unbalanced_cluster_and_none_moves_nothing() {
    let _serial = cluster_tests::serial().await;
    let mut cl = cluster();
    // Small nodes (1 GiB each) so a few test guests make node 1 hot.
    for id in 1..=3 {
        let added = cl.add_node_with(id, "[facts_override]\nmemory_bytes = 1073741824\n");
        cl.check(added);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    let vm_names = names("bal", 3);
    create_on(&cl, 1, 1, &vm_names, 256).await;
    let mut d = cl.drains(2).await;
    // Policy none (default) with a short interval: nothing moves.
    let p = d
        .set_policy(dpb::PolicySpec {
            mode: "none".into(),
            aggressiveness: "high".into(),
            interval_ms: 1000,
        })
        .await
        .unwrap_or_else(|e| panic!("policy: {e}{}", cl.logs()))
        .into_inner();
    assert_eq!((p.mode.as_str(), p.interval_ms), ("none", 1000));
    // The dry run under "even" names moves off node 1; it changes nothing.
    let plan = d
        .plan_balance(dpb::PlanBalanceRequest {
            mode: "even".into(),
            aggressiveness: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"))
        .into_inner();
    assert!(!plan.moves.is_empty(), "{plan:?}");
    assert!(plan.moves.iter().all(|m| m.from_node_id == 1));
    assert!(plan.spread_after_bp < plan.spread_before_bp, "{plan:?}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all = list(&cl, 2).await;
    assert!(
        all.iter().all(|v| v.owner_id == 1),
        "policy none moved a VM: {all:?}"
    );

    d.set_policy(dpb::PolicySpec {
        mode: "even".into(),
        aggressiveness: "high".into(),
        interval_ms: 1000,
    })
    .await
    .unwrap_or_else(|e| panic!("policy: {e}{}", cl.logs()));
    wait_until(&cl, "balanced", Duration::from_secs(120), || async {
        let all = list(&cl, 2).await;
        let on1 = all.iter().filter(|v| v.owner_id == 1).count();
        on1 < 3
            && all
                .iter()
                .all(|v| v.runtime == "running" && v.migrating_to == 0)
    })
    .await;
    let jobs = d
        .list_jobs(dpb::ListJobsRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner()
        .jobs;
    assert!(jobs.iter().any(|j| j.kind == "balance"), "{jobs:?}");
    // Balanced: the balancer plans nothing more.
    wait_until(
        &cl,
        "balance job finished",
        Duration::from_secs(60),
        || async {
            let mut d = cl.drains(2).await;
            d.list_jobs(dpb::ListJobsRequest {})
                .await
                .map(|r| r.into_inner().jobs.iter().all(|j| j.status != "running"))
                .unwrap_or(false)
        },
    )
    .await;
    let plan = d
        .plan_balance(dpb::PlanBalanceRequest::default())
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"))
        .into_inner();
    assert!(plan.moves.is_empty(), "{plan:?}");
    for n in &vm_names {
        heartbeat(&cl, 3, n).await;
    }
}
