//! Generated code for the public protos (kept in OUT_DIR, never committed).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod authd {
    pub mod v1 {
        tonic::include_proto!("authd.v1");
    }
}

/// Every authd proto, encoded, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("authd_descriptor");

/// Envoy's external authorization (`envoy.service.auth.v3`) and what it imports, encoded, for
/// server reflection (the Rust types are envoy-types').
pub const ENVOY_EXT_AUTHZ_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("envoy_ext_authz");
