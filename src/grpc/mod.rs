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

/// A protobuf timestamp for a point in time.
pub(crate) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}
