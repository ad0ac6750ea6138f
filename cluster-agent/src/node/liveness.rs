//! Peer liveness: all-to-all heartbeats, the leader's Down decision by *quorum silence*,
//! and every node's self-fence *lease*.
//!
//! Every agent sends a heartbeat to every other member every `heartbeat_interval`; the
//! heartbeat carries how long the sender has not heard each other node. Every agent
//! records when it last heard each peer (`last_heard`), the latest silence report of
//! each peer, and — for its own lease — the send time of the latest heartbeat each peer
//! acknowledged.
//!
//! * **Lease.** A node of an `n`-node cluster holds its lease while at least `⌊n/2⌋`
//!   other nodes (a majority counting itself) acknowledged a heartbeat it *sent* within
//!   the last `lease` (= `down_after / 2`). When the lease is not held, or lapsed at any
//!   moment since the last check (a lapse is latched at the next renewal), the fence
//!   watcher stops every local VM at once (`control::fencing`). After a lapse (and after the
//!   agent starts), the node starts no VM until it has applied a read index asked for
//!   after it held its lease again (the leader's commit index as of a moment a quorum
//!   confirmed it leads, `node::reads`); it also stops its VMs while its own committed
//!   record says Down.
//! * **Down.** The leader marks node `N` Down only when at least `n − ⌊n/2⌋` nodes other
//!   than `N` (itself included, each with a report at most `fresh` = `down_after −
//!   lease` old) have not heard `N` for `down_after`. Every majority that could renew
//!   `N`'s lease intersects that set, so `N`'s lease lapsed before the decision (see the
//!   invariant below). Failover restarts `N`'s VMs `control::failover::FAILOVER_GRACE`
//!   after the Down commit, which covers the fence watcher's poll and the VM stop.
//! * Because every node keeps warm `last_heard` and reports for all peers, a new leader
//!   needs no grace period: a dead old leader is Down `down_after` after it died, not
//!   an election plus `down_after` later.
//!
//! **Architecture Invariant:** a node runs VMs only while it holds its lease; the leader
//! marks a node Down only after a quorum-intersecting set of peers has not heard it for
//! `down_after` > `lease` + `fresh`, so by the Down commit the node's lease has lapsed and
//! its fence watcher has stopped (or, within the failover grace, stops) its VMs before
//! any other node is told to start them. (Assumes message delays and clock-rate
//! differences small against `down_after − lease − fresh` margins and the grace.)

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::node::config::AgentConfig;

/// The heartbeat one member sends every other member every `heartbeat_interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub node_id: u64,
    /// Start time of the sending agent process (unix ms); tells a restarted agent.
    pub incarnation: u64,
    /// How long the sender has not heard each other member.
    pub silences: Vec<PeerSilence>,
    /// The sender's newest demand report, in the first round after each sample.
    pub demand: Option<crate::node::demand::NodeDemand>,
}

/// One entry of a heartbeat's silence report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSilence {
    pub node_id: u64,
    pub silent_ms: u64,
}

/// A member's answer to a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeartbeatAck {
    /// The member's view of the leader (0: none).
    pub leader_id: u64,
    pub term: u64,
    /// False when the member is not the leader.
    pub accepted: bool,
    /// The member's last applied log index (informational: a node catching up after a
    /// lapse waits for a read index, not for this).
    pub last_applied: u64,
}

/// The liveness durations, all derived from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat: Duration,
    pub down_after: Duration,
    /// A node fences when no majority acknowledged a heartbeat it sent within this.
    pub lease: Duration,
    /// The oldest peer silence report the leader uses.
    pub fresh: Duration,
}

impl Timing {
    pub fn new(heartbeat: Duration, down_after: Duration) -> Timing {
        let lease = down_after / 2;
        Timing {
            heartbeat,
            down_after,
            lease,
            fresh: down_after - lease,
        }
    }

    pub fn from_config(c: &AgentConfig) -> Timing {
        Timing::new(c.heartbeat_interval, c.down_after)
    }
}

/// Acknowledgements a node needs from *other* nodes to hold its lease: with itself they
/// make a majority of the `n` registered nodes.
pub fn acks_needed(n: usize) -> usize {
    n / 2
}

/// How many nodes other than the suspect must report it silent before it is Down: every
/// set of [`acks_needed`] other nodes intersects any set this large.
pub fn silent_reports_needed(n: usize) -> usize {
    n.saturating_sub(1).saturating_sub(acks_needed(n)) + 1
}

/// The instant until which the lease is held, given the send times of the latest
/// acknowledged heartbeat per peer: the `need`-th most recent plus `lease`. `None`: not
/// enough acknowledgements.
pub fn lease_until(mut acked_sends: Vec<Instant>, need: usize, lease: Duration) -> Option<Instant> {
    if need == 0 {
        return None;
    }
    acked_sends.sort_unstable_by(|a, b| b.cmp(a));
    acked_sends.get(need - 1).map(|t| *t + lease)
}

/// One peer's latest silence report.
#[derive(Debug, Clone)]
struct Report {
    received: Instant,
    silent_ms: HashMap<u64, u64>,
}

/// What the fence watcher and the reconciler need to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseView {
    /// The lease is held now.
    pub held: bool,
    /// Lapses seen so far (latched: a lapse between two checks is still counted).
    pub lapses: u64,
    /// The node must catch up with the leader before it may start VMs.
    pub catching_up: bool,
    /// Until when the lease is held (`Some` while `held`): the VM worker processes'
    /// deadlines are derived from it.
    pub until: Option<Instant>,
}

/// The per-agent liveness table (in memory only).
#[derive(Debug)]
pub struct Liveness {
    timing: Timing,
    me: u64,
    started: Instant,
    last_heard: HashMap<u64, Instant>,
    reports: HashMap<u64, Report>,
    acked_send: HashMap<u64, Instant>,
    /// Registered node ids (set on every heartbeat round from the applied state).
    members: Vec<u64>,
    lease_until: Option<Instant>,
    lapses: u64,
    /// After a lapse or at start: `None` until a read index learned since arrives, then
    /// `Some(index)` to reach; cleared once applied.
    catch_up: Option<Option<u64>>,
    /// Counts the moments the lease was seen lost (a latched lapse, or not held at a
    /// check): a read index asked for before the latest one is not a catch-up target.
    lost_epoch: u64,
}

impl Liveness {
    pub fn new(me: u64, timing: Timing) -> Liveness {
        Liveness {
            timing,
            me,
            started: Instant::now(),
            last_heard: HashMap::new(),
            reports: HashMap::new(),
            acked_send: HashMap::new(),
            members: vec![me],
            lease_until: None,
            lapses: 0,
            catch_up: Some(None),
            lost_epoch: 0,
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn set_members(&mut self, mut members: Vec<u64>) {
        if !members.contains(&self.me) {
            members.push(self.me);
        }
        members.sort_unstable();
        self.members = members;
        self.acked_send.retain(|id, _| self.members.contains(id));
    }

    /// Time since this node last heard `node` (since it started when never).
    pub fn silence_of(&self, node: u64, now: Instant) -> Duration {
        let last = self.last_heard.get(&node).copied().unwrap_or(self.started);
        now.saturating_duration_since(last)
    }

    /// The silence report this node sends with its heartbeats.
    pub fn silences(&self, now: Instant) -> Vec<PeerSilence> {
        self.members
            .iter()
            .filter(|id| **id != self.me)
            .map(|id| PeerSilence {
                node_id: *id,
                silent_ms: self.silence_of(*id, now).as_millis() as u64,
            })
            .collect()
    }

    /// A heartbeat from a peer arrived. Only reports about registered nodes are kept (at
    /// most one per member: a peer's report cannot grow this node's memory).
    pub fn heard(&mut self, hb: &Heartbeat, now: Instant) {
        if hb.node_id == self.me {
            return;
        }
        let members = &self.members;
        self.last_heard.insert(hb.node_id, now);
        self.reports.insert(
            hb.node_id,
            Report {
                received: now,
                silent_ms: hb
                    .silences
                    .iter()
                    .filter(|s| members.binary_search(&s.node_id).is_ok())
                    .map(|s| (s.node_id, s.silent_ms))
                    .collect(),
            },
        );
    }

    /// Silence entries kept from peers' reports (at most one per member per reporter).
    pub fn reported_entries(&self) -> usize {
        self.reports.values().map(|r| r.silent_ms.len()).sum()
    }

    /// A peer acknowledged the heartbeat sent at `sent`.
    pub fn acked(&mut self, peer: u64, sent: Instant, _reply: &HeartbeatAck, now: Instant) {
        if !self.members.contains(&peer) {
            return;
        }
        let e = self.acked_send.entry(peer).or_insert(sent);
        if *e < sent {
            *e = sent;
        }
        self.renew(now);
    }

    /// The lease is lost (again): catch up anew, and forget read indexes asked for before.
    fn lost(&mut self) {
        self.catch_up = Some(None);
        self.lost_epoch += 1;
    }

    fn renew(&mut self, now: Instant) {
        let need = acks_needed(self.members.len());
        let new = if need == 0 {
            Some(now + self.timing.lease)
        } else {
            lease_until(
                self.acked_send.values().copied().collect(),
                need,
                self.timing.lease,
            )
        };
        if self.lease_until.is_some_and(|u| now > u) {
            // The lease had run out before this renewal: latch the lapse.
            self.lapses += 1;
            self.lost();
        }
        if new > self.lease_until {
            self.lease_until = new;
        }
    }

    /// Check the lease now (also latches a lapse that no renewal has seen yet).
    /// `applied`: this replica's applied index. After a lapse (and at start) the node
    /// catches up to a **read index** asked for *after* the lease was last seen lost: the
    /// leader's commit index as of a moment a quorum confirmed it still leads
    /// ([`Liveness::read_index_confirmed`]; the leader's *applied* index could trail a
    /// just-committed decision, and believing to lead is not enough: a leader cut off
    /// from the majority still believes it until it hears the higher term, and its replica
    /// lacks everything committed meanwhile).
    pub fn lease(&mut self, now: Instant, applied: u64) -> LeaseView {
        if acks_needed(self.members.len()) == 0 {
            // A one-node cluster: nobody else can take over its VMs.
            self.lease_until = Some(now + self.timing.lease);
            self.catch_up = None;
        }
        let held = self.lease_until.is_some_and(|u| now <= u);
        if !held {
            self.lost();
        }
        if let Some(Some(target)) = self.catch_up {
            if applied >= target {
                self.catch_up = None;
            }
        }
        LeaseView {
            held,
            lapses: self.lapses,
            catching_up: self.catch_up.is_some(),
            until: self.lease_until.filter(|_| held),
        }
    }

    /// The node waits for a catch-up target (after a lapse or at start) and has none yet:
    /// it should ask for a read index; `Some(epoch)` to hand back with the answer.
    pub fn needs_catch_up_target(&self) -> Option<u64> {
        (self.catch_up == Some(None)).then_some(self.lost_epoch)
    }

    /// A read index asked for at `epoch` (from [`Liveness::needs_catch_up_target`]) was
    /// confirmed: every entry committed before the question is at or below `index`. It
    /// becomes the catch-up target unless the lease was lost again since the question.
    pub fn read_index_confirmed(&mut self, index: u64, epoch: u64) {
        if self.catch_up == Some(None) && epoch == self.lost_epoch {
            self.catch_up = Some(Some(index));
        }
    }

    /// For each node the leader should mark Down now (silent for a quorum-intersecting set
    /// of peers): node id and its longest reported silence.
    pub fn silent_nodes(&self, now: Instant) -> Vec<(u64, Duration)> {
        let n = self.members.len();
        let need = silent_reports_needed(n);
        let mut out = Vec::new();
        for &node in self.members.iter().filter(|id| **id != self.me) {
            let mut count = 0;
            let mut longest = Duration::ZERO;
            for &r in self.members.iter().filter(|id| **id != node) {
                let silent = if r == self.me {
                    Some(self.silence_of(node, now))
                } else {
                    self.reports.get(&r).and_then(|rep| {
                        let age = now.saturating_duration_since(rep.received);
                        (age <= self.timing.fresh)
                            .then(|| rep.silent_ms.get(&node))
                            .flatten()
                            .map(|ms| Duration::from_millis(*ms))
                    })
                };
                if let Some(s) = silent.filter(|s| *s >= self.timing.down_after) {
                    count += 1;
                    longest = longest.max(s);
                }
            }
            if count >= need {
                out.push((node, longest));
            }
        }
        out
    }

    /// This leader heard `node` within `down_after`.
    pub fn heard_now(&mut self, node: u64) {
        self.last_heard.insert(node, Instant::now());
    }

    /// Whether `node`'s last heartbeat arrived after `t` (always true of this node).
    pub fn heard_since(&self, node: u64, t: Instant) -> bool {
        node == self.me || self.last_heard.get(&node).is_some_and(|h| *h > t)
    }

    pub fn recently_heard(&self, node: u64, now: Instant) -> bool {
        node == self.me
            || self
                .last_heard
                .get(&node)
                .is_some_and(|t| now.saturating_duration_since(*t) < self.timing.down_after)
    }
}

/// When this agent first saw each node Down in its applied state, on its own monotonic
/// clock. Graces after a Down (failover, taking over a dead holder's disk lock) are
/// measured from there, never from the wall-clock timestamp in the node's record: that
/// one was written by whichever leader committed the Down, whose clock may differ or
/// step. The Down was committed before this agent saw it, so a grace measured here is at
/// least as long since the commit.
#[derive(Debug, Default)]
pub struct DownClock {
    /// Node id -> (the record's Down epoch, used only to tell a new Down from the same
    /// one; when this leader first saw it).
    seen: BTreeMap<u64, (u64, Instant)>,
}

impl DownClock {
    /// The nodes Down for at least `grace` as this leader saw them, at `now`.
    pub fn ready(
        &mut self,
        state: &crate::state::ClusterState,
        now: Instant,
        grace: Duration,
    ) -> Vec<u64> {
        self.seen.retain(|id, (since, _)| {
            state.nodes.get(id).is_some_and(|n| {
                n.state == crate::state::NodeState::Down && n.state_since_unix_ms == *since
            })
        });
        for (id, n) in &state.nodes {
            if n.state == crate::state::NodeState::Down {
                self.seen.entry(*id).or_insert((n.state_since_unix_ms, now));
            }
        }
        self.seen
            .iter()
            .filter(|(_, (_, first))| now.saturating_duration_since(*first) >= grace)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(from: u64, silences: &[(u64, u64)]) -> Heartbeat {
        Heartbeat {
            node_id: from,
            incarnation: 1,
            silences: silences
                .iter()
                .map(|(n, s)| PeerSilence {
                    node_id: *n,
                    silent_ms: *s,
                })
                .collect(),
            demand: None,
        }
    }

    fn ack(leader: bool, from: u64, applied: u64) -> HeartbeatAck {
        HeartbeatAck {
            leader_id: if leader { from } else { 0 },
            term: 1,
            accepted: leader,
            last_applied: applied,
        }
    }

    #[test]
    fn quorum_sizes_intersect() {
        for n in 1..=16usize {
            let acks = acks_needed(n);
            let silent = silent_reports_needed(n);
            // Any `acks` of the n-1 others meet any `silent` of them.
            assert!(acks + silent > n - 1, "n={n}");
            assert!(silent <= n.saturating_sub(1).max(1), "n={n}");
        }
        assert_eq!((acks_needed(3), silent_reports_needed(3)), (1, 2));
        assert_eq!((acks_needed(4), silent_reports_needed(4)), (2, 2));
    }

    #[test]
    fn lease_needs_majority_acks_and_latches_a_lapse() {
        let t = Timing::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut l = Liveness::new(1, t);
        l.set_members(vec![1, 2, 3]);
        let t0 = Instant::now();
        assert!(!l.lease(t0, 0).held, "no lease before any acknowledgement");
        l.acked(2, t0, &ack(true, 2, 7), t0);
        let v = l.lease(t0 + Duration::from_millis(400), 0);
        assert!(v.held && v.catching_up);
        // A heartbeat reply is no catch-up target; a read index asked for now is.
        let epoch = l.needs_catch_up_target().unwrap_or_default();
        l.read_index_confirmed(7, epoch);
        assert!(l.lease(t0 + Duration::from_millis(400), 6).catching_up);
        assert!(!l.lease(t0 + Duration::from_millis(400), 7).catching_up);
        // Expired after `lease` (500 ms) without a newer acknowledgement.
        assert!(!l.lease(t0 + Duration::from_millis(600), 7).held);
        // A renewal after the lapse latches it even if nobody checked in between.
        let mut l2 = Liveness::new(1, t);
        l2.set_members(vec![1, 2, 3]);
        l2.acked(3, t0, &ack(false, 3, 0), t0);
        let later = t0 + Duration::from_millis(900);
        l2.acked(3, later, &ack(false, 3, 0), later);
        let v = l2.lease(later, 0);
        assert_eq!((v.held, v.lapses, v.catching_up), (true, 1, true));
    }

    #[test]
    fn a_node_regaining_its_lease_waits_for_a_read_index_asked_for_since() {
        // Node 1 was cut off (lease lapsed), and the cut heals: peers acknowledge its
        // heartbeats again. It must not start VMs from its stale replica; it catches up to
        // a read index asked for after it regained the lease.
        let t = Timing::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut l = Liveness::new(1, t);
        l.set_members(vec![1, 2, 3]);
        let t0 = Instant::now();
        l.acked(3, t0, &ack(false, 3, 0), t0);
        let before_cut = l.needs_catch_up_target().unwrap_or_default();
        l.read_index_confirmed(5, before_cut);
        assert!(!l.lease(t0, 5).catching_up, "caught up before the cut");
        // A read index asked for before the cut and answered after it does not count.
        let asked = l.needs_catch_up_target();
        assert_eq!(asked, None, "nothing to ask while caught up");
        let healed = t0 + Duration::from_millis(3000);
        assert!(!l.lease(healed, 5).held, "lapsed during the cut");
        let during_cut = l.needs_catch_up_target().unwrap_or_default();
        l.acked(3, healed, &ack(false, 3, 0), healed);
        let v = l.lease(healed, 5);
        assert!(
            v.held && v.catching_up,
            "lease back, still catching up: {v:?}"
        );
        l.read_index_confirmed(6, during_cut);
        assert!(
            l.lease(healed, 6).catching_up,
            "asked while the lease was lost: not a target"
        );
        let epoch = l.needs_catch_up_target().unwrap_or_default();
        l.read_index_confirmed(40, epoch);
        assert_eq!(l.needs_catch_up_target(), None);
        assert!(l.lease(healed, 39).catching_up, "one entry short");
        assert!(!l.lease(healed, 40).catching_up);
    }

    #[test]
    fn a_leader_catches_up_to_a_read_index_its_quorum_confirmed() {
        let t = Timing::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut l = Liveness::new(1, t);
        l.set_members(vec![1, 2, 3]);
        let t0 = Instant::now();
        l.acked(2, t0, &ack(false, 2, 0), t0);
        assert!(l.lease(t0, 9).catching_up, "at start: no target yet");
        let epoch = l.needs_catch_up_target().unwrap_or_default();
        l.read_index_confirmed(12, epoch);
        assert!(l.lease(t0, 11).catching_up);
        assert!(!l.lease(t0, 12).catching_up);
        // A confirmation that arrives when nothing is pending changes nothing.
        l.read_index_confirmed(100, epoch);
        assert!(!l.lease(t0, 12).catching_up);
    }

    #[test]
    fn down_needs_fresh_silence_from_a_quorum_intersecting_set() {
        let t = Timing::new(Duration::from_millis(100), Duration::from_millis(1000));
        let mut l = Liveness::new(1, t);
        l.set_members(vec![1, 2, 3]);
        let t0 = Instant::now();
        l.heard(&hb(2, &[(3, 0)]), t0);
        l.heard(&hb(3, &[(2, 0)]), t0);
        let t1 = t0 + Duration::from_millis(1200);
        // Node 2 keeps reporting and says node 3 is silent; the leader has not heard 3.
        l.heard(&hb(2, &[(3, 1150)]), t1);
        let down = l.silent_nodes(t1);
        assert_eq!(down.iter().map(|d| d.0).collect::<Vec<_>>(), vec![3]);
        // If node 2 still hears node 3 (only the leader-3 link is cut), 3 is not Down.
        l.heard(&hb(2, &[(3, 20)]), t1);
        assert!(l.silent_nodes(t1).is_empty());
        // A stale report does not count.
        l.heard(&hb(2, &[(3, 1150)]), t1);
        assert!(l
            .silent_nodes(t1 + Duration::from_millis(700))
            .iter()
            .all(|d| d.0 != 3));
    }
}
