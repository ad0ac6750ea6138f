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
