//! TLS for every gRPC listener and connection of the agent: the node's credentials
//! ([`Credentials`]) as tonic server and client configurations, and the identity a
//! caller's certificate names.
//!
//! **Architecture Invariant:** every channel this agent opens to another agent is built
//! by [`endpoint`] (mutual TLS with the node certificate, the cluster CA as the only
//! root); every listener accepts through [`tls_incoming`] with a [`server_config`].
//!
//! The listeners answer each handshake with the node's *current* certificate
//! ([`NodeCertResolver`] reads [`SharedCredentials`]), so a rotated certificate is served
//! from the next connection on without restarting a listener or cutting a connection.
//! Likewise peers are checked against the *current* trust bundle (`ca_pem`: one CA, or
//! the new and the old one while the cluster CA is rotated): [`BundleClientVerifier`]
//! and [`BundleServerVerifier`] rebuild rustls' WebPKI verifiers when the credentials
//! change, so a CA rotation or its finish takes effect at the next handshake.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cluster_proto::pki::{self, Identity};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::Status;

use crate::node::config::AgentConfig;
use crate::node::credentials::{Credentials, SharedCredentials};

/// TLS handshakes a listener runs at once; connections beyond are closed unanswered.
pub const HANDSHAKES_MAX: usize = 256;
/// How long a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a TLS configuration cannot be built from the credentials.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot parse the {what} PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the {what} PEM holds no certificate")]
    NoCertificate { what: &'static str },
    #[error("the TLS configuration is not usable")]
    Rustls(#[source] rustls::Error),
    #[error("the client certificate verifier cannot be built")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

fn certs_of(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let v = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem { what, source })?;
    if v.is_empty() {
        return Err(TlsConfigError::NoCertificate { what });
    }
    Ok(v)
}

/// The cluster CA(s) of the trust bundle as the only trust anchors.
pub fn roots(c: &Credentials) -> Result<Arc<rustls::RootCertStore>, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certs_of("CA certificate", &c.ca_pem)? {
        roots.add(ca).map_err(TlsConfigError::Rustls)?;
    }
    Ok(Arc::new(roots))
}

/// This node's current certificate and key for TLS handshakes, on both ends (server and
/// client): read from the shared credentials, parsed again only after they change.
#[derive(Debug)]
pub struct NodeCertResolver {
    credentials: SharedCredentials,
    provider: Arc<rustls::crypto::CryptoProvider>,
    cached: Mutex<Option<(u64, Arc<CertifiedKey>)>>,
}

impl NodeCertResolver {
    pub fn new(credentials: SharedCredentials) -> NodeCertResolver {
        NodeCertResolver {
            credentials,
            provider: vmm_node::migration::tls::crypto_provider(),
            cached: Mutex::new(None),
        }
    }

    /// The certified key of the current credentials.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, TlsConfigError> {
        let generation = self.credentials.generation();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, k)) = cached.as_ref() {
            if *g == generation {
                return Ok(k.clone());
            }
        }
        let c = self.credentials.current();
        let chain = certs_of("node certificate", &c.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).map_err(|source| {
            TlsConfigError::Pem {
                what: "node key",
                source,
            }
        })?;
        let k = Arc::new(
            CertifiedKey::from_der(chain, key, &self.provider).map_err(TlsConfigError::Rustls)?,
        );
        *cached = Some((generation, k.clone()));
        Ok(k)
    }

    fn resolved(&self) -> Option<Arc<CertifiedKey>> {
        match self.certified_key() {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "this node's certificate is unusable");
                None
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for NodeCertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.resolved()
    }
}

impl rustls::client::ResolvesClientCert for NodeCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.resolved()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A verifier built from the trust bundle of one credentials generation.
#[derive(Debug)]
struct Cached<V: ?Sized> {
    credentials: SharedCredentials,
    cached: Mutex<Option<(u64, Arc<V>)>>,
}

impl<V: ?Sized> Cached<V> {
    /// `with_retired`: the roots include the CA a finished rotation dropped.
    fn get(
        &self,
        with_retired: bool,
        build: impl FnOnce(Arc<rustls::RootCertStore>) -> Result<Arc<V>, rustls::Error>,
    ) -> Result<Arc<V>, rustls::Error> {
        let generation = self.credentials.generation();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, v)) = cached.as_ref() {
            if *g == generation {
                return Ok(v.clone());
            }
        }
        let mut c = (*self.credentials.current()).clone();
        if with_retired && !c.retired_ca_pem.is_empty() {
            c.ca_pem = format!("{}\n{}", c.ca_pem.trim_end(), c.retired_ca_pem);
        }
        let roots = roots(&c).map_err(|e| {
            tracing::error!(error = %crate::error_chain(&e), "this node's trust bundle (ca.pem) is unusable");
            rustls::Error::General("this node's trust bundle is unusable".into())
        })?;
        let v = build(roots)?;
        *cached = Some((generation, v.clone()));
        Ok(v)
    }
}

/// Client certificates checked against the current trust bundle (a listener's side). The
/// management listener (`optional`) also lets certificates of the CA a finished rotation
/// dropped through the handshake: `api::auth` refuses them on every call with a reason
/// (a TLS alert reaches a client as a broken connection, not as words).
#[derive(Debug)]
pub struct BundleClientVerifier {
    inner: Cached<dyn rustls::server::danger::ClientCertVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    optional: bool,
}

impl BundleClientVerifier {
    /// `optional`: a client without a certificate gets through the handshake.
    pub fn new(credentials: SharedCredentials, optional: bool) -> BundleClientVerifier {
        BundleClientVerifier {
            inner: Cached {
                credentials,
                cached: Mutex::new(None),
            },
            provider: vmm_node::migration::tls::crypto_provider(),
            optional,
        }
    }

    fn current(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, rustls::Error> {
        self.inner.get(self.optional, |roots| {
            let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots,
                self.provider.clone(),
            );
            let b = if self.optional {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build()
                .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))
        })
    }
}

impl rustls::server::danger::ClientCertVerifier for BundleClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        !self.optional
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints: every client of the cluster presents its one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Server certificates checked against the current trust bundle (a connection's side):
/// the chain to a CA of the bundle and the address dialled.
#[derive(Debug)]
pub struct BundleServerVerifier {
    inner: Cached<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl BundleServerVerifier {
    pub fn new(credentials: SharedCredentials) -> BundleServerVerifier {
        BundleServerVerifier {
            inner: Cached {
                credentials,
                cached: Mutex::new(None),
            },
            provider: vmm_node::migration::tls::crypto_provider(),
        }
    }

    fn current(&self) -> Result<Arc<rustls::client::WebPkiServerVerifier>, rustls::Error> {
        self.inner.get(false, |roots| {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                self.provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(format!("server verifier: {e}")))
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for BundleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.current()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Whether `c` is usable for TLS: the certificate parses and matches the key.
pub fn check_credentials(c: &Credentials) -> Result<(), TlsConfigError> {
    roots(c)?;
    NodeCertResolver::new(SharedCredentials::new(c.clone()))
        .certified_key()
        .map(|_| ())
}

/// A listener's TLS: this node's current certificate, callers checked against the
/// current trust bundle, HTTP/2 only. `client_auth_optional`: callers without a
/// certificate get through the handshake (the management plane then lets them reach only
/// the health check).
pub fn server_config(
    credentials: &SharedCredentials,
    client_auth_optional: bool,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = vmm_node::migration::tls::crypto_provider();
    // Fail at start, not at the first handshake, when the bundle is unusable.
    roots(&credentials.current())?;
    let verifier = Arc::new(BundleClientVerifier::new(
        credentials.clone(),
        client_auth_optional,
    ));
    let resolver = NodeCertResolver::new(credentials.clone());
    // Fail at start, not at the first handshake, when the certificate is unusable.
    resolver.certified_key()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The web console's TLS: this node's current certificate, no client certificates
/// (browsers log in with a token, see `api::console`), HTTP/2 or HTTP/1.1.
pub fn console_server_config(
    credentials: &SharedCredentials,
) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let provider = vmm_node::migration::tls::crypto_provider();
    let resolver = NodeCertResolver::new(credentials.clone());
    resolver.certified_key()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The connections `listener` accepts, after their TLS handshake: each handshake runs on
/// its own task with a deadline ([`TLS_HANDSHAKE_TIMEOUT`]), at most [`HANDSHAKES_MAX`]
/// at once, so a slow or silent client holds up no other. Nagle's algorithm is off (a
/// TLS record and the HTTP/2 frames around it go out in several writes, and a small
/// write held back for the peer's delayed ACK costs ~40 ms per call). Accepting stops
/// when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                a = listener.accept() => a,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // E.g. out of file descriptors: try again a little later.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
            }
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(
                    "{HANDSHAKES_MAX} TLS handshakes under way; a connection was closed"
                );
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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

/// `c` with `cert_ca_sha256` set: the CA of its bundle that issued its certificate.
pub fn with_issuer(mut c: Credentials) -> Credentials {
    c.cert_ca_sha256 = pki::certificates_der(&c.cert_pem)
        .first()
        .and_then(|der| pki::issuer_in(der, &c.ca_pem))
        .unwrap_or_default();
    c
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
    let not_after = m.not_after().map_err(load)?;
    if not_after <= std::time::SystemTime::now() {
        return Err(CredentialsError::Expired { dir });
    }
    Ok(with_issuer(Credentials {
        ca_pem: m.ca_pem,
        cert_pem: m.cert_pem,
        key_pem: m.key_pem,
        expires_unix_ms: pki::unix_ms(not_after),
        cert_ca_sha256: String::new(),
        retired_ca_pem: String::new(),
    }))
}
