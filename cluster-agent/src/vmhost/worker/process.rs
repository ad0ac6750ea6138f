//! The worker's side: `cluster-agent vm-worker --dir DIR` runs one VM in its own process.
//!
//! It reads `DIR/start.json`, starts the VM with the embedded VMM (a one-VM [`VmHost`], so
//! disks, NICs and the console behave exactly as in the agent), binds `DIR/sock`, reports
//! on stdout and then serves the agent's requests (see [`super::protocol`]) until the VM is
//! stopped or fenced. A watchdog thread stops the VM, without flushing or releasing
//! anything, the moment the lease deadline the agent keeps renewing passes: a dead or
//! frozen agent cannot keep a VM running past the bound the cluster assumes before it
//! fails the VM over.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::{
    self, read_frame, write_frame, FrameError, Request, Response, StartFile, StartReport,
    WorkerInfo,
};
use crate::vmhost::live_migration::PreparedIncoming;
use crate::vmhost::{VmHost, VmHostError};

/// Exit status of a worker that stopped its VM because its lease ran out.
pub const EXIT_FENCED: i32 = 3;

/// The nice value a worker's vCPU threads run at (the agent and the worker's control
/// threads run at 0): a host saturated by its guests still gives the agent's heartbeats
/// and Raft, and each worker's lease handling, the CPU first.
pub const WORKER_NICE: i32 = 10;

/// Errors that end a worker before its VM runs.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot open the worker directory {0}")]
    Dir(PathBuf, #[source] std::io::Error),
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is larger than {max} bytes", max = protocol::START_FILE_BYTES_MAX)]
    TooLarge(PathBuf),
    #[error("{0} is not a valid start file")]
    Decode(PathBuf, #[source] serde_json::Error),
    #[error("start file version {got}; this worker speaks {want}", want = protocol::VERSION)]
    Version { got: u32 },
    #[error("cannot open the shared volumes")]
    Volumes(#[source] csv_volume::VolumeError),
    #[error("the lease ran out before the VM could start")]
    LeaseExpired,
    #[error("cannot start the VM")]
    Start(#[source] VmHostError),
    #[error("cannot map the incoming VM's shared memory")]
    Memory(#[source] vmm_node::memory::MemoryError),
    #[error("cannot listen on the control socket {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("cannot start the watchdog thread")]
    Thread(#[source] std::io::Error),
}

/// The path to `name` inside the directory open as `dir`, short enough for a Unix socket
/// address whatever the directory's own path length (`sun_path` holds 108 bytes).
pub(crate) fn short_path(dir: &File, name: &str) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()))
}

struct LeaseState {
    deadline: Instant,
    /// Stopped or fenced: the watchdog has nothing left to guard.
    done: bool,
    fenced: bool,
}

struct Worker {
    host: Arc<VmHost>,
    name: String,
    lease: Mutex<LeaseState>,
    renewed: Condvar,
    sock: PathBuf,
    /// The paused VM of a live migration into this worker, until `Resume` registers it.
    incoming: Mutex<Option<PreparedIncoming>>,
    /// Cancels the live migration out running in this worker.
    migration_cancel: Mutex<Option<vmm_node::migration::source::CancelToken>>,
    /// The VM's cgroups (removed on the way out).
    cgroups: Vec<PathBuf>,
}

/// The `Instant` of `until_ns` on the host's monotonic clock (now, if it has passed).
fn instant_of(until_ns: u64) -> Instant {
    let left = until_ns.saturating_sub(vmm_node::kvm::monotonic_ns());
    Instant::now() + Duration::from_nanos(left)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the worker of `dir` until its VM is stopped or fenced; returns the exit status.
/// Errors before the VM runs are also reported on stdout for the agent.
pub fn run(dir: &Path) -> i32 {
    match serve(dir) {
        Ok(code) => code,
        Err(e) => {
            let message = crate::error_chain(&e);
            tracing::error!(dir = %dir.display(), error = %message, "vm worker failed");
            report(&StartReport::Failed { message });
            1
        }
    }
}

fn report(r: &StartReport) {
    let mut out = std::io::stdout().lock();
    let _ = write_frame(&mut out, r);
}

fn read_start(dir: &Path) -> Result<StartFile, WorkerError> {
    let path = dir.join("start.json");
    let f = File::open(&path).map_err(|e| WorkerError::Read(path.clone(), e))?;
    let mut bytes = Vec::new();
    f.take(protocol::START_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| WorkerError::Read(path.clone(), e))?;
    if bytes.len() as u64 > protocol::START_FILE_BYTES_MAX {
        return Err(WorkerError::TooLarge(path));
    }
    let start: StartFile =
        serde_json::from_slice(&bytes).map_err(|e| WorkerError::Decode(path.clone(), e))?;
    if start.version != protocol::VERSION {
        return Err(WorkerError::Version { got: start.version });
    }
    Ok(start)
}

fn serve(dir: &Path) -> Result<i32, WorkerError> {
    let start = read_start(dir)?;
    // Into the VM's cgroup before any guest page or thread exists: all are accounted there.
    // (On cgroup v1 only the vCPU threads join the VM's cpu cgroup, as they start.)
    match super::cgroup::join(&start.cgroups) {
        Ok(per_thread) => vmm_node::kvm::set_vcpu_cgroups(per_thread),
        Err(e) => {
            tracing::warn!(error = %e, "cannot join the vm's cgroup; running without its limits")
        }
    }
    let cgroups = start.cgroups.clone();
    // The guest's vCPU threads run at WORKER_NICE; the worker's control threads (lease
    // renewals, the lease watchdog, a migration's engine) keep the agent's priority, so a
    // guest spinning its vCPUs never delays its own lease or blackout.
    vmm_node::kvm::set_vcpu_nice(WORKER_NICE);
    // Also before any thread: every thread inherits the filter.
    if let Err(e) = harden() {
        tracing::warn!(error = %e, "cannot install the worker's syscall filter; running without it");
    }
    let dir_file = File::open(dir).map_err(|e| WorkerError::Dir(dir.to_owned(), e))?;
    let deadline = instant_of(start.lease_until_ns);
    let registry =
        csv_volume::VolumeRegistry::from_config(&start.volumes).map_err(WorkerError::Volumes)?;
    let host = VmHost::with_networks(start.node, registry, start.networks.clone());
    host.set_image_dirs(start.image_dirs.clone());
    let name = start.spec.name.clone();
    let mut incoming = None;
    let (info, restored) = match (
        &start.incoming_memory,
        &start.restore_from,
        start.takeover_wait_ms,
    ) {
        // A live migration's target: the VM paused around the agent's shared memory.
        (Some(path), _, _) => {
            let memory = vmm_node::memory::map_shared(path, start.spec.memory_mib << 20)
                .map_err(WorkerError::Memory)?;
            let prepared = host
                .prepare_incoming(start.spec, Some(memory))
                .map_err(WorkerError::Start)?;
            let info = host.info_of(&prepared.vm);
            incoming = Some(prepared);
            Ok((info, None))
        }
        (None, Some(dir), _) => host
            .quick_restore(dir, &start.grants)
            .map(|(info, stats)| (info, Some(stats))),
        (None, None, Some(ms)) => host
            .start_after_takeover(
                start.spec,
                &start.grants,
                Instant::now() + Duration::from_millis(ms),
            )
            .map(|info| (info, None)),
        (None, None, None) => host.start(start.spec, &start.grants).map(|i| (i, None)),
    }
    .map_err(WorkerError::Start)?;
    if Instant::now() >= deadline {
        host.fence_all();
        return Err(WorkerError::LeaseExpired);
    }
    let sock = short_path(&dir_file, "sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| WorkerError::Listen(sock.clone(), e))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| WorkerError::Listen(sock.clone(), e))?;
    let worker = Arc::new(Worker {
        host,
        name,
        lease: Mutex::new(LeaseState {
            deadline,
            done: false,
            fenced: false,
        }),
        renewed: Condvar::new(),
        sock,
        incoming: Mutex::new(incoming),
        migration_cancel: Mutex::new(None),
        cgroups,
    });
    {
        let w = worker.clone();
        std::thread::Builder::new()
            .name("lease-watchdog".into())
            .spawn(move || watchdog(&w))
            .map_err(WorkerError::Thread)?;
    }
    report(&StartReport::Started {
        pid: std::process::id(),
        info: Box::new(worker_info(&worker, info)),
        restored,
    });
    tracing::info!(vm = %worker.name, pid = std::process::id(), "vm worker serving");
    // Keeps the directory open: `sock`'s short path goes through this descriptor.
    let _dir_file = dir_file;
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                let w = worker.clone();
                let spawned = std::thread::Builder::new()
                    .name("worker-conn".into())
                    .spawn(move || handle(&w, c));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot serve a control connection");
                }
            }
            Err(e) => tracing::warn!(error = %e, "accept on the control socket"),
        }
    }
    Ok(0)
}

fn worker_info(w: &Worker, info: crate::vmhost::VmInfo) -> WorkerInfo {
    WorkerInfo {
        name: info.name,
        status: info.status,
        spec: info.spec,
        disks: info.disks,
        fenced: lock(&w.lease).fenced,
    }
}

/// Ends the process once the VM is gone (the socket first, so no agent connects to a
/// worker that is about to exit).
fn exit(w: &Worker, code: i32) -> ! {
    let _ = std::fs::remove_file(&w.sock);
    super::cgroup::leave(&w.cgroups);
    std::process::exit(code)
}

/// System calls a VM worker never needs, refused with `EPERM` (a deny list: the worker
/// runs the whole VMM, disk and network I/O, and `ip` for its TAPs, so an allow list
/// would be long and brittle). They are the ones that reach beyond the VM's own
/// resources: other processes' memory and tracing, mounts and namespaces, the kernel's
/// modules, clock and keyring, reboot, BPF and perf.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("reboot", libc::SYS_reboot),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("quotactl", libc::SYS_quotactl),
];

/// Installs the worker's seccomp filter ([`DENIED_SYSCALLS`] answer `EPERM`) and with it
/// `no_new_privs`, on the calling thread; threads started afterwards inherit both.
fn harden() -> Result<(), String> {
    use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
    let rules = DENIED_SYSCALLS
        .iter()
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| format!("building the filter: {e}"))?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("compiling the filter: {e}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("installing the filter: {e}"))
}

/// `Restore`: reads the `state_len` bytes of saved state that follow the request and
/// restores them into the incoming VM. A state that cannot be read ends the connection
/// (its bytes would be read as requests): the error says so.
fn restore(
    w: &Worker,
    state_len: u64,
    layout: &[crate::vmhost::SlotDisk],
    grants: &[csv_volume::LockGrant],
    r: &mut BufReader<UnixStream>,
) -> Result<(), String> {
    if state_len > protocol::STATE_BYTES_MAX {
        return Err(format!(
            "a saved state of {state_len} bytes is over the {}-byte limit",
            protocol::STATE_BYTES_MAX
        ));
    }
    let mut blob = vec![0u8; state_len as usize];
    r.read_exact(&mut blob)
        .map_err(|e| format!("the saved state ended early: {e}"))?;
    let Some(vm) = lock(&w.incoming).as_ref().map(|p| p.vm.clone()) else {
        return Err("no incoming VM waits for a restore in this worker".into());
    };
    w.host
        .restore_incoming(&vm, &blob, layout, grants)
        .map_err(|e| crate::error_chain(&e))
}

/// The agent's answers to this worker's lock requests during a live migration out.
struct RelayLocks {
    out: Mutex<UnixStream>,
    replies: Mutex<std::sync::mpsc::Receiver<Result<Vec<csv_volume::LockGrant>, String>>>,
}

impl RelayLocks {
    fn ask(
        &self,
        req: &Response,
    ) -> Result<Vec<csv_volume::LockGrant>, crate::vmhost::LockOpError> {
        write_frame(&mut *lock(&self.out), req).map_err(|e| crate::error_chain(&e))?;
        match lock(&self.replies).recv_timeout(super::REQUEST_TIMEOUT) {
            Ok(r) => r.map_err(Into::into),
            Err(e) => Err(format!("no answer from the agent to a lock request: {e}").into()),
        }
    }
}

impl crate::vmhost::DiskLocks for RelayLocks {
    fn commit(
        &self,
        _vm: &str,
        commands: &[csv_volume::LockCommand],
    ) -> Result<(), crate::vmhost::LockOpError> {
        self.ask(&Response::LockCommit {
            cmds: commands.to_vec(),
        })
        .map(|_| ())
    }
    fn acquire(
        &self,
        vm: &str,
        _node: csv_volume::NodeId,
        _disks: &[crate::vmhost::DiskSpec],
    ) -> Result<Vec<csv_volume::LockGrant>, crate::vmhost::LockOpError> {
        Err(format!("acquire asked by the source worker of VM {vm}").into())
    }
    fn reclaim(
        &self,
        _vm: &str,
        node: csv_volume::NodeId,
        disks: &[crate::vmhost::DiskSpec],
    ) -> Result<Vec<csv_volume::LockGrant>, crate::vmhost::LockOpError> {
        self.ask(&Response::LockReclaim {
            node,
            disks: disks.to_vec(),
        })
    }
}

/// Runs a live migration out of this worker's VM (see the protocol's module map): the
/// engine here, lock commits through the agent, progress to the agent. On success the VM
/// is gone from this worker, which exits.
fn migrate_out(
    w: &Worker,
    target_node: csv_volume::NodeId,
    target_addr: std::net::SocketAddr,
    options: crate::vmhost::LiveOptions,
    tls: Option<protocol::TlsPem>,
    mut r: BufReader<UnixStream>,
    mut out: UnixStream,
) {
    use protocol::{FailureKind, WireEvent};
    use vmm_node::migration::source::MigrationEvent;
    let fail = |out: &mut UnixStream, kind, message: String| {
        let _ = write_frame(out, &Response::MigrationFailed { kind, message });
    };
    let transport = match tls {
        None => vmm_node::migration::tls::Transport::Plaintext,
        Some(p) => match vmm_node::migration::tls::MigrationTls::from_pem(
            p.ca_pem.as_bytes(),
            p.cert_pem.as_bytes(),
            p.key_pem.as_bytes(),
        ) {
            Ok(t) => vmm_node::migration::tls::Transport::Tls(t),
            Err(e) => {
                return fail(
                    &mut out,
                    FailureKind::RolledBack,
                    format!("the node's TLS material: {}", crate::error_chain(&e)),
                )
            }
        },
    };
    w.host.set_migration_transport(transport);
    let writer = match out.try_clone() {
        Ok(o) => o,
        Err(e) => {
            return fail(
                &mut out,
                FailureKind::RolledBack,
                format!("control socket: {e}"),
            )
        }
    };
    let (reply_tx, replies) = std::sync::mpsc::sync_channel(1);
    let relay = Arc::new(RelayLocks {
        out: Mutex::new(writer),
        replies: Mutex::new(replies),
    });
    let handle = match w
        .host
        .migrate_out(&w.name, target_node, target_addr, options, relay.clone())
    {
        Ok(h) => h,
        Err(e) => return fail(&mut out, FailureKind::RolledBack, crate::error_chain(&e)),
    };
    let cancel = handle.canceller();
    *lock(&w.migration_cancel) = Some(cancel.clone());
    // The agent's side of the conversation: answers to lock requests, or its end.
    let _ = std::thread::Builder::new()
        .name("migration-replies".into())
        .spawn(move || loop {
            match read_frame::<Request>(&mut r) {
                Ok(Request::LockResult { result }) => {
                    if reply_tx.send(result).is_err() {
                        return;
                    }
                }
                Ok(Request::CancelMigration) => cancel.cancel(),
                Ok(other) => {
                    tracing::warn!(request = ?other, "unexpected request during a live migration; cancelling it");
                    cancel.cancel();
                    return;
                }
                Err(_) => {
                    // The agent is gone: nobody can commit the handoff; roll back.
                    cancel.cancel();
                    return;
                }
            }
        });
    for ev in handle.progress.iter() {
        let event = match ev {
            MigrationEvent::Phase(p) => WireEvent::Phase(p.to_owned()),
            MigrationEvent::Prediction(p) => WireEvent::Prediction(p),
            MigrationEvent::Progress(p) => WireEvent::Progress(p),
            MigrationEvent::Throttle(t) => WireEvent::Throttle(t),
        };
        let _ = write_frame(&mut *lock(&relay.out), &Response::Event { event });
    }
    let result = handle.wait();
    lock(&w.migration_cancel).take();
    match result {
        Ok(report) => {
            lock(&w.lease).done = true;
            w.renewed.notify_all();
            let _ = write_frame(
                &mut *lock(&relay.out),
                &Response::Migrated {
                    stats: Box::new(report.stats),
                    handed_off: report.handed_off,
                },
            );
            tracing::info!(vm = %w.name, "vm worker exits: vm migrated away");
            exit(w, 0);
        }
        Err(e) => {
            let kind = match &e {
                VmHostError::Migration {
                    source: vmm_node::migration::MigrationError::CommitUncertain(_),
                    ..
                } => FailureKind::CommitUncertain,
                VmHostError::Migration {
                    source: vmm_node::migration::MigrationError::Cancelled(_),
                    ..
                } => FailureKind::Cancelled,
                _ => FailureKind::RolledBack,
            };
            let _ = write_frame(
                &mut *lock(&relay.out),
                &Response::MigrationFailed {
                    kind,
                    message: crate::error_chain(&e),
                },
            );
        }
    }
}

fn watchdog(w: &Worker) {
    let mut g = lock(&w.lease);
    loop {
        if g.done {
            return;
        }
        let now = Instant::now();
        if now >= g.deadline {
            g.done = true;
            g.fenced = true;
            drop(g);
            let stopped = w.host.fence_all();
            tracing::warn!(vm = %w.name, ?stopped, "lease ran out: the agent did not renew it; vm stopped");
            // Tells the agent (even one that adopted this worker and cannot see its exit
            // status) that the VM was fenced, not that it failed.
            if let Err(e) = std::fs::write(w.sock.with_file_name(super::LEASE_RAN_OUT), b"") {
                tracing::warn!(vm = %w.name, error = %e, "cannot leave the lease-ran-out mark");
            }
            exit(w, EXIT_FENCED);
        }
        let wait = g.deadline - now;
        g = w
            .renewed
            .wait_timeout(g, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn handle(w: &Worker, conn: UnixStream) {
    let mut out = match conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control connection");
            return;
        }
    };
    let mut r = BufReader::new(conn);
    match read_frame::<Request>(&mut r) {
        Ok(Request::Hello { version }) if version == protocol::VERSION => {}
        Ok(Request::Hello { version }) => {
            let _ = write_frame(
                &mut out,
                &Response::Error {
                    message: format!(
                        "control protocol version {version}; this worker speaks {}",
                        protocol::VERSION
                    ),
                },
            );
            return;
        }
        Ok(other) => {
            let _ = write_frame(
                &mut out,
                &Response::Error {
                    message: format!("the first request must be hello, got {other:?}"),
                },
            );
            return;
        }
        Err(e) => {
            tracing::debug!(error = %crate::error_chain(&e), "control connection closed before hello");
            return;
        }
    }
    let hello = match info(w) {
        Ok(info) => Response::Hello {
            version: protocol::VERSION,
            pid: std::process::id(),
            info,
        },
        Err(message) => Response::Error { message },
    };
    if write_frame(&mut out, &hello).is_err() {
        return;
    }
    loop {
        let req = match read_frame::<Request>(&mut r) {
            Ok(req) => req,
            Err(FrameError::Closed) => return,
            Err(e) => {
                let _ = write_frame(
                    &mut out,
                    &Response::Error {
                        message: crate::error_chain(&e),
                    },
                );
                return;
            }
        };
        if let Request::MigrateOut {
            target_node,
            target_addr,
            options,
            tls,
        } = req
        {
            // The rest of this connection belongs to the migration.
            migrate_out(w, target_node, target_addr, options, tls, r, out);
            return;
        }
        if let Request::Restore {
            state_len,
            layout,
            grants,
        } = req
        {
            let resp = match restore(w, state_len, &layout, &grants, &mut r) {
                Ok(()) => Response::Done,
                Err(message) => Response::Error { message },
            };
            if write_frame(&mut out, &resp).is_err() {
                return;
            }
            continue;
        }
        if !answer(w, req, &mut out) {
            return;
        }
    }
}

fn info(w: &Worker) -> Result<WorkerInfo, String> {
    if let Some(p) = lock(&w.incoming).as_ref() {
        return Ok(worker_info(w, w.host.info_of(&p.vm)));
    }
    w.host
        .state(&w.name)
        .map(|i| worker_info(w, i))
        .map_err(|e| crate::error_chain(&e))
}

/// Answers one request; false ends the connection.
fn answer(w: &Worker, req: Request, out: &mut UnixStream) -> bool {
    let resp = match req {
        Request::Hello { .. } => Response::Error {
            message: "hello was already said on this connection".into(),
        },
        Request::Info => match info(w) {
            Ok(info) => Response::Info { info },
            Err(message) => Response::Error { message },
        },
        Request::Lease { until_ns } => {
            let mut g = lock(&w.lease);
            if g.done {
                Response::Error {
                    message: if g.fenced {
                        "the lease already ran out: the VM was stopped".into()
                    } else {
                        "the VM is being stopped".into()
                    },
                }
            } else {
                // Never earlier than a deadline already granted: renewals may arrive out
                // of order (a late one must not undo an announced restart's extension).
                g.deadline = g.deadline.max(instant_of(until_ns));
                w.renewed.notify_all();
                Response::Done
            }
        }
        Request::Stop => {
            lock(&w.lease).done = true;
            w.renewed.notify_all();
            let resp = match w.host.stop(&w.name) {
                Ok(s) => Response::Stopped {
                    release: s.release,
                    disk_errors: s
                        .disk_errors
                        .iter()
                        .map(|e| crate::error_chain(e))
                        .collect(),
                },
                Err(e) => Response::Error {
                    message: crate::error_chain(&e),
                },
            };
            let _ = write_frame(out, &resp);
            tracing::info!(vm = %w.name, "vm worker exits: vm stopped");
            exit(w, 0);
        }
        Request::Usage => Response::Usage {
            usage: w.host.usage().into_iter().next().map(|(_, u)| u),
        },
        Request::AttachDisk { disk, grant } => match w.host.attach_disk(&w.name, disk, &grant) {
            Ok(slot) => Response::Attached { slot },
            Err(e) => Response::Error {
                message: crate::error_chain(&e),
            },
        },
        Request::DetachDisk { disk } => match w.host.detach_disk(&w.name, &disk) {
            Ok(release) => Response::Detached { release },
            Err(e) => Response::Error {
                message: crate::error_chain(&e),
            },
        },
        Request::AttachNic { nic } => match w.host.attach_nic(&w.name, nic) {
            Ok(slot) => Response::Attached { slot },
            Err(e) => Response::Error {
                message: crate::error_chain(&e),
            },
        },
        Request::DetachNic { mac } => match w.host.detach_nic(&w.name, &mac) {
            Ok(()) => Response::Done,
            Err(e) => Response::Error {
                message: crate::error_chain(&e),
            },
        },
        Request::QuickSave {
            volume,
            target_node,
        } => {
            // From here the VM is paused and then gone from this worker (or, on error,
            // runs on): the watchdog has nothing to stop once it is saved.
            match w.host.quick_save(&w.name, &volume, target_node) {
                Ok(image) => {
                    lock(&w.lease).done = true;
                    w.renewed.notify_all();
                    let _ = write_frame(out, &Response::QuickSaved { image });
                    tracing::info!(vm = %w.name, "vm worker exits: vm saved for quick migration");
                    exit(w, 0);
                }
                Err(e) => Response::Error {
                    message: crate::error_chain(&e),
                },
            }
        }
        Request::MigrateOut { .. } | Request::LockResult { .. } => Response::Error {
            message: "no live migration out runs on this connection".into(),
        },
        Request::CancelMigration => match lock(&w.migration_cancel).as_ref() {
            Some(c) => {
                c.cancel();
                Response::Done
            }
            None => Response::Error {
                message: "no live migration runs in this worker".into(),
            },
        },
        Request::Restore { .. } => Response::Error {
            message: "a restore carries its state on the connection".into(),
        },
        Request::AnnounceNics => match lock(&w.incoming).as_ref() {
            Some(p) => {
                p.vm.vm.announce_nics_early();
                Response::Done
            }
            None => Response::Error {
                message: "no incoming VM in this worker".into(),
            },
        },
        Request::Resume => {
            let mut g = lock(&w.incoming);
            match g.as_ref().map(|p| p.vm.vm.resume()) {
                None => Response::Error {
                    message: "no incoming VM waits to be resumed in this worker".into(),
                },
                Some(Err(e)) => Response::Error {
                    message: crate::error_chain(&e),
                },
                Some(Ok(())) => {
                    let hosted = g.take().map(|p| {
                        let hosted = p.vm.clone();
                        p.arrived();
                        hosted
                    });
                    // The answer before the boost: the switchover waits for it, and the
                    // woken vCPUs, still at the worker's vCPU priority, do not hold up
                    // this thread meanwhile.
                    let answered = write_frame(out, &Response::Done).is_ok() && out.flush().is_ok();
                    // As the engine does for a VM in its own process: the guest's first
                    // moments here at this (control) thread's priority.
                    if let (Some(hosted), Ok(nice)) = (hosted, vmm_node::kvm::nice()) {
                        hosted.vm.boost_vcpus(
                            nice,
                            vmm_node::migration::target::VCPU_BOOST_AFTER_RESUME,
                        );
                    }
                    tracing::info!(vm = %w.name, "incoming vm runs");
                    return answered;
                }
            }
        }
        Request::ReleaseIncoming { to } => {
            let Some(p) = lock(&w.incoming).take() else {
                return write_frame(
                    out,
                    &Response::Error {
                        message: "no incoming VM in this worker".into(),
                    },
                )
                .is_ok();
            };
            lock(&w.lease).done = true;
            w.renewed.notify_all();
            let cmds = crate::vmhost::live_migration::close_incoming_disks(&p.vm, to);
            if let Err(e) = p.vm.vm.stop() {
                tracing::warn!(vm = %w.name, error = %e, "stopping the failed incoming vm");
            }
            let _ = write_frame(out, &Response::Released { cmds });
            tracing::info!(vm = %w.name, "vm worker exits: incoming migration failed");
            exit(w, 0);
        }
        Request::Fence => {
            lock(&w.lease).done = true;
            w.renewed.notify_all();
            w.host.fence_all();
            let _ = write_frame(out, &Response::Done);
            tracing::warn!(vm = %w.name, "vm worker exits: vm fenced by its agent");
            exit(w, EXIT_FENCED);
        }
        Request::Console => {
            let stream = match w.host.console(&w.name) {
                Ok(s) => s,
                Err(e) => {
                    let _ = write_frame(
                        out,
                        &Response::Error {
                            message: crate::error_chain(&e),
                        },
                    );
                    return false;
                }
            };
            if write_frame(
                out,
                &Response::Console {
                    recent: stream.recent,
                },
            )
            .is_err()
            {
                return false;
            }
            while let Ok(line) = stream.lines.recv() {
                let at_unix_us = crate::vmhost::journal::now_unix_us();
                if write_frame(out, &Response::Line { line, at_unix_us }).is_err() {
                    break;
                }
            }
            return false;
        }
    };
    write_frame(out, &resp).is_ok() && out.flush().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_refuses_what_a_worker_never_needs_and_allows_the_rest() {
        // On a thread of its own: the filter binds the thread that installs it.
        let r = std::thread::spawn(|| {
            harden()?;
            // chroot("/") is allowed to root without the filter (tests run as root).
            let denied = std::os::unix::fs::chroot("/").map_err(|e| e.raw_os_error());
            let allowed = std::fs::read_to_string("/proc/self/status").map(|s| s.len());
            Ok::<_, String>((denied, allowed.is_ok()))
        })
        .join()
        .expect("thread");
        let (denied, allowed) = r.expect("filter installed");
        assert_eq!(denied, Err(Some(libc::EPERM)));
        assert!(allowed);
    }
}
