//! Conversions between the agent's own types and the protobuf types, one file per
//! protobuf package: [`nodes`] (`cluster.management.v1`: facts, registrations, nodes,
//! events) and [`vms`] (`cluster.vms.v1`: VM specs and records). Bad client input
//! becomes an error naming the field; `api::status` turns it into a status.

pub mod demand;
pub mod nodes;
pub mod vms;
