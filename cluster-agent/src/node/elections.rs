//! When a voter asks for votes. openraft's own election timer is off
//! (`enable_elect: false`): a follower learns that its leader is alive from the liveness
//! heartbeats it exchanges with every member anyway (the leader's answer says "I lead,
//! in term T"), so the leader need not send Raft heartbeats every round to hold its
//! followers. It sends them every `raft_heartbeat_interval_ms` (default 1 s) instead, as
//! a sign that its Raft core works.
//!
//! A voter that is not the leader asks for votes (`Trigger::elect`) when, for `lease` plus
//! a random election timeout ([`ElectionTiming::timeout`]), no member said it leads in a
//! term at least this voter's — or when, for `raft_stale` plus that timeout, no
//! AppendEntries arrived (a leader whose heartbeats answer while its Raft core is stuck).
//! A voter that already asked, or saw a new term begin, waits only the random timeout
//! before asking (again), until a leader of that term speaks. A voter whose log ends
//! before a member's applied index waits twice the maximum timeout more, so the member,
//! which would refuse it, asks first. Time the agent could not run (a stall of its
//! election loop longer than two rounds) does not count as silence: the messages queued
//! meanwhile are read first.
//!
//! A voter that heard a leader within `lease`, and an AppendEntries within `raft_stale`,
//! refuses a vote request from another node without asking openraft ([`Signs::refuses`]);
//! this is openraft's leader lease (which its own, rarer heartbeats no longer renew)
//! kept by the liveness heartbeats. Refusing a vote never endangers safety.
//!
//! These are openraft's own rules (leader lease, election timeout checked on a tick,
//! `smaller_log_timeout`), fed by the liveness heartbeats: a dead leader's first
//! successor asks `lease` + 400–1100 ms after the last sign of it (the defaults).

use std::time::{Duration, Instant};

/// How the election clock measures (all from the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ElectionTiming {
    /// A leader's answer within this is a sign it lives (openraft's leader lease:
    /// `election_timeout_max_ms`).
    pub lease: Duration,
    pub timeout_min: Duration,
    pub timeout_max: Duration,
    /// No AppendEntries for this long: the leader's Raft core is taken for stuck
    /// (three Raft heartbeat intervals, never less than `lease`).
    pub raft_stale: Duration,
}

impl ElectionTiming {
    pub fn from_config(c: &crate::node::config::AgentConfig) -> ElectionTiming {
        let lease = Duration::from_millis(c.election_timeout_max_ms);
        ElectionTiming {
            lease,
            timeout_min: Duration::from_millis(c.election_timeout_min_ms),
            timeout_max: Duration::from_millis(c.election_timeout_max_ms),
            raft_stale: (Duration::from_millis(c.raft_heartbeat_interval_ms) * 3).max(lease),
        }
    }

    /// A random election timeout; `pick` in `0.0..1.0`. It spans the configured range
    /// plus ¾ of its minimum: openraft looked at its timer only on its tick (1.5 × its
    /// heartbeat, which was half the minimum), so its voters asked up to a tick after their
    /// timeout, each at its own phase. Without that spread, 15 voters often asked within
    /// one election's round trip of each other, and a split vote (or a later candidate of
    /// the same term deposing the winner, as openraft orders such votes) costs a timeout
    /// more.
    pub fn timeout(&self, pick: f64) -> Duration {
        let span = self.timeout_max.saturating_sub(self.timeout_min) + self.timeout_min * 3 / 4;
        self.timeout_min + span.mul_f64(pick.clamp(0.0, 1.0))
    }
}

/// What this node has seen of a leader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Signs {
    /// The newest answer from a member that said it leads: (node, its term, when).
    pub claim: Option<(u64, u64, Instant)>,
    /// When the last AppendEntries arrived (from whichever leader sent it).
    pub last_append: Option<Instant>,
    /// The highest applied index a member reported in its answer, and when.
    pub peer_applied: Option<(u64, Instant)>,
}

impl Signs {
    /// `node` answered a heartbeat saying it leads in `term`.
    pub fn leader_answered(&mut self, node: u64, term: u64, now: Instant) {
        if self.claim.is_none_or(|(_, t, _)| term >= t) {
            self.claim = Some((node, term, now));
        }
    }

    /// A member answered a heartbeat: it has applied up to `index`. The highest index is
    /// kept while it is fresh for [`Signs::behind`] (within `t.lease`).
    pub fn member_applied(&mut self, index: u64, t: &ElectionTiming, now: Instant) {
        let replace = self
            .peer_applied
            .is_none_or(|(i, at)| index >= i || now.saturating_duration_since(at) > t.lease);
        if replace {
            self.peer_applied = Some((index, now));
        }
    }

    /// Whether a member heard within `lease` has applied past `my_last_log` (the last
    /// index in this node's log): it would refuse this node's vote request, so this node
    /// lets it ask first (openraft's `smaller_log_timeout`).
    pub fn behind(&self, my_last_log: u64, t: &ElectionTiming, now: Instant) -> bool {
        self.peer_applied
            .is_some_and(|(i, at)| i > my_last_log && now.saturating_duration_since(at) <= t.lease)
    }

    pub fn append_arrived(&mut self, now: Instant) {
        self.last_append = Some(now);
    }

    /// When a leader other than `except`, in a term at least `my_term`, last said it
    /// leads.
    fn leader_seen(&self, my_term: u64, except: Option<u64>) -> Option<Instant> {
        self.claim
            .filter(|(node, term, _)| *term >= my_term && Some(*node) != except)
            .map(|(_, _, at)| at)
    }

    /// Whether a vote request from `candidate` is refused: a leader other than it said
    /// within `lease` that it leads (in a term at least `my_term`), and AppendEntries
    /// still arrive.
    pub fn refuses(&self, candidate: u64, my_term: u64, t: &ElectionTiming, now: Instant) -> bool {
        let heard = self
            .leader_seen(my_term, Some(candidate))
            .is_some_and(|at| now.saturating_duration_since(at) <= t.lease);
        let appends = self
            .last_append
            .is_some_and(|at| now.saturating_duration_since(at) <= t.raft_stale);
        heard && appends
    }
}

/// This node's part in an election, as the clock needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leads: never asks.
    Leader,
    /// A voter that does not lead; `only` when it is the only voter.
    Voter { only: bool },
    /// A learner or a node in no cluster: never asks.
    NotVoter,
}

/// What the clock says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Ask for votes now.
    Elect,
    /// Look again by this instant at the latest.
    LookBy(Instant),
    /// Nothing to watch (a leader, or not a voter).
    Idle,
}

/// One voter's election clock.
#[derive(Debug, Clone)]
pub struct ElectionClock {
    timing: ElectionTiming,
    /// The latest moment nothing was to be timed: started, led, was no voter, woke from a
    /// stall, or asked for votes.
    quiet_since: Instant,
    /// This round's random timeout.
    timeout: Duration,
    /// Asked for votes, or saw a new term begin, since the last sign of a leader.
    asked: bool,
    /// The term of the last check: a new term (this node voted, or learned of an
    /// election) starts the silence again, as a granted vote restarts openraft's timer.
    /// After asking, the term this node's own candidacy takes.
    term: Option<u64>,
}

impl ElectionClock {
    pub fn new(timing: ElectionTiming, now: Instant, pick: f64) -> ElectionClock {
        ElectionClock {
            timing,
            quiet_since: now,
            timeout: timing.timeout(pick),
            asked: false,
            term: None,
        }
    }

    /// The agent could not run for a while: its silence starts again now.
    pub fn woke_from_stall(&mut self, now: Instant) {
        self.quiet_since = now;
    }

    /// Whether to ask for votes. `pick` (in `0.0..1.0`) draws the next timeout when it
    /// asks. `behind`: a member has a longer log ([`Signs::behind`]); this node then waits
    /// twice the maximum timeout more, as openraft does once it saw a greater log.
    pub fn check(
        &mut self,
        role: Role,
        my_term: u64,
        signs: &Signs,
        behind: bool,
        now: Instant,
        pick: f64,
    ) -> Decision {
        let only = match role {
            Role::Leader | Role::NotVoter => {
                self.quiet_since = now;
                self.asked = false;
                return Decision::Idle;
            }
            Role::Voter { only } => only,
        };
        if self.term.is_some_and(|t| t != my_term) {
            // A new term: an election runs (this node voted in it, or learned of it).
            // Until a leader of it speaks, wait only the random timeout, as openraft does
            // for a vote not yet committed: every voter may then ask if this election
            // fails, not only the ones that asked in it.
            self.quiet_since = self.quiet_since.max(now);
            self.asked = true;
        }
        self.term = Some(my_term);
        let seen = signs.leader_seen(my_term, None);
        if seen.is_some_and(|at| at > self.quiet_since) {
            // A leader spoke since this node last asked: back to the leader's lease.
            self.asked = false;
        }
        let due = if only {
            now
        } else if self.asked {
            self.quiet_since + self.timeout
        } else {
            let heard = seen.map_or(self.quiet_since, |at| at.max(self.quiet_since));
            let appended = signs
                .last_append
                .map_or(self.quiet_since, |at| at.max(self.quiet_since));
            (heard + self.timing.lease + self.timeout)
                .min(appended + self.timing.raft_stale + self.timeout)
        };
        let due = if behind && !only {
            due + self.timing.timeout_max * 2
        } else {
            due
        };
        if due > now {
            return Decision::LookBy(due);
        }
        self.quiet_since = now;
        self.asked = true;
        self.term = Some(my_term + 1);
        self.timeout = self.timing.timeout(pick);
        Decision::Elect
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> ElectionTiming {
        ElectionTiming {
            lease: Duration::from_millis(800),
            timeout_min: Duration::from_millis(400),
            timeout_max: Duration::from_millis(800),
            raft_stale: Duration::from_millis(3000),
        }
    }

    /// A voter's clock started at `t0`, and signs of leader 1 (term 3): its answer and an
    /// AppendEntries at `t0`.
    fn heard_leader_at(t0: Instant) -> (ElectionClock, Signs) {
        let mut s = Signs::default();
        s.leader_answered(1, 3, t0);
        s.append_arrived(t0);
        (ElectionClock::new(timing(), t0, 0.0), s)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const VOTER: Role = Role::Voter { only: false };

    #[test]
    fn a_follower_that_hears_its_leader_never_asks() {
        let t0 = Instant::now();
        let mut c = ElectionClock::new(timing(), t0, 0.0);
        let mut s = Signs::default();
        for round in 1..100u64 {
            let now = t0 + ms(200 * round);
            s.leader_answered(1, 3, now);
            if round % 5 == 0 {
                s.append_arrived(now);
            }
            assert!(
                matches!(c.check(VOTER, 3, &s, false, now, 0.5), Decision::LookBy(_)),
                "round {round}"
            );
        }
    }

    #[test]
    fn a_silent_leader_is_replaced_after_its_lease_and_a_random_timeout() {
        let t0 = Instant::now();
        let (mut c, s) = heard_leader_at(t0);
        // lease 800 + timeout 400 (pick 0.0).
        assert_eq!(
            c.check(VOTER, 3, &s, false, t0 + ms(1199), 0.5),
            Decision::LookBy(t0 + ms(1200))
        );
        assert_eq!(
            c.check(VOTER, 3, &s, false, t0 + ms(1200), 0.5),
            Decision::Elect
        );
        // Asked: again after the new timeout alone (750 ms for pick 0.5), no lease.
        let asked = t0 + ms(1200);
        assert_eq!(
            c.check(VOTER, 4, &s, false, asked + ms(749), 0.5),
            Decision::LookBy(asked + ms(750))
        );
        assert_eq!(
            c.check(VOTER, 4, &s, false, asked + ms(750), 1.0),
            Decision::Elect
        );
    }

    #[test]
    fn timeouts_span_the_range_and_a_tick_more() {
        let t = timing();
        assert_eq!(t.timeout(0.0), ms(400));
        assert_eq!(t.timeout(1.0), ms(1100), "800 + 3/4 of 400");
        assert_eq!(t.timeout(7.0), ms(1100), "a draw past 1.0 is the end");
    }

    #[test]
    fn a_leader_of_an_older_term_is_no_sign() {
        let t0 = Instant::now();
        let mut c = ElectionClock::new(timing(), t0, 0.0);
        let mut s = Signs::default();
        for round in 1..=6u64 {
            s.leader_answered(1, 2, t0 + ms(200 * round));
            s.append_arrived(t0 + ms(200 * round));
        }
        // In term 3 (this node voted in it), the term-2 leader's answers do not count.
        assert_eq!(
            c.check(VOTER, 3, &s, false, t0 + ms(1200), 0.0),
            Decision::Elect
        );
        let mut fresh = ElectionClock::new(timing(), t0, 0.0);
        assert!(matches!(
            fresh.check(VOTER, 2, &s, false, t0 + ms(1200), 0.0),
            Decision::LookBy(_)
        ));
    }

    #[test]
    fn a_leader_whose_raft_is_stuck_is_replaced() {
        let t0 = Instant::now();
        let mut c = ElectionClock::new(timing(), t0, 0.0);
        let mut s = Signs::default();
        s.append_arrived(t0);
        let mut elected_at = None;
        for round in 1..40u64 {
            let now = t0 + ms(100 * round);
            s.leader_answered(1, 3, now);
            if c.check(VOTER, 3, &s, false, now, 0.0) == Decision::Elect {
                elected_at = Some(now);
                break;
            }
        }
        // raft_stale 3000 + timeout 400.
        assert_eq!(elected_at, Some(t0 + ms(3400)));
    }

    #[test]
    fn a_vote_given_in_a_new_term_starts_the_silence_again() {
        let t0 = Instant::now();
        let (mut c, mut s) = heard_leader_at(t0);
        assert!(matches!(
            c.check(VOTER, 3, &s, false, t0, 0.0),
            Decision::LookBy(_)
        ));
        // The leader died; another voter asked first and this one voted for it (term 4):
        // this one does not ask at once for term 5 (the term-3 leader no longer counts),
        // but after a random timeout if no leader of term 4 speaks.
        let voted = t0 + ms(1100);
        assert_eq!(
            c.check(VOTER, 4, &s, false, voted, 0.0),
            Decision::LookBy(voted + ms(400))
        );
        s.leader_answered(7, 4, voted + ms(50));
        assert_eq!(
            c.check(VOTER, 4, &s, false, voted + ms(100), 0.0),
            Decision::LookBy(voted + ms(50 + 1200)),
            "a leader of term 4 spoke: its lease again"
        );
    }

    #[test]
    fn a_voter_behind_a_member_lets_it_ask_first() {
        let t = timing();
        let t0 = Instant::now();
        let (_, mut s) = heard_leader_at(t0);
        s.member_applied(40, &t, t0);
        s.member_applied(30, &t, t0 + ms(800));
        assert!(
            s.behind(39, &t, t0 + ms(800)),
            "the higher answer is kept while fresh"
        );
        assert!(!s.behind(40, &t, t0), "as long a log");
        assert!(!s.behind(39, &t, t0 + ms(801)), "an old answer");
        let mut c = ElectionClock::new(t, t0, 0.0);
        assert_eq!(
            c.check(VOTER, 3, &s, true, t0, 0.0),
            Decision::LookBy(t0 + ms(1200 + 1600))
        );
    }

    #[test]
    fn a_stall_is_not_silence() {
        let t0 = Instant::now();
        let (mut c, s) = heard_leader_at(t0);
        let woke = t0 + ms(5000);
        c.woke_from_stall(woke);
        assert_eq!(
            c.check(VOTER, 3, &s, false, woke, 0.0),
            Decision::LookBy(woke + ms(1200))
        );
    }

    #[test]
    fn leaders_and_learners_never_ask_and_a_lone_voter_asks_at_once() {
        let t0 = Instant::now();
        let s = Signs::default();
        let mut c = ElectionClock::new(timing(), t0, 0.0);
        assert_eq!(
            c.check(Role::Leader, 3, &s, false, t0 + ms(60_000), 0.0),
            Decision::Idle
        );
        assert_eq!(
            c.check(Role::NotVoter, 3, &s, false, t0 + ms(60_000), 0.0),
            Decision::Idle
        );
        assert_eq!(
            c.check(
                Role::Voter { only: true },
                3,
                &s,
                false,
                t0 + ms(60_001),
                0.0
            ),
            Decision::Elect
        );
    }

    #[test]
    fn votes_are_refused_while_another_leader_is_heard_and_appends_arrive() {
        let t0 = Instant::now();
        let t = timing();
        let mut s = Signs::default();
        assert!(!s.refuses(2, 3, &t, t0), "no leader heard");
        s.leader_answered(1, 3, t0);
        assert!(!s.refuses(2, 3, &t, t0), "no AppendEntries yet");
        s.append_arrived(t0);
        assert!(s.refuses(2, 3, &t, t0 + ms(800)));
        assert!(!s.refuses(1, 3, &t, t0 + ms(800)), "the leader itself asks");
        assert!(!s.refuses(2, 3, &t, t0 + ms(801)), "the lease ran out");
        assert!(
            !s.refuses(2, 4, &t, t0 + ms(100)),
            "the leader's term is over here"
        );
        s.leader_answered(1, 3, t0 + ms(3000));
        assert!(
            !s.refuses(2, 3, &t, t0 + ms(3001)),
            "no AppendEntries for raft_stale"
        );
    }

    #[test]
    fn an_answer_from_an_older_term_does_not_replace_a_newer_claim() {
        let t0 = Instant::now();
        let mut s = Signs::default();
        s.leader_answered(2, 5, t0);
        s.leader_answered(1, 4, t0 + ms(10));
        assert_eq!(s.claim, Some((2, 5, t0)));
    }
}
