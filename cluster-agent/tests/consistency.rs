//! Consistency seen by a client of one agent: a write through a follower is visible to a
//! read on that same follower as soon as the write is answered (read-your-writes).

use cluster_proto::EnumName;
use cluster_tests::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_is_read_back_from_that_follower() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"));
    let r = c.form(3).await;
    let leader = c.check(r);
    let follower = if leader == 1 { 2 } else { 1 };
    // Each read comes right after its write's answer: without read-your-writes the
    // follower answers from a replica that has not applied the write yet (the leader
    // tells followers the new commit index only with its next message).
    for i in 0..40 {
        let key = format!("ryw-{i}");
        let value = format!("v{i}");
        let put = c.put(follower, &key, &value).await;
        let put = c.check(put);
        assert!(put.log_index > 0);
        let got = c.get(follower, &key).await;
        let got = c.check(got);
        assert_eq!(
            got.as_deref(),
            Some(value.as_str()),
            "write {i} (log index {}) through follower {follower} not read back there",
            put.log_index
        );
    }
}

/// Send `sig` (e.g. "STOP", "CONT") to node `id`'s agent.
fn signal(cl: &Cluster, id: u64, sig: &str) {
    let pid = cl
        .pid(id)
        .unwrap_or_else(|| panic!("node {id} has no running agent"));
    let ok = std::process::Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// A console followed through another agent while the VM's owner goes silent (SIGSTOP:
/// no connection reset, like a host that lost power or was cut off): the proxied stream
/// ends once the proxy's replica shows the VM failed over, and a reopen through the same
/// agent streams from the new owner — it does not hang on the silent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_console_leaves_a_silent_owner_and_reopens_at_the_new_one() {
    use cluster_proto::vms as pb;
    use cluster_tests::vm::guest_spec;
    use cluster_tests::vm::mem_boot;
    use cluster_tests::WAIT;

    let _serial = cluster_tests::serial().await;
    let mut cl = Cluster::vm_agents();
    let formed = cl.form(3).await;
    let leader = cl.check(formed);
    let (owner, proxy) = match leader {
        1 => (2, 3),
        2 => (3, 1),
        _ => (1, 2),
    };
    let spec = pb::VmSpec {
        preferred_owners: vec![owner],
        ..guest_spec("con", 64, mem_boot())
    };
    let v = cl.create_running(leader, spec).await;
    assert_eq!(v.owner_id, owner);
    let mut c = cl.vms(proxy).await;
    let mut stream = c
        .stream_console(pb::StreamConsoleRequest {
            name: "con".into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("console via node {proxy}: {e}{}", cl.logs()))
        .into_inner();
    let first = stream.message().await;
    assert!(
        matches!(&first, Ok(Some(ch)) if ch.node_id == owner),
        "first chunk from the owner: {first:?}"
    );
    signal(&cl, owner, "STOP");
    // Until the stream ends: lines still buffered from the owner may arrive first.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    let moved = cl.wait_vm(leader, "con", "failed over", |v| {
        v.owner_id != owner && v.runtime().name() == "running"
    });
    let moved = moved.await;
    signal(&cl, owner, "CONT");
    assert!(
        ended.is_ok(),
        "the proxied console hung on the silent owner for {WAIT:?}{}",
        cl.logs()
    );
    let mut again = c
        .stream_console(pb::StreamConsoleRequest {
            name: "con".into(),
            follow: false,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("reopen via node {proxy}: {e}{}", cl.logs()))
        .into_inner();
    let chunk = again.message().await;
    assert!(
        matches!(&chunk, Ok(Some(ch)) if ch.node_id == moved.owner_id),
        "the reopened console streams from the new owner {}: {chunk:?}",
        moved.owner_id
    );
}
