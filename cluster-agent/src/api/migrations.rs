//! The migration management gRPC service (`proto/migrations.proto`). The progress it
//! streams comes from `control::progress`.
//!
//! ```text
//! clusterctl migration list|show ─▶ any agent: replicated MigrationRecords (local replica)
//! clusterctl migration cancel ID  ─▶ any agent: check ─▶ Raft: CancelMigration
//!                                      source reconciler sees cancel_requested ─▶ engine cancel
//! clusterctl vm migrate (progress) ─▶ any agent ─(not source: proxy)─▶ source agent:
//!        ProgressBoard (engine events, polled) + record state ─▶ WatchMigrationResponse stream
//! ```

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cluster_proto::migrations as pb;
use cluster_proto::migrations::migration_service_client::MigrationServiceClient;
use cluster_proto::migrations::migration_service_server::MigrationService;
use cluster_proto::times;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::forward;
use crate::api::status;
use crate::control::progress::{LiveProgress, ProgressBoard};
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::migrations::{
    self, MigrationCommand, MigrationKind, MigrationRecord, MigrationState,
};
use crate::state::Command;

/// How often a progress stream looks at the board and the record.
pub const PROGRESS_POLL: Duration = Duration::from_millis(100);
/// Progress messages buffered for a slow client before the stream waits.
pub const PROGRESS_STREAM_BUFFER: usize = 64;
/// How long a reply waits for this replica to apply the agent's own write.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);
pub fn record_to_pb(m: &MigrationRecord) -> pb::MigrationInfo {
    pb::MigrationInfo {
        id: m.id,
        vm: m.vm.clone(),
        source_node_id: m.source,
        target_node_id: m.target,
        kind: match m.kind {
            MigrationKind::Live => pb::MigrationKind::Live,
            MigrationKind::Quick => pb::MigrationKind::Quick,
        } as i32,
        state: match m.state {
            MigrationState::Queued => pb::MigrationState::Queued,
            MigrationState::Running => pb::MigrationState::Running,
            MigrationState::Succeeded => pb::MigrationState::Succeeded,
            MigrationState::Failed => pb::MigrationState::Failed,
            MigrationState::Cancelled => pb::MigrationState::Cancelled,
        } as i32,
        cancel_requested: m.cancel_requested,
        max_downtime: m.max_downtime_ms.map(times::duration_from_ms),
        deadline: m.deadline_ms.map(times::duration_from_ms),
        bandwidth_bytes_per_s_max: m.bandwidth_bytes_per_s_max.unwrap_or(0),
        started_at: times::timestamp_from_unix_ms(m.started_unix_ms),
        ended_at: m.ended_unix_ms.and_then(times::timestamp_from_unix_ms),
        predicted_duration: m.predicted.map(|p| times::duration_from_ms(p.total_ms)),
        predicted_blackout: m
            .predicted
            .and_then(|p| p.blackout_us)
            .map(times::duration_from_us),
        reason: m.reason.clone(),
        stats: m.stats.as_ref().map(|s| pb::MigrationSummary {
            rounds: s.rounds,
            guest_bytes: s.guest_bytes,
            wire_bytes: s.wire_bytes,
            total: Some(times::duration_from_us(s.total_us)),
            blackout: Some(times::duration_from_us(s.blackout_us)),
            max_throttle_percent: u32::from(s.max_throttle_percent),
            source_digest: s.source_digest,
            target_digest: s.target_digest.unwrap_or(0),
            has_target_digest: s.target_digest.is_some(),
            receipt_matches: s.receipt_matches,
        }),
    }
}

/// The API phase of an engine phase name ("pre-copy"); unknown names are unspecified.
fn phase_to_pb(engine: &str) -> pb::MigrationPhase {
    use cluster_proto::EnumName;
    pb::MigrationPhase::from_name(engine).unwrap_or(pb::MigrationPhase::Unspecified)
}

fn progress_to_pb(id: u64, p: &LiveProgress) -> pb::WatchMigrationResponse {
    pb::WatchMigrationResponse {
        id,
        phase: phase_to_pb(&p.phase) as i32,
        bytes_sent: p.bytes_sent,
        bytes_remaining: p.bytes_remaining,
        fraction_done: p.fraction_done,
        rate_bytes_per_s: p.rate_bytes_per_s,
        eta: Some(times::duration_from_ms(p.eta_ms)),
        round: p.round,
        throttle_percent: u32::from(p.throttle_percent),
        finished: None,
    }
}

/// The gRPC service.
pub struct MigrationApi {
    pub agent: Arc<Agent>,
    /// The progress of the migrations this node is the source of.
    pub progress: Arc<ProgressBoard>,
}

impl MigrationApi {
    fn record(&self, id: u64) -> Result<MigrationRecord, Status> {
        self.agent
            .read_sm(|d| d.state.migrations.get(&id).cloned())
            .ok_or_else(|| status::migration(migrations::MigrationError::Unknown(id)))
    }
}

async fn connect(agent: &Agent, addr: &str) -> Result<MigrationServiceClient<Channel>, Status> {
    Ok(MigrationServiceClient::new(
        forward::channel(agent, addr, "agent").await?,
    ))
}

type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchMigrationResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MigrationService for MigrationApi {
    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let r = request.into_inner();
        let vm = r.vm;
        let migrations = self.agent.read_sm(|d| {
            d.state
                .migrations
                .values()
                .filter(|m| vm.is_empty() || m.vm == vm)
                .map(record_to_pb)
                .collect()
        });
        let (migrations, next_page_token) = crate::api::paging::page(
            migrations,
            |m: &pb::MigrationInfo| m.id,
            r.page_size,
            &r.page_token,
        )?;
        Ok(Response::new(pb::ListMigrationsResponse {
            migrations,
            next_page_token,
        }))
    }

    async fn get_migration(
        &self,
        request: Request<pb::GetMigrationRequest>,
    ) -> Result<Response<pb::GetMigrationResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let m = self.record(request.into_inner().id)?;
        Ok(Response::new(pb::GetMigrationResponse {
            migration: Some(record_to_pb(&m)),
        }))
    }

    async fn cancel_migration(
        &self,
        request: Request<pb::CancelMigrationRequest>,
    ) -> Result<Response<pb::CancelMigrationResponse>, Status> {
        let id = request.into_inner().id;
        let cmd = MigrationCommand::CancelMigration {
            id,
            at_unix_ms: now_unix_ms(),
        };
        // Refuse on this replica first (clear codes); the leader checks again on apply.
        self.agent
            .read_sm(|d| migrations::check(&d.state, &cmd))
            .map_err(status::migration)?;
        let reply = self
            .agent
            .write(ForwardRequest::Command(Command::Migration(cmd)))
            .await
            .map_err(status::write)?;
        tracing::info!(migration = id, "migration cancel requested");
        // Answer from this replica once it has applied the cancel.
        if let crate::node::ForwardReply::Command { log_index, .. } = reply {
            let applied = self
                .agent
                .raft()
                .wait(Some(APPLY_WAIT))
                .applied_index_at_least(Some(log_index), "cancel applied locally")
                .await;
            if let Err(e) = applied {
                tracing::debug!(migration = id, error = %e, "cancel not applied here yet");
            }
        }
        let m = self.record(id)?;
        Ok(Response::new(pb::CancelMigrationResponse {
            migration: Some(record_to_pb(&m)),
        }))
    }

    type WatchMigrationStream = ProgressStream;

    async fn watch_migration(
        &self,
        request: Request<pb::WatchMigrationRequest>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let id = request.into_inner().id;
        let m = self.record(id)?;
        let me = self.agent.node_id();
        if m.source != me && !m.state.finished() {
            let addr = self
                .agent
                .read_sm(|d| {
                    d.state
                        .nodes
                        .get(&m.source)
                        .map(|n| n.registration.mgmt_addr.clone())
                })
                .ok_or_else(|| {
                    Status::unavailable(format!("source node {} is not registered", m.source))
                })?;
            let mut client = connect(&self.agent, &addr).await?;
            let upstream: ProgressStream = Box::pin(
                client
                    .watch_migration(pb::WatchMigrationRequest { id })
                    .await?
                    .into_inner(),
            );
            return Ok(Response::new(upstream));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(PROGRESS_STREAM_BUFFER);
        let (agent, progress) = (self.agent.clone(), self.progress.clone());
        tokio::spawn(async move {
            let mut sent_version = 0;
            let mut said_queued = false;
            loop {
                let rec = agent.read_sm(|d| d.state.migrations.get(&id).cloned());
                let Some(rec) = rec else {
                    let _ = tx
                        .send(Err(Status::not_found(format!(
                            "migration {id} left the history"
                        ))))
                        .await;
                    return;
                };
                let live = progress.get(id);
                if let Some(p) = live.as_ref().filter(|p| p.version != sent_version) {
                    sent_version = p.version;
                    if tx.send(Ok(progress_to_pb(id, p))).await.is_err() {
                        return;
                    }
                }
                if rec.state == MigrationState::Queued {
                    // Waiting for a slot: say so once, then keep watching.
                    if !said_queued {
                        said_queued = true;
                        let queued = pb::WatchMigrationResponse {
                            id,
                            phase: pb::MigrationPhase::Queued as i32,
                            ..Default::default()
                        };
                        if tx.send(Ok(queued)).await.is_err() {
                            return;
                        }
                    }
                    tokio::time::sleep(PROGRESS_POLL).await;
                    continue;
                }
                if rec.state != MigrationState::Running {
                    let mut last =
                        live.as_ref()
                            .map(|p| progress_to_pb(id, p))
                            .unwrap_or_else(|| pb::WatchMigrationResponse {
                                id,
                                ..Default::default()
                            });
                    last.phase = match rec.state {
                        MigrationState::Succeeded => pb::MigrationPhase::Succeeded,
                        MigrationState::Failed => pb::MigrationPhase::Failed,
                        MigrationState::Cancelled => pb::MigrationPhase::Cancelled,
                        MigrationState::Queued => pb::MigrationPhase::Queued,
                        MigrationState::Running => pb::MigrationPhase::Unspecified,
                    } as i32;
                    last.finished = Some(record_to_pb(&rec));
                    let _ = tx.send(Ok(last)).await;
                    return;
                }
                tokio::time::sleep(PROGRESS_POLL).await;
            }
        });
        let stream: ProgressStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(Response::new(stream))
    }
}
