//! The web console: an HTTPS listener of its own (`console_addr`) serving a few static
//! pages (embedded in the binary: `assets/`), their JSON API and one server-sent-events
//! stream, with the same roles as the management API.
//!
//! ```text
//! clusterctl console url ─gRPC ConsoleLogin (user certificate)─▶ agent: one-time token
//! browser ─GET /login?token=…─▶ session cookie (HttpOnly, Secure, SameSite=Strict) ─▶ /
//! page ─GET /api/overview, /api/stream (SSE)─▶ in-process calls of the gRPC services
//! page ─POST /api/… + X-CSRF-Token─▶ same calls, refused unless the role allows the method
//! ```
//!
//! - **Login**: browsers handle client certificates badly, so a user asks the agent over
//!   the authenticated gRPC API for a login link ([`session`]): a random token, good once
//!   for a minute, that only this agent knows. Redeeming it gives a session cookie
//!   carrying nothing but a random id; the session (name, role, the certificate it came
//!   from) stays in this agent's memory and ends after 8 hours, at the certificate's
//!   expiry, on logout or when the agent restarts.
//! - **Every request** (pages, JSON, the stream; only `/login` and the stylesheet are open) finds its session
//!   and checks the certificate against the replicated revocation list, like
//!   [`super::auth`] does for each gRPC call: no session is 401, a revoked user is 401.
//! - **Roles**: each console call names the gRPC method it runs and passes
//!   [`super::auth`]'s own table (`decide`), so a viewer reads and previews but a write is
//!   403, exactly as on the gRPC API. The calls go to the agent's own service
//!   implementations in process (no loopback connection), with the caller's identity.
//! - **CSRF**: the cookie is SameSite=Strict, and every request other than GET must also
//!   carry the session's random token in `X-CSRF-Token` (the page reads it from
//!   `/api/session`; another site can neither read it nor set the header without CORS,
//!   which this server never allows).
//! - **Reads** are this agent's own replica (stale reads): the console shows what this
//!   node knows, also when it is cut off from the leader.
//!
//! **API Boundary:** every path, query, cookie, header and body here is outside input:
//! bad input is a JSON `{"error": "..."}` naming what was wrong (400), never a panic;
//! bodies are capped ([`BODY_LEN_MAX`]), connections ([`CONNECTIONS_MAX`]) and live
//! streams ([`STREAMS_MAX`]) are bounded.

mod api;
pub mod session;
mod stream;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cluster_proto::management as pb;
use cluster_proto::pki::{self, Identity};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_stream::StreamExt;
use tonic::Status;

pub use session::Sessions;

use crate::api::auth::{Caller, CallerCertificate};
use crate::api::jobs::JobApi;
use crate::api::management::ManagementApi;
use crate::api::migrations::MigrationApi;
use crate::api::vms::VmApi;
use crate::api::volumes::VolumeApi;
use crate::control::progress::ProgressBoard;
use crate::node::{now_unix_ms, Agent};
use crate::vmhost::VmHost;

/// The session cookie's name.
pub const COOKIE: &str = "vmcluster_console";
/// The header every non-GET request carries with the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Connections served at once; more are closed after the TLS handshake.
pub const CONNECTIONS_MAX: usize = 128;
/// Live event streams (`/api/stream`) open at once on this agent.
pub const STREAMS_MAX: usize = 16;
/// Largest request body accepted (the console's actions carry a few fields).
pub const BODY_LEN_MAX: usize = 16 * 1024;
/// HTTP/2 keep-alive pings: a connection that answers none within this long is closed.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// The console's listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the console listener's TLS")]
pub struct ConsoleError(#[source] super::tls::TlsConfigError);

/// What the console's handlers share: the agent's own service implementations, called
/// in process.
pub struct Console {
    agent: Arc<Agent>,
    sessions: Arc<Sessions>,
    streams: Arc<Semaphore>,
    management: ManagementApi,
    vms: VmApi,
    jobs: JobApi,
    volumes: VolumeApi,
    migrations: MigrationApi,
}

impl Console {
    pub fn new(
        agent: Arc<Agent>,
        host: Arc<VmHost>,
        progress: Arc<ProgressBoard>,
        sessions: Arc<Sessions>,
    ) -> Arc<Console> {
        Arc::new(Console {
            management: ManagementApi {
                agent: agent.clone(),
                console: None,
            },
            vms: VmApi::new(agent.clone(), host.clone()),
            jobs: JobApi::new(agent.clone()),
            volumes: VolumeApi {
                agent: agent.clone(),
                host,
            },
            migrations: MigrationApi {
                agent: agent.clone(),
                progress,
            },
            streams: Arc::new(Semaphore::new(STREAMS_MAX)),
            sessions,
            agent,
        })
    }
}

/// The gRPC `ConsoleLogin` call: a one-time login link for the calling user.
pub fn login<T>(
    sessions: Option<&Sessions>,
    agent: &Agent,
    request: &tonic::Request<T>,
) -> Result<pb::ConsoleLoginResponse, Status> {
    let (Some(sessions), Some(addr)) = (sessions, agent.config().console_addr) else {
        return Err(Status::failed_precondition(
            "this agent serves no web console (set console_addr in its config)",
        ));
    };
    let (name, role) = match request.extensions().get::<Caller>() {
        Some(Caller(Identity::User { name, role })) => (name.clone(), *role),
        _ => {
            return Err(Status::permission_denied(
                "console logins are for user certificates (clusterctl user create)",
            ))
        }
    };
    let der = request
        .extensions()
        .get::<CallerCertificate>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    let cert_expires = pki::not_after(&der)
        .map(pki::unix_ms)
        .map_err(|e| Status::unauthenticated(format!("the client certificate is unusable: {e}")))?;
    let (token, expires_unix_ms) = sessions
        .issue(&name, role, &der, cert_expires, now_unix_ms())
        .map_err(|e| Status::resource_exhausted(e.to_string()))?;
    // A wildcard listener is reached at the management address's IP.
    let host = if addr.ip().is_unspecified() {
        agent.config().mgmt_addr.ip()
    } else {
        addr.ip()
    };
    let url = format!(
        "https://{}/login?token={token}",
        std::net::SocketAddr::new(host, addr.port())
    );
    tracing::info!(user = %name, role = %role, "console login link issued");
    Ok(pb::ConsoleLoginResponse {
        url,
        expires_at: cluster_proto::times::timestamp_from_unix_ms(expires_unix_ms),
    })
}

/// A refusal or failure, answered as `{"error": "..."}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> ApiError {
        use tonic::Code;
        let status = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, s.message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}

/// The session a request was authenticated with (request extension).
#[derive(Clone)]
pub struct Authed {
    pub id: String,
    pub session: Arc<session::Session>,
}

impl Authed {
    pub fn identity(&self) -> Identity {
        Identity::User {
            name: self.session.name.clone(),
            role: self.session.role,
        }
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

const NOT_LOGGED_IN: &str = "no console session (or it expired): run `clusterctl console url` \
                             and open the link it prints";

fn unauthorized(path: &str, message: &str) -> Response {
    if path.starts_with("/api/") {
        return ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    }
    let page = include_str!("assets/login.html").replace("{{message}}", &html_escape(message));
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        page,
    )
        .into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Finds and checks the session of every request but `/login` (see the module docs).
async fn authenticate(State(c): State<Arc<Console>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let mut resp = if path == "/login" || path == "/style.css" {
        next.run(req).await
    } else {
        match check_session(&c, &req) {
            Ok(authed) => {
                req.extensions_mut().insert(authed);
                next.run(req).await
            }
            Err(r) => *r,
        }
    };
    let h = resp.headers_mut();
    for (k, v) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    resp
}

fn check_session(c: &Console, req: &Request) -> Result<Authed, Box<Response>> {
    let path = req.uri().path();
    let id =
        cookie(req.headers(), COOKIE).ok_or_else(|| Box::new(unauthorized(path, NOT_LOGGED_IN)))?;
    let session = c
        .sessions
        .get(&id, now_unix_ms())
        .ok_or_else(|| Box::new(unauthorized(path, NOT_LOGGED_IN)))?;
    if let Err(status) = crate::api::auth::check_not_retired(&c.agent, &session.cert_der)
        .and_then(|()| crate::api::auth::check_revoked(&c.agent, &session.name, &session.cert_der))
    {
        c.sessions.end(&id);
        return Err(Box::new(unauthorized(path, status.message())));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !session::same_secret(sent, &session.csrf) {
            return Err(Box::new(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("missing or wrong {CSRF_HEADER} header (the page sends the one /api/session gives)"),
            )
            .into_response()));
        }
    }
    Ok(Authed { id, session })
}

/// `GET /login?token=…`: the login link's token for a session cookie, then the overview.
async fn login_page(State(c): State<Arc<Console>>, req: Request) -> Response {
    let token = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .unwrap_or("");
    if token.is_empty() || token.len() > 128 {
        return unauthorized(
            "/login",
            "this login link has no token: run `clusterctl console url` and open the link it prints",
        );
    }
    let now = now_unix_ms();
    let Some((id, session)) = c.sessions.redeem(token, now) else {
        return unauthorized(
            "/login",
            "this login link is unknown, already used or expired (links are good once, for a \
             minute): run `clusterctl console url` again",
        );
    };
    let max_age_s = session.expires_unix_ms.saturating_sub(now) / 1000;
    tracing::info!(user = %session.name, role = %session.role, "console session started");
    let set =
        format!("{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age_s}");
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    match HeaderValue::from_str(&set) {
        Ok(v) => {
            resp.headers_mut().insert(header::SET_COOKIE, v);
            resp
        }
        Err(_) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "bad cookie").into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no console route {} {}", req.method(), req.uri().path()),
    )
}

/// Every route of the console (all but `/login` behind `authenticate`).
pub fn router(c: Arc<Console>) -> Router {
    Router::new()
        .route("/login", get(login_page))
        .route(
            "/",
            get(|| async {
                asset(
                    "text/html; charset=utf-8",
                    include_str!("assets/index.html"),
                )
            }),
        )
        .route(
            "/app.js",
            get(|| async {
                asset(
                    "text/javascript; charset=utf-8",
                    include_str!("assets/app.js"),
                )
            }),
        )
        .route(
            "/style.css",
            get(|| async { asset("text/css; charset=utf-8", include_str!("assets/style.css")) }),
        )
        .route("/api/session", get(api::session))
        .route("/api/overview", get(api::overview))
        .route("/api/stream", get(stream::stream))
        .route("/api/logout", post(api::logout))
        .route("/api/vms/{name}/{action}", post(api::vm_action))
        .route("/api/nodes/{id}/{action}", post(api::node_action))
        .route("/api/migrations/{id}/cancel", post(api::cancel_migration))
        .fallback(not_found)
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed on {}", req.method(), req.uri().path()),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LEN_MAX))
        .layer(axum::middleware::from_fn_with_state(
            c.clone(),
            authenticate,
        ))
        .with_state(c)
}

/// Serve the console on `listener` (HTTPS with the node's current certificate) until
/// `shutdown` flips.
pub fn spawn(
    listener: TcpListener,
    console: Arc<Console>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, ConsoleError> {
    let config = super::tls::console_server_config(console.agent.shared_credentials())
        .map_err(ConsoleError)?;
    let mut incoming = super::tls::tls_incoming(listener, config);
    let app = router(console);
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    Ok(tokio::spawn(async move {
        let mut stop = shutdown.clone();
        loop {
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                n = incoming.next() => n,
            };
            let tls = match next {
                None => break,
                Some(Ok(t)) => t,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "console connection refused");
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                tracing::warn!(max = CONNECTIONS_MAX, "console connection limit reached");
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            let mut stop = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder.http1().timer(TokioTimer::new());
                // Pings find browsers that went away without closing (their streams
                // and connection slot are then freed).
                builder
                    .http2()
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
                    .keep_alive_timeout(KEEPALIVE_INTERVAL);
                let conn = builder.serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        tracing::debug!(error = %e, "console connection ended");
                    },
                    _ = stop.wait_for(|s| *s) => {}
                }
            });
        }
    }))
}
