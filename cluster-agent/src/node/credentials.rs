//! This node's TLS credentials as data: the cluster CA certificate, the node's own
//! certificate and key (PEM). `server.rs` loads and checks them (the certificate must name
//! this node); the API layer turns them into TLS configurations for every listener and
//! every connection this agent makes.
//!
//! The node certificate is replaced before it expires (`api::rotation`): every holder
//! keeps a [`SharedCredentials`] and reads the current credentials when it builds a new
//! connection or answers a TLS handshake; [`SharedCredentials::generation`] tells a
//! cache of connections that its credentials are outdated.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Clone)]
pub struct Credentials {
    /// The trust bundle: the cluster CA certificate(s) (two while the CA is rotated), the
    /// only roots any peer or client is checked against.
    pub ca_pem: String,
    /// This node's certificate (it names `vmcluster:node:<id>` and the node's addresses).
    pub cert_pem: String,
    /// This node's private key.
    pub key_pem: String,
    /// When `cert_pem` expires (unix ms).
    pub expires_unix_ms: u64,
    /// The fingerprint (SHA-256 hex) of the CA of `ca_pem` that issued `cert_pem` ("":
    /// none of them), as the API layer computed it.
    pub cert_ca_sha256: String,
    /// The CA a finished rotation dropped (PEM; "" if none): trusted by no plane, but
    /// the management listener lets its certificates through the handshake so that the
    /// authorization layer refuses them with a reason instead of a TLS alert.
    pub retired_ca_pem: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

/// The node's current credentials, replaceable while the agent runs (cloning shares).
#[derive(Clone)]
pub struct SharedCredentials {
    current: Arc<RwLock<Arc<Credentials>>>,
    generation: Arc<AtomicU64>,
}

impl fmt::Debug for SharedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedCredentials")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl SharedCredentials {
    pub fn new(c: Credentials) -> SharedCredentials {
        SharedCredentials {
            current: Arc::new(RwLock::new(Arc::new(c))),
            generation: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The credentials to use now.
    pub fn current(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many times the credentials were replaced.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Use `c` from now on (new connections and handshakes; open connections go on).
    pub fn replace(&self, c: Credentials) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}
