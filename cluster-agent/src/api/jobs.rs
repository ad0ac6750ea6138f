//! Server side of the drain / failback / balancing API (`cluster.drain.v1.DrainService`).
//!
//! Writes are decided on the Raft leader (others forward the call to the leader's
//! management address): the leader checks, plans with the scheduler and commits one
//! `Command::Job`; the executor (`crate::control::job_runner`) then runs the job. Reads and dry runs
//! answer from the local replica and commit nothing.

use std::sync::Arc;

use cluster_proto::drain as pb;
use cluster_proto::drain::drain_service_client::DrainServiceClient;
use cluster_proto::drain::drain_service_server::DrainService;
use cluster_proto::times;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::forward;
use crate::api::status;
use crate::control::job_runner;
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::jobs::{self, BalancePolicy, JobCommand, JobError, JobMove, JobRecord};
use crate::state::{ClusterState, Command};

/// Job updates a watch buffers for a slow client before it waits for it.
const WATCH_BUFFER: usize = 16;

type JobStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::WatchJobResponse, Status>> + Send>,
>;

/// How long a forwarded job change may take to show on this replica before we answer.
const LOCAL_APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct JobApi {
    pub agent: Arc<Agent>,
    /// Serialises check-plan-commit on the leader.
    lock: tokio::sync::Mutex<()>,
}

impl JobApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        JobApi {
            agent,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> ClusterState {
        self.agent.read_sm(|d| d.state.clone())
    }

    /// After a call forwarded to the leader: wait (bounded) until this replica has applied
    /// the job change the leader answered with, so a follow-up read here (`drain show`,
    /// `--watch`) sees it.
    async fn await_local(&self, job: Option<&pb::JobInfo>) {
        let Some(j) = job else { return };
        let start = tokio::time::Instant::now();
        while start.elapsed() < LOCAL_APPLY_WAIT {
            let seen = self.agent.read_sm(|d| {
                d.state
                    .jobs
                    .jobs
                    .get(&j.id)
                    .is_some_and(|r| r.updated_unix_ms >= times::unix_ms(j.updated_at.as_ref()))
            });
            if seen {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        tracing::debug!(job = j.id, "forwarded job change not applied here yet");
    }

    async fn leader_client(&self) -> Result<Option<DrainServiceClient<Channel>>, Status> {
        let Some(addr) = forward::leader_addr(&self.agent)? else {
            return Ok(None);
        };
        let ch = forward::channel(&self.agent, &addr, "the leader").await?;
        Ok(Some(DrainServiceClient::new(ch)))
    }

    async fn commit(&self, cmd: JobCommand) -> Result<(), Status> {
        self.agent
            .write(ForwardRequest::Command(Command::Job(cmd)))
            .await
            .map(|_| ())
            .map_err(status::write)
    }
}

fn node_arg(node_id: u64) -> Result<u64, Status> {
    if node_id == 0 {
        return Err(Status::invalid_argument(
            "node_id is 0: give the id of a node (`clusterctl node list`)",
        ));
    }
    Ok(node_id)
}

pub fn move_to_pb(m: &JobMove) -> pb::MoveInfo {
    pb::MoveInfo {
        vm: m.vm.clone(),
        from_node_id: m.from,
        to_node_id: m.to,
        kind: if m.quick {
            pb::MoveKind::Quick
        } else {
            pb::MoveKind::Live
        } as i32,
        why_not_live: m.why_not_live.clone(),
        wave: m.wave,
        planned_start_at: times::timestamp_from_unix_ms(m.planned_start_unix_ms),
        planned_end_at: times::timestamp_from_unix_ms(m.planned_end_unix_ms),
        status: match m.status {
            jobs::MoveStatus::Queued => pb::MoveStatus::Queued,
            jobs::MoveStatus::InFlight => pb::MoveStatus::InFlight,
            jobs::MoveStatus::Done => pb::MoveStatus::Done,
            jobs::MoveStatus::Failed => pb::MoveStatus::Failed,
            jobs::MoveStatus::Dropped => pb::MoveStatus::Dropped,
            jobs::MoveStatus::Skipped => pb::MoveStatus::Skipped,
        } as i32,
        started_at: times::timestamp_from_unix_ms(m.started_unix_ms),
        ended_at: times::timestamp_from_unix_ms(m.ended_unix_ms),
        reason: m.reason.clone(),
    }
}

pub fn job_to_pb(j: &JobRecord) -> pb::JobInfo {
    pb::JobInfo {
        id: j.id,
        kind: match j.kind {
            jobs::JobKind::Drain => pb::JobKind::Drain,
            jobs::JobKind::Failback => pb::JobKind::Failback,
            jobs::JobKind::Balance => pb::JobKind::Balance,
        } as i32,
        node_id: j.node,
        status: match j.status {
            jobs::JobStatus::Running => pb::JobStatus::Running,
            jobs::JobStatus::Done => pb::JobStatus::Done,
            jobs::JobStatus::Aborted => pb::JobStatus::Aborted,
            jobs::JobStatus::Failed => pb::JobStatus::Failed,
        } as i32,
        reason: j.reason.clone(),
        moves: j.moves.iter().map(move_to_pb).collect(),
        planned_finish_at: times::timestamp_from_unix_ms(j.planned_finish_unix_ms),
        created_at: times::timestamp_from_unix_ms(j.created_unix_ms),
        updated_at: times::timestamp_from_unix_ms(j.updated_unix_ms),
        finished_at: times::timestamp_from_unix_ms(j.finished_unix_ms),
        failed_back: j.failed_back,
    }
}

fn unknown_job(id: u64) -> Status {
    Status::not_found(format!(
        "unknown job id {id}; `clusterctl drain list` shows the jobs the cluster keeps"
    ))
}

/// The balancing mode of an API value (`None` for unspecified; unknown: refused).
pub fn mode_from_pb(v: i32) -> Result<Option<scheduler::BalanceMode>, Status> {
    match pb::BalanceMode::try_from(v) {
        Ok(pb::BalanceMode::Unspecified) => Ok(None),
        Ok(pb::BalanceMode::None) => Ok(Some(scheduler::BalanceMode::None)),
        Ok(pb::BalanceMode::Even) => Ok(Some(scheduler::BalanceMode::EvenDistribution)),
        Ok(pb::BalanceMode::PowerSaving) => Ok(Some(scheduler::BalanceMode::PowerSaving)),
        Err(_) => Err(Status::invalid_argument(format!(
            "mode {v} is not a balancing mode; use none, even or power_saving"
        ))),
    }
}

pub fn mode_to_pb(m: scheduler::BalanceMode) -> pb::BalanceMode {
    match m {
        scheduler::BalanceMode::None => pb::BalanceMode::None,
        scheduler::BalanceMode::EvenDistribution => pb::BalanceMode::Even,
        scheduler::BalanceMode::PowerSaving => pb::BalanceMode::PowerSaving,
    }
}

/// The aggressiveness of an API value (`None` for unspecified; unknown: refused).
pub fn aggressiveness_from_pb(v: i32) -> Result<Option<scheduler::Aggressiveness>, Status> {
    match pb::Aggressiveness::try_from(v) {
        Ok(pb::Aggressiveness::Unspecified) => Ok(None),
        Ok(pb::Aggressiveness::Low) => Ok(Some(scheduler::Aggressiveness::Low)),
        Ok(pb::Aggressiveness::Medium) => Ok(Some(scheduler::Aggressiveness::Medium)),
        Ok(pb::Aggressiveness::High) => Ok(Some(scheduler::Aggressiveness::High)),
        Err(_) => Err(Status::invalid_argument(format!(
            "aggressiveness {v} is not known; use low, medium or high"
        ))),
    }
}

fn aggressiveness_to_pb(a: scheduler::Aggressiveness) -> pb::Aggressiveness {
    match a {
        scheduler::Aggressiveness::Low => pb::Aggressiveness::Low,
        scheduler::Aggressiveness::Medium => pb::Aggressiveness::Medium,
        scheduler::Aggressiveness::High => pb::Aggressiveness::High,
    }
}

/// The stop code of a balance plan.
fn stop_to_pb(s: &scheduler::BalanceStop) -> pb::BalanceStop {
    match s {
        scheduler::BalanceStop::Disabled => pb::BalanceStop::Disabled,
        scheduler::BalanceStop::Balanced { .. } => pb::BalanceStop::Balanced,
        scheduler::BalanceStop::GainBelowCost { .. } => pb::BalanceStop::GainBelowCost,
        scheduler::BalanceStop::NoAllowedMove { .. } => pb::BalanceStop::NoAllowedMove,
        scheduler::BalanceStop::MoveLimit => pb::BalanceStop::MoveLimit,
        scheduler::BalanceStop::Consolidated => pb::BalanceStop::Consolidated,
    }
}

/// A policy Duration in whole milliseconds (absent: `None`), or a refusal naming `field`.
fn policy_ms(field: &str, d: Option<&times::Duration>) -> Result<Option<u64>, Status> {
    d.map(times::duration_ms)
        .transpose()
        .map_err(|e| Status::invalid_argument(format!("policy.{field} {e}")))
}

fn policy_to_pb(p: &BalancePolicy) -> pb::PolicySpec {
    pb::PolicySpec {
        mode: mode_to_pb(p.mode) as i32,
        aggressiveness: aggressiveness_to_pb(p.aggressiveness) as i32,
        interval: Some(times::duration_from_ms(p.interval_ms)),
        min_dwell: Some(times::duration_from_ms(p.min_dwell_ms)),
        migration_cost_bp_per_s: Some(p.migration_cost_bp_per_s),
    }
}

#[tonic::async_trait]
impl DrainService for JobApi {
    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let req = request.into_inner();
        let node = node_arg(req.node_id)?;
        if !req.dry_run {
            if let Some(mut leader) = self.leader_client().await? {
                let reply = leader.drain_node(req).await?;
                self.await_local(reply.get_ref().job.as_ref()).await;
                return Ok(reply);
            }
        }
        let _guard = self.lock.lock().await;
        let state = self.state();
        let now = now_unix_ms();
        let plan = job_runner::plan_drain(&state, node, now).map_err(status::drain)?;
        let moves = job_runner::moves_of(&plan.waves);
        let mut reply = pb::DrainNodeResponse {
            job: None,
            plan: moves.iter().map(move_to_pb).collect(),
            planned_start_at: times::timestamp_from_unix_ms(now),
            planned_finish_at: times::timestamp_from_unix_ms(plan.finish_ms),
            lower_bound: Some(times::duration_from_ms(plan.lower_bound_ms)),
            incoming_in_flight: plan
                .incoming_in_flight
                .iter()
                .map(|v| v.0.clone())
                .collect(),
        };
        if req.dry_run {
            return Ok(Response::new(reply));
        }
        tracing::info!(node, moves = moves.len(), "starting drain");
        self.commit(JobCommand::StartJob {
            kind: jobs::JobKind::Drain,
            node,
            moves,
            planned_finish_unix_ms: plan.finish_ms,
            at_unix_ms: now_unix_ms(),
        })
        .await?;
        reply.job = self
            .state()
            .jobs
            .latest(jobs::JobKind::Drain, node)
            .map(job_to_pb);
        Ok(Response::new(reply))
    }

    async fn get_drain(
        &self,
        request: Request<pb::GetDrainRequest>,
    ) -> Result<Response<pb::GetDrainResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let node = node_arg(request.into_inner().node_id)?;
        let state = self.state();
        if !state.nodes.contains_key(&node) {
            return Err(status::job(&JobError::UnknownNode(node)));
        }
        let job = state
            .jobs
            .latest(jobs::JobKind::Drain, node)
            .ok_or_else(|| Status::not_found(format!("node {node} has never been drained")))?;
        Ok(Response::new(pb::GetDrainResponse {
            job: Some(job_to_pb(job)),
        }))
    }

    async fn abort_drain(
        &self,
        request: Request<pb::AbortDrainRequest>,
    ) -> Result<Response<pb::AbortDrainResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            let reply = leader.abort_drain(request.into_inner()).await?;
            self.await_local(reply.get_ref().job.as_ref()).await;
            return Ok(reply);
        }
        let node = node_arg(request.into_inner().node_id)?;
        let _guard = self.lock.lock().await;
        let state = self.state();
        if !state.nodes.contains_key(&node) {
            return Err(status::job(&JobError::UnknownNode(node)));
        }
        let job = state
            .jobs
            .running(jobs::JobKind::Drain, node)
            .ok_or_else(|| {
                Status::failed_precondition(format!("node {node} has no running drain to abort"))
            })?
            .id;
        self.commit(JobCommand::FinishJob {
            job,
            status: jobs::JobStatus::Aborted,
            reason: "aborted by the operator".into(),
            at_unix_ms: now_unix_ms(),
        })
        .await?;
        Ok(Response::new(pb::AbortDrainResponse {
            job: self.state().jobs.jobs.get(&job).map(job_to_pb),
        }))
    }

    async fn resume_node(
        &self,
        request: Request<pb::ResumeNodeRequest>,
    ) -> Result<Response<pb::ResumeNodeResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            let reply = leader.resume_node(request.into_inner()).await?;
            self.await_local(reply.get_ref().job.as_ref()).await;
            return Ok(reply);
        }
        let req = request.into_inner();
        let node = node_arg(req.node_id)?;
        let _guard = self.lock.lock().await;
        let state = self.state();
        jobs::check_resume(&state, node).map_err(|e| status::job(&e))?;
        let now = now_unix_ms();
        let (failback, finish, note) = if req.failback {
            let vms = job_runner::failback_vms(&state, node);
            let plan = job_runner::plan_failback(&state, node, &vms, now).map_err(status::drain)?;
            let moves = job_runner::moves_of(&plan.waves);
            let left: Vec<String> = plan
                .unmovable
                .iter()
                .map(|u| {
                    let why: Vec<String> = u.reasons.iter().map(ToString::to_string).collect();
                    format!("VM {} stays: {}", u.vm.0, why.join("; "))
                })
                .collect();
            let note = if left.is_empty() {
                format!("{} VMs move back", moves.len())
            } else {
                format!("{} VMs move back; {}", moves.len(), left.join(". "))
            };
            (Some(moves), plan.finish_ms, note)
        } else {
            (None, now, String::new())
        };
        tracing::info!(node, failback = req.failback, "resuming node");
        self.commit(JobCommand::ResumeNode {
            node,
            failback: failback.clone(),
            planned_finish_unix_ms: finish,
            at_unix_ms: now_unix_ms(),
        })
        .await?;
        let job = failback.filter(|m| !m.is_empty()).and_then(|_| {
            self.state()
                .jobs
                .latest(jobs::JobKind::Failback, node)
                .map(job_to_pb)
        });
        Ok(Response::new(pb::ResumeNodeResponse {
            job,
            message: format!(
                "node {node} resumed{}",
                if note.is_empty() {
                    String::new()
                } else {
                    format!("; {note}")
                }
            ),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let state = self.state();
        let r = request.get_ref();
        let (jobs, next_page_token) = crate::api::paging::page(
            state.jobs.jobs.values().map(job_to_pb).collect(),
            |j: &pb::JobInfo| j.id,
            r.page_size,
            &r.page_token,
        )?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let id = request.into_inner().id;
        let job = self.state().jobs.jobs.get(&id).map(job_to_pb);
        match job {
            Some(job) => Ok(Response::new(pb::GetJobResponse { job: Some(job) })),
            None => Err(unknown_job(id)),
        }
    }

    type WatchJobStream = JobStream;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let id = request.into_inner().id;
        if !self.state().jobs.jobs.contains_key(&id) {
            return Err(unknown_job(id));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        let agent = self.agent.clone();
        let mut applied = crate::api::read::AppliedWatch::new(&agent);
        tokio::spawn(async move {
            let mut sent: Option<pb::JobInfo> = None;
            loop {
                let job = agent.read_sm(|d| d.state.jobs.jobs.get(&id).map(job_to_pb));
                let Some(job) = job else {
                    let _ = tx
                        .send(Err(Status::not_found(format!("job {id} left the history"))))
                        .await;
                    return;
                };
                let running = job.status() == pb::JobStatus::Running;
                if sent.as_ref() != Some(&job) {
                    sent = Some(job.clone());
                    let update = pb::WatchJobResponse { job: Some(job) };
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                }
                if !running {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = applied.changed() => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.set_policy(request.into_inner()).await;
        }
        let req = request.into_inner().policy.ok_or_else(|| {
            Status::invalid_argument("SetPolicy needs a policy (at least its mode)")
        })?;
        let mode = mode_from_pb(req.mode)?.ok_or_else(|| {
            Status::invalid_argument("policy.mode is unspecified: give none, even or power_saving")
        })?;
        let aggressiveness = aggressiveness_from_pb(req.aggressiveness)?.unwrap_or_default();
        let interval = policy_ms("interval", req.interval.as_ref())?;
        let min_dwell = policy_ms("min_dwell", req.min_dwell.as_ref())?;
        let _guard = self.lock.lock().await;
        let state = self.state();
        let interval_ms = match interval {
            None | Some(0) => state.jobs.policy.interval_ms,
            Some(ms) => ms,
        };
        let cmd = JobCommand::SetPolicy {
            policy: BalancePolicy {
                mode,
                aggressiveness,
                interval_ms,
                min_dwell_ms: min_dwell.unwrap_or(state.jobs.policy.min_dwell_ms),
                migration_cost_bp_per_s: req
                    .migration_cost_bp_per_s
                    .unwrap_or(state.jobs.policy.migration_cost_bp_per_s),
            },
            at_unix_ms: now_unix_ms(),
        };
        jobs::check(&state, &cmd).map_err(|e| status::job(&e))?;
        self.commit(cmd).await?;
        Ok(Response::new(pb::SetPolicyResponse {
            policy: Some(policy_to_pb(&self.state().jobs.policy)),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy_to_pb(&self.state().jobs.policy)),
        }))
    }

    async fn plan_balance(
        &self,
        request: Request<pb::PlanBalanceRequest>,
    ) -> Result<Response<pb::PlanBalanceResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let req = request.into_inner();
        let mut state = self.state();
        if let Some(mode) = mode_from_pb(req.mode)? {
            state.jobs.policy.mode = mode;
        }
        if let Some(a) = aggressiveness_from_pb(req.aggressiveness)? {
            state.jobs.policy.aggressiveness = a;
        }
        let plan = job_runner::plan_balance(&state, &self.agent.demand(), now_unix_ms())
            .map_err(status::drain)?;
        Ok(Response::new(pb::PlanBalanceResponse {
            mode: mode_to_pb(plan.mode) as i32,
            moves: job_runner::moves_of(&plan.waves)
                .iter()
                .map(move_to_pb)
                .collect(),
            spread_before_bp: plan.spread_before_bp,
            spread_after_bp: plan.spread_after_bp,
            max_util_before_bp: plan.max_util_before_bp,
            max_util_after_bp: plan.max_util_after_bp,
            empty_nodes_may_power_off: plan.empty_nodes_may_power_off.iter().map(|n| n.0).collect(),
            steps: plan
                .steps
                .iter()
                .map(|s| pb::BalanceStep {
                    vm: s.vm.0.clone(),
                    from_node: s.from.0,
                    to_node: s.to.0,
                    from_load_before_bp: s.from_load_bp.0,
                    from_load_after_bp: s.from_load_bp.1,
                    to_load_before_bp: s.to_load_bp.0,
                    to_load_after_bp: s.to_load_bp.1,
                    gain_bp: s.gain_bp,
                    cost_bp: s.cost_bp,
                })
                .collect(),
            stopped: plan.stopped.to_string(),
            stop_code: stop_to_pb(&plan.stopped) as i32,
        }))
    }
}
