//! The names of the API's enum values as people and the web console read them: the
//! lower-case value name after the enum's prefix (`RUNTIME_STATE_RUNNING` is
//! `"running"`), the words clusterctl prints and the console's JSON carries.
//!
//! prost stores enum fields as `i32`; every such field of a message serializes (serde,
//! the console's JSON) through [`serialize`] as its name, or as the number when this
//! build does not know the value.

/// An API enum with its names (see the module doc).
pub trait EnumName: Sized + Copy + TryFrom<i32> + 'static {
    /// The name of `self` (`"unspecified"` for the zero value).
    fn name(self) -> &'static str;
    /// The value named `name` (or one of its older spellings, e.g. `power-saving`); never
    /// the zero value.
    fn from_name(name: &str) -> Option<Self>;
}

/// The name of the value `v` of `E`, or `"unknown"` for a value this build does not know.
pub fn name_of<E: EnumName>(v: i32) -> &'static str {
    E::try_from(v).map_or("unknown", E::name)
}

/// serde `serialize_with` for an `i32` field holding an `E` (see `build.rs`).
pub fn serialize<E: EnumName, S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
    match E::try_from(*v) {
        Ok(e) => s.serialize_str(e.name()),
        Err(_) => s.serialize_i32(*v),
    }
}

macro_rules! names {
    ($($module:ident :: $enum:ident {
        $($value:ident => $name:literal $(| $alias:literal)*),* $(,)?
    })*) => {$(
        impl EnumName for crate::$module::$enum {
            fn name(self) -> &'static str {
                match self {
                    crate::$module::$enum::Unspecified => "unspecified",
                    $(crate::$module::$enum::$value => $name,)*
                }
            }
            fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($name $(| $alias)* => Some(crate::$module::$enum::$value),)*
                    _ => None,
                }
            }
        }
    )*};
}

names! {
    management::NodeState {
        Up => "up", Paused => "paused", Down => "down", Standby => "standby", Waking => "waking",
    }
    management::RaftRole { Voter => "voter", Learner => "learner", None => "none" }
    management::RaftState {
        Leader => "leader", Follower => "follower", Candidate => "candidate",
        Learner => "learner", Shutdown => "shutdown",
    }
    management::KvmKind { Hardware => "hardware", Software => "software", None => "none" }
    management::MigrationTransport { Tls => "tls", InsecurePlaintext => "insecure_plaintext" }
    management::EventKind {
        ClusterInitialized => "cluster_initialized",
        NodeJoined => "node_joined",
        NodeUpdated => "node_updated",
        NodeStateChanged => "node_state_changed",
        NodeRemoved => "node_removed",
        NodeFenced => "node_fenced",
        Vm => "vm",
        Job => "job",
        Disk => "disk",
        NodeCertificateIssued => "node_certificate_issued",
        CertificateRevoked => "certificate_revoked",
        CaRotated => "ca_rotated",
    }
    vms::DesiredState { Running => "running", Stopped => "stopped" }
    vms::RuntimeState {
        Pending => "pending", Starting => "starting", Running => "running",
        Stopping => "stopping", Stopped => "stopped", Failed => "failed",
    }
    drain::JobKind { Drain => "drain", Failback => "failback", Balance => "balance" }
    drain::JobStatus { Running => "running", Done => "done", Aborted => "aborted", Failed => "failed" }
    drain::MoveKind { Live => "live", Quick => "quick" }
    drain::MoveStatus {
        Queued => "queued", InFlight => "in_flight", Done => "done", Failed => "failed",
        Dropped => "dropped", Skipped => "skipped",
    }
    migrations::MigrationKind { Live => "live", Quick => "quick" }
    migrations::MigrationState {
        Queued => "queued", Running => "running", Succeeded => "succeeded",
        Failed => "failed", Cancelled => "cancelled",
    }
    volumes::LockMode { Exclusive => "exclusive", Shared => "shared" }
    drain::BalanceMode {
        None => "none",
        Even => "even" | "even-distribution" | "even_distribution",
        PowerSaving => "power_saving" | "power-saving",
    }
    drain::Aggressiveness { Low => "low", Medium => "medium", High => "high" }
    drain::BalanceStop {
        Disabled => "disabled", Balanced => "balanced", GainBelowCost => "gain_below_cost",
        NoAllowedMove => "no_allowed_move", MoveLimit => "move_limit",
        Consolidated => "consolidated",
    }
    migrations::MigrationPhase {
        Queued => "queued", Setup => "setup", PreCopy => "pre_copy" | "pre-copy",
        StopAndCopy => "stop_and_copy" | "stop-and-copy",
        StorageHandoff => "storage_handoff" | "storage-handoff",
        Switchover => "switchover", Done => "done", Succeeded => "succeeded",
        Failed => "failed", Cancelled => "cancelled",
    }
    vms::RestartPriority { High => "high", Medium => "medium", Low => "low", None => "none" }
    vms::RestartMode { OnFailure => "on_failure" | "on-failure", Never => "never" }
    vms::Workload { Idle => "idle", Dirty => "dirty", Mem => "mem", Disk => "disk", Net => "net" }
    management::UserRole { Admin => "admin", Viewer => "viewer" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vms::RuntimeState;

    #[test]
    fn names_are_the_value_names_in_lower_case_and_round_trip() {
        assert_eq!(RuntimeState::Running.name(), "running");
        assert_eq!(
            RuntimeState::Running.as_str_name().to_lowercase(),
            format!("runtime_state_{}", RuntimeState::Running.name())
        );
        assert_eq!(
            RuntimeState::from_name("stopped"),
            Some(RuntimeState::Stopped)
        );
        assert_eq!(RuntimeState::from_name("unspecified"), None);
        assert_eq!(name_of::<RuntimeState>(99), "unknown");
        let info = crate::vms::VmInfo {
            runtime: RuntimeState::Failed as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&info).unwrap_or_default();
        assert_eq!(json["runtime"], "failed", "{json}");
        assert_eq!(json["desired"], "unspecified", "{json}");
    }

    #[test]
    fn older_spellings_are_accepted_on_input_and_printed_by_their_name() {
        use crate::drain::BalanceMode;
        use crate::migrations::MigrationPhase;
        for alias in ["power-saving", "power_saving"] {
            assert_eq!(
                BalanceMode::from_name(alias),
                Some(BalanceMode::PowerSaving)
            );
        }
        for alias in ["even", "even-distribution", "even_distribution"] {
            assert_eq!(BalanceMode::from_name(alias), Some(BalanceMode::Even));
        }
        assert_eq!(BalanceMode::PowerSaving.name(), "power_saving");
        assert_eq!(
            MigrationPhase::from_name("stop-and-copy"),
            Some(MigrationPhase::StopAndCopy)
        );
        let plan = crate::drain::PlanBalanceResponse {
            mode: BalanceMode::Even as i32,
            stop_code: crate::drain::BalanceStop::GainBelowCost as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&plan).unwrap_or_default();
        assert_eq!(json["mode"], "even", "{json}");
        assert_eq!(json["stop_code"], "gain_below_cost", "{json}");
        let role = crate::management::Revocation {
            role: crate::management::UserRole::Viewer as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(&role).unwrap_or_default();
        assert_eq!(json["role"], "viewer", "{json}");
    }
}
