//! The one mapping from the agent's errors to `tonic::Status`.
//!
//! Every service answers a failure through a function here, so one error is always the
//! same code wherever it surfaces. The message is the error's whole chain. The state
//! layer classifies its own refusals ([`ErrorClass`]); this module only turns a class
//! into a code.

use csv_volume::VolumeError;
use tonic::Status;

use crate::api::convert::vms::ConvertError;
use crate::api::peer::client::PeerError;
use crate::control::job_runner::DrainError;
use crate::control::placement::PlacementError;
use crate::control::quick_migration::QuickMigrationError;
use crate::error_chain;
use crate::node::{ForwardReply, WriteError};
use crate::state::jobs::{self, JobError};
use crate::state::migrations::MigrationError;
use crate::state::vm_disks::VmDiskError;
use crate::state::vms::{ErrorClass, VmStateError};

/// The code of a refusal of `class`.
pub fn class(class: ErrorClass, msg: String) -> Status {
    match class {
        ErrorClass::InvalidArgument => Status::invalid_argument(msg),
        ErrorClass::NotFound => Status::not_found(msg),
        ErrorClass::AlreadyExists => Status::already_exists(msg),
        ErrorClass::FailedPrecondition => Status::failed_precondition(msg),
    }
}

/// A failed write or lifecycle operation: a refusal by the state machine, an
/// uninitialised cluster or a full one is `FailedPrecondition`; no reachable leader
/// `Unavailable`.
pub fn write(e: WriteError) -> Status {
    let msg = e.to_string();
    match e {
        WriteError::NotLeader { .. } | WriteError::NoLeader { .. } | WriteError::Forward { .. } => {
            Status::unavailable(msg)
        }
        WriteError::NotInitialized
        | WriteError::AlreadyMember { .. }
        | WriteError::LastVoter { .. }
        | WriteError::TooManyVoters { .. }
        | WriteError::Rejected { .. } => Status::failed_precondition(msg),
        WriteError::UnknownNode { .. } => Status::not_found(msg),
        WriteError::DuplicateNode { .. } => Status::already_exists(msg),
        WriteError::LearnerTimeout { .. } => Status::deadline_exceeded(msg),
        WriteError::Raft { .. } => Status::internal(msg),
    }
}

impl From<WriteError> for Status {
    fn from(e: WriteError) -> Status {
        write(e)
    }
}

/// The leader answered a write with a reply of another kind (a bug, never bad input).
pub fn unexpected_reply(r: &ForwardReply) -> Status {
    Status::internal(format!(
        "the leader answered with an unexpected reply: {r:?}"
    ))
}

pub fn vm_state(e: VmStateError) -> Status {
    class(e.class(), error_chain(&e))
}

pub fn migration(e: MigrationError) -> Status {
    class(e.class(), e.to_string())
}

pub fn job(e: &JobError) -> Status {
    class(jobs::error_class(e), error_chain(e))
}

pub fn vm_disk(e: &VmDiskError) -> Status {
    class(e.class(), error_chain(e))
}

pub fn vm_nic(e: &crate::state::vm_nics::VmNicError) -> Status {
    class(e.class(), error_chain(e))
}

pub fn drain(e: DrainError) -> Status {
    match &e {
        DrainError::Job(j) => job(j),
        DrainError::Unmovable { .. } => Status::failed_precondition(error_chain(&e)),
        DrainError::Placement(_) | DrainError::Plan(_) => Status::internal(error_chain(&e)),
    }
}

pub fn placement(e: PlacementError) -> Status {
    let msg = error_chain(&e);
    match e {
        PlacementError::UnknownVm(_) | PlacementError::UnknownNode(_) => Status::not_found(msg),
        PlacementError::Refused { .. } | PlacementError::SlotsBusy { .. } => {
            Status::failed_precondition(msg)
        }
        PlacementError::Subnet { .. } | PlacementError::Plan(_) => Status::internal(msg),
    }
}

/// A request whose protobuf fields do not make a valid spec.
pub fn convert(e: ConvertError) -> Status {
    Status::invalid_argument(e.to_string())
}

pub fn volume(e: VolumeError) -> Status {
    let msg = error_chain(&e);
    match e {
        VolumeError::Name(_) | VolumeError::Size { .. } => Status::invalid_argument(msg),
        VolumeError::UnknownVolume { .. } | VolumeError::DiskNotFound { .. } => {
            Status::not_found(msg)
        }
        VolumeError::DiskExists { .. } => Status::already_exists(msg),
        VolumeError::Locked { .. } => Status::failed_precondition(msg),
        _ => Status::internal(msg),
    }
}

pub fn quick_migration(e: QuickMigrationError) -> Status {
    match e {
        QuickMigrationError::UnknownVm(_) => Status::not_found(error_chain(&e)),
        QuickMigrationError::NoVolume { .. } => Status::failed_precondition(error_chain(&e)),
    }
}

/// A peer sent a payload that does not decode.
pub fn peer_payload(e: PeerError) -> Status {
    Status::invalid_argument(error_chain(&e))
}
