//! VM worker processes: each VM in a process of its own, so the VM outlives its agent.
//!
//! With `vm_workers` on, [`VmHost`](crate::vmhost::VmHost) starts a VM by spawning
//! `cluster-agent vm-worker --dir <worker_dir>/<vm>` (a child in its own process group:
//! a signal to the agent's group does not reach it) instead of running it in the agent.
//! The worker runs the VM with the same embedded VMM ([`process`]); the agent talks to it
//! over a versioned control socket ([`protocol`]) through a [`WorkerVm`].
//!
//! ```text
//! agent: VmHost ── start ──▶ spawn worker ── stdout: Started ──▶ WorkerVm (control socket)
//!        fence loop ── grant(until) every RENEW_EVERY while the node holds its lease
//!        one poller thread per worker ── Lease{until_ns}, Info (cached for VmHost::list)
//!        restart ──▶ adopt(): every <worker_dir>/<vm>/sock that answers Hello
//! worker: VM + watchdog (lease deadline passed: stop the VM, exit) + control socket
//! ```
//!
//! The lease: a worker's deadline is the agent's own lease end plus [`WORKER_GRACE_PART`]
//! of `down_after`. The cluster marks a node Down only after a quorum-intersecting set
//! did not hear it for `down_after` counted from a heartbeat at or after the one that
//! gave the lease (which lasts `down_after / 2`), and fails its VMs over only
//! `FAILOVER_GRACE` later: a worker whose agent died stops its VM at least `down_after /
//! 4 + FAILOVER_GRACE` before another node may start it.

pub mod cgroup;
pub mod process;
pub mod protocol;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use csv_volume::{LockCommand, VolumeConfig};
use protocol::{read_frame, write_frame, Request, Response, StartFile, StartReport, WorkerInfo};

/// How often the agent renews its workers' leases.
pub const RENEW_EVERY: Duration = Duration::from_millis(100);

/// A worker may run its VM this share of `down_after` past the agent's lease (a quarter).
pub const WORKER_GRACE_PART: u32 = 4;

/// How long a worker may take to start its VM and report.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Deadline for a request that does real work (a stop flushes every disk first, a
/// quick save writes guest memory, a hot-plug opens or flushes a disk).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Deadline for a request a healthy worker answers at once (info, lease, usage): a
/// frozen worker must not hold the agent's reconciler or fence loop for long.
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(2);

/// Deadline for a fence request: a worker that does not answer in time stops its VM at
/// its lease deadline anyway.
pub const FENCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Console lines buffered for a slow reader (older lines are dropped, like vmm-node's).
const CONSOLE_LINES_MAX: usize = 1024;

/// How this node runs workers.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The agent's own executable (the worker is its `vm-worker` subcommand).
    pub exe: PathBuf,
    /// One directory per VM below this (0700).
    pub dir: PathBuf,
    /// `down_after` of the cluster: the workers' grace past the agent's lease is a part of it.
    pub down_after: Duration,
    pub volumes: Vec<VolumeConfig>,
    pub networks: std::collections::BTreeMap<String, String>,
    pub image_dirs: Vec<PathBuf>,
    /// The node's TLS credentials, handed to a worker for its outgoing live migration
    /// (`None`: migrations are plaintext, as the operator configured).
    pub migration_tls: Option<TlsSource>,
    /// The agent's log format: its workers write `worker.log` the same way.
    pub log_format: crate::logging::LogFormat,
    /// Where each worker gets a cgroup with its VM's limits (`None`: no cgroups, as on a
    /// host whose cgroup tree the agent cannot write).
    pub cgroups: Option<cgroup::Tree>,
}

/// Where a worker's outgoing live migration gets the node's TLS material: asked at each
/// migration, so a renewed certificate is used from the next one.
#[derive(Clone)]
pub struct TlsSource(pub std::sync::Arc<dyn Fn() -> protocol::TlsPem + Send + Sync>);

impl std::fmt::Debug for TlsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsSource { .. }")
    }
}

/// How a live migration run by a worker ended without success.
#[derive(Debug, Clone)]
pub struct MigrationFailure {
    /// `None`: the control channel broke (the worker may be gone).
    pub kind: Option<protocol::FailureKind>,
    pub message: String,
}

/// The engine's phase names, as static strings again after the wire.
fn phase_name(s: &str) -> &'static str {
    const PHASES: &[&str] = &[
        "setup",
        "pre-copy",
        "stop-and-copy",
        "storage-handoff",
        "switchover",
        "done",
    ];
    PHASES
        .iter()
        .copied()
        .find(|p| *p == s)
        .unwrap_or("running")
}

/// Errors talking to a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot prepare the worker directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot write the worker's start file")]
    StartFile(#[source] serde_json::Error),
    #[error("cannot spawn the worker process {0}")]
    Spawn(PathBuf, #[source] std::io::Error),
    #[error("the worker did not report within {0:?}")]
    StartTimeout(Duration),
    #[error("the worker exited without reporting (see {0})")]
    NoReport(PathBuf),
    #[error("the worker could not start the VM: {0}")]
    Start(String),
    #[error("cannot connect to the worker's control socket in {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("worker control channel")]
    Frame(#[source] protocol::FrameError),
    #[error("the worker refused: {0}")]
    Refused(String),
    #[error("unexpected answer from the worker: {0}")]
    Unexpected(String),
    #[error("this node's lease is not held: no VM may start")]
    NoLease,
}

impl WorkerError {
    /// The worker did not answer in time (busy or frozen, not known to be gone).
    pub fn is_timeout(&self) -> bool {
        matches!(self, WorkerError::Frame(protocol::FrameError::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }
}

struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

/// The agent's handle on one worker.
pub struct WorkerVm {
    name: String,
    dir: PathBuf,
    pid: u32,
    conn: Mutex<Option<Conn>>,
    /// The spec as of the last answer (what to report when the worker is gone).
    last: Mutex<WorkerInfo>,
    /// Set when the worker restored its VM from a quick-migration image.
    restored: Option<crate::vmhost::QuickRestoreStats>,
    /// Why the worker cannot be reached any more (its process is gone), once seen.
    gone: Mutex<Option<String>>,
    /// The latest lease end granted (`CLOCK_MONOTONIC` ns); the lease thread delivers it.
    granted_ns: std::sync::atomic::AtomicU64,
    /// Wakes the lease thread when a grant raised `granted_ns`.
    granted: (Mutex<()>, std::sync::Condvar),
    /// The lease thread's own connection: a renewal never queues behind another request
    /// (a hot-plug may hold the shared connection for a minute, a busy worker's `Info`
    /// for two seconds — either longer than the worker's grace).
    lease_conn: Mutex<Option<Conn>>,
}

/// The file a worker leaves in its directory when it stopped its VM because its lease ran
/// out: the VM was fenced (the agent starts it again once it holds its lease, as after an
/// in-process fence), not failed.
pub const LEASE_RAN_OUT: &str = "lease-ran-out";

/// How often a worker's state is refreshed for [`WorkerVm::cached_info`].
pub const POLL_EVERY: Duration = Duration::from_millis(100);

/// How long a worker that stopped answering is given to exit before it is called gone.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Waits until process `pid` has exited (no `/proc/<pid>`, or a zombie), at most `within`;
/// whether it did.
fn wait_exited(pid: u32, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let exited = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // The state is the first field after the command's closing parenthesis.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        };
        if exited {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pause before the next try after `failures` failed lease renewals in a row: 5 ms
/// doubling to at most 80 ms (well inside a worker's lease grace).
fn renew_retry_after(failures: u32) -> Duration {
    Duration::from_millis(5u64 << failures.saturating_sub(1).min(4))
}

/// `valid` from now as an absolute time on the host's monotonic clock.
pub fn until_ns(valid: Duration) -> u64 {
    vmm_node::kvm::monotonic_ns()
        .saturating_add(u64::try_from(valid.as_nanos()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn connect(dir: &Path) -> Result<(Conn, u32, WorkerInfo), WorkerError> {
    connect_with(dir, REQUEST_TIMEOUT)
}

fn connect_with(dir: &Path, timeout: Duration) -> Result<(Conn, u32, WorkerInfo), WorkerError> {
    let d = File::open(dir).map_err(|e| WorkerError::Connect(dir.to_owned(), e))?;
    let s = UnixStream::connect(process::short_path(&d, "sock"))
        .map_err(|e| WorkerError::Connect(dir.to_owned(), e))?;
    let w = s
        .try_clone()
        .map_err(|e| WorkerError::Connect(dir.to_owned(), e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| WorkerError::Connect(dir.to_owned(), e))?;
    let mut c = Conn {
        r: BufReader::new(s),
        w,
    };
    match call(
        &mut c,
        &Request::Hello {
            version: protocol::VERSION,
        },
    )? {
        Response::Hello { pid, info, .. } => Ok((c, pid, info)),
        other => Err(unexpected(other)),
    }
}

fn call(c: &mut Conn, req: &Request) -> Result<Response, WorkerError> {
    write_frame(&mut c.w, req).map_err(WorkerError::Frame)?;
    match read_frame(&mut c.r).map_err(WorkerError::Frame)? {
        Response::Error { message } => Err(WorkerError::Refused(message)),
        r => Ok(r),
    }
}

fn unexpected(r: Response) -> WorkerError {
    match r {
        Response::Error { message } => WorkerError::Refused(message),
        other => WorkerError::Unexpected(format!("{other:?}")),
    }
}

impl WorkerVm {
    /// Spawns the worker of `start.spec` in `settings.dir/<name>` and waits until it runs
    /// the VM (or says why it cannot).
    pub fn spawn(settings: &Settings, start: &StartFile) -> Result<WorkerVm, WorkerError> {
        let name = &start.spec.name;
        let dir = settings.dir.join(name);
        let dir_err = |e| WorkerError::Dir(dir.clone(), e);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(dir_err)?;
        let _ = std::fs::remove_file(dir.join("sock"));
        let _ = std::fs::remove_file(dir.join(LEASE_RAN_OUT));
        let tmp = dir.join("start.json.tmp");
        let bytes = serde_json::to_vec_pretty(start).map_err(WorkerError::StartFile)?;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
            .map_err(dir_err)?;
        std::fs::rename(&tmp, dir.join("start.json")).map_err(dir_err)?;
        let log_path = dir.join("worker.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(dir_err)?;
        let mut child = Command::new(&settings.exe)
            .arg("--log-format")
            .arg(settings.log_format.as_str())
            .arg("vm-worker")
            // systemd's notification socket and watchdog are the agent's alone.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| WorkerError::Spawn(settings.exe.clone(), e))?;
        let stdout = child.stdout.take();
        // Reap the worker whenever it exits (it is this process's child until the agent
        // itself exits; an adopted worker is not).
        let cgroups = settings.cgroups.clone();
        let vm = name.clone();
        let _ = std::thread::Builder::new()
            .name(format!("reap-{name}"))
            .spawn(move || {
                let status = child.wait();
                tracing::info!(?status, "vm worker exited");
                if let Some(t) = cgroups {
                    t.remove(&vm);
                }
            });
        let (tx, rx) = sync_channel(1);
        if let Some(out) = stdout {
            let _ = std::thread::Builder::new()
                .name(format!("report-{name}"))
                .spawn(move || {
                    let mut r = BufReader::new(out);
                    let _ = tx.send(read_frame::<StartReport>(&mut r));
                });
        }
        let report = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(WorkerError::NoReport(log_path))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(WorkerError::StartTimeout(START_TIMEOUT))
            }
        };
        let restored = match report {
            StartReport::Started { restored, .. } => restored,
            StartReport::Failed { message } => return Err(WorkerError::Start(message)),
        };
        let mut w = Self::attach(&dir)?;
        w.restored = restored;
        Ok(w)
    }

    /// Connects to the running worker in `dir` (a start, or an agent adopting it).
    pub fn attach(dir: &Path) -> Result<WorkerVm, WorkerError> {
        let (c, pid, info) = connect(dir)?;
        Ok(WorkerVm {
            name: info.name.clone(),
            dir: dir.to_owned(),
            pid,
            conn: Mutex::new(Some(c)),
            last: Mutex::new(info),
            restored: None,
            gone: Mutex::new(None),
            granted_ns: std::sync::atomic::AtomicU64::new(0),
            granted: (Mutex::new(()), std::sync::Condvar::new()),
            lease_conn: Mutex::new(None),
        })
    }

    /// Lets the VM run until `until_ns` (never less than granted before). Returns at
    /// once: this worker's poller delivers it, so a worker that does not answer delays
    /// no other.
    pub fn grant(&self, until_ns: u64) {
        let before = self
            .granted_ns
            .fetch_max(until_ns, std::sync::atomic::Ordering::AcqRel);
        if until_ns > before {
            let _g = lock(&self.granted.0);
            self.granted.1.notify_one();
        }
    }

    /// Keeps [`WorkerVm::cached_info`] fresh on a thread of its own, and delivers each
    /// grant at once on another with a connection of its own (until the handle is dropped
    /// or the worker is gone), so the agent's own loops never wait on a worker and a
    /// renewal never waits on anything else.
    pub fn start_polling(self: &std::sync::Arc<Self>) {
        let weak = std::sync::Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("lease-{}", self.name))
            .spawn(move || {
                let mut sent = 0;
                // Failed renewals in a row: retried after a growing pause (a worker that
                // is gone or busy is not hammered), reported once per streak.
                let mut failures = 0u32;
                loop {
                    let Some(w) = weak.upgrade() else { return };
                    if lock(&w.gone).is_some() {
                        return;
                    }
                    let granted = w.granted_ns.load(std::sync::atomic::Ordering::Acquire);
                    if granted > sent {
                        match w.renew(granted) {
                            Ok(()) => {
                                sent = granted;
                                failures = 0;
                            }
                            Err(e) => {
                                if failures == 0 {
                                    tracing::warn!(vm = %w.name, error = %crate::error_chain(&e), "cannot renew the worker's lease; retrying");
                                }
                                failures = failures.saturating_add(1);
                                let g = lock(&w.granted.0);
                                let _ = w.granted.1.wait_timeout(g, renew_retry_after(failures));
                                continue;
                            }
                        }
                    }
                    let g = lock(&w.granted.0);
                    if w.granted_ns.load(std::sync::atomic::Ordering::Acquire) <= sent {
                        // Woken by the next grant; the timeout notices a dropped handle.
                        let _ = w.granted.1.wait_timeout(g, POLL_EVERY);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(vm = %self.name, error = %e, "cannot start the worker's lease thread");
        }
        let weak = std::sync::Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name(format!("poll-{}", self.name))
            .spawn(move || loop {
                std::thread::sleep(POLL_EVERY);
                let Some(w) = weak.upgrade() else { return };
                match w.info() {
                    Ok(_) => {}
                    // Busy or stopped for a moment: not known to be gone.
                    Err(e) if e.is_timeout() => {}
                    Err(e) => {
                        // A worker that stops answering is usually on its way out. One
                        // whose lease ran out answers errors while it stops its VM and
                        // leaves its `LEASE_RAN_OUT` mark only after that, just before it
                        // exits: called gone before the mark is there, its fenced VM
                        // would read as failed. So wait (bounded) for it to exit first.
                        wait_exited(w.pid, EXIT_WAIT);
                        *lock(&w.gone) = Some(format!(
                            "its worker process (pid {}) does not answer: {}",
                            w.pid,
                            crate::error_chain(&e)
                        ));
                        return;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(vm = %self.name, error = %e, "cannot start the worker's poller");
        }
    }

    /// The VM as last seen (refreshed every [`POLL_EVERY`]), or why its worker is gone.
    /// Never waits on the worker.
    pub fn cached_info(&self) -> Result<WorkerInfo, String> {
        match lock(&self.gone).clone() {
            Some(why) => Err(why),
            None => Ok(lock(&self.last).clone()),
        }
    }

    /// The worker is gone after stopping its VM because its lease ran out
    /// ([`LEASE_RAN_OUT`]).
    pub fn ran_out_of_lease(&self) -> bool {
        lock(&self.gone).is_some() && self.dir.join(LEASE_RAN_OUT).exists()
    }

    /// The restore's figures, when the worker restored its VM from a quick-migration image.
    pub fn restored(&self) -> Option<crate::vmhost::QuickRestoreStats> {
        self.restored
    }

    /// The VM's cumulative usage, measured by the worker (`None`: not measurable).
    pub fn usage(&self) -> Result<Option<vmm_node::usage::VmUsage>, WorkerError> {
        match self.request(&Request::Usage)? {
            Response::Usage { usage } => Ok(usage),
            other => Err(unexpected(other)),
        }
    }

    /// Hot-adds `disk` with `grant`; the slot it went into.
    pub fn attach_disk(
        &self,
        disk: crate::vmhost::DiskSpec,
        grant: &csv_volume::LockGrant,
    ) -> Result<u8, WorkerError> {
        match self.hot_plug(&Request::AttachDisk {
            disk,
            grant: grant.clone(),
        })? {
            Response::Attached { slot } => Ok(slot),
            other => Err(unexpected(other)),
        }
    }

    /// A hot-plug request, then a refresh of the cached view (`VmHost::list`, which the
    /// reconciler plans from), so it shows the change at once, not at the next poll: a
    /// reconciler pass within the poll period would otherwise plan the same hot-add again
    /// from the stale view.
    fn hot_plug(&self, req: &Request) -> Result<Response, WorkerError> {
        let r = self.request(req);
        if let Err(e) = self.info() {
            tracing::debug!(vm = %self.name, error = %crate::error_chain(&e), "worker state not refreshed after a hot-plug change");
        }
        r
    }

    /// Hot-removes `disk`; the `Release` to commit once it is flushed and closed.
    pub fn detach_disk(&self, disk: &csv_volume::DiskName) -> Result<LockCommand, WorkerError> {
        match self.hot_plug(&Request::DetachDisk { disk: disk.clone() })? {
            Response::Detached { release } => Ok(release),
            other => Err(unexpected(other)),
        }
    }

    /// Hot-adds `nic`; the slot it went into.
    pub fn attach_nic(&self, nic: crate::vmhost::spec::NicSpec) -> Result<u8, WorkerError> {
        match self.hot_plug(&Request::AttachNic { nic })? {
            Response::Attached { slot } => Ok(slot),
            other => Err(unexpected(other)),
        }
    }

    /// Hot-removes the NIC with `mac` (its TAP is deleted).
    pub fn detach_nic(&self, mac: &str) -> Result<(), WorkerError> {
        match self.hot_plug(&Request::DetachNic {
            mac: mac.to_owned(),
        })? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Quick migration, source half: the worker saves its VM into `volume` for
    /// `target_node` and exits.
    pub fn quick_save(
        &self,
        volume: &str,
        target_node: csv_volume::NodeId,
    ) -> Result<crate::vmhost::QuickImage, WorkerError> {
        match self.request(&Request::QuickSave {
            volume: volume.to_owned(),
            target_node,
        })? {
            Response::QuickSaved { image } => Ok(image),
            other => Err(unexpected(other)),
        }
    }

    /// A connection of its own for the live migration into this (incoming) worker, opened
    /// before the blackout so restore and resume wait on nothing else.
    pub fn incoming_session(&self) -> Result<IncomingSession, WorkerError> {
        let (c, _, _) = connect_with(&self.dir, REQUEST_TIMEOUT)?;
        Ok(IncomingSession {
            conn: Mutex::new(c),
        })
    }

    /// Live migration out, run by the worker on a connection of its own: relays the lock
    /// commits it asks for to `locks`, its progress to `on_event`, and `cancel` to it.
    /// On success the worker has stopped its copy and exits; returns the engine's
    /// figures and the lock commands committed.
    #[allow(clippy::too_many_arguments)]
    pub fn migrate_out(
        &self,
        target_node: csv_volume::NodeId,
        target_addr: std::net::SocketAddr,
        options: crate::vmhost::LiveOptions,
        tls: Option<protocol::TlsPem>,
        locks: &dyn crate::vmhost::DiskLocks,
        cancel: &vmm_node::migration::source::CancelToken,
        on_event: &mut dyn FnMut(vmm_node::migration::source::MigrationEvent),
    ) -> Result<(vmm_node::migration::stats::MigrationStats, Vec<LockCommand>), MigrationFailure>
    {
        use vmm_node::migration::source::MigrationEvent;
        let broken = |e: WorkerError| MigrationFailure {
            kind: None,
            message: format!(
                "the worker's migration channel broke: {}",
                crate::error_chain(&e)
            ),
        };
        let (mut c, _, _) = connect_with(&self.dir, QUICK_TIMEOUT).map_err(broken)?;
        // Rounds can be long and a lock commit waits for Raft: no deadline per frame; a
        // worker that dies closes the socket.
        c.r.get_ref()
            .set_read_timeout(None)
            .map_err(|e| broken(WorkerError::Connect(self.dir.clone(), e)))?;
        write_frame(
            &mut c.w,
            &Request::MigrateOut {
                target_node,
                target_addr,
                options,
                tls,
            },
        )
        .map_err(|e| broken(WorkerError::Frame(e)))?;
        // A cancel is sent on a connection of its own while this one waits for frames.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (done, cancel, dir, name) = (
                done.clone(),
                cancel.clone(),
                self.dir.clone(),
                self.name.clone(),
            );
            std::thread::Builder::new()
                .name(format!("cancel-{name}"))
                .spawn(move || {
                    while !done.load(std::sync::atomic::Ordering::Acquire) {
                        if cancel.is_cancelled() {
                            let r = connect_with(&dir, QUICK_TIMEOUT)
                                .and_then(|(mut c, _, _)| call(&mut c, &Request::CancelMigration));
                            if let Err(e) = r {
                                tracing::warn!(vm = %name, error = %crate::error_chain(&e), "cannot pass a cancel to the worker");
                            }
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
                .ok()
        };
        let vm = self.name.clone();
        // Once the engine entered the switchover the target may run the VM: a channel
        // lost after that is a lost `Running` reply, not a rollback.
        let mut past_switchover = false;
        let result = loop {
            let frame = match read_frame::<Response>(&mut c.r) {
                Ok(f) => f,
                Err(e) => {
                    let mut f = broken(WorkerError::Frame(e));
                    if past_switchover {
                        f.kind = Some(protocol::FailureKind::CommitUncertain);
                    }
                    break Err(f);
                }
            };
            let reply = match frame {
                Response::Event { event } => {
                    past_switchover |=
                        matches!(&event, protocol::WireEvent::Phase(p) if p == "switchover");
                    on_event(match event {
                        protocol::WireEvent::Phase(p) => MigrationEvent::Phase(phase_name(&p)),
                        protocol::WireEvent::Prediction(p) => MigrationEvent::Prediction(p),
                        protocol::WireEvent::Progress(p) => MigrationEvent::Progress(p),
                        protocol::WireEvent::Throttle(t) => MigrationEvent::Throttle(t),
                    });
                    continue;
                }
                Response::LockCommit { cmds } => locks
                    .commit(&vm, &cmds)
                    .map(|()| Vec::new())
                    .map_err(|e| e.to_string()),
                Response::LockReclaim { node, disks } => {
                    locks.reclaim(&vm, node, &disks).map_err(|e| e.to_string())
                }
                Response::Migrated { stats, handed_off } => break Ok((*stats, handed_off)),
                Response::MigrationFailed { kind, message } => {
                    break Err(MigrationFailure {
                        kind: Some(kind),
                        message,
                    })
                }
                other => break Err(broken(unexpected(other))),
            };
            if let Err(e) = write_frame(&mut c.w, &Request::LockResult { result: reply }) {
                break Err(broken(WorkerError::Frame(e)));
            }
        };
        done.store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = watcher {
            let _ = w.join();
        }
        result
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// One request on the shared connection (reconnecting if it broke), answered within
    /// its deadline ([`QUICK_TIMEOUT`] or [`REQUEST_TIMEOUT`]). A request that timed out
    /// drops the connection: a late answer must not be read as the next one's.
    fn request(&self, req: &Request) -> Result<Response, WorkerError> {
        self.request_on(&self.conn, req)
    }

    /// [`WorkerVm::request`] on connection `conn`.
    fn request_on(
        &self,
        conn: &Mutex<Option<Conn>>,
        req: &Request,
    ) -> Result<Response, WorkerError> {
        let timeout = match req {
            Request::Info | Request::Lease { .. } | Request::Usage | Request::Hello { .. } => {
                QUICK_TIMEOUT
            }
            _ => REQUEST_TIMEOUT,
        };
        let mut g = lock(conn);
        if g.is_none() {
            *g = Some(connect_with(&self.dir, QUICK_TIMEOUT)?.0);
        }
        let Some(c) = g.as_mut() else {
            return Err(WorkerError::Unexpected("no control connection".into()));
        };
        if let Err(e) = c.r.get_ref().set_read_timeout(Some(timeout)) {
            *g = None;
            return Err(WorkerError::Connect(self.dir.clone(), e));
        }
        let r = call(c, req);
        if matches!(r, Err(WorkerError::Frame(_))) {
            *g = None;
        }
        r
    }

    /// The VM now (see [`WorkerVm::last_info`] when the worker does not answer).
    pub fn info(&self) -> Result<WorkerInfo, WorkerError> {
        match self.request(&Request::Info)? {
            Response::Info { info } => {
                *lock(&self.last) = info.clone();
                Ok(info)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The VM as the worker last described it.
    pub fn last_info(&self) -> WorkerInfo {
        lock(&self.last).clone()
    }

    /// Lets the VM run until `until_ns` (see [`until_ns`]).
    pub fn renew(&self, until_ns: u64) -> Result<(), WorkerError> {
        match self.request_on(&self.lease_conn, &Request::Lease { until_ns })? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Stops the VM for good (disks flushed and closed); the worker exits.
    pub fn stop(&self) -> Result<(Vec<LockCommand>, Vec<String>), WorkerError> {
        match self.request(&Request::Stop)? {
            Response::Stopped {
                release,
                disk_errors,
            } => Ok((release, disk_errors)),
            other => Err(unexpected(other)),
        }
    }

    /// Stops the VM at once without flushing or releasing anything; the worker exits.
    pub fn fence(&self) -> Result<(), WorkerError> {
        let (mut c, _, _) = connect_with(&self.dir, FENCE_TIMEOUT)?;
        match call(&mut c, &Request::Fence)? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The console: the retained log and a bounded stream of live lines (on a connection
    /// of its own; ends when the VM or the worker is gone).
    pub fn console(&self) -> Result<(String, Receiver<String>), WorkerError> {
        self.console_with(|line, _| line)
    }

    /// [`WorkerVm::console`] with each line's stamp (µs since the epoch, taken by the
    /// worker when the VM printed it).
    pub fn console_stamped(&self) -> Result<(String, Receiver<(String, u64)>), WorkerError> {
        self.console_with(|line, at| (line, at))
    }

    fn console_with<T: Send + 'static>(
        &self,
        map: fn(String, u64) -> T,
    ) -> Result<(String, Receiver<T>), WorkerError> {
        let (mut c, _, _) = connect_with(&self.dir, QUICK_TIMEOUT)?;
        let recent = match call(&mut c, &Request::Console)? {
            Response::Console { recent } => recent,
            other => return Err(unexpected(other)),
        };
        // Lines come when the guest prints them: no deadline from here on.
        c.r.get_ref()
            .set_read_timeout(None)
            .map_err(|e| WorkerError::Connect(self.dir.clone(), e))?;
        let (tx, rx) = sync_channel(CONSOLE_LINES_MAX);
        let _ = std::thread::Builder::new()
            .name(format!("console-{}", self.name))
            .spawn(move || {
                let mut r = c.r;
                while let Ok(Response::Line { line, at_unix_us }) = read_frame::<Response>(&mut r) {
                    match tx.try_send(map(line, at_unix_us)) {
                        Ok(()) | Err(std::sync::mpsc::TrySendError::Full(_)) => {}
                        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
                    }
                }
            });
        Ok((recent, rx))
    }
}

/// The agent's connection to a worker receiving a live migration.
pub struct IncomingSession {
    conn: Mutex<Conn>,
}

impl IncomingSession {
    /// Restores the source's saved `state` into the paused incoming VM, disks of
    /// `layout` opened with `grants`. The state travels as raw bytes after the request.
    pub fn restore(
        &self,
        state: &[u8],
        layout: &[crate::vmhost::SlotDisk],
        grants: &[csv_volume::LockGrant],
    ) -> Result<(), WorkerError> {
        let mut c = lock(&self.conn);
        write_frame(
            &mut c.w,
            &Request::Restore {
                state_len: state.len() as u64,
                layout: layout.to_vec(),
                grants: grants.to_vec(),
            },
        )
        .map_err(WorkerError::Frame)?;
        std::io::Write::write_all(&mut c.w, state)
            .map_err(|e| WorkerError::Frame(protocol::FrameError::Io(e)))?;
        match read_frame(&mut c.r).map_err(WorkerError::Frame)? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The paused source's state arrived: the worker announces the incoming VM's NICs
    /// (see [`Request::AnnounceNics`]).
    pub fn announce_nics(&self) -> Result<(), WorkerError> {
        match call(&mut lock(&self.conn), &Request::AnnounceNics)? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The restored VM runs.
    pub fn resume(&self) -> Result<(), WorkerError> {
        match call(&mut lock(&self.conn), &Request::Resume)? {
            Response::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The migration failed: the worker closes the disks it opened for `to` and exits;
    /// the lock commands to commit.
    pub fn release(&self, to: csv_volume::NodeId) -> Result<Vec<LockCommand>, WorkerError> {
        match call(&mut lock(&self.conn), &Request::ReleaseIncoming { to })? {
            Response::Released { cmds } => Ok(cmds),
            other => Err(unexpected(other)),
        }
    }
}

/// The worker directories below `dir` whose worker answers, and those that do not (a
/// worker that exited; its directory can go).
pub fn find(dir: &Path) -> (Vec<WorkerVm>, Vec<(PathBuf, WorkerError)>) {
    let mut alive = Vec::new();
    let mut dead = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (alive, dead);
    };
    let dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    // All at once: on a host busy with its guests each worker may take a while to answer.
    let answers: Vec<(PathBuf, Result<WorkerVm, WorkerError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = dirs
            .iter()
            .map(|path| (path, s.spawn(move || WorkerVm::attach(path))))
            .collect();
        handles
            .into_iter()
            .map(|(path, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(WorkerError::Unexpected("the attach thread panicked".into()))
                });
                (path.clone(), r)
            })
            .collect()
    });
    for (path, r) in answers {
        match r {
            Ok(w) if path.file_name().is_some_and(|n| *n == *w.name()) => alive.push(w),
            Ok(w) => dead.push((
                path,
                WorkerError::Unexpected(format!("the worker runs VM {:?}", w.name())),
            )),
            Err(err) => dead.push((path, err)),
        }
    }
    (alive, dead)
}

/// The last `lines` lines of a worker's log (for error messages).
pub fn log_tail(dir: &Path, lines: usize) -> String {
    let Ok(f) = File::open(dir.join("worker.log")) else {
        return String::new();
    };
    let all: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exited_process_is_seen_exited_and_a_live_one_is_not() {
        assert!(!wait_exited(std::process::id(), Duration::from_millis(20)));
        let mut child = std::process::Command::new("true")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        let pid = child.id();
        // A zombie (not reaped yet) counts as exited, and so does a reaped one.
        assert!(wait_exited(pid, Duration::from_secs(60)));
        let _ = child.wait();
        assert!(wait_exited(pid, Duration::from_millis(20)));
    }

    #[test]
    fn failed_renewals_back_off_to_a_bound_inside_the_lease_grace() {
        let waits: Vec<u64> = (1..=8)
            .map(|f| renew_retry_after(f).as_millis() as u64)
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 80, 80, 80]);
        assert_eq!(renew_retry_after(u32::MAX), Duration::from_millis(80));
    }
}
