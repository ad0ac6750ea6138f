//! The agent's side of the shared-volume lock table: commits lock decisions through Raft
//! (`Command::Lock`) and turns the leader's answers into [`LockGrant`]s for `vmhost`.
//!
//! [`ClusterLocks`] implements vmhost's [`DiskLocks`] callback (used by live and quick
//! migration on std threads: it blocks on the agent's runtime); the async helpers are
//! used by the reconciler (start/stop/hot-plug) and by failover (takeover).
//!
//! **Architecture Invariant:** a disk is opened only with a grant that came out of a
//! committed lock entry (the leader's apply result, or the local replica's table once it
//! shows the committed handoff); this module never makes a lock decision by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use csv_volume::{DiskName, LockCommand, LockGrant, LockMode, LockOutcome};

use crate::node::{now_unix_ms, Agent, ForwardReply, ForwardRequest, WriteError};
use crate::state::disk_locks::LockEntry;
use crate::state::{Command, CommandResult};
use crate::vmhost::{DiskLocks, DiskSpec, LockOpError};

/// How long a migration target waits for the source's committed handoff to show in
/// its local replica before asking the leader. Short: a follower learns a commit only
/// with the leader's next append (up to a Raft heartbeat later), while asking the leader
/// (an idempotent re-acquire by the new holder) is one round trip, inside the blackout.
pub const HANDOFF_VISIBLE_WAIT: Duration = Duration::from_millis(0);
/// Poll interval of that wait.
pub const HANDOFF_POLL: Duration = Duration::from_millis(1);

/// Why a lock operation of the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum LockClientError {
    #[error("cannot commit {what} for disk {disk}")]
    Write {
        what: String,
        disk: String,
        #[source]
        source: WriteError,
    },
    #[error("the leader answered {0} where a lock grant was expected")]
    Unexpected(String),
}

/// Commits one lock command for `vm` and returns the table's outcome.
pub async fn commit(
    agent: &Agent,
    vm: &str,
    command: LockCommand,
) -> Result<LockOutcome, LockClientError> {
    let what = crate::state::disk_locks::LockEntry {
        command: command.clone(),
        vm: String::new(),
        at_unix_ms: 0,
    }
    .to_string();
    let disk = disk_of(&command);
    let entry = LockEntry {
        command,
        vm: vm.to_owned(),
        at_unix_ms: now_unix_ms(),
    };
    match agent
        .write(ForwardRequest::Command(Command::Lock(entry)))
        .await
    {
        Ok(ForwardReply::Command {
            result: CommandResult::Lock { outcome },
            ..
        }) => Ok(outcome),
        Ok(other) => Err(LockClientError::Unexpected(format!("{other:?}"))),
        Err(source) => Err(LockClientError::Write { what, disk, source }),
    }
}

fn disk_of(c: &LockCommand) -> String {
    match c {
        LockCommand::Acquire { disk, .. }
        | LockCommand::Release { disk, .. }
        | LockCommand::Handoff { disk, .. }
        | LockCommand::ReserveHandoff { disk, .. }
        | LockCommand::CompleteHandoff { disk, .. }
        | LockCommand::CancelHandoff { disk, .. }
        | LockCommand::ForceTakeover { disk, .. }
        | LockCommand::Query { disk } => disk.to_string(),
        LockCommand::ReleaseAllOf { .. } | LockCommand::QueryNode { .. } => "*".into(),
    }
}

/// Commits `command` and expects a grant.
pub async fn grant(
    agent: &Agent,
    vm: &str,
    command: LockCommand,
) -> Result<LockGrant, LockClientError> {
    match commit(agent, vm, command).await? {
        LockOutcome::Granted(g) => Ok(g),
        other => Err(LockClientError::Unexpected(format!("{other:?}"))),
    }
}

/// The mode a VM opens `disk` in.
pub fn mode_of(disk: &DiskSpec) -> LockMode {
    if disk.read_only {
        LockMode::Shared
    } else {
        LockMode::Exclusive
    }
}

/// Whether `disk` may be taken over from its holders because they are all Down and have
/// fenced themselves. Holders that are all Down but not yet for the failover grace (on
/// this agent's clock) are waited for, up to the grace and a margin: the grace is what
/// their fence watchers need, not a reason to fail the start.
async fn wait_for_fenced_holders(agent: &Agent, disk: &DiskName, node: u64) -> bool {
    let grace = crate::control::failover::FAILOVER_GRACE;
    let deadline = tokio::time::Instant::now() + grace * 2;
    loop {
        let state = agent.read_sm(|s| s.state.clone());
        let fenced = agent.down_for_at_least(&state, grace);
        if held_only_by_fenced_nodes(&state, disk, node, &fenced) {
            return true;
        }
        let down = crate::state::disk_locks::down_nodes(&state);
        let all_down = state.locks.lock(disk).is_some_and(|l| {
            !l.holders.is_empty()
                && !l.holders.contains(&node)
                && l.holders.iter().all(|h| down.contains(h))
        });
        if !all_down || tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(crate::control::fencing::FENCE_POLL * 5).await;
    }
}

/// Acquires (committed) every disk of `vm` for `node`: exclusive read-write, or shared
/// for read-only disks. A lock the node already holds is granted again with its token
/// (e.g. after a failover takeover). On a refusal the locks acquired by this call are
/// released again.
pub async fn acquire_all(
    agent: &Agent,
    vm: &str,
    node: u64,
    disks: &[DiskSpec],
) -> Result<Vec<LockGrant>, LockClientError> {
    let mut grants = Vec::with_capacity(disks.len());
    for d in disks {
        let takeover = wait_for_fenced_holders(agent, &d.name, node).await;
        let cmd = if takeover {
            LockCommand::ForceTakeover {
                disk: d.name.clone(),
                node,
                mode: mode_of(d),
            }
        } else {
            LockCommand::Acquire {
                disk: d.name.clone(),
                node,
                mode: mode_of(d),
            }
        };
        match grant(agent, vm, cmd).await {
            Ok(g) => grants.push(g),
            Err(e) => {
                let undo = grants
                    .iter()
                    .map(|g: &LockGrant| LockCommand::Release {
                        disk: g.disk.clone(),
                        node,
                    })
                    .collect();
                release_all(agent, vm, undo).await;
                return Err(e);
            }
        }
    }
    Ok(grants)
}

/// Whether `disk` is locked only by nodes other than `node` that are in `fenced` — nodes
/// Down for at least the failover grace ([`Agent::down_for_at_least`]), so they have
/// fenced themselves: a VM started elsewhere after its owner died (e.g. restart priority
/// none, or stopped and started again) takes such a lock over instead of waiting for a
/// node that may never come back.
pub fn held_only_by_fenced_nodes(
    state: &crate::state::ClusterState,
    disk: &DiskName,
    node: u64,
    fenced: &[u64],
) -> bool {
    let Some(lock) = state.locks.lock(disk) else {
        return false;
    };
    !lock.holders.contains(&node) && lock.holders.iter().all(|h| fenced.contains(h))
}

/// Commits `Release`/`Handoff` commands produced by vmhost; a refusal is logged (the
/// lock may already be someone else's after a takeover).
pub async fn release_all(agent: &Agent, vm: &str, commands: Vec<LockCommand>) {
    for c in commands {
        let shown = c.clone();
        match commit(agent, vm, c).await {
            Ok(_) => tracing::debug!(vm, command = ?shown, "disk lock released"),
            Err(e) => tracing::warn!(
                vm,
                command = ?shown,
                error = %crate::error_chain(&e),
                "disk lock release not applied"
            ),
        }
    }
}

/// The grant `node` holds on `disk` in the local replica, if any.
pub fn held_grant(agent: &Agent, disk: &DiskName, node: u64) -> Option<LockGrant> {
    agent.read_sm(|d| {
        let l = d.state.locks.lock(disk)?;
        l.holders.contains(&node).then(|| LockGrant {
            disk: disk.clone(),
            node,
            mode: l.mode,
            token: l.token,
            term: l.term,
        })
    })
}

/// The grant a staged handoff reserved for `node` on `disk`, in the local replica.
pub fn reserved_grant(agent: &Agent, disk: &DiskName, node: u64) -> Option<LockGrant> {
    agent.read_sm(|d| d.state.locks.lock(disk)?.reserved_grant(disk, node))
}

/// The exclusive disks of `vm`'s spec, from the local replica.
fn exclusive_disks(agent: &Agent, vm: &str) -> Vec<DiskName> {
    agent.read_sm(|d| {
        crate::state::vms::find(&d.state, vm)
            .map(|r| {
                r.spec
                    .disks
                    .iter()
                    .filter(|d| !d.read_only)
                    .map(|d| d.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Staged handoff, before a live migration of `vm` from `from` to `to` starts: commits a
/// `ReserveHandoff` for each of its exclusive disks, so the target opens them at the
/// storage stage with the reserved tokens and no Raft write sits inside the blackout.
/// Returns how many were reserved; a refusal is logged (that disk then takes the
/// unstaged path: the target commits a `Handoff` at the storage stage).
pub async fn reserve_handoffs(agent: &Agent, vm: &str, from: u64, to: u64) -> usize {
    let mut reserved = 0;
    for disk in exclusive_disks(agent, vm) {
        let cmd = LockCommand::ReserveHandoff {
            disk: disk.clone(),
            from,
            to,
        };
        match commit(agent, vm, cmd).await {
            Ok(LockOutcome::Reserved(g)) => {
                tracing::debug!(vm, disk = %disk, to, token = %g.token, "disk handoff reserved");
                reserved += 1;
            }
            Ok(other) => {
                tracing::warn!(vm, disk = %disk, outcome = ?other, "unexpected answer to a handoff reservation")
            }
            Err(e) => {
                tracing::warn!(vm, disk = %disk, error = %crate::error_chain(&e), "disk handoff not reserved; the target will commit it in the blackout")
            }
        }
    }
    reserved
}

/// Brings the local replica up to the leader's commit (a linearizable read), so the
/// reservations read from it next include every committed one; on failure the replica
/// is read as it is (logged).
async fn sync_replica(agent: &Agent, vm: &str) {
    if let Err(e) = agent.linearizable_read().await {
        tracing::info!(vm, error = %e, "replica not synced before reading disk handoffs");
    }
}

/// A live migration of `vm` to `to` ended before the source released its disks: drops
/// the reservations (the target never opened the disks with them).
pub async fn cancel_reserved_handoffs(agent: &Agent, vm: &str, from: u64, to: u64) {
    sync_replica(agent, vm).await;
    for disk in exclusive_disks(agent, vm) {
        if reserved_grant(agent, &disk, to).is_none() {
            continue;
        }
        let cmd = LockCommand::CancelHandoff { disk, from, to };
        if let Err(e) = commit(agent, vm, cmd).await {
            tracing::info!(vm, error = %crate::error_chain(&e), "handoff reservation not dropped (the holder's next lock change drops it)");
        }
    }
}

/// After the switchover of `vm` to `to` (or once the cluster decided `to` owns it): makes
/// `to` the holder of every disk reserved for it, with the reserved token it opened the
/// disk with. Idempotent; refusals are logged.
pub async fn complete_reserved_handoffs(agent: &Agent, vm: &str, to: u64) {
    sync_replica(agent, vm).await;
    for disk in exclusive_disks(agent, vm) {
        let from = agent.read_sm(|d| {
            let l = d.state.locks.lock(&disk)?;
            l.handoff.filter(|h| h.to == to)?;
            l.exclusive_owner()
        });
        let Some(from) = from else { continue };
        let cmd = LockCommand::CompleteHandoff {
            disk: disk.clone(),
            from,
            to,
        };
        match grant(agent, vm, cmd).await {
            Ok(g) => {
                tracing::info!(vm, disk = %disk, to, token = %g.token, "disk handoff completed")
            }
            Err(e) => {
                tracing::warn!(vm, disk = %disk, error = %crate::error_chain(&e), "disk handoff not completed")
            }
        }
    }
}

/// vmhost's lock callback over Raft, for migration threads (blocking).
///
/// A live migration's disk handoff is staged: before the engine starts, the source's
/// agent reserves each exclusive disk's next epoch for the target ([`reserve_handoffs`]);
/// the target syncs its replica when the session is set up
/// ([`DiskLocks::prepare_incoming`]) and, once the source reported its disks released,
/// opens them with the reserved grants without a Raft write; the source's agent commits
/// the completion after the switchover ([`complete_reserved_handoffs`]). Without a
/// reservation the handoff costs one Raft write inside the blackout: the source's instance
/// ([`ClusterLocks::for_migration_source`]) does not commit the `Handoff` it is given once
/// its disks are flushed and closed; the target commits it in [`DiskLocks::acquire`]
/// (called only after the source reported its disks released) and gets its grant from
/// that one commit. A migration that rolls back before the target committed leaves the
/// lock with the source (`reclaim` re-acquires it: the same token, or one above the
/// reservation the target may have opened with).
pub struct ClusterLocks {
    agent: Arc<Agent>,
    rt: tokio::runtime::Handle,
    defer_handoff: bool,
    /// Source: the engine reached the storage stage (its disks were flushed and closed
    /// and the target may open them with the reserved grants).
    released: std::sync::atomic::AtomicBool,
}

impl ClusterLocks {
    /// Must be called inside the agent's runtime. Commits every command it is given.
    pub fn new(agent: Arc<Agent>) -> Arc<ClusterLocks> {
        Arc::new(ClusterLocks {
            agent,
            rt: tokio::runtime::Handle::current(),
            defer_handoff: false,
            released: Default::default(),
        })
    }

    /// For the source of a live migration: leaves its `Handoff`s for the target to commit.
    pub fn for_migration_source(agent: Arc<Agent>) -> Arc<ClusterLocks> {
        Arc::new(ClusterLocks {
            agent,
            rt: tokio::runtime::Handle::current(),
            defer_handoff: true,
            released: Default::default(),
        })
    }

    /// Whether the migration source reached the storage stage (see [`ClusterLocks::released`]).
    pub fn released(&self) -> bool {
        self.released.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether `node` has a handoff of `disk` reserved while another node holds it: a
    /// failed migration's target that opened the disk with the reservation gives nothing
    /// back (the holder's re-acquire takes the disk above the reserved token).
    fn reserved_not_held(&self, disk: &DiskName, node: u64) -> bool {
        self.agent.read_sm(|d| {
            d.state.locks.lock(disk).is_some_and(|l| {
                !l.holders.contains(&node) && l.handoff.is_some_and(|h| h.to == node)
            })
        })
    }
}

impl DiskLocks for ClusterLocks {
    fn commit(&self, vm: &str, commands: &[LockCommand]) -> Result<(), LockOpError> {
        for c in commands {
            if self.defer_handoff && matches!(c, LockCommand::Handoff { .. }) {
                self.released
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::debug!(vm, command = ?c, "handoff left for the target to commit");
                continue;
            }
            if let LockCommand::Handoff { disk, from, .. } = c {
                if self.reserved_not_held(disk, *from) {
                    tracing::info!(vm, disk = %disk, "reserved handoff not given back; the source takes the disk back");
                    continue;
                }
            }
            self.rt.block_on(commit(&self.agent, vm, c.clone()))?;
        }
        Ok(())
    }

    fn acquire(
        &self,
        vm: &str,
        node: u64,
        disks: &[DiskSpec],
    ) -> Result<Vec<LockGrant>, LockOpError> {
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            if d.read_only {
                let cmd = LockCommand::Acquire {
                    disk: d.name.clone(),
                    node,
                    mode: LockMode::Shared,
                };
                out.push(self.rt.block_on(grant(&self.agent, vm, cmd))?);
                continue;
            }
            // The source has flushed and closed the disk. A staged handoff reserved its
            // next epoch for us: open with that token, nothing to commit now.
            if let Some(g) = reserved_grant(&self.agent, &d.name, node) {
                tracing::debug!(vm, disk = %d.name, token = %g.token, "opening with the reserved handoff");
                out.push(g);
                continue;
            }
            // Without one, commit the handoff from its holder to us (the source leaves
            // it to us); if the source committed it itself, an idempotent re-acquire
            // returns our grant.
            let start = Instant::now();
            let held = loop {
                let g = held_grant(&self.agent, &d.name, node)
                    .filter(|g| g.mode == LockMode::Exclusive);
                if g.is_some() || start.elapsed() >= HANDOFF_VISIBLE_WAIT {
                    break g;
                }
                std::thread::sleep(HANDOFF_POLL);
            };
            if let Some(g) = held {
                out.push(g);
                continue;
            }
            let from = self
                .agent
                .read_sm(|s| {
                    s.state
                        .locks
                        .lock(&d.name)
                        .and_then(|l| l.exclusive_owner())
                })
                .filter(|o| *o != node);
            let handoff = from.map(|from| LockCommand::Handoff {
                disk: d.name.clone(),
                from,
                to: node,
            });
            let handed = match handoff {
                Some(cmd) => self.rt.block_on(grant(&self.agent, vm, cmd)).ok(),
                None => None,
            };
            let g = match handed {
                Some(g) => g,
                None => self.rt.block_on(grant(
                    &self.agent,
                    vm,
                    LockCommand::Acquire {
                        disk: d.name.clone(),
                        node,
                        mode: LockMode::Exclusive,
                    },
                ))?,
            };
            out.push(g);
        }
        Ok(out)
    }

    fn prepare_incoming(&self, vm: &str, node: u64, disks: &[DiskSpec]) -> Vec<LockGrant> {
        if disks.iter().all(|d| d.read_only) {
            return Vec::new();
        }
        // The source reserved the handoffs before it connected: make them visible here
        // now, so the storage stage reads them without a round trip.
        if let Err(e) = self.rt.block_on(self.agent.linearizable_read()) {
            tracing::info!(vm, error = %e, "replica not synced before the incoming migration");
        }
        disks
            .iter()
            .filter(|d| !d.read_only)
            .filter_map(|d| reserved_grant(&self.agent, &d.name, node))
            .collect()
    }

    fn reclaim(
        &self,
        vm: &str,
        node: u64,
        disks: &[DiskSpec],
    ) -> Result<Vec<LockGrant>, LockOpError> {
        let mut out = Vec::with_capacity(disks.len());
        for d in disks {
            // Ask the leader: an idempotent re-acquire if the disk is still ours (a new
            // epoch above a reservation), else hand it back from the node it went to.
            let mode = mode_of(d);
            let acquire = LockCommand::Acquire {
                disk: d.name.clone(),
                node,
                mode,
            };
            let g = match self.rt.block_on(grant(&self.agent, vm, acquire)) {
                Ok(g) => g,
                Err(first) => {
                    let owner = self.agent.read_sm(|s| {
                        s.state
                            .locks
                            .lock(&d.name)
                            .and_then(|l| l.exclusive_owner())
                    });
                    match owner.filter(|o| *o != node && mode == LockMode::Exclusive) {
                        Some(from) => self.rt.block_on(grant(
                            &self.agent,
                            vm,
                            LockCommand::Handoff {
                                disk: d.name.clone(),
                                from,
                                to: node,
                            },
                        ))?,
                        None => return Err(first.into()),
                    }
                }
            };
            out.push(g);
        }
        Ok(out)
    }
}
