//! Live migration (pre-copy over several TCP connections) and quick migration
//! (pause + snapshot to a shared directory). See `ARCHITECTURE.md`.
//!
//! * [`protocol`]: wire format, sequence diagram, limits.
//! * [`tls`]: TLS configuration ([`tls::Transport`]) and session authorization
//!   ([`tls::SessionAuthorizer`]); [`conn`]: one (TLS or plaintext) connection;
//!   [`record`]: the TLS 1.3 record layer used after rustls' handshake.
//! * [`transport`]: guest pages over N TCP connections, page hashes / memory receipt.
//! * [`convergence`]: pure model deciding rounds / throttle / stop-and-copy / give-up.
//! * [`seam`]: traits the engine needs from a VM, a node and the storage hook.
//! * [`source`] / [`target`]: the two ends of a live migration.
//! * [`stats`]: per-migration statistics.

pub mod adapter;
pub mod conn;
pub mod convergence;
pub mod protocol;
pub mod quick;
pub mod record;
pub mod seam;
pub mod source;
pub mod stats;
pub mod target;
#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;
pub mod tls;
pub mod transport;

#[cfg(test)]
mod engine_tests;

use protocol::ProtocolError;
use seam::{Incompatibility, OpError};
use transport::TransportError;

/// Most data connections one migration may use.
pub const MAX_CONNECTIONS: usize = 16;
/// Default number of data connections.
pub const DEFAULT_CONNECTIONS: usize = 4;

/// Errors of a live migration, on either side.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot connect to the migration target {addr}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: conn::ConnError,
    },
    #[error("cannot listen for migrations")]
    Listen(#[source] std::io::Error),
    #[error("incoming migration session refused: {0}")]
    SessionRefused(String),
    #[error("migration connection failed during {phase}")]
    Protocol {
        phase: &'static str,
        #[source]
        source: ProtocolError,
    },
    #[error("the target refused the migration: {0}")]
    Refused(String),
    #[error("this node cannot run the VM")]
    Incompatible(#[source] Incompatibility),
    #[error("moving guest memory failed")]
    Transport(#[source] TransportError),
    #[error("VM operation '{op}' failed")]
    Vm {
        op: &'static str,
        #[source]
        source: OpError,
    },
    #[error("storage handoff '{op}' failed")]
    Handoff {
        op: &'static str,
        #[source]
        source: OpError,
    },
    #[error("migration did not converge: {0}")]
    GaveUp(String),
    #[error("migration cancelled{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Cancelled(Option<String>),
    #[error("invalid migration options: {0}")]
    InvalidOptions(String),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error(
        "the target may or may not be running the VM after commit; the source VM stays paused"
    )]
    CommitUncertain(#[source] ProtocolError),
    #[error("rollback after a failed migration also failed (VM state on the source unknown); original error: {original}")]
    RollbackFailed {
        original: Box<MigrationError>,
        #[source]
        source: Box<MigrationError>,
    },
    #[error("deliberate failure injected at {0:?}")]
    Failpoint(target::Failpoint),
}

impl MigrationError {
    pub(crate) fn proto(phase: &'static str) -> impl FnOnce(ProtocolError) -> MigrationError {
        move |source| match source {
            ProtocolError::Refused(r) => MigrationError::Refused(r),
            source => MigrationError::Protocol { phase, source },
        }
    }
}
