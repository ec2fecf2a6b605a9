//! Compiles authd's public protos (the client's half: AuthService, ProfileService, EventService) with a vendored `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(
            config,
            &[
                "proto/authd/v1/auth.proto",
                "proto/authd/v1/events.proto",
                "proto/authd/v1/profile.proto",
            ],
            &["proto"],
        )?;
    // The example caller service's own proto (`examples/caller.rs` includes it).
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(
        config,
        &["examples/proto/whoami.proto"],
        &["examples/proto"],
    )?;
    Ok(())
}
