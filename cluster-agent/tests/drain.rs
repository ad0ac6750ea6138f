//! Maintenance drain, failback and balancing jobs end to end with real `cluster-agent`
//! processes on loopback: the leader plans with the scheduler, commits the job through
//! Raft and runs it with at most one migration per node; the guests (the PVH test guest)
//! keep their heartbeats and memory checks across every move.

use cluster_proto::EnumName;
use std::collections::BTreeMap;

use cluster_proto::drain as dpb;
use cluster_proto::vms as pb;
use cluster_tests::vm::{cpu_vendor_toml, expect_code, guest_spec, mem_boot, vm_name};
use cluster_tests::{Cluster, WAIT};
use tonic::Code;

fn spec(name: &str, memory_mib: u64, preferred: u64) -> pb::VmSpec {
    pb::VmSpec {
        preferred_owners: vec![preferred],
        ..guest_spec(name, memory_mib, mem_boot())
    }
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
    cl.wait_vms(via, &format!("{names:?} running on node {node}"), |all| {
        names.iter().all(|n| {
            all.iter()
                .any(|v| vm_name(v) == n && v.runtime().name() == "running" && v.owner_id == node)
        })
    })
    .await;
}

/// The drain job of `node` as the first of `via` that answers shows it.
async fn drain_job(cl: &Cluster, via: &[u64], node: u64) -> Result<Option<dpb::JobInfo>, String> {
    let mut last = String::from("no node asked");
    for v in via {
        let mut d = cl.drains(*v).await;
        match d.get_drain(dpb::GetDrainRequest { node_id: node }).await {
            Ok(r) => return Ok(r.into_inner().job),
            Err(e) => last = format!("node {v}: {e}"),
        }
    }
    Err(last)
}

/// The drain job of `node` once `pred` holds for it.
async fn wait_job(
    cl: &Cluster,
    via: &[u64],
    node: u64,
    what: &str,
    pred: impl Fn(&dpb::JobInfo) -> bool,
) -> dpb::JobInfo {
    cl.wait_until(
        &format!("drain of node {node}: {what}"),
        WAIT,
        || drain_job(cl, via, node),
        |j| j.as_ref().is_some_and(&pred),
    )
    .await
    .unwrap_or_default()
}

/// Every job, read through node `via`.
async fn jobs(cl: &Cluster, via: u64) -> Result<Vec<dpb::JobInfo>, tonic::Status> {
    let mut d = cl.drains(via).await;
    d.list_jobs(dpb::ListJobsRequest::default())
        .await
        .map(|r| r.into_inner().jobs)
}

/// The heartbeat sequence number of each of `names` (through node `via`), each above
/// the one in `after` (a guest that counts past it is alive and kept its memory).
async fn heartbeats_after(
    cl: &Cluster,
    via: u64,
    names: &[String],
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for n in names {
        let seq = after.get(n).copied().unwrap_or(0);
        out.insert(n.clone(), cl.heartbeat_after(via, n, seq).await);
    }
    out
}

fn seqs(hb: &BTreeMap<String, (u64, u64)>) -> BTreeMap<String, u64> {
    hb.iter().map(|(n, (_, seq))| (n.clone(), *seq)).collect()
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
    for e in events.iter().filter(|e| e.kind().name() == "vm") {
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
                        start_ms: cluster_proto::times::unix_ms(e.at.as_ref()),
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
                s.end_ms = cluster_proto::times::unix_ms(e.at.as_ref());
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
    let mut cl = Cluster::vm_agents();
    let formed = cl.form(4).await;
    cl.check(formed);
    let vm_names = names("dr", 4);
    create_on(&cl, 2, 1, &vm_names, 64).await;
    let before = seqs(&heartbeats_after(&cl, 3, &vm_names, &BTreeMap::new()).await);
    let mut d = cl.drains(3).await;

    // Dry run: the plan (every VM off node 1), nothing committed.
    let dry = d
        .drain_node(dpb::DrainNodeRequest {
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
    assert!(
        cluster_proto::times::unix_ms(dry.planned_finish_at.as_ref())
            > cluster_proto::times::unix_ms(dry.planned_start_at.as_ref())
    );
    cl.barrier().await;
    let nodes = cl.check(cl.nodes(3).await);
    assert!(nodes.iter().all(|n| n.state().name() == "up"), "{nodes:?}");

    let started = d
        .drain_node(dpb::DrainNodeRequest {
            node_id: 1,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()))
        .into_inner();
    let job = started.job.unwrap_or_default();
    assert_eq!((job.kind().name(), job.node_id), ("drain", 1), "{job:?}");
    // Its updates stream (WatchJob) from another agent until it ends; new events too.
    let mut watch = cl
        .drains(2)
        .await
        .watch_job(dpb::WatchJobRequest { id: job.id })
        .await
        .unwrap_or_else(|e| panic!("watch job: {e}{}", cl.logs()))
        .into_inner();
    let mut events = cl
        .check(cl.client(2).await)
        .watch_events(cluster_proto::management::WatchEventsRequest { after_seq: 0 })
        .await
        .unwrap_or_else(|e| panic!("watch events: {e}{}", cl.logs()))
        .into_inner();
    // A second drain of the same node is refused while the first runs.
    let again = d
        .drain_node(dpb::DrainNodeRequest {
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
    cl.check(cl.wait_node_state(2, 1, "paused", WAIT).await);

    let done = wait_job(&cl, &[3], 1, "ended", |j| j.status().name() != "running").await;
    let done = if done.id != job.id {
        drain_job(&cl, &[3], 1)
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        done
    };
    assert_eq!(done.status().name(), "done", "{done:?}");
    let mut updates = Vec::new();
    while let Some(u) = tokio::time::timeout(WAIT, watch.message())
        .await
        .unwrap_or_else(|_| panic!("the job watch ended in time: {updates:?}"))
        .unwrap_or_else(|e| panic!("watch job: {e}"))
    {
        updates.push(u.job.unwrap_or_default());
    }
    let last = updates.last().cloned().unwrap_or_default();
    assert_eq!(
        (last.id, last.status().name()),
        (job.id, "done"),
        "{updates:?}"
    );
    assert!(
        updates.len() >= 2,
        "the running job, then its end: {updates:?}"
    );
    let got = cl
        .drains(3)
        .await
        .get_job(dpb::GetJobRequest { id: job.id })
        .await
        .unwrap_or_else(|e| panic!("get job: {e}"))
        .into_inner()
        .job;
    assert_eq!(got.as_ref().map(|j| j.status().name()), Some("done"));
    let mut kinds = Vec::new();
    while !kinds.contains(&"job") {
        let e = tokio::time::timeout(WAIT, events.message())
            .await
            .unwrap_or_else(|_| panic!("a job event in time: {kinds:?}"))
            .unwrap_or_else(|e| panic!("watch events: {e}"))
            .and_then(|e| e.event)
            .unwrap_or_else(|| panic!("the event stream ended: {kinds:?}"));
        kinds.push(e.kind().name());
    }
    let all = cl.list_vms(3).await;
    assert!(
        all.iter()
            .all(|v| v.owner_id != 1 && v.runtime().name() == "running"),
        "{all:?}"
    );
    // Every guest continues (heartbeat sequence goes on, memory checks pass) elsewhere.
    let drained = heartbeats_after(&cl, 3, &vm_names, &before).await;
    for (n, (node, _)) in &drained {
        assert_ne!(*node, 1, "{n}");
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
                .any(|e| e.kind().name() == "job" && e.message.contains(want)),
            "no job event with {want:?}: {:#?}",
            events.iter().map(|e| &e.message).collect::<Vec<_>>()
        );
    }

    // Resume with failback: the node is up again and the drained VMs come back.
    let r = d
        .resume_node(dpb::ResumeNodeRequest {
            node_id: 1,
            failback: true,
        })
        .await
        .unwrap_or_else(|e| panic!("resume: {e}{}", cl.logs()))
        .into_inner();
    let fb = r.job.clone().unwrap_or_default();
    assert_eq!(fb.kind().name(), "failback", "{r:?}");
    assert!(!fb.moves.is_empty(), "{r:?}");
    cl.check(cl.wait_node_state(2, 1, "up", WAIT).await);
    let fb_moves: Vec<String> = fb.moves.iter().map(|m| m.vm.clone()).collect();
    cl.wait_until(
        "failback job done",
        WAIT,
        || jobs(&cl, 2),
        |jobs| {
            jobs.iter()
                .any(|j| j.id == fb.id && j.status().name() == "done")
        },
    )
    .await;
    let all = cl.list_vms(2).await;
    for n in &fb_moves {
        let v = all
            .iter()
            .find(|v| vm_name(v) == n)
            .cloned()
            .unwrap_or_default();
        assert_eq!(v.owner_id, 1, "{n} back home: {v:?}");
    }
    heartbeats_after(&cl, 4, &vm_names, &seqs(&drained)).await;
    let events = cl.check(cl.events(2).await);
    assert_no_overlap(&migrations(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_midway_keeps_moved_vms_drops_queued_and_draining_again_resumes() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let formed = cl.form(4).await;
    cl.check(formed);
    let vm_names = names("ab", 5);
    create_on(&cl, 1, 2, &vm_names, 64).await;
    let before = seqs(&heartbeats_after(&cl, 3, &vm_names, &BTreeMap::new()).await);
    let mut d = cl.drains(1).await;
    let job = d
        .drain_node(dpb::DrainNodeRequest {
            node_id: 2,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    // Abort as soon as the first VM has moved.
    wait_job(&cl, &[1], 2, "first move done", |j| {
        j.moves.iter().any(|m| m.status().name() == "done")
    })
    .await;
    let aborted = d
        .abort_drain(dpb::AbortDrainRequest { node_id: 2 })
        .await
        .unwrap_or_else(|e| panic!("abort: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    assert_eq!((aborted.id, aborted.status().name()), (job.id, "aborted"));
    let dropped = aborted
        .moves
        .iter()
        .filter(|m| m.status().name() == "dropped")
        .count();
    assert!(dropped >= 1, "queued moves dropped: {aborted:?}");
    // Aborting again: nothing runs.
    expect_code(
        d.abort_drain(dpb::AbortDrainRequest { node_id: 2 }).await,
        Code::FailedPrecondition,
        "no running drain",
    );
    // In-flight migrations finish; the job then has no move queued or in flight (the
    // aborted job has nothing left to start) and nothing is lost.
    let j = wait_job(&cl, &[1], 2, "no move in flight", |j| {
        j.moves
            .iter()
            .all(|m| m.status().name() != "queued" && m.status().name() != "in_flight")
    })
    .await;
    assert_eq!(j.status().name(), "aborted", "{j:?}");
    let after_abort = cl
        .wait_vms(1, "no migration in flight", |all| {
            all.iter().all(|v| v.migrating_to == 0)
        })
        .await;
    assert_eq!(after_abort.len(), 5);
    assert!(
        after_abort.iter().all(|v| v.desired().name() == "running"),
        "{after_abort:?}"
    );
    let moved: Vec<&str> = after_abort
        .iter()
        .filter(|v| v.owner_id != 2)
        .map(vm_name)
        .collect();
    let stayed = after_abort.len() - moved.len();
    assert!(!moved.is_empty() && stayed >= 1, "{after_abort:?}");
    let nodes = cl.check(cl.nodes(1).await);
    assert!(nodes
        .iter()
        .any(|n| n.node_id == 2 && n.state().name() == "paused"));
    let alive = seqs(&heartbeats_after(&cl, 3, &vm_names, &before).await);

    // Draining again resumes: a new job moves only the VMs still there.
    let resumed = d
        .drain_node(dpb::DrainNodeRequest {
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
    let done = wait_job(&cl, &[1], 2, "ended", |j| j.status().name() != "running").await;
    assert_eq!(done.status().name(), "done", "{done:?}");
    let all = cl.list_vms(1).await;
    assert!(
        all.iter()
            .all(|v| v.owner_id != 2 && v.runtime().name() == "running"),
        "{all:?}"
    );
    heartbeats_after(&cl, 3, &vm_names, &alive).await;
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
    let mut cl = Cluster::vm_agents();
    let formed = cl.form(4).await;
    let leader = cl.check(formed);
    let victim = if leader == 2 { 3 } else { 2 };
    let others: Vec<u64> = (1..=4).filter(|n| *n != leader).collect();
    let vm_names = names("lk", 4);
    create_on(&cl, victim, victim, &vm_names, 64).await;
    let mut d = cl.drains(others[0]).await;
    let job = d
        .drain_node(dpb::DrainNodeRequest {
            node_id: victim,
            dry_run: false,
        })
        .await
        .unwrap_or_else(|e| panic!("drain: {e}{}", cl.logs()))
        .into_inner()
        .job
        .unwrap_or_default();
    wait_job(&cl, &others[..1], victim, "a move started", |j| {
        j.moves.iter().any(|m| m.status().name() != "queued")
    })
    .await;
    let killed = cl.kill9(leader);
    cl.check(killed);
    let new_leader = cl.check(cl.wait_leader(&others, WAIT).await);
    assert_ne!(new_leader, leader);
    let done = wait_job(&cl, &others, victim, "ended", |j| {
        j.status().name() != "running"
    })
    .await;
    assert_eq!(
        (done.id, done.status().name()),
        (job.id, "done"),
        "{done:?}"
    );
    // The drained node is empty; every VM runs (those that had landed on the killed
    // leader were failed over by the new leader).
    cl.wait_vms(others[0], "every VM running off the drained node", |all| {
        all.len() == vm_names.len()
            && all.iter().all(|v| {
                v.owner_id != victim && v.owner_id != leader && v.runtime().name() == "running"
            })
    })
    .await;
    // No move was started twice: each VM has at most one done move in the job.
    for n in &vm_names {
        let k = done
            .moves
            .iter()
            .filter(|m| &m.vm == n && m.status().name() == "done")
            .count();
        assert!(k <= 1, "{n} moved {k} times: {done:?}");
    }
    // Running guests (those failed over were rebooted: any heartbeat will do).
    heartbeats_after(&cl, others[0], &vm_names, &BTreeMap::new()).await;
    let events = cl.check(cl.events(others[0]).await);
    assert_no_overlap(&migrations(&events));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_drain_requests_are_refused_and_change_nothing() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    // Nodes 1 and 2 report AMD CPUs, node 3 Intel (whatever the host has): no VM of the
    // AMD nodes can move to node 3.
    for (id, vendor) in [
        (1, "AuthenticAMD"),
        (2, "AuthenticAMD"),
        (3, "GenuineIntel"),
    ] {
        let added = cl.add_node_with(id, &cpu_vendor_toml(vendor));
        cl.check(added);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    create_on(&cl, 1, 1, &["stuck".to_string()], 64).await;
    let mut d = cl.drains(2).await;
    let before_nodes = cl.check(cl.nodes(1).await);
    let req = |node_id, dry_run| dpb::DrainNodeRequest { node_id, dry_run };
    for (r, code, needle) in [
        (req(0, false), Code::InvalidArgument, "node_id is 0"),
        (req(9, false), Code::NotFound, "unknown node id 9"),
        (req(9, true), Code::NotFound, "unknown node id 9"),
    ] {
        expect_code(d.drain_node(r).await, code, needle);
    }
    // Node 2 paused: draining node 1 would leave its VM only the Intel node.
    let paused = cl.pause(1, 2).await;
    cl.check(paused);
    for (r, code, needle) in [
        (
            req(1, false),
            Code::FailedPrecondition,
            "VM stuck cannot go anywhere",
        ),
        (req(1, true), Code::FailedPrecondition, "Intel CPUs"),
    ] {
        expect_code(d.drain_node(r).await, code, needle);
    }
    // Node 3 paused too: node 1 is the last up node.
    let paused = cl.pause(1, 3).await;
    cl.check(paused);
    expect_code(
        d.drain_node(req(1, false)).await,
        Code::FailedPrecondition,
        "last up node",
    );
    // Resume refusals.
    for (node_id, failback, code, needle) in [
        (1, true, Code::FailedPrecondition, "not paused"),
        (7, false, Code::NotFound, "unknown node id 7"),
    ] {
        expect_code(
            d.resume_node(dpb::ResumeNodeRequest { node_id, failback })
                .await,
            code,
            needle,
        );
    }
    expect_code(
        d.get_drain(dpb::GetDrainRequest { node_id: 1 }).await,
        Code::NotFound,
        "never been drained",
    );
    // Policy: bad mode / aggressiveness / interval.
    for (mode, aggr, interval_ms, needle) in [
        ("sideways", "low", 0, "not a balancing mode"),
        ("even", "extreme", 0, "aggressiveness"),
        ("even", "low", 5, "below the minimum"),
    ] {
        expect_code(
            d.set_policy(dpb::SetPolicyRequest {
                policy: Some(dpb::PolicySpec {
                    mode: dpb::BalanceMode::from_name(mode).map_or(99, |m| m as i32),
                    aggressiveness: dpb::Aggressiveness::from_name(aggr).map_or(99, |a| a as i32),
                    interval: Some(cluster_proto::times::duration_from_ms(interval_ms)),
                    ..Default::default()
                }),
            })
            .await,
            Code::InvalidArgument,
            needle,
        );
    }
    // Nothing changed: once every node has applied a later write, there is no job, the
    // policy is none, node 1 is still up and still runs its VM.
    cl.barrier().await;
    let jobs = jobs(&cl, 2).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(jobs.is_empty(), "{jobs:?}");
    let p = d
        .get_policy(dpb::GetPolicyRequest {})
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(p.policy.map(|p| p.mode()), Some(dpb::BalanceMode::None));
    let nodes = cl.check(cl.nodes(1).await);
    let n1 = |ns: &[cluster_proto::management::NodeInfo]| {
        ns.iter().find(|n| n.node_id == 1).map(|n| n.state)
    };
    assert_eq!(n1(&nodes), n1(&before_nodes));
    let all = cl.list_vms(1).await;
    assert!(
        all.iter()
            .all(|v| v.owner_id == 1 && v.runtime().name() == "running"),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_policy_balances_an_unbalanced_cluster_and_none_moves_nothing() {
    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    // Small nodes (1 GiB each) so a few test guests make node 1 hot.
    let mut metrics = BTreeMap::new();
    for id in 1..=3u64 {
        let a = cluster_tests::free_port([127, 0, 1, id as u8]);
        let a = cl.check(a);
        let added = cl.add_node_with(
            id,
            &format!("metrics_addr = \"{a}\"\n[facts_override]\nmemory_bytes = 1073741824\n"),
        );
        cl.check(added);
        metrics.insert(id, a);
    }
    let formed = cl.form(3).await;
    cl.check(formed);
    let vm_names = names("bal", 3);
    create_on(&cl, 1, 1, &vm_names, 256).await;
    let before = seqs(&heartbeats_after(&cl, 3, &vm_names, &BTreeMap::new()).await);
    let mut d = cl.drains(2).await;
    // Policy none (default) with a short interval: nothing moves.
    let p = d
        .set_policy(dpb::SetPolicyRequest {
            policy: Some(dpb::PolicySpec {
                mode: dpb::BalanceMode::from_name("none").map_or(99, |m| m as i32),
                aggressiveness: dpb::Aggressiveness::from_name("high").map_or(99, |a| a as i32),
                interval: Some(cluster_proto::times::duration_from_ms(1000)),
                ..Default::default()
            }),
        })
        .await
        .unwrap_or_else(|e| panic!("policy: {e}{}", cl.logs()))
        .into_inner();
    let p = p.policy.unwrap_or_default();
    assert_eq!(
        (p.mode(), p.interval),
        (
            dpb::BalanceMode::None,
            Some(cluster_proto::times::duration_from_ms(1000))
        )
    );
    // The dry run under "even" names moves off node 1; it changes nothing.
    let plan = d
        .plan_balance(dpb::PlanBalanceRequest {
            mode: dpb::BalanceMode::from_name("even").map_or(99, |m| m as i32),
            aggressiveness: 0,
        })
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"))
        .into_inner();
    assert!(!plan.moves.is_empty(), "{plan:?}");
    assert!(plan.moves.iter().all(|m| m.from_node_id == 1));
    assert!(plan.spread_after_bp < plan.spread_before_bp, "{plan:?}");
    // The leader's balancer looks once per interval (1 s) and counts its looks
    // (`cluster_balance_rounds_total`): three looks under "none" that moved nothing.
    let leader = cl
        .wait_leader(&[1, 2, 3], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let maddr = metrics[&leader];
    let rounds = move || {
        let (_, body) = cluster_tests::http_get(maddr, "/metrics");
        cluster_tests::metric_sample(
            &body,
            &format!("cluster_balance_rounds_total{{node=\"{leader}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let seen = rounds();
    cl.wait_until(
        "three more balancer rounds under policy none",
        WAIT,
        || async { Ok::<f64, String>(rounds()) },
        |r: &f64| *r >= seen + 3.0,
    )
    .await;
    cl.barrier().await;
    let all = cl.list_vms(2).await;
    assert!(
        all.iter().all(|v| v.owner_id == 1 && v.migrating_to == 0),
        "policy none moved a VM: {all:?}"
    );
    assert!(jobs(&cl, 2).await.is_ok_and(|j| j.is_empty()));

    d.set_policy(dpb::SetPolicyRequest {
        policy: Some(dpb::PolicySpec {
            mode: dpb::BalanceMode::from_name("even").map_or(99, |m| m as i32),
            aggressiveness: dpb::Aggressiveness::from_name("high").map_or(99, |a| a as i32),
            interval: Some(cluster_proto::times::duration_from_ms(1000)),
            ..Default::default()
        }),
    })
    .await
    .unwrap_or_else(|e| panic!("policy: {e}{}", cl.logs()));
    cl.wait_vms(2, "balanced", |all| {
        let on1 = all.iter().filter(|v| v.owner_id == 1).count();
        on1 < 3
            && all
                .iter()
                .all(|v| v.runtime().name() == "running" && v.migrating_to == 0)
    })
    .await;
    let jobs_now = jobs(&cl, 2).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        jobs_now.iter().any(|j| j.kind().name() == "balance"),
        "{jobs_now:?}"
    );
    // Balanced: the balancer plans nothing more.
    cl.wait_until(
        "balance job finished",
        WAIT,
        || jobs(&cl, 2),
        |jobs| jobs.iter().all(|j| j.status().name() != "running"),
    )
    .await;
    let plan = d
        .plan_balance(dpb::PlanBalanceRequest::default())
        .await
        .unwrap_or_else(|e| panic!("plan: {e}"))
        .into_inner();
    assert!(plan.moves.is_empty(), "{plan:?}");
    heartbeats_after(&cl, 3, &vm_names, &before).await;
}
