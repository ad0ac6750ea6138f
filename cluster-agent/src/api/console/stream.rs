//! `GET /api/stream`: the page's live updates as server-sent events.
//!
//! - `overview`: the whole [`super::api::snapshot`], sent first and then whenever it
//!   changed (looked at every [`STREAM_TICK`]);
//! - `progress`: a running migration's `WatchMigrationResponse` (the gRPC `WatchMigration`
//!   stream, proxied from the source agent like for clusterctl), as it comes;
//! - `problem`: `{"error": ...}` when the overview could not be read this time.
//!
//! At most [`super::STREAMS_MAX`] streams are open on an agent; the task feeding one
//! ends when the browser goes away.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use cluster_proto::migrations as mpb;
use cluster_proto::migrations::migration_service_server::MigrationService;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{ApiError, Authed, Console};

/// How often an open stream looks at the overview.
pub const STREAM_TICK: Duration = Duration::from_millis(500);
/// Events buffered for a slow browser before the stream waits.
const STREAM_BUFFER: usize = 64;

type Tx = mpsc::Sender<Result<Event, Infallible>>;

fn event(kind: &str, data: &impl serde::Serialize) -> Event {
    let data = serde_json::to_string(data).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    Event::default().event(kind).data(data)
}

pub async fn stream(State(c): State<Arc<Console>>, Extension(a): Extension<Authed>) -> Response {
    let Ok(permit) = c.streams.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} live console streams are open on this agent already; close a console tab \
                 or try again later",
                super::STREAMS_MAX
            ),
        )
        .into_response();
    };
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        let _permit = permit;
        feed(c, a, tx).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response()
}

async fn feed(c: Arc<Console>, a: Authed, tx: Tx) {
    let mut sent = String::new();
    let mut watched: HashSet<u64> = HashSet::new();
    loop {
        // A session that ended (logout, expiry, revocation) ends its stream too.
        if c.sessions.get(&a.id, crate::node::now_unix_ms()).is_none()
            || crate::api::auth::check_not_retired(&c.agent, &a.session.cert_der)
                .and_then(|()| {
                    crate::api::auth::check_revoked(&c.agent, &a.session.name, &a.session.cert_der)
                })
                .is_err()
        {
            return;
        }
        let e = match super::api::snapshot(&c, &a).await {
            Ok(v) => {
                for m in v["migrations"].as_array().into_iter().flatten() {
                    let running = m["state"].as_str() == Some("running");
                    if let (true, Some(id)) = (running, m["id"].as_u64()) {
                        if watched.insert(id) {
                            tokio::spawn(watch(c.clone(), a.clone(), id, tx.clone()));
                        }
                    }
                }
                let text = v.to_string();
                if text == sent {
                    None
                } else {
                    sent = text;
                    Some(Event::default().event("overview").data(sent.clone()))
                }
            }
            Err(e) => Some(event("problem", &serde_json::json!({ "error": e.message }))),
        };
        if let Some(e) = e {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(STREAM_TICK) => {}
        }
    }
}

/// Forward migration `id`'s progress into the stream until it ends or the browser left.
async fn watch(c: Arc<Console>, a: Authed, id: u64, tx: Tx) {
    let method = "/cluster.migrations.v1.MigrationService/WatchMigration".to_owned();
    let progress = c
        .call(&a, method, mpb::WatchMigrationRequest { id }, |r| {
            c.migrations.watch_migration(r)
        })
        .await;
    let mut progress = match progress {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(migration = id, error = %e.message, "console cannot watch");
            return;
        }
    };
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            n = progress.next() => n,
        };
        match next {
            Some(Ok(p)) => {
                if tx.send(Ok(event("progress", &p))).await.is_err() {
                    return;
                }
            }
            Some(Err(_)) | None => return,
        }
    }
}
