//! Live migration of this host's VMs: [`VmHost::migrate_out`] runs vmm-node's migration
//! engine on a worker thread with this layer's disk handling plugged into its seams, and
//! [`MigrationListener`] accepts incoming VMs on the node's migration address.
//!
//! ```text
//!  source VmHost                         engine                          target listener
//!  migrate_out ─▶ thread: migrate(SourceSide) ── setup (config blob) ──▶ create_paused: reserve name,
//!                  pre-copy rounds ───────────────────────────────────▶   Vm::new_paused + 8 slots
//!                  pause, save_state: VmState + slot states
//!                  detach_disks: slot detach → handoff_release → Handoff cmds
//!                  release: DiskLocks::commit(Handoff) ── StorageReleased ─▶ acquire: DiskLocks::acquire → grants
//!                                                                        restore: VmState, slots (handoff_open)
//!                  ◀──────────────────────────────────────────── Ready   commit → resume
//!  stop + unregister the paused source VM ◀── Running + receipt ──────   register in target VmHost
//! ```
//! Any failure (or a cancel) before commit rolls back on the source: disks reopened with
//! the old grants, or with the grants [`DiskLocks::reclaim`] returns when the handoff
//! was already committed, and the VM resumes.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use csv_volume::{LockCommand, LockGrant, LockMode, NodeId};
use serde::{Deserialize, Serialize};
use vmm_node::migration::convergence::ConvergenceConfig;
use vmm_node::migration::seam::{
    self, NodeFacts, OpError, Requirements, SourceVm, StorageHandoff, TargetFactory, TargetVm,
};
use vmm_node::migration::source::{migrate, CancelToken, MigrateOptions, MigrationEvent};
use vmm_node::migration::stats::MigrationStats;
use vmm_node::migration::target::{
    error_chain, serve_sessions, Abandon, ReceiveOptions, ReceiveStats,
};
use vmm_node::migration::tls::Transport;
use vmm_node::migration::transport::{DirtyPages, PageMap};
use vmm_node::migration::{self as engine, MigrationError};
use vmm_node::state::DiskSlotState;
use vmm_node::{GuestMem, Vm};

use super::lock_callback::DiskLocks;
use super::machine::{open_disk, Claim, CloseFor, HostedVm, OpenMode, SlotDisk};
use super::spec::{DiskSpec, VmSpec};
use super::{Reservation, VmHost, VmHostError};

/// Progress events kept for a slow reader before newer ones are dropped.
pub const PROGRESS_EVENTS_MAX: usize = 256;
/// Incoming-migration events kept for a slow reader before newer ones are dropped.
pub const INCOMING_EVENTS_MAX: usize = 64;
/// Largest configuration blob accepted from a source.
pub const CONFIG_BLOB_BYTES_MAX: usize = 1 << 20;

/// What the caller chooses for one live migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveOptions {
    /// Longest acceptable blackout.
    pub max_downtime_ms: u64,
    /// Give up (and roll back) when not converged by then.
    pub deadline_ms: u64,
    /// Parallel data connections (1..=16).
    pub connections: usize,
    /// Most bytes/s all data connections together may send (0: unlimited).
    #[serde(default)]
    pub bandwidth_bytes_per_s_max: u64,
    /// The address the connections to the target leave from (`None`: the kernel's
    /// choice); the agent passes its migration address.
    #[serde(default)]
    pub source_ip: Option<std::net::IpAddr>,
    /// The one-time ticket the target checks: the id of the migration record committed
    /// with `StartMigration` (0: none).
    #[serde(default)]
    pub ticket: u64,
}

impl Default for LiveOptions {
    fn default() -> Self {
        let c = ConvergenceConfig::default();
        LiveOptions {
            max_downtime_ms: c.max_downtime.as_millis() as u64,
            deadline_ms: c.deadline.as_millis() as u64,
            connections: engine::DEFAULT_CONNECTIONS,
            bandwidth_bytes_per_s_max: 0,
            source_ip: None,
            ticket: 0,
        }
    }
}

impl LiveOptions {
    fn to_engine(self, transport: Transport) -> MigrateOptions {
        MigrateOptions {
            connections: self.connections,
            convergence: ConvergenceConfig {
                max_downtime: Duration::from_millis(self.max_downtime_ms),
                deadline: Duration::from_millis(self.deadline_ms),
                throttle: true,
            },
            bandwidth_bytes_per_s_max: Some(self.bandwidth_bytes_per_s_max),
            source_ip: self.source_ip,
            ticket: migration_ticket(self.ticket),
            ..MigrateOptions::new(transport)
        }
    }
}

/// The ticket bytes of migration record `id` (what the target's authorizer expects).
pub fn migration_ticket(id: u64) -> Vec<u8> {
    if id == 0 {
        Vec::new()
    } else {
        id.to_be_bytes().to_vec()
    }
}

/// The migration record id a ticket names (`None`: not a ticket of this cluster's form).
pub fn ticket_id(ticket: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(ticket)
        .ok()
        .map(u64::from_be_bytes)
        .filter(|id| *id != 0)
}

/// The result of a finished live migration.
#[derive(Clone, Debug)]
pub struct MigrationReport {
    pub vm: String,
    pub target_node: NodeId,
    /// Engine statistics: rounds, blackout breakdown, both memory receipt digests.
    pub stats: MigrationStats,
    /// The lock commands committed through [`DiskLocks::commit`] at the storage stage.
    pub handed_off: Vec<LockCommand>,
}

impl MigrationReport {
    /// True when the target's digest of guest memory at switchover equals the source's.
    pub fn receipt_matches(&self) -> bool {
        self.stats.receipt_matches()
    }
}

/// A live migration in progress.
pub struct MigrationHandle {
    /// Phases, predictions, progress (bytes left, rate, ETA, round) and throttle
    /// changes. Bounded: events are dropped, never waited for, when nobody reads.
    pub progress: Receiver<MigrationEvent>,
    cancel: CancelToken,
    thread: JoinHandle<Result<MigrationReport, VmHostError>>,
}

impl MigrationHandle {
    /// A token that cancels this migration from elsewhere (see [`MigrationHandle::cancel`]).
    pub fn canceller(&self) -> CancelToken {
        self.cancel.clone()
    }

    /// Asks the migration to stop; before switchover the VM keeps running on the source.
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Waits for the end of the migration.
    pub fn wait(self) -> Result<MigrationReport, VmHostError> {
        match self.thread.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

/// Sent to the target as the engine's configuration blob.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBlob {
    spec: VmSpec,
    layout: Vec<SlotDisk>,
    source_node: NodeId,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn disk_names(layout: &[SlotDisk]) -> Vec<String> {
    layout.iter().map(|d| d.disk.name.to_string()).collect()
}

fn layout_disks(layout: &[SlotDisk]) -> Vec<DiskSpec> {
    layout.iter().map(|d| d.disk.clone()).collect()
}

/// The source VM as the engine sees it.
struct SourceSide {
    vm: Arc<HostedVm>,
    host: Arc<VmHost>,
    target_node: NodeId,
    locks: Arc<dyn DiskLocks>,
    layout: Vec<SlotDisk>,
    grants: Vec<LockGrant>,
    saved_slots: Mutex<Vec<DiskSlotState>>,
    detached: Mutex<Vec<usize>>,
    pending: Mutex<Vec<LockCommand>>,
    reclaimed: Mutex<Option<Vec<LockGrant>>>,
}

impl SourceVm for SourceSide {
    fn memory(&self) -> &GuestMem {
        self.vm.vm.memory()
    }
    fn config_blob(&self) -> Result<Vec<u8>, OpError> {
        let blob = ConfigBlob {
            spec: self.vm.current_spec(),
            layout: self.layout.clone(),
            source_node: self.host.node(),
        };
        Ok(serde_json::to_vec(&blob)?)
    }
    fn requirements(&self) -> Requirements {
        let c = self.vm.vm.config();
        Requirements {
            vm_name: c.name.clone(),
            cpu_vendor: vmm_node::facts::cpu_vendor(),
            cpu_features: seam::host_cpu_features(),
            memory_bytes: PageMap::from_memory(self.vm.vm.memory()).total_bytes(),
            vcpus: u32::from(c.vcpus),
            disks: disk_names(&self.layout),
        }
    }
    fn start_dirty_log(&self) -> Result<(), OpError> {
        Ok(self.vm.vm.start_dirty_log()?)
    }
    fn dirty_pages(&self, map: &PageMap) -> Result<DirtyPages, OpError> {
        // vm-memory keeps regions sorted by address, as the page map does, so the
        // per-region bitmaps line up with the map's regions.
        let bitmaps = self.vm.vm.dirty_pages()?;
        if bitmaps.len() != map.regions().len() {
            return Err(format!(
                "{} dirty bitmaps for {} memory regions",
                bitmaps.len(),
                map.regions().len()
            )
            .into());
        }
        let mut d = DirtyPages::empty(map.total_pages());
        for (&(_, pages, first), bits) in map.regions().iter().zip(bitmaps) {
            d.merge_region_bitmap(first, pages, &bits);
        }
        if map.total_pages() > 0 && crate::crash_point::holds_precopy(&self.vm.vm.config().name) {
            d.set(0);
        }
        Ok(d)
    }
    fn stop_dirty_log(&self) -> Result<(), OpError> {
        Ok(self.vm.vm.stop_dirty_log()?)
    }
    fn pause(&self) -> Result<(), OpError> {
        Ok(self.vm.vm.pause()?)
    }
    fn resume(&self) -> Result<(), OpError> {
        Ok(self.vm.vm.resume()?)
    }
    fn set_throttle(&self, percent: u8) {
        self.vm.vm.set_throttle(percent);
    }
    fn save_state(&self) -> Result<Vec<u8>, OpError> {
        let (blob, slots) = self.vm.save_state_blob()?;
        *lock(&self.saved_slots) = slots;
        Ok(blob)
    }
    fn detach_disks(&self) -> Result<(), OpError> {
        let saved = lock(&self.saved_slots).clone();
        let slots = self.vm.occupied_slots();
        let cmds = self.vm.detach_all(
            CloseFor::Handoff {
                to: self.target_node,
            },
            &saved,
            self.host.registry(),
            self.host.node(),
        )?;
        *lock(&self.detached) = slots;
        *lock(&self.pending) = cmds;
        Ok(())
    }
    fn flush_disks(&self) -> Result<(), OpError> {
        Ok(self.vm.flush_disks()?)
    }
    fn reattach_disks(&self) -> Result<(), OpError> {
        let saved = lock(&self.saved_slots).clone();
        let slots = std::mem::take(&mut *lock(&self.detached));
        let grants = lock(&self.reclaimed)
            .take()
            .unwrap_or_else(|| self.grants.clone());
        self.vm.reattach(
            &saved,
            &slots,
            &self.layout,
            &grants,
            self.host.registry(),
            self.host.node(),
        )?;
        tracing::info!(vm = %self.vm.name(), disks = slots.len(), "disks reattached after a failed migration");
        Ok(())
    }
    fn boost_vcpus(&self, nice: i32, for_at_most: std::time::Duration) {
        self.vm.vm.boost_vcpus(nice, for_at_most);
    }
    fn end_vcpu_boost(&self) {
        self.vm.vm.end_vcpu_boost();
    }
}

impl StorageHandoff for SourceSide {
    fn release(&self, vm: &str, _disks: &[String]) -> Result<(), OpError> {
        let cmds = lock(&self.pending).clone();
        self.locks.commit(vm, &cmds)?;
        Ok(())
    }
    fn reclaim(&self, vm: &str, _disks: &[String]) -> Result<(), OpError> {
        let grants = self
            .locks
            .reclaim(vm, self.host.node(), &layout_disks(&self.layout))?;
        *lock(&self.reclaimed) = Some(grants);
        Ok(())
    }
    fn acquire(&self, vm: &str, _disks: &[String]) -> Result<(), OpError> {
        Err(format!("acquire called on the source of VM {vm}").into())
    }
}

impl VmHost {
    /// Live-migrates the running VM `name` to the node `target_node` listening for
    /// migrations at `target_addr`. Disk locks move through `locks` at the storage stage.
    /// Returns at once; the work runs on a thread. On success the VM is gone from this
    /// host; on failure or cancel before switchover it runs here as before.
    #[tracing::instrument(skip(self, locks, opts))]
    pub fn migrate_out(
        self: &Arc<Self>,
        name: &str,
        target_node: NodeId,
        target_addr: SocketAddr,
        opts: LiveOptions,
        locks: Arc<dyn DiskLocks>,
    ) -> Result<MigrationHandle, VmHostError> {
        if let Some(w) = self.worker(name) {
            return self.migrate_out_worker(w, target_node, target_addr, opts, locks);
        }
        let vm = self.get(name)?;
        let claim = vm.claim()?;
        self.require_running(&vm)?;
        let mopts = opts.to_engine(self.migration_transport()?);
        mopts.validate().map_err(|source| VmHostError::Migration {
            vm: name.to_owned(),
            source,
        })?;
        let layout = vm.slot_disks();
        let grants = vm
            .disk_status()
            .into_iter()
            .map(|d| LockGrant {
                disk: d.name,
                node: self.node(),
                mode: d.mode,
                token: d.token,
                term: 0,
            })
            .collect();
        let side = SourceSide {
            vm: vm.clone(),
            host: self.clone(),
            target_node,
            locks,
            layout,
            grants,
            saved_slots: Mutex::new(Vec::new()),
            detached: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            reclaimed: Mutex::new(None),
        };
        let (tx, progress) = sync_channel(PROGRESS_EVENTS_MAX);
        let cancel = CancelToken::default();
        let thread_cancel = cancel.clone();
        let host = self.clone();
        let vm_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("migrate-{name}"))
            .spawn(move || {
                run_out(
                    host,
                    side,
                    claim,
                    vm_name,
                    target_node,
                    target_addr,
                    mopts,
                    thread_cancel,
                    tx,
                )
            })
            .map_err(VmHostError::Thread)?;
        Ok(MigrationHandle {
            progress,
            cancel,
            thread,
        })
    }
}

impl VmHost {
    /// [`VmHost::migrate_out`] of a VM in a worker process: the worker runs the engine
    /// (its VM's memory, dirty log and devices are there), this agent relays the lock
    /// commits it asks for, its progress and a cancel.
    fn migrate_out_worker(
        self: &Arc<Self>,
        w: Arc<super::worker::WorkerVm>,
        target_node: NodeId,
        target_addr: SocketAddr,
        opts: LiveOptions,
        locks: Arc<dyn DiskLocks>,
    ) -> Result<MigrationHandle, VmHostError> {
        let name = w.name().to_owned();
        let transport = self.migration_transport()?;
        opts.to_engine(transport.clone())
            .validate()
            .map_err(|source| VmHostError::Migration {
                vm: name.clone(),
                source,
            })?;
        let tls = match transport {
            vmm_node::migration::tls::Transport::Plaintext => None,
            vmm_node::migration::tls::Transport::Tls(_) => Some(
                self.worker_settings()
                    .and_then(|s| s.migration_tls)
                    .map(|source| (source.0)())
                    .ok_or(VmHostError::NoMigrationTransport)?,
            ),
        };
        let (tx, progress) = sync_channel(PROGRESS_EVENTS_MAX);
        let cancel = CancelToken::default();
        let thread_cancel = cancel.clone();
        let host = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("migrate-{name}"))
            .spawn(move || {
                tracing::info!(vm = %name, target_node, %target_addr, pid = w.pid(), "migration of a worker's vm started");
                let mut on_event = |e: MigrationEvent| {
                    if let Err(TrySendError::Full(_)) = tx.try_send(e) {
                        tracing::debug!(vm = %name, "progress event dropped: reader too slow");
                    }
                };
                match w.migrate_out(
                    target_node,
                    target_addr,
                    opts,
                    tls,
                    locks.as_ref(),
                    &thread_cancel,
                    &mut on_event,
                ) {
                    Ok((stats, handed_off)) => {
                        // The worker stopped its copy and exits.
                        host.forget_worker(&name);
                        tracing::info!(vm = %name, target_node, blackout_us = stats.blackout.total_us,
                            receipt_ok = stats.receipt_matches(), "migration finished");
                        Ok(MigrationReport {
                            vm: name,
                            target_node,
                            stats,
                            handed_off,
                        })
                    }
                    Err(f) => {
                        tracing::warn!(vm = %name, error = %f.message, kind = ?f.kind, "migration failed");
                        Err(VmHostError::WorkerMigration {
                            vm: name,
                            message: f.message,
                            commit_uncertain: f.kind
                                == Some(super::worker::protocol::FailureKind::CommitUncertain),
                        })
                    }
                }
            })
            .map_err(VmHostError::Thread)?;
        Ok(MigrationHandle {
            progress,
            cancel,
            thread,
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn run_out(
    host: Arc<VmHost>,
    side: SourceSide,
    claim: Claim,
    name: String,
    target_node: NodeId,
    target_addr: SocketAddr,
    mopts: MigrateOptions,
    cancel: CancelToken,
    tx: SyncSender<MigrationEvent>,
) -> Result<MigrationReport, VmHostError> {
    let mut on_event = |e: &MigrationEvent| {
        if let Err(TrySendError::Full(_)) = tx.try_send(e.clone()) {
            tracing::debug!(vm = %name, "progress event dropped: reader too slow");
        }
    };
    tracing::info!(vm = %name, target_node, %target_addr, "migration started");
    let r = migrate(&side, target_addr, &mopts, &side, &cancel, &mut on_event);
    match r {
        Ok(stats) => {
            host.unregister(&side.vm);
            if let Err(e) = side.vm.vm.stop() {
                tracing::error!(vm = %name, error = %e, "stopping the migrated-away VM");
            }
            host.delete_taps(&side.vm.current_spec());
            drop(claim);
            tracing::info!(vm = %name, target_node, blackout_us = stats.blackout.total_us,
                receipt_ok = stats.receipt_matches(), "migration finished");
            Ok(MigrationReport {
                vm: name,
                target_node,
                stats,
                handed_off: std::mem::take(&mut *lock(&side.pending)),
            })
        }
        Err(source) => {
            if matches!(source, MigrationError::CommitUncertain(_)) {
                // The target may run the VM: never resume it here; leave it paused and
                // registered so the agent can decide (the lock table says who owns the disks).
                tracing::error!(vm = %name, "commit uncertain; the source copy stays paused");
            }
            drop(claim);
            tracing::warn!(vm = %name, error = %error_chain(&source), "migration failed");
            Err(VmHostError::Migration { vm: name, source })
        }
    }
}

// ---------------------------------------------------------------------------------------
// Target side.

/// What happened on a migration listener.
#[derive(Clone, Debug)]
pub enum IncomingEvent {
    /// The VM now runs here and is registered in the [`VmHost`].
    Arrived { vm: String, stats: ReceiveStats },
    /// An incoming migration failed; nothing was registered.
    Failed { error: String },
}

/// A paused VM made to receive a live migration: its name reserved, its TAPs created.
pub(crate) struct PreparedIncoming {
    pub vm: Arc<HostedVm>,
    reservation: Reservation,
    taps: super::nics::Taps,
}

impl PreparedIncoming {
    /// The VM runs: register it under its reserved name, keep its TAPs.
    pub(crate) fn arrived(self) {
        self.reservation.commit(self.vm);
        self.taps.keep();
    }
}

impl VmHost {
    /// Creates the paused VM of `spec` for an incoming live migration, around `memory`
    /// (shared memory another process fills) or fresh memory.
    pub(crate) fn prepare_incoming(
        &self,
        spec: VmSpec,
        memory: Option<GuestMem>,
    ) -> Result<PreparedIncoming, VmHostError> {
        let reservation = self.reserve(&spec.name)?;
        let taps = self.create_taps(&spec)?;
        let config = super::spec::to_config(&spec, self.registry(), self.node())?;
        let vm = match memory {
            Some(mem) => Vm::with_memory(config, mem),
            None => Vm::new_paused(config),
        }
        .map_err(|source| VmHostError::Vm {
            vm: spec.name.clone(),
            op: "create the incoming VM",
            source,
        })?;
        vmm_node::devices::virtio::net::install_virtio_nics(&vm).map_err(|source| {
            VmHostError::Vm {
                vm: spec.name.clone(),
                op: "create the incoming VM's NICs",
                source,
            }
        })?;
        let hosted = Arc::new(HostedVm::new(spec, vm)?);
        self.journal_console(&hosted);
        Ok(PreparedIncoming {
            vm: hosted,
            reservation,
            taps,
        })
    }

    /// Restores the source's saved state into the incoming VM, its disks opened with the
    /// grants the handoff gave this node.
    pub(crate) fn restore_incoming(
        &self,
        vm: &HostedVm,
        state: &[u8],
        layout: &[SlotDisk],
        grants: &[LockGrant],
    ) -> Result<(), VmHostError> {
        vm.restore_state_blob(state, layout, grants, |d, g| {
            open_disk(self.registry(), self.node(), d, g, OpenMode::Handoff)
        })
    }
}

/// Closes the disks a failed incoming VM opened, for `to` (the source).
pub(crate) fn close_incoming_disks(vm: &HostedVm, to: NodeId) -> Vec<LockCommand> {
    let mut cmds = Vec::new();
    for slot in vm.occupied_slots() {
        match vm.detach(slot, CloseFor::Handoff { to }) {
            Ok(c) => cmds.push(c),
            Err(e) => {
                tracing::error!(vm = %vm.name(), error = %e, "closing a disk of a failed incoming VM")
            }
        }
    }
    cmds
}

/// Where the VM being received lives.
enum IncomingVm {
    /// In this agent's process.
    Local(Mutex<Option<PreparedIncoming>>, Arc<HostedVm>),
    /// In a worker process spawned for it; `memory` is this agent's mapping of the
    /// worker's guest memory (the engine writes the pages into it).
    Worker {
        worker: Arc<super::worker::WorkerVm>,
        session: super::worker::IncomingSession,
        memory: GuestMem,
    },
}

/// The VM being received.
struct Incoming {
    name: String,
    vm: IncomingVm,
    layout: Vec<SlotDisk>,
    source_node: NodeId,
    grants: Mutex<Vec<LockGrant>>,
    /// Held while the VM is received in a worker (a local VM holds its own).
    reservation: Mutex<Option<Reservation>>,
    /// Reserved grants whose fence records were staged at set-up.
    staged: Mutex<Vec<LockGrant>>,
    /// The VM runs here: staged records were installed and are synced, not discarded.
    resumed: AtomicBool,
    /// For discarding staged records when the migration ends first.
    host: std::sync::Weak<VmHost>,
}

impl Incoming {
    /// After the resume: makes the installed records' renames durable, off the VM's path.
    fn sync_staged(&self, host: &Arc<VmHost>) {
        let staged = lock(&self.staged).clone();
        if staged.is_empty() {
            return;
        }
        let (host, vm) = (host.clone(), self.name.clone());
        let spawned = std::thread::Builder::new()
            .name("fence-sync".into())
            .spawn(move || {
                for g in &staged {
                    if let Err(e) = csv_volume::sync_handoff(host.registry(), g) {
                        tracing::warn!(vm = %vm, disk = %g.disk, error = %crate::error_chain(&e), "fence record rename not synced");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(vm = %self.name, error = %e, "cannot start the fence-record sync");
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.resumed.load(Ordering::SeqCst) {
            return;
        }
        // The migration ended before the VM ran here: no staged record may stay behind
        // (an installed one is gone from its staged name already).
        let staged = std::mem::take(&mut *lock(&self.staged));
        if let Some(host) = self.host.upgrade() {
            for g in &staged {
                csv_volume::discard_staged_handoff(host.registry(), g);
            }
        }
    }
}

struct TargetShared {
    host: Arc<VmHost>,
    locks: Arc<dyn DiskLocks>,
    current: Mutex<Option<Arc<Incoming>>>,
    /// The engine's handle for giving up the session in progress (`VmHost::abandon_incoming`).
    abandon: Abandon,
}

struct Factory(Arc<TargetShared>);
struct Handoff(Arc<TargetShared>);
struct TargetSide(Arc<Incoming>, Arc<TargetShared>);

impl TargetShared {
    fn current(&self, vm: &str) -> Result<Arc<Incoming>, OpError> {
        lock(&self.current)
            .clone()
            .filter(|i| i.name == vm)
            .ok_or_else(|| format!("no incoming migration of VM {vm} in progress").into())
    }
}

impl TargetFactory for Factory {
    fn facts(&self) -> NodeFacts {
        engine::adapter::local_facts()
    }
    fn create_paused(&self, config_blob: &[u8]) -> Result<Box<dyn TargetVm>, OpError> {
        if config_blob.len() > CONFIG_BLOB_BYTES_MAX {
            return Err(format!(
                "configuration blob of {} bytes is over the {CONFIG_BLOB_BYTES_MAX}-byte limit",
                config_blob.len()
            )
            .into());
        }
        let blob: ConfigBlob = serde_json::from_slice(config_blob)?;
        let host = &self.0.host;
        blob.spec.validate().map_err(VmHostError::Spec)?;
        for d in &blob.layout {
            if usize::from(d.slot) >= vmm_node::config::VIRTIO_BLK_SLOTS {
                return Err(format!("disk {} in slot {} out of range", d.disk.name, d.slot).into());
            }
        }
        let name = blob.spec.name.clone();
        let (vm, reservation) = match host.worker_settings() {
            // The VM will run in a worker of its own: it is created there, around guest
            // memory this agent shares with it and the engine fills.
            Some(settings) => {
                let reservation = host.reserve(&name)?;
                let (worker, memory) = host.spawn_incoming_worker(&settings, blob.spec)?;
                let session = worker
                    .incoming_session()
                    .map_err(|source| VmHostError::Worker {
                        vm: name.clone(),
                        source,
                    });
                let session = match session {
                    Ok(s) => s,
                    Err(e) => {
                        host.drop_incoming_worker(&worker);
                        return Err(e.into());
                    }
                };
                (
                    IncomingVm::Worker {
                        worker,
                        session,
                        memory,
                    },
                    Some(reservation),
                )
            }
            None => {
                let prepared = host.prepare_incoming(blob.spec, None)?;
                let vm = prepared.vm.clone();
                (IncomingVm::Local(Mutex::new(Some(prepared)), vm), None)
            }
        };
        let inc = Arc::new(Incoming {
            name: name.clone(),
            vm,
            layout: blob.layout,
            source_node: blob.source_node,
            grants: Mutex::new(Vec::new()),
            reservation: Mutex::new(reservation),
            staged: Mutex::new(Vec::new()),
            resumed: AtomicBool::new(false),
            host: Arc::downgrade(host),
        });
        // Staged handoff: the fence records of the reserved epochs are written now, while
        // the source still runs; the storage stage installs each with one rename.
        let reserved =
            self.0
                .locks
                .prepare_incoming(&name, host.node(), &layout_disks(&inc.layout));
        for g in &reserved {
            match csv_volume::stage_handoff(host.registry(), host.node(), g) {
                Ok(()) => lock(&inc.staged).push(g.clone()),
                Err(e) => {
                    tracing::warn!(vm = %name, disk = %g.disk, error = %crate::error_chain(&e), "fence record not staged; written at the storage stage")
                }
            }
        }
        *lock(&self.0.current) = Some(inc.clone());
        host.set_incoming(Some((name, self.0.abandon.clone())));
        Ok(Box::new(TargetSide(inc, self.0.clone())))
    }
}

impl TargetVm for TargetSide {
    fn memory(&self) -> &GuestMem {
        match &self.0.vm {
            IncomingVm::Local(_, vm) => vm.vm.memory(),
            IncomingVm::Worker { memory, .. } => memory,
        }
    }
    fn restore(&self, state: &[u8]) -> Result<(), OpError> {
        let grants = lock(&self.0.grants).clone();
        match &self.0.vm {
            IncomingVm::Local(_, vm) => {
                self.1
                    .host
                    .restore_incoming(vm, state, &self.0.layout, &grants)?
            }
            IncomingVm::Worker { session, .. } => {
                session.restore(state, &self.0.layout, &grants)?
            }
        }
        crate::crash_point::reached(crate::crash_point::MIGRATE_IN_AFTER_RESTORE);
        Ok(())
    }
    fn resume(&self) -> Result<(), OpError> {
        match &self.0.vm {
            IncomingVm::Local(_, vm) => vm.vm.resume()?,
            IncomingVm::Worker { session, .. } => session.resume()?,
        }
        self.0.resumed.store(true, Ordering::SeqCst);
        self.0.sync_staged(&self.1.host);
        Ok(())
    }
    fn announce_nics(&self) {
        match &self.0.vm {
            IncomingVm::Local(_, vm) => vm.vm.announce_nics_early(),
            IncomingVm::Worker { session, .. } => {
                // Best effort: a worker of an older build refuses the request, and its
                // NICs then announce at the resume.
                if let Err(e) = session.announce_nics() {
                    tracing::warn!(vm = %self.0.name, error = %e, "worker did not announce its nics early");
                }
            }
        }
    }
    fn boost_vcpus(&self, nice: i32, for_at_most: std::time::Duration) {
        match &self.0.vm {
            IncomingVm::Local(_, vm) => {
                vm.vm.boost_vcpus(nice, for_at_most);
            }
            // A worker boosts its own vCPUs when it resumes an incoming VM.
            IncomingVm::Worker { .. } => {}
        }
    }
}

impl StorageHandoff for Handoff {
    fn release(&self, vm: &str, _disks: &[String]) -> Result<(), OpError> {
        // A failed incoming migration after `acquire`: close what was opened and give the
        // locks back to the source — unless the receive was abandoned because the cluster
        // failed the VM over to this node (its source is gone): the locks are then this
        // node's to keep for the restart.
        if self.0.abandon.is_set() {
            tracing::info!(vm, "incoming migration abandoned; keeping its disk locks");
            return Ok(());
        }
        let inc = self.0.current(vm)?;
        let host = &self.0.host;
        let to = inc.source_node;
        let mut cmds = match &inc.vm {
            IncomingVm::Local(_, hosted) => close_incoming_disks(hosted, to),
            IncomingVm::Worker { session, .. } => session.release(to)?,
        };
        let closed: Vec<String> = cmds
            .iter()
            .filter_map(|c| match c {
                LockCommand::Handoff { disk, .. } | LockCommand::Release { disk, .. } => {
                    Some(disk.to_string())
                }
                _ => None,
            })
            .collect();
        for g in lock(&inc.grants).iter() {
            if closed.contains(&g.disk.to_string()) {
                continue;
            }
            cmds.push(match g.mode {
                LockMode::Exclusive => LockCommand::Handoff {
                    disk: g.disk.clone(),
                    from: host.node(),
                    to,
                },
                LockMode::Shared => LockCommand::Release {
                    disk: g.disk.clone(),
                    node: host.node(),
                },
            });
        }
        self.0.locks.commit(vm, &cmds)?;
        Ok(())
    }
    fn reclaim(&self, vm: &str, _disks: &[String]) -> Result<(), OpError> {
        Err(format!("reclaim called on the target of VM {vm}").into())
    }
    fn acquire(&self, vm: &str, _disks: &[String]) -> Result<(), OpError> {
        let inc = self.0.current(vm)?;
        let grants = self
            .0
            .locks
            .acquire(vm, self.0.host.node(), &layout_disks(&inc.layout))?;
        *lock(&inc.grants) = grants;
        Ok(())
    }
}

/// Accepts incoming live migrations on the node's migration address, one at a time,
/// and registers each VM in the [`VmHost`] once it runs. Stops on drop.
pub struct MigrationListener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Arrivals and failures. Bounded: dropped, never waited for, when nobody reads.
    pub events: Receiver<IncomingEvent>,
}

impl MigrationListener {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and joins the thread (an incoming migration in progress finishes
    /// or fails first).
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MigrationListener {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl VmHost {
    /// Listens for incoming VMs on `addr`; disk grants come from `locks.acquire`.
    /// `opts` carries the engine's target options (e.g. a facts override in tests).
    pub fn listen_migrations(
        self: &Arc<Self>,
        addr: SocketAddr,
        locks: Arc<dyn DiskLocks>,
        opts: ReceiveOptions,
    ) -> Result<MigrationListener, VmHostError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| VmHostError::Listen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| VmHostError::Listen { addr, source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = sync_channel(INCOMING_EVENTS_MAX);
        let shared = Arc::new(TargetShared {
            host: self.clone(),
            locks,
            current: Mutex::new(None),
            abandon: opts.abandon.clone(),
        });
        let thread_stop = stop.clone();
        let mut opts = opts;
        opts.max_sessions = 1;
        let thread = std::thread::Builder::new()
            .name(format!("migration-listener-{}", self.node()))
            .spawn(move || listen_loop(listener, shared, opts, thread_stop, tx))
            .map_err(VmHostError::Thread)?;
        tracing::info!(%addr, node = self.node(), "migration listener started");
        Ok(MigrationListener {
            addr,
            stop,
            thread: Some(thread),
            events,
        })
    }
}

fn listen_loop(
    listener: TcpListener,
    shared: Arc<TargetShared>,
    opts: ReceiveOptions,
    stop: Arc<AtomicBool>,
    tx: SyncSender<IncomingEvent>,
) {
    let factory = Factory(shared.clone());
    let handoff = Handoff(shared.clone());
    let on_outcome = |r: Result<engine::target::Received, MigrationError>| {
        shared.host.set_incoming(None);
        let inc = lock(&shared.current).take();
        let ev = match (r, inc) {
            (Ok(received), Some(inc)) => {
                let name = inc.name.clone();
                match &inc.vm {
                    IncomingVm::Local(prepared, _) => {
                        if let Some(p) = lock(prepared).take() {
                            p.arrived();
                        }
                    }
                    IncomingVm::Worker { worker, .. } => {
                        shared.host.adopt_arrived_worker(worker.clone());
                        drop(lock(&inc.reservation).take());
                    }
                }
                tracing::info!(vm = %name, restore_us = received.stats.restore_us, "incoming vm registered");
                IncomingEvent::Arrived {
                    vm: name,
                    stats: received.stats,
                }
            }
            (Ok(received), None) => IncomingEvent::Failed {
                error: format!("VM {} arrived but its record was lost", received.vm_name),
            },
            (Err(e), inc) => {
                if let Some(IncomingVm::Worker { worker, .. }) = inc.as_ref().map(|i| &i.vm) {
                    shared.host.drop_incoming_worker(worker);
                }
                let error = error_chain(&e);
                tracing::warn!(%error, "incoming migration failed");
                IncomingEvent::Failed { error }
            }
        };
        let _ = tx.try_send(ev);
    };
    // Sessions run on their own threads; this host takes one incoming VM at a time (the
    // engine refuses a second Hello meanwhile), strangers are refused by the transport
    // and the authorizer before anything is created.
    if let Err(e) = serve_sessions(&listener, &factory, &handoff, &opts, &stop, &on_outcome) {
        tracing::error!(error = %error_chain(&e), "migration listener failed");
    }
    tracing::info!("migration listener stopped");
}
