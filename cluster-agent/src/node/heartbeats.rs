//! The liveness loops of an agent: heartbeats to every member, and — on the leader —
//! the Down/Up decisions of the pure model in [`super::liveness`], committed through Raft.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::watch;

use super::agent::{now_unix_ms, Agent};
use super::elections::{Decision, ElectionClock, ElectionTiming, Role};
use super::liveness::Heartbeat;
use crate::state::{Command, NodeState};

/// How long a heartbeat may take (and a connection to a peer to open: the peer
/// client's channels reconnect this often while a peer is unreachable).
pub fn heartbeat_timeout(config: &crate::node::config::AgentConfig) -> Duration {
    config.heartbeat_interval.max(Duration::from_millis(200))
}

/// The time from now to the next multiple of `period` since the Unix epoch: where the
/// heartbeat rounds of every agent with this interval start (agents with synchronised
/// clocks send theirs together). Zero `period`: zero.
pub fn until_next_round(period: Duration) -> Duration {
    let period_ns = period.as_nanos();
    if period_ns == 0 {
        return Duration::ZERO;
    }
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let left = period_ns - now_ns % period_ns;
    Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX))
}

/// A tick every `period` on the wall-clock grid of `period` ([`until_next_round`]). The
/// agent's periodic loops tick on it, so loops whose periods divide one another wake
/// together with the heartbeat rounds: on this kind of host a thread's wake-up costs more
/// than the work of most rounds. After a stall the missed tick fires at once, then the
/// ticks are back on the grid.
pub fn grid_interval(period: Duration) -> tokio::time::Interval {
    grid_interval_offset(period, Duration::ZERO)
}

/// [`grid_interval`] with every tick `offset` after the grid's.
pub fn grid_interval_offset(period: Duration, offset: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + until_next_round(period) + offset,
        period,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

impl Agent {
    /// Send one heartbeat to every other member, each on its own task.
    fn send_heartbeats(self: &Arc<Self>) {
        let m = self.raft.metrics().borrow().clone();
        let peers: Vec<(u64, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.node_id())
            .map(|(id, n)| (*id, n.raft_addr.clone()))
            .collect();
        let members: Vec<u64> = self.read_sm(|d| d.state.nodes.keys().copied().collect());
        let silences = {
            let mut l = self.lock_liveness();
            l.set_members(members);
            l.silences(Instant::now())
        };
        let timeout = heartbeat_timeout(&self.config);
        let timing = ElectionTiming::from_config(&self.config);
        let demand = self.lock_demand().unsent.take();
        for (peer, addr) in peers {
            let hb = Heartbeat {
                node_id: self.node_id(),
                incarnation: self.incarnation,
                silences: silences.clone(),
                demand: demand.clone(),
            };
            let sent = Instant::now();
            let call = self.peers.heartbeat(&addr, hb, timeout);
            let agent = self.clone();
            tokio::spawn(async move {
                match call.await {
                    Ok(ack) => {
                        let now = Instant::now();
                        {
                            let mut signs = agent.lock_leader_signs();
                            if ack.accepted && ack.leader_id == peer {
                                signs.leader_answered(peer, ack.term, now);
                            }
                            signs.member_applied(ack.last_applied, &timing, now);
                        }
                        agent.lock_liveness().acked(peer, sent, &ack, now)
                    }
                    Err(e) => tracing::debug!(peer, error = %e, "heartbeat not acknowledged"),
                }
            });
        }
    }

    /// Heartbeat sender loop: runs until `shutdown` flips. Rounds start on the wall-clock
    /// grid of the interval ([`until_next_round`]), the same instants on every agent, so
    /// a node receives its peers' heartbeats and their answers in one burst per round and
    /// wakes up once for many of them rather than once for each. After a stall the
    /// missed round runs at once and the next ones are on the grid again.
    pub async fn run_heartbeats(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = grid_interval(self.config().heartbeat_interval);
        let confirming = Arc::new(AtomicBool::new(false));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.send_heartbeats();
            self.confirm_read_index(&confirming);
            self.observe_downs();
            self.heartbeat_rounds.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The election clock of this node ([`super::elections`]; openraft's own is off):
    /// looks on every heartbeat round, and at the moment the clock names, whether to ask
    /// for votes. Runs until `shutdown` flips.
    pub async fn run_elections(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = self.config().heartbeat_interval;
        let timing = ElectionTiming::from_config(&self.config);
        let mut clock = ElectionClock::new(timing, Instant::now(), rand::random::<f64>());
        let mut tick = grid_interval(period);
        let mut last = Instant::now();
        loop {
            let now = Instant::now();
            if now.saturating_duration_since(last) > period * 2 {
                // This loop could not run for two rounds: what arrived meanwhile is read
                // before the silence counts.
                clock.woke_from_stall(now);
            }
            last = now;
            let (role, term, last_log) = self.election_role();
            let signs = *self.lock_leader_signs();
            let behind = signs.behind(last_log, &timing, now);
            let look_by = match clock.check(role, term, &signs, behind, now, rand::random::<f64>())
            {
                Decision::Elect => {
                    tracing::info!(term, "no sign of a leader: asking for votes");
                    if let Err(e) = self.raft.trigger().elect().await {
                        tracing::warn!(error = %e, "cannot ask for votes");
                    }
                    None
                }
                Decision::LookBy(t) => Some(tokio::time::Instant::from_std(t)),
                Decision::Idle => None,
            };
            tokio::select! {
                _ = tick.tick() => {}
                _ = async {
                    match look_by {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// This node's part in an election, its current term and the last index in its log.
    fn election_role(&self) -> (Role, u64, u64) {
        let m = self.raft.metrics();
        let m = m.borrow();
        let last_log = m.last_log_index.unwrap_or(0);
        if m.state == ServerState::Leader {
            return (Role::Leader, m.current_term, last_log);
        }
        let membership = m.membership_config.membership();
        let me = self.node_id();
        let role = if membership.voter_ids().any(|v| v == me) {
            Role::Voter {
                only: membership.voter_ids().count() == 1,
            }
        } else {
            Role::NotVoter
        };
        (role, m.current_term, last_log)
    }

    /// openraft's heartbeats (an empty AppendEntries to every follower), sent by this loop
    /// rather than openraft's own timer (`enable_heartbeat` is off): every
    /// `raft_heartbeat_interval_ms` (default 1 s) on the wall-clock grid of that interval,
    /// while this node leads. The followers know their leader lives from the liveness
    /// heartbeats ([`super::elections`]); these show that its Raft core works, and carry
    /// the commit index to a follower that missed it. Runs until `shutdown` flips.
    pub async fn run_raft_heartbeats(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = Duration::from_millis(self.config().raft_heartbeat_interval_ms);
        let mut tick = grid_interval(period);
        loop {
            if self.leader() != Some(self.node_id()) {
                if !self.wait_until_leader(&mut shutdown).await {
                    return;
                }
                // The new leader's first heartbeats come from openraft itself (its blank
                // entry); the next ones from here, on the grid.
                tick.reset_after(until_next_round(period));
            }
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if self.leader() == Some(self.node_id()) {
                if let Err(e) = self.raft.trigger().heartbeat().await {
                    tracing::debug!(error = %e, "raft heartbeat not sent");
                }
            }
        }
    }

    /// A node that waits for a catch-up target (after its lease was lost, or at start)
    /// and holds its lease again asks for a read index: the leader's commit index as of a
    /// moment a quorum confirmed it leads (itself when it leads: a leader cut off from the
    /// majority believes it leads until it hears the higher term). One question in flight
    /// at a time; an answer to a question asked before the lease was lost again is
    /// dropped (see `Liveness::read_index_confirmed`).
    fn confirm_read_index(self: &Arc<Self>, confirming: &Arc<AtomicBool>) {
        if !self.lease().held {
            return;
        }
        let Some(epoch) = self.lock_liveness().needs_catch_up_target() else {
            return;
        };
        if confirming.swap(true, Ordering::AcqRel) {
            return;
        }
        let (agent, flag) = (self.clone(), confirming.clone());
        tokio::spawn(async move {
            match agent.read_index_once().await {
                Ok(index) => {
                    tracing::info!(read_index = index, "catch-up target: the read index");
                    agent.lock_liveness().read_index_confirmed(index, epoch);
                }
                Err(e) => tracing::info!(error = %e, "no read index for the catch-up yet"),
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// Liveness monitor loop (acts only while this agent leads): marks silent nodes
    /// Down and returning ones Up, through committed commands. It looks once a round,
    /// half a round after the heartbeat rounds start: by then the round's silence reports
    /// have arrived (a look at the round's start would judge by the previous round's).
    pub async fn run_liveness(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let period = self.config().heartbeat_interval;
        let mut tick = grid_interval_offset(period, period / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if self.leader() != Some(self.node_id()) {
                if !self.wait_until_leader(&mut shutdown).await {
                    return;
                }
                continue;
            }
            for (node_id, state, reason) in self.liveness_decisions() {
                let cmd = Command::SetNodeState {
                    node_id,
                    state,
                    at_unix_ms: now_unix_ms(),
                    reason: reason.clone(),
                };
                match self.raft().client_write(cmd).await {
                    Ok(_) => {
                        tracing::info!(node_id, state = state.as_str(), reason = %reason, "node state changed")
                    }
                    Err(e) => {
                        tracing::warn!(node_id, error = %e, "cannot record node state");
                        break;
                    }
                }
            }
        }
    }

    /// Down for nodes a quorum-intersecting set of peers has not heard for `down_after`
    /// (see `liveness`), Up for Down nodes this leader hears again.
    fn liveness_decisions(&self) -> Vec<(u64, NodeState, String)> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader || m.current_leader != Some(self.node_id()) {
            return Vec::new();
        }
        let now = Instant::now();
        #[allow(clippy::type_complexity)]
        let (nodes, waking): (
            Vec<(u64, NodeState, Option<crate::state::RestartWindow>)>,
            Vec<(u64, u64)>,
        ) = self.read_sm(|d| {
            (
                d.state
                    .nodes
                    .iter()
                    .map(|(id, r)| (*id, r.state, r.restarting))
                    .collect(),
                d.state
                    .nodes
                    .iter()
                    .filter(|(_, r)| r.state == NodeState::Waking)
                    .map(|(id, r)| (*id, r.state_since_unix_ms))
                    .collect(),
            )
        });
        let woke_at: Vec<(u64, Instant)> = waking
            .iter()
            .map(|(id, since)| (*id, self.waking_seen(*id, *since)))
            .collect();
        let held = self.restart_held(now, &nodes);
        let mut l = self.lock_liveness();
        l.set_members(nodes.iter().map(|(id, _, _)| *id).collect());
        let silent = l.silent_nodes(now);
        let mut out = Vec::new();
        for (id, state, _) in nodes {
            let silence = silent
                .iter()
                .find(|(n, _)| *n == id && !held.contains(n))
                .map(|(_, s)| *s);
            match (state, silence) {
                (NodeState::Up | NodeState::Paused, Some(s)) => out.push((
                    id,
                    NodeState::Down,
                    format!("no heartbeat for {} ms", s.as_millis()),
                )),
                (NodeState::Down, None) if l.recently_heard(id, now) => {
                    out.push((id, NodeState::Up, "heartbeats resumed".to_string()))
                }
                // Standby: silent on purpose, never Down. Waking: Up once heard after
                // this leader saw the wake-up begin (not a heartbeat from before the
                // power-off), and once the peers' reports no longer call it silent: Up
                // while they still do would be Down again on the next round.
                (NodeState::Waking, None)
                    if woke_at
                        .iter()
                        .any(|(n, t)| *n == id && l.heard_since(id, *t)) =>
                {
                    out.push((
                        id,
                        NodeState::Up,
                        "woke: heartbeats resumed after its power-on command".to_string(),
                    ))
                }
                _ => {}
            }
        }
        out
    }

    /// The nodes inside a restart window they announced, as measured from the moment this
    /// leader first saw the announcement (never earlier than the node made it, so the
    /// node's workers, whose lease ends at most the window after the announcement was
    /// sent, have stopped before the window ends here).
    fn restart_held(
        &self,
        now: Instant,
        nodes: &[(u64, NodeState, Option<crate::state::RestartWindow>)],
    ) -> Vec<u64> {
        let mut holds = self.restart_holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.retain(|id, (announced, _)| {
            nodes
                .iter()
                .any(|(n, _, w)| n == id && w.is_some_and(|w| w.announced_unix_ms == *announced))
        });
        let mut held = Vec::new();
        for (id, _, w) in nodes {
            let Some(w) = w else { continue };
            let (_, since) = holds.entry(*id).or_insert((w.announced_unix_ms, now));
            if now.saturating_duration_since(*since) < Duration::from_millis(w.window_ms) {
                held.push(*id);
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_round_is_within_one_period() {
        for ms in [1, 100, 250, 1_000] {
            let p = Duration::from_millis(ms);
            let d = until_next_round(p);
            assert!(d > Duration::ZERO && d <= p, "{d:?} for a period of {p:?}");
        }
        assert_eq!(until_next_round(Duration::ZERO), Duration::ZERO);
    }
}
