//! What the public gRPC services share when a call must be answered by another agent
//! (the Raft leader, a VM's owner, a migration's source), and the status of a failed
//! Raft write.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::agent::{Agent, WriteError};

/// How long a forwarded call may take to connect to the leader or the other agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The management address of the Raft leader, or `None` when this agent leads.
pub fn leader_addr(agent: &Agent) -> Result<Option<String>, Status> {
    let m = agent.raft.metrics().borrow().clone();
    match m.current_leader {
        Some(l) if l == agent.node_id() => Ok(None),
        Some(l) => m
            .membership_config
            .membership()
            .get_node(&l)
            .map(|n| Some(n.mgmt_addr.clone()))
            .ok_or_else(|| {
                Status::unavailable(format!("leader {l} has no known management address"))
            }),
        None => Err(Status::unavailable(
            "no Raft leader is known; is a majority of voters running?",
        )),
    }
}

/// A channel to the agent whose management address is `addr`; `who` names it in the
/// error ("cannot reach {who} at {addr}: ...").
pub async fn channel(addr: &str, who: &str) -> Result<Channel, Status> {
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::internal(format!("bad management address {addr:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {who} at {addr}: {e}")))
}

/// A failed Raft write as the API answers it: a refusal by the state machine or an
/// uninitialised cluster is `FailedPrecondition`, no reachable leader `Unavailable`.
pub fn write_status(e: WriteError) -> Status {
    let msg = e.to_string();
    match e {
        WriteError::Rejected { .. } | WriteError::NotInitialized => {
            Status::failed_precondition(msg)
        }
        WriteError::NoLeader { .. } | WriteError::NotLeader { .. } | WriteError::Forward { .. } => {
            Status::unavailable(msg)
        }
        _ => Status::internal(msg),
    }
}

/// The gRPC status for a refusal of `class`.
pub fn class_status(class: crate::vms::ErrorClass, msg: String) -> Status {
    use crate::vms::ErrorClass;
    match class {
        ErrorClass::InvalidArgument => Status::invalid_argument(msg),
        ErrorClass::NotFound => Status::not_found(msg),
        ErrorClass::AlreadyExists => Status::already_exists(msg),
        ErrorClass::FailedPrecondition => Status::failed_precondition(msg),
    }
}
