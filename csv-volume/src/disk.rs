//! [`FencedDisk`]: a raw disk image that refuses writes from a superseded lock holder.
//!
//! A `FencedDisk` is opened for one lock epoch `(node, token)`. Before every write
//! (and flush) it asks its [`FenceWatch`] for the record beside the disk; if the
//! record carries a newer token the node has been fenced: the write is refused with
//! [`DiskError::StaleToken`] and the disk stays fenced for good (no further `stat`).
//!
//! The method shapes match the VMM's `DiskBackend` trait (`len`, `read_at`,
//! `write_at`, `flush`, `describe`); errors are `io::Error`s whose inner error is a
//! [`DiskError`] (`err.get_ref()?.downcast_ref::<DiskError>()`).
//!
//! # Remaining race, and what closes it
//! The check and the `pwrite` are two steps: a write that passed the check can still
//! land after the new owner installed its record. The failover protocol closes that
//! window: an owner holds a lease and stops issuing I/O (pauses its VMs, drops its
//! disks) when the lease runs out without renewal; the new owner may take over only
//! after the old owner is Down, and writes the new token (and then data) only after
//! the old owner's lease deadline has passed ([`crate::hooks::takeover_open`] waits
//! for it). So the fence record is the second line of defence: it stops an old owner
//! that overslept its lease (paused process, stuck host) at its next write.
//! Handoff has no race: the source flushes and closes before the lock moves.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fence::{FenceError, FenceWatch};
use crate::lock::{FencingToken, LockMode, NodeId};
use crate::name::DiskName;

/// Why a fenced disk could not be opened or refused an operation.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot {op} disk {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("fence record check failed")]
    Fence(#[source] FenceError),
    #[error("node {node} holds token {held} but the disk is fenced at token {current}")]
    StaleToken {
        node: NodeId,
        held: FencingToken,
        current: FencingToken,
    },
    #[error("token {held} of node {node} is newer than the fence record's {recorded}: write the fence record before opening")]
    FenceBehind {
        node: NodeId,
        held: FencingToken,
        recorded: FencingToken,
    },
    #[error("fence record token {token} belongs to node {recorded_node} ({recorded_mode}), not node {node} ({mode})")]
    NotOurEpoch {
        token: FencingToken,
        node: NodeId,
        mode: LockMode,
        recorded_node: NodeId,
        recorded_mode: LockMode,
    },
    #[error("disk is open shared read-only; writes are refused")]
    ReadOnly,
    #[error("{len_bytes} bytes at offset {offset_bytes} reach past the end of the {disk_len_bytes}-byte disk")]
    OutOfRange {
        offset_bytes: u64,
        len_bytes: usize,
        disk_len_bytes: u64,
    },
}

impl DiskError {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            DiskError::Io { source, .. } => source.kind(),
            DiskError::StaleToken { .. }
            | DiskError::ReadOnly
            | DiskError::NotOurEpoch { .. }
            | DiskError::FenceBehind { .. } => io::ErrorKind::PermissionDenied,
            DiskError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            DiskError::NotAFile { .. } | DiskError::Fence(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// How often [`FencedDisk::write_at`] consults the fence record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FenceCheck {
    /// Before every write (the default): a write that starts after a newer record
    /// was installed is always refused. Costs one `stat` per write.
    #[default]
    EveryWrite,
    /// At most once per `max_staleness`: writes within that interval of a good
    /// check go straight to the file. Widens the race window by `max_staleness`
    /// (keep it far below the lease), removes the `stat` from most writes.
    /// [`FencedDisk::flush`] always checks.
    AtMostEvery { max_staleness: Duration },
}

/// A disk image opened for one lock epoch. See the module docs.
#[derive(Debug)]
pub struct FencedDisk {
    file: File,
    path: PathBuf,
    name: Option<DiskName>,
    node: NodeId,
    token: FencingToken,
    mode: LockMode,
    len_bytes: u64,
    watch: FenceWatch,
    /// Set once a newer token was seen; the disk never writes again.
    fenced_by: Option<FencingToken>,
    policy: FenceCheck,
    /// Whether the current run of `FenceBehind` refusals was logged (log once per run:
    /// the guest drives the write rate).
    behind_logged: bool,
    /// When the fence was last found current (only kept for `AtMostEvery`).
    last_good_check: Option<Instant>,
    /// A write was issued since the last successful `fdatasync`: a flush without one
    /// skips the system call (which costs a device cache flush even with nothing dirty).
    unsynced: bool,
}

impl FencedDisk {
    /// Opens the image at `path` for `node` holding `token` in `mode`.
    ///
    /// The fence record must already carry exactly this epoch (the hooks write it
    /// first). Exclusive opens are read-write, shared opens read-only. The image is
    /// opened with `O_NOFOLLOW`.
    pub fn open(
        path: &Path,
        name: Option<DiskName>,
        node: NodeId,
        token: FencingToken,
        mode: LockMode,
    ) -> Result<Self, DiskError> {
        let mut watch = FenceWatch::open(path).map_err(DiskError::Fence)?;
        let record = watch.current().map_err(DiskError::Fence)?;
        if record.token > token {
            return Err(DiskError::StaleToken {
                node,
                held: token,
                current: record.token,
            });
        }
        if record.token < token {
            return Err(DiskError::FenceBehind {
                node,
                held: token,
                recorded: record.token,
            });
        }
        let ours = record.mode == mode && (mode == LockMode::Shared || record.node == node);
        if !ours {
            return Err(DiskError::NotOurEpoch {
                token,
                node,
                mode,
                recorded_node: record.node,
                recorded_mode: record.mode,
            });
        }
        let io = |op| {
            move |source| DiskError::Io {
                op,
                path: path.to_owned(),
                source,
            }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(mode == LockMode::Exclusive)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io("open"))?;
        let meta = file.metadata().map_err(io("stat"))?;
        if !meta.is_file() {
            return Err(DiskError::NotAFile {
                path: path.to_owned(),
            });
        }
        tracing::info!(
            path = %path.display(),
            node,
            token = token.0,
            mode = %mode,
            "fenced disk opened"
        );
        Ok(FencedDisk {
            file,
            path: path.to_owned(),
            name,
            node,
            token,
            mode,
            len_bytes: meta.len(),
            watch,
            fenced_by: None,
            policy: FenceCheck::default(),
            behind_logged: false,
            last_good_check: None,
            unsynced: false,
        })
    }

    /// Chooses how often writes consult the fence record.
    pub fn set_fence_check(&mut self, policy: FenceCheck) {
        self.policy = policy;
        self.last_good_check = None;
    }

    /// The current fence check policy.
    pub fn fence_check(&self) -> FenceCheck {
        self.policy
    }

    /// The namespace name, when opened through a registry.
    pub fn name(&self) -> Option<&DiskName> {
        self.name.as_ref()
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The node this disk was opened for.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The token this disk was opened with.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The lock mode.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The newer token that fenced this disk, if it has been fenced.
    pub fn fenced_by(&self) -> Option<FencingToken> {
        self.fenced_by
    }

    /// Disk size in bytes (as of opening).
    pub fn len(&self) -> u64 {
        self.len_bytes
    }

    /// Re-reads the image size after [`crate::VolumeRegistry::grow_disk`]; returns it.
    pub fn refresh_len(&mut self) -> Result<u64, DiskError> {
        let meta = self.file.metadata().map_err(|source| DiskError::Io {
            op: "stat",
            path: self.path.clone(),
            source,
        })?;
        self.len_bytes = meta.len();
        Ok(self.len_bytes)
    }

    /// Whether the disk has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len_bytes == 0
    }

    /// One-line description for logs.
    pub fn describe(&self) -> String {
        format!(
            "fenced raw disk {} (node {}, token {}, {}{})",
            self.name
                .as_ref()
                .map(|n| n.to_string())
                .unwrap_or_else(|| self.path.display().to_string()),
            self.node,
            self.token,
            self.mode,
            if self.fenced_by.is_some() {
                ", FENCED"
            } else {
                ""
            }
        )
    }

    /// Checks that this disk's epoch is still the current one.
    pub fn check_fence(&mut self) -> Result<(), DiskError> {
        if let Some(current) = self.fenced_by {
            return Err(DiskError::StaleToken {
                node: self.node,
                held: self.token,
                current,
            });
        }
        let record = self.watch.current().map_err(DiskError::Fence)?;
        if record.token < self.token {
            // Records only move forward; an older one means a superseded node
            // rolled it back. Refuse (not sticky) rather than write under it.
            if !self.behind_logged {
                self.behind_logged = true;
                tracing::warn!(
                    path = %self.path.display(),
                    node = self.node,
                    held = self.token.0,
                    recorded = record.token.0,
                    "fence record older than our token: writes refused"
                );
            }
            return Err(DiskError::FenceBehind {
                node: self.node,
                held: self.token,
                recorded: record.token,
            });
        }
        self.behind_logged = false;
        if record.token > self.token {
            self.fenced_by = Some(record.token);
            tracing::warn!(
                path = %self.path.display(),
                node = self.node,
                held = self.token.0,
                current = record.token.0,
                "disk fenced: stale writer refused"
            );
            return Err(DiskError::StaleToken {
                node: self.node,
                held: self.token,
                current: record.token,
            });
        }
        Ok(())
    }

    fn check_before_write(&mut self) -> Result<(), DiskError> {
        match self.policy {
            FenceCheck::EveryWrite => self.check_fence(),
            FenceCheck::AtMostEvery { max_staleness } => {
                let fresh = self
                    .last_good_check
                    .is_some_and(|t| t.elapsed() < max_staleness);
                if fresh && self.fenced_by.is_none() {
                    return Ok(());
                }
                self.check_fence()?;
                self.last_good_check = Some(Instant::now());
                Ok(())
            }
        }
    }

    fn range(&self, offset_bytes: u64, len_bytes: usize) -> Result<(), DiskError> {
        let end = offset_bytes.checked_add(len_bytes as u64);
        match end {
            Some(end) if end <= self.len_bytes => Ok(()),
            _ => Err(DiskError::OutOfRange {
                offset_bytes,
                len_bytes,
                disk_len_bytes: self.len_bytes,
            }),
        }
    }

    /// Reads exactly `buf.len()` bytes at `off`. Reads are not fenced.
    pub fn read_at(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.range(off, buf.len()).map_err(DiskError::into_io)?;
        self.file.read_exact_at(buf, off).map_err(|source| {
            DiskError::Io {
                op: "read",
                path: self.path.clone(),
                source,
            }
            .into_io()
        })
    }

    /// Writes all of `buf` at `off`, after checking the fence.
    pub fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.mode != LockMode::Exclusive {
            return Err(DiskError::ReadOnly.into_io());
        }
        self.range(off, buf.len()).map_err(DiskError::into_io)?;
        self.check_before_write().map_err(DiskError::into_io)?;
        self.unsynced = true;
        self.file.write_all_at(buf, off).map_err(|source| {
            DiskError::Io {
                op: "write",
                path: self.path.clone(),
                source,
            }
            .into_io()
        })
    }

    /// Makes written data durable (`fdatasync`), after checking the fence. Without a
    /// write since the last one, only the fence is checked.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.mode != LockMode::Exclusive {
            return Ok(());
        }
        self.check_fence().map_err(DiskError::into_io)?;
        if !self.unsynced {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| {
            DiskError::Io {
                op: "flush",
                path: self.path.clone(),
                source,
            }
            .into_io()
        })?;
        self.unsynced = false;
        Ok(())
    }

    /// Whether a write was issued since the last successful flush.
    pub fn has_unsynced_writes(&self) -> bool {
        self.unsynced
    }
}

/// The typed error inside an `io::Error` returned by [`FencedDisk`], if any.
pub fn disk_error(err: &io::Error) -> Option<&DiskError> {
    err.get_ref().and_then(|e| e.downcast_ref::<DiskError>())
}
