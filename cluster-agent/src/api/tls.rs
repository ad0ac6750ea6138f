//! TLS for every gRPC listener and connection of the agent: the node's credentials
//! ([`Credentials`]) as tonic server and client configurations, and the identity a
//! caller's certificate names.
//!
//! **Architecture Invariant:** every channel this agent opens to another agent is built
//! by [`endpoint`] (mutual TLS with the node certificate, the cluster CA as the only
//! root); every listener is configured by [`server_config`].

use std::path::PathBuf;

use cluster_proto::pki::{self, Identity};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, ServerTlsConfig};
use tonic::Status;

use crate::node::config::AgentConfig;
use crate::node::credentials::Credentials;

/// The listener's TLS: this node's certificate, callers checked against the cluster CA.
/// `client_auth_optional`: callers without a certificate get through the handshake (the
/// management plane then lets them reach only the health check).
pub fn server_config(c: &Credentials, client_auth_optional: bool) -> ServerTlsConfig {
    ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &c.cert_pem,
            &c.key_pem,
        ))
        .client_ca_root(Certificate::from_pem(&c.ca_pem))
        .client_auth_optional(client_auth_optional)
}

/// The client TLS of a connection to another agent: the node certificate, the cluster CA
/// as the only root.
pub fn client_config(c: &Credentials) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&c.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &c.cert_pem,
            &c.key_pem,
        ))
}

/// An endpoint for the agent listening at `addr` (IP:port), over mutual TLS. The other
/// agent's certificate must carry `addr`'s IP.
pub fn endpoint(c: &Credentials, addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))?.tls_config(client_config(c))
}

/// The identity the caller's certificate names: `Ok(None)` when the caller presented
/// none; an error (unauthenticated) when it names no usable cluster identity.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Option<Identity>, Status> {
    let Some(certs) = req.peer_certs() else {
        return Ok(None);
    };
    let Some(leaf) = certs.first() else {
        return Ok(None);
    };
    pki::identity_of(leaf.as_ref()).map(Some).map_err(|e| {
        Status::unauthenticated(format!("the client certificate is not usable here: {e}"))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot load the credentials in {dir}")]
    Load {
        dir: PathBuf,
        #[source]
        source: pki::PkiError,
    },
    #[error("the certificate in {dir} names {found}, but this agent is node {node_id} (`node_id` in its config): issue it a certificate of its own")]
    WrongIdentity {
        dir: PathBuf,
        found: Identity,
        node_id: u64,
    },
    #[error("the certificate in {dir} expired; issue this node a new one")]
    Expired { dir: PathBuf },
}

/// This node's credentials from its `tls_dir`, checked: the certificate names this node
/// and has not expired.
pub fn load_credentials(config: &AgentConfig) -> Result<Credentials, CredentialsError> {
    let dir = config.tls_dir.clone();
    let load = |source| CredentialsError::Load {
        dir: dir.clone(),
        source,
    };
    let m = pki::TlsDir(dir.clone()).load().map_err(load)?;
    let found = m.identity().map_err(load)?;
    if found != Identity::Node(config.node_id) {
        return Err(CredentialsError::WrongIdentity {
            dir,
            found,
            node_id: config.node_id,
        });
    }
    if m.not_after().map_err(load)? <= std::time::SystemTime::now() {
        return Err(CredentialsError::Expired { dir });
    }
    Ok(Credentials {
        ca_pem: m.ca_pem,
        cert_pem: m.cert_pem,
        key_pem: m.key_pem,
    })
}
