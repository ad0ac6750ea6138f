//! This node's TLS credentials as data: the cluster CA certificate, the node's own
//! certificate and key (PEM). `server.rs` loads and checks them (the certificate must name
//! this node); the API layer turns them into TLS configurations for every listener and
//! every connection this agent makes.

use std::fmt;

#[derive(Clone)]
pub struct Credentials {
    /// The cluster CA certificate: the only root any peer or client is checked against.
    pub ca_pem: String,
    /// This node's certificate (it names `vmcluster:node:<id>` and the node's addresses).
    pub cert_pem: String,
    /// This node's private key.
    pub key_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}
