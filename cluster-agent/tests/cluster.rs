//! End-to-end tests with real `cluster-agent` processes on loopback.

use cluster_proto::EnumName;
use std::time::{Duration, Instant};

use cluster_tests::{Cluster, HarnessError, Options, WAIT};

macro_rules! must {
    ($c:ident, $e:expr $(,)?) => {{
        let r = $e;
        $c.check(r)
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_formation() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(3).await;
    let leader = must!(c, r);
    for id in 1..=3 {
        let s = must!(c, c.status(id).await);
        assert_eq!(s.leader_id, leader, "node {id} disagrees on the leader");
        let mut voters = s.voter_ids.clone();
        voters.sort();
        assert_eq!(voters, vec![1, 2, 3], "node {id}");
        assert!(s.initialized);
        assert!(!s.cluster_id.is_empty());
    }
    // A write through a follower is forwarded to the leader and replicated everywhere.
    let follower = if leader == 1 { 2 } else { 1 };
    let put = must!(c, c.put(follower, "greeting", "hello").await);
    assert!(put.log_index > 0);
    for id in 1..=3 {
        let v = c
            .wait_for(id, "replicated key", WAIT, || async {
                c.get(id, "greeting").await
            })
            .await;
        assert_eq!(must!(c, v), "hello");
    }
    // The registry has every node Up with its facts and addresses.
    let nodes = must!(c, c.nodes(3).await);
    assert_eq!(nodes.len(), 3);
    for n in &nodes {
        assert_eq!(n.state().name(), "up");
        assert_eq!(n.raft_role().name(), "voter");
        let spec = must!(c, c.spec(n.node_id).cloned());
        assert_eq!(n.mgmt_addr, spec.mgmt_addr.to_string());
        assert_eq!(n.migration_addr, spec.migration_addr.to_string());
        assert_eq!(n.migration_subnet, "127.0.2.0/24");
        let f = n.facts.clone().unwrap_or_default();
        assert!(!f.cpu_vendor.is_empty() && f.logical_cpus >= 1 && f.memory_bytes > 0);
        assert!(["hardware", "software", "none"].contains(&f.kvm_kind().name()));
    }
    let events = must!(c, c.events(2).await);
    let kinds: Vec<&str> = events.iter().map(|e| e.kind().name()).collect();
    assert_eq!(kinds[0], "cluster_initialized");
    assert_eq!(kinds.iter().filter(|k| **k == "node_joined").count(), 3);
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    // ListEvents pages by page_size/page_token: pages of two give the same events in
    // order; after_seq filters; a token it never gave is refused.
    let mut mc = must!(c, c.client(2).await);
    let (mut paged, mut page_token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let r = mc
            .list_events(cluster_proto::management::ListEventsRequest {
                after_seq: 0,
                page_size: 2,
                page_token,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_inner();
        assert!(r.events.len() <= 2 && r.last_seq >= events[events.len() - 1].seq);
        pages += 1;
        paged.extend(r.events);
        if r.next_page_token.is_empty() {
            break;
        }
        page_token = r.next_page_token;
    }
    assert!(pages >= 2, "{pages} pages");
    let seqs = |v: &[cluster_proto::management::Event]| v.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&paged[..events.len()]), seqs(&events));
    assert!(
        events.iter().all(|e| e.at.is_some()),
        "every event has its time"
    );
    let tail = mc
        .list_events(cluster_proto::management::ListEventsRequest {
            after_seq: events[events.len() - 2].seq,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .into_inner();
    assert_eq!(
        tail.events.first().map(|e| e.seq),
        events.last().map(|e| e.seq)
    );
    let bad = mc
        .list_events(cluster_proto::management::ListEventsRequest {
            after_seq: 0,
            page_size: 0,
            page_token: "after:seven".into(),
        })
        .await;
    assert!(
        matches!(&bad, Err(s) if s.code() == tonic::Code::InvalidArgument),
        "{bad:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill9_new_leader_serves_writes_and_nothing_committed_is_lost() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(3).await;
    let leader = must!(c, r);
    // Enough writes to trigger snapshots and log purging (snapshot every 50 logs).
    for i in 0..120u32 {
        let via = 1 + u64::from(i % 3);
        must!(c, c.put(via, &format!("k{i}"), &format!("v{i}")).await);
    }
    must!(c, c.kill9(leader));
    let killed_at = Instant::now();
    let survivors: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let new_leader = must!(c, c.wait_leader(&survivors, WAIT).await);
    assert_ne!(new_leader, leader);
    // The new leader serves writes (through either survivor).
    let w = c
        .wait_for(survivors[0], "write after failover", WAIT, || async {
            Ok(c.put(survivors[0], "after", "failover").await.ok())
        })
        .await;
    must!(c, w);
    eprintln!(
        "failover: new leader {new_leader} served a write {} ms after kill -9",
        killed_at.elapsed().as_millis()
    );
    for id in &survivors {
        for i in 0..120u32 {
            let v = must!(c, c.get(*id, &format!("k{i}")).await);
            assert_eq!(
                v.as_deref(),
                Some(format!("v{i}").as_str()),
                "node {id} lost k{i}"
            );
        }
    }
    // The killed leader restarts from its data dir and catches up by itself.
    must!(c, c.start(leader).await);
    let v = c
        .wait_for(leader, "old leader catches up", WAIT, || async {
            c.get(leader, "after").await
        })
        .await;
    assert_eq!(must!(c, v), "failover");
    let s = must!(c, c.status(leader).await);
    assert_eq!(s.voter_ids.len(), 3);
    for i in 0..120u32 {
        let v = must!(c, c.get(leader, &format!("k{i}")).await);
        assert_eq!(v.as_deref(), Some(format!("v{i}").as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_cluster_restart_keeps_all_state() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(3).await;
    must!(c, r);
    for i in 0..80u32 {
        must!(c, c.put(1, &format!("key-{i}"), &i.to_string()).await);
    }
    let before_nodes = must!(c, c.nodes(1).await);
    let before_events = must!(c, c.events(1).await).len();
    let cluster_id = must!(c, c.status(1).await).cluster_id;
    // kill -9 all of them (node 2 after a clean stop, to cover both).
    must!(c, c.kill9(1));
    must!(c, c.stop(2));
    must!(c, c.kill9(3));
    for id in 1..=3 {
        must!(c, c.start(id).await);
    }
    let leader = must!(c, c.wait_leader(&[1, 2, 3], WAIT).await);
    for id in 1..=3 {
        let s = must!(c, c.status(id).await);
        assert_eq!(s.cluster_id, cluster_id);
        assert_eq!(s.voter_ids.len(), 3);
        for i in 0..80u32 {
            let v = must!(c, c.get(id, &format!("key-{i}")).await);
            assert_eq!(v, Some(i.to_string()), "node {id} lost key-{i}");
        }
    }
    let after_nodes = must!(c, c.nodes(leader).await);
    assert_eq!(after_nodes.len(), before_nodes.len());
    assert!(must!(c, c.events(leader).await).len() >= before_events);
    must!(c, c.put(2, "post-restart", "ok").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_goes_down_and_comes_back_up() {
    let _serial = cluster_tests::serial().await;
    let opts = Options {
        down_after_ms: 1_500,
        heartbeat_interval_ms: 150,
        ..Options::default()
    };
    let mut c = Cluster::agents(opts);
    let r = c.form(3).await;
    let leader = must!(c, r);
    let victim = (1..=3).find(|id| *id != leader).unwrap_or(3);
    let observer = (1..=3).find(|id| *id != victim).unwrap_or(1);
    must!(c, c.wait_node_state(observer, victim, "up", WAIT).await,);
    must!(c, c.kill9(victim));
    let killed = Instant::now();
    must!(c, c.wait_node_state(observer, victim, "down", WAIT).await,);
    let down_after = killed.elapsed();
    eprintln!(
        "node {victim} marked down {} ms after kill -9 (down_after_ms 1500)",
        down_after.as_millis()
    );
    // Not before the configured silence.
    assert!(down_after >= Duration::from_millis(1_200), "{down_after:?}");
    must!(c, c.start(victim).await);
    must!(c, c.wait_node_state(observer, victim, "up", WAIT).await,);
    let events = must!(c, c.events(observer).await);
    let transitions: Vec<&str> = events
        .iter()
        .filter(|e| e.kind().name() == "node_state_changed" && e.node_id == victim)
        .map(|e| e.message.as_str())
        .collect();
    assert!(
        transitions.iter().any(|m| m.contains("up -> down")),
        "{transitions:?}"
    );
    assert!(
        transitions.iter().any(|m| m.contains("down -> up")),
        "{transitions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_16_voters_refuse_the_17th_and_shrink_back() {
    let _serial = cluster_tests::serial().await;
    let opts = Options {
        // 17 debug processes share 2 cores: be patient with elections.
        election_timeout_min_ms: 2_000,
        election_timeout_max_ms: 4_000,
        raft_heartbeat_interval_ms: 300,
        heartbeat_interval_ms: 500,
        down_after_ms: 10_000,
        ..Options::default()
    };
    let mut c = Cluster::agents(opts);
    let r = c.form(1).await;
    must!(c, r);
    for id in 2..=16 {
        must!(c, c.add_node(id));
        must!(c, c.start(id).await);
        // Join through different members to exercise forwarding.
        let via = 1 + (id % (id - 1));
        let j = must!(c, c.join(id, via).await);
        assert_eq!(j.voter_count, id);
    }
    let s = must!(c, c.status(1).await);
    assert_eq!(s.voter_ids.len(), 16);
    assert_eq!(must!(c, c.nodes(5).await).len(), 16);

    must!(c, c.add_node(17));
    must!(c, c.start(17).await);
    match c.join(17, 3).await {
        Err(HarnessError::Rpc { status, .. }) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
            assert!(
                status.message().contains("16 voters"),
                "{}",
                status.message()
            );
            assert!(
                status.message().contains("maximum is 16"),
                "{}",
                status.message()
            );
        }
        other => panic!("17th voter was not refused: {other:?}"),
    }
    let s17 = must!(c, c.status(17).await);
    assert!(
        !s17.initialized,
        "the refused agent must stay outside the cluster"
    );
    assert_eq!(must!(c, c.status(1).await).voter_ids.len(), 16);
    must!(c, c.kill9(17));

    // Shrink back to 3, removing through various members, including the leader.
    for id in (4..=16).rev() {
        let via = 1 + (id % 3);
        let r = must!(c, c.leave(via, id).await);
        assert_eq!(r.voter_count, id - 1);
        must!(c, c.stop(id));
    }
    let leader = must!(c, c.wait_leader(&[1, 2, 3], WAIT).await);
    let s = must!(c, c.status(leader).await);
    let mut voters = s.voter_ids.clone();
    voters.sort();
    assert_eq!(voters, vec![1, 2, 3]);
    assert_eq!(must!(c, c.nodes(leader).await).len(), 3);
    must!(c, c.put(2, "after-shrink", "ok").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_is_brought_up_by_snapshot_after_log_compaction() {
    let _serial = cluster_tests::serial().await;
    // Snapshot every 50 entries, keep 20: after 150 writes the early log is purged,
    // so a node joining now can only catch up through InstallSnapshot.
    let mut c = Cluster::agents(Options::default());
    let r = c.form(2).await;
    let leader = must!(c, r);
    for i in 0..150u32 {
        must!(c, c.put(leader, &format!("s{i}"), &i.to_string()).await);
    }
    let s = c
        .wait_for(leader, "snapshot built", WAIT, || async {
            let s = c.status(leader).await?;
            Ok((s.snapshot_index > 100).then_some(s))
        })
        .await;
    let s = must!(c, s);
    eprintln!(
        "leader snapshot at index {} (last log {})",
        s.snapshot_index, s.last_log_index
    );
    must!(c, c.add_node(3));
    must!(c, c.start(3).await);
    let j = must!(c, c.join(3, 1).await);
    assert_eq!(j.voter_count, 3);
    let s3 = c
        .wait_for(3, "snapshot installed on the new node", WAIT, || async {
            let s = c.status(3).await?;
            Ok((s.snapshot_index > 100).then_some(s))
        })
        .await;
    let s3 = must!(c, s3);
    assert!(s3.initialized && s3.voter_ids.len() == 3, "{s3:?}");
    assert!(
        s3.snapshot_index > 100,
        "node 3 did not install a snapshot: {s3:?}"
    );
    for i in 0..150u32 {
        assert_eq!(
            must!(c, c.get(3, &format!("s{i}")).await),
            Some(i.to_string())
        );
    }
    assert_eq!(must!(c, c.nodes(3).await).len(), 3);
    // And it survives a restart from its own snapshot + log.
    must!(c, c.kill9(3));
    must!(c, c.start(3).await);
    assert_eq!(must!(c, c.get(3, "s149").await).as_deref(), Some("149"));
}

/// kill -9 of every agent while writes are in flight (through the leader and through
/// both followers), then a restart of all three: every acknowledged write is on every
/// node. State-machine applies are not synced (the log is); a restarted node rebuilds
/// whatever its state machine lacks from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9_of_every_agent_during_writes() {
    use cluster_proto::management as pb;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    let r = c.form(3).await;
    let leader = must!(c, r);
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, via) in [leader, leader, followers[0], followers[1]]
        .into_iter()
        .enumerate()
    {
        let mut cl = must!(c, c.client(via).await);
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("w{w}-{i}");
                let put = cl.put_kv(pb::PutKvRequest {
                    key: key.clone(),
                    value: format!("v{i}"),
                });
                match tokio::time::timeout(Duration::from_secs(2), put).await {
                    Ok(Ok(_)) => acked.push((key, format!("v{i}"))),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                i += 1;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    must!(c, c.kill9(leader));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for id in &followers {
        must!(c, c.kill9(*id));
    }
    stop.store(true, Ordering::SeqCst);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap_or_else(|e| panic!("writer: {e}")));
    }
    assert!(
        acked.len() >= 20,
        "only {} writes were acknowledged before the kills",
        acked.len()
    );
    for id in 1..=3 {
        must!(c, c.start(id).await);
    }
    must!(c, c.wait_leader(&[1, 2, 3], WAIT).await);
    let w = c
        .wait_for(1, "a write after the restart", WAIT, || async {
            Ok(c.put(1, "after-restart", "ok").await.ok())
        })
        .await;
    must!(c, w);
    for id in 1..=3 {
        // Applied in log order: once "after-restart" is there, all before it is.
        let v = c
            .wait_for(id, "the write after the restart", WAIT, || async {
                c.get(id, "after-restart").await
            })
            .await;
        assert_eq!(must!(c, v), "ok");
        for (key, value) in &acked {
            let got = must!(c, c.get(id, key).await);
            assert_eq!(
                got.as_deref(),
                Some(value.as_str()),
                "node {id} lost the acknowledged write {key}"
            );
        }
    }
    eprintln!(
        "{} acknowledged writes survived kill -9 of all three agents",
        acked.len()
    );
}
