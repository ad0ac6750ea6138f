//! Security of the migration network: TLS configuration ([`MigrationTls`], [`Transport`])
//! and session authorization ([`SessionAuthorizer`]).
//!
//! Every migration connection (control and data) is TLS 1.3 with both ends authenticated
//! by certificates of the cluster CA: the target requires a client certificate chaining to
//! the CA (rustls' `WebPkiClientVerifier`), the source checks the target's certificate
//! against the CA and the target's IP address (node certificates carry IP SANs, and need
//! both the `serverAuth` and the `clientAuth` extended key usage, or none). Plaintext
//! ([`Transport::Plaintext`]) exists only for a caller that asks for it explicitly (an
//! isolated migration network, or the standalone debug binary with `--insecure-plaintext`).
//!
//! After the handshake the target hands the peer's certificate, the VM name and the
//! source's one-time ticket to the caller's [`SessionAuthorizer`] before it creates
//! anything; a refusal is sent back as `Refuse{reason}`. The cluster agent checks the ticket
//! against the migration it committed; [`AllowAll`] (plaintext debugging only) and
//! [`TicketSet`] (tests) are the implementations this crate ships.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Longest ticket a Hello may carry.
pub const MAX_TICKET_BYTES: usize = 64;
/// Longest VM name a Hello may carry.
pub const MAX_VM_NAME_BYTES: usize = 255;

/// The crypto provider of every migration TLS connection: ring, as tonic's `tls-ring`
/// (rustls 0.23.48 deprecates it for lacking post-quantum key exchange; aws-lc is what the
/// project avoids).
/// AES-128-GCM comes first: the cheapest suite per byte with AES instructions.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Fills `buf` from the provider's secure random generator (session ids).
pub fn random_bytes(buf: &mut [u8]) -> Result<(), TlsSetupError> {
    crypto_provider()
        .secure_random
        .fill(buf)
        .map_err(|_| TlsSetupError::Random)
}

/// Errors of building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("no certificate in the {what} PEM")]
    NoCertificate { what: &'static str },
    #[error("cannot parse the {what} PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA certificate is not usable as a trust anchor")]
    Ca(#[source] rustls::Error),
    #[error("cannot build the {side} TLS configuration")]
    Config {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("the system's secure random generator failed")]
    Random,
}

/// TLS configuration of one node's migration endpoint: `client` for outgoing migrations
/// (verifies the target against the CA and its IP address, presents this node's
/// certificate), `server` for incoming ones (requires a client certificate of the CA).
#[derive(Clone)]
pub struct MigrationTls {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl std::fmt::Debug for MigrationTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationTls { .. }")
    }
}

impl MigrationTls {
    /// Builds both configurations from PEM bytes: the cluster CA certificate(s), this
    /// node's certificate chain (leaf first) and its private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(
        ca_pem: &[u8],
        cert_chain_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, TlsSetupError> {
        let certs = |what: &'static str, pem: &[u8]| {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TlsSetupError::Pem { what, source })?;
            if v.is_empty() {
                return Err(TlsSetupError::NoCertificate { what });
            }
            Ok(v)
        };
        let ca = certs("CA", ca_pem)?;
        let chain = certs("node certificate", cert_chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsSetupError::Pem {
            what: "node key",
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(TlsSetupError::Ca)?;
        }
        Self::from_parts(Arc::new(roots), chain, key)
    }

    /// Builds both configurations from parsed parts.
    pub fn from_parts(
        roots: Arc<RootCertStore>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsSetupError> {
        let (server, client) = builders(roots)?;
        let mut server = server
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|source| TlsSetupError::Config {
                side: "server",
                source,
            })?;
        // Every connection is a fresh full handshake: no resumption tickets to send.
        server.send_tls13_tickets = 0;
        let client =
            client
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsSetupError::Config {
                    side: "client",
                    source,
                })?;
        Ok(MigrationTls::direct(server, client))
    }

    /// Both configurations, the record layer handed over after the handshake
    /// ([`super::record`]; rustls keeps the handshake and every certificate check).
    fn direct(mut server: ServerConfig, mut client: ClientConfig) -> Self {
        server.enable_secret_extraction = true;
        client.enable_secret_extraction = true;
        MigrationTls {
            client: Arc::new(client),
            server: Arc::new(server),
        }
    }

    /// The same configuration with rustls' own record layer after the handshake (the
    /// fallback; for comparisons and tests). The wire format is the same.
    pub fn with_rustls_records(&self) -> Self {
        let mut server = (*self.server).clone();
        let mut client = (*self.client).clone();
        server.enable_secret_extraction = false;
        client.enable_secret_extraction = false;
        MigrationTls {
            client: Arc::new(client),
            server: Arc::new(server),
        }
    }

    /// Builds both configurations with certificates chosen at each handshake (a node
    /// whose certificate is replaced while it runs: the next migration connection, in
    /// either direction, presents the new one).
    pub fn with_resolvers(
        roots: Arc<RootCertStore>,
        server_cert: Arc<dyn rustls::server::ResolvesServerCert>,
        client_cert: Arc<dyn rustls::client::ResolvesClientCert>,
    ) -> Result<Self, TlsSetupError> {
        let (server, client) = builders(roots)?;
        let mut server = server.with_cert_resolver(server_cert);
        server.send_tls13_tickets = 0;
        let client = client.with_client_cert_resolver(client_cert);
        Ok(MigrationTls::direct(server, client))
    }
}

impl MigrationTls {
    /// Builds both configurations with certificates chosen at each handshake and peers
    /// checked by the caller's verifiers (a node whose trust bundle changes while it runs,
    /// e.g. a CA rotation: the verifiers check against the bundle of the moment). The
    /// verifiers must check the chain to the cluster CA(s) and, on the client side, the
    /// target's address, as rustls' WebPKI verifiers do.
    pub fn with_verifiers(
        client_verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
        server_verifier: Arc<dyn rustls::client::danger::ServerCertVerifier>,
        server_cert: Arc<dyn rustls::server::ResolvesServerCert>,
        client_cert: Arc<dyn rustls::client::ResolvesClientCert>,
    ) -> Result<Self, TlsSetupError> {
        let provider = crypto_provider();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsSetupError::Config {
                side: "server",
                source,
            })?
            .with_client_cert_verifier(client_verifier)
            .with_cert_resolver(server_cert);
        server.send_tls13_tickets = 0;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsSetupError::Config {
                side: "client",
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_cert_resolver(client_cert);
        Ok(MigrationTls::direct(server, client))
    }
}

/// The server and client configuration builders, each waiting for its own certificate.
type Builders = (
    rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>,
    rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
);

/// The server and client configurations up to their own certificate: TLS 1.3 only, this
/// module's cipher suites, peers verified against `roots` in both directions.
fn builders(roots: Arc<RootCertStore>) -> Result<Builders, TlsSetupError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(TlsSetupError::Verifier)?;
    let server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsSetupError::Config {
            side: "server",
            source,
        })?
        .with_client_cert_verifier(verifier);
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsSetupError::Config {
            side: "client",
            source,
        })?
        .with_root_certificates(roots);
    Ok((server, client))
}

/// How migration connections are carried. There is no default: plaintext must be chosen.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Mutual TLS with the cluster CA (the normal case).
    Tls(MigrationTls),
    /// No encryption and no authentication of the peer: only on an isolated migration
    /// network the operator configured as such.
    Plaintext,
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

/// Decides whether an incoming migration session may proceed. Called by the target after
/// the TLS handshake and the source's Hello, before anything is created.
pub trait SessionAuthorizer: Send + Sync {
    /// `peer_cert_der`: the source's leaf certificate (DER; `None` over plaintext), `vm`:
    /// the VM it wants to send, `ticket`: its one-time ticket (≤ [`MAX_TICKET_BYTES`]).
    /// `Err(reason)` refuses the session; the reason is sent to the source.
    fn authorize(
        &self,
        peer_cert_der: Option<&[u8]>,
        vm: &str,
        ticket: &[u8],
    ) -> Result<(), String>;
}

/// Accepts every session: for the standalone debug binary over plaintext only.
#[derive(Debug, Default, Clone, Copy)]
pub struct AllowAll;

impl SessionAuthorizer for AllowAll {
    fn authorize(&self, _: Option<&[u8]>, _: &str, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// One-time tickets, each for one VM (and optionally one source certificate): a ticket is
/// consumed by the first session that presents it, so a replay is refused.
#[derive(Debug, Default)]
pub struct TicketSet {
    tickets: Mutex<HashMap<Vec<u8>, Grant>>,
}

/// What one ticket allows: a VM, and optionally only from one certificate (DER).
#[derive(Debug)]
struct Grant {
    vm: String,
    peer: Option<Vec<u8>>,
}

impl TicketSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows one session for `vm` with `ticket`, from any certificate of the CA.
    pub fn insert(&self, vm: &str, ticket: &[u8]) {
        let grant = Grant {
            vm: vm.to_owned(),
            peer: None,
        };
        self.lock().insert(ticket.to_vec(), grant);
    }

    /// Allows one session for `vm` with `ticket` from the source presenting `cert_der`.
    pub fn insert_for_peer(&self, vm: &str, ticket: &[u8], cert_der: &[u8]) {
        let grant = Grant {
            vm: vm.to_owned(),
            peer: Some(cert_der.to_vec()),
        };
        self.lock().insert(ticket.to_vec(), grant);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Grant>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionAuthorizer for TicketSet {
    fn authorize(&self, peer: Option<&[u8]>, vm: &str, ticket: &[u8]) -> Result<(), String> {
        if ticket.is_empty() {
            return Err(format!("no migration ticket for VM {vm}"));
        }
        let mut t = self.lock();
        let Some(Grant {
            vm: for_vm,
            peer: for_peer,
        }) = t.get(ticket)
        else {
            return Err(format!(
                "unknown or already used migration ticket for VM {vm}"
            ));
        };
        if for_vm != vm {
            return Err(format!(
                "the migration ticket is for another VM, not for {vm}"
            ));
        }
        if for_peer.as_deref().is_some_and(|c| Some(c) != peer) {
            return Err(format!(
                "the migration ticket for VM {vm} was issued to another source node"
            ));
        }
        t.remove(ticket);
        Ok(())
    }
}
