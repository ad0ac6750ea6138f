//! The migration management gRPC service (`proto/migrations.proto`) and the progress
//! board the source side of a live migration writes to.
//!
//! ```text
//! clusterctl migration list|show ─▶ any agent: replicated MigrationRecords (local replica)
//! clusterctl migration cancel ID  ─▶ any agent: check ─▶ Raft: CancelMigration
//!                                      source reconciler sees cancel_requested ─▶ engine cancel
//! clusterctl vm migrate (progress) ─▶ any agent ─(not source: proxy)─▶ source agent:
//!        ProgressBoard (engine events, polled) + record state ─▶ MigrationProgress stream
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cluster_proto::migrations as pb;
use cluster_proto::migrations::migration_service_client::MigrationServiceClient;
use cluster_proto::migrations::migration_service_server::MigrationService;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use vmm_node::migration::source::MigrationEvent;

use crate::agent::{now_unix_ms, Agent, ForwardRequest};
use crate::forward::{self, write_status};
use crate::migrations::{self, MigrationCommand, MigrationRecord, MigrationState};
use crate::state::Command;

/// How often a progress stream looks at the board and the record.
pub const PROGRESS_POLL: Duration = Duration::from_millis(100);
/// Progress messages buffered for a slow client before the stream waits.
pub const PROGRESS_STREAM_BUFFER: usize = 64;
/// How long a reply waits for this replica to apply the agent's own write.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Live progress entries kept (one per migration this node is the source of).
pub const BOARD_ENTRIES_MAX: usize = 64;

/// The latest engine event figures of one outgoing migration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveProgress {
    pub phase: String,
    pub bytes_sent: u64,
    pub bytes_remaining: u64,
    pub fraction_done: f64,
    pub rate_bytes_per_s: f64,
    pub eta_ms: u64,
    pub round: u32,
    pub throttle_percent: u8,
    /// Bumped on every update (streams send only changes).
    pub version: u64,
}

/// Upper bounds (µs) of the blackout histogram buckets (`/metrics`), +Inf implied.
pub const BLACKOUT_BUCKETS_US: [u64; 10] = [
    1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
];

/// How an outgoing migration ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// Counters of the migrations this node ran the source of since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceCounters {
    pub started: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub wire_bytes: u64,
    /// Per bucket of [`BLACKOUT_BUCKETS_US`] (not cumulative), plus one for +Inf.
    pub blackout_buckets: [u64; BLACKOUT_BUCKETS_US.len() + 1],
    pub blackout_sum_us: u64,
    pub blackout_count: u64,
}

/// Progress of the migrations this node runs the source of, by migration id.
#[derive(Debug, Default)]
pub struct ProgressBoard {
    inner: Mutex<HashMap<u64, LiveProgress>>,
    counters: Mutex<SourceCounters>,
}

impl ProgressBoard {
    fn counters_mut(&self) -> std::sync::MutexGuard<'_, SourceCounters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn counters(&self) -> SourceCounters {
        self.counters_mut().clone()
    }

    /// An outgoing migration began.
    pub fn started(&self) {
        self.counters_mut().started += 1;
    }

    /// An outgoing migration ended (`summary` for a successful one).
    pub fn finished(&self, outcome: Outcome, summary: Option<&migrations::MigrationSummary>) {
        let mut c = self.counters_mut();
        match outcome {
            Outcome::Succeeded => c.succeeded += 1,
            Outcome::Failed => c.failed += 1,
            Outcome::Cancelled => c.cancelled += 1,
        }
        if let Some(s) = summary {
            c.wire_bytes += s.wire_bytes;
            let i = BLACKOUT_BUCKETS_US
                .iter()
                .position(|b| s.blackout_us <= *b)
                .unwrap_or(BLACKOUT_BUCKETS_US.len());
            c.blackout_buckets[i] += 1;
            c.blackout_sum_us += s.blackout_us;
            c.blackout_count += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LiveProgress>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record one engine event of migration `id`.
    pub fn update(&self, id: u64, ev: &MigrationEvent) {
        let mut b = self.lock();
        if !b.contains_key(&id) && b.len() >= BOARD_ENTRIES_MAX {
            if let Some(oldest) = b.keys().min().copied() {
                b.remove(&oldest);
            }
        }
        let p = b.entry(id).or_default();
        match ev {
            MigrationEvent::Phase(ph) => p.phase = (*ph).to_string(),
            MigrationEvent::Progress(g) => {
                p.bytes_sent = g.bytes_sent;
                p.bytes_remaining = g.bytes_remaining;
                p.fraction_done = g.fraction_done;
                p.rate_bytes_per_s = g.rate_bytes_per_s;
                p.eta_ms = g.eta_ms;
                p.round = g.round;
                p.throttle_percent = g.throttle_percent;
            }
            MigrationEvent::Throttle(t) => p.throttle_percent = *t,
            MigrationEvent::Prediction(_) => return,
        }
        p.version += 1;
    }

    pub fn get(&self, id: u64) -> Option<LiveProgress> {
        self.lock().get(&id).cloned()
    }
}

pub fn record_to_pb(m: &MigrationRecord) -> pb::MigrationInfo {
    pb::MigrationInfo {
        id: m.id,
        vm: m.vm.clone(),
        source_node_id: m.source,
        target_node_id: m.target,
        kind: m.kind.as_str().into(),
        state: m.state.as_str().into(),
        cancel_requested: m.cancel_requested,
        max_downtime_ms: m.max_downtime_ms.unwrap_or(0),
        deadline_ms: m.deadline_ms.unwrap_or(0),
        bandwidth_bytes_per_s_max: m.bandwidth_bytes_per_s_max.unwrap_or(0),
        started_unix_ms: m.started_unix_ms,
        ended_unix_ms: m.ended_unix_ms.unwrap_or(0),
        reason: m.reason.clone(),
        stats: m.stats.as_ref().map(|s| pb::MigrationSummary {
            rounds: s.rounds,
            guest_bytes: s.guest_bytes,
            wire_bytes: s.wire_bytes,
            total_us: s.total_us,
            blackout_us: s.blackout_us,
            max_throttle_percent: u32::from(s.max_throttle_percent),
            source_digest: s.source_digest,
            target_digest: s.target_digest.unwrap_or(0),
            has_target_digest: s.target_digest.is_some(),
            receipt_matches: s.receipt_matches,
        }),
    }
}

fn progress_to_pb(id: u64, p: &LiveProgress) -> pb::MigrationProgress {
    pb::MigrationProgress {
        id,
        phase: p.phase.clone(),
        bytes_sent: p.bytes_sent,
        bytes_remaining: p.bytes_remaining,
        fraction_done: p.fraction_done,
        rate_bytes_per_s: p.rate_bytes_per_s,
        eta_ms: p.eta_ms,
        round: p.round,
        throttle_percent: u32::from(p.throttle_percent),
        finished: None,
    }
}

/// The gRPC service.
pub struct MigrationApi {
    pub agent: Arc<Agent>,
}

impl MigrationApi {
    fn record(&self, id: u64) -> Result<MigrationRecord, Status> {
        self.agent
            .read_sm(|d| d.state.migrations.get(&id).cloned())
            .ok_or_else(|| status(migrations::MigrationError::Unknown(id)))
    }
}

fn status(e: migrations::MigrationError) -> Status {
    crate::forward::class_status(e.class(), e.to_string())
}

async fn connect(addr: &str) -> Result<MigrationServiceClient<Channel>, Status> {
    Ok(MigrationServiceClient::new(
        forward::channel(addr, "agent").await?,
    ))
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<pb::MigrationProgress, Status>> + Send>>;

#[tonic::async_trait]
impl MigrationService for MigrationApi {
    async fn list_migrations(
        &self,
        request: Request<pb::ListMigrationsRequest>,
    ) -> Result<Response<pb::ListMigrationsReply>, Status> {
        let vm = request.into_inner().vm;
        let migrations = self.agent.read_sm(|d| {
            d.state
                .migrations
                .values()
                .filter(|m| vm.is_empty() || m.vm == vm)
                .map(record_to_pb)
                .collect()
        });
        Ok(Response::new(pb::ListMigrationsReply { migrations }))
    }

    async fn get_migration(
        &self,
        request: Request<pb::MigrationId>,
    ) -> Result<Response<pb::MigrationReply>, Status> {
        let m = self.record(request.into_inner().id)?;
        Ok(Response::new(pb::MigrationReply {
            migration: Some(record_to_pb(&m)),
        }))
    }

    async fn cancel_migration(
        &self,
        request: Request<pb::MigrationId>,
    ) -> Result<Response<pb::MigrationReply>, Status> {
        let id = request.into_inner().id;
        let cmd = MigrationCommand::CancelMigration {
            id,
            at_unix_ms: now_unix_ms(),
        };
        // Refuse on this replica first (clear codes); the leader checks again on apply.
        self.agent
            .read_sm(|d| migrations::check(&d.state, &cmd))
            .map_err(status)?;
        let reply = self
            .agent
            .write(ForwardRequest::Command(Command::Migration(cmd)))
            .await
            .map_err(write_status)?;
        tracing::info!(migration = id, "migration cancel requested");
        // Answer from this replica once it has applied the cancel.
        if let crate::agent::ForwardReply::Command { log_index, .. } = reply {
            let applied = self
                .agent
                .raft
                .wait(Some(APPLY_WAIT))
                .applied_index_at_least(Some(log_index), "cancel applied locally")
                .await;
            if let Err(e) = applied {
                tracing::debug!(migration = id, error = %e, "cancel not applied here yet");
            }
        }
        let m = self.record(id)?;
        Ok(Response::new(pb::MigrationReply {
            migration: Some(record_to_pb(&m)),
        }))
    }

    type WatchMigrationStream = ProgressStream;

    async fn watch_migration(
        &self,
        request: Request<pb::MigrationId>,
    ) -> Result<Response<Self::WatchMigrationStream>, Status> {
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
            let mut client = connect(&addr).await?;
            let upstream: ProgressStream = Box::pin(
                client
                    .watch_migration(pb::MigrationId { id })
                    .await?
                    .into_inner(),
            );
            return Ok(Response::new(upstream));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(PROGRESS_STREAM_BUFFER);
        let agent = self.agent.clone();
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
                let live = agent.migration_progress.get(id);
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
                        let queued = pb::MigrationProgress {
                            id,
                            phase: rec.state.as_str().into(),
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
                            .unwrap_or_else(|| pb::MigrationProgress {
                                id,
                                ..Default::default()
                            });
                    last.phase = rec.state.as_str().into();
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
