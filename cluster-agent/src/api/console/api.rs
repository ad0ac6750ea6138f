//! The console's JSON API: each handler calls the agent's own gRPC service
//! implementations in process, after [`crate::api::auth`]'s role table allowed the
//! session's user that method. Replies are the management API's own messages as JSON.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cluster_proto::drain as dpb;
use cluster_proto::drain::drain_service_server::DrainService;
use cluster_proto::management as pb;
use cluster_proto::management::management_service_server::ManagementService;
use cluster_proto::migrations as mpb;
use cluster_proto::migrations::migration_service_server::MigrationService;
use cluster_proto::vms as vpb;
use cluster_proto::vms::vm_service_server::VmService;
use cluster_proto::volumes as volpb;
use cluster_proto::volumes::volume_service_server::VolumeService;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response as GrpcResponse, Status};

use super::{ApiError, Authed, Console};
use crate::api::auth::Caller;

/// Events the overview carries (the newest).
pub const OVERVIEW_EVENTS: u64 = 50;
/// Migrations and jobs the overview carries (the newest).
pub const OVERVIEW_HISTORY: usize = 30;

const M: &str = "/cluster.management.v1.ManagementService/";
const V: &str = "/cluster.vms.v1.VmService/";
const D: &str = "/cluster.drain.v1.DrainService/";
const VOL: &str = "/cluster.volumes.v1.VolumeService/";
const MIG: &str = "/cluster.migrations.v1.MigrationService/";

impl Console {
    /// Call one method of the agent's services for `who`: refused (403) unless
    /// [`crate::api::auth`] lets the user's role call `method` over gRPC. Reads are this
    /// replica's own view.
    pub(super) async fn call<Req, Resp, F, Fut>(
        &self,
        who: &Authed,
        method: String,
        req: Req,
        f: F,
    ) -> Result<Resp, ApiError>
    where
        F: FnOnce(Request<Req>) -> Fut,
        Fut: Future<Output = Result<GrpcResponse<Resp>, Status>>,
    {
        let identity = who.identity();
        crate::api::auth::decide(&method, Some(&identity))?;
        let mut r = Request::new(req);
        r.extensions_mut().insert(Caller(identity));
        r.metadata_mut().insert(
            cluster_proto::STALE_READ_HEADER,
            MetadataValue::from_static("true"),
        );
        Ok(f(r).await?.into_inner())
    }
}

/// `GET /api/session`: who is logged in, and the CSRF token for writes.
pub async fn session(State(c): State<Arc<Console>>, Extension(a): Extension<Authed>) -> Response {
    let s = &a.session;
    let name = c.agent.config().name.clone();
    json_ok(serde_json::json!({
        "user": s.name,
        "role": s.role.to_string(),
        "csrf": s.csrf,
        "node_id": c.agent.node_id(),
        "node_name": name,
        "expires_unix_ms": s.expires_unix_ms,
    }))
}

/// `POST /api/logout`.
pub async fn logout(State(c): State<Arc<Console>>, Extension(a): Extension<Authed>) -> Response {
    c.sessions.end(&a.id);
    let clear = format!(
        "{}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        super::COOKIE
    );
    let mut resp = json_ok(serde_json::json!({ "ok": true }));
    if let Ok(v) = axum::http::HeaderValue::from_str(&clear) {
        resp.headers_mut().insert(axum::http::header::SET_COOKIE, v);
    }
    resp
}

/// Most pages of one list the console reads (at `PAGE_SIZE_MAX` items a page).
const PAGES_MAX: usize = 100;

/// Every page of a list call: `page` answers the items after a page token and the token
/// of the next page.
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, ApiError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), ApiError>>,
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
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("a list had more than {PAGES_MAX} pages"),
    ))
}

/// Everything the overview page shows, as one JSON value.
pub async fn snapshot(c: &Console, a: &Authed) -> Result<serde_json::Value, ApiError> {
    let m = &c.management;
    let status = c
        .call(
            a,
            format!("{M}ClusterStatus"),
            pb::ClusterStatusRequest {},
            |r| m.cluster_status(r),
        )
        .await?;
    let page_size = crate::api::paging::PAGE_SIZE_MAX as u32;
    let nodes = all_pages(|page_token| async move {
        let req = pb::ListNodesRequest {
            page_size,
            page_token,
        };
        let r = c
            .call(a, format!("{M}ListNodes"), req, |r| m.list_nodes(r))
            .await?;
        Ok((r.nodes, r.next_page_token))
    })
    .await?;
    let last = c
        .call(
            a,
            format!("{M}ListEvents"),
            pb::ListEventsRequest {
                after_seq: u64::MAX,
                page_size: 1,
                page_token: String::new(),
            },
            |r| m.list_events(r),
        )
        .await?
        .last_seq;
    let mut events = c
        .call(
            a,
            format!("{M}ListEvents"),
            pb::ListEventsRequest {
                after_seq: last.saturating_sub(OVERVIEW_EVENTS),
                page_size: OVERVIEW_EVENTS as u32,
                page_token: String::new(),
            },
            |r| m.list_events(r),
        )
        .await?
        .events;
    events.reverse();
    let vms = all_pages(|page_token| async move {
        let req = vpb::ListVmsRequest {
            page_size,
            page_token,
        };
        let r = c
            .call(a, format!("{V}ListVms"), req, |r| c.vms.list_vms(r))
            .await?;
        Ok((r.vms, r.next_page_token))
    })
    .await?;
    let mut migrations = all_pages(|page_token| async move {
        let req = mpb::ListMigrationsRequest {
            page_size,
            page_token,
            ..Default::default()
        };
        let r = c
            .call(a, format!("{MIG}ListMigrations"), req, |r| {
                c.migrations.list_migrations(r)
            })
            .await?;
        Ok((r.migrations, r.next_page_token))
    })
    .await?;
    migrations.sort_by_key(|m| std::cmp::Reverse(m.id));
    migrations.truncate(OVERVIEW_HISTORY);
    let mut jobs = all_pages(|page_token| async move {
        let req = dpb::ListJobsRequest {
            page_size,
            page_token,
        };
        let r = c
            .call(a, format!("{D}ListJobs"), req, |r| c.jobs.list_jobs(r))
            .await?;
        Ok((r.jobs, r.next_page_token))
    })
    .await?;
    jobs.sort_by_key(|j| std::cmp::Reverse(j.id));
    jobs.truncate(OVERVIEW_HISTORY);
    let locks = all_pages(|page_token| async move {
        let req = volpb::ListLocksRequest {
            page_size,
            page_token,
        };
        let r = c
            .call(a, format!("{VOL}ListLocks"), req, |r| {
                c.volumes.list_locks(r)
            })
            .await?;
        Ok((r.locks, r.next_page_token))
    })
    .await?;
    Ok(serde_json::json!({
        "status": status,
        "nodes": nodes,
        "vms": vms,
        "migrations": migrations,
        "jobs": jobs,
        "locks": locks,
        "events": events,
    }))
}

/// `GET /api/overview`.
pub async fn overview(State(c): State<Arc<Console>>, Extension(a): Extension<Authed>) -> Response {
    match snapshot(&c, &a).await {
        Ok(v) => json_ok(v),
        Err(e) => e.into_response(),
    }
}

/// `v` as a JSON response.
pub fn json_ok<T: serde::Serialize>(v: T) -> Response {
    match serde_json::to_string(&v) {
        Ok(s) => ([(axum::http::header::CONTENT_TYPE, "application/json")], s).into_response(),
        Err(e) => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The JSON body of an action (`{}` when empty); unknown fields are refused by name.
fn body<T: DeserializeOwned>(bytes: &Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = match bytes {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return Err(ApiError::new(
                e.status(),
                format!(
                    "the request body is too large (at most {} bytes)",
                    super::BODY_LEN_MAX
                ),
            ))
        }
        Err(e) => return Err(ApiError::new(e.status(), e.body_text())),
    };
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(text)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

fn json<T: serde::Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => json_ok(v),
        Err(e) => e.into_response(),
    }
}

fn bad_path(e: PathRejection) -> Response {
    ApiError::bad_request(format!("bad path: {e}")).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoFields {}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    /// 0 (or absent): the scheduler picks.
    #[serde(default)]
    to_node_id: u64,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    quick: bool,
}

/// `POST /api/vms/{name}/{start|stop|migrate}`.
pub async fn vm_action(
    State(c): State<Arc<Console>>,
    Extension(a): Extension<Authed>,
    path: Result<Path<(String, String)>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let Path((name, action)) = match path {
        Ok(p) => p,
        Err(e) => return bad_path(e),
    };
    let v = &c.vms;
    let r = match action.as_str() {
        "start" | "stop" => match body::<NoFields>(&bytes) {
            Err(e) => Err(e),
            Ok(_) => {
                if action == "start" {
                    let req = vpb::StartVmRequest { name };
                    c.call(&a, format!("{V}StartVm"), req, |r| v.start_vm(r))
                        .await
                        .map(|r| serde_json::json!(r))
                } else {
                    let req = vpb::StopVmRequest { name };
                    c.call(&a, format!("{V}StopVm"), req, |r| v.stop_vm(r))
                        .await
                        .map(|r| serde_json::json!(r))
                }
            }
        },
        "migrate" => match body::<MigrateBody>(&bytes) {
            Err(e) => Err(e),
            Ok(b) => {
                if b.dry_run {
                    let req = vpb::PlanMigrationRequest {
                        name,
                        to_node_id: b.to_node_id,
                        quick: b.quick,
                        ..Default::default()
                    };
                    c.call(&a, format!("{V}PlanMigration"), req, |r| {
                        v.plan_migration(r)
                    })
                    .await
                    .map(|r| serde_json::json!({ "plan": r }))
                } else {
                    let req = vpb::MigrateVmRequest {
                        name,
                        to_node_id: b.to_node_id,
                        quick: b.quick,
                        ..Default::default()
                    };
                    c.call(&a, format!("{V}MigrateVm"), req, |r| v.migrate_vm(r))
                        .await
                        .map(|r| serde_json::json!(r))
                }
            }
        },
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown VM action {other:?} (start, stop or migrate)"),
        )),
    };
    json(r)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DrainBody {
    #[serde(default)]
    dry_run: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ResumeBody {
    #[serde(default)]
    failback: bool,
}

fn id_of(what: &str, s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| ApiError::bad_request(format!("{what} {s:?} is not a positive number")))
}

/// `POST /api/nodes/{id}/{drain|abort-drain|resume}`.
pub async fn node_action(
    State(c): State<Arc<Console>>,
    Extension(a): Extension<Authed>,
    path: Result<Path<(String, String)>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let Path((id, action)) = match path {
        Ok(p) => p,
        Err(e) => return bad_path(e),
    };
    let node_id = match id_of("node id", &id) {
        Ok(n) => n,
        Err(e) => return e.into_response(),
    };
    let j = &c.jobs;
    let r = match action.as_str() {
        "drain" => match body::<DrainBody>(&bytes) {
            Err(e) => Err(e),
            Ok(b) => {
                let req = dpb::DrainNodeRequest {
                    node_id,
                    dry_run: b.dry_run,
                };
                c.call(&a, format!("{D}DrainNode"), req, |r| j.drain_node(r))
                    .await
                    .map(|r| serde_json::json!(r))
            }
        },
        "abort-drain" => match body::<NoFields>(&bytes) {
            Err(e) => Err(e),
            Ok(_) => c
                .call(
                    &a,
                    format!("{D}AbortDrain"),
                    dpb::AbortDrainRequest { node_id },
                    |r| j.abort_drain(r),
                )
                .await
                .map(|r| serde_json::json!(r)),
        },
        "resume" => match body::<ResumeBody>(&bytes) {
            Err(e) => Err(e),
            Ok(b) => {
                let req = dpb::ResumeNodeRequest {
                    node_id,
                    failback: b.failback,
                };
                c.call(&a, format!("{D}ResumeNode"), req, |r| j.resume_node(r))
                    .await
                    .map(|r| serde_json::json!(r))
            }
        },
        other => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown node action {other:?} (drain, abort-drain or resume)"),
        )),
    };
    json(r)
}

/// `POST /api/migrations/{id}/cancel`.
pub async fn cancel_migration(
    State(c): State<Arc<Console>>,
    Extension(a): Extension<Authed>,
    path: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Response {
    let Path(id) = match path {
        Ok(p) => p,
        Err(e) => return bad_path(e),
    };
    let r = match (id_of("migration id", &id), body::<NoFields>(&bytes)) {
        (Err(e), _) | (_, Err(e)) => Err(e),
        (Ok(id), Ok(_)) => c
            .call(
                &a,
                format!("{MIG}CancelMigration"),
                mpb::CancelMigrationRequest { id },
                |r| c.migrations.cancel_migration(r),
            )
            .await
            .map(|r| serde_json::json!(r)),
    };
    json(r)
}
