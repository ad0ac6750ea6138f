//! The agent-local VM runtime: runs this node's VMs in the embedded VMM (vmm-node), opens
//! their disks through csv-volume's hooks with the lock grants the agent got from the
//! replicated lock table, and moves VMs between hosts (live and quick migration).
//!
//! There is no Raft in here. The agent commits a decision (e.g. `Acquire`) and then calls
//! this layer with the result (a [`LockGrant`]); where this layer itself produces a
//! decision that must be committed (disk `Release`/`Handoff` when a VM stops or leaves),
//! it either returns the [`LockCommand`]s or calls the agent's [`DiskLocks`] callback.
//!
//! ```text
//! agent ──start(spec, grants)──▶ VmHost ──to_config──▶ vmm_node::Vm::create ─▶ 8 virtio-blk slots
//!                                     └─open_for_vm(grant)─▶ FencedDisk ─FencedBackend─▶ slot i
//! agent ◀──Stopped{release cmds}── stop(name): pause/stop ─▶ slot detach (flush) ─▶ release_on_stop
//! migrate_out ─▶ engine thread (vmm_node::migration::source) ─▶ pause, save state+slots,
//!              detach ─▶ handoff_release ─▶ DiskLocks::commit(Handoff) ─▶ target
//! listener ─▶ receive_one ─▶ DiskLocks::acquire ─▶ handoff_open ─▶ restore slots ─▶ resume ─▶ registered
//! ```
//!
//! Module map: [`spec`] (VmSpec → VmConfig), [`backend`] (FencedDisk as DiskBackend),
//! `machine` (one VM + slots + disk table), [`live_migration`] (live migration out and the
//! listener for incoming VMs), [`quick_migration`], [`lock_callback`] (the `DiskLocks`
//! callback and an in-process implementation over a `LockTable`).

pub mod backend;
pub mod journal;
pub mod live_migration;
#[cfg(any(test, feature = "test-hooks"))]
pub mod local_locks;
pub mod lock_callback;
mod machine;
pub mod nics;
pub mod quick_migration;
pub mod spec;
pub mod worker;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use csv_volume::{
    DiskName, FencingToken, LockCommand, LockGrant, LockMode, NodeId, VolumeRegistry,
};
use vmm_node::{Vm, VmStatus};

use crate::state::vm_spec::nic_tap_name;
pub use live_migration::{
    IncomingEvent, LiveOptions, MigrationHandle, MigrationListener, MigrationReport,
};
#[cfg(any(test, feature = "test-hooks"))]
pub use local_locks::LocalLocks;
pub use lock_callback::{DiskLocks, LockOpError};
pub use machine::{OpenMode, SlotDisk};
pub use quick_migration::{QuickImage, QuickRestoreStats};
pub use spec::{BootSpec, DiskSpec, NicSpec, SpecError, TestWorkload, VmSpec, WorkloadName};

use machine::{open_disk, CloseFor, HostedVm};
use vmm_node::migration::target::Abandon;

/// Errors of the VM runtime. Messages name the VM / disk / slot at fault.
#[derive(Debug, thiserror::Error)]
pub enum VmHostError {
    #[error("no migration transport is configured on this host (TLS credentials, or plaintext on an isolated network)")]
    NoMigrationTransport,
    #[error("invalid VM spec")]
    Spec(#[source] SpecError),
    #[error("VM {vm}: its boot image is refused on this node")]
    Image {
        vm: String,
        #[source]
        source: spec::ImageError,
    },
    #[error("VM {vm}: cannot set up its NICs")]
    Nic {
        vm: String,
        #[source]
        source: nics::NicError,
    },
    #[error("no VM named {0:?} runs on this node")]
    NotFound(String),
    #[error("a VM named {0:?} already exists on this node")]
    AlreadyExists(String),
    #[error("VM {0:?} is busy with another operation (migration, attach/detach or stop)")]
    Busy(String),
    #[error("cannot resolve disk {disk} on the shared volumes")]
    Volume {
        disk: String,
        #[source]
        source: csv_volume::VolumeError,
    },
    #[error("no lock grant was given for disk {disk}")]
    MissingGrant { disk: String },
    #[error("grant for disk {disk} is for node {got_node} ({got_mode}); this needs node {want_node} ({want_mode})")]
    GrantMismatch {
        disk: String,
        want_node: NodeId,
        want_mode: LockMode,
        got_node: NodeId,
        got_mode: LockMode,
    },
    #[error("cannot open disk {disk} with its grant")]
    Open {
        disk: String,
        #[source]
        source: csv_volume::HookError,
    },
    #[error("cannot close disk {disk} cleanly")]
    Close {
        disk: String,
        #[source]
        source: csv_volume::HookError,
    },
    #[error("VM {vm}: cannot flush disk {disk}")]
    Flush {
        vm: String,
        disk: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {disk} is still in use by its virtio slot")]
    DiskStillShared { disk: String },
    #[error("VM {vm}: cannot {op}")]
    Vm {
        vm: String,
        op: &'static str,
        #[source]
        source: vmm_node::VmError,
    },
    #[error("VM {vm}: virtio-blk slot {slot}")]
    Slot {
        vm: String,
        slot: u8,
        #[source]
        source: vmm_node::devices::virtio::VirtioBlkError,
    },
    #[error("VM {vm} has no free disk slot")]
    NoFreeSlot { vm: String },
    #[error("VM {vm}: slot {slot} has no disk")]
    SlotEmpty { vm: String, slot: u8 },
    #[error("disk {disk} is already attached to VM {vm}")]
    DiskAlreadyAttached { vm: String, disk: String },
    #[error("disk {disk} is not attached to VM {vm}")]
    DiskNotAttached { vm: String, disk: String },
    #[error("VM {vm}: saved disk slot state is unusable: {what}")]
    BadSlotState { vm: String, what: String },
    #[error("VM {vm}: cannot encode or decode its state")]
    StateCodec {
        vm: String,
        #[source]
        source: bincode::Error,
    },
    #[error("VM {vm} is {status}, it must be running")]
    NotRunning { vm: String, status: String },
    #[error("live migration of VM {vm} failed")]
    Migration {
        vm: String,
        #[source]
        source: vmm_node::migration::MigrationError,
    },
    #[error("cannot start the migration worker thread")]
    Thread(#[source] std::io::Error),
    #[error("migration listener on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("quick migration of VM {vm}: {what}")]
    Quick {
        vm: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("VM {vm}: its worker process")]
    Worker {
        vm: String,
        #[source]
        source: worker::WorkerError,
    },
    #[error(
        "VM {vm} runs in a worker process: this operation needs it in the agent's own process"
    )]
    InWorker { vm: String },
    #[error("VM {vm}: cannot allocate its guest memory")]
    Memory {
        vm: String,
        #[source]
        source: vmm_node::memory::MemoryError,
    },
    #[error("VM {vm}: live migration run by its worker failed: {message}")]
    WorkerMigration {
        vm: String,
        message: String,
        /// Commit sent, the target's answer lost: the VM stays paused in its worker.
        commit_uncertain: bool,
    },
    #[error("the lock callback failed during {op} for VM {vm}")]
    Locks {
        vm: String,
        op: &'static str,
        #[source]
        source: LockOpError,
    },
}

/// One disk of a VM as it stands now.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    pub slot: u8,
    pub name: DiskName,
    pub read_only: bool,
    pub token: FencingToken,
    pub mode: LockMode,
    /// Set once a newer owner's fence record has refused a write of this node.
    pub fenced_by: Option<FencingToken>,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub written_bytes: u64,
}

/// A VM of this host.
#[derive(Clone, Debug)]
pub struct VmInfo {
    pub name: String,
    pub status: VmStatus,
    /// The spec with the disks attached now.
    pub spec: VmSpec,
    pub disks: Vec<DiskStatus>,
}

/// A VM's console: the retained log at the time of the call, then live lines.
pub struct ConsoleStream {
    /// The retained console log (up to vmm-node's `CONSOLE_LOG_BYTES_MAX`).
    pub recent: String,
    /// Complete lines from the moment of the call on. Bounded (vmm-node's
    /// `CONSOLE_SUBSCRIBER_LINES_MAX`): a reader that falls behind loses lines, the guest
    /// never waits. Ends when the VM is gone from this host. A line that completes while
    /// the call runs can appear both at the end of `recent` and first here.
    pub lines: Receiver<String>,
}

/// What stopping a VM produced.
#[derive(Debug)]
pub struct Stopped {
    /// `Release` commands for the agent to propose, one per disk closed cleanly.
    pub release: Vec<LockCommand>,
    /// Disks that could not be closed cleanly (e.g. fenced: their lock is no longer this
    /// node's to release). The VM is stopped regardless.
    pub disk_errors: Vec<VmHostError>,
}

/// The VM runtime of one node.
pub struct VmHost {
    node: NodeId,
    registry: Arc<VolumeRegistry>,
    /// `None` marks a name reserved by a start or an incoming migration in progress.
    vms: Arc<VmTable>,
    /// The incoming live migration in progress (VM name) and the handle that gives it up.
    incoming: Mutex<Option<(String, Abandon)>>,
    /// VM networks of this node (name → bridge).
    networks: nics::Networks,
    /// Every console line of every VM this host ran, stamped (see [`journal`]).
    journal: Arc<journal::ConsoleJournal>,
    /// How outgoing live migrations are carried (mutual TLS in an agent); `None` until
    /// set: a migration out is refused rather than sent in the clear by default.
    migration_transport: Mutex<Option<vmm_node::migration::tls::Transport>>,
    /// Directories kernels and initrds may be read from (`image_dirs`); none: only the
    /// built-in test guest boots.
    image_dirs: Mutex<Vec<PathBuf>>,
    /// Set: new VMs start in worker processes (see [`worker`]).
    worker_settings: Mutex<Option<worker::Settings>>,
    /// VMs running in worker processes, by name.
    workers: Mutex<BTreeMap<String, Arc<worker::WorkerVm>>>,
    /// VMs whose workers stopped them when their lease ran out, not yet reported (see
    /// [`VmHost::take_self_fenced`]).
    self_fenced: Mutex<Vec<String>>,
    /// The worker receiving a live migration (renewed like the others; registered in
    /// `workers` once its VM runs).
    incoming_worker: Mutex<Option<Arc<worker::WorkerVm>>>,
    /// Until when the workers may run their VMs (the node's lease plus the workers'
    /// grace), as last renewed.
    worker_deadline: Mutex<Option<Instant>>,
    /// Set by an announced restart: no renewal shortens the workers' leases below it.
    worker_floor: Mutex<Option<Instant>>,
}

type VmTable = Mutex<BTreeMap<String, Option<Arc<HostedVm>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Frees a reserved name unless the reservation was turned into a VM.
pub(crate) struct Reservation {
    vms: Arc<VmTable>,
    name: String,
    armed: bool,
}

impl Reservation {
    /// Turns the reserved name into the registered VM.
    pub(crate) fn commit(mut self, vm: Arc<HostedVm>) {
        self.armed = false;
        lock(&self.vms).insert(self.name.clone(), Some(vm));
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            let mut vms = lock(&self.vms);
            if matches!(vms.get(&self.name), Some(None)) {
                vms.remove(&self.name);
            }
        }
    }
}

impl VmHost {
    /// The runtime of node `node`, seeing the shared volumes in `registry`.
    pub fn new(node: NodeId, registry: VolumeRegistry) -> Arc<VmHost> {
        Self::with_networks(node, registry, nics::Networks::new())
    }

    /// The runtime of node `node` whose VM networks are `networks` (name → host bridge).
    pub fn with_networks(
        node: NodeId,
        registry: VolumeRegistry,
        networks: nics::Networks,
    ) -> Arc<VmHost> {
        Arc::new(VmHost {
            node,
            registry: Arc::new(registry),
            vms: Arc::new(Mutex::new(BTreeMap::new())),
            incoming: Mutex::new(None),
            networks,
            journal: Arc::default(),
            migration_transport: Mutex::new(None),
            image_dirs: Mutex::default(),
            worker_settings: Mutex::new(None),
            workers: Mutex::default(),
            self_fenced: Mutex::default(),
            incoming_worker: Mutex::new(None),
            worker_deadline: Mutex::new(None),
            worker_floor: Mutex::new(None),
        })
    }

    /// Runs every VM started from now on in a worker process of its own.
    pub fn enable_workers(&self, settings: worker::Settings) {
        *lock(&self.worker_settings) = Some(settings);
    }

    /// Connects to the workers a previous run of this agent left running (below the
    /// worker directory) and takes them over; removes the directories of workers that
    /// are gone. Returns the VMs adopted.
    pub fn adopt_workers(&self) -> Vec<String> {
        let Some((dir, cgroups)) = lock(&self.worker_settings)
            .as_ref()
            .map(|s| (s.dir.clone(), s.cgroups.clone()))
        else {
            return Vec::new();
        };
        let (alive, dead) = worker::find(&dir);
        if let Some(t) = cgroups {
            // The cgroups of workers that exited while no agent ran are empty: gone.
            t.sweep(&alive.iter().map(|w| w.name().to_owned()).collect());
        }
        for (path, e) in dead {
            tracing::info!(dir = %path.display(), error = %crate::error_chain(&e), "no worker answers here; removing its directory");
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove a dead worker's directory");
            }
        }
        let mut names = Vec::new();
        for w in alive {
            let name = w.name().to_owned();
            if lock(&self.vms).contains_key(&name) {
                tracing::warn!(vm = %name, "a worker runs a VM this agent already has; leaving it to its lease");
                continue;
            }
            let w = Arc::new(w);
            w.start_polling();
            self.follow_worker_console(&w);
            tracing::info!(vm = %name, pid = w.pid(), "vm worker adopted");
            lock(&self.workers).insert(name.clone(), w);
            names.push(name);
        }
        names
    }

    /// Journals `w`'s console from now on. Connects on a thread of its own: on a host busy
    /// with its guests a worker may take a while to answer, and an agent adopting many
    /// must not wait for each in turn.
    fn follow_worker_console(&self, w: &Arc<worker::WorkerVm>) {
        let (w, journal) = (w.clone(), self.journal.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("follow-{}", w.name()))
            .spawn(move || match w.console_stamped() {
                Ok((_, lines)) => journal.follow_stamped(w.name(), lines),
                Err(e) => tracing::warn!(vm = %w.name(), error = %crate::error_chain(&e), "cannot follow the worker's console"),
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a console follower thread");
        }
    }

    /// The node holds its lease until `lease_until`: lets every worker run its VM until
    /// then plus the workers' grace. Called by the fence loop while the lease is held.
    pub fn renew_workers(&self, lease_until: Instant) {
        let Some(grace) = lock(&self.worker_settings)
            .as_ref()
            .map(|s| s.down_after / worker::WORKER_GRACE_PART)
        else {
            return;
        };
        let deadline = (lease_until + grace).max(lock(&self.worker_floor).unwrap_or(lease_until));
        *lock(&self.worker_deadline) = Some(deadline);
        let workers = self.all_workers();
        let until = worker::until_ns(deadline.saturating_duration_since(Instant::now()));
        for w in workers {
            w.grant(until);
        }
    }

    /// Lets every worker run its VM until `deadline` whatever the lease does from now on
    /// (a restart the cluster was told of and holds for); returns the VMs so extended.
    pub fn extend_workers(&self, deadline: Instant) -> Vec<String> {
        *lock(&self.worker_floor) = Some(deadline);
        let workers = self.all_workers();
        let until = worker::until_ns(deadline.saturating_duration_since(Instant::now()));
        // Delivered here and now, every worker at once (the agent is about to exit and
        // its pollers with it).
        std::thread::scope(|s| {
            let handles: Vec<_> = workers
                .iter()
                .map(|w| {
                    w.grant(until);
                    s.spawn(move || w.renew(until).map(|()| w.name().to_owned()))
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(name)) => Some(name),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot extend a worker's lease");
                        None
                    }
                    Err(_) => None,
                })
                .collect()
        })
    }

    /// Every worker: those running VMs and the one receiving a live migration.
    fn all_workers(&self) -> Vec<Arc<worker::WorkerVm>> {
        let mut all: Vec<Arc<worker::WorkerVm>> = lock(&self.workers).values().cloned().collect();
        all.extend(lock(&self.incoming_worker).clone());
        all
    }

    /// Spawns the worker that receives `spec` by live migration: its VM is created paused
    /// around guest memory this agent allocates and shares with it (a memfd the worker
    /// maps through `/proc/<agent>/fd/<n>`). Returns the worker and this agent's mapping.
    pub(crate) fn spawn_incoming_worker(
        &self,
        settings: &worker::Settings,
        spec: VmSpec,
    ) -> Result<(Arc<worker::WorkerVm>, vmm_node::GuestMem), VmHostError> {
        use std::os::fd::AsRawFd;
        let name = spec.name.clone();
        let werr = |source| VmHostError::Worker {
            vm: name.clone(),
            source,
        };
        let (memory, memfd) =
            vmm_node::memory::allocate_shared(spec.memory_mib << 20).map_err(|source| {
                VmHostError::Memory {
                    vm: name.clone(),
                    source,
                }
            })?;
        let path = PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            memfd.as_raw_fd()
        ));
        let mut start = self.worker_start_file(settings, spec, &[], OpenMode::Start, None)?;
        start.incoming_memory = Some(path);
        // The worker has mapped the memory once it reports; the descriptor can go then.
        let w = Arc::new(worker::WorkerVm::spawn(settings, &start).map_err(werr)?);
        drop(memfd);
        w.start_polling();
        *lock(&self.incoming_worker) = Some(w.clone());
        tracing::info!(vm = %name, pid = w.pid(), "worker spawned for an incoming live migration");
        Ok((w, memory))
    }

    /// The incoming worker's VM runs: it is one of this host's workers from now on.
    pub(crate) fn adopt_arrived_worker(&self, w: Arc<worker::WorkerVm>) {
        lock(&self.incoming_worker).take();
        self.follow_worker_console(&w);
        lock(&self.workers).insert(w.name().to_owned(), w);
    }

    /// The incoming migration into `w` failed: the worker stops and exits (it may have
    /// exited already, after closing its disks for the source).
    pub(crate) fn drop_incoming_worker(&self, w: &Arc<worker::WorkerVm>) {
        lock(&self.incoming_worker).take();
        if let Err(e) = w.fence() {
            tracing::debug!(vm = %w.name(), error = %crate::error_chain(&e), "incoming worker already gone");
        }
    }

    /// True if any VM runs in a worker process.
    pub fn has_workers(&self) -> bool {
        !lock(&self.workers).is_empty()
    }

    /// True if `name` runs in a worker process.
    pub fn in_worker(&self, name: &str) -> bool {
        lock(&self.workers).contains_key(name)
    }

    /// Stops the VMs this agent runs itself and leaves those in worker processes running
    /// (they stop on their own if no agent renews their lease). For an agent shutdown.
    pub fn stop_in_process(&self) -> Vec<String> {
        let names: Vec<String> = lock(&self.vms)
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        for n in &names {
            if let Err(e) = self.stop(n) {
                tracing::warn!(vm = %n, error = %crate::error_chain(&e), "cannot stop vm at shutdown");
            }
        }
        let left: Vec<String> = lock(&self.workers).keys().cloned().collect();
        if !left.is_empty() {
            tracing::info!(vms = ?left, "vms left running in their worker processes");
        }
        names
    }

    pub(crate) fn worker_settings(&self) -> Option<worker::Settings> {
        lock(&self.worker_settings).clone()
    }

    /// Drops `name`'s worker from the table (its VM is gone: saved away or stopped).
    pub(crate) fn forget_worker(&self, name: &str) {
        lock(&self.workers).remove(name);
    }

    /// Starts `spec` in a new worker: booted, or restored from the quick-migration image
    /// in `restore_from` (then with the restore's figures).
    pub(crate) fn start_in_worker(
        &self,
        settings: &worker::Settings,
        spec: VmSpec,
        grants: &[LockGrant],
        mode: OpenMode,
        restore_from: Option<PathBuf>,
    ) -> Result<(VmInfo, QuickRestoreStats), VmHostError> {
        let name = spec.name.clone();
        let werr = |source| VmHostError::Worker {
            vm: name.clone(),
            source,
        };
        let reservation = self.reserve(&name)?;
        let start = self.worker_start_file(settings, spec, grants, mode, restore_from)?;
        let w = Arc::new(worker::WorkerVm::spawn(settings, &start).map_err(werr)?);
        w.start_polling();
        self.follow_worker_console(&w);
        lock(&self.workers).insert(name.clone(), w.clone());
        drop(reservation);
        tracing::info!(vm = %name, pid = w.pid(), "vm started in a worker process");
        Ok((self.worker_info(&w), w.restored().unwrap_or_default()))
    }

    /// What a new worker for `spec` is started with; refused when this node does not
    /// hold its lease (a worker may run its VM only until the lease's end).
    fn worker_start_file(
        &self,
        settings: &worker::Settings,
        spec: VmSpec,
        grants: &[LockGrant],
        mode: OpenMode,
        restore_from: Option<PathBuf>,
    ) -> Result<worker::protocol::StartFile, VmHostError> {
        let deadline = lock(&self.worker_deadline)
            .filter(|d| *d > Instant::now())
            .ok_or_else(|| VmHostError::Worker {
                vm: spec.name.clone(),
                source: worker::WorkerError::NoLease,
            })?;
        let cgroups = match &settings.cgroups {
            Some(t) => t
                .create(
                    &spec.name,
                    worker::cgroup::Limits::of_vm(spec.vcpus.into(), spec.memory_mib),
                )
                .unwrap_or_else(|e| {
                    tracing::warn!(vm = %spec.name, error = %e, "vm runs without a cgroup of its own");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let now = Instant::now();
        Ok(worker::protocol::StartFile {
            version: worker::protocol::VERSION,
            node: self.node,
            spec,
            grants: grants.to_vec(),
            takeover_wait_ms: match mode {
                OpenMode::Takeover { old_lease_deadline } => Some(
                    u64::try_from(
                        old_lease_deadline
                            .saturating_duration_since(now)
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                ),
                _ => None,
            },
            lease_until_ns: worker::until_ns(deadline.saturating_duration_since(now)),
            volumes: settings.volumes.clone(),
            networks: settings.networks.clone(),
            image_dirs: settings.image_dirs.clone(),
            restore_from,
            incoming_memory: None,
            cgroups,
        })
    }

    /// `w`'s VM as its poller last saw it (never waits on the worker).
    fn worker_info(&self, w: &worker::WorkerVm) -> VmInfo {
        match w.cached_info() {
            Ok(i) => VmInfo {
                name: i.name,
                status: i.status,
                spec: i.spec,
                disks: i.disks,
            },
            Err(message) => {
                let last = w.last_info();
                VmInfo {
                    name: last.name,
                    status: VmStatus::Stopped {
                        reason: vmm_node::StopReason::ProcessGone { message },
                    },
                    spec: last.spec,
                    disks: Vec::new(),
                }
            }
        }
    }

    fn worker(&self, name: &str) -> Option<Arc<worker::WorkerVm>> {
        lock(&self.workers).get(name).cloned()
    }

    /// Let VMs boot kernels and initrds from `dirs` (the node's `image_dirs`).
    pub fn set_image_dirs(&self, dirs: Vec<PathBuf>) {
        *lock(&self.image_dirs) = dirs;
    }

    /// Carry outgoing live migrations with `t` (the agent: TLS with the node's
    /// certificate; plaintext only when the operator configured it).
    pub fn set_migration_transport(&self, t: vmm_node::migration::tls::Transport) {
        *lock(&self.migration_transport) = Some(t);
    }

    fn migration_transport(&self) -> Result<vmm_node::migration::tls::Transport, VmHostError> {
        lock(&self.migration_transport)
            .clone()
            .ok_or(VmHostError::NoMigrationTransport)
    }

    /// Creates the TAPs of `spec`'s NICs here (see [`nics::create_taps`]).
    pub(crate) fn create_taps(&self, spec: &VmSpec) -> Result<nics::Taps, VmHostError> {
        nics::create_taps(self.node, &self.networks, spec)
    }

    /// Deletes the TAPs of `spec`'s NICs here, once its VM stopped or left.
    pub(crate) fn delete_taps(&self, spec: &VmSpec) {
        nics::delete_taps(self.node, spec);
    }

    /// This host's console journal: the lines every VM printed here, stamped when they
    /// arrived, kept after the VM stopped or left.
    pub fn journal(&self) -> &journal::ConsoleJournal {
        &self.journal
    }

    /// Journals the console of `vm`, a copy just created on this host.
    pub(crate) fn journal_console(&self, vm: &HostedVm) {
        self.journal.follow(vm.name(), vm.vm.console().subscribe());
    }

    /// Gives up the incoming live migration of `name`, if one is in progress and has not
    /// reached its commit (the engine never resumes an abandoned VM). For a VM the cluster
    /// has just failed over to this node: its source is gone, but a source host that lost
    /// power sends no reset, and the receive would otherwise wait out its I/O timeout.
    pub fn abandon_incoming(&self, name: &str) -> bool {
        match &*lock(&self.incoming) {
            Some((n, abandon)) if n == name => {
                abandon.set();
                true
            }
            _ => false,
        }
    }

    pub(crate) fn set_incoming(&self, incoming: Option<(String, Abandon)>) {
        *lock(&self.incoming) = incoming;
    }

    /// This node's id (the node the grants must name).
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The shared volumes this host sees.
    pub fn registry(&self) -> &VolumeRegistry {
        &self.registry
    }

    pub(crate) fn reserve(&self, name: &str) -> Result<Reservation, VmHostError> {
        let mut vms = lock(&self.vms);
        if vms.contains_key(name) || self.in_worker(name) {
            return Err(VmHostError::AlreadyExists(name.to_owned()));
        }
        vms.insert(name.to_owned(), None);
        Ok(Reservation {
            vms: self.vms.clone(),
            name: name.to_owned(),
            armed: true,
        })
    }

    pub(crate) fn get(&self, name: &str) -> Result<Arc<HostedVm>, VmHostError> {
        if self.in_worker(name) {
            return Err(VmHostError::InWorker {
                vm: name.to_owned(),
            });
        }
        lock(&self.vms)
            .get(name)
            .and_then(Clone::clone)
            .ok_or_else(|| VmHostError::NotFound(name.to_owned()))
    }

    /// Removes `vm` from the table if it is still the registered one.
    pub(crate) fn unregister(&self, vm: &Arc<HostedVm>) {
        let mut vms = lock(&self.vms);
        if let Some(Some(cur)) = vms.get(vm.name()) {
            if Arc::ptr_eq(cur, vm) {
                vms.remove(vm.name());
            }
        }
    }

    /// Starts `spec` with one grant per disk (from the committed `Acquire`s). On error
    /// nothing runs and every disk opened so far is closed again; the locks are still
    /// the agent's to release.
    #[tracing::instrument(skip_all, fields(vm = %spec.name, node = self.node))]
    pub fn start(&self, spec: VmSpec, grants: &[LockGrant]) -> Result<VmInfo, VmHostError> {
        self.start_with(spec, grants, OpenMode::Start)
    }

    /// Failover restart: like [`VmHost::start`] with grants from a committed
    /// `ForceTakeover`; waits until `old_lease_deadline` before installing the new fencing
    /// token (so the old owner has stopped writing, or will be refused at its next write).
    #[tracing::instrument(skip_all, fields(vm = %spec.name, node = self.node))]
    pub fn start_after_takeover(
        &self,
        spec: VmSpec,
        grants: &[LockGrant],
        old_lease_deadline: Instant,
    ) -> Result<VmInfo, VmHostError> {
        self.start_with(spec, grants, OpenMode::Takeover { old_lease_deadline })
    }

    fn start_with(
        &self,
        spec: VmSpec,
        grants: &[LockGrant],
        mode: OpenMode,
    ) -> Result<VmInfo, VmHostError> {
        spec.validate().map_err(VmHostError::Spec)?;
        for d in &spec.disks {
            machine::check_grant(d, machine::grant_for(grants, &d.name)?, self.node)?;
        }
        spec::check_images(&spec, &lock(&self.image_dirs)).map_err(|source| {
            VmHostError::Image {
                vm: spec.name.clone(),
                source,
            }
        })?;
        let settings = lock(&self.worker_settings).clone();
        if let Some(settings) = settings {
            return self
                .start_in_worker(&settings, spec, grants, mode, None)
                .map(|(info, _)| info);
        }
        let reservation = self.reserve(&spec.name)?;
        let taps = self.create_taps(&spec)?;
        let config = spec::to_config(&spec, &self.registry, self.node)?;
        let vm = Vm::create(config).map_err(|source| VmHostError::Vm {
            vm: spec.name.clone(),
            op: "create the VM",
            source,
        })?;
        vmm_node::devices::virtio::net::install_virtio_nics(&vm).map_err(|source| {
            VmHostError::Vm {
                vm: spec.name.clone(),
                op: "create its NICs",
                source,
            }
        })?;
        let disks = spec.disks.clone();
        let hosted = HostedVm::new(spec, vm)?;
        self.journal_console(&hosted);
        for (slot, d) in disks.into_iter().enumerate() {
            let grant = machine::grant_for(grants, &d.name)?.clone();
            let handle = open_disk(&self.registry, self.node, &d, &grant, mode)?;
            hosted.attach(slot, d, grant, handle)?;
        }
        hosted.vm.start().map_err(|source| VmHostError::Vm {
            vm: hosted.spec.name.clone(),
            op: "start",
            source,
        })?;
        let hosted = Arc::new(hosted);
        reservation.commit(hosted.clone());
        taps.keep();
        tracing::info!(vm = %hosted.name(), "vm started");
        Ok(self.info_of(&hosted))
    }

    pub(crate) fn info_of(&self, vm: &HostedVm) -> VmInfo {
        VmInfo {
            name: vm.name().to_owned(),
            status: vm.vm.status(),
            spec: vm.current_spec(),
            disks: vm.disk_status(),
        }
    }

    /// Stops `name` for good: vCPUs stopped, every disk flushed and closed, the VM gone
    /// from this host. Returns the `Release` commands to propose.
    #[tracing::instrument(skip(self))]
    pub fn stop(&self, name: &str) -> Result<Stopped, VmHostError> {
        if let Some(w) = self.worker(name) {
            let out = match w.stop() {
                Ok((release, errors)) => Stopped {
                    release,
                    disk_errors: errors
                        .into_iter()
                        .map(|e| VmHostError::Worker {
                            vm: name.to_owned(),
                            source: worker::WorkerError::Refused(e),
                        })
                        .collect(),
                },
                // Gone (killed, or it fenced itself): nothing flushed, nothing to release.
                Err(source) => Stopped {
                    release: Vec::new(),
                    disk_errors: vec![VmHostError::Worker {
                        vm: name.to_owned(),
                        source,
                    }],
                },
            };
            lock(&self.workers).remove(name);
            tracing::info!(
                vm = name,
                released = out.release.len(),
                failed = out.disk_errors.len(),
                "vm worker stopped"
            );
            return Ok(out);
        }
        let vm = self.get(name)?;
        let _claim = vm.claim()?;
        if let Err(e) = vm.vm.stop() {
            tracing::error!(vm = name, error = %e, "vCPUs did not stop cleanly; closing disks anyway");
        }
        let mut out = Stopped {
            release: Vec::new(),
            disk_errors: Vec::new(),
        };
        for slot in vm.occupied_slots() {
            match vm.detach(slot, CloseFor::Stop) {
                Ok(c) => out.release.push(c),
                Err(e) => out.disk_errors.push(e),
            }
        }
        self.unregister(&vm);
        self.delete_taps(&vm.current_spec());
        tracing::info!(
            vm = name,
            released = out.release.len(),
            failed = out.disk_errors.len(),
            "vm stopped"
        );
        Ok(out)
    }

    /// Drops the workers that stopped their VMs because their lease ran out: those VMs are
    /// no longer on this host (fenced, like VMs inside the agent when its lease lapses),
    /// so the reconciler starts them again once the node holds its lease and the cluster
    /// still gives them to it.
    fn prune_self_fenced(&self) {
        let fenced: Vec<String> = {
            let mut workers = lock(&self.workers);
            let names: Vec<String> = workers
                .iter()
                .filter(|(_, w)| w.ran_out_of_lease())
                .map(|(n, _)| n.clone())
                .collect();
            for n in &names {
                workers.remove(n);
            }
            names
        };
        for n in &fenced {
            tracing::warn!(vm = %n, "the vm's worker stopped it: its lease ran out (fenced)");
        }
        if !fenced.is_empty() {
            lock(&self.self_fenced).extend(fenced);
        }
    }

    /// The VMs whose workers fenced them since the last call (for the fence report).
    pub fn take_self_fenced(&self) -> Vec<String> {
        self.prune_self_fenced();
        std::mem::take(&mut *lock(&self.self_fenced))
    }

    /// State of one VM.
    pub fn state(&self, name: &str) -> Result<VmInfo, VmHostError> {
        self.prune_self_fenced();
        if let Some(w) = self.worker(name) {
            return Ok(self.worker_info(&w));
        }
        Ok(self.info_of(&*self.get(name)?))
    }

    /// Every VM on this host, by name.
    pub fn list(&self) -> Vec<VmInfo> {
        self.prune_self_fenced();
        let vms: Vec<Arc<HostedVm>> = lock(&self.vms).values().flatten().cloned().collect();
        let workers: Vec<Arc<worker::WorkerVm>> = lock(&self.workers).values().cloned().collect();
        let mut out: Vec<VmInfo> = vms.iter().map(|v| self.info_of(v)).collect();
        out.extend(workers.iter().map(|w| self.worker_info(w)));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Cumulative CPU time and resident memory of every running VM on this host (see
    /// `vmm_node::usage`); a VM whose usage cannot be read is left out (logged).
    pub fn usage(&self) -> Vec<(String, vmm_node::usage::VmUsage)> {
        let vms: Vec<Arc<HostedVm>> = lock(&self.vms).values().flatten().cloned().collect();
        let workers: Vec<Arc<worker::WorkerVm>> = lock(&self.workers).values().cloned().collect();
        let mut out: Vec<(String, vmm_node::usage::VmUsage)> = vms
            .iter()
            .filter(|v| v.vm.status() == VmStatus::Running)
            .filter_map(|v| match v.vm.usage() {
                Ok(u) => Some((v.spec.name.clone(), u)),
                Err(e) => {
                    tracing::debug!(vm = %v.spec.name, error = %crate::error_chain(&e), "usage not read");
                    None
                }
            })
            .collect();
        // A worker measures its own threads (their schedstat is in its /proc).
        out.extend(workers.iter().filter_map(|w| match w.usage() {
            Ok(u) => u.map(|u| (w.name().to_owned(), u)),
            Err(e) => {
                tracing::debug!(vm = %w.name(), error = %crate::error_chain(&e), "usage not read from the worker");
                None
            }
        }));
        out
    }

    /// Names held for a VM that is not registered yet: being started, or arriving by
    /// live migration (the incoming copy until it runs or is dropped).
    pub fn arriving(&self) -> Vec<String> {
        lock(&self.vms)
            .iter()
            .filter(|(_, v)| v.is_none())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The console of `name`: recent log plus a bounded live line stream.
    pub fn console(&self, name: &str) -> Result<ConsoleStream, VmHostError> {
        if let Some(w) = self.worker(name) {
            let (recent, lines) = w.console().map_err(|source| VmHostError::Worker {
                vm: name.to_owned(),
                source,
            })?;
            return Ok(ConsoleStream { recent, lines });
        }
        let vm = self.get(name)?;
        let console = vm.vm.console();
        let lines = console.subscribe();
        Ok(ConsoleStream {
            recent: console.text(),
            lines,
        })
    }

    /// Hot-adds `disk` (opened with `grant`) to the running VM `name`, in the first free
    /// slot, which is returned.
    #[tracing::instrument(skip(self, grant))]
    pub fn attach_disk(
        &self,
        name: &str,
        disk: DiskSpec,
        grant: &LockGrant,
    ) -> Result<u8, VmHostError> {
        if let Some(w) = self.worker(name) {
            return w
                .attach_disk(disk, grant)
                .map_err(|source| VmHostError::Worker {
                    vm: name.to_owned(),
                    source,
                });
        }
        let vm = self.get(name)?;
        let _claim = vm.claim()?;
        self.require_running(&vm)?;
        let slot = vm.free_slot()?;
        if vm.slot_of(&disk.name).is_ok() {
            return Err(VmHostError::DiskAlreadyAttached {
                vm: name.to_owned(),
                disk: disk.name.to_string(),
            });
        }
        let handle = open_disk(&self.registry, self.node, &disk, grant, OpenMode::Start)?;
        vm.attach(slot, disk, grant.clone(), handle)?;
        Ok(slot as u8)
    }

    /// Hot-removes `disk` from the running VM `name`: the slot flushes it and the guest
    /// loses it; returns the `Release` command to propose.
    #[tracing::instrument(skip(self))]
    pub fn detach_disk(&self, name: &str, disk: &DiskName) -> Result<LockCommand, VmHostError> {
        if let Some(w) = self.worker(name) {
            return w.detach_disk(disk).map_err(|source| VmHostError::Worker {
                vm: name.to_owned(),
                source,
            });
        }
        let vm = self.get(name)?;
        let _claim = vm.claim()?;
        let slot = vm.slot_of(disk)?;
        vm.detach(slot, CloseFor::Stop)
    }

    /// Hot-adds `nic` (MAC and slot fixed by the committed record) to the running VM
    /// `name`: its TAP is created on the network's bridge here, then the NIC is put into
    /// its slot (the guest gets a configuration-change interrupt). Returns the slot.
    #[tracing::instrument(skip(self))]
    pub fn attach_nic(&self, name: &str, nic: NicSpec) -> Result<u8, VmHostError> {
        if let Some(w) = self.worker(name) {
            return w.attach_nic(nic).map_err(|source| VmHostError::Worker {
                vm: name.to_owned(),
                source,
            });
        }
        let vm = self.get(name)?;
        let _claim = vm.claim()?;
        self.require_running(&vm)?;
        // Already in: done (a caller acting on a stale view — e.g. the reconciler reading a
        // worker's cached state — must not recreate the TAP the NIC has open).
        if let Some(slot) = lock(&vm.nics)
            .iter()
            .find(|n| n.mac == nic.mac)
            .and_then(|n| n.slot)
        {
            return Ok(slot);
        }
        let taps = nics::create_tap(self.node, &self.networks, name, &nic)?;
        let cfg = vmm_node::config::NicConfig {
            slot: nic.slot,
            mtu: nic.mtu(),
            ..vmm_node::config::NicConfig::new(nic_tap_name(self.node, &nic.mac), nic.mac.clone())
        };
        let slot = vm.vm.attach_nic(&cfg).map_err(|source| VmHostError::Vm {
            vm: name.to_owned(),
            op: "hot-add a NIC",
            source,
        })?;
        taps.keep();
        lock(&vm.nics).push(NicSpec {
            slot: Some(slot),
            ..nic
        });
        Ok(slot)
    }

    /// Hot-removes the NIC with `mac` from the VM `name` and deletes its TAP here.
    #[tracing::instrument(skip(self))]
    pub fn detach_nic(&self, name: &str, mac: &str) -> Result<(), VmHostError> {
        if let Some(w) = self.worker(name) {
            return w.detach_nic(mac).map_err(|source| VmHostError::Worker {
                vm: name.to_owned(),
                source,
            });
        }
        let vm = self.get(name)?;
        let _claim = vm.claim()?;
        vm.vm.detach_nic(mac).map_err(|source| VmHostError::Vm {
            vm: name.to_owned(),
            op: "hot-remove a NIC",
            source,
        })?;
        lock(&vm.nics).retain(|n| n.mac != mac);
        nics::delete_tap(self.node, mac);
        Ok(())
    }

    pub(crate) fn require_running(&self, vm: &HostedVm) -> Result<(), VmHostError> {
        match vm.vm.status() {
            VmStatus::Running => Ok(()),
            s => Err(VmHostError::NotRunning {
                vm: vm.name().to_owned(),
                status: s.to_string(),
            }),
        }
    }

    /// Stops every VM on this host at once, without flushing or releasing anything: used
    /// when this node has lost the quorum lease and may no longer touch shared disks.
    /// Returns the names of the VMs stopped.
    pub fn fence_all(&self) -> Vec<String> {
        let vms: Vec<Arc<HostedVm>> = {
            let mut map = lock(&self.vms);
            let vms = map.values().flatten().cloned().collect();
            map.retain(|_, v| v.is_none());
            vms
        };
        let workers: Vec<Arc<worker::WorkerVm>> = std::mem::take(&mut *lock(&self.workers))
            .into_values()
            .collect();
        let mut names = Vec::with_capacity(vms.len() + workers.len());
        for vm in vms {
            if let Err(e) = vm.vm.stop() {
                tracing::error!(vm = %vm.name(), error = %e, "vCPUs did not stop while fencing");
            }
            tracing::warn!(vm = %vm.name(), "vm stopped by fencing");
            names.push(vm.name().to_owned());
        }
        for w in workers {
            // A worker that does not answer stops its VM itself when its lease runs out.
            if let Err(e) = w.fence() {
                tracing::error!(vm = %w.name(), error = %crate::error_chain(&e), "cannot reach the worker to fence it; it stops at its lease deadline");
            }
            tracing::warn!(vm = %w.name(), "vm (worker) stopped by fencing");
            names.push(w.name().to_owned());
        }
        names
    }
}
