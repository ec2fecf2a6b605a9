//! Profiles: read-mostly data served from a Redis cache in front of PostgreSQL.
mod email;
mod erasure;
pub mod model;
mod service;

pub use model::{ProfileChanges, ProfileRecord};
pub use service::{BatchProfiles, ProfileError, ProfileService};
