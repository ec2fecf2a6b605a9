//! Transport: proto <-> domain conversion, input validation and error mapping. One file per gRPC
//! service; health and reflection are registered by `app`.
pub mod admin;
pub mod auth;
pub mod events;
pub mod limits;
pub mod observe;
pub mod profile;
pub mod status;
pub mod tls;

use chrono::{DateTime, Utc};

use crate::admin::{Access, Admission};

/// How `access` admits the caller of `request`: by its client certificate (the leaf) or its
/// `authorization` header (AdminService and EventService alike, each with its own lists).
pub(crate) fn admission<T>(access: &Access, request: &tonic::Request<T>) -> Admission {
    let certificate = request
        .extensions()
        .get::<limits::PeerInfo>()
        .and_then(|peer| peer.certificates.as_deref())
        .and_then(|chain| chain.first());
    let authorization = request
        .metadata()
        .get("authorization")
        .map(tonic::metadata::MetadataValue::as_bytes);
    access.admit(certificate, authorization)
}

/// A protobuf timestamp for a point in time.
pub(crate) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
