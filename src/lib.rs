//! authd: authentication sessions and user profiles over gRPC.
//!
//! How it fits: `grpc` converts and validates requests and maps errors; `auth` and `profile` hold
//! the rules; `store` is PostgreSQL (the source of truth); `cache` is Redis (hot copies, never the
//! only copy); both storage layers share the records of `model`, and everyone tells time by
//! `clock` (PostgreSQL's). `app` builds them once from `config::Settings` and serves.
pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod clock;
pub mod config;
pub mod grpc;
pub mod health;
pub mod healthcheck;
pub mod jobs;
pub mod local;
pub mod metrics;
pub mod model;
pub mod profile;
pub mod proto;
pub mod store;
pub mod telemetry;
pub mod tls_files;
