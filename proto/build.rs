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
