//! The cluster's certificates: what a certificate says about its holder, and how the
//! cluster CA issues them.
//!
//! Every certificate the cluster CA issues names its holder in one subject-alternative-name
//! URI (the identity) — `vmcluster:node:<id>` for an agent, `vmcluster:user:<name>:<role>`
//! for a person or tool — beside the IP addresses an agent serves on. The identity is what
//! the listeners authorize on; the chain to the CA is what rustls checks first.
//!
//! Files: a holder keeps its credentials in one directory ([`TlsDir`]): `ca.pem` (the CA
//! certificates it trusts: one, or two while the cluster CA is rotated — the *trust
//! bundle*), `cert.pem` and `key.pem` (its own, the key 0600), and on the nodes that may
//! issue certificates `ca.key` (0600), the key of the CA that issues now; its certificate
//! is the one of the bundle with the same public key ([`Ca::load`]).
//!
//! A CA is named by its fingerprint ([`fingerprint`], SHA-256 of its DER certificate); a
//! certificate's issuer is found in a bundle by its signature ([`issuer_in`]).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

/// Prefix of the identity URI in a certificate's subject alternative names.
pub const IDENTITY_URI_PREFIX: &str = "vmcluster:";
/// Longest user name a certificate may carry.
pub const USER_NAME_LEN_MAX: usize = 64;
/// How long a CA certificate is valid when created.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a node or user certificate is valid when issued.
pub const CERT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Largest PEM file read as a certificate or key.
pub const PEM_FILE_LEN_MAX: u64 = 64 * 1024;

/// What a user certificate allows on the management API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Reads, console and watches; no change.
    Viewer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Role, PkiError> {
        match s {
            "admin" => Ok(Role::Admin),
            "viewer" => Ok(Role::Viewer),
            other => Err(PkiError::BadRole(other.to_owned())),
        }
    }
}

/// Who a certificate's holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The agent of node `id`.
    Node(u64),
    /// A person or tool with a role.
    User { name: String, role: Role },
}

impl Identity {
    /// The subject-alternative-name URI that carries this identity.
    pub fn uri(&self) -> String {
        match self {
            Identity::Node(id) => format!("{IDENTITY_URI_PREFIX}node:{id}"),
            Identity::User { name, role } => format!("{IDENTITY_URI_PREFIX}user:{name}:{role}"),
        }
    }

    /// Parse an identity URI ([`Identity::uri`]).
    pub fn from_uri(uri: &str) -> Result<Identity, PkiError> {
        let bad = || PkiError::BadIdentity(uri.chars().take(128).collect());
        let rest = uri.strip_prefix(IDENTITY_URI_PREFIX).ok_or_else(bad)?;
        if let Some(id) = rest.strip_prefix("node:") {
            let id: u64 = id.parse().map_err(|_| bad())?;
            if id == 0 {
                return Err(bad());
            }
            return Ok(Identity::Node(id));
        }
        let user = rest.strip_prefix("user:").ok_or_else(bad)?;
        let (name, role) = user.rsplit_once(':').ok_or_else(bad)?;
        check_user_name(name)?;
        Ok(Identity::User {
            name: name.to_owned(),
            role: role.parse()?,
        })
    }

    /// The common name put in the subject (for people reading the certificate).
    fn common_name(&self) -> String {
        match self {
            Identity::Node(id) => format!("node-{id}"),
            Identity::User { name, .. } => name.clone(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(id) => write!(f, "node {id}"),
            Identity::User { name, role } => write!(f, "user {name:?} ({role})"),
        }
    }
}

/// A user name: 1 to 64 of `[A-Za-z0-9._-]`, not starting with `-`.
pub fn check_user_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= USER_NAME_LEN_MAX
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadUserName(name.chars().take(80).collect()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0:?} is not a cluster identity (expected vmcluster:node:<id> or vmcluster:user:<name>:<role>)")]
    BadIdentity(String),
    #[error("unknown role {0:?} (expected admin or viewer)")]
    BadRole(String),
    #[error("bad user name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-'")]
    BadUserName(String),
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate names no cluster identity (it was not issued by a cluster CA)")]
    NoIdentity,
    #[error("the certificate names more than one cluster identity")]
    SeveralIdentities,
    #[error("cannot create the certificate")]
    Generate(#[source] rcgen::Error),
    #[error("{what} is not a usable PEM {kind}")]
    BadPem {
        what: String,
        kind: &'static str,
        #[source]
        source: Option<rcgen::Error>,
    },
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {PEM_FILE_LEN_MAX} bytes: not a certificate or key")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no certificate (no PEM CERTIFICATE block)")]
    NoCertificate { path: PathBuf },
    #[error("no certificate of the CA bundle matches the CA key")]
    NoMatchingCaCertificate,
    #[error("cannot sign with the CA key")]
    Sign(#[source] rcgen::Error),
}

/// The cluster identity a DER certificate names (exactly one identity URI).
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let mut found = None;
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if uri.starts_with(IDENTITY_URI_PREFIX) {
                if found.is_some() {
                    return Err(PkiError::SeveralIdentities);
                }
                found = Some(Identity::from_uri(uri)?);
            }
        }
    }
    found.ok_or(PkiError::NoIdentity)
}

/// When a DER certificate stops being valid.
pub fn not_after(cert_der: &[u8]) -> Result<SystemTime, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let t = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0)))
}

/// The IP addresses a DER certificate names (subject alternative names).
pub fn ips_of(cert_der: &[u8]) -> Result<Vec<IpAddr>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let mut ips = Vec::new();
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        if let x509_parser::extensions::GeneralName::IPAddress(b) = name {
            match b.len() {
                4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                _ => {
                    return Err(PkiError::BadCertificate(
                        "an IP address of odd length".into(),
                    ))
                }
            }
        }
    }
    Ok(ips)
}

/// When a DER certificate starts being valid (issuers back-date it a minute).
pub fn not_before(cert_der: &[u8]) -> Result<SystemTime, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let t = cert.validity().not_before.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0)))
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A Unix time in milliseconds as UTC text, e.g. `2026-12-06 19:40:28 UTC`.
pub fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1_000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (proleptic Gregorian calendar).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// SHA-256 of `bytes`, lowercase hex (join-token secrets are stored this way only).
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A DER certificate as PEM (LF line endings, as rcgen writes them).
pub fn cert_pem_of(der: Vec<u8>) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A CA's fingerprint: SHA-256 of its DER certificate, lowercase hex.
pub fn fingerprint(cert_der: &[u8]) -> String {
    sha256_hex(cert_der)
}

/// The fingerprint of the CA of `bundle_pem` that signed `cert_der` (its issuer name and
/// signature checked); `None` when no CA of the bundle did.
pub fn issuer_in(cert_der: &[u8], bundle_pem: &str) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    certificates_der(bundle_pem).into_iter().find_map(|ca_der| {
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).ok()?;
        (ca.subject().as_raw() == cert.issuer().as_raw()
            && cert.verify_signature(Some(ca.public_key())).is_ok())
        .then(|| fingerprint(&ca_der))
    })
}

/// The certificate of `bundle_pem` whose fingerprint is `fp` (PEM), if any.
pub fn certificate_by_fingerprint(bundle_pem: &str, fp: &str) -> Option<String> {
    certificates_der(bundle_pem)
        .into_iter()
        .find(|d| fingerprint(d) == fp)
        .map(cert_pem_of)
}

/// Longest proof ([`prove_ca_key`]) accepted.
pub const PROOF_LEN_MAX: usize = 512;

/// Whether `proof` is a signature of `message` by the key of the CA certificate
/// `ca_cert_der` (ECDSA P-256 or P-384, Ed25519: the algorithms rcgen makes CA keys with).
pub fn verify_ca_proof(ca_cert_der: &[u8], message: &[u8], proof: &[u8]) -> bool {
    use ring::signature;
    let Ok((_, ca)) = x509_parser::parse_x509_certificate(ca_cert_der) else {
        return false;
    };
    let key = ca.public_key().subject_public_key.data.as_ref();
    let algs: [&dyn signature::VerificationAlgorithm; 3] = [
        &signature::ECDSA_P256_SHA256_ASN1,
        &signature::ECDSA_P384_SHA384_ASN1,
        &signature::ED25519,
    ];
    proof.len() <= PROOF_LEN_MAX
        && algs.iter().any(|a| {
            signature::UnparsedPublicKey::new(*a, key)
                .verify(message, proof)
                .is_ok()
        })
}

/// The DER blocks of every certificate in a PEM text.
pub fn certificates_der(pem_text: &str) -> Vec<Vec<u8>> {
    pem::parse_many(pem_text)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect()
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued").finish_non_exhaustive()
    }
}

/// The cluster CA: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // a positive INTEGER
    b[0] |= 0x01; // without a leading zero byte
    SerialNumber::from_slice(&b)
}

/// How far back a certificate's validity starts before its issue: a minute of slack for
/// clocks a little behind the issuer's, less for a short-lived certificate (a quarter of
/// its lifetime), so its renewal point stays after its issue.
pub fn backdate(valid_for: Duration) -> Duration {
    (valid_for / 4).min(Duration::from_secs(60))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::seconds(backdate(valid_for).as_secs() as i64);
    params.not_after = now + time::Duration::seconds(valid_for.as_secs() as i64);
}

impl Ca {
    /// A new CA for the cluster named `cluster_name`. Its common name ends with the
    /// start of its public key's hash, so two CAs of one cluster (a rotation) have
    /// different names and a certificate's issuer name tells them apart.
    pub fn create(cluster_name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        let key_id = sha256_hex(key.public_key_raw());
        dn.push(
            DnType::CommonName,
            format!("{cluster_name} cluster CA {}", &key_id[..8]),
        );
        dn.push(DnType::OrganizationName, cluster_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA from its certificate and key (PEM). `cert_pem` may be a trust bundle:
    /// the CA is its certificate with the key's public key (none: an error).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadPem {
            what: "the CA key".into(),
            kind: "private key",
            source: Some(e),
        })?;
        let der = certificates_der(cert_pem)
            .into_iter()
            .find(|d| {
                x509_parser::parse_x509_certificate(d).is_ok_and(|(_, c)| {
                    c.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
                })
            })
            .ok_or(PkiError::NoMatchingCaCertificate)?;
        let cert_pem = cert_pem_of(der);
        let cert_pem = cert_pem.as_str();
        // Fail now, not at the first issue, if the certificate is unusable.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(|e| PkiError::BadPem {
            what: "the CA certificate".into(),
            kind: "CA certificate",
            source: Some(e),
        })?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// This CA's fingerprint ([`fingerprint`]).
    pub fn fingerprint(&self) -> String {
        certificates_der(&self.cert_pem)
            .first()
            .map(|d| fingerprint(d))
            .unwrap_or_default()
    }

    /// A signature of `message` with the CA key: proves to a holder of the CA
    /// certificate that the signer holds the key ([`verify_ca_proof`]).
    pub fn prove(&self, message: &[u8]) -> Result<Vec<u8>, PkiError> {
        use rcgen::SigningKey;
        self.key.sign(message).map_err(PkiError::Sign)
    }

    fn params(
        id: &Identity,
        ips: &[IpAddr],
        valid_for: Duration,
    ) -> Result<CertificateParams, PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.common_name());
        params.distinguished_name = dn;
        let uri = rcgen::string::Ia5String::try_from(id.uri()).map_err(PkiError::Generate)?;
        params.subject_alt_names.push(SanType::URI(uri));
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match id {
            // An agent serves (server) and calls its peers (client).
            Identity::Node(_) => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Identity::User { .. } => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity(&mut params, valid_for);
        Ok(params)
    }

    /// A new key and a certificate naming `id` (and, for a node, the IPs it serves on).
    pub fn issue(
        &self,
        id: &Identity,
        ips: &[IpAddr],
        valid_for: Duration,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Generate)?;
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(PkiError::Generate)?;
        let cert = Self::params(id, ips, valid_for)?
            .signed_by(&key, &issuer)
            .map_err(PkiError::Generate)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A certificate naming `id` for the public key of a certificate signing request
    /// (everything else in the request is ignored: the issuer decides what it says).
    pub fn sign_request(
        &self,
        csr_pem: &str,
        id: &Identity,
        ips: &[IpAddr],
        valid_for: Duration,
    ) -> Result<String, PkiError> {
        let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            PkiError::BadPem {
                what: "the certificate signing request".into(),
                kind: "certificate signing request",
                source: Some(e),
            }
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(PkiError::Generate)?;
        let cert = Self::params(id, ips, valid_for)?
            .signed_by(&csr.public_key, &issuer)
            .map_err(PkiError::Generate)?;
        Ok(cert.pem())
    }
}

/// A new private key and a signing request for it (PEM key, PEM request): what a joining
/// node sends so its key never leaves it.
pub fn new_key_and_request() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .map_err(PkiError::Generate)?;
    let pem = csr.pem().map_err(PkiError::Generate)?;
    Ok((key.serialize_pem(), pem))
}

/// A holder's TLS credentials, as PEM text.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

impl TlsMaterial {
    /// The identity the holder's own certificate names.
    pub fn identity(&self) -> Result<Identity, PkiError> {
        let der = certificates_der(&self.cert_pem);
        let first = der.first().ok_or(PkiError::NoIdentity)?;
        identity_of(first)
    }

    /// When the holder's own certificate stops being valid.
    pub fn not_after(&self) -> Result<SystemTime, PkiError> {
        let der = certificates_der(&self.cert_pem);
        let first = der
            .first()
            .ok_or_else(|| PkiError::BadCertificate("no certificate".into()))?;
        not_after(first)
    }
}

/// Read a PEM file of at most [`PEM_FILE_LEN_MAX`] bytes.
pub fn read_pem_file(path: &Path) -> Result<String, PkiError> {
    let meta = std::fs::metadata(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > PEM_FILE_LEN_MAX {
        return Err(PkiError::TooLarge {
            path: path.to_owned(),
        });
    }
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Write `text` to `path`, readable by its owner only when `private`.
pub fn write_file(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        action: "write",
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// A directory holding one holder's credentials (see the module docs for the names).
#[derive(Clone, Debug)]
pub struct TlsDir(pub PathBuf);

impl TlsDir {
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.0.join("cert.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.0.join("key.pem")
    }

    /// Whether this directory holds a certificate of its own.
    pub fn has_cert(&self) -> bool {
        self.cert().exists() && self.key().exists()
    }

    /// Whether this directory holds the CA key (its holder may issue certificates).
    pub fn has_ca_key(&self) -> bool {
        self.ca_key().exists()
    }

    /// Where a renewed certificate and key are written before they replace the current
    /// ones ([`TlsDir::store_renewal`]).
    fn next(&self) -> (PathBuf, PathBuf) {
        (self.0.join("cert.pem.next"), self.0.join("key.pem.next"))
    }

    /// Replace the own certificate and key by renewed ones so that a crash at any point
    /// leaves a matching pair: both are written whole beside the current ones (the key
    /// first), then renamed over them (the key first); [`TlsDir::load`] finishes a
    /// replacement a crash interrupted.
    pub fn store_renewal(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        let (cert_next, key_next) = self.next();
        write_file(&key_next, key_pem, true)?;
        write_file(&cert_next, cert_pem, false)?;
        self.finish_renewal()
    }

    /// Finish an interrupted [`TlsDir::store_renewal`]: a whole `cert.pem.next` means
    /// its key was written whole before it. Another process (or thread) loading the same
    /// directory may finish it at the same moment: a file it already moved is not an
    /// error.
    fn finish_renewal(&self) -> Result<(), PkiError> {
        let (cert_next, key_next) = self.next();
        if !cert_next.exists() {
            return Ok(());
        }
        let rename = |from: &Path, to: &Path| match std::fs::rename(from, to) {
            // Moved by the other one already (a later renewal may have written a new
            // `.next` since: that one is finished by whoever loads next).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(|source| PkiError::Io {
                action: "replace",
                path: to.to_owned(),
                source,
            }),
        };
        if key_next.exists() {
            rename(&key_next, &self.key())?;
        }
        rename(&cert_next, &self.cert())?;
        if let Ok(d) = std::fs::File::open(&self.0) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The CA certificate, own certificate and key.
    pub fn load(&self) -> Result<TlsMaterial, PkiError> {
        self.finish_renewal()?;
        let m = TlsMaterial {
            ca_pem: read_pem_file(&self.ca_cert())?,
            cert_pem: read_pem_file(&self.cert())?,
            key_pem: read_pem_file(&self.key())?,
        };
        for (path, text) in [(self.ca_cert(), &m.ca_pem), (self.cert(), &m.cert_pem)] {
            if certificates_der(text).is_empty() {
                return Err(PkiError::NoCertificate { path });
            }
        }
        Ok(m)
    }

    /// The CA (certificate and key), for a holder that may issue.
    pub fn load_ca(&self) -> Result<Ca, PkiError> {
        Ca::load(
            &read_pem_file(&self.ca_cert())?,
            &read_pem_file(&self.ca_key())?,
        )
    }

    /// Store the CA certificate, an issued certificate and its key.
    pub fn store(&self, ca_pem: &str, issued: &Issued) -> Result<(), PkiError> {
        write_file(&self.ca_cert(), ca_pem, false)?;
        write_file(&self.key(), &issued.key_pem, true)?;
        write_file(&self.cert(), &issued.cert_pem, false)
    }

    /// Store the CA key too (this holder may issue certificates).
    pub fn store_ca_key(&self, ca: &Ca) -> Result<(), PkiError> {
        write_file(&self.ca_key(), &ca.key_pem(), true)
    }

    /// Where the key of the CA with fingerprint `fp` waits (0600) until the cluster
    /// made that CA the issuing one and it replaces `ca.key`.
    pub fn pending_ca_key(&self, fp: &str) -> PathBuf {
        let short: String = fp
            .chars()
            .filter(|c| c.is_ascii_hexdigit())
            .take(16)
            .collect();
        self.0.join(format!("ca.key.{short}"))
    }

    /// Replace the trusted CA certificates (`ca.pem`) by `bundle_pem` (crash-safe).
    pub fn store_ca_bundle(&self, bundle_pem: &str) -> Result<(), PkiError> {
        write_file(&self.ca_cert(), bundle_pem, false)
    }

    /// Replace the CA key (`ca.key`, 0600, crash-safe).
    pub fn store_ca_key_pem(&self, key_pem: &str) -> Result<(), PkiError> {
        write_file(&self.ca_key(), key_pem, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_certificates() {
        let ca = Ca::create("test").unwrap();
        for id in [
            Identity::Node(7),
            Identity::User {
                name: "alice".into(),
                role: Role::Viewer,
            },
        ] {
            let issued = ca
                .issue(&id, &["127.0.1.7".parse().unwrap()], CERT_VALIDITY)
                .unwrap();
            let m = TlsMaterial {
                ca_pem: ca.cert_pem().into(),
                cert_pem: issued.cert_pem,
                key_pem: issued.key_pem,
            };
            assert_eq!(m.identity().unwrap(), id);
            let left = m
                .not_after()
                .unwrap()
                .duration_since(SystemTime::now())
                .unwrap();
            assert!(left > CERT_VALIDITY - Duration::from_secs(120));
        }
    }

    #[test]
    fn a_signing_request_gets_the_identity_the_issuer_chose() {
        let ca = Ca::create("test").unwrap();
        let (_key, csr) = new_key_and_request().unwrap();
        let cert = ca
            .sign_request(&csr, &Identity::Node(3), &[], CERT_VALIDITY)
            .unwrap();
        assert_eq!(
            identity_of(&certificates_der(&cert)[0]).unwrap(),
            Identity::Node(3)
        );
        let ips: Vec<IpAddr> = vec!["127.0.1.3".parse().unwrap(), "::1".parse().unwrap()];
        let cert = ca
            .sign_request(&csr, &Identity::Node(3), &ips, Duration::from_secs(20))
            .unwrap();
        let der = &certificates_der(&cert)[0];
        assert_eq!(ips_of(der).unwrap(), ips);
        // A 20 s certificate is back-dated 5 s, not a minute.
        let life = not_after(der)
            .unwrap()
            .duration_since(not_before(der).unwrap());
        assert_eq!(life.unwrap(), Duration::from_secs(25));
        assert!(ca
            .sign_request("garbage", &Identity::Node(3), &[], CERT_VALIDITY)
            .is_err());
    }

    #[test]
    fn a_bundle_names_each_certificate_s_issuer_and_loads_the_ca_of_its_key() {
        let (old, new) = (Ca::create("lab").unwrap(), Ca::create("lab").unwrap());
        assert_ne!(old.fingerprint(), new.fingerprint());
        let bundle = format!("{}{}", new.cert_pem(), old.cert_pem());
        let by_old = old.issue(&Identity::Node(1), &[], CERT_VALIDITY).unwrap();
        let by_new = new.issue(&Identity::Node(1), &[], CERT_VALIDITY).unwrap();
        let der = |pem: &str| certificates_der(pem).remove(0);
        assert_eq!(
            issuer_in(&der(&by_old.cert_pem), &bundle),
            Some(old.fingerprint())
        );
        assert_eq!(
            issuer_in(&der(&by_new.cert_pem), &bundle),
            Some(new.fingerprint())
        );
        assert_eq!(issuer_in(&der(&by_old.cert_pem), new.cert_pem()), None);
        assert_eq!(issuer_in(b"garbage", &bundle), None);
        // The CA of a bundle is the certificate of its key.
        let loaded = Ca::load(&bundle, &old.key_pem()).unwrap();
        assert_eq!(loaded.fingerprint(), old.fingerprint());
        assert_eq!(loaded.cert_pem(), old.cert_pem());
        assert!(matches!(
            Ca::load(new.cert_pem(), &old.key_pem()),
            Err(PkiError::NoMatchingCaCertificate)
        ));
        assert_eq!(
            certificate_by_fingerprint(&bundle, &new.fingerprint()).as_deref(),
            Some(new.cert_pem())
        );
        // A proof of the key checks against the CA certificate only.
        let proof = old.prove(b"message").unwrap();
        let old_der = der(old.cert_pem());
        assert!(verify_ca_proof(&old_der, b"message", &proof));
        assert!(!verify_ca_proof(&old_der, b"other", &proof));
        assert!(!verify_ca_proof(&der(new.cert_pem()), b"message", &proof));
        assert!(!verify_ca_proof(
            &old_der,
            b"message",
            &[0; PROOF_LEN_MAX + 1]
        ));
        assert!(!verify_ca_proof(b"garbage", b"message", &proof));
    }

    #[test]
    fn utc_renders_civil_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_796_586_028_000), "2026-12-06 19:40:28 UTC");
    }

    #[test]
    fn bad_identities_are_refused_with_the_reason() {
        for bad in [
            "vmcluster:node:0",
            "vmcluster:node:x",
            "vmcluster:user:bob:root",
            "vmcluster:user::admin",
            "vmcluster:user:-x:admin",
            "other:node:1",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad}");
        }
        assert!(identity_of(b"not a certificate").is_err());
        let ca = Ca::create("test").unwrap();
        // The CA certificate itself names no identity.
        assert!(matches!(
            identity_of(&certificates_der(ca.cert_pem())[0]),
            Err(PkiError::NoIdentity)
        ));
    }

    /// A TLS dir (in a temporary directory kept alive by the first value) holding node 1's
    /// certificate and key from a new CA, which is returned too.
    fn node_1_tls_dir() -> (tempfile::TempDir, TlsDir, Ca) {
        let dir = tempfile::tempdir().unwrap();
        let d = TlsDir(dir.path().join("tls"));
        let ca = Ca::create("test").unwrap();
        let issued = ca.issue(&Identity::Node(1), &[], CERT_VALIDITY).unwrap();
        d.store(ca.cert_pem(), &issued).unwrap();
        (dir, d, ca)
    }

    #[test]
    fn a_tls_dir_stores_keys_private_and_loads_back() {
        use std::os::unix::fs::PermissionsExt;
        let (_dir, d, ca) = node_1_tls_dir();
        d.store_ca_key(&ca).unwrap();
        for p in [d.key(), d.ca_key()] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
        assert_eq!(d.load().unwrap().identity().unwrap(), Identity::Node(1));
        let again = d.load_ca().unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        // A renewal interrupted after the key was replaced is finished at the next load.
        let renewed = ca.issue(&Identity::Node(1), &[], CERT_VALIDITY).unwrap();
        write_file(&d.key(), &renewed.key_pem, true).unwrap();
        write_file(&d.0.join("cert.pem.next"), &renewed.cert_pem, false).unwrap();
        let m = d.load().unwrap();
        assert_eq!(
            (m.cert_pem, m.key_pem),
            (renewed.cert_pem.clone(), renewed.key_pem)
        );
        assert!(!d.0.join("cert.pem.next").exists());
        let third = ca.issue(&Identity::Node(1), &[], CERT_VALIDITY).unwrap();
        d.store_renewal(&third.cert_pem, &third.key_pem).unwrap();
        assert_eq!(d.load().unwrap().cert_pem, third.cert_pem);
        let mode = std::fs::metadata(d.key()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(d.cert(), "no pem here").unwrap();
        assert!(matches!(d.load(), Err(PkiError::NoCertificate { .. })));
    }

    /// A process reading a TLS dir while its agent stores renewals (a test, `clusterctl`
    /// on the node) may finish the same renewal at the same moment: neither fails.
    #[test]
    fn loading_while_renewals_are_stored_never_fails() {
        let (_dir, d, ca) = node_1_tls_dir();
        let renewals: Vec<Issued> = (0..50)
            .map(|_| ca.issue(&Identity::Node(1), &[], CERT_VALIDITY).unwrap())
            .collect();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let mut loads = 0u32;
                        while !done.load(std::sync::atomic::Ordering::Acquire) || loads == 0 {
                            d.load()
                                .unwrap_or_else(|e| panic!("load during a renewal: {e}"));
                            loads += 1;
                        }
                    })
                })
                .collect();
            // Whatever happens to the writer, the readers stop when it does.
            struct Done<'a>(&'a std::sync::atomic::AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, std::sync::atomic::Ordering::Release);
                }
            }
            let writer = s.spawn(|| {
                let _done = Done(&done);
                for r in &renewals {
                    d.store_renewal(&r.cert_pem, &r.key_pem)
                        .unwrap_or_else(|e| panic!("store a renewal: {e}"));
                }
            });
            let writer = writer.join();
            for r in readers {
                r.join()
                    .unwrap_or_else(|_| panic!("a reader failed to load"));
            }
            writer.unwrap_or_else(|_| panic!("the writer failed to store a renewal"));
        });
        let last = renewals.last().unwrap();
        let m = d.load().unwrap();
        assert_eq!(
            (m.cert_pem, m.key_pem),
            (last.cert_pem.clone(), last.key_pem.clone())
        );
    }
}
