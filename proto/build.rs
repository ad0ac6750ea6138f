//! Compiles the .proto files. `protoc` comes from `protoc-bin-vendored` unless the
//! environment names one with `PROTOC`, so a fresh machine needs no system package.

/// One file per package, at the path its package names (buf's PACKAGE_DIRECTORY_MATCH).
const PROTOS: &[&str] = &[
    "cluster/management/v1/management.proto",
    "cluster/vms/v1/vms.proto",
    "cluster/drain/v1/drain.proto",
    "cluster/volumes/v1/volumes.proto",
    "cluster/migrations/v1/migrations.proto",
    "cluster/raft/v1/raft.proto",
];

/// Every enum field (`i32` in prost) and its enum: serialized by its name, not its number
/// (`src/names.rs`), so the web console's JSON reads "running", not 3.
const ENUM_FIELDS: &[(&str, &str)] = &[
    (
        "management.v1.ClusterStatusResponse.raft_state",
        "management::RaftState",
    ),
    ("management.v1.NodeFacts.kvm_kind", "management::KvmKind"),
    ("management.v1.NodeInfo.state", "management::NodeState"),
    ("management.v1.NodeInfo.raft_role", "management::RaftRole"),
    (
        "management.v1.NodeInfo.migration_transport",
        "management::MigrationTransport",
    ),
    (
        "management.v1.SetNodeStateRequest.state",
        "management::NodeState",
    ),
    ("management.v1.Event.kind", "management::EventKind"),
    ("vms.v1.VmInfo.desired", "vms::DesiredState"),
    ("vms.v1.VmInfo.runtime", "vms::RuntimeState"),
    ("drain.v1.MoveInfo.kind", "drain::MoveKind"),
    ("drain.v1.MoveInfo.status", "drain::MoveStatus"),
    ("drain.v1.JobInfo.kind", "drain::JobKind"),
    ("drain.v1.JobInfo.status", "drain::JobStatus"),
    (
        "migrations.v1.MigrationInfo.kind",
        "migrations::MigrationKind",
    ),
    (
        "migrations.v1.MigrationInfo.state",
        "migrations::MigrationState",
    ),
    ("volumes.v1.DiskLock.mode", "volumes::LockMode"),
    ("drain.v1.PolicySpec.mode", "drain::BalanceMode"),
    (
        "drain.v1.PolicySpec.aggressiveness",
        "drain::Aggressiveness",
    ),
    ("drain.v1.PlanBalanceRequest.mode", "drain::BalanceMode"),
    (
        "drain.v1.PlanBalanceRequest.aggressiveness",
        "drain::Aggressiveness",
    ),
    ("drain.v1.PlanBalanceResponse.mode", "drain::BalanceMode"),
    (
        "drain.v1.PlanBalanceResponse.stop_code",
        "drain::BalanceStop",
    ),
    (
        "migrations.v1.WatchMigrationResponse.phase",
        "migrations::MigrationPhase",
    ),
    ("vms.v1.VmSpec.restart_priority", "vms::RestartPriority"),
    ("vms.v1.RestartPolicy.mode", "vms::RestartMode"),
    ("vms.v1.TestGuestBoot.workload", "vms::Workload"),
    ("management.v1.Revocation.role", "management::UserRole"),
    (
        "management.v1.IssueCertificateRequest.role",
        "management::UserRole",
    ),
];

/// Every `google.protobuf.Timestamp` field: RFC 3339 in JSON (`src/times.rs`).
const TIMESTAMP_FIELDS: &[&str] = &[
    "drain.v1.MoveInfo.planned_start_at",
    "drain.v1.MoveInfo.planned_end_at",
    "drain.v1.MoveInfo.started_at",
    "drain.v1.MoveInfo.ended_at",
    "drain.v1.JobInfo.planned_finish_at",
    "drain.v1.JobInfo.created_at",
    "drain.v1.JobInfo.updated_at",
    "drain.v1.JobInfo.finished_at",
    "drain.v1.DrainNodeResponse.planned_start_at",
    "drain.v1.DrainNodeResponse.planned_finish_at",
    "migrations.v1.MigrationInfo.started_at",
    "migrations.v1.MigrationInfo.ended_at",
    "vms.v1.VmInfo.created_at",
    "vms.v1.VmInfo.updated_at",
    "vms.v1.VmDemand.sampled_at",
    "vms.v1.StreamConsoleResponse.received_at",
    "management.v1.ConsoleLoginResponse.expires_at",
    "management.v1.Revocation.revoked_at",
    "management.v1.Revocation.expires_at",
    "management.v1.CreateJoinTokenResponse.expires_at",
    "management.v1.AdmitNodeRequest.cert_expires_at",
    "management.v1.NodeInfo.state_since",
    "management.v1.NodeInfo.cert_expires_at",
    "management.v1.NodeDemand.sampled_at",
    "management.v1.Event.at",
    "management.v1.CaInfo.rotated_at",
    "management.v1.CaInfo.renew_from",
    "management.v1.CaInfo.current_expires_at",
];

/// Every `repeated google.protobuf.Timestamp` field: a list of RFC 3339 strings in JSON.
const TIMESTAMP_LIST_FIELDS: &[&str] = &["vms.v1.VmInfo.restarts"];

/// Every `google.protobuf.Duration` field: `"1.500s"` in JSON (`src/times.rs`).
const DURATION_FIELDS: &[&str] = &[
    "drain.v1.DrainNodeResponse.lower_bound",
    "drain.v1.PolicySpec.interval",
    "drain.v1.PolicySpec.min_dwell",
    "migrations.v1.MigrationSummary.total",
    "migrations.v1.MigrationSummary.blackout",
    "migrations.v1.MigrationInfo.max_downtime",
    "migrations.v1.MigrationInfo.deadline",
    "migrations.v1.MigrationInfo.predicted_duration",
    "migrations.v1.MigrationInfo.predicted_blackout",
    "migrations.v1.WatchMigrationResponse.eta",
    "vms.v1.PlanMigrationResponse.predicted_duration",
    "vms.v1.PlanMigrationResponse.predicted_downtime",
    "vms.v1.MigrateVmRequest.max_downtime",
    "vms.v1.MigrateVmRequest.deadline",
    "vms.v1.PlanMigrationRequest.max_downtime",
    "vms.v1.PlanMigrationRequest.deadline",
    "vms.v1.TestGuestBoot.heartbeat_interval",
    "vms.v1.RestartPolicy.window",
    "management.v1.CreateJoinTokenRequest.ttl",
    "management.v1.RotateCaRequest.renew_after",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY-free: build scripts are single-threaded; set_var is sound here.
        std::env::set_var("PROTOC", protoc);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::configure();
    for (field, enum_type) in ENUM_FIELDS {
        config = config.field_attribute(
            format!(".cluster.{field}"),
            format!(
                "#[serde(serialize_with = \"crate::names::serialize::<crate::{enum_type}, _>\")]"
            ),
        );
    }
    for field in TIMESTAMP_FIELDS {
        config = config.field_attribute(
            format!(".cluster.{field}"),
            "#[serde(serialize_with = \"crate::times::serialize_timestamp\")]",
        );
    }
    for field in TIMESTAMP_LIST_FIELDS {
        config = config.field_attribute(
            format!(".cluster.{field}"),
            "#[serde(serialize_with = \"crate::times::serialize_timestamps\")]",
        );
    }
    for field in DURATION_FIELDS {
        config = config.field_attribute(
            format!(".cluster.{field}"),
            "#[serde(serialize_with = \"crate::times::serialize_duration\")]",
        );
    }
    config
        // For gRPC reflection on the management listener (grpcurl, Postman).
        .file_descriptor_set_path(out.join("cluster_descriptor.bin"))
        // The agent's web console answers its pages' JSON requests with these messages:
        // one contract for gRPC clients and the browser.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
