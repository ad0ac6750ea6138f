//! The wire layer: the only module that knows tonic and the protobuf types.
//!
//! - Management plane (public, `mgmt_addr`): [`management`] (cluster, nodes, KV,
//!   events), [`vms`], [`migrations`], [`jobs`] (drain, failback, balancing),
//!   [`volumes`] (disks and locks); [`convert`] translates between the agent's types and
//!   the protobuf ones; [`status`] is the one mapping of the agent's
//!   errors to `tonic::Status`; [`forward`] proxies streams to the leader or a VM's
//!   owner; [`read`] makes every read linearizable unless the client asks for a stale
//!   one; [`paging`] cuts list answers into pages.
//! - Peer plane (members only, `raft_addr`): [`peer`] — the Raft service and its client.
//! - [`metrics`]: Prometheus `/metrics` over plain HTTP.
//! - [`console`]: the web console (HTTPS, `console_addr`): pages, their JSON API and a
//!   live event stream, calling the management services in process under the same roles.
//! - Trust: [`tls`] (the node's credentials as TLS configs; every agent-to-agent channel
//!   is built there), [`auth`] (who may call which management method) and
//!   [`certificates`] (join tokens; signing on agents that hold the CA key); [`ca`]
//!   (rotating the cluster CA, and following a rotation on every node);
//!   [`migration_auth`] admits an incoming migration session only for a committed one.
//!
//! **API Boundary:** every request is validated here; bad input is `InvalidArgument`
//! with a sentence naming what was wrong.

pub mod auth;
pub mod ca;
pub mod certificates;
pub mod console;
pub mod convert;
pub mod forward;
pub mod jobs;
pub mod management;
pub mod metrics;
pub mod migration_auth;
pub mod migrations;
pub mod paging;
pub mod peer;
pub mod read;
pub mod rotation;
pub mod serve;
pub mod status;
pub mod tls;
pub mod vms;
pub mod volumes;
