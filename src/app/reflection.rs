//! Server reflection over the services this instance serves: `grpcurl list` shows those and no
//! other (the ones turned off answer UNIMPLEMENTED saying how to turn them on, `grpc::disabled`).
use tonic::server::NamedService;

use crate::{
    grpc::{
        account::{AccountGrpc, AccountServiceServer},
        admin::{AdminGrpc, AdminServiceServer},
        auth::{AuthGrpc, AuthServiceServer},
        events::{EventServiceServer, EventsGrpc},
        ext_authz,
        profile::{ProfileGrpc, ProfileServiceServer},
    },
    proto,
};

/// The gRPC health service's name.
const HEALTH: &str = "grpc.health.v1.Health";

/// Which of the optional services are served.
pub(super) struct Optional {
    pub ext_authz: bool,
    pub admin: bool,
    pub events: bool,
    pub accounts: bool,
}

/// The services served, by the settings that turn the optional ones on.
pub(super) fn served(optional: Optional) -> Vec<&'static str> {
    let Optional {
        ext_authz,
        admin,
        events,
        accounts,
    } = optional;
    [
        Some(HEALTH),
        Some(<AuthServiceServer<AuthGrpc> as NamedService>::NAME),
        Some(<ProfileServiceServer<ProfileGrpc> as NamedService>::NAME),
        ext_authz.then_some(ext_authz::SERVICE),
        admin.then_some(<AdminServiceServer<AdminGrpc> as NamedService>::NAME),
        events.then_some(<EventServiceServer<EventsGrpc> as NamedService>::NAME),
        accounts.then_some(<AccountServiceServer<AccountGrpc> as NamedService>::NAME),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Reflection over authd's protos, the health protocol, the error details authd sends
/// (`google.rpc.BadRequest`, `RetryInfo`) and, when served, Envoy's external authorization, so
/// grpcurl needs no proto files; listing `served` and the reflection services.
pub(super) fn reflection(served: &[&'static str]) -> tonic_reflection::server::Builder<'static> {
    let builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET);
    let builder = match served.contains(&ext_authz::SERVICE) {
        true => builder.register_encoded_file_descriptor_set(proto::ENVOY_EXT_AUTHZ_DESCRIPTOR_SET),
        false => builder,
    };
    [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .iter()
    .chain(served)
    .fold(builder, |builder, name| builder.with_service_name(*name))
}
