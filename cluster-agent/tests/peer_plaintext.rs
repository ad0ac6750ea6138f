//! The plaintext peer plane (`raft_insecure_plaintext`, an operator's opt-in for an
//! isolated network): a cluster forms and commits over it, `node show` reports it, and
//! it still refuses what it can tell apart without certificates — a caller from an address
//! that is no member's, a message in another member's name, a node whose peer plane is
//! TLS, and any request for a CA key.

use std::net::SocketAddr;

use cluster_proto::management as pb;
use cluster_proto::raft::raft_peer_service_client::RaftPeerServiceClient;
use cluster_proto::raft::{AppendEntriesStreamRequest, FetchCaKeyRequest, HeartbeatRequest};
use cluster_tests::{Cluster, HarnessError, Options};
use tonic::Code;

const PLAINTEXT: &str = "raft_insecure_plaintext = true\n";

/// A plaintext (h2c) peer client of `to`, connecting from `from_ip`.
async fn peer_from(
    from_ip: [u8; 4],
    to: SocketAddr,
) -> RaftPeerServiceClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .local_address(Some(std::net::IpAddr::from(from_ip)))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {to}: {e}"));
    RaftPeerServiceClient::new(ch)
}

fn heartbeat(node_id: u64) -> HeartbeatRequest {
    HeartbeatRequest {
        node_id,
        incarnation: 1,
        silences: vec![],
        demand: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_peer_plane_commits_and_refuses_what_it_can() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::agents(Options::default());
    for id in 1..=3 {
        c.add_node_with(id, PLAINTEXT)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let formed = c.form(3).await;
    let leader = c.check(formed);
    let follower = (1..=3).find(|i| *i != leader).unwrap_or(2);
    // Writes through a follower are forwarded and replicated over the plaintext plane.
    c.put(follower, "k", "v")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for id in 1..=3 {
        let found = c
            .wait_for(id, "apply k", std::time::Duration::from_secs(20), || {
                c.get(id, "k")
            })
            .await;
        assert_eq!(c.check(found), "v");
    }
    for n in c.nodes(1).await.unwrap_or_else(|e| panic!("{e}")) {
        assert!(
            n.raft_plaintext,
            "node {} reports its peer plane",
            n.node_id
        );
    }

    let raft3 = c
        .spec(3)
        .map(|s| s.raft_addr)
        .unwrap_or_else(|e| panic!("{e}"));
    // From an address that is no member's raft address: refused.
    let e = peer_from([127, 0, 1, 9], raft3)
        .await
        .heartbeat(heartbeat(1))
        .await
        .expect_err("a stranger's heartbeat");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("not the raft address of a member"),
        "{}",
        e.message()
    );
    // From member 2's address in member 1's name: refused.
    let e = peer_from([127, 0, 1, 2], raft3)
        .await
        .heartbeat(heartbeat(1))
        .await
        .expect_err("a heartbeat in another member's name");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("in the name of node 1 from node 2"),
        "{}",
        e.message()
    );
    // The same on an AppendEntries stream: a stranger address cannot open one, and a
    // member's stream ends at the first AppendEntries in another member's name.
    let (_tx, rx) = tokio::sync::mpsc::channel::<AppendEntriesStreamRequest>(1);
    let e = peer_from([127, 0, 1, 9], raft3)
        .await
        .append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .err()
        .unwrap_or_else(|| panic!("a stranger opened an AppendEntries stream"));
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("not the raft address of a member"),
        "{}",
        e.message()
    );
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut inbound = peer_from([127, 0, 1, 2], raft3)
        .await
        .append_entries_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap_or_else(|e| panic!("member 2 opens an AppendEntries stream: {e:?}"))
        .into_inner();
    let in_the_name_of_1: openraft::raft::AppendEntriesRequest<cluster_agent::raft::TypeConfig> =
        openraft::raft::AppendEntriesRequest {
            vote: openraft::Vote::new_committed(0, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        };
    tx.send(AppendEntriesStreamRequest {
        id: 1,
        json: serde_json::to_vec(&in_the_name_of_1).unwrap_or_else(|e| panic!("{e}")),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let e = inbound
        .message()
        .await
        .expect_err("a streamed AppendEntries in another member's name");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("in the name of node 1 from node 2"),
        "{}",
        e.message()
    );
    // A CA key never travels over it.
    let e = peer_from([127, 0, 1, 2], raft3)
        .await
        .fetch_ca_key(FetchCaKeyRequest {
            node_id: 2,
            ..Default::default()
        })
        .await
        .expect_err("a CA key over plaintext");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("never travels in the clear"),
        "{}",
        e.message()
    );

    // A node whose peer plane is TLS cannot join it (both ends must speak alike).
    c.add_node(4).unwrap_or_else(|e| panic!("{e}"));
    c.start(4).await.unwrap_or_else(|e| panic!("{e}"));
    match c.join(4, 1).await {
        Err(HarnessError::Rpc { status, .. }) => {
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert!(
                status.message().contains("raft_insecure_plaintext"),
                "{}",
                status.message()
            );
        }
        other => panic!("a TLS node joined a plaintext cluster: {other:?}"),
    }
    let nodes: Vec<pb::NodeInfo> = c.nodes(1).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    c.stop(4).unwrap_or_else(|e| panic!("{e}"));
    c.barrier().await;
}
