//! The cluster's disk lock table: a pure, deterministic state machine.
//!
//! The cluster-agent embeds a [`LockTable`] in its Raft state machine: it calls
//! [`LockTable::apply`] once for each committed log entry carrying a [`LockCommand`]
//! and serialises the whole table into its snapshots. No I/O, no clock, no
//! randomness: the same commands with the same [`ApplyContext`]s give the same table
//! and the same results on every node.
//!
//! Per disk the table keeps a mode ([`LockMode::Exclusive`] read-write with exactly
//! one holder, or [`LockMode::Shared`] read-only with one or more holders) and a
//! [`FencingToken`]. The token is the Raft log index of the entry that started the
//! current *lock epoch*: a new lock, a handoff, a takeover or a change of mode. Log
//! indexes strictly increase across terms, so tokens strictly increase on every owner
//! change, for every disk, for the life of the cluster. A reader joining a shared
//! lock does not start a new epoch (readers never write, so nothing needs fencing).
//!
//! **Staged handoff** (live migration): the owner commits [`LockCommand::ReserveHandoff`]
//! while its VM still runs; the entry's index becomes the *reserved* token of the target
//! ([`DiskLock::handoff`]), above every token the disk had so far. Once the source has
//! paused and closed the disk, the target opens it with the reserved token (its fence
//! record refuses the source's old token from then on) without another Raft write, and
//! [`LockCommand::CompleteHandoff`] makes the target the holder with that token after the
//! VM runs there. Until then the table names the source as holder and the target as the
//! reserved next holder. Any new epoch (re-acquire by the holder, handoff, takeover)
//! clears a reservation and gets a token above it, so a target that opened with a
//! reserved token is fenced by whatever the cluster decides next.
//!
//! **Refused commands change nothing**, not even the last applied index.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::DiskName;

/// A cluster node id.
pub type NodeId = u64;

/// A fencing token: the Raft log index that started the current lock epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How a disk is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LockMode {
    /// Read-write, exactly one holder.
    Exclusive,
    /// Read-only, one or more holders, no writer.
    Shared,
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Exclusive => "exclusive read-write",
            LockMode::Shared => "shared read-only",
        })
    }
}

/// What the agent knows when it applies a committed entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyContext {
    /// Raft log index of the entry being applied; strictly increasing across calls.
    pub log_index: u64,
    /// Raft term of the entry.
    pub term: u64,
    /// Nodes the cluster currently considers Down (as replicated in the log).
    pub down_nodes: BTreeSet<NodeId>,
}

/// A request to the lock table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockCommand {
    /// Take `disk` in `mode` for `node`. Re-acquiring a lock already held in the same
    /// mode is granted again with the unchanged token.
    Acquire {
        disk: DiskName,
        node: NodeId,
        mode: LockMode,
    },
    /// `node` lets go of `disk`; refused unless `node` holds it.
    Release { disk: DiskName, node: NodeId },
    /// Live migration: the exclusive owner `from` passes `disk` to `to`.
    Handoff {
        disk: DiskName,
        from: NodeId,
        to: NodeId,
    },
    /// Staged live-migration handoff, step 1 (before the source pauses): the exclusive
    /// owner `from` reserves the next epoch of `disk` for `to`. The holder does not change;
    /// the entry's index is the token `to` will open the disk with. Replaces an older
    /// reservation.
    ReserveHandoff {
        disk: DiskName,
        from: NodeId,
        to: NodeId,
    },
    /// Staged handoff, last step (after the VM runs on `to`): `to` becomes the holder with
    /// the reserved token. Refused unless `from` holds the disk and `to` has the
    /// reservation; granted again unchanged when `to` already holds it with that token.
    CompleteHandoff {
        disk: DiskName,
        from: NodeId,
        to: NodeId,
    },
    /// Staged handoff given up before the target could open the disk: drops the
    /// reservation of `to` (nothing to do when there is none).
    CancelHandoff {
        disk: DiskName,
        from: NodeId,
        to: NodeId,
    },
    /// Failover: `node` takes `disk` in `mode`; only when every holder is Down.
    ForceTakeover {
        disk: DiskName,
        node: NodeId,
        mode: LockMode,
    },
    /// Drop every lock `node` holds (node removed from the cluster, or all its VMs
    /// stopped).
    ReleaseAllOf { node: NodeId },
    /// Read the lock of one disk.
    Query { disk: DiskName },
    /// Read all locks one node holds.
    QueryNode { node: NodeId },
}

/// The state of one locked disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLock {
    pub mode: LockMode,
    /// Exactly one for [`LockMode::Exclusive`], at least one for [`LockMode::Shared`].
    pub holders: BTreeSet<NodeId>,
    /// Start of the current epoch.
    pub token: FencingToken,
    /// Raft term of the entry that started the epoch (diagnostics only).
    pub term: u64,
    /// A staged handoff reserved for the next holder (exclusive locks only).
    #[serde(default)]
    pub handoff: Option<PendingHandoff>,
}

/// The next epoch of an exclusive lock, reserved for a live migration's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingHandoff {
    /// The node the disk goes to.
    pub to: NodeId,
    /// Index of the `ReserveHandoff` entry: the token `to` opens the disk with.
    pub token: FencingToken,
    /// Raft term of that entry.
    pub term: u64,
}

impl DiskLock {
    /// The grant a reserved handoff gives its target, if there is one for `node`.
    pub fn reserved_grant(&self, disk: &DiskName, node: NodeId) -> Option<LockGrant> {
        let h = self.handoff.filter(|h| h.to == node)?;
        Some(LockGrant {
            disk: disk.clone(),
            node,
            mode: LockMode::Exclusive,
            token: h.token,
            term: h.term,
        })
    }

    /// The single writer, if the lock is exclusive.
    pub fn exclusive_owner(&self) -> Option<NodeId> {
        match self.mode {
            LockMode::Exclusive => self.holders.iter().next().copied(),
            LockMode::Shared => None,
        }
    }
}

/// Permission for one node to open one disk, as decided by the lock table. The agent
/// passes it to the hooks in [`crate::hooks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockGrant {
    pub disk: DiskName,
    pub node: NodeId,
    pub mode: LockMode,
    pub token: FencingToken,
    pub term: u64,
}

/// The result of a successful command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockOutcome {
    Granted(LockGrant),
    /// A staged handoff was reserved: the grant the target opens the disk with.
    Reserved(LockGrant),
    Released {
        disk: DiskName,
        node: NodeId,
        /// Holders left (shared locks); empty when the disk is now unlocked.
        remaining: BTreeSet<NodeId>,
    },
    ReleasedAll {
        node: NodeId,
        disks: Vec<DiskName>,
    },
    Lock {
        disk: DiskName,
        lock: Option<DiskLock>,
    },
    Locks {
        node: NodeId,
        locks: Vec<(DiskName, DiskLock)>,
    },
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LockError {
    #[error("log index {index} is not after the last applied index {last_applied}")]
    StaleLogIndex { index: u64, last_applied: u64 },
    #[error("disk {disk} is held {mode} by node(s) {holders:?}")]
    HeldByOther {
        disk: DiskName,
        mode: LockMode,
        holders: Vec<NodeId>,
    },
    #[error("node {node} holds disk {disk} {held}, not {requested}")]
    ModeConflict {
        disk: DiskName,
        node: NodeId,
        held: LockMode,
        requested: LockMode,
    },
    #[error("disk {disk} is not locked")]
    NotLocked { disk: DiskName },
    #[error("node {node} does not hold disk {disk} (holders: {holders:?})")]
    NotOwner {
        disk: DiskName,
        node: NodeId,
        holders: Vec<NodeId>,
    },
    #[error("disk {disk} is held shared read-only; only an exclusive lock can be handed off")]
    NotExclusive { disk: DiskName },
    #[error("node {node} cannot hand disk {disk} off to itself")]
    HandoffToSelf { disk: DiskName, node: NodeId },
    #[error("disk {disk} has no handoff reserved for node {node}")]
    NotReserved { disk: DiskName, node: NodeId },
    #[error("node {node} is Down and cannot be granted disk {disk}")]
    NodeDown { disk: DiskName, node: NodeId },
    #[error(
        "disk {disk} is still held by live node(s) {alive:?}; takeover needs every holder Down"
    )]
    OwnerNotDown { disk: DiskName, alive: Vec<NodeId> },
    #[error("lock table is inconsistent: {reason}")]
    Corrupt { reason: String },
}

/// The replicated lock table. See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LockTableRepr")]
pub struct LockTable {
    locks: BTreeMap<DiskName, DiskLock>,
    last_applied_index: Option<u64>,
}

/// Wire shape of [`LockTable`]; deserialisation goes through [`LockTable::check`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockTableRepr {
    locks: BTreeMap<DiskName, DiskLock>,
    last_applied_index: Option<u64>,
}

impl TryFrom<LockTableRepr> for LockTable {
    type Error = LockError;
    fn try_from(repr: LockTableRepr) -> Result<Self, Self::Error> {
        let table = LockTable {
            locks: repr.locks,
            last_applied_index: repr.last_applied_index,
        };
        table.check()?;
        Ok(table)
    }
}

impl LockTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lock on `disk`, if any.
    pub fn lock(&self, disk: &DiskName) -> Option<&DiskLock> {
        self.locks.get(disk)
    }

    /// All locks, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&DiskName, &DiskLock)> {
        self.locks.iter()
    }

    /// The locks `node` holds, in name order.
    pub fn locks_of(&self, node: NodeId) -> impl Iterator<Item = (&DiskName, &DiskLock)> {
        self.locks
            .iter()
            .filter(move |(_, l)| l.holders.contains(&node))
    }

    /// Number of locked disks.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// Whether no disk is locked.
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// Index of the last successfully applied command.
    pub fn last_applied_index(&self) -> Option<u64> {
        self.last_applied_index
    }

    /// Checks the structural invariants (used after deserialisation).
    pub fn check(&self) -> Result<(), LockError> {
        for (disk, lock) in &self.locks {
            let ok = match lock.mode {
                LockMode::Exclusive => lock.holders.len() == 1,
                LockMode::Shared => !lock.holders.is_empty(),
            };
            if !ok {
                return Err(LockError::Corrupt {
                    reason: format!(
                        "disk {disk} is {} with {} holders",
                        lock.mode,
                        lock.holders.len()
                    ),
                });
            }
            if let Some(h) = &lock.handoff {
                let bad = if lock.mode != LockMode::Exclusive {
                    Some("a handoff reserved on a shared lock".to_owned())
                } else if lock.holders.contains(&h.to) {
                    Some(format!("a handoff reserved for its holder {}", h.to))
                } else if h.token <= lock.token {
                    Some(format!(
                        "reserved token {} not above the lock's token {}",
                        h.token, lock.token
                    ))
                } else if self.last_applied_index.is_none_or(|last| h.token.0 > last) {
                    Some(format!(
                        "reserved token {} after the last applied index",
                        h.token
                    ))
                } else {
                    None
                };
                if let Some(reason) = bad {
                    return Err(LockError::Corrupt {
                        reason: format!("disk {disk}: {reason}"),
                    });
                }
            }
            if let Some(last) = self.last_applied_index {
                if lock.token.0 > last {
                    return Err(LockError::Corrupt {
                        reason: format!(
                            "disk {disk} has token {} after the last applied index {last}",
                            lock.token
                        ),
                    });
                }
            } else {
                return Err(LockError::Corrupt {
                    reason: format!("disk {disk} is locked but no command was ever applied"),
                });
            }
        }
        Ok(())
    }

    /// Applies one committed command. On `Err` the table is unchanged.
    pub fn apply(
        &mut self,
        cmd: LockCommand,
        ctx: &ApplyContext,
    ) -> Result<LockOutcome, LockError> {
        if let Some(last) = self.last_applied_index {
            if ctx.log_index <= last {
                return Err(LockError::StaleLogIndex {
                    index: ctx.log_index,
                    last_applied: last,
                });
            }
        }
        let outcome = match cmd {
            LockCommand::Acquire { disk, node, mode } => self.acquire(disk, node, mode, ctx)?,
            LockCommand::Release { disk, node } => self.release(disk, node)?,
            LockCommand::Handoff { disk, from, to } => self.handoff(disk, from, to, ctx)?,
            LockCommand::ReserveHandoff { disk, from, to } => self.reserve(disk, from, to, ctx)?,
            LockCommand::CompleteHandoff { disk, from, to } => self.complete(disk, from, to)?,
            LockCommand::CancelHandoff { disk, from, to } => self.cancel(disk, from, to)?,
            LockCommand::ForceTakeover { disk, node, mode } => {
                self.takeover(disk, node, mode, ctx)?
            }
            LockCommand::ReleaseAllOf { node } => self.release_all_of(node),
            LockCommand::Query { disk } => {
                let lock = self.locks.get(&disk).cloned();
                LockOutcome::Lock { disk, lock }
            }
            LockCommand::QueryNode { node } => LockOutcome::Locks {
                node,
                locks: self
                    .locks_of(node)
                    .map(|(d, l)| (d.clone(), l.clone()))
                    .collect(),
            },
        };
        self.last_applied_index = Some(ctx.log_index);
        Ok(outcome)
    }

    fn new_epoch(
        &mut self,
        disk: DiskName,
        node: NodeId,
        mode: LockMode,
        ctx: &ApplyContext,
    ) -> LockOutcome {
        let token = FencingToken(ctx.log_index);
        self.locks.insert(
            disk.clone(),
            DiskLock {
                mode,
                holders: BTreeSet::from([node]),
                token,
                term: ctx.term,
                handoff: None,
            },
        );
        LockOutcome::Granted(LockGrant {
            disk,
            node,
            mode,
            token,
            term: ctx.term,
        })
    }

    fn acquire(
        &mut self,
        disk: DiskName,
        node: NodeId,
        mode: LockMode,
        ctx: &ApplyContext,
    ) -> Result<LockOutcome, LockError> {
        if ctx.down_nodes.contains(&node) {
            return Err(LockError::NodeDown { disk, node });
        }
        let Some(lock) = self.locks.get_mut(&disk) else {
            return Ok(self.new_epoch(disk, node, mode, ctx));
        };
        let holds = lock.holders.contains(&node);
        if holds && lock.mode == mode && lock.handoff.is_some() {
            // The holder takes the disk back from a staged handoff: its target may have
            // opened the disk with the reserved token, so a token above that one.
            return Ok(self.new_epoch(disk, node, mode, ctx));
        }
        match (lock.mode, mode) {
            (held, requested) if holds && held != requested => Err(LockError::ModeConflict {
                disk,
                node,
                held,
                requested,
            }),
            // A reader joins the shared epoch, or the holder re-acquires: same token.
            (LockMode::Shared, LockMode::Shared) | (LockMode::Exclusive, LockMode::Exclusive)
                if mode == LockMode::Shared || holds =>
            {
                lock.holders.insert(node);
                Ok(LockOutcome::Granted(LockGrant {
                    disk,
                    node,
                    mode,
                    token: lock.token,
                    term: lock.term,
                }))
            }
            (held, _) => Err(LockError::HeldByOther {
                disk,
                mode: held,
                holders: lock.holders.iter().copied().collect(),
            }),
        }
    }

    fn release(&mut self, disk: DiskName, node: NodeId) -> Result<LockOutcome, LockError> {
        let Some(lock) = self.locks.get_mut(&disk) else {
            return Err(LockError::NotLocked { disk });
        };
        if !lock.holders.contains(&node) {
            return Err(LockError::NotOwner {
                disk,
                node,
                holders: lock.holders.iter().copied().collect(),
            });
        }
        lock.holders.remove(&node);
        let remaining = lock.holders.clone();
        if remaining.is_empty() {
            self.locks.remove(&disk);
        }
        Ok(LockOutcome::Released {
            disk,
            node,
            remaining,
        })
    }

    fn handoff(
        &mut self,
        disk: DiskName,
        from: NodeId,
        to: NodeId,
        ctx: &ApplyContext,
    ) -> Result<LockOutcome, LockError> {
        self.check_handoff(&disk, from, to, ctx)?;
        Ok(self.new_epoch(disk, to, LockMode::Exclusive, ctx))
    }

    fn reserve(
        &mut self,
        disk: DiskName,
        from: NodeId,
        to: NodeId,
        ctx: &ApplyContext,
    ) -> Result<LockOutcome, LockError> {
        self.check_handoff(&disk, from, to, ctx)?;
        let h = PendingHandoff {
            to,
            token: FencingToken(ctx.log_index),
            term: ctx.term,
        };
        let lock = self
            .locks
            .get_mut(&disk)
            .ok_or(LockError::NotLocked { disk: disk.clone() })?;
        lock.handoff = Some(h);
        let grant = lock
            .reserved_grant(&disk, to)
            .ok_or(LockError::NotReserved {
                disk: disk.clone(),
                node: to,
            })?;
        Ok(LockOutcome::Reserved(grant))
    }

    fn complete(
        &mut self,
        disk: DiskName,
        from: NodeId,
        to: NodeId,
    ) -> Result<LockOutcome, LockError> {
        let Some(lock) = self.locks.get_mut(&disk) else {
            return Err(LockError::NotLocked { disk });
        };
        if lock.exclusive_owner() == Some(to) && lock.handoff.is_none() {
            // Already completed (a retry, or the failover path did it).
            return Ok(LockOutcome::Granted(LockGrant {
                disk,
                node: to,
                mode: LockMode::Exclusive,
                token: lock.token,
                term: lock.term,
            }));
        }
        if lock.exclusive_owner() != Some(from) {
            return Err(LockError::NotOwner {
                disk,
                node: from,
                holders: lock.holders.iter().copied().collect(),
            });
        }
        let Some(h) = lock.handoff.filter(|h| h.to == to) else {
            return Err(LockError::NotReserved { disk, node: to });
        };
        lock.holders = BTreeSet::from([to]);
        lock.token = h.token;
        lock.term = h.term;
        lock.handoff = None;
        Ok(LockOutcome::Granted(LockGrant {
            disk,
            node: to,
            mode: LockMode::Exclusive,
            token: h.token,
            term: h.term,
        }))
    }

    fn cancel(
        &mut self,
        disk: DiskName,
        from: NodeId,
        to: NodeId,
    ) -> Result<LockOutcome, LockError> {
        let Some(lock) = self.locks.get_mut(&disk) else {
            return Ok(LockOutcome::Lock { disk, lock: None });
        };
        if lock.exclusive_owner() == Some(from) && lock.handoff.is_some_and(|h| h.to == to) {
            lock.handoff = None;
        }
        let lock = Some(lock.clone());
        Ok(LockOutcome::Lock { disk, lock })
    }

    /// The checks a handoff and a reservation share.
    fn check_handoff(
        &self,
        disk: &DiskName,
        from: NodeId,
        to: NodeId,
        ctx: &ApplyContext,
    ) -> Result<(), LockError> {
        let disk = disk.clone();
        let Some(lock) = self.locks.get(&disk) else {
            return Err(LockError::NotLocked { disk });
        };
        if !lock.holders.contains(&from) {
            return Err(LockError::NotOwner {
                disk,
                node: from,
                holders: lock.holders.iter().copied().collect(),
            });
        }
        if lock.mode != LockMode::Exclusive {
            return Err(LockError::NotExclusive { disk });
        }
        if from == to {
            return Err(LockError::HandoffToSelf { disk, node: to });
        }
        if ctx.down_nodes.contains(&to) {
            return Err(LockError::NodeDown { disk, node: to });
        }
        Ok(())
    }

    fn takeover(
        &mut self,
        disk: DiskName,
        node: NodeId,
        mode: LockMode,
        ctx: &ApplyContext,
    ) -> Result<LockOutcome, LockError> {
        let Some(lock) = self.locks.get(&disk) else {
            return Err(LockError::NotLocked { disk });
        };
        if ctx.down_nodes.contains(&node) {
            return Err(LockError::NodeDown { disk, node });
        }
        let alive: Vec<NodeId> = lock
            .holders
            .iter()
            .copied()
            .filter(|h| !ctx.down_nodes.contains(h))
            .collect();
        if !alive.is_empty() {
            return Err(LockError::OwnerNotDown { disk, alive });
        }
        Ok(self.new_epoch(disk, node, mode, ctx))
    }

    fn release_all_of(&mut self, node: NodeId) -> LockOutcome {
        let mut disks = Vec::new();
        self.locks.retain(|disk, lock| {
            if lock.holders.remove(&node) {
                disks.push(disk.clone());
            }
            if lock.handoff.is_some_and(|h| h.to == node) {
                lock.handoff = None;
            }
            !lock.holders.is_empty()
        });
        LockOutcome::ReleasedAll { node, disks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DiskName {
        DiskName::parse(s).unwrap()
    }

    fn ctx(i: u64) -> ApplyContext {
        ApplyContext {
            log_index: i,
            term: 1,
            down_nodes: BTreeSet::new(),
        }
    }

    fn ctx_down(i: u64, down: &[NodeId]) -> ApplyContext {
        ApplyContext {
            log_index: i,
            term: 2,
            down_nodes: down.iter().copied().collect(),
        }
    }

    fn grant(o: LockOutcome) -> LockGrant {
        match o {
            LockOutcome::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn acquire_release_handoff_takeover() {
        let mut t = LockTable::new();
        let disk = d("v/a.img");
        let g1 = grant(
            t.apply(
                LockCommand::Acquire {
                    disk: disk.clone(),
                    node: 1,
                    mode: LockMode::Exclusive,
                },
                &ctx(10),
            )
            .unwrap(),
        );
        assert_eq!(g1.token, FencingToken(10));

        // Another node is refused with the owner named.
        let err = t
            .apply(
                LockCommand::Acquire {
                    disk: disk.clone(),
                    node: 2,
                    mode: LockMode::Shared,
                },
                &ctx(11),
            )
            .unwrap_err();
        assert_eq!(
            err,
            LockError::HeldByOther {
                disk: disk.clone(),
                mode: LockMode::Exclusive,
                holders: vec![1]
            }
        );
        assert!(err.to_string().contains("node(s) [1]"), "{err}");

        // Re-acquire is idempotent.
        let again = grant(
            t.apply(
                LockCommand::Acquire {
                    disk: disk.clone(),
                    node: 1,
                    mode: LockMode::Exclusive,
                },
                &ctx(12),
            )
            .unwrap(),
        );
        assert_eq!(again.token, g1.token);

        // Handoff by a non-owner is refused; by the owner it starts a new epoch.
        assert!(matches!(
            t.apply(
                LockCommand::Handoff {
                    disk: disk.clone(),
                    from: 3,
                    to: 2
                },
                &ctx(13)
            ),
            Err(LockError::NotOwner { node: 3, .. })
        ));
        let g2 = grant(
            t.apply(
                LockCommand::Handoff {
                    disk: disk.clone(),
                    from: 1,
                    to: 2,
                },
                &ctx(14),
            )
            .unwrap(),
        );
        assert_eq!((g2.node, g2.token), (2, FencingToken(14)));

        // Takeover refused while node 2 is alive, allowed once it is Down.
        assert_eq!(
            t.apply(
                LockCommand::ForceTakeover {
                    disk: disk.clone(),
                    node: 3,
                    mode: LockMode::Exclusive
                },
                &ctx(15)
            ),
            Err(LockError::OwnerNotDown {
                disk: disk.clone(),
                alive: vec![2]
            })
        );
        let g3 = grant(
            t.apply(
                LockCommand::ForceTakeover {
                    disk: disk.clone(),
                    node: 3,
                    mode: LockMode::Exclusive,
                },
                &ctx_down(16, &[2]),
            )
            .unwrap(),
        );
        assert_eq!((g3.node, g3.token, g3.term), (3, FencingToken(16), 2));

        // Release by a non-owner is refused; by the owner it unlocks.
        assert!(matches!(
            t.apply(
                LockCommand::Release {
                    disk: disk.clone(),
                    node: 2
                },
                &ctx(17)
            ),
            Err(LockError::NotOwner { node: 2, .. })
        ));
        t.apply(
            LockCommand::Release {
                disk: disk.clone(),
                node: 3,
            },
            &ctx(18),
        )
        .unwrap();
        assert!(t.lock(&disk).is_none());
        assert_eq!(t.last_applied_index(), Some(18));
    }

    #[test]
    fn shared_readers() {
        let mut t = LockTable::new();
        let disk = d("v/base.img");
        for (i, node) in [1u64, 2, 3].into_iter().enumerate() {
            let g = grant(
                t.apply(
                    LockCommand::Acquire {
                        disk: disk.clone(),
                        node,
                        mode: LockMode::Shared,
                    },
                    &ctx(i as u64 + 1),
                )
                .unwrap(),
            );
            assert_eq!(g.token, FencingToken(1));
        }
        assert!(matches!(
            t.apply(
                LockCommand::Acquire {
                    disk: disk.clone(),
                    node: 4,
                    mode: LockMode::Exclusive
                },
                &ctx(5)
            ),
            Err(LockError::HeldByOther {
                mode: LockMode::Shared,
                ..
            })
        ));
        assert!(matches!(
            t.apply(
                LockCommand::Acquire {
                    disk: disk.clone(),
                    node: 1,
                    mode: LockMode::Exclusive
                },
                &ctx(6)
            ),
            Err(LockError::ModeConflict { .. })
        ));
        assert!(matches!(
            t.apply(
                LockCommand::Handoff {
                    disk: disk.clone(),
                    from: 1,
                    to: 4
                },
                &ctx(7)
            ),
            Err(LockError::NotExclusive { .. })
        ));
        let out = t
            .apply(LockCommand::ReleaseAllOf { node: 2 }, &ctx(8))
            .unwrap();
        assert_eq!(
            out,
            LockOutcome::ReleasedAll {
                node: 2,
                disks: vec![disk.clone()]
            }
        );
        let holders: Vec<_> = t.lock(&disk).unwrap().holders.iter().copied().collect();
        assert_eq!(holders, vec![1, 3]);
        // Takeover needs every reader Down.
        assert!(matches!(
            t.apply(
                LockCommand::ForceTakeover {
                    disk: disk.clone(),
                    node: 4,
                    mode: LockMode::Exclusive
                },
                &ctx_down(9, &[1])
            ),
            Err(LockError::OwnerNotDown { alive, .. }) if alive == vec![3]
        ));
    }

    #[test]
    fn stale_index_and_down_nodes_refused_without_change() {
        let mut t = LockTable::new();
        let disk = d("v/a.img");
        t.apply(
            LockCommand::Acquire {
                disk: disk.clone(),
                node: 1,
                mode: LockMode::Exclusive,
            },
            &ctx(5),
        )
        .unwrap();
        let before = t.clone();
        assert_eq!(
            t.apply(LockCommand::Query { disk: disk.clone() }, &ctx(5)),
            Err(LockError::StaleLogIndex {
                index: 5,
                last_applied: 5
            })
        );
        assert!(matches!(
            t.apply(
                LockCommand::Acquire {
                    disk: d("v/b.img"),
                    node: 7,
                    mode: LockMode::Exclusive
                },
                &ctx_down(6, &[7])
            ),
            Err(LockError::NodeDown { node: 7, .. })
        ));
        assert!(matches!(
            t.apply(
                LockCommand::ForceTakeover {
                    disk: d("v/none.img"),
                    node: 2,
                    mode: LockMode::Exclusive
                },
                &ctx(7)
            ),
            Err(LockError::NotLocked { .. })
        ));
        assert_eq!(t, before);
    }

    #[test]
    fn queries() {
        let mut t = LockTable::new();
        for (i, name) in ["v/a.img", "v/b.img"].iter().enumerate() {
            t.apply(
                LockCommand::Acquire {
                    disk: d(name),
                    node: 1,
                    mode: LockMode::Exclusive,
                },
                &ctx(i as u64 + 1),
            )
            .unwrap();
        }
        let LockOutcome::Locks { locks, .. } = t
            .apply(LockCommand::QueryNode { node: 1 }, &ctx(3))
            .unwrap()
        else {
            panic!("wrong outcome")
        };
        assert_eq!(locks.len(), 2);
        let LockOutcome::Lock { lock, .. } = t
            .apply(LockCommand::Query { disk: d("v/b.img") }, &ctx(4))
            .unwrap()
        else {
            panic!("wrong outcome")
        };
        assert_eq!(lock.unwrap().exclusive_owner(), Some(1));
    }

    #[test]
    fn snapshot_round_trip_and_corrupt_snapshot_refused() {
        let mut t = LockTable::new();
        t.apply(
            LockCommand::Acquire {
                disk: d("v/a.img"),
                node: 1,
                mode: LockMode::Exclusive,
            },
            &ctx(3),
        )
        .unwrap();
        let bytes = bincode::serialize(&t).unwrap();
        let back: LockTable = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, t);

        // An exclusive lock with two holders must not load.
        let mut bad = t.clone();
        bad.locks.get_mut(&d("v/a.img")).unwrap().holders.insert(2);
        let bytes = bincode::serialize(&bad).unwrap();
        let err = bincode::deserialize::<LockTable>(&bytes).unwrap_err();
        assert!(err.to_string().contains("2 holders"), "{err}");
    }
}
