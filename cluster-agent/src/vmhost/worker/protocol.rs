//! The control channel between an agent and a VM worker process, version 1.
//!
//! Transport: a Unix stream socket `sock` in the VM's worker directory (the directory is
//! 0700 and the socket 0600, so only the agent's user connects). Framing: one JSON value
//! per line, at most [`LINE_BYTES_MAX`] bytes including the newline; a longer line is a
//! protocol error that closes the connection.
//!
//! ```text
//! agent                                   worker
//!   ── spawn `cluster-agent vm-worker --dir D` (D/start.json: spec, grants, lease) ──▶
//!   ◀── stdout: one line, Started{info} or Failed{message}; then only the socket ──
//!   ── Hello{version} ─────────────────────▶  (first request of every connection)
//!   ◀── Hello{version, pid, info} ─────────   (a version other than ours: Error)
//!   ── Lease{until_ns} ───────────────────▶  deadline = max(deadline, until_ns)
//!   ◀── Done ─────────────────────────────
//!   ── Info ───────────────────────────────▶ ◀── Info{info}
//!   ── Stop ───────────────────────────────▶ (vCPUs stopped, disks flushed and closed)
//!   ◀── Stopped{release, disk_errors} ─────   then the worker exits 0
//!   ── Fence ──────────────────────────────▶ (vCPUs stopped, nothing flushed or released)
//!   ◀── Done ─────────────────────────────   then the worker exits
//!   ── Console ────────────────────────────▶ ◀── Console{recent} ◀── Line{line} ...
//!   live migration out (a connection of its own; the worker runs the engine):
//!   ── MigrateOut{target, options, tls} ──▶ ◀── Event{..} ... (progress)
//!                                          ◀── LockCommit{cmds} / LockReclaim{disks}
//!   ── LockResult{grants | error} ────────▶ (the agent committed them through Raft)
//!                                          ◀── Migrated{stats, handed_off} | MigrationFailed
//!   ── CancelMigration (another connection) ▶ ◀── Done
//!   live migration in (a worker spawned with `incoming`, its memory the agent's memfd):
//!   ── AnnounceNics ───────────────────────▶ ◀── Done     (the source's state arrived)
//!   ── Restore{state_len, layout, grants} + state_len raw bytes ─▶ ◀── Done (devices, vCPUs, disks)
//!   ── Resume ─────────────────────────────▶ ◀── Done     (the VM runs; a normal worker)
//!   ── ReleaseIncoming{to} ────────────────▶ ◀── Released{cmds} (failed: disks closed for `to`)
//! ```
//!
//! Requests on one connection are answered in order, one response each (a `Console`
//! connection carries only lines after its answer). The worker stops its VM on its own,
//! without flushing or releasing anything, when its lease deadline passes; from then on
//! every `Info` says `fenced` and `Lease` is refused.
//!
//! Version rule: a change of any message's meaning or shape bumps [`VERSION`]; an agent
//! adopts only workers that speak its version (others are left to their lease and
//! reported). New requests may be added without a bump: a worker that does not know one
//! answers `Error` naming it (so an adopted worker of an older build refuses a live
//! migration instead of misreading it).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use csv_volume::{LockCommand, LockGrant, NodeId, VolumeConfig};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::vmhost::{DiskStatus, VmSpec};

/// The protocol version this build speaks.
pub const VERSION: u32 = 2;

/// Longest line either side accepts (the console's retained log fits with room).
pub const LINE_BYTES_MAX: usize = 1 << 20;

/// Largest saved VM state a `Restore` carries.
pub const STATE_BYTES_MAX: u64 = 64 << 20;

/// Largest `start.json` a worker reads.
pub const START_FILE_BYTES_MAX: u64 = 1 << 20;

/// What the agent writes to `start.json` before it spawns a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartFile {
    pub version: u32,
    pub node: NodeId,
    pub spec: VmSpec,
    /// One grant per disk of `spec` (from the committed `Acquire`s or `ForceTakeover`s).
    pub grants: Vec<LockGrant>,
    /// Failover restart: wait this long for the old owner's lease before installing the
    /// new fencing token.
    pub takeover_wait_ms: Option<u64>,
    /// The first lease: the VM may run until then (`CLOCK_MONOTONIC` ns,
    /// `vmm_node::kvm::monotonic_ns`) unless the agent renews it.
    pub lease_until_ns: u64,
    pub volumes: Vec<VolumeConfig>,
    /// VM networks of the node (name → bridge).
    pub networks: std::collections::BTreeMap<String, String>,
    pub image_dirs: Vec<PathBuf>,
    /// Restore the VM from this quick-migration image instead of booting it.
    #[serde(default)]
    pub restore_from: Option<PathBuf>,
    /// Live migration target: create the VM paused around this shared guest memory (a
    /// memfd the agent holds, reached through `/proc/<agent>/fd/<n>`) and wait for
    /// `Restore`; the agent's migration engine writes the guest's pages into it.
    #[serde(default)]
    pub incoming_memory: Option<PathBuf>,
    /// The VM's cgroup directories (one per hierarchy), which the worker joins first;
    /// none when the node runs its workers without cgroups.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

/// TLS material for a worker's outgoing migration connections (PEM; the node's current
/// certificate and key, the cluster CA). `None` in a request: plaintext, which the agent
/// sends only when the operator configured it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPem {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.write_str("TlsPem { .. }")
    }
}

/// A migration progress event on the wire (`vmm_node`'s `MigrationEvent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WireEvent {
    Phase(String),
    Prediction(vmm_node::migration::convergence::Prediction),
    Progress(vmm_node::migration::convergence::Progress),
    Throttle(u8),
}

/// How a live migration run by a worker ended without success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Rolled back: the VM runs on in the worker.
    RolledBack,
    /// Cancelled on request and rolled back.
    Cancelled,
    /// Commit sent, the target's answer lost: the VM stays paused in the worker.
    CommitUncertain,
}

/// The worker's one line on stdout once its VM runs (or could not be started).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartReport {
    Started {
        pid: u32,
        info: Box<WorkerInfo>,
        /// Restored from a quick-migration image: the restore's figures.
        restored: Option<crate::vmhost::QuickRestoreStats>,
    },
    Failed {
        message: String,
    },
}

/// A request of the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "op")]
pub enum Request {
    Hello {
        version: u32,
    },
    Info,
    Lease {
        /// `CLOCK_MONOTONIC` ns: an absolute time on the host's one monotonic clock, so a
        /// renewal read late (a worker that was stopped) grants nothing more than when
        /// it was sent.
        until_ns: u64,
    },
    Stop,
    Fence,
    Console,
    /// The VM's cumulative CPU time and resident memory (see `vmm_node::usage`).
    Usage,
    /// Hot-add `disk`, opened with `grant`, in the first free slot.
    AttachDisk {
        disk: crate::vmhost::DiskSpec,
        grant: LockGrant,
    },
    /// Hot-remove `disk` (flushed and closed first).
    DetachDisk {
        disk: csv_volume::DiskName,
    },
    /// Hot-add `nic` (MAC and slot from the committed record): its TAP on the network's
    /// bridge, then the device. Answered `Attached { slot }`.
    AttachNic {
        nic: crate::vmhost::spec::NicSpec,
    },
    /// Hot-remove the NIC with `mac` and delete its TAP. Answered `Done`.
    DetachNic {
        mac: String,
    },
    /// Quick migration, source half: save the VM into the shared `volume` for
    /// `target_node` (disks closed for it); the worker exits once saved.
    QuickSave {
        volume: String,
        target_node: NodeId,
    },
    /// Live migration, source half: run the engine to `target_addr` (the rest of this
    /// connection is the migration's, see the module map).
    MigrateOut {
        target_node: NodeId,
        target_addr: std::net::SocketAddr,
        options: crate::vmhost::LiveOptions,
        tls: Option<TlsPem>,
    },
    /// The agent's answer to `LockCommit` (no grants) or `LockReclaim`.
    LockResult {
        result: Result<Vec<LockGrant>, String>,
    },
    /// Cancels the live migration running in this worker (before its switchover).
    CancelMigration,
    /// Live migration, target half: restore the saved device and vCPU state (the
    /// `state_len` bytes that follow this line on the connection, at most
    /// [`STATE_BYTES_MAX`]) and open the disks of `layout` with `grants` (handed over by
    /// the source).
    Restore {
        state_len: u64,
        layout: Vec<crate::vmhost::SlotDisk>,
        grants: Vec<LockGrant>,
    },
    /// Live migration, target half: the paused source's state arrived; announce the
    /// incoming VM's NICs now (best effort), so frames sent to it from here on wait in
    /// this host's TAPs for the resume. Answered `Done`.
    AnnounceNics,
    /// Resumes the restored VM: from here it is an ordinary worker.
    Resume,
    /// The incoming migration failed: close the disks opened by `Restore` for `to` (the
    /// source) and exit.
    ReleaseIncoming {
        to: NodeId,
    },
}

/// The worker's answer to one request (or one console line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Hello {
        version: u32,
        pid: u32,
        info: WorkerInfo,
    },
    Info {
        info: WorkerInfo,
    },
    Done,
    Stopped {
        release: Vec<LockCommand>,
        disk_errors: Vec<String>,
    },
    Console {
        recent: String,
    },
    QuickSaved {
        image: crate::vmhost::QuickImage,
    },
    Attached {
        slot: u8,
    },
    /// `None`: not running, or not measurable on this host.
    Usage {
        usage: Option<vmm_node::usage::VmUsage>,
    },
    Detached {
        release: LockCommand,
    },
    /// Live migration out: a progress event.
    Event {
        event: WireEvent,
    },
    /// Live migration out: commit these lock commands, answer with `LockResult`.
    LockCommit {
        cmds: Vec<LockCommand>,
    },
    /// Live migration out (rolled back after the commit): bring `disks` back to `node`,
    /// answer with `LockResult` carrying the grants.
    LockReclaim {
        node: NodeId,
        disks: Vec<crate::vmhost::DiskSpec>,
    },
    Migrated {
        stats: Box<vmm_node::migration::stats::MigrationStats>,
        handed_off: Vec<LockCommand>,
    },
    MigrationFailed {
        kind: FailureKind,
        message: String,
    },
    Released {
        cmds: Vec<LockCommand>,
    },
    /// A console line, stamped by the worker when the VM printed it.
    Line {
        line: String,
        at_unix_us: u64,
    },
    Error {
        message: String,
    },
}

/// The VM as its worker sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub status: vmm_node::VmStatus,
    pub spec: VmSpec,
    pub disks: Vec<DiskStatus>,
    /// The lease ran out and the worker stopped the VM on its own.
    pub fenced: bool,
}

/// Errors of the framing.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o on the worker control socket")]
    Io(#[source] std::io::Error),
    #[error("a control line longer than {LINE_BYTES_MAX} bytes")]
    TooLong,
    #[error("a control line that is not a valid message")]
    Decode(#[source] serde_json::Error),
    #[error("the other side closed the control connection")]
    Closed,
}

/// Writes `msg` as one line and flushes.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), FrameError> {
    let mut line = serde_json::to_vec(msg).map_err(FrameError::Decode)?;
    if line.len() >= LINE_BYTES_MAX {
        return Err(FrameError::TooLong);
    }
    line.push(b'\n');
    w.write_all(&line).map_err(FrameError::Io)?;
    w.flush().map_err(FrameError::Io)
}

/// Reads one line (at most [`LINE_BYTES_MAX`] bytes, never more into memory) and decodes it.
pub fn read_frame<T: DeserializeOwned>(r: &mut impl BufRead) -> Result<T, FrameError> {
    let mut line = Vec::new();
    let n = std::io::Read::take(&mut *r, LINE_BYTES_MAX as u64)
        .read_until(b'\n', &mut line)
        .map_err(FrameError::Io)?;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n >= LINE_BYTES_MAX {
            FrameError::TooLong
        } else {
            FrameError::Closed
        });
    }
    serde_json::from_slice(&line).map_err(FrameError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_lines_are_errors_not_panics() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Lease { until_ns: 900 }).unwrap();
        write_frame(&mut buf, &Request::Stop).unwrap();
        let mut r = std::io::Cursor::new(buf);
        assert_eq!(
            read_frame::<Request>(&mut r).unwrap(),
            Request::Lease { until_ns: 900 }
        );
        assert_eq!(read_frame::<Request>(&mut r).unwrap(), Request::Stop);
        assert!(matches!(
            read_frame::<Request>(&mut r),
            Err(FrameError::Closed)
        ));

        for bad in [
            &b"{\"op\":\"lease\"}\n"[..],
            b"{\"op\":\"reboot-the-host\"}\n",
            b"\xff\xfe\n",
            b"{\"op\":\"stop\"", // no newline: cut short
        ] {
            let r = read_frame::<Request>(&mut std::io::Cursor::new(bad));
            assert!(r.is_err(), "{bad:?} decoded as {r:?}");
        }
        let mut long = vec![b' '; LINE_BYTES_MAX + 10];
        long.push(b'\n');
        assert!(matches!(
            read_frame::<Request>(&mut std::io::Cursor::new(long)),
            Err(FrameError::TooLong)
        ));
    }
}
