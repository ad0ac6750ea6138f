//! The agent's two gRPC listeners: the public management plane (every management
//! service, plus the standard `grpc.health.v1.Health` and server reflection so probes and
//! grpcurl work) and the peer-only plane (the Raft service), each on its own address.
//! Both speak TLS only (the peer plane plaintext only when the node's config opts in,
//! `raft_insecure_plaintext`): the peer plane requires a node certificate of the cluster CA;
//! the management plane lets a caller without a certificate reach the health check only
//! ([`super::auth`] decides the rest by role).

use std::sync::Arc;

use cluster_proto::drain::drain_service_server::DrainServiceServer;
use cluster_proto::management::management_service_server::ManagementServiceServer;
use cluster_proto::migrations::migration_service_server::MigrationServiceServer;
use cluster_proto::raft::raft_peer_service_server::RaftPeerServiceServer;
use cluster_proto::vms::vm_service_server::VmServiceServer;
use cluster_proto::volumes::volume_service_server::VolumeServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use super::peer::client::PEER_MESSAGE_LEN_MAX;
use crate::control::progress::ProgressBoard;
use crate::node::Agent;
use crate::vmhost::VmHost;

/// A gRPC server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("cannot set up the listener's TLS")]
    Tls(#[source] super::tls::TlsConfigError),
}

/// Streams (calls) one client connection may have open at once.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 256;
pub use super::tls::TLS_HANDSHAKE_TIMEOUT;

/// A server builder with the limits every listener has (TLS is the incoming stream's:
/// [`incoming`]).
fn builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
        .concurrency_limit_per_connection(STREAMS_PER_CONNECTION_MAX as usize)
        .http2_keepalive_interval(Some(super::forward::KEEPALIVE_INTERVAL * 10))
        .http2_keepalive_timeout(Some(super::forward::KEEPALIVE_TIMEOUT * 5))
}

/// A running server; its task ends after `shutdown` flips.
pub type ServerTask = JoinHandle<Result<(), ServeError>>;

/// The connections of `listener` after a TLS handshake with this node's current
/// certificate (`client_auth_optional`: see [`super::tls::server_config`]).
fn incoming(
    listener: TcpListener,
    agent: &Agent,
    client_auth_optional: bool,
) -> Result<
    impl tokio_stream::Stream<
        Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
    ServeError,
> {
    let config = super::tls::server_config(agent.shared_credentials(), client_auth_optional)
        .map_err(ServeError::Tls)?;
    Ok(super::tls::tls_incoming(listener, config))
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The accepted connections of `listener` in the clear (`raft_insecure_plaintext`), with
/// Nagle's algorithm off like the TLS ones.
fn plaintext_incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
        let c = c?;
        if let Err(e) = c.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
        }
        Ok(c)
    })
}

/// Serve the peer-only Raft service on `listener` until `shutdown` flips: mutual TLS, or
/// plaintext when the node's config asks for it (`raft_insecure_plaintext`).
pub fn spawn_peer(
    listener: TcpListener,
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    shutdown: watch::Receiver<bool>,
) -> Result<ServerTask, ServeError> {
    let plaintext = agent.config().raft_insecure_plaintext;
    let tls_config = if plaintext {
        None
    } else {
        Some(
            super::tls::server_config(agent.shared_credentials(), false)
                .map_err(ServeError::Tls)?,
        )
    };
    let mut builder = builder();
    let svc = RaftPeerServiceServer::new(super::peer::server::PeerService { agent, host })
        .max_decoding_message_size(PEER_MESSAGE_LEN_MAX)
        .max_encoding_message_size(PEER_MESSAGE_LEN_MAX);
    let router = builder.add_service(svc);
    let task = match tls_config {
        Some(config) => {
            let incoming = super::tls::tls_incoming(listener, config);
            let server = router.serve_with_incoming_shutdown(incoming, stopped(shutdown));
            tokio::spawn(async move { server.await.map_err(ServeError::Serve) })
        }
        None => {
            let server = router
                .serve_with_incoming_shutdown(plaintext_incoming(listener), stopped(shutdown));
            tokio::spawn(async move { server.await.map_err(ServeError::Serve) })
        }
    };
    Ok(task)
}

/// Serve every management service on `listener` until `shutdown` flips.
pub fn spawn_management(
    listener: TcpListener,
    agent: Arc<Agent>,
    host: Arc<VmHost>,
    progress: Arc<ProgressBoard>,
    console: Option<Arc<super::console::Sessions>>,
    shutdown: watch::Receiver<bool>,
) -> Result<ServerTask, ServeError> {
    let incoming = incoming(listener, &agent, true)?;
    let builder = builder();
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
        .add_service(ManagementServiceServer::new(
            super::management::ManagementApi {
                agent: agent.clone(),
                console,
            },
        ))
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
        .serve_with_incoming_shutdown(incoming, stopped(shutdown));
    Ok(tokio::spawn(async move {
        server.await.map_err(ServeError::Serve)
    }))
}
