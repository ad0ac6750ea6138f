//! What the public gRPC services share when a call must be answered by another agent
//! (the Raft leader, a VM's owner, a migration's source).

use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::node::Agent;

/// How long a forwarded call may take to connect to the leader or the other agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings on forwarded channels, so a stream to an agent that went silent (cut
/// off, frozen, powered off: no reset ever comes) fails instead of hanging.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the forwarded channel is declared dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The management address of the Raft leader, or `None` when this agent leads.
pub fn leader_addr(agent: &Agent) -> Result<Option<String>, Status> {
    let m = agent.metrics();
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

/// A channel from `agent` to the agent whose management address is `addr`, leaving from
/// this agent's management address; `who` names it in the error ("cannot reach {who} at
/// {addr}: ...").
pub async fn channel(agent: &Agent, addr: &str, who: &str) -> Result<Channel, Status> {
    super::tls::endpoint(&agent.credentials(), addr)
        .map_err(|e| Status::internal(format!("bad management address {addr:?}: {e}")))?
        .local_address(agent.config().mgmt_source_ip())
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach {who} at {addr}: {e}")))
}
