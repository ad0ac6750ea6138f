//! Live migration (pre-copy over several TCP connections) and quick migration
//! (pause + snapshot to a shared directory). See `ARCHITECTURE.section.md`.

pub mod convergence;
pub mod protocol;
pub mod transport;
