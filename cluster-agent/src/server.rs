//! Wires an [`Agent`] to its two listeners and background tasks; runs until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::node::config::AgentConfig;
use crate::node::{Agent, StartError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {key} {addr}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("bad fault-injection setting")]
    CrashPoint(#[source] crate::crash_point::CrashPointError),
    #[error("cannot start the agent")]
    Start(#[source] StartError),
    #[error("cannot open the shared volumes named in the config (`volumes`)")]
    Volumes(#[source] Box<csv_volume::VolumeError>),
    #[error("cannot set up TLS for migrations with this node's credentials")]
    MigrationTls(#[source] Box<vmm_node::migration::tls::TlsSetupError>),
    #[error("cannot listen for incoming migrations")]
    Migration(#[source] Box<crate::vmhost::VmHostError>),
    #[error("cannot serve the web console")]
    Console(#[source] crate::api::console::ConsoleError),
    #[error("cannot serve metrics")]
    Metrics(#[source] crate::api::metrics::MetricsError),
    #[error("cannot find this agent's own executable (VM workers run it)")]
    Exe(#[source] std::io::Error),
    #[error("Raft stopped with a fatal error ({0}); every VM of this node was stopped")]
    Fatal(String),
    #[error("cannot use this node's TLS credentials")]
    Credentials(#[source] crate::api::tls::CredentialsError),
    #[error("cannot use this node's TLS credentials")]
    Tls(#[source] crate::api::tls::TlsConfigError),
    #[error("cannot start the {service} listener")]
    Listen {
        service: &'static str,
        #[source]
        source: crate::api::serve::ServeError,
    },
    #[error("the {service} service failed")]
    Serve {
        service: &'static str,
        #[source]
        source: crate::api::serve::ServeError,
    },
}

/// How long a stopping agent waits for open calls to end before cutting them.
const SERVE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a stopping agent tries to commit its restart announcement.
const ANNOUNCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// A stopping agent whose VMs run in worker processes tells the cluster it restarts (the
/// leader then does not take the node for dead for `restart_window`) and, once that is
/// committed, lets its workers run until the window measured from before the request —
/// never past the moment any leader's hold ends. Without a commit (no quorum) the workers
/// keep their ordinary lease.
async fn announce_restart(agent: &Arc<Agent>, host: &Arc<crate::vmhost::VmHost>) {
    let window = agent.config().restart_window;
    if !agent.config().vm_workers || window.is_zero() || !host.has_workers() {
        return;
    }
    let sent = std::time::Instant::now();
    let cmd = crate::state::Command::AnnounceRestart {
        node_id: agent.node_id(),
        window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        at_unix_ms: crate::node::now_unix_ms(),
    };
    let write = agent.write(crate::node::ForwardRequest::Command(cmd));
    match tokio::time::timeout(ANNOUNCE_TIMEOUT, write).await {
        Ok(Ok(_)) => {
            let h = host.clone();
            let vms = tokio::task::spawn_blocking(move || h.extend_workers(sent + window))
                .await
                .unwrap_or_default();
            tracing::info!(window_ms = window.as_millis() as u64, ?vms, "restart announced; vms run on in their workers");
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot announce the restart; vms in workers stop at their lease unless the agent is back before"),
        Err(_) => tracing::warn!("no answer to the restart announcement; vms in workers stop at their lease unless the agent is back before"),
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { key, addr, source })
}

/// Run the agent until `shutdown` resolves, then stop cleanly.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    crate::crash_point::check_env().map_err(RunError::CrashPoint)?;
    let credentials = crate::node::credentials::SharedCredentials::new(
        crate::api::tls::load_credentials(&config).map_err(RunError::Credentials)?,
    );
    let mgmt = bind("mgmt_addr", config.mgmt_addr).await?;
    let peer = bind("raft_addr", config.raft_addr).await?;
    let metrics = match config.metrics_addr {
        Some(a) => Some(
            crate::api::metrics::bind(a)
                .await
                .map_err(RunError::Metrics)?,
        ),
        None => None,
    };
    let console = match config.console_addr {
        Some(a) => Some(bind("console_addr", a).await?),
        None => None,
    };
    let network = crate::api::peer::client::Network::new(
        config.rpc_timeout,
        config.raft_source_ip(),
        credentials.clone(),
        config.raft_insecure_plaintext,
    );
    let peers = Arc::new(crate::api::peer::client::GrpcPeers::new(
        config.raft_source_ip(),
        crate::node::heartbeat_timeout(&config),
        credentials.clone(),
        config.raft_insecure_plaintext,
    ));
    if config.raft_insecure_plaintext {
        tracing::warn!("the peer (Raft) plane is plaintext and its callers are identified by their source address only (raft_insecure_plaintext): keep the peer network isolated");
    }
    let agent = Agent::start(config, credentials, network, peers)
        .await
        .map_err(RunError::Start)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let hb = tokio::spawn(agent.clone().run_heartbeats(stop_rx.clone()));
    let lv = tokio::spawn(agent.clone().run_liveness(stop_rx.clone()));
    let raft_hb = tokio::spawn(agent.clone().run_raft_heartbeats(stop_rx.clone()));
    let elections = tokio::spawn(agent.clone().run_elections(stop_rx.clone()));
    let rot = tokio::spawn(crate::api::rotation::run(agent.clone(), stop_rx.clone()));
    let ca_follow = tokio::spawn(crate::api::ca::run(agent.clone(), stop_rx.clone()));
    let volumes = csv_volume::VolumeRegistry::from_config(&agent.config().volumes)
        .map_err(|e| RunError::Volumes(Box::new(e)))?;
    let networks = agent
        .config()
        .networks
        .iter()
        .map(|n| (n.name.clone(), n.bridge.clone()))
        .collect();
    let vm_host = crate::vmhost::VmHost::with_networks(agent.node_id(), volumes, networks);
    let progress = Arc::new(crate::control::progress::ProgressBoard::default());
    let transport = if agent.config().migration_insecure_plaintext {
        tracing::warn!("migrations are plaintext and unauthenticated (migration_insecure_plaintext): keep the migration network isolated");
        vmm_node::migration::tls::Transport::Plaintext
    } else {
        // The node's current certificate at each handshake (it is rotated before expiry),
        // peers checked against the current trust bundle (the CA may be rotated).
        let creds = agent.shared_credentials();
        let resolver = Arc::new(crate::api::tls::NodeCertResolver::new(creds.clone()));
        crate::api::tls::roots(&agent.credentials())
            .and_then(|_| resolver.certified_key().map(|_| ()))
            .map_err(RunError::Tls)?;
        vmm_node::migration::tls::Transport::Tls(
            vmm_node::migration::tls::MigrationTls::with_verifiers(
                Arc::new(crate::api::tls::BundleClientVerifier::new(
                    creds.clone(),
                    false,
                )),
                Arc::new(crate::api::tls::BundleServerVerifier::new(creds.clone())),
                resolver.clone(),
                resolver,
            )
            .map_err(|e| RunError::MigrationTls(Box::new(e)))?,
        )
    };
    vm_host.set_migration_transport(transport.clone());
    vm_host.set_image_dirs(agent.config().image_dirs.clone());
    if agent.config().vm_workers {
        let c = agent.config();
        vm_host.enable_workers(crate::vmhost::worker::Settings {
            exe: std::env::current_exe().map_err(RunError::Exe)?,
            dir: c.worker_dir.clone(),
            down_after: c.down_after,
            volumes: c.volumes.clone(),
            networks: c
                .networks
                .iter()
                .map(|n| (n.name.clone(), n.bridge.clone()))
                .collect(),
            image_dirs: c.image_dirs.clone(),
            migration_tls: (!c.migration_insecure_plaintext).then(|| {
                let creds = agent.shared_credentials().clone();
                crate::vmhost::worker::TlsSource(Arc::new(move || {
                    let c = creds.current();
                    crate::vmhost::worker::protocol::TlsPem {
                        ca_pem: c.ca_pem.clone(),
                        cert_pem: c.cert_pem.clone(),
                        key_pem: c.key_pem.clone(),
                    }
                }))
            }),
            log_format: c.log_format,
            cgroups: c
                .worker_cgroups
                .then(|| crate::vmhost::worker::cgroup::Tree::detect(c.node_id))
                .and_then(|t| {
                    t.map_err(|e| {
                        tracing::warn!(error = %e, "vm workers run without cgroups of their own");
                    })
                    .ok()
                }),
        });
        let h = vm_host.clone();
        let adopted = tokio::task::spawn_blocking(move || h.adopt_workers())
            .await
            .unwrap_or_default();
        tracing::info!(node_id = agent.node_id(), vms = ?adopted, "vm workers adopted");
    }
    // Only now: a reconciler running before the adoption could start a second copy of a
    // VM whose worker still runs (its lease may already be held).
    let rc = tokio::spawn(crate::control::reconciler::run(
        agent.clone(),
        vm_host.clone(),
        progress.clone(),
        stop_rx.clone(),
    ));
    let listener = vm_host
        .listen_migrations(
            agent.config().migration_addr,
            crate::control::disk_lock_client::ClusterLocks::new(agent.clone()),
            vmm_node::migration::target::ReceiveOptions::new(
                transport,
                Arc::new(crate::api::migration_auth::ClusterAuthorizer::new(
                    agent.clone(),
                )),
            ),
        )
        .map_err(|e| RunError::Migration(Box::new(e)))?;
    let dm = tokio::spawn(crate::control::demand::run(
        agent.clone(),
        vm_host.clone(),
        stop_rx.clone(),
    ));
    let fo = tokio::spawn(crate::control::failover::run(
        agent.clone(),
        stop_rx.clone(),
    ));
    let jobs = tokio::spawn(crate::control::job_runner::run(
        agent.clone(),
        stop_rx.clone(),
    ));
    let power = tokio::spawn(crate::control::power::run(agent.clone(), stop_rx.clone()));
    let queue = tokio::spawn(crate::control::migration_queue::run(
        agent.clone(),
        stop_rx.clone(),
    ));
    let mt = metrics.map(|l| {
        tokio::spawn(crate::api::metrics::serve(
            l,
            agent.clone(),
            vm_host.clone(),
            progress.clone(),
            stop_rx.clone(),
        ))
    });
    let peer_task =
        crate::api::serve::spawn_peer(peer, agent.clone(), vm_host.clone(), stop_rx.clone())
            .map_err(|source| RunError::Listen {
                service: "raft peer",
                source,
            })?;
    let fence_host = vm_host.clone();
    let sessions = console
        .is_some()
        .then(|| Arc::new(crate::api::console::Sessions::default()));
    let console_task = match (console, &sessions) {
        (Some(listener), Some(sessions)) => {
            let c = crate::api::console::Console::new(
                agent.clone(),
                vm_host.clone(),
                progress.clone(),
                sessions.clone(),
            );
            Some(
                crate::api::console::spawn(listener, c, stop_rx.clone())
                    .map_err(RunError::Console)?,
            )
        }
        _ => None,
    };
    let mgmt_task = crate::api::serve::spawn_management(
        mgmt,
        agent.clone(),
        vm_host,
        progress,
        sessions,
        stop_rx.clone(),
    )
    .map_err(|source| RunError::Listen {
        service: "management",
        source,
    })?;
    tracing::info!(
        node_id = agent.node_id(),
        mgmt_addr = %agent.config().mgmt_addr,
        raft_addr = %agent.config().raft_addr,
        migration_addr = %agent.config().migration_addr,
        console_addr = ?agent.config().console_addr,
        "agent serving"
    );
    // Ready for systemd here: every listener is bound and served, Raft runs on the data
    // dir, so whether this node is in a cluster is known (the status line says it).
    let notifier = Arc::new(crate::systemd::Notifier::from_env());
    notifier.notify(&format!(
        "READY=1\nSTATUS={}",
        crate::systemd::status_of(&agent)
    ));
    let sd = tokio::spawn(crate::systemd::supervise(
        notifier.clone(),
        agent.clone(),
        stop_rx.clone(),
    ));

    // Fail-stop: a replica that can no longer apply must not keep its VMs or its lease
    // (its heartbeats would keep it Up while VMs failed over to it never start).
    // It waits on a worker thread, on the rarely changing server metrics (see `fatal`).
    let mut fatal_task = tokio::spawn({
        let a = agent.clone();
        async move { a.fatal().await }
    });
    let fatal = tokio::select! {
        _ = shutdown => None,
        e = &mut fatal_task => Some(e.unwrap_or_else(|e| format!("the fatal-error watch ended: {e}"))),
    };
    fatal_task.abort();
    notifier.notify(match &fatal {
        Some(_) => "STOPPING=1\nSTATUS=stopping after a fatal raft error",
        None => "STOPPING=1\nSTATUS=stopping",
    });
    if let Some(e) = &fatal {
        tracing::error!(node_id = agent.node_id(), error = %e, "raft failed; fencing every vm and stopping");
        let h = fence_host.clone();
        let fenced = tokio::task::spawn_blocking(move || h.fence_all())
            .await
            .unwrap_or_default();
        tracing::error!(node_id = agent.node_id(), vms = ?fenced, "vms fenced after a fatal raft error");
    }
    if fatal.is_none() {
        announce_restart(&agent, &fence_host).await;
    }
    tracing::info!(node_id = agent.node_id(), "agent stopping");
    let _ = stop_tx.send(true);
    let _ = hb.await;
    let _ = lv.await;
    let _ = raft_hb.await;
    let _ = elections.await;
    let _ = rot.await;
    let _ = ca_follow.await;
    let _ = rc.await;
    let _ = fo.await;
    let _ = dm.await;
    let _ = jobs.await;
    let _ = power.await;
    let _ = queue.await;
    let _ = sd.await;
    if let Some(ct) = console_task {
        let _ = ct.await;
    }
    if let Some(mt) = mt {
        let _ = mt.await;
    }
    drop(listener);
    if let Err(e) = agent.raft().shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    let mut result = Ok(());
    for (service, task) in [("raft peer", peer_task), ("management", mgmt_task)] {
        // Calls still open (e.g. a followed console of a VM that runs on in its worker)
        // get a moment to end, then are cut.
        let abort = task.abort_handle();
        match tokio::time::timeout(SERVE_DRAIN, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(source))) => result = Err(RunError::Serve { service, source }),
            Ok(Err(e)) => tracing::error!(service, error = %e, "server task panicked"),
            Err(_) => {
                tracing::info!(service, "open calls cut at shutdown");
                abort.abort();
            }
        }
    }
    tracing::info!(node_id = agent.node_id(), "agent stopped");
    match fatal {
        Some(e) => Err(RunError::Fatal(e)),
        None => result,
    }
}
