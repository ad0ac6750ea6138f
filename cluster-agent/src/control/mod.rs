//! Controllers: the agent's loops that act on committed state. Each reads the replicated
//! state through the [`Agent`](crate::node::Agent), decides with pure functions (the
//! scheduler, [`placement`]) and changes the world through Raft writes and the local
//! [`VmHost`](crate::vmhost::VmHost).
//!
//! - [`reconciler`]: makes this node's VMs match the state (start, stop, hot-plug,
//!   migrations out and in, quick migration).
//! - [`failover`]: restarts the VMs of Down nodes elsewhere (leader only).
//! - [`fencing`]: stops every local VM when this node's lease lapses.
//! - [`demand`]: samples this node's VMs' CPU and memory demand for the heartbeats.
//! - [`job_runner`]: runs drain, failback and balancing jobs (leader only).
//! - [`migration_queue`]: starts queued migrations as slots free (leader only).
//! - [`placement`]: the scheduler snapshot of the state and the placement decisions.
//! - [`disk_lock_client`]: the agent's side of the replicated lock table.
//! - [`progress`]: live progress of the migrations this node is the source of.
//!
//! **Architecture Invariant:** no tonic or protobuf types here.

pub mod demand;
pub mod disk_lock_client;
pub mod failover;
pub mod fencing;
pub mod job_runner;
pub mod migration_queue;
pub mod placement;
pub mod power;
pub mod progress;
pub mod quick_migration;
pub mod reconciler;
pub mod vm_disks;
pub mod vm_nics;
