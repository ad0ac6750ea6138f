//! Source side of a live migration: setup, pre-copy rounds driven by the convergence
//! model, stop-and-copy, storage handoff, commit — and a complete rollback (VM resumed,
//! disks re-attached, throttle off, dirty logging off) on any failure before commit.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::convergence::{
    Convergence, ConvergenceConfig, Decision, Prediction, Progress, ProgressTracker,
    RoundObservation,
};
use super::protocol::{
    decode_payload, encode_payload, expect_frame, write_frame, Command, DataHello, Hello, Receipt,
    RoundAck, Running, Setup, StatePayload, Welcome, PAGE_SIZE,
};
use super::seam::{SourceVm, StorageHandoff};
use super::stats::{Blackout, MigrationStats, RoundStats};
use super::tls::Transport;
use super::transport::{
    DirtyPages, MemorySender, PageHashes, PageMap, RoundControl, TransportError,
    BANDWIDTH_BYTES_PER_S_MIN,
};
use super::{MigrationError, DEFAULT_CONNECTIONS, MAX_CONNECTIONS};
use crate::GuestMem;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Default time allowed for one reply from the target.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Default connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of one live migration. Built with [`MigrateOptions::new`]: there is no default
/// transport.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// TLS (the normal case) or plaintext (an isolated migration network only).
    pub transport: Transport,
    /// The one-time ticket the target's authorizer expects for this migration
    /// (≤ [`super::tls::MAX_TICKET_BYTES`]; empty: none).
    pub ticket: Vec<u8>,
    /// Data connections (1..=[`MAX_CONNECTIONS`]).
    pub connections: usize,
    pub convergence: ConvergenceConfig,
    pub connect_timeout: Duration,
    /// The local address every connection to the target leaves from (bound before
    /// connecting, so the migration network can be filtered by source); `None`: the
    /// kernel's choice.
    pub source_ip: Option<IpAddr>,
    pub io_timeout: Duration,
    /// Nominal migration network speed, used until a round has measured it.
    pub bandwidth_hint_bytes_per_s: f64,
    /// Most bytes per second all data connections together may send, in every round
    /// (`None` or 0: unlimited; else at least [`BANDWIDTH_BYTES_PER_S_MIN`]). The
    /// convergence model measures the capped rate, so the downtime budget still holds.
    pub bandwidth_bytes_per_s_max: Option<u64>,
    /// After switchover, re-hash the paused source's memory and compare it with the
    /// receipt (one read pass over guest memory, outside the blackout and `total_us`).
    pub verify_memory: bool,
    /// The nice value of the pre-copy rounds' send threads (`None`: the caller's). They
    /// run while the guest does and, on a busy host, take the cores its vCPUs need to
    /// keep answering; at a higher nice than the vCPUs' they yield to them. Only the
    /// stop-and-copy round (the guest paused, the blackout running) and the switchover
    /// run at the caller's priority. Never raises a thread's priority.
    pub precopy_nice: Option<i32>,
    /// The nice value of the after-switchover memory re-hash ([`Self::verify_memory`]),
    /// done on its own thread so the target's vCPUs (on a shared host) and the host's
    /// other guests get the cores first (`None`: the caller's).
    pub verify_nice: Option<i32>,
    /// From the start until the pause, run the guest's vCPU threads at the calling
    /// thread's priority (see [`crate::vm::Vm::boost_vcpus`]; they get their own back at
    /// the pause, or when a failed migration resumes the guest here): the migration's own
    /// work on this host, and the target's when it shares the host, does not starve the
    /// guest while its answers are watched most closely.
    pub vcpu_boost: bool,
}

/// A [`MigrateOptions::precopy_nice`] that yields to the guest it copies: the lowest
/// priority, below the cluster's VM workers' vCPUs (nice 10). Not the default: on a host
/// whose VMs keep their cores busy it can starve pre-copy (a drain for maintenance must
/// finish), so the default keeps the caller's priority; `net-bench --precopy-nice 19`
/// measures what it does to a guest's network gap.
pub const YIELDING_PRECOPY_NICE: i32 = 19;
/// Default [`MigrateOptions::verify_nice`].
pub const DEFAULT_VERIFY_NICE: i32 = 19;

/// Default bandwidth hint: 100 MB/s (a 1 Gbit/s migration network).
pub const DEFAULT_BANDWIDTH_HINT_BYTES_PER_S: f64 = 100e6;

impl MigrateOptions {
    /// Default options over `transport`, without a ticket.
    pub fn new(transport: Transport) -> Self {
        MigrateOptions {
            transport,
            ticket: Vec::new(),
            connections: DEFAULT_CONNECTIONS,
            convergence: ConvergenceConfig::default(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            source_ip: None,
            io_timeout: DEFAULT_IO_TIMEOUT,
            bandwidth_hint_bytes_per_s: DEFAULT_BANDWIDTH_HINT_BYTES_PER_S,
            bandwidth_bytes_per_s_max: None,
            verify_memory: true,
            precopy_nice: None,
            verify_nice: Some(DEFAULT_VERIFY_NICE),
            vcpu_boost: true,
        }
    }
}

impl MigrateOptions {
    pub fn validate(&self) -> Result<(), MigrationError> {
        if self.ticket.len() > super::tls::MAX_TICKET_BYTES {
            return Err(MigrationError::InvalidOptions(format!(
                "a migration ticket has at most {} bytes, got {}",
                super::tls::MAX_TICKET_BYTES,
                self.ticket.len()
            )));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.connections) {
            return Err(MigrationError::InvalidOptions(format!(
                "connections must be 1..={MAX_CONNECTIONS}, got {}",
                self.connections
            )));
        }
        if !(self.bandwidth_hint_bytes_per_s >= 0.0 && self.bandwidth_hint_bytes_per_s.is_finite())
        {
            return Err(MigrationError::InvalidOptions(format!(
                "bandwidth hint must be a finite number of bytes/s >= 0, got {}",
                self.bandwidth_hint_bytes_per_s
            )));
        }
        if let Some(cap) = self.bandwidth_cap() {
            if cap < BANDWIDTH_BYTES_PER_S_MIN {
                return Err(MigrationError::InvalidOptions(format!(
                    "bandwidth cap of {cap} bytes/s is below the minimum of \
                     {BANDWIDTH_BYTES_PER_S_MIN} bytes/s (1 MiB/s); leave it unset or 0 for no cap"
                )));
            }
        }
        for (what, n) in [
            ("precopy_nice", self.precopy_nice),
            ("verify_nice", self.verify_nice),
        ] {
            if let Some(n) = n.filter(|n| !(-20..=19).contains(n)) {
                return Err(MigrationError::InvalidOptions(format!(
                    "{what} must be a nice value in -20..=19, got {n}"
                )));
            }
        }
        self.convergence
            .validate()
            .map_err(|e| MigrationError::InvalidOptions(e.to_string()))
    }

    /// The bandwidth cap in bytes/s, if there is one (0 counts as none).
    pub fn bandwidth_cap(&self) -> Option<u64> {
        self.bandwidth_bytes_per_s_max.filter(|b| *b > 0)
    }

    /// The bandwidth the convergence model assumes before a round has measured one: the
    /// hint, or the cap when that is lower.
    fn initial_bandwidth_bytes_per_s(&self) -> f64 {
        match self.bandwidth_cap() {
            Some(cap) => self.bandwidth_hint_bytes_per_s.min(cap as f64),
            None => self.bandwidth_hint_bytes_per_s,
        }
    }
}

/// Cancels a running migration from another thread: sets a flag the engine checks and
/// shuts the sockets down so blocked reads and writes return at once.
#[derive(Debug, Clone, Default)]
pub struct CancelToken {
    flag: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<Conn>>>,
}

impl CancelToken {
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for s in self
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            s.shutdown();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn register(&self, s: &Conn) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(s.clone());
        if self.is_cancelled() {
            s.shutdown();
        }
    }

    fn clear(&self) {
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

/// Something the caller may show while the migration runs.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationEvent {
    Phase(&'static str),
    Prediction(Prediction),
    Progress(Progress),
    Throttle(u8),
}

#[derive(Default)]
struct Undo {
    dirty_log: bool,
    throttled: bool,
    paused: bool,
    disks_detached: bool,
    released: bool,
}

/// Migrates `vm` to the target listening at `target`. On success the target runs the VM
/// and the caller must destroy its (paused) copy. On error before commit the VM runs on
/// the source again, as before the call.
pub fn migrate(
    vm: &dyn SourceVm,
    target: SocketAddr,
    opts: &MigrateOptions,
    handoff: &dyn StorageHandoff,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&MigrationEvent),
) -> Result<MigrationStats, MigrationError> {
    opts.validate()?;
    let mut undo = Undo::default();
    let mut committed = false;
    let mut control: Option<Conn> = None;
    let result = run(
        vm,
        target,
        opts,
        handoff,
        cancel,
        on_event,
        &mut undo,
        &mut committed,
        &mut control,
    );
    cancel.clear();
    match result {
        Ok(stats) => Ok(stats),
        Err(e) if committed => Err(e),
        Err(e) => {
            let e = if cancel.is_cancelled() && !matches!(e, MigrationError::Cancelled(_)) {
                MigrationError::Cancelled(Some(e.to_string()))
            } else {
                e
            };
            tracing::warn!(error = %e, "migration failed; rolling back to the source");
            if let Some(mut ctl) = control {
                // Best effort: tell the target why, so it discards its copy with a reason.
                let _ = ctl.set_write_timeout(Some(Duration::from_millis(200)));
                let reason = super::target::error_chain(&e);
                let _ = write_frame(
                    &mut ctl,
                    Command::Cancel,
                    super::protocol::truncate_reason(&reason).as_bytes(),
                );
            }
            match rollback(vm, handoff, &undo) {
                Ok(()) => Err(e),
                Err(r) => Err(MigrationError::RollbackFailed {
                    original: Box::new(e),
                    source: Box::new(r),
                }),
            }
        }
    }
}

fn rollback(
    vm: &dyn SourceVm,
    handoff: &dyn StorageHandoff,
    undo: &Undo,
) -> Result<(), MigrationError> {
    let req = vm.requirements();
    if undo.released {
        handoff
            .reclaim(&req.vm_name, &req.disks)
            .map_err(|source| MigrationError::Handoff {
                op: "reclaim",
                source,
            })?;
    }
    if undo.disks_detached {
        vm.reattach_disks().map_err(|source| MigrationError::Vm {
            op: "reattach disks",
            source,
        })?;
    }
    if undo.throttled {
        vm.set_throttle(0);
    }
    if undo.dirty_log {
        vm.stop_dirty_log().map_err(|source| MigrationError::Vm {
            op: "stop dirty log",
            source,
        })?;
    }
    if undo.paused {
        vm.resume().map_err(|source| MigrationError::Vm {
            op: "resume",
            source,
        })?;
    }
    tracing::info!(vm = %req.vm_name, "migration rolled back; vm running on the source");
    Ok(())
}

/// Ends a vCPU boost ([`MigrateOptions::vcpu_boost`]) when dropped.
struct BoostGuard<'a>(&'a dyn SourceVm);

impl Drop for BoostGuard<'_> {
    fn drop(&mut self) {
        self.0.end_vcpu_boost();
    }
}

fn vm_err(op: &'static str) -> impl FnOnce(super::seam::OpError) -> MigrationError {
    move |source| MigrationError::Vm { op, source }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn wait_ack(ctl: &mut Conn, round: u32) -> Result<RoundAck, MigrationError> {
    let p = expect_frame(ctl, Command::RoundAck)
        .map_err(MigrationError::proto("round acknowledgement"))?;
    let ack: RoundAck = decode_payload(Command::RoundAck, &p)
        .map_err(MigrationError::proto("round acknowledgement"))?;
    if ack.round != round {
        return Err(MigrationError::Protocol {
            phase: "round acknowledgement",
            source: super::protocol::ProtocolError::Malformed {
                command: Command::RoundAck,
                what: format!(
                    "acknowledged round {} while round {round} was sent",
                    ack.round
                ),
            },
        });
    }
    Ok(ack)
}

#[allow(clippy::too_many_arguments)]
fn run(
    vm: &dyn SourceVm,
    target: SocketAddr,
    opts: &MigrateOptions,
    handoff: &dyn StorageHandoff,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&MigrationEvent),
    undo: &mut Undo,
    committed: &mut bool,
    control: &mut Option<Conn>,
) -> Result<MigrationStats, MigrationError> {
    let start = Instant::now();
    // Ended at the pause, and on every way out of this function before it.
    let boost = opts.vcpu_boost.then(|| {
        if let Ok(nice) = crate::kvm::nice() {
            vm.boost_vcpus(nice, opts.convergence.deadline);
        }
        BoostGuard(vm)
    });
    let req = vm.requirements();
    let mem = vm.memory();
    let map = PageMap::from_memory(mem);
    let connect = |what| -> Result<Conn, MigrationError> {
        let s = Conn::connect(
            &opts.transport,
            opts.source_ip,
            target,
            opts.connect_timeout,
            opts.io_timeout,
        )
        .map_err(|source| MigrationError::Connect {
            addr: target,
            source,
        })?;
        s.set_read_timeout(Some(opts.io_timeout))
            .and_then(|_| s.set_write_timeout(Some(opts.io_timeout)))
            .map_err(|e| MigrationError::Connect {
                addr: target,
                source: super::conn::ConnError::Io(e),
            })?;
        cancel.register(&s);
        tracing::debug!(%target, what, tls = s.is_tls(), "migration connection open");
        Ok(s)
    };

    // --- Setup ---------------------------------------------------------------------
    on_event(&MigrationEvent::Phase("setup"));
    let mut ctl = connect("control")?;
    *control = Some(ctl.clone());
    let hello = Hello {
        vm_name: req.vm_name.clone(),
        ticket: opts.ticket.clone(),
        connections: opts.connections as u16,
    };
    let p = encode_payload(Command::Hello, &hello).map_err(MigrationError::proto("hello"))?;
    write_frame(&mut ctl, Command::Hello, &p).map_err(MigrationError::proto("hello"))?;
    let p = expect_frame(&mut ctl, Command::Welcome).map_err(MigrationError::proto("hello"))?;
    let welcome: Welcome =
        decode_payload(Command::Welcome, &p).map_err(MigrationError::proto("hello"))?;
    let session_id = welcome.session_id;
    let setup = Setup {
        requirements: req.clone(),
        config: vm.config_blob().map_err(vm_err("serialize config"))?,
    };
    let p = encode_payload(Command::Setup, &setup).map_err(MigrationError::proto("setup"))?;
    write_frame(&mut ctl, Command::Setup, &p).map_err(MigrationError::proto("setup"))?;
    expect_frame(&mut ctl, Command::SetupOk).map_err(MigrationError::proto("setup"))?;
    let mut data = Vec::with_capacity(opts.connections);
    for index in 0..opts.connections {
        let mut s = connect("data")?;
        let p = encode_payload(
            Command::DataHello,
            &DataHello {
                session_id,
                index: index as u16,
            },
        )
        .map_err(MigrationError::proto("data connection setup"))?;
        write_frame(&mut s, Command::DataHello, &p)
            .map_err(MigrationError::proto("data connection setup"))?;
        data.push(s);
    }
    let mut sender = MemorySender::new(data).with_bandwidth_cap(opts.bandwidth_cap());
    let setup_us = us(start.elapsed());
    let connections = opts.connections;
    tracing::info!(vm = %req.vm_name, %target, connections, setup_us, "migration setup done");

    // --- Pre-copy ------------------------------------------------------------------
    on_event(&MigrationEvent::Phase("pre-copy"));
    let hashes = PageHashes::new_zeroed(map.total_pages());
    vm.start_dirty_log().map_err(vm_err("start dirty log"))?;
    undo.dirty_log = true;
    let mut conv = Convergence::new(opts.convergence)
        .with_bandwidth_hint(opts.initial_bandwidth_bytes_per_s());
    let mut progress = ProgressTracker::default();
    let mut rounds = Vec::new();
    let mut pages = DirtyPages::all(map.total_pages());
    // After the dirty log is on: a page written from now on is in the next dirty log.
    let untouched = skip_never_written(mem, &map, &mut pages);
    let mut round = 0u32;
    let mut wire_bytes = 0u64;
    let mut zero_skipped = 0u64;
    // Prediction before anything moves: the whole guest at the hinted bandwidth, dirty
    // rate not known yet (refined after every round).
    let initial = conv.predict(map.total_bytes());
    on_event(&MigrationEvent::Prediction(initial));
    tracing::info!(vm = %req.vm_name, remaining_ms = initial.remaining.map(|d| d.as_millis() as u64),
        "migration prediction before pre-copy");
    let mut first_prediction = None;
    // The model's latest estimate of the time left, shown while a round runs.
    let mut eta_ms = initial.remaining.map_or(u64::MAX, |d| d.as_millis() as u64);
    let flag = &cancel.flag;
    let stop_at = start + opts.convergence.deadline;
    let send_err = |e: TransportError| {
        if cancel.is_cancelled() {
            MigrationError::Cancelled(None)
        } else {
            MigrationError::Transport(e)
        }
    };
    loop {
        if cancel.is_cancelled() {
            return Err(MigrationError::Cancelled(None));
        }
        let t0 = Instant::now();
        let round_bytes = pages.count() as u64 * PAGE_SIZE as u64;
        // A long (e.g. capped) round shows its progress while it runs.
        let mut report = |so_far: u64| {
            let secs = t0.elapsed().as_secs_f64();
            let raw = Progress {
                bytes_sent: wire_bytes + so_far,
                bytes_remaining: round_bytes.saturating_sub(so_far),
                fraction_done: 0.0,
                rate_bytes_per_s: if secs > 0.0 {
                    so_far as f64 / secs
                } else {
                    0.0
                },
                eta_ms,
                round,
                throttle_percent: conv.throttle_percent(),
            };
            let p = progress.update(raw, start.elapsed().as_millis() as u64);
            on_event(&MigrationEvent::Progress(p));
        };
        let control = RoundControl {
            cancel: flag,
            stop_at: Some(stop_at),
            on_progress: Some(&mut report),
            nice: opts.precopy_nice,
        };
        let sent = match sender.send_round_with(mem, &map, &hashes, &pages, round, control) {
            Ok(sent) => sent,
            Err(TransportError::DeadlineReached) if !cancel.is_cancelled() => {
                return Err(MigrationError::GaveUp(format!(
                    "deadline of {:?} reached during pre-copy round {round} ({round_bytes} \
                     dirty bytes to send in it{})",
                    opts.convergence.deadline,
                    opts.bandwidth_cap()
                        .map(|c| format!(", bandwidth capped at {c} B/s"))
                        .unwrap_or_default()
                )))
            }
            Err(e) => return Err(send_err(e)),
        };
        wait_ack(&mut ctl, round)?;
        let duration = t0.elapsed();
        let dirty = vm.dirty_pages(&map).map_err(vm_err("read dirty log"))?;
        let dirty_bytes = dirty.count() as u64 * PAGE_SIZE as u64;
        let untouched_pages = if round == 0 { untouched } else { 0 };
        wire_bytes += sent.wire_bytes;
        zero_skipped += sent.zero_pages_skipped + untouched_pages;
        rounds.push(RoundStats {
            round,
            data_pages: sent.data_pages,
            zero_pages_sent: sent.zero_pages_sent,
            zero_pages_skipped: sent.zero_pages_skipped + untouched_pages,
            untouched_pages,
            wire_bytes: sent.wire_bytes,
            duration_us: us(duration),
            dirty_pages_after: dirty.count() as u64,
            throttle_percent: conv.throttle_percent(),
        });
        let decision = conv.observe(&RoundObservation {
            bytes_sent: sent.wire_bytes,
            pages_processed: pages.count() as u64,
            duration,
            dirty_bytes,
            elapsed: start.elapsed(),
        });
        let prediction = conv.predict(dirty_bytes);
        if first_prediction.is_none() {
            first_prediction = Some(prediction.into());
        }
        on_event(&MigrationEvent::Prediction(prediction));
        eta_ms = prediction
            .remaining
            .map_or(u64::MAX, |d| d.as_millis() as u64);
        let raw = Progress {
            bytes_sent: wire_bytes,
            bytes_remaining: dirty_bytes,
            fraction_done: 0.0,
            rate_bytes_per_s: conv.bandwidth_bytes_per_s(),
            eta_ms,
            round,
            throttle_percent: conv.throttle_percent(),
        };
        let p = progress.update(raw, start.elapsed().as_millis() as u64);
        on_event(&MigrationEvent::Progress(p));
        tracing::debug!(
            round,
            data_pages = sent.data_pages,
            dirty_pages = dirty.count(),
            duration_us = us(duration),
            ?decision,
            "pre-copy round done"
        );
        pages = dirty;
        round += 1;
        match decision {
            Decision::StopAndCopy => break,
            Decision::AnotherRound => {}
            Decision::Throttle { percent } => {
                vm.set_throttle(percent);
                undo.throttled = true;
                on_event(&MigrationEvent::Throttle(percent));
            }
            Decision::GiveUp { reason } => return Err(MigrationError::GaveUp(reason)),
        }
    }

    // --- Stop and copy -------------------------------------------------------------
    on_event(&MigrationEvent::Phase("stop-and-copy"));
    if cancel.is_cancelled() {
        return Err(MigrationError::Cancelled(None));
    }
    vm.flush_disks().map_err(vm_err("flush disks"))?;
    let pause_at = Instant::now();
    vm.pause().map_err(vm_err("pause"))?;
    undo.paused = true;
    drop(boost);
    let pause_us = us(pause_at.elapsed());
    let t_log = Instant::now();
    let mut last = vm.dirty_pages(&map).map_err(vm_err("read dirty log"))?;
    last.union_with(&pages);
    let dirty_log_us = us(t_log.elapsed());
    let t0 = Instant::now();
    let sent = sender
        .send_round(mem, &map, &hashes, &last, round, flag)
        .map_err(send_err)?;
    let final_send_us = us(t0.elapsed());
    let t_ack = Instant::now();
    wait_ack(&mut ctl, round)?;
    let final_ack_us = us(t_ack.elapsed());
    wire_bytes += sent.wire_bytes;
    zero_skipped += sent.zero_pages_skipped;
    rounds.push(RoundStats {
        round,
        data_pages: sent.data_pages,
        zero_pages_sent: sent.zero_pages_sent,
        zero_pages_skipped: sent.zero_pages_skipped,
        untouched_pages: 0,
        wire_bytes: sent.wire_bytes,
        duration_us: us(t0.elapsed()),
        dirty_pages_after: 0,
        throttle_percent: conv.throttle_percent(),
    });
    let final_copy_us = us(pause_at.elapsed());

    let t_state = Instant::now();
    let state = vm.save_state().map_err(vm_err("save state"))?;
    let p = encode_payload(Command::State, &StatePayload { state })
        .map_err(MigrationError::proto("state transfer"))?;
    write_frame(&mut ctl, Command::State, &p).map_err(MigrationError::proto("state transfer"))?;
    let state_us = us(t_state.elapsed());

    // --- Storage handoff -----------------------------------------------------------
    on_event(&MigrationEvent::Phase("storage-handoff"));
    let t_handoff = Instant::now();
    vm.detach_disks().map_err(vm_err("detach disks"))?;
    undo.disks_detached = true;
    handoff
        .release(&req.vm_name, &req.disks)
        .map_err(|source| MigrationError::Handoff {
            op: "release",
            source,
        })?;
    undo.released = true;
    write_frame(&mut ctl, Command::StorageReleased, &[])
        .map_err(MigrationError::proto("storage handoff"))?;
    expect_frame(&mut ctl, Command::Ready).map_err(MigrationError::proto("storage handoff"))?;
    let handoff_us = us(t_handoff.elapsed());
    if cancel.is_cancelled() {
        return Err(MigrationError::Cancelled(None));
    }

    // --- Commit / resume on the target --------------------------------------------
    on_event(&MigrationEvent::Phase("switchover"));
    let t_resume = Instant::now();
    write_frame(&mut ctl, Command::Commit, &[]).map_err(MigrationError::proto("commit"))?;
    ctl.flush()
        .map_err(|e| MigrationError::proto("commit")(e.into()))?;
    *committed = true;
    let p = expect_frame(&mut ctl, Command::Running).map_err(MigrationError::CommitUncertain)?;
    let running: Running =
        decode_payload(Command::Running, &p).map_err(MigrationError::CommitUncertain)?;
    let resume_us = us(t_resume.elapsed());
    let blackout_us = us(pause_at.elapsed());
    tracing::info!(vm = %req.vm_name, %target, blackout_us, final_copy_us, pause_us, dirty_log_us,
        final_send_us, final_pages = sent.data_pages, final_ack_us, state_us, handoff_us,
        resume_us, restore_us = running.restore_us, target_resume_us = running.resume_us,
        "migration switchover");

    // --- After switchover: receipt -------------------------------------------------
    let source_digest = hashes.digest();
    let _ = sender.finish();
    let target_digest = match expect_frame(&mut ctl, Command::Receipt)
        .and_then(|p| decode_payload::<Receipt>(Command::Receipt, &p))
    {
        Ok(r) => Some(r.memory_digest),
        Err(e) => {
            // Not a memory divergence: the receipt itself is missing (counted as a mismatch).
            tracing::error!(error = %e, "no memory receipt from the target");
            None
        }
    };
    let total_us = us(start.elapsed());
    let t_verify = Instant::now();
    // The source VM is paused for good: its memory is the guest memory as of switchover.
    let source_memory_digest = if opts.verify_memory {
        // On its own thread, at its own priority: the VM now runs on the target.
        let rehash = || {
            if let Some(n) = opts.verify_nice {
                super::transport::yield_to(n);
            }
            PageHashes::digest_of_memory(mem, &map)
        };
        let rehashed = std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("mig-verify".into())
                .spawn_scoped(s, rehash)
                .map(|h| h.join())
        });
        // Committed: a failure here is reported, it cannot undo the migration.
        match rehashed {
            Ok(Ok(Ok(d))) => Some(d),
            Ok(Ok(Err(e))) => {
                tracing::error!(error = %e, "cannot re-hash the source memory");
                None
            }
            Ok(Err(_)) => {
                tracing::error!("the source memory re-hash panicked");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start the source memory re-hash");
                None
            }
        }
    } else {
        None
    };
    let verify_us = us(t_verify.elapsed());
    if target_digest != Some(source_digest)
        || source_memory_digest.is_some_and(|d| d != source_digest)
    {
        tracing::error!(
            source_digest,
            ?source_memory_digest,
            ?target_digest,
            "memory receipts differ"
        );
    }
    let p = progress.finish(wire_bytes, total_us / 1000);
    on_event(&MigrationEvent::Progress(p));
    on_event(&MigrationEvent::Phase("done"));
    Ok(MigrationStats {
        connections: opts.connections,
        guest_bytes: map.total_bytes(),
        rounds,
        wire_bytes,
        zero_pages_skipped: zero_skipped,
        untouched_pages: untouched,
        bandwidth_bytes_per_s: conv.bandwidth_bytes_per_s(),
        dirty_rate_bytes_per_s: conv.dirty_rate_bytes_per_s(),
        max_throttle_percent: conv.throttle_percent(),
        setup_us,
        total_us,
        blackout: Blackout {
            final_copy_us,
            pause_us,
            dirty_log_us,
            final_send_us,
            final_ack_us,
            state_us,
            handoff_us,
            resume_us,
            total_us: blackout_us,
        },
        first_prediction,
        source_digest,
        source_memory_digest,
        target_digest,
        verify_us,
    })
}

/// Takes out of `pages` (round 0: every page) the pages of `mem` that were never written
/// and so read as zero, as the target's fresh memory does: they are skipped like zero pages
/// without being read (their entry in [`PageHashes`] stays the zero page's). Private
/// anonymous memory only (see [`crate::memory::never_written_pages`]); other memory, or a
/// page map that cannot be read, is read page by page as before. Call it only after the
/// dirty log is on, so a page written after the look is in the next round. Returns the
/// pages taken out.
pub(crate) fn skip_never_written(mem: &GuestMem, map: &PageMap, pages: &mut DirtyPages) -> u64 {
    let mut skipped = 0u64;
    for region in mem.iter() {
        let Some(first) = map.index_of(region.start_addr().0) else {
            continue;
        };
        let region_pages = region.len() as usize / PAGE_SIZE;
        if let Some(bits) = crate::memory::never_written_pages(region) {
            skipped += pages.remove_region_bitmap(first, region_pages, &bits) as u64;
        }
    }
    skipped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_values_outside_the_kernels_range_are_refused_with_the_field() {
        let ok = MigrateOptions::new(Transport::Plaintext);
        ok.validate().unwrap();
        for (o, what) in [
            (
                MigrateOptions {
                    precopy_nice: Some(20),
                    ..ok.clone()
                },
                "precopy_nice",
            ),
            (
                MigrateOptions {
                    verify_nice: Some(-21),
                    ..ok.clone()
                },
                "verify_nice",
            ),
        ] {
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
        }
        MigrateOptions {
            precopy_nice: None,
            verify_nice: Some(-20),
            ..ok
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn connections_leave_from_the_source_address_when_one_is_given() {
        let l = std::net::TcpListener::bind("127.0.2.1:0").unwrap();
        let target = l.local_addr().unwrap();
        let from: IpAddr = [127, 0, 2, 7].into();
        let t = Duration::from_secs(5);
        let _s = Conn::connect(&Transport::Plaintext, Some(from), target, t, t).unwrap();
        assert_eq!(l.accept().unwrap().1.ip(), from);
        let _s = Conn::connect(&Transport::Plaintext, None, target, t, t).unwrap();
        assert_ne!(l.accept().unwrap().1.ip(), from, "the kernel's choice");
    }
}
