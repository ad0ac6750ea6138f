//! Compiles the .proto files. `protoc` comes from `protoc-bin-vendored` unless the
//! environment names one with `PROTOC`, so a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY-free: build scripts are single-threaded; set_var is sound here.
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::configure().compile_protos(
        &[
            "management.proto",
            "raft.proto",
            "vms.proto",
            "drain.proto",
            "volumes.proto",
            "migrations.proto",
        ],
        &["."],
    )?;
    println!("cargo:rerun-if-changed=management.proto");
    println!("cargo:rerun-if-changed=raft.proto");
    println!("cargo:rerun-if-changed=vms.proto");
    println!("cargo:rerun-if-changed=drain.proto");
    println!("cargo:rerun-if-changed=volumes.proto");
    println!("cargo:rerun-if-changed=migrations.proto");
    Ok(())
}
