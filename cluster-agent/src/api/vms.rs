//! Server side of the VM lifecycle API (`cluster.vms.v1.VmService`).
//!
//! Writes are decided on the Raft leader: an agent that does not lead forwards the call to
//! the leader's management address, so placement (the scheduler) always runs against the
//! leader's state, serialised by one lock, and the reply reflects the committed record.
//! Reads answer from the local replica. The console is streamed by the VM's owner; other
//! agents proxy the stream from the owner's management address.

use std::pin::Pin;
use std::sync::Arc;

use cluster_proto::times;
use cluster_proto::vms as pb;
use cluster_proto::vms::vm_service_client::VmServiceClient;
use cluster_proto::vms::vm_service_server::VmService;
use futures::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::api::convert::vms as vm_convert;
use crate::api::forward;
use crate::api::status;
use crate::control::placement::{self, PlacementError};
use crate::node::{now_unix_ms, Agent, ForwardRequest};
use crate::state::vms::{self, DesiredState, VmCommand, VmStateError};
use crate::state::{ClusterState, Command};
use crate::vmhost::VmHost;

/// Lines buffered between the VM console and a gRPC console stream.
pub const CONSOLE_STREAM_BUFFER_LINES: usize = 256;
/// Console streams (`StreamConsole`, any kind) one VM may have open on one node at once.
pub const CONSOLE_STREAMS_PER_VM_MAX: usize = 8;
/// How often a console thread with nothing to send looks whether its client is gone.
const CONSOLE_IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The open console streams of this node, by VM name.
#[derive(Default)]
pub struct ConsoleSlots(std::sync::Mutex<std::collections::HashMap<String, usize>>);

/// One open console stream: its slot is given back when the stream is dropped (the
/// client went away, or the stream ended).
pub struct ConsoleSlot {
    slots: Arc<ConsoleSlots>,
    vm: String,
}

impl ConsoleSlots {
    /// A slot for a new console stream of `vm`, or `ResourceExhausted` naming the cap.
    pub fn take(self: &Arc<Self>, vm: &str, node: u64) -> Result<ConsoleSlot, Status> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(vm.to_owned()).or_insert(0);
        if *n >= CONSOLE_STREAMS_PER_VM_MAX {
            return Err(Status::resource_exhausted(format!(
                "VM {vm:?} has {n} console streams open on node {node}, the most allowed \
                 (CONSOLE_STREAMS_PER_VM_MAX = {CONSOLE_STREAMS_PER_VM_MAX}); close one first"
            )));
        }
        *n += 1;
        Ok(ConsoleSlot {
            slots: self.clone(),
            vm: vm.to_owned(),
        })
    }
}

impl Drop for ConsoleSlot {
    fn drop(&mut self) {
        let mut m = self.slots.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.vm) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.vm);
            }
        }
    }
}

/// A console stream holding its slot.
struct Slotted {
    inner: ConsoleStream,
    _slot: ConsoleSlot,
}

impl Stream for Slotted {
    type Item = Result<pb::StreamConsoleResponse, Status>;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

pub struct VmApi {
    pub agent: Arc<Agent>,
    pub host: Arc<VmHost>,
    consoles: Arc<ConsoleSlots>,
}

impl VmApi {
    pub fn new(agent: Arc<Agent>, host: Arc<VmHost>) -> Self {
        VmApi {
            agent,
            host,
            consoles: Arc::default(),
        }
    }

    fn state(&self) -> ClusterState {
        self.agent.read_sm(|d| d.state.clone())
    }

    /// A client of the leader when another agent leads; `None` when this agent leads.
    async fn leader_client(&self) -> Result<Option<VmServiceClient<Channel>>, Status> {
        match forward::leader_addr(&self.agent)? {
            Some(addr) => connect(&self.agent, &addr).await.map(Some),
            None => Ok(None),
        }
    }

    async fn commit(&self, cmd: VmCommand) -> Result<(), Status> {
        self.agent
            .write(ForwardRequest::Command(Command::Vm(cmd)))
            .await
            .map(|_| ())
            .map_err(status::write)
    }

    /// Commit a NIC change (checked here first, again at apply) and answer with the VM as
    /// this replica sees it once it applied the change.
    async fn change_nic(
        &self,
        cmd: crate::state::vm_nics::VmNicCommand,
    ) -> Result<Option<pb::VmInfo>, Status> {
        use crate::state::vm_nics::{self, VmNicCommand};
        vm_nics::check(&self.state(), &cmd).map_err(|e| status::vm_nic(&e))?;
        let vm = match &cmd {
            VmNicCommand::Attach { vm, .. } | VmNicCommand::Detach { vm, .. } => vm.clone(),
        };
        tracing::info!(command = %cmd, "vm nic change");
        let reply = self
            .agent
            .write(ForwardRequest::Command(Command::VmNic(cmd)))
            .await
            .map_err(status::write)?;
        if let crate::node::ForwardReply::Command { log_index, .. } = reply {
            let start = std::time::Instant::now();
            while self
                .agent
                .read_sm(|d| d.last_applied.map_or(0, |l| l.index))
                < log_index
                && start.elapsed() < crate::api::migrations::APPLY_WAIT
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        self.vm_info(&vm)
    }

    /// The VM as this replica sees it, with its measured demand.
    fn vm_info(&self, name: &str) -> Result<Option<pb::VmInfo>, Status> {
        let state = self.state();
        let rec = vms::find(&state, name)
            .ok_or_else(|| Status::not_found(format!("no VM named {name:?}")))?;
        Ok(Some(pb::VmInfo {
            demand: crate::api::convert::demand::vm_demand_to_pb(
                &self.agent.demand(),
                rec.owner,
                &rec.spec.name,
            ),
            ..vm_convert::record_to_pb(&state, rec)
        }))
    }
}

/// How long a local console stream waits for a journal line before it looks whether its
/// client is still there.
const JOURNAL_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl VmApi {
    /// This node's console journal of `name` (see `StreamConsoleRequest.local_only`): every line
    /// stamped, one per chunk; with `follow`, new lines as they come, until the client goes.
    fn local_console(&self, name: String, follow: bool) -> Result<ConsoleStream, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(CONSOLE_STREAM_BUFFER_LINES);
        let host = self.host.clone();
        let me = self.agent.node_id();
        std::thread::Builder::new()
            .name(format!("journal-out-{name}"))
            .spawn(move || {
                let mut from = 0;
                loop {
                    let wait = if follow {
                        JOURNAL_WAIT
                    } else {
                        std::time::Duration::ZERO
                    };
                    let lines = host.journal().read(&name, from, wait);
                    if lines.is_empty() && (!follow || tx.is_closed()) {
                        return;
                    }
                    for l in lines {
                        from = l.index + 1;
                        let chunk = pb::StreamConsoleResponse {
                            text: format!("{}\n", l.text),
                            node_id: me,
                            received_at: times::timestamp_from_unix_us(l.at_unix_us),
                        };
                        if tx.blocking_send(Ok(chunk)).is_err() {
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Status::internal(format!("cannot start the console thread: {e}")))?;
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// An optional request Duration in whole milliseconds (absent: `None`, the default), or
/// a refusal naming `field`.
fn request_ms(field: &str, d: Option<&times::Duration>) -> Result<Option<u64>, Status> {
    d.map(times::duration_ms)
        .transpose()
        .map_err(|e| Status::invalid_argument(format!("{field} {e}")))
}

impl VmApi {
    /// The console stream `req` asks for: this node's journal, the owner's console
    /// through a proxy, or the console of a VM this node runs.
    async fn open_console(&self, req: pb::StreamConsoleRequest) -> Result<ConsoleStream, Status> {
        if req.local_only {
            return self.local_console(req.name, req.follow);
        }
        let state = self.state();
        let rec = vms::find(&state, &req.name)
            .ok_or_else(|| status::vm_state(VmStateError::UnknownVm(req.name.clone())))?;
        let me = self.agent.node_id();
        let owner = rec.owner.ok_or_else(|| {
            Status::failed_precondition(format!("VM {:?} has never been started", req.name))
        })?;
        if owner != me {
            let addr = state
                .nodes
                .get(&owner)
                .map(|n| n.registration.mgmt_addr.clone())
                .ok_or_else(|| {
                    Status::unavailable(format!("owner node {owner} is not registered"))
                })?;
            let mut client = connect(&self.agent, &addr).await?;
            let name = req.name.clone();
            let upstream = client.stream_console(req).await?.into_inner();
            return Ok(proxy_while_owner(self.agent.clone(), name, owner, upstream));
        }
        let console = self.host.console(&req.name).map_err(|e| {
            Status::failed_precondition(format!(
                "VM {:?} is not running on its owner node {me}: {}",
                req.name,
                crate::error_chain(&e)
            ))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(CONSOLE_STREAM_BUFFER_LINES);
        let first = pb::StreamConsoleResponse {
            text: console.recent,
            node_id: me,
            received_at: None,
        };
        let follow = req.follow;
        let lines = console.lines;
        std::thread::Builder::new()
            .name(format!("console-{}", req.name))
            .spawn(move || {
                if tx.blocking_send(Ok(first)).is_err() || !follow {
                    return;
                }
                // Ends when the VM leaves this host (sender dropped) or the client goes
                // (looked at once a second when the console is quiet).
                loop {
                    let line = match lines.recv_timeout(CONSOLE_IDLE_CHECK) {
                        Ok(line) => line,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !tx.is_closed() => {
                            continue
                        }
                        Err(_) => return,
                    };
                    let chunk = pb::StreamConsoleResponse {
                        text: format!("{line}\n"),
                        node_id: me,
                        received_at: None,
                    };
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Status::internal(format!("cannot start the console thread: {e}")))?;
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

async fn connect(agent: &Agent, addr: &str) -> Result<VmServiceClient<Channel>, Status> {
    Ok(VmServiceClient::new(
        forward::channel(agent, addr, "agent").await?,
    ))
}

fn name_of(name: &str) -> Result<&str, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(
            "name is empty: give the VM's name",
        ));
    }
    Ok(name)
}

type ConsoleStream = Pin<Box<dyn Stream<Item = Result<pb::StreamConsoleResponse, Status>> + Send>>;

/// How often a proxied console stream checks that its upstream still owns the VM.
pub const CONSOLE_OWNER_CHECK: std::time::Duration = std::time::Duration::from_millis(200);

/// Relay `upstream` (the console of `vm` on node `owner`) while this replica still names
/// `owner` as the VM's owner. When the VM moves (failover, migration) the stream ends, so
/// a following client reopens it at the new owner — instead of waiting on an owner that
/// may be cut off and silent (the channel's HTTP/2 keepalive ends a dead upstream too).
fn proxy_while_owner(
    agent: Arc<Agent>,
    vm: String,
    owner: u64,
    mut upstream: tonic::Streaming<pb::StreamConsoleResponse>,
) -> ConsoleStream {
    let (tx, rx) = tokio::sync::mpsc::channel(CONSOLE_STREAM_BUFFER_LINES);
    tokio::spawn(async move {
        let mut check = tokio::time::interval(CONSOLE_OWNER_CHECK);
        loop {
            tokio::select! {
                msg = upstream.message() => {
                    let item = match msg {
                        Ok(Some(chunk)) => Ok(chunk),
                        Ok(None) => return,
                        Err(s) => Err(s),
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        return;
                    }
                }
                _ = check.tick() => {
                    let still = agent.read_sm(|d| {
                        vms::find(&d.state, &vm).and_then(|r| r.owner) == Some(owner)
                    });
                    if !still {
                        tracing::info!(vm = %vm, old_owner = owner, "console proxy ends: the vm moved");
                        return;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl VmService for VmApi {
    async fn create_vm(
        &self,
        request: Request<pb::CreateVmRequest>,
    ) -> Result<Response<pb::CreateVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.create_vm(request.into_inner()).await;
        }
        let req = request.into_inner();
        let spec = vm_convert::spec_from_pb(req.spec).map_err(status::convert)?;
        let name = spec.name.clone();
        let _placing = self.agent.placement_lock().await;
        let state = self.state();
        crate::api::volumes::check_vm_disks(&state, self.host.registry(), &name, &spec.disks)?;
        let unplaced = VmCommand::CreateVm {
            spec: spec.clone(),
            owner: None,
            at_unix_ms: now_unix_ms(),
        };
        vms::check(&state, &unplaced).map_err(status::vm_state)?;
        let owner = if req.start {
            Some(
                placement::place(&state, &self.agent.demand(), &spec)
                    .map_err(|e| no_room(&self.agent, &state, e))?,
            )
        } else {
            None
        };
        tracing::info!(vm = %name, ?owner, "creating vm");
        self.commit(VmCommand::CreateVm {
            spec,
            owner,
            at_unix_ms: now_unix_ms(),
        })
        .await?;
        Ok(Response::new(pb::CreateVmResponse {
            vm: self.vm_info(&name)?,
        }))
    }

    async fn start_vm(
        &self,
        request: Request<pb::StartVmRequest>,
    ) -> Result<Response<pb::StartVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.start_vm(request.into_inner()).await;
        }
        let name = request.into_inner().name;
        name_of(&name)?;
        let _placing = self.agent.placement_lock().await;
        let state = self.state();
        let rec = vms::find(&state, &name)
            .ok_or_else(|| status::vm_state(VmStateError::UnknownVm(name.clone())))?;
        if rec.desired == DesiredState::Running && rec.runtime != vms::RuntimeState::Failed {
            return Err(status::vm_state(VmStateError::AlreadyStarted {
                name: name.clone(),
                owner: rec.owner.unwrap_or(0),
            }));
        }
        let owner = placement::place(&state, &self.agent.demand(), &rec.spec)
            .map_err(|e| no_room(&self.agent, &state, e))?;
        tracing::info!(vm = %name, owner, "starting vm");
        self.commit(VmCommand::StartVm {
            name: name.clone(),
            owner,
            at_unix_ms: now_unix_ms(),
        })
        .await?;
        Ok(Response::new(pb::StartVmResponse {
            vm: self.vm_info(&name)?,
        }))
    }

    async fn stop_vm(
        &self,
        request: Request<pb::StopVmRequest>,
    ) -> Result<Response<pb::StopVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.stop_vm(request.into_inner()).await;
        }
        let name = request.into_inner().name;
        name_of(&name)?;
        let cmd = VmCommand::StopVm {
            name: name.clone(),
            at_unix_ms: now_unix_ms(),
        };
        vms::check(&self.state(), &cmd).map_err(status::vm_state)?;
        self.commit(cmd).await?;
        Ok(Response::new(pb::StopVmResponse {
            vm: self.vm_info(&name)?,
        }))
    }

    async fn delete_vm(
        &self,
        request: Request<pb::DeleteVmRequest>,
    ) -> Result<Response<pb::DeleteVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.delete_vm(request.into_inner()).await;
        }
        let name = request.into_inner().name;
        name_of(&name)?;
        let cmd = VmCommand::DeleteVm {
            name,
            at_unix_ms: now_unix_ms(),
        };
        vms::check(&self.state(), &cmd).map_err(status::vm_state)?;
        self.commit(cmd).await?;
        Ok(Response::new(pb::DeleteVmResponse {}))
    }

    async fn list_vms(
        &self,
        request: Request<pb::ListVmsRequest>,
    ) -> Result<Response<pb::ListVmsResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let state = self.state();
        let demand = self.agent.demand();
        let vms: Vec<pb::VmInfo> = state
            .vms
            .values()
            .map(|r| pb::VmInfo {
                demand: crate::api::convert::demand::vm_demand_to_pb(
                    &demand,
                    r.owner,
                    &r.spec.name,
                ),
                ..vm_convert::record_to_pb(&state, r)
            })
            .collect();
        let r = request.get_ref();
        let (vms, next_page_token) = crate::api::paging::page(
            vms,
            |v: &pb::VmInfo| v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
            r.page_size,
            &r.page_token,
        )?;
        Ok(Response::new(pb::ListVmsResponse {
            vms,
            next_page_token,
        }))
    }

    async fn attach_nic(
        &self,
        request: Request<pb::AttachNicRequest>,
    ) -> Result<Response<pb::AttachNicResponse>, Status> {
        let req = request.into_inner();
        name_of(&req.vm)?;
        let Some(nic) = req.nic else {
            return Err(Status::invalid_argument(
                "nic is missing: give the network (and optionally the MAC)",
            ));
        };
        let nic = crate::state::vm_spec::NicSpec {
            network: nic.network,
            mac: nic.mac,
            slot: None,
            mtu: nic.mtu,
        };
        let vm = self
            .change_nic(crate::state::vm_nics::VmNicCommand::Attach {
                vm: req.vm,
                nic,
                at_unix_ms: now_unix_ms(),
            })
            .await?;
        Ok(Response::new(pb::AttachNicResponse { vm }))
    }

    async fn detach_nic(
        &self,
        request: Request<pb::DetachNicRequest>,
    ) -> Result<Response<pb::DetachNicResponse>, Status> {
        let req = request.into_inner();
        name_of(&req.vm)?;
        if req.mac.is_empty() {
            return Err(Status::invalid_argument(
                "mac is empty: give the MAC of the NIC to remove (`clusterctl vm show` lists them)",
            ));
        }
        let vm = self
            .change_nic(crate::state::vm_nics::VmNicCommand::Detach {
                vm: req.vm,
                mac: req.mac,
                at_unix_ms: now_unix_ms(),
            })
            .await?;
        Ok(Response::new(pb::DetachNicResponse { vm }))
    }

    async fn get_vm(
        &self,
        request: Request<pb::GetVmRequest>,
    ) -> Result<Response<pb::GetVmResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let name = request.into_inner().name;
        Ok(Response::new(pb::GetVmResponse {
            vm: self.vm_info(name_of(&name)?)?,
        }))
    }

    type StreamConsoleStream = ConsoleStream;

    async fn stream_console(
        &self,
        request: Request<pb::StreamConsoleRequest>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        let req = request.into_inner();
        name_of(&req.name)?;
        let slot = self.consoles.take(&req.name, self.agent.node_id())?;
        let stream = self.open_console(req).await?;
        Ok(Response::new(Box::pin(Slotted {
            inner: stream,
            _slot: slot,
        })))
    }

    async fn migrate_vm(
        &self,
        request: Request<pb::MigrateVmRequest>,
    ) -> Result<Response<pb::MigrateVmResponse>, Status> {
        if let Some(mut leader) = self.leader_client().await? {
            return leader.migrate_vm(request.into_inner()).await;
        }
        let req = request.into_inner();
        name_of(&req.name)?;
        let max_downtime_ms = request_ms("max_downtime", req.max_downtime.as_ref())?;
        let deadline_ms = request_ms("deadline", req.deadline.as_ref())?;
        let _placing = self.agent.placement_lock().await;
        let state = self.state();
        let probe = VmCommand::StartMigration {
            name: req.name.clone(),
            to: 0,
            at_unix_ms: now_unix_ms(),
            quick: req.quick,
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max: req.bandwidth_bytes_per_s_max,
            predicted: None,
        };
        // Same checks as the commit, except the target (chosen next).
        vms::check_migration_start(&state, &probe).map_err(status::vm_state)?;
        if let Some(m) = crate::state::migrations::queued_of(&state, &req.name) {
            return Err(Status::failed_precondition(format!(
                "VM {} already has migration {} queued (`clusterctl migration cancel {}` drops it)",
                req.name, m.id, m.id
            )));
        }
        let to = (req.to_node_id != 0).then_some(req.to_node_id);
        if req.quick {
            crate::control::quick_migration::check_volume(&state, &self.host, &req.name)
                .map_err(status::quick_migration)?;
        }
        let target = match placement::migration_target(&state, &req.name, to, req.quick) {
            Ok(t) => t,
            // Only a busy migration slot stands in the way: wait in the queue for it.
            Err(PlacementError::SlotsBusy { refusal, .. }) if !req.no_queue => {
                let cmd = crate::state::migrations::MigrationCommand::QueueMigration {
                    vm: req.name.clone(),
                    to: req.to_node_id,
                    quick: req.quick,
                    max_downtime_ms,
                    deadline_ms,
                    bandwidth_bytes_per_s_max: req.bandwidth_bytes_per_s_max,
                    at_unix_ms: now_unix_ms(),
                };
                self.agent
                    .read_sm(|d| crate::state::migrations::check(&d.state, &cmd))
                    .map_err(|e| status::class(e.class(), crate::error_chain(&e)))?;
                self.agent
                    .write(ForwardRequest::Command(Command::Migration(cmd)))
                    .await
                    .map_err(status::write)?;
                let id = self
                    .agent
                    .read_sm(|d| {
                        crate::state::migrations::queued_of(&d.state, &req.name).map(|m| m.id)
                    })
                    .unwrap_or(0);
                tracing::info!(vm = %req.name, migration = id, %refusal, "migration queued");
                return Ok(Response::new(pb::MigrateVmResponse {
                    vm: self.vm_info(&req.name)?,
                    queued_migration_id: id,
                }));
            }
            Err(e) => return Err(status::placement(e)),
        };
        let predicted = placement::prediction_for(&state, &req.name, target, req.quick);
        tracing::info!(vm = %req.name, to = target, ?predicted, "starting migration");
        self.commit(VmCommand::StartMigration {
            name: req.name.clone(),
            to: target,
            at_unix_ms: now_unix_ms(),
            quick: req.quick,
            max_downtime_ms,
            deadline_ms,
            bandwidth_bytes_per_s_max: req.bandwidth_bytes_per_s_max,
            predicted,
        })
        .await?;
        Ok(Response::new(pb::MigrateVmResponse {
            vm: self.vm_info(&req.name)?,
            queued_migration_id: 0,
        }))
    }

    async fn plan_migration(
        &self,
        request: Request<pb::PlanMigrationRequest>,
    ) -> Result<Response<pb::PlanMigrationResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let req = request.into_inner();
        name_of(&req.name)?;
        let to = (req.to_node_id != 0).then_some(req.to_node_id);
        let p = placement::predict_migration(&self.state(), &req.name, to, req.quick)
            .map_err(status::placement)?;
        let est = p.estimate.unwrap_or(scheduler::estimate::LiveEstimate {
            duration_ms: 0,
            downtime_ms: 0,
            rounds: 0,
        });
        Ok(Response::new(pb::PlanMigrationResponse {
            vm: req.name,
            from_node_id: p.from,
            to_node_id: p.to.unwrap_or(0),
            go: p.reasons.is_empty() && p.to.is_some(),
            reasons: p.reasons,
            predicted_duration: Some(times::duration_from_ms(est.duration_ms)),
            predicted_downtime: Some(times::duration_from_us(
                p.blackout_us
                    .unwrap_or(est.downtime_ms.saturating_mul(1000)),
            )),
            predicted_rounds: est.rounds,
        }))
    }

    async fn why_not(
        &self,
        request: Request<pb::WhyNotRequest>,
    ) -> Result<Response<pb::WhyNotResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let req = request.into_inner();
        name_of(&req.vm)?;
        let reasons =
            placement::why_not(&self.state(), &req.vm, req.node_id).map_err(status::placement)?;
        Ok(Response::new(pb::WhyNotResponse { reasons }))
    }
}

/// A placement refusal as a status; when it found no room and a node is in standby, the
/// power controller is told (it wakes one) and the caller is told to retry.
fn no_room(
    agent: &crate::node::Agent,
    state: &crate::state::ClusterState,
    e: placement::PlacementError,
) -> Status {
    let asleep: Vec<String> = state
        .nodes
        .iter()
        .filter(|(_, r)| r.state.is_asleep())
        .map(|(id, _)| id.to_string())
        .collect();
    if !matches!(e, placement::PlacementError::Refused { .. }) || asleep.is_empty() {
        return status::placement(e);
    }
    let msg = crate::error_chain(&e);
    agent.note_capacity_short(msg.clone());
    Status::failed_precondition(format!(
        "{msg}; node(s) {} are in standby: one is being woken, retry once it is up",
        asleep.join(", ")
    ))
}
