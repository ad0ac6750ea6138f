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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY-free: build scripts are single-threaded; set_var is sound here.
        std::env::set_var("PROTOC", protoc);
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
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
