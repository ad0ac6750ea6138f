//! Target side of a live migration: a listener that handles several connections at once
//! ([`serve_sessions`]), and per session: TLS handshake, Hello, authorization, then
//! compatibility check, a paused skeleton VM, memory on N data connections, state restore,
//! the disks opened after the storage handoff, and resume only on Commit.
//!
//! Hardening (see `ARCHITECTURE.md`): every new connection has [`ReceiveOptions::
//! handshake_timeout`] in total for its TLS handshake and first frame, and is handled on
//! its own thread, so a slow or silent peer holds only itself; at most
//! [`MAX_PENDING_CONNECTIONS`] connections wait for their first frame and at most
//! [`ReceiveOptions::max_sessions`] sessions run at once (further Hellos are refused with a
//! reason). Nothing is created before the [`SessionAuthorizer`] accepted the session, and a
//! data connection joins a session only with the session's random id and the same peer
//! certificate as its control connection.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::protocol::{
    decode_payload, decode_reason, encode_payload, read_frame_of, write_frame, write_refuse,
    Command, DataHello, Frame, Hello, ProtocolError, Receipt, RoundAck, Running, SessionId, Setup,
    StatePayload, Welcome, PROTOCOL_VERSION,
};
use super::seam::{check_compatibility, NodeFacts, StorageHandoff, TargetFactory, TargetVm};
use super::tls::{random_bytes, SessionAuthorizer, Transport};
use super::transport::{receive_data_connection, DataEvent, LastHeard, PageHashes, PageMap};
use super::{MigrationError, MAX_CONNECTIONS};

/// Default time the target waits for the source at any step.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a new connection has for its TLS handshake and its first frame together.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default number of sessions (from Hello on) handled at once.
pub const DEFAULT_MAX_SESSIONS: usize = 4;
/// Most accepted connections still in their handshake or first frame; more are closed.
pub const MAX_PENDING_CONNECTIONS: usize = 32;
/// How long a resumed VM's vCPU threads run at the receiving thread's priority (see
/// [`ReceiveOptions::vcpu_boost`]).
pub const VCPU_BOOST_AFTER_RESUME: Duration = Duration::from_millis(100);
/// How often a target waiting for its source looks at [`Abandon`].
pub const ABANDON_POLL: Duration = Duration::from_millis(100);

/// Lets the node embedding the target give up the incoming migration in progress — its
/// source is known to be gone (e.g. the cluster failed the VM over to this node after the
/// source host lost power, so no connection reset will ever arrive) — instead of waiting
/// out `io_timeout`. Seen within [`ABANDON_POLL`] by every session in progress; the VM is
/// never resumed once abandoned. Cleared when the next session is authorized.
#[derive(Debug, Clone, Default)]
pub struct Abandon(Arc<AtomicBool>);

impl Abandon {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn clear(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Two handles are equal when they share the flag.
impl PartialEq for Abandon {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Abandon {}

/// A phase at which the target can be made to die on purpose (tests of the source's
/// rollback; `VMM_NODE_MIGRATION_FAILPOINT` in the debug binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Failpoint {
    /// After the setup request, before answering it.
    Setup,
    /// When round 0 has arrived, before acknowledging it.
    Precopy,
    /// When the VM state has arrived (source paused).
    StopCopy,
    /// State restored and disks opened, before reporting ready.
    BeforeResume,
}

impl std::str::FromStr for Failpoint {
    type Err = MigrationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "setup" => Failpoint::Setup,
            "precopy" | "pre-copy" => Failpoint::Precopy,
            "stopcopy" | "stop-and-copy" => Failpoint::StopCopy,
            "before-resume" => Failpoint::BeforeResume,
            other => {
                return Err(MigrationError::InvalidOptions(format!(
                    "unknown failpoint '{other}' (setup, precopy, stopcopy, before-resume)"
                )))
            }
        })
    }
}

/// What to do when a failpoint is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailAction {
    /// Kill the process on the spot (like `kill -9`).
    Abort,
    /// Return [`MigrationError::Failpoint`] after closing every connection (in-process tests).
    Error,
}

/// Target options. Built with [`ReceiveOptions::new`]: transport and authorizer have no
/// default.
#[derive(Clone)]
pub struct ReceiveOptions {
    /// TLS (the normal case) or plaintext (an isolated migration network only).
    pub transport: Transport,
    /// Decides, after the handshake and Hello, whether a session may proceed.
    pub authorizer: Arc<dyn SessionAuthorizer>,
    /// Replaces the node facts (tests simulate another CPU vendor or less memory).
    pub facts_override: Option<NodeFacts>,
    pub failpoint: Option<(Failpoint, FailAction)>,
    pub io_timeout: Duration,
    /// Total time for a new connection's TLS handshake and first frame.
    pub handshake_timeout: Duration,
    /// Sessions handled at once; a Hello beyond it is refused.
    pub max_sessions: usize,
    pub abandon: Abandon,
    /// After the resume, run the VM's vCPU threads at the receiving thread's priority for
    /// [`VCPU_BOOST_AFTER_RESUME`] (see [`crate::vm::Vm::boost_vcpus`]): the guest answers
    /// its network first, before the host's other work takes the cores back.
    pub vcpu_boost: bool,
}

impl ReceiveOptions {
    pub fn new(transport: Transport, authorizer: Arc<dyn SessionAuthorizer>) -> Self {
        ReceiveOptions {
            transport,
            authorizer,
            facts_override: None,
            failpoint: None,
            io_timeout: DEFAULT_IO_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_sessions: DEFAULT_MAX_SESSIONS,
            abandon: Abandon::default(),
            vcpu_boost: true,
        }
    }
}

impl std::fmt::Debug for ReceiveOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveOptions")
            .field("transport", &self.transport)
            .field("facts_override", &self.facts_override)
            .field("failpoint", &self.failpoint)
            .field("io_timeout", &self.io_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_sessions", &self.max_sessions)
            .finish_non_exhaustive()
    }
}

/// Target-side figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiveStats {
    pub rounds: u32,
    pub restore_us: u64,
    pub resume_us: u64,
    pub memory_digest: u64,
}

/// A VM that now runs here.
pub struct Received {
    pub vm: Box<dyn TargetVm>,
    pub vm_name: String,
    pub stats: ReceiveStats,
}

fn check_failpoint(opts: &ReceiveOptions, here: Failpoint) -> Result<(), MigrationError> {
    match opts.failpoint {
        Some((fp, action)) if fp == here => {
            tracing::warn!(failpoint = ?here, "migration failpoint reached");
            match action {
                FailAction::Abort => std::process::abort(),
                FailAction::Error => Err(MigrationError::Failpoint(here)),
            }
        }
        _ => Ok(()),
    }
}

enum Event {
    Data(DataEvent),
    Control(Result<Frame, ProtocolError>),
}

impl From<DataEvent> for Event {
    fn from(e: DataEvent) -> Self {
        Event::Data(e)
    }
}

/// The error with its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Accepts connections until one session ends with the VM running here, handling others
/// meanwhile (returns once they ended too). Sessions that fail (refused, source gone,
/// cancelled) are logged.
pub fn serve(
    listener: &TcpListener,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    serve_until(listener, factory, handoff, opts, |r| match r {
        Ok(_) | Err(MigrationError::Failpoint(_)) => true,
        Err(e) => {
            tracing::warn!(error = %error_chain(e), "incoming migration failed");
            false
        }
    })
}

/// Accepts connections until one session (a connection that sent Hello) ends, and
/// returns its outcome — a refusal included. Other connections are handled meanwhile, and
/// the call returns only once they ended too (each within its deadlines): a caller that
/// must act on every outcome at once (register an arrived VM) uses [`serve_sessions`].
pub fn receive_one(
    listener: &TcpListener,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    serve_until(listener, factory, handoff, opts, |_| true)
}

fn serve_until(
    listener: &TcpListener,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
    done: impl Fn(&Result<Received, MigrationError>) -> bool + Sync,
) -> Result<Received, MigrationError> {
    let stop = AtomicBool::new(false);
    let first: Mutex<Option<Result<Received, MigrationError>>> = Mutex::new(None);
    let wake = listener.local_addr().map_err(MigrationError::Listen)?;
    serve_sessions(listener, factory, handoff, opts, &stop, &|r| {
        if !done(&r) {
            return;
        }
        let mut f = first.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(r);
            stop.store(true, Ordering::SeqCst);
            wake_listener(wake);
        }
    })?;
    first
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(Err(MigrationError::Cancelled(Some(
            "listener stopped".into(),
        ))))
}

/// Unblocks a listener's `accept` so it looks at its stop flag (a connection that sends
/// nothing; a wildcard address is reached on loopback).
pub fn wake_listener(addr: SocketAddr) {
    let mut a = addr;
    if a.ip().is_unspecified() {
        a.set_ip(match a {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let _ = TcpStream::connect_timeout(&a, Duration::from_secs(1));
}

/// A session's entry: its control connection's peer certificate and where its data
/// connections (with their index) go.
struct SessionEntry {
    peer_cert: Option<Vec<u8>>,
    data: SyncSender<(u16, Conn)>,
}

/// Sessions in progress, by the id the target gave them.
#[derive(Default)]
struct Sessions {
    by_id: Mutex<HashMap<SessionId, SessionEntry>>,
    /// Control sessions from Hello on (refused ones included while they are answered).
    active: AtomicUsize,
    /// Connections before their first frame.
    pending: AtomicUsize,
}

/// Decrements a counter when dropped.
struct Slot<'a>(&'a AtomicUsize);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a slot of `counter` unless `max` are taken.
fn take_slot(counter: &AtomicUsize, max: usize) -> Option<Slot<'_>> {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(counter))
}

/// Accepts connections on `listener` until `stop` is set (whoever sets it wakes the
/// listener, e.g. with [`wake_listener`]), each on its own thread; calls `on_outcome` once
/// per session (a connection that sent Hello) when it ends. Returns once every session
/// thread has finished.
pub fn serve_sessions(
    listener: &TcpListener,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
    stop: &AtomicBool,
    on_outcome: &(dyn Fn(Result<Received, MigrationError>) + Sync),
) -> Result<(), MigrationError> {
    let sessions = Sessions::default();
    std::thread::scope(|s| {
        while !stop.load(Ordering::SeqCst) {
            let (tcp, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    tracing::warn!(error = %e, "accepting a migration connection");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Some(slot) = take_slot(&sessions.pending, MAX_PENDING_CONNECTIONS) else {
                tracing::warn!(%peer, "too many migration connections in their handshake; closed");
                continue;
            };
            let sessions = &sessions;
            let spawned = std::thread::Builder::new()
                .name("migration-conn".into())
                .spawn_scoped(s, move || {
                    handle_connection(
                        tcp, peer, slot, sessions, factory, handoff, opts, on_outcome,
                    )
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a migration connection thread");
            }
        }
    });
    Ok(())
}

/// One accepted connection: handshake and first frame within `handshake_timeout`, then a
/// session (Hello) or a data connection handed to its session (DataHello).
#[allow(clippy::too_many_arguments)]
fn handle_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    pending: Slot<'_>,
    sessions: &Sessions,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
    on_outcome: &(dyn Fn(Result<Received, MigrationError>) + Sync),
) {
    let deadline = Instant::now() + opts.handshake_timeout;
    let mut conn = match Conn::accept(tcp, &opts.transport, deadline) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, error = %error_chain(&e), "migration connection refused");
            return;
        }
    };
    conn.set_deadline(Some(deadline));
    let first = read_frame_of(&mut conn, &[Command::Hello, Command::DataHello]);
    conn.set_deadline(None);
    drop(pending);
    let _ = conn.set_write_timeout(Some(opts.io_timeout));
    let frame = match first {
        Ok(f) => f,
        Err(e) => {
            let reason = match &e {
                ProtocolError::VersionMismatch { ours, theirs } => format!(
                    "migration protocol version {theirs} is not supported: \
                     this node speaks version {ours}"
                ),
                other => format!("not a migration session: {other}"),
            };
            tracing::warn!(%peer, %reason, "migration connection refused");
            let _ = write_refuse(&mut conn, &reason);
            return;
        }
    };
    if frame.command == Command::DataHello {
        join_session(conn, peer, &frame.payload, sessions);
        return;
    }
    let r = session(conn, peer, &frame.payload, sessions, factory, handoff, opts);
    on_outcome(r);
}

/// Hands a data connection to the session it names, if its certificate is the session's.
fn join_session(mut conn: Conn, peer: SocketAddr, payload: &[u8], sessions: &Sessions) {
    let h: DataHello = match decode_payload(Command::DataHello, payload) {
        Ok(h) => h,
        Err(e) => return refuse_data(&mut conn, peer, &e.to_string()),
    };
    let tx = {
        let by_id = sessions.by_id.lock().unwrap_or_else(|e| e.into_inner());
        match by_id.get(&h.session_id) {
            Some(e) if e.peer_cert.as_deref() == conn.peer_cert() => e.data.clone(),
            Some(_) => {
                drop(by_id);
                return refuse_data(
                    &mut conn,
                    peer,
                    "data connection with another certificate than its session's",
                );
            }
            None => {
                drop(by_id);
                return refuse_data(&mut conn, peer, "no such migration session");
            }
        }
    };
    // The session checks the index; a full channel means it has all it asked for.
    if let Err(
        std::sync::mpsc::TrySendError::Full((_, mut conn))
        | std::sync::mpsc::TrySendError::Disconnected((_, mut conn)),
    ) = tx.try_send((h.index, conn))
    {
        refuse_data(&mut conn, peer, "the session has all its data connections");
    }
}

fn refuse_data(conn: &mut Conn, peer: SocketAddr, reason: &str) {
    tracing::warn!(%peer, reason, "migration data connection refused");
    let _ = write_refuse(conn, reason);
}

/// Removes a session from the table when dropped.
struct Registered<'a>(&'a Sessions, SessionId);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.0
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// Refuses the session with `reason` (sent to the source) and returns the error.
fn refuse_session(ctl: &mut Conn, reason: String) -> MigrationError {
    let _ = write_refuse(ctl, &reason);
    MigrationError::SessionRefused(reason)
}

/// One control session, from its Hello.
fn session(
    mut ctl: Conn,
    peer: SocketAddr,
    hello: &[u8],
    sessions: &Sessions,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    let Some(_active) = take_slot(&sessions.active, opts.max_sessions) else {
        return Err(refuse_session(
            &mut ctl,
            format!(
                "this node already handles {} incoming migrations; try again later",
                opts.max_sessions
            ),
        ));
    };
    let hello: Hello = match decode_payload(Command::Hello, hello) {
        Ok(h) => h,
        Err(e) => return Err(refuse_session(&mut ctl, e.to_string())),
    };
    if let Err(reason) = hello.validate() {
        return Err(refuse_session(&mut ctl, reason));
    }
    if let Err(reason) = opts
        .authorizer
        .authorize(ctl.peer_cert(), &hello.vm_name, &hello.ticket)
    {
        tracing::warn!(%peer, vm = %hello.vm_name, %reason, "migration session not authorized");
        return Err(refuse_session(
            &mut ctl,
            format!("migration of VM {} not authorized: {reason}", hello.vm_name),
        ));
    }
    let mut session_id = SessionId::default();
    if random_bytes(&mut session_id).is_err() {
        return Err(refuse_session(
            &mut ctl,
            "no randomness for a session id".into(),
        ));
    }
    let n = usize::from(hello.connections);
    let (tx, data_rx) = sync_channel::<(u16, Conn)>(n);
    sessions
        .by_id
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            session_id,
            SessionEntry {
                peer_cert: ctl.peer_cert().map(<[u8]>::to_vec),
                data: tx,
            },
        );
    let _registered = Registered(sessions, session_id);
    opts.abandon.clear();
    tracing::info!(%peer, vm = %hello.vm_name, tls = ctl.is_tls(), "incoming migration authorized");
    let p = encode_payload(Command::Welcome, &Welcome { session_id })
        .map_err(MigrationError::proto("hello"))?;
    write_frame(&mut ctl, Command::Welcome, &p).map_err(MigrationError::proto("hello"))?;
    receive_session(ctl, peer, &hello, data_rx, factory, handoff, opts)
}

/// An authorized session from Setup to the end.
fn receive_session(
    mut ctl: Conn,
    peer: SocketAddr,
    hello: &Hello,
    data_rx: Receiver<(u16, Conn)>,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    let n = usize::from(hello.connections);
    let io = |e: std::io::Error| MigrationError::proto("setup")(e.into());
    ctl.set_read_timeout(Some(opts.io_timeout)).map_err(io)?;

    // --- Setup: compatibility, skeleton VM ------------------------------------------
    let f = ctl
        .read_frame_within(opts.io_timeout)
        .map_err(MigrationError::proto("setup"))?;
    if f.command != Command::Setup {
        return Err(MigrationError::proto("setup")(ProtocolError::Unexpected {
            expected: "Setup",
            got: f.command,
        }));
    }
    let setup: Setup =
        decode_payload(Command::Setup, &f.payload).map_err(MigrationError::proto("setup"))?;
    if setup.requirements.vm_name != hello.vm_name {
        return Err(refuse_session(
            &mut ctl,
            format!(
                "the session was authorized for VM {}, the setup names VM {}",
                hello.vm_name, setup.requirements.vm_name
            ),
        ));
    }
    let facts = opts
        .facts_override
        .clone()
        .unwrap_or_else(|| factory.facts());
    if let Err(inc) = check_compatibility(&setup.requirements, &facts) {
        let _ = write_refuse(&mut ctl, &inc.to_string());
        return Err(MigrationError::Incompatible(inc));
    }
    check_failpoint(opts, Failpoint::Setup)?;
    let vm = match factory.create_paused(&setup.config) {
        Ok(vm) => vm,
        Err(source) => {
            let e = MigrationError::Vm {
                op: "create paused VM",
                source,
            };
            let _ = write_refuse(&mut ctl, &error_chain(&e));
            return Err(e);
        }
    };
    let map = PageMap::from_memory(vm.memory());
    if map.total_bytes() != setup.requirements.memory_bytes {
        let reason = format!(
            "target VM has {} bytes of memory, the source announced {}",
            map.total_bytes(),
            setup.requirements.memory_bytes
        );
        let _ = write_refuse(&mut ctl, &reason);
        return Err(MigrationError::InvalidOptions(reason));
    }
    write_frame(&mut ctl, Command::SetupOk, &[]).map_err(MigrationError::proto("setup"))?;

    // --- Data connections ------------------------------------------------------------
    // Each data connection has its own TLS handshake: allow for one on top of the I/O
    // timeout (a loaded host's handshakes are slow, and they run one after the other).
    let data = collect_data(&data_rx, n, opts.io_timeout + opts.handshake_timeout)?;
    drop(data_rx);
    let vm_name = setup.requirements.vm_name.clone();
    let disks = setup.requirements.disks.clone();
    let hashes = PageHashes::new_zeroed(map.total_pages());
    let mut shutters: Vec<Conn> = data.clone();
    let ctl_reader = ctl.clone();
    shutters.push(ctl_reader.clone());
    let shutdown_all = |shutters: &[Conn]| {
        for s in shutters {
            s.shutdown();
        }
    };

    let mem = vm.memory();
    let mut acquired = false;
    let heard = LastHeard::default();
    let outcome = std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Event>(4 * MAX_CONNECTIONS);
        for (index, conn) in data.into_iter().enumerate() {
            let _ = conn.set_read_timeout(Some(opts.io_timeout));
            let (tx, map, hashes, heard) = (tx.clone(), &map, &hashes, &heard);
            s.spawn(move || receive_data_connection(conn, index, mem, map, hashes, &tx, heard));
        }
        {
            let tx = tx.clone();
            let mut r = ctl_reader;
            // Control frames, forwarded until the connection ends. Idle time is the
            // coordinator's business, so the wait for a frame has no limit; a frame that
            // started must arrive whole within the I/O timeout.
            let _ = r.set_read_timeout(None);
            let frame_timeout = opts.io_timeout;
            s.spawn(move || loop {
                let f = r.read_frame_within(frame_timeout);
                let end = f.is_err();
                if tx.send(Event::Control(f)).is_err() || end {
                    return;
                }
            });
        }
        drop(tx);
        let r = coordinate(
            &rx,
            &mut ctl,
            vm.as_ref(),
            &hashes,
            &heard,
            handoff,
            opts,
            n,
            &vm_name,
            &disks,
            &mut acquired,
        );
        shutdown_all(&shutters);
        r
    });
    match outcome {
        Ok(stats) => {
            let restore_us = stats.restore_us;
            tracing::info!(vm = %vm_name, %peer, restore_us, "migrated vm running here");
            Ok(Received { vm, vm_name, stats })
        }
        Err(e) => {
            if acquired {
                if let Err(r) = handoff.release(&vm_name, &disks) {
                    tracing::error!(error = %r, "releasing storage after a failed migration");
                }
            }
            drop(vm);
            Err(e)
        }
    }
}

/// The session's `n` data connections, ordered by their index, within `timeout`.
fn collect_data(
    rx: &Receiver<(u16, Conn)>,
    n: usize,
    timeout: Duration,
) -> Result<Vec<Conn>, MigrationError> {
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((index, mut conn)) = rx.recv_timeout(left) else {
            return Err(MigrationError::Timeout("the data connections"));
        };
        match slots.get_mut(usize::from(index)) {
            Some(slot @ None) => *slot = Some(conn),
            _ => {
                let reason = format!("data connection index {index} is taken or not in 0..{n}");
                tracing::warn!(%reason, "migration data connection refused");
                let _ = write_refuse(&mut conn, &reason);
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

#[allow(clippy::too_many_arguments)]
fn coordinate(
    rx: &std::sync::mpsc::Receiver<Event>,
    ctl: &mut Conn,
    vm: &dyn TargetVm,
    hashes: &PageHashes,
    data_heard: &LastHeard,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
    n: usize,
    vm_name: &str,
    disks: &[String],
    acquired: &mut bool,
) -> Result<ReceiveStats, MigrationError> {
    let mut ends: HashMap<u32, (usize, u64, u64)> = HashMap::new();
    let mut state: Option<Vec<u8>> = None;
    let mut stats = ReceiveStats::default();
    let mut restored = false;
    let mut heard = Instant::now();
    loop {
        if opts.abandon.is_set() {
            return Err(MigrationError::Cancelled(Some(
                "abandoned by the target's node (its source is gone)".into(),
            )));
        }
        // Silent for as long as neither an event nor a page message (of a paced, long
        // round) has arrived.
        let quiet = heard.elapsed().min(data_heard.elapsed());
        let wait = opts.io_timeout.saturating_sub(quiet).min(ABANDON_POLL);
        let ev = match rx.recv_timeout(wait) {
            Ok(ev) => {
                heard = Instant::now();
                ev
            }
            Err(RecvTimeoutError::Timeout)
                if heard.elapsed().min(data_heard.elapsed()) < opts.io_timeout =>
            {
                continue
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(MigrationError::Timeout("the migration source"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::proto("receive")(ProtocolError::Closed))
            }
        };
        match ev {
            Event::Data(DataEvent::RoundEnd { index: _, end }) => {
                let e = ends.entry(end.round).or_insert((0, 0, 0));
                e.0 += 1;
                e.1 += end.data_pages;
                e.2 += end.zero_pages;
                if e.0 == n {
                    let (_, data_pages, zero_pages) = *e;
                    ends.remove(&end.round);
                    if end.round == 0 {
                        check_failpoint(opts, Failpoint::Precopy)?;
                    }
                    stats.rounds = stats.rounds.max(end.round + 1);
                    let ack = RoundAck {
                        round: end.round,
                        data_pages,
                        zero_pages,
                    };
                    let p = encode_payload(Command::RoundAck, &ack)
                        .map_err(MigrationError::proto("pre-copy"))?;
                    write_frame(ctl, Command::RoundAck, &p)
                        .map_err(MigrationError::proto("pre-copy"))?;
                }
            }
            Event::Data(DataEvent::Failed { error, .. }) => {
                return Err(MigrationError::Transport(error))
            }
            Event::Data(DataEvent::Finished { index }) => {
                return Err(MigrationError::proto("pre-copy")(
                    ProtocolError::Malformed {
                        command: Command::EndOfStream,
                        what: format!("data connection {index} ended before commit"),
                    },
                ))
            }
            Event::Control(Err(e)) => return Err(MigrationError::proto("control")(e)),
            Event::Control(Ok(f)) => match f.command {
                Command::State => {
                    check_failpoint(opts, Failpoint::StopCopy)?;
                    let st: StatePayload = decode_payload(Command::State, &f.payload)
                        .map_err(MigrationError::proto("state transfer"))?;
                    state = Some(st.state);
                    // The source is paused and saved its NICs (with the frames waiting in
                    // its TAPs): from now on the VM's frames wait in this host's TAPs.
                    vm.announce_nics();
                }
                Command::StorageReleased => {
                    let Some(st) = state.as_deref() else {
                        return Err(MigrationError::proto("storage handoff")(
                            ProtocolError::Malformed {
                                command: Command::StorageReleased,
                                what: "storage released before the VM state was sent".into(),
                            },
                        ));
                    };
                    let t = Instant::now();
                    handoff
                        .acquire(vm_name, disks)
                        .map_err(|source| MigrationError::Handoff {
                            op: "acquire",
                            source,
                        })?;
                    *acquired = true;
                    vm.restore(st).map_err(|source| MigrationError::Vm {
                        op: "restore state",
                        source,
                    })?;
                    stats.restore_us = t.elapsed().as_micros() as u64;
                    restored = true;
                    check_failpoint(opts, Failpoint::BeforeResume)?;
                    write_frame(ctl, Command::Ready, &[])
                        .map_err(MigrationError::proto("storage handoff"))?;
                }
                Command::Commit if restored => {
                    let t = Instant::now();
                    vm.resume().map_err(|source| MigrationError::Vm {
                        op: "resume",
                        source,
                    })?;
                    stats.resume_us = t.elapsed().as_micros() as u64;
                    let running = Running {
                        restore_us: stats.restore_us,
                        resume_us: stats.resume_us,
                    };
                    // From here on the VM runs here whatever happens to the connection.
                    let sent = encode_payload(Command::Running, &running)
                        .and_then(|p| write_frame(ctl, Command::Running, &p))
                        .and_then(|_| ctl.flush().map_err(ProtocolError::from));
                    // The boost after the answer the source waits for, so the woken vCPUs
                    // do not hold up this thread before it is sent.
                    if opts.vcpu_boost {
                        if let Ok(nice) = crate::kvm::nice() {
                            vm.boost_vcpus(nice, VCPU_BOOST_AFTER_RESUME);
                        }
                    }
                    stats.memory_digest = hashes.digest();
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "could not confirm running to the source");
                    } else if let Ok(p) = encode_payload(
                        Command::Receipt,
                        &Receipt {
                            memory_digest: stats.memory_digest,
                        },
                    ) {
                        // Flushed now: a buffered receipt would reach the source only when
                        // this connection is dropped, or never.
                        let receipt = write_frame(ctl, Command::Receipt, &p)
                            .and_then(|_| ctl.flush().map_err(ProtocolError::from));
                        if let Err(e) = receipt {
                            tracing::warn!(error = %e, "could not send the memory receipt");
                        }
                    }
                    return Ok(stats);
                }
                Command::Cancel => {
                    return Err(MigrationError::Cancelled(Some(decode_reason(&f.payload))));
                }
                other => {
                    return Err(MigrationError::proto("control")(
                        ProtocolError::Unexpected {
                            expected: "State, StorageReleased, Commit or Cancel",
                            got: other,
                        },
                    ))
                }
            },
        }
    }
}

/// Protocol version this target speaks (for logs).
pub fn protocol_version() -> u16 {
    PROTOCOL_VERSION
}
