//! Connecting to an agent's management service, with errors a person can act on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use cluster_proto::management::management_service_client::ManagementServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// The TLS of every connection (set once by `main` from flags, env or the context).
static TLS: OnceLock<Tls> = OnceLock::new();

/// Credentials in use: the CA that agents' certificates must chain to, and the client
/// certificate (without one, agents answer only the health check).
#[derive(Clone)]
pub struct Tls {
    pub ca_path: std::path::PathBuf,
    pub ca_pem: String,
    pub cert_path: Option<std::path::PathBuf>,
    pub identity: Option<(String, String)>,
}

/// Use `tls` for every connection from now on.
pub fn use_tls(tls: Tls) {
    let _ = TLS.set(tls);
}

fn tls_config() -> Option<tonic::transport::ClientTlsConfig> {
    TLS.get().map(|t| {
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca_pem));
        if let Some((cert, key)) = &t.identity {
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        c
    })
}

/// Set once by `--stale`: every call asks the agent for its own, possibly stale view.
static STALE_READS: AtomicBool = AtomicBool::new(false);

/// Ask every agent for its own view from now on (`--stale`): reads are then answered
/// from the agent's replica without confirming it is current.
pub fn use_stale_reads() {
    STALE_READS.store(true, Ordering::Relaxed);
}

/// Adds the stale-read header to a request when `--stale` was given.
fn read_mode(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    if STALE_READS.load(Ordering::Relaxed) {
        req.metadata_mut().insert(
            cluster_proto::STALE_READ_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    Ok(req)
}

/// A connection to an agent: its channel, with the read mode on every request.
pub type Conn = InterceptedService<Channel, ReadMode>;

/// The interceptor of every request ([`read_mode`]).
pub type ReadMode = fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>;

fn conn(channel: Channel) -> Conn {
    InterceptedService::new(channel, read_mode as ReadMode)
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("config {path}: {reason}")]
    Config {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Credentials(String),
    #[error("{0}")]
    Local(String),
    #[error("{endpoint:?} is not a valid agent address (expected IP:port, e.g. 127.0.1.1:7001)")]
    BadEndpoint { endpoint: String },
    #[error("no cluster agent reachable at {endpoint}: {cause}")]
    Unreachable { endpoint: String, cause: String },
    #[error("the agent at {endpoint} did not answer within {timeout_s} s")]
    Timeout { endpoint: String, timeout_s: u64 },
    #[error("{message}")]
    Refused { code: tonic::Code, message: String },
    #[error("cannot render the output: {0}")]
    Render(String),
    /// A watched job or an awaited migration ended without doing its work (failed,
    /// aborted, cancelled).
    #[error("{what} ended {status}")]
    Ended { what: String, status: String },
}

/// Exit codes of `clusterctl` (the table in `--help` and README): what happened, for scripts.
pub mod exit {
    /// A local problem: a bad endpoint, unreadable credentials or config, a value
    /// clusterctl itself refuses before asking an agent.
    pub const LOCAL: u8 = 1;
    /// No agent reachable at the endpoint, or no answer within the deadline.
    pub const UNREACHABLE: u8 = 2;
    /// No leader, or the agent cannot confirm its view is current (`--stale` reads anyway).
    pub const NO_LEADER: u8 = 3;
    /// The cluster refused the request (unknown name, failed precondition, permission, ...).
    pub const REFUSED: u8 = 4;
    /// A watched drain/failback ended failed or aborted, or an awaited migration failed or
    /// was cancelled.
    pub const JOB_FAILED: u8 = 5;
    /// clap refused the command line (sysexits' `EX_USAGE`).
    pub const USAGE: u8 = 64;
}

impl CtlError {
    /// The process exit code of this error (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Unreachable { .. } | CtlError::Timeout { .. } => exit::UNREACHABLE,
            CtlError::Refused {
                code: tonic::Code::Unavailable,
                ..
            } => exit::NO_LEADER,
            CtlError::Refused { .. } => exit::REFUSED,
            CtlError::Ended { .. } => exit::JOB_FAILED,
            CtlError::Config { .. }
            | CtlError::Credentials(_)
            | CtlError::Local(_)
            | CtlError::BadEndpoint { .. }
            | CtlError::Render(_) => exit::LOCAL,
        }
    }
}

/// Normalize "host:port", "http://host:port" or "https://host:port" to the agent's URI
/// (always TLS).
pub fn endpoint_uri(endpoint: &str) -> Result<String, CtlError> {
    let bare = endpoint
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let bad = || CtlError::BadEndpoint {
        endpoint: endpoint.to_string(),
    };
    let (host, port) = bare.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(format!("https://{bare}"))
}

/// `e` and its sources as one sentence, each cause once.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// [`error_chain`] of a connection failure, a TLS one explained.
fn chain(e: &dyn std::error::Error) -> String {
    let s = error_chain(e);
    explain_tls(&s).unwrap_or(s)
}

/// A TLS failure in words an operator can act on (`None`: not a TLS failure we know).
fn explain_tls(cause: &str) -> Option<String> {
    let t = TLS.get()?;
    let cert = t
        .cert_path
        .as_ref()
        .map_or("(none)".to_string(), |p| p.display().to_string());
    let ca = t.ca_path.display();
    if cause.contains("UnknownIssuer") || cause.contains("BadSignature") {
        Some(format!(
            "the agent's certificate is not signed by a CA in {ca} (another cluster, the wrong --ca, \
             or the cluster CA was rotated: put the cluster's trust bundle in {ca}, from \
             `clusterctl cluster ca show --pem` run where it works or from a node's tls_dir/ca.pem): {cause}"
        ))
    } else if cause.contains("CertificateExpired") || cause.contains("Expired") {
        Some(format!(
            "a certificate has expired (yours: {cert}; or the agent's): {cause}"
        ))
    } else if cause.contains("UnknownCA")
        || cause.contains("BadCertificate")
        || cause.contains("DecryptError")
    {
        Some(format!(
            "the agent refused the client certificate {cert}: it is not issued by a CA this cluster \
             trusts (another cluster's, or the old CA of a finished CA rotation: ask an admin for \
             a new certificate, `clusterctl user create`): {cause}"
        ))
    } else if cause.contains("NotValidForName") {
        Some(format!(
            "the agent's certificate does not carry the address you connected to: {cause}"
        ))
    } else if cause.contains("CertificateRequired") {
        Some(format!(
            "the agent requires a client certificate; give --cert and --key (or a context): {cause}"
        ))
    } else {
        None
    }
}

/// The agent at `endpoint`, with a connect timeout of at most 3 s.
fn agent(endpoint: &str, timeout: Duration) -> Result<Endpoint, CtlError> {
    let uri = endpoint_uri(endpoint)?;
    let bad = || CtlError::BadEndpoint {
        endpoint: endpoint.to_string(),
    };
    let tls = tls_config().ok_or_else(|| {
        CtlError::Credentials(
            "no cluster CA certificate: give --ca (and --cert/--key), set CLUSTERCTL_CA, or \
             add a context to the config (`clusterctl config add-context`)"
                .into(),
        )
    })?;
    Ok(Endpoint::from_shared(uri)
        .map_err(|_| bad())?
        .tls_config(tls)
        .map_err(|e| CtlError::Credentials(format!("the TLS credentials are not usable: {e}")))?
        .connect_timeout(Duration::from_secs(3).min(timeout)))
}

pub async fn connect(
    endpoint: &str,
    timeout: Duration,
) -> Result<ManagementServiceClient<Conn>, CtlError> {
    let ep = agent(endpoint, timeout)?.timeout(timeout);
    let channel = ep.connect().await.map_err(|e| CtlError::Unreachable {
        endpoint: endpoint.to_string(),
        cause: chain(&e),
    })?;
    Ok(ManagementServiceClient::new(conn(channel)))
}

/// A client of one of the agent's services (VMs, disks, drains, migrations), built by
/// `new` from a channel to `endpoint`. Unlike [`connect`] its calls have no deadline:
/// some stream or wait for a migration.
pub async fn service<C>(
    endpoint: &str,
    timeout: Duration,
    new: impl FnOnce(Conn) -> C,
) -> Result<C, CtlError> {
    let channel = agent(endpoint, timeout)?
        .connect()
        .await
        .map_err(|e| CtlError::Unreachable {
            endpoint: endpoint.to_string(),
            cause: chain(&e),
        })?;
    Ok(new(conn(channel)))
}

/// The answer of `rpc` to the agent at `endpoint`, with `timeout` as its deadline; a
/// late answer or a refusal becomes a [`CtlError`].
pub async fn call<T>(
    endpoint: &str,
    timeout: Duration,
    rpc: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CtlError> {
    tokio::time::timeout(timeout, rpc)
        .await
        .map_err(|_| CtlError::Timeout {
            endpoint: endpoint.to_string(),
            timeout_s: timeout.as_secs(),
        })?
        .map(tonic::Response::into_inner)
        .map_err(|s| status_error(endpoint, timeout, s))
}

/// Items per page clusterctl asks for (the API's maximum).
pub const PAGE_SIZE: u32 = 1000;
/// Most pages clusterctl follows for one list.
const PAGES_MAX: usize = 1000;

/// Every item of a paged list call: `page` answers the items after a page token and the
/// token of the next page (empty after the last).
pub async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, CtlError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), CtlError>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    for _ in 0..PAGES_MAX {
        let (items, next) = page(token).await?;
        all.extend(items);
        if next.is_empty() {
            return Ok(all);
        }
        token = next;
    }
    Err(CtlError::Render(format!(
        "the agent answered more than {PAGES_MAX} pages"
    )))
}

/// The message a response embeds (`GetNodeResponse.node`, ...): an agent that answers
/// without it is a local error, never a default value shown as if it were real.
pub fn required<T>(v: Option<T>, what: &str) -> Result<T, CtlError> {
    v.ok_or_else(|| CtlError::Render(format!("the agent answered without a {what}")))
}

/// Map a failed call to a clear error.
pub fn status_error(endpoint: &str, timeout: Duration, s: tonic::Status) -> CtlError {
    match s.code() {
        tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
            if s.message().contains("Timeout") || s.message().is_empty() =>
        {
            CtlError::Timeout {
                endpoint: endpoint.to_string(),
                timeout_s: timeout.as_secs(),
            }
        }
        tonic::Code::Unknown | tonic::Code::Unavailable
            if s.message().contains("transport error") || s.message().contains("connection") =>
        {
            let cause = match std::error::Error::source(&s) {
                Some(src) => format!("{}: {}", s.message(), chain(src)),
                None => s.message().to_string(),
            };
            CtlError::Unreachable {
                endpoint: endpoint.to_string(),
                cause: explain_tls(&cause).unwrap_or(cause),
            }
        }
        code if s.message().is_empty() => CtlError::Refused {
            code,
            message: format!("the agent at {endpoint} answered {code:?} without a reason (is it an older agent version?)"),
        },
        code => CtlError::Refused {
            code,
            message: s.message().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized_or_refused() {
        assert_eq!(
            endpoint_uri("127.0.1.1:7001").ok().as_deref(),
            Some("https://127.0.1.1:7001")
        );
        assert_eq!(
            endpoint_uri("http://10.0.0.1:1").ok().as_deref(),
            Some("https://10.0.0.1:1")
        );
        assert!(matches!(
            endpoint_uri("nohost"),
            Err(CtlError::BadEndpoint { .. })
        ));
        assert!(matches!(
            endpoint_uri("1.2.3.4:0"),
            Err(CtlError::BadEndpoint { .. })
        ));
        assert!(matches!(
            endpoint_uri("1.2.3.4:x"),
            Err(CtlError::BadEndpoint { .. })
        ));
    }
}
