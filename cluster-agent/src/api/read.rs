//! Reads of the management services are linearizable unless the client asks for this
//! agent's own view (`cluster_proto::STALE_READ_HEADER`): [`consistent`] runs first in
//! every read RPC. `ClusterStatus` (the diagnostic) and `/metrics` always answer the
//! local view.

use cluster_proto::STALE_READ_HEADER;
use tonic::{Request, Status};

use crate::node::{Agent, ReadError};

/// Whether the request asks for this agent's own, possibly stale view.
pub fn stale_requested<T>(req: &Request<T>) -> bool {
    req.metadata()
        .get(STALE_READ_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Before a read: unless the request asks for a stale read, make this replica hold every
/// entry committed before the call (see `node::reads`), or refuse with `Unavailable`
/// saying why its view may be stale.
pub async fn consistent<T>(agent: &Agent, req: &Request<T>) -> Result<(), Status> {
    if stale_requested(req) {
        return Ok(());
    }
    agent.linearizable_read().await.map(|_| ()).map_err(refused)
}

/// The status of a refused linearizable read.
pub fn refused(e: ReadError) -> Status {
    Status::unavailable(format!(
        "{e}; it may be cut off from the majority, so its view could be stale. Ask another \
         node, or read this node's own view as a stale read (`clusterctl --stale`, gRPC \
         metadata {STALE_READ_HEADER}: true)"
    ))
}

/// How long a server stream waits for an apply before it looks at the replica anyway
/// (the watch is the wake-up; this only bounds a missed one).
pub const WATCH_FALLBACK: std::time::Duration = std::time::Duration::from_secs(2);

/// What a server stream (`WatchJob`, `WatchEvents`) waits on between two looks at the
/// local replica: the applied-state watch ([`Agent::applied_watch`], which moves once an
/// entry's effects are readable), with a slow fallback tick.
pub struct AppliedWatch {
    applied: tokio::sync::watch::Receiver<Option<crate::raft::LogId>>,
    seen: Option<crate::raft::LogId>,
    fallback: std::time::Duration,
}

impl AppliedWatch {
    /// Start watching: call before the first read of the replica, so nothing applied
    /// after that read is missed.
    pub fn new(agent: &Agent) -> AppliedWatch {
        AppliedWatch::of(agent.applied_watch(), WATCH_FALLBACK)
    }

    fn of(
        mut applied: tokio::sync::watch::Receiver<Option<crate::raft::LogId>>,
        fallback: std::time::Duration,
    ) -> AppliedWatch {
        let seen = *applied.borrow_and_update();
        AppliedWatch {
            applied,
            seen,
            fallback,
        }
    }

    /// Resolves once this replica applied an entry after the last call (or `new`), or
    /// after [`WATCH_FALLBACK`].
    pub async fn changed(&mut self) {
        let wait = async {
            loop {
                let now = *self.applied.borrow_and_update();
                if now != self.seen {
                    self.seen = now;
                    return;
                }
                if self.applied.changed().await.is_err() {
                    // Raft stopped: only the fallback tick is left.
                    std::future::pending::<()>().await;
                }
            }
        };
        let _ = tokio::time::timeout(self.fallback, wait).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::AppliedWatch;
    use crate::raft::LogId;

    fn applied(index: u64) -> Option<LogId> {
        Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index))
    }

    /// The fallback is an hour: `changed` can only return because of the apply.
    #[tokio::test]
    async fn an_apply_wakes_the_watch_without_the_fallback_tick() {
        let (tx, rx) = tokio::sync::watch::channel(applied(1));
        let mut w = AppliedWatch::of(rx, Duration::from_secs(3600));
        let waiter = tokio::spawn(async move {
            w.changed().await;
            w.seen
        });
        let _ = tx.send(applied(2));
        let seen = tokio::time::timeout(Duration::from_secs(60), waiter).await;
        assert!(matches!(seen, Ok(Ok(Some(l))) if l.index == 2), "{seen:?}");
    }

    #[tokio::test]
    async fn a_notification_without_a_new_apply_does_not_wake_it_and_the_fallback_does() {
        let (tx, rx) = tokio::sync::watch::channel(applied(1));
        let mut w = AppliedWatch::of(rx, Duration::from_secs(3600));
        let _ = tx.send(applied(1));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), w.changed())
                .await
                .is_err(),
            "woken by a change that applied nothing"
        );
        // A dropped sender (Raft stopped): only the fallback tick is left.
        let mut w = AppliedWatch::of(tx.subscribe(), Duration::from_millis(10));
        drop(tx);
        tokio::time::timeout(Duration::from_secs(60), w.changed())
            .await
            .unwrap_or_else(|_| panic!("the fallback tick never came"));
    }
}
