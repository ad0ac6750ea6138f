//! Server side of the shared-volume API (`cluster.volumes.v1.VolumeService`): disk
//! images on the shared volumes, the replicated lock table, and hot-plug of VM disks.
//!
//! Disk images are created by the agent asked (every agent sees the same shared volumes;
//! csv-volume's `create_new` makes concurrent creates of one name safe). Reads answer from
//! the local replica. Hot-plug is checked against the local replica and committed through
//! Raft (`Command::VmDisk`), where the apply checks again.

use std::sync::Arc;

use cluster_proto::volumes as pb;
use cluster_proto::volumes::volume_service_server::VolumeService;
use csv_volume::{DiskLock, DiskName, LockMode, VolumeError, VolumeRegistry};
use tonic::{Request, Response, Status};

use crate::api::status;
use crate::node::{now_unix_ms, Agent, ForwardReply, ForwardRequest};
use crate::state::vm_disks::{self, VmDiskCommand};
use crate::state::{ClusterState, Command};
use crate::vmhost::{DiskSpec, VmHost};

/// How long a hot-plug reply waits for this replica to apply the committed change.
pub const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Largest disk `CreateDisk` accepts, in MiB (csv-volume's own limit is 64 TiB).
pub const DISK_SIZE_MAX_MIB: u64 = 64 * 1024 * 1024;

pub struct VolumeApi {
    pub agent: Arc<Agent>,
    pub host: Arc<VmHost>,
}

fn parse_disk(field: &str, name: &str) -> Result<DiskName, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field} is empty: give a disk name like vol/dir/disk.img"
        )));
    }
    DiskName::parse(name).map_err(|e| {
        Status::invalid_argument(format!("{field} {name:?}: {}", crate::error_chain(&e)))
    })
}

/// A lock as the API shows it.
pub fn lock_to_pb(disk: &DiskName, l: &DiskLock) -> pb::DiskLock {
    pb::DiskLock {
        disk: disk.to_string(),
        mode: match l.mode {
            LockMode::Exclusive => pb::LockMode::Exclusive,
            LockMode::Shared => pb::LockMode::Shared,
        } as i32,
        holders: l.holders.iter().copied().collect(),
        token: l.token.0,
        term: l.term,
        handoff_to: l.handoff.map_or(0, |h| h.to),
        handoff_token: l.handoff.map_or(0, |h| h.token.0),
    }
}

/// The checks `vm create` makes for the disks of a new VM `vm`: each disk exists on a
/// shared volume this agent sees, and no other VM writes it (or reads it, when `vm`
/// would write it).
pub fn check_vm_disks(
    state: &ClusterState,
    registry: &VolumeRegistry,
    vm: &str,
    disks: &[DiskSpec],
) -> Result<(), Status> {
    for (i, d) in disks.iter().enumerate() {
        registry.disk_path(&d.name).map_err(|e| {
            let hint = match e {
                VolumeError::DiskNotFound { .. } => {
                    "; create it with `clusterctl disk create NAME --size-mib N`"
                }
                _ => "",
            };
            Status::invalid_argument(format!("spec.disks[{i}]: {}{hint}", crate::error_chain(&e)))
        })?;
        let users = vm_disks::conflicting_users(state, vm, d);
        if !users.is_empty() {
            return Err(Status::failed_precondition(format!(
                "spec.disks[{i}]: disk {} is used by VM(s) {users:?}; a disk written by one VM cannot be given to another",
                d.name
            )));
        }
    }
    Ok(())
}

impl VolumeApi {
    fn state(&self) -> ClusterState {
        self.agent.read_sm(|d| d.state.clone())
    }

    /// Commits a disk change and answers with the VM's name and its disks as this replica
    /// sees them once it applied the change.
    async fn change(&self, cmd: VmDiskCommand) -> Result<(String, Vec<String>), Status> {
        vm_disks::check(&self.state(), &cmd).map_err(|e| status::vm_disk(&e))?;
        let vm = match &cmd {
            VmDiskCommand::Attach { vm, .. } | VmDiskCommand::Detach { vm, .. } => vm.clone(),
        };
        tracing::info!(command = %cmd, "vm disk change");
        let reply = self
            .agent
            .write(ForwardRequest::Command(Command::VmDisk(cmd)))
            .await
            .map_err(status::write)?;
        // Answer from this replica once it has applied the change (the leader may be
        // another agent).
        if let ForwardReply::Command { log_index, .. } = reply {
            let start = std::time::Instant::now();
            while self
                .agent
                .read_sm(|d| d.last_applied.map_or(0, |l| l.index))
                < log_index
                && start.elapsed() < APPLY_WAIT
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        let disks = self.agent.read_sm(|d| {
            crate::state::vms::find(&d.state, &vm)
                .map(|r| r.spec.disks.iter().map(|d| d.name.to_string()).collect())
                .unwrap_or_default()
        });
        Ok((vm, disks))
    }
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create_disk(
        &self,
        request: Request<pb::CreateDiskRequest>,
    ) -> Result<Response<pb::CreateDiskResponse>, Status> {
        let req = request.into_inner();
        let name = parse_disk("name", &req.name)?;
        if req.size_mib == 0 || req.size_mib > DISK_SIZE_MAX_MIB {
            return Err(Status::invalid_argument(format!(
                "size_mib {} is out of range: give 1 to {DISK_SIZE_MAX_MIB}",
                req.size_mib
            )));
        }
        let host = self.host.clone();
        let info = tokio::task::spawn_blocking(move || {
            host.registry().create_disk(&name, req.size_mib << 20)
        })
        .await
        .map_err(|e| Status::internal(format!("create task failed: {e}")))?
        .map_err(status::volume)?;
        tracing::info!(disk = %info.name, size_bytes = info.size_bytes, "disk created");
        Ok(Response::new(pb::CreateDiskResponse {
            disk: Some(pb::DiskInfo {
                name: info.name.to_string(),
                size_bytes: info.size_bytes,
                allocated_bytes: info.allocated_bytes,
                lock: None,
                used_by: Vec::new(),
            }),
        }))
    }

    async fn list_disks(
        &self,
        request: Request<pb::ListDisksRequest>,
    ) -> Result<Response<pb::ListDisksResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let state = self.state();
        let host = self.host.clone();
        let locks = state.locks.clone();
        let disks = tokio::task::spawn_blocking(move || host.registry().list(&locks))
            .await
            .map_err(|e| Status::internal(format!("list task failed: {e}")))?
            .map_err(status::volume)?;
        let quick_prefix = format!("{}/", crate::vmhost::quick_migration::QUICK_DIR);
        let disks = disks
            .into_iter()
            // Quick-migration images in flight are files of the volume, not disks.
            .filter(|d| !d.name.relative_path().starts_with(&quick_prefix))
            .map(|d| pb::DiskInfo {
                name: d.name.to_string(),
                size_bytes: d.size_bytes,
                allocated_bytes: d.allocated_bytes,
                lock: d.lock.as_ref().map(|l| lock_to_pb(&d.name, l)),
                used_by: crate::state::disk_locks::disk_users(&state, &d.name, "")
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            })
            .collect();
        let r = request.get_ref();
        let (disks, next_page_token) = crate::api::paging::page(
            disks,
            |d: &pb::DiskInfo| d.name.clone(),
            r.page_size,
            &r.page_token,
        )?;
        Ok(Response::new(pb::ListDisksResponse {
            volumes: self
                .host
                .registry()
                .volumes()
                .map(|v| v.name().to_owned())
                .collect(),
            disks,
            next_page_token,
        }))
    }

    async fn list_locks(
        &self,
        request: Request<pb::ListLocksRequest>,
    ) -> Result<Response<pb::ListLocksResponse>, Status> {
        crate::api::read::consistent(&self.agent, &request).await?;
        let locks = self.agent.read_sm(|d| {
            d.state
                .locks
                .iter()
                .map(|(disk, l)| lock_to_pb(disk, l))
                .collect()
        });
        let r = request.get_ref();
        let (locks, next_page_token) = crate::api::paging::page(
            locks,
            |l: &pb::DiskLock| l.disk.clone(),
            r.page_size,
            &r.page_token,
        )?;
        Ok(Response::new(pb::ListLocksResponse {
            locks,
            next_page_token,
        }))
    }

    async fn attach_disk(
        &self,
        request: Request<pb::AttachDiskRequest>,
    ) -> Result<Response<pb::AttachDiskResponse>, Status> {
        let req = request.into_inner();
        if req.vm.is_empty() {
            return Err(Status::invalid_argument("vm is empty: give the VM's name"));
        }
        let disk = DiskSpec {
            name: parse_disk("disk", &req.disk)?,
            read_only: req.read_only,
        };
        self.host.registry().disk_path(&disk.name).map_err(|e| {
            let msg = crate::error_chain(&e);
            match e {
                VolumeError::DiskNotFound { .. } => Status::not_found(format!(
                    "{msg}; create it with `clusterctl disk create NAME --size-mib N`"
                )),
                _ => Status::invalid_argument(msg),
            }
        })?;
        let (vm, disks) = self
            .change(VmDiskCommand::Attach {
                vm: req.vm,
                disk,
                at_unix_ms: now_unix_ms(),
            })
            .await?;
        Ok(Response::new(pb::AttachDiskResponse { vm, disks }))
    }

    async fn detach_disk(
        &self,
        request: Request<pb::DetachDiskRequest>,
    ) -> Result<Response<pb::DetachDiskResponse>, Status> {
        let req = request.into_inner();
        if req.vm.is_empty() {
            return Err(Status::invalid_argument("vm is empty: give the VM's name"));
        }
        let disk = parse_disk("disk", &req.disk)?;
        let (vm, disks) = self
            .change(VmDiskCommand::Detach {
                vm: req.vm,
                disk,
                at_unix_ms: now_unix_ms(),
            })
            .await?;
        Ok(Response::new(pb::DetachDiskResponse { vm, disks }))
    }
}
