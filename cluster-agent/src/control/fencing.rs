//! The fence watcher: stops every local VM the moment this node's lease lapses or its
//! committed record says Down (the lease model is `node::liveness`), then records the
//! fence report through Raft once the cluster is reachable again.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// How often the fence watcher checks the lease while this node hosts a VM.
pub const FENCE_POLL: Duration = Duration::from_millis(20);
/// How long the fence watcher sleeps at most while this node hosts no VM (capped by the
/// heartbeat interval, which the systemd watchdog's liveness check assumes). It also
/// wakes when the lease ends, so a VM started in between never runs past the lease's end
/// unchecked (see [`next_check`]).
pub const FENCE_IDLE_POLL: Duration = Duration::from_millis(100);

/// When the fence watcher checks next: after [`FENCE_POLL`] while this node hosts a VM;
/// else after `idle` ([`FENCE_IDLE_POLL`] at most, or `heartbeat` if shorter), or at the
/// end of the lease (`until`) if that comes first. A lease ends at `until` unless the
/// membership grows; an idle node wakes at most `FENCE_IDLE_POLL` later in that case.
/// The agent passes the time to its next heartbeat round as `idle`, so the idle checks
/// share that round's wake-up.
pub fn next_check(
    hosts_vms: bool,
    until: Option<std::time::Instant>,
    heartbeat: Duration,
    idle: Duration,
    now: std::time::Instant,
) -> Duration {
    if hosts_vms {
        return FENCE_POLL;
    }
    let idle = idle
        .min(FENCE_IDLE_POLL)
        .min(heartbeat)
        .max(Duration::from_millis(1));
    match until {
        Some(u) => u
            .saturating_duration_since(now)
            .max(Duration::from_millis(1))
            .min(idle),
        None => idle,
    }
}

/// Stop every local VM as soon as the lease is not held (or lapsed since the last check),
/// or this node's committed record says Down.
pub async fn run_fence(
    agent: Arc<crate::node::Agent>,
    host: Arc<crate::vmhost::VmHost>,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = agent.node_id();
    let mut seen_lapses = 0;
    let mut held_once = false;
    let mut renewed = tokio::time::Instant::now();
    // One renewal round at a time, never awaited here: a worker that does not answer
    // must not delay this loop's lease checks.
    let renewing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut wait = FENCE_POLL;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        agent.note_fence_round();
        // Decided before this round's lease check: a VM that starts after it is checked
        // again no later than the lease's end.
        let hosts_vms = !host.list().is_empty() || host.has_workers();
        let self_fenced = host.take_self_fenced();
        if !self_fenced.is_empty() {
            tokio::spawn(report_fenced(
                agent.clone(),
                self_fenced,
                "its worker's lease ran out: the agent did not renew it in time".to_owned(),
                crate::node::now_unix_ms(),
                shutdown.clone(),
            ));
        }
        let lease = agent.lease();
        let heartbeat = agent.config().heartbeat_interval;
        wait = next_check(
            hosts_vms,
            lease.until,
            heartbeat,
            crate::node::until_next_round(heartbeat),
            std::time::Instant::now(),
        );
        let down = agent.read_sm(|d| {
            d.state
                .nodes
                .get(&me)
                .is_some_and(|n| n.state == crate::state::NodeState::Down)
        });
        if lease.held && lease.lapses == seen_lapses && !down {
            if !held_once {
                tokio::spawn(end_restart(agent.clone(), shutdown.clone()));
            }
            held_once = true;
            if let Some(until) = lease.until {
                if renewed.elapsed() >= crate::vmhost::worker::RENEW_EVERY
                    && !renewing.swap(true, std::sync::atomic::Ordering::AcqRel)
                {
                    renewed = tokio::time::Instant::now();
                    let (h, busy) = (host.clone(), renewing.clone());
                    drop(tokio::task::spawn_blocking(move || {
                        h.renew_workers(until);
                        busy.store(false, std::sync::atomic::Ordering::Release);
                    }));
                }
            }
            continue;
        }
        // A starting agent does not hold its lease yet: VMs adopted from worker processes
        // run on the deadline their previous agent gave them until this one renews it.
        if !held_once && lease.lapses == seen_lapses && !down {
            continue;
        }
        seen_lapses = lease.lapses;
        if host.list().is_empty() {
            continue;
        }
        let h = host.clone();
        let fenced = tokio::task::spawn_blocking(move || h.fence_all())
            .await
            .unwrap_or_default();
        if !fenced.is_empty() {
            tracing::warn!(
                node_id = me,
                vms = ?fenced,
                lease_held = lease.held,
                recorded_down = down,
                "lease lost; vms fenced"
            );
            let reason = if down {
                "its committed record says Down".to_owned()
            } else {
                "lease lapsed: no majority acknowledged its heartbeats".to_owned()
            };
            let at_unix_ms = crate::node::now_unix_ms();
            tokio::spawn(report_fenced(
                agent.clone(),
                fenced,
                reason,
                at_unix_ms,
                shutdown.clone(),
            ));
        }
    }
}

/// Back with its lease after a restart it announced: end the window (the leader judges
/// this node by its heartbeats again).
async fn end_restart(agent: Arc<crate::node::Agent>, mut shutdown: watch::Receiver<bool>) {
    let me = agent.node_id();
    for _ in 0..20 {
        let announced = agent.read_sm(|d| d.state.nodes.get(&me).and_then(|n| n.restarting));
        if announced.is_none() {
            return;
        }
        let cmd = crate::state::Command::AnnounceRestart {
            node_id: me,
            window_ms: 0,
            at_unix_ms: crate::node::now_unix_ms(),
        };
        match agent.write(crate::node::ForwardRequest::Command(cmd)).await {
            Ok(_) => return,
            Err(e) => tracing::debug!(error = %e, "cannot end the restart window yet; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// How long a fenced node keeps trying to record its fence report.
pub const FENCE_REPORT_DEADLINE: Duration = Duration::from_secs(300);

/// Record, through Raft, that this node stopped `vms` itself (an `EventKind::NodeFenced`
/// event). The node is cut off when it fences, so this retries until it reaches a leader
/// again (or gives up after [`FENCE_REPORT_DEADLINE`]).
async fn report_fenced(
    agent: Arc<crate::node::Agent>,
    vms: Vec<String>,
    reason: String,
    at_unix_ms: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    let started = tokio::time::Instant::now();
    let cmd = crate::state::Command::NodeFenced {
        node_id: agent.node_id(),
        vms,
        reason,
        at_unix_ms,
    };
    loop {
        match agent
            .write(crate::node::ForwardRequest::Command(cmd.clone()))
            .await
        {
            Ok(_) => return,
            Err(crate::node::WriteError::Rejected { reason }) => {
                tracing::warn!(%reason, "fence report refused");
                return;
            }
            Err(e) if started.elapsed() < FENCE_REPORT_DEADLINE => {
                tracing::debug!(error = %e, "cannot record the fence report yet; retrying");
            }
            Err(e) => {
                tracing::warn!(error = %e, "gave up recording the fence report");
                return;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const HB: Duration = Duration::from_millis(100);

    #[test]
    fn a_node_with_vms_is_checked_every_fence_poll() {
        let now = Instant::now();
        for until in [None, Some(now), Some(now + Duration::from_secs(1))] {
            assert_eq!(next_check(true, until, HB, HB, now), FENCE_POLL);
        }
    }

    #[test]
    fn an_idle_node_is_checked_at_the_next_round_or_the_lease_end() {
        let now = Instant::now();
        assert_eq!(next_check(false, None, HB, HB, now), FENCE_IDLE_POLL);
        let round = Duration::from_millis(63);
        assert_eq!(next_check(false, None, HB, round, now), round);
        let soon = now + Duration::from_millis(37);
        assert_eq!(
            next_check(false, Some(soon), HB, round, now),
            Duration::from_millis(37)
        );
        let later = now + Duration::from_millis(600);
        assert_eq!(next_check(false, Some(later), HB, round, now), round);
        // A lease that already ended is checked again at once (1 ms).
        assert_eq!(
            next_check(false, Some(now), HB, round, now + Duration::from_millis(5)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn the_idle_wait_never_exceeds_the_idle_poll_or_the_heartbeat_interval() {
        let now = Instant::now();
        let long = Duration::from_secs(5);
        assert_eq!(next_check(false, None, long, long, now), FENCE_IDLE_POLL);
        let hb = Duration::from_millis(50);
        assert_eq!(next_check(false, None, hb, long, now), hb);
    }
}
