//! Wires an [`Agent`] to its two listeners and background tasks; runs until shutdown.

use std::future::Future;
use std::net::SocketAddr;

use cluster_proto::drain::drain_service_server::DrainServiceServer;
use cluster_proto::management::management_server::ManagementServer;
use cluster_proto::raft::raft_peer_server::RaftPeerServer;
use cluster_proto::vms::vm_service_server::VmServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::agent::{Agent, StartError};
use crate::config::AgentConfig;
use crate::mgmt_service::MgmtService;
use crate::network::PEER_MESSAGE_LEN_MAX;
use crate::peer_service::PeerService;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {key} {addr}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the agent")]
    Start(#[source] StartError),
    #[error("cannot open the shared volumes named in the config (`volumes`)")]
    Volumes(#[source] Box<csv_volume::VolumeError>),
    #[error("cannot listen for incoming migrations")]
    Migration(#[source] Box<crate::vmhost::VmHostError>),
    #[error("cannot serve metrics")]
    Metrics(#[source] crate::metrics::MetricsError),
    #[error("the {service} service failed")]
    Serve {
        service: &'static str,
        #[source]
        source: tonic::transport::Error,
    },
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { key, addr, source })
}

/// Run the agent until `shutdown` resolves, then stop cleanly.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let mgmt = bind("mgmt_addr", config.mgmt_addr).await?;
    let peer = bind("raft_addr", config.raft_addr).await?;
    let metrics = match config.metrics_addr {
        Some(a) => Some(crate::metrics::bind(a).await.map_err(RunError::Metrics)?),
        None => None,
    };
    let agent = Agent::start(config).await.map_err(RunError::Start)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let hb = tokio::spawn(agent.clone().run_heartbeats(stop_rx.clone()));
    let lv = tokio::spawn(agent.clone().run_liveness(stop_rx.clone()));
    let volumes = csv_volume::VolumeRegistry::from_config(&agent.config.volumes)
        .map_err(|e| RunError::Volumes(Box::new(e)))?;
    let vm_host = crate::vmhost::VmHost::new(agent.node_id(), volumes);
    let rc = tokio::spawn(crate::reconciler::run(
        agent.clone(),
        vm_host.clone(),
        stop_rx.clone(),
    ));
    let listener = vm_host
        .listen_migrations(
            agent.config.migration_addr,
            crate::lock_client::ClusterLocks::new(agent.clone()),
            vmm_node::migration::target::ReceiveOptions::default(),
        )
        .map_err(|e| RunError::Migration(Box::new(e)))?;
    let fo = tokio::spawn(crate::failover::run(agent.clone(), stop_rx.clone()));
    let jobs = tokio::spawn(crate::drain::run(agent.clone(), stop_rx.clone()));
    let queue = tokio::spawn(crate::migration_queue::run(agent.clone(), stop_rx.clone()));
    let drain_svc = DrainServiceServer::new(crate::drain_service::DrainApi::new(agent.clone()));
    let volume_svc = cluster_proto::volumes::volume_service_server::VolumeServiceServer::new(
        crate::volume_service::VolumeApi {
            agent: agent.clone(),
            host: vm_host.clone(),
        },
    );
    let mt = metrics.map(|l| {
        tokio::spawn(crate::metrics::serve(
            l,
            agent.clone(),
            vm_host.clone(),
            stop_rx.clone(),
        ))
    });
    let vm_svc = VmServiceServer::new(crate::vm_service::VmApi::new(agent.clone(), vm_host));

    let peer_svc = RaftPeerServer::new(PeerService {
        agent: agent.clone(),
    })
    .max_decoding_message_size(PEER_MESSAGE_LEN_MAX)
    .max_encoding_message_size(PEER_MESSAGE_LEN_MAX);
    let mgmt_svc = ManagementServer::new(MgmtService {
        agent: agent.clone(),
    });

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let peer_server = tonic::transport::Server::builder()
        .add_service(peer_svc)
        .serve_with_incoming_shutdown(TcpListenerStream::new(peer), stopped(stop_rx.clone()));
    let mgmt_server = tonic::transport::Server::builder()
        .add_service(mgmt_svc)
        .add_service(vm_svc)
        .add_service(drain_svc)
        .add_service(volume_svc)
        .add_service(
            cluster_proto::migrations::migration_service_server::MigrationServiceServer::new(
                crate::migration_service::MigrationApi {
                    agent: agent.clone(),
                },
            ),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(mgmt), stopped(stop_rx.clone()));
    let peer_task = tokio::spawn(peer_server);
    let mgmt_task = tokio::spawn(mgmt_server);
    tracing::info!(
        node_id = agent.node_id(),
        mgmt_addr = %agent.config.mgmt_addr,
        raft_addr = %agent.config.raft_addr,
        migration_addr = %agent.config.migration_addr,
        "agent serving"
    );

    shutdown.await;
    tracing::info!(node_id = agent.node_id(), "agent stopping");
    let _ = stop_tx.send(true);
    let _ = hb.await;
    let _ = lv.await;
    let _ = rc.await;
    let _ = fo.await;
    let _ = jobs.await;
    let _ = queue.await;
    if let Some(mt) = mt {
        let _ = mt.await;
    }
    drop(listener);
    if let Err(e) = agent.raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    let mut result = Ok(());
    for (service, task) in [("raft peer", peer_task), ("management", mgmt_task)] {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(source)) => result = Err(RunError::Serve { service, source }),
            Err(e) => tracing::error!(service, error = %e, "server task panicked"),
        }
    }
    tracing::info!(node_id = agent.node_id(), "agent stopped");
    result
}
