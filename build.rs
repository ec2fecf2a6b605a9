//! Compiles the public protos with a vendored `protoc`, so building needs no system protoc, and
//! writes the encoded descriptor set that server reflection serves.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("authd_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/authd/v1/auth.proto",
                "proto/authd/v1/profile.proto",
                "proto/authd/v1/admin.proto",
                "proto/authd/v1/events.proto",
                "proto/authd/v1/account.proto",
            ],
            &["proto"],
        )?;
    // Envoy's external authorization (served with envoy-types' Rust types): only its
    // descriptors, for reflection, from the protos vendored at the version envoy-types ships.
    let status = std::process::Command::new(protoc_bin_vendored::protoc_bin_path()?)
        .arg("--include_imports")
        .arg(format!(
            "--descriptor_set_out={}",
            out_dir.join("envoy_ext_authz.bin").display()
        ))
        .arg("-Iproto-vendor")
        .arg(format!(
            "-I{}",
            protoc_bin_vendored::include_path()?.display()
        ))
        .arg("envoy/service/auth/v3/external_auth.proto")
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on the vendored Envoy protos: {status}").into());
    }
    for input in ["proto", "proto-vendor", "build.rs"] {
        println!("cargo:rerun-if-changed={input}");
    }
    Ok(())
}
