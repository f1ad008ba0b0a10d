//! Compiles the wire contract. A fresh machine has no `protoc`: the vendored binary is used.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts run single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let files = [
        "proto/tdebroker/v1/common.proto",
        "proto/tdebroker/v1/keyvault.proto",
        "proto/tdebroker/v1/vaults.proto",
        "proto/tdebroker/v1/emulation.proto",
        "proto/tdebroker/v1/identities.proto",
        "proto/tdebroker/v1/servers.proto",
        "proto/tdebroker/v1/engine.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tdebroker_descriptor.bin"))
        .compile_protos(&files, &["proto"])?;
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    Ok(())
}
