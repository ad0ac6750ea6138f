//! Linearizable reads: before a management read is answered from this replica, the
//! replica must hold every entry committed before the read began. The leader confirms
//! with a quorum that it still leads (openraft's read index); a follower asks the leader
//! for that index over the peer plane and waits until it has applied it. A node that
//! cannot (no leader known, the leader unreachable, a deposed leader without a quorum)
//! says so instead of answering its possibly stale view as fact.

use std::time::{Duration, Instant};

use openraft::error::CheckIsLeaderError;

use super::agent::Agent;
use super::peers::ReadIndex;

/// How long a read may spend confirming its index (leader changes included) and
/// catching up to it before it is refused.
pub const READ_DEADLINE: Duration = Duration::from_secs(3);
/// How long one read-index question (to the leader, or the leader's quorum round) may
/// take.
pub const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a linearizable read was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("node {this} knows no Raft leader")]
    NoLeader { this: u64 },
    #[error("node {this} could not confirm with the Raft leader (node {leader}) that its view is current: {reason}")]
    NotConfirmed {
        this: u64,
        leader: u64,
        reason: String,
    },
    #[error("node {this} applied the log up to index {applied}, short of the leader's read index {index}, within {waited_ms} ms")]
    Behind {
        this: u64,
        applied: u64,
        index: u64,
        waited_ms: u64,
    },
}

impl Agent {
    /// On the leader: confirm with a quorum that this node still leads and return the
    /// index a linearizable read must wait for.
    pub async fn read_index_as_leader(&self) -> ReadIndex {
        let leader = self.leader();
        if leader != Some(self.node_id()) {
            return ReadIndex::Refused {
                leader,
                reason: format!("node {} is not the leader", self.node_id()),
            };
        }
        match tokio::time::timeout(READ_INDEX_TIMEOUT, self.raft.get_read_log_id()).await {
            Ok(Ok((read, _))) => ReadIndex::Confirmed {
                index: read.map_or(0, |l| l.index),
            },
            Ok(Err(e)) => ReadIndex::Refused {
                leader: self.leader(),
                reason: match e {
                    openraft::error::RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(
                        q,
                    )) => format!(
                        "a quorum did not confirm its leadership (only nodes {:?} answered)",
                        q.got
                    ),
                    openraft::error::RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                        f,
                    )) => format!(
                        "it is no longer the leader (leader: {})",
                        f.leader_id
                            .map_or("unknown".into(), |l| format!("node {l}"))
                    ),
                    other => other.to_string(),
                },
            },
            Err(_) => ReadIndex::Refused {
                leader: None,
                reason: format!(
                    "a quorum did not confirm its leadership within {} ms",
                    READ_INDEX_TIMEOUT.as_millis()
                ),
            },
        }
    }

    /// One attempt: this node's read index, from itself as leader or from the leader.
    pub(super) async fn read_index_once(&self) -> Result<u64, ReadError> {
        let me = self.node_id();
        let m = self.metrics();
        let Some(leader) = m.current_leader else {
            return Err(ReadError::NoLeader { this: me });
        };
        let answer = if leader == me {
            self.read_index_as_leader().await
        } else {
            let Some(node) = m.membership_config.membership().get_node(&leader) else {
                return Err(ReadError::NotConfirmed {
                    this: me,
                    leader,
                    reason: "the leader is not in this node's membership".into(),
                });
            };
            match self
                .peers
                .read_index(&node.raft_addr, me, READ_INDEX_TIMEOUT)
                .await
            {
                Ok(a) => a,
                Err(e) => ReadIndex::Refused {
                    leader: Some(leader),
                    reason: e.0,
                },
            }
        };
        match answer {
            ReadIndex::Confirmed { index } => Ok(index),
            ReadIndex::Refused { reason, .. } => Err(ReadError::NotConfirmed {
                this: me,
                leader,
                reason,
            }),
        }
    }

    /// Make the next read of this replica linearizable: learn the read index (retrying
    /// through leader changes) and wait until it is applied here, all within
    /// [`READ_DEADLINE`]. Returns the read index.
    pub async fn linearizable_read(&self) -> Result<u64, ReadError> {
        let start = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let index = loop {
            match self.read_index_once().await {
                Ok(index) => break index,
                Err(e) if start.elapsed() + backoff >= READ_DEADLINE => return Err(e),
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(200));
                }
            }
        };
        let left = READ_DEADLINE.saturating_sub(start.elapsed());
        let applied = self
            .raft
            .wait(Some(left.max(Duration::from_millis(1))))
            .applied_index_at_least(Some(index), "read index applied")
            .await;
        match applied {
            Ok(_) => Ok(index),
            Err(_) => Err(ReadError::Behind {
                this: self.node_id(),
                applied: self.metrics().last_applied.map_or(0, |l| l.index),
                index,
                waited_ms: start.elapsed().as_millis() as u64,
            }),
        }
    }
}
