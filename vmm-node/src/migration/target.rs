//! Target side of a live migration: accepts a session, checks compatibility, builds a
//! paused skeleton VM, receives memory on N data connections, restores state, opens the
//! disks after the storage handoff and resumes only on Commit.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::protocol::{
    decode_payload, decode_reason, encode_payload, expect_frame, read_frame, write_frame,
    write_refuse, Command, DataHello, Frame, Hello, ProtocolError, Receipt, RoundAck, Running,
    Setup, StatePayload, PROTOCOL_VERSION,
};
use super::seam::{check_compatibility, NodeFacts, StorageHandoff, TargetFactory, TargetVm};
use super::transport::{receive_data_connection, DataEvent, LastHeard, PageHashes, PageMap};
use super::{MigrationError, MAX_CONNECTIONS};

/// Default time the target waits for the source at any step.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a target waiting for its source looks at [`Abandon`].
pub const ABANDON_POLL: Duration = Duration::from_millis(100);

/// Lets the node embedding the target give up the incoming migration in progress — its
/// source is known to be gone (e.g. the cluster failed the VM over to this node after the
/// source host lost power, so no connection reset will ever arrive) — instead of waiting
/// out `io_timeout`. Seen within [`ABANDON_POLL`]; the VM is never resumed once abandoned.
/// Cleared when the next session is accepted.
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

/// Target options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiveOptions {
    /// Replaces the node facts (tests simulate another CPU vendor or less memory).
    pub facts_override: Option<NodeFacts>,
    pub failpoint: Option<(Failpoint, FailAction)>,
    pub io_timeout: Duration,
    pub abandon: Abandon,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            facts_override: None,
            failpoint: None,
            io_timeout: DEFAULT_IO_TIMEOUT,
            abandon: Abandon::default(),
        }
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

/// Accepts sessions on `listener` until one ends with the VM running here. Sessions that
/// fail (garbage, refused, source gone, cancelled) are logged and the next is accepted.
pub fn serve(
    listener: &TcpListener,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    loop {
        match receive_one(listener, factory, handoff, opts) {
            Ok(r) => return Ok(r),
            Err(e @ MigrationError::Failpoint(_)) => return Err(e),
            Err(e) => tracing::warn!(error = %error_chain(&e), "incoming migration failed"),
        }
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

/// Handles one incoming session.
pub fn receive_one(
    listener: &TcpListener,
    factory: &dyn TargetFactory,
    handoff: &dyn StorageHandoff,
    opts: &ReceiveOptions,
) -> Result<Received, MigrationError> {
    let (mut ctl, peer) = listener
        .accept()
        .map_err(|e| MigrationError::proto("accept")(e.into()))?;
    opts.abandon.clear();
    let io = |e: std::io::Error| MigrationError::proto("setup")(e.into());
    ctl.set_read_timeout(Some(opts.io_timeout)).map_err(io)?;
    ctl.set_write_timeout(Some(opts.io_timeout)).map_err(io)?;
    ctl.set_nodelay(true).map_err(io)?;
    tracing::info!(%peer, "incoming migration");

    // --- Hello / version ---------------------------------------------------------------
    let hello: Hello = match read_frame(&mut ctl) {
        Ok(f) if f.command == Command::Hello => {
            decode_payload(Command::Hello, &f.payload).map_err(MigrationError::proto("hello"))?
        }
        Ok(f) => {
            let _ = write_refuse(&mut ctl, &format!("expected Hello, got {:?}", f.command));
            return Err(MigrationError::proto("hello")(ProtocolError::Unexpected {
                expected: "Hello",
                got: f.command,
            }));
        }
        Err(e) => {
            let reason = match &e {
                ProtocolError::VersionMismatch { ours, theirs } => format!(
                    "migration protocol version {theirs} is not supported: \
                     this node speaks version {ours}"
                ),
                other => format!("not a migration session: {other}"),
            };
            let _ = write_refuse(&mut ctl, &reason);
            return Err(MigrationError::proto("hello")(e));
        }
    };
    let n = usize::from(hello.connections);
    if !(1..=MAX_CONNECTIONS).contains(&n) {
        let reason = format!("{n} data connections requested, 1..={MAX_CONNECTIONS} allowed");
        let _ = write_refuse(&mut ctl, &reason);
        return Err(MigrationError::InvalidOptions(reason));
    }
    write_frame(&mut ctl, Command::Welcome, &[]).map_err(MigrationError::proto("hello"))?;

    // --- Setup: compatibility, skeleton VM ------------------------------------------
    let p = expect_frame(&mut ctl, Command::Setup).map_err(MigrationError::proto("setup"))?;
    let setup: Setup =
        decode_payload(Command::Setup, &p).map_err(MigrationError::proto("setup"))?;
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
    let data = accept_data(listener, hello.session_id, n, opts.io_timeout)?;
    let vm_name = setup.requirements.vm_name.clone();
    let disks = setup.requirements.disks.clone();
    let hashes = PageHashes::new_zeroed(map.total_pages());
    let mut shutters: Vec<TcpStream> = data.iter().filter_map(|s| s.try_clone().ok()).collect();
    let ctl_reader = ctl.try_clone().map_err(io)?;
    shutters.push(ctl_reader.try_clone().map_err(io)?);
    let shutdown_all = |shutters: &[TcpStream]| {
        for s in shutters {
            let _ = s.shutdown(Shutdown::Both);
        }
    };

    let mem = vm.memory();
    let mut acquired = false;
    let heard = LastHeard::default();
    let outcome = std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Event>(4 * MAX_CONNECTIONS);
        for (index, conn) in data.into_iter().enumerate() {
            let (tx, map, hashes, heard) = (tx.clone(), &map, &hashes, &heard);
            s.spawn(move || receive_data_connection(conn, index, mem, map, hashes, &tx, heard));
        }
        {
            let tx = tx.clone();
            let mut r = ctl_reader;
            // Control frames, forwarded until the connection ends. Timeouts are handled
            // by the coordinator, so reads here block without a deadline.
            let _ = r.set_read_timeout(None);
            s.spawn(move || loop {
                let f = read_frame(&mut r);
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

fn accept_data(
    listener: &TcpListener,
    session_id: u64,
    n: usize,
    timeout: Duration,
) -> Result<Vec<TcpStream>, MigrationError> {
    let io = |e: std::io::Error| MigrationError::proto("data connection setup")(e.into());
    let deadline = Instant::now() + timeout;
    let mut slots: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    listener.set_nonblocking(true).map_err(io)?;
    let result = (|| {
        while slots.iter().any(Option::is_none) {
            if Instant::now() >= deadline {
                return Err(MigrationError::Timeout("the data connections"));
            }
            let mut s = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(io(e)),
            };
            s.set_nonblocking(false).map_err(io)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(io)?;
            let hello = expect_frame(&mut s, Command::DataHello)
                .and_then(|p| decode_payload::<DataHello>(Command::DataHello, &p));
            match hello {
                Ok(h)
                    if h.session_id == session_id
                        && usize::from(h.index) < n
                        && slots[usize::from(h.index)].is_none() =>
                {
                    s.set_read_timeout(Some(timeout)).map_err(io)?;
                    slots[usize::from(h.index)] = Some(s);
                }
                Ok(h) => tracing::warn!(
                    index = h.index,
                    "data connection for another session or slot dropped"
                ),
                Err(e) => tracing::warn!(error = %e, "bad data connection dropped"),
            }
        }
        Ok(())
    })();
    listener.set_nonblocking(false).map_err(io)?;
    result?;
    Ok(slots.into_iter().flatten().collect())
}

#[allow(clippy::too_many_arguments)]
fn coordinate(
    rx: &std::sync::mpsc::Receiver<Event>,
    ctl: &mut TcpStream,
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
                    stats.memory_digest = hashes.digest();
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "could not confirm running to the source");
                    } else if let Ok(p) = encode_payload(
                        Command::Receipt,
                        &Receipt {
                            memory_digest: stats.memory_digest,
                        },
                    ) {
                        let _ = write_frame(ctl, Command::Receipt, &p);
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
