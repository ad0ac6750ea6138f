//! The test process's cluster PKI: one CA per test process (created on first use, in a
//! directory that outlives every test cluster of the process), node certificates for the
//! nodes the harness adds, and user credentials (an `admin` every harness client uses,
//! others on request).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use cluster_proto::pki::{self, Ca, Identity, Role, TlsDir, TlsMaterial};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The process's CA and the credentials issued from it.
pub struct TestPki {
    dir: PathBuf,
    ca_cert_pem: String,
    ca_key_pem: String,
    users: Mutex<Vec<(String, Role, TlsDir)>>,
}

static PKI: OnceLock<TestPki> = OnceLock::new();

/// The process's PKI (created on first use; panics with the reason if it cannot be).
pub fn pki() -> &'static TestPki {
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cluster-tests-pki-{}", std::process::id()));
        let ca =
            Ca::create("test").unwrap_or_else(|e| panic!("harness: creating the test CA: {e}"));
        let d = TlsDir(dir.join("ca"));
        pki::write_file(&d.ca_cert(), ca.cert_pem(), false)
            .and_then(|()| pki::write_file(&d.ca_key(), &ca.key_pem(), true))
            .unwrap_or_else(|e| panic!("harness: writing the test CA: {e}"));
        TestPki {
            dir,
            ca_cert_pem: ca.cert_pem().to_owned(),
            ca_key_pem: ca.key_pem(),
            users: Mutex::default(),
        }
    })
}

impl TestPki {
    fn ca(&self) -> Ca {
        Ca::load(&self.ca_cert_pem, &self.ca_key_pem)
            .unwrap_or_else(|e| panic!("harness: loading the test CA: {e}"))
    }

    /// The directory holding the CA (`ca.pem`, `ca.key`): `clusterctl pki --ca-dir`.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// Issue node `id` a certificate for `ips` into `out` (a node's `tls_dir`); with
    /// `issuer`, the node gets the CA key too.
    pub fn issue_node(&self, id: u64, ips: &[IpAddr], out: &Path, issuer: bool) {
        self.issue_node_valid_for(id, ips, out, issuer, pki::CERT_VALIDITY)
    }

    /// Like [`TestPki::issue_node`], with a certificate valid for `valid_for`.
    pub fn issue_node_valid_for(
        &self,
        id: u64,
        ips: &[IpAddr],
        out: &Path,
        issuer: bool,
        valid_for: std::time::Duration,
    ) {
        let ca = self.ca();
        let issued = ca
            .issue(&Identity::Node(id), ips, valid_for)
            .unwrap_or_else(|e| panic!("harness: issuing node {id} a certificate: {e}"));
        let d = TlsDir(out.to_owned());
        d.store(ca.cert_pem(), &issued)
            .unwrap_or_else(|e| panic!("harness: storing node {id}'s certificate: {e}"));
        if issuer {
            d.store_ca_key(&ca)
                .unwrap_or_else(|e| panic!("harness: storing the CA key: {e}"));
        }
    }

    /// The credentials of user `name` with `role` (issued on first use).
    pub fn user(&self, name: &str, role: Role) -> TlsDir {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, d)) = users.iter().find(|(n, r, _)| n == name && *r == role) {
            return d.clone();
        }
        let ca = self.ca();
        let id = Identity::User {
            name: name.to_owned(),
            role,
        };
        let issued = ca
            .issue(&id, &[], pki::CERT_VALIDITY)
            .unwrap_or_else(|e| panic!("harness: issuing {id} a certificate: {e}"));
        let d = TlsDir(self.dir.join(format!("user-{name}-{role}")));
        d.store(ca.cert_pem(), &issued)
            .unwrap_or_else(|e| panic!("harness: storing {id}'s certificate: {e}"));
        users.push((name.to_owned(), role, d.clone()));
        d
    }

    /// The `admin` credentials every harness client uses.
    pub fn admin(&self) -> TlsDir {
        self.user("admin", Role::Admin)
    }

    /// `CLUSTERCTL_CA/CERT/KEY` for a clusterctl run as the admin.
    pub fn admin_env(&self) -> Vec<(&'static str, PathBuf)> {
        let d = self.admin();
        vec![
            ("CLUSTERCTL_CA", d.ca_cert()),
            ("CLUSTERCTL_CERT", d.cert()),
            ("CLUSTERCTL_KEY", d.key()),
            // No config file of the machine's user interferes.
            (
                "CLUSTERCTL_CONFIG",
                self.dir.join("no-clusterctl-config.toml"),
            ),
        ]
    }
}

/// Client TLS from `m` (the CA checks the agent; the certificate says who calls).
pub fn client_tls(m: &TlsMaterial) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&m.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &m.cert_pem,
            &m.key_pem,
        ))
}

/// An endpoint for the agent at `addr`, over TLS as `who` (`None`: with no client
/// certificate, checking the agent against the test CA).
pub fn endpoint_as(addr: SocketAddr, who: Option<&TlsMaterial>) -> Endpoint {
    let tls = match who {
        Some(m) => client_tls(m),
        None => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki().ca_pem())),
    };
    Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .unwrap_or_else(|e| panic!("harness: endpoint {addr}: {e}"))
}

/// An endpoint for the agent at `addr`, as the harness's admin.
pub fn admin_endpoint(addr: SocketAddr) -> Endpoint {
    let m = pki()
        .admin()
        .load()
        .unwrap_or_else(|e| panic!("harness: loading the admin credentials: {e}"));
    endpoint_as(addr, Some(&m))
}
