//! The management listener speaks the standard discovery protocols: `grpc.health.v1`
//! (what grpc_health_probe, Kubernetes probes and `local-cluster.sh` use) and server
//! reflection (what grpcurl uses to list and call the API). The peer-only Raft service
//! is neither served nor listed there.

use cluster_tests::{Cluster, Options};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_on_the_management_listener() {
    let _serial = cluster_tests::serial().await;
    let mut c = Cluster::new(
        env!("CARGO_BIN_EXE_cluster-agent").into(),
        Options::default(),
    )
    .unwrap_or_else(|e| panic!("harness: {e}"));
    let spec = c.add_node(1);
    let spec = c.check(spec);
    let r = c.start(1).await;
    c.check(r);
    let ch = cluster_tests::pki::admin_endpoint(spec.mgmt_addr)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {}: {e}", spec.mgmt_addr));

    let mut health = HealthClient::new(ch.clone());
    let wait = cluster_tests::Wait::new(cluster_tests::WAIT);
    for service in std::iter::once("").chain(cluster_proto::MANAGEMENT_SERVICES.iter().copied()) {
        let s = wait
            .until(
                &format!("health of {service:?} serving"),
                || {
                    let mut h = health.clone();
                    async move {
                        h.check(HealthCheckRequest {
                            service: service.to_owned(),
                        })
                        .await
                        .map(|r| r.into_inner().status)
                        .map_err(|e| e.to_string())
                    }
                },
                |s| *s == ServingStatus::Serving as i32,
            )
            .await;
        c.check(s);
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "cluster.raft.v1.RaftPeerService".into(),
        })
        .await;
    assert_eq!(
        unknown.map(|r| r.into_inner().status).map_err(|s| s.code()),
        Err(tonic::Code::NotFound),
        "the peer service is not on the management listener"
    );

    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap_or_else(|e| panic!("reflection: {e}"))
        .into_inner();
    let reply = stream
        .message()
        .await
        .unwrap_or_else(|e| panic!("reflection reply: {e}"));
    let Some(MessageResponse::ListServicesResponse(list)) = reply.and_then(|r| r.message_response)
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in cluster_proto::MANAGEMENT_SERVICES {
        assert!(
            names.iter().any(|n| n == service),
            "{service} listed: {names:?}"
        );
    }
    assert!(
        !names.iter().any(|n| n.contains("RaftPeer")),
        "the peer service is not listed: {names:?}"
    );
}
