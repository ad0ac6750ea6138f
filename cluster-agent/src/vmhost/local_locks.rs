//! [`LocalLocks`]: the [`DiskLocks`] callback over an in-process [`LockTable`], for the
//! vmhost tests and `vmhost-bench` (feature `test-hooks`): the same `apply` the agent's
//! state machine runs, with a local log index standing in for Raft's.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use csv_volume::{
    ApplyContext, DiskName, LockCommand, LockError, LockGrant, LockMode, LockOutcome, LockTable,
    NodeId,
};

use super::lock_callback::{DiskLocks, LockOpError};
use super::spec::DiskSpec;

/// Why [`LocalLocks`] refused something.
#[derive(Debug, thiserror::Error)]
pub enum LocalLocksError {
    #[error("lock table refused the command")]
    Refused(#[source] LockError),
    #[error("disk {disk} is not held by node {node} after the handoff")]
    NotHeld { disk: String, node: NodeId },
    #[error("lock table answered {0} where a grant was expected")]
    Unexpected(&'static str),
}

/// A lock table in this process, with a counter as the log index.
pub struct LocalLocks {
    inner: Mutex<Inner>,
}

struct Inner {
    table: LockTable,
    index: u64,
    down: BTreeSet<NodeId>,
}

impl Default for LocalLocks {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalLocks {
    pub fn new() -> Self {
        LocalLocks {
            inner: Mutex::new(Inner {
                table: LockTable::new(),
                index: 0,
                down: BTreeSet::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one command as the next log entry (term 1).
    pub fn apply(&self, cmd: LockCommand) -> Result<LockOutcome, LockError> {
        let mut g = self.lock();
        g.index += 1;
        let ctx = ApplyContext {
            log_index: g.index,
            term: 1,
            down_nodes: g.down.clone(),
        };
        g.table.apply(cmd, &ctx)
    }

    /// Applies `cmd` and expects a grant.
    pub fn grant(&self, cmd: LockCommand) -> Result<LockGrant, LocalLocksError> {
        match self.apply(cmd).map_err(LocalLocksError::Refused)? {
            LockOutcome::Granted(g) => Ok(g),
            _ => Err(LocalLocksError::Unexpected("another outcome")),
        }
    }

    /// Marks `node` Down (as the agent's membership would), enabling `ForceTakeover`.
    pub fn set_down(&self, node: NodeId, down: bool) {
        let mut g = self.lock();
        if down {
            g.down.insert(node);
        } else {
            g.down.remove(&node);
        }
    }

    /// The exclusive owner and token of `disk`, if locked exclusively.
    pub fn owner(&self, disk: &DiskName) -> Option<(NodeId, csv_volume::FencingToken)> {
        let g = self.lock();
        g.table
            .lock(disk)
            .and_then(|l| l.exclusive_owner().map(|o| (o, l.token)))
    }

    /// A copy of the table.
    pub fn table(&self) -> LockTable {
        self.lock().table.clone()
    }

    fn held_grant(&self, disk: &DiskName, node: NodeId) -> Option<LockGrant> {
        let g = self.lock();
        let l = g.table.lock(disk)?;
        l.holders.contains(&node).then(|| LockGrant {
            disk: disk.clone(),
            node,
            mode: l.mode,
            token: l.token,
            term: l.term,
        })
    }
}

impl DiskLocks for LocalLocks {
    fn commit(&self, _vm: &str, commands: &[LockCommand]) -> Result<(), LockOpError> {
        for c in commands {
            self.apply(c.clone()).map_err(LocalLocksError::Refused)?;
        }
        Ok(())
    }

    fn acquire(
        &self,
        _vm: &str,
        node: NodeId,
        disks: &[DiskSpec],
    ) -> Result<Vec<LockGrant>, LockOpError> {
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            let g = if d.read_only {
                self.grant(LockCommand::Acquire {
                    disk: d.name.clone(),
                    node,
                    mode: LockMode::Shared,
                })?
            } else {
                self.held_grant(&d.name, node)
                    .filter(|g| g.mode == LockMode::Exclusive)
                    .ok_or_else(|| LocalLocksError::NotHeld {
                        disk: d.name.to_string(),
                        node,
                    })?
            };
            out.push(g);
        }
        Ok(out)
    }

    fn reclaim(
        &self,
        _vm: &str,
        node: NodeId,
        disks: &[DiskSpec],
    ) -> Result<Vec<LockGrant>, LockOpError> {
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            if let Some(g) = self.held_grant(&d.name, node) {
                out.push(g);
                continue;
            }
            let cmd = match (d.read_only, self.owner(&d.name)) {
                (false, Some((from, _))) => LockCommand::Handoff {
                    disk: d.name.clone(),
                    from,
                    to: node,
                },
                (read_only, _) => LockCommand::Acquire {
                    disk: d.name.clone(),
                    node,
                    mode: if read_only {
                        LockMode::Shared
                    } else {
                        LockMode::Exclusive
                    },
                },
            };
            out.push(self.grant(cmd)?);
        }
        Ok(out)
    }
}
