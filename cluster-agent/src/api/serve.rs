//! The agent's two gRPC listeners: the public management plane (every management
//! service, plus the standard `grpc.health.v1.Health` and server reflection so probes and
//! grpcurl work) and the peer-only plane (the Raft service), each on its own address.
//! Both speak TLS only: the peer plane requires a node certificate of the cluster CA;
//! the management plane lets a caller without a certificate reach the health check only
//! ([`super::auth`] decides the rest by role).

use std::sync::Arc;

use cluster_proto::drain::drain_service_server::DrainServiceServer;
use cluster_proto::management::management_server::ManagementServer;
use cluster_proto::migrations::migration_service_server::MigrationServiceServer;
use cluster_proto::raft::raft_peer_server::RaftPeerServer;
use cluster_proto::vms::vm_service_server::VmServiceServer;
use cluster_proto::volumes::volume_service_server::VolumeServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

use super::peer::client::PEER_MESSAGE_LEN_MAX;
use crate::control::progress::ProgressBoard;
use crate::node::Agent;
use crate::vmhost::VmHost;

/// A gRPC server stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("the gRPC server failed")]
pub struct ServeError(#[source] tonic::transport::Error);

/// Streams (calls) one client connection may have open at once.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
/// How long a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A server builder with this agent's TLS (`client_auth_optional`: see
/// [`super::tls::server_config`]) and the limits every listener has.
fn builder(
    agent: &Agent,
    client_auth_optional: bool,
) -> Result<tonic::transport::Server, ServeError> {
    tonic::transport::Server::builder()
        .tls_config(
            super::tls::server_config(agent.credentials(), client_auth_optional)
                .timeout(TLS_HANDSHAKE_TIMEOUT),
        )
        .map_err(ServeError)
        .map(|b| {
            b.max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
                .concurrency_limit_per_connection(STREAMS_PER_CONNECTION_MAX as usize)
                .http2_keepalive_interval(Some(super::forward::KEEPALIVE_INTERVAL * 10))
                .http2_keepalive_timeout(Some(super::forward::KEEPALIVE_TIMEOUT * 5))
        })
}

/// A running server; its task ends after `shutdown` flips.
pub type ServerTask = JoinHandle<Result<(), ServeError>>;

/// The accepted connections of `listener`, with Nagle's algorithm off: a TLS record
/// and the HTTP/2 frames around it go out in several writes, and a small write held back
/// for the peer's delayed ACK costs ~40 ms per call.
fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
            }
        }
        conn
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Serve the peer-only Raft service on `listener` until `shutdown` flips.
pub fn spawn_peer(
    listener: TcpListener,
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    shutdown: watch::Receiver<bool>,
) -> Result<ServerTask, ServeError> {
    let mut builder = builder(&agent, false)?;
    let svc = RaftPeerServer::new(super::peer::server::PeerService { agent, host })
        .max_decoding_message_size(PEER_MESSAGE_LEN_MAX)
        .max_encoding_message_size(PEER_MESSAGE_LEN_MAX);
    let server = builder
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming(listener), stopped(shutdown));
    Ok(tokio::spawn(
        async move { server.await.map_err(ServeError) },
    ))
}

/// Serve every management service on `listener` until `shutdown` flips.
pub fn spawn_management(
    listener: TcpListener,
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    progress: Arc<ProgressBoard>,
    shutdown: watch::Receiver<bool>,
) -> Result<ServerTask, ServeError> {
    let builder = builder(&agent, true)?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // "" is the whole server; each management service is reported by name too. The
    // agent serves once it listens: Raft state (leader or not) is in `cluster status`.
    for name in std::iter::once("").chain(cluster_proto::MANAGEMENT_SERVICES.iter().copied()) {
        let reporter = health_reporter.clone();
        let name = name.to_owned();
        tokio::spawn(async move {
            reporter
                .set_service_status(name, tonic_health::ServingStatus::Serving)
                .await;
        });
    }
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(cluster_proto::FILE_DESCRIPTOR_SET);
    for name in cluster_proto::MANAGEMENT_SERVICES {
        reflection = reflection.with_service_name(*name);
    }
    let reflection = match reflection.build_v1() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "grpc reflection unavailable");
            None
        }
    };
    let server = builder
        .layer(super::auth::AuthorizeLayer {
            agent: agent.clone(),
        })
        .add_service(health)
        .add_optional_service(reflection)
        .add_service(ManagementServer::new(super::management::ManagementApi {
            agent: agent.clone(),
        }))
        .add_service(VmServiceServer::new(super::vms::VmApi::new(
            agent.clone(),
            host.clone(),
        )))
        .add_service(DrainServiceServer::new(super::jobs::JobApi::new(
            agent.clone(),
        )))
        .add_service(VolumeServiceServer::new(super::volumes::VolumeApi {
            agent: agent.clone(),
            host,
        }))
        .add_service(MigrationServiceServer::new(
            super::migrations::MigrationApi { agent, progress },
        ))
        .serve_with_incoming_shutdown(incoming(listener), stopped(shutdown));
    Ok(tokio::spawn(
        async move { server.await.map_err(ServeError) },
    ))
}
