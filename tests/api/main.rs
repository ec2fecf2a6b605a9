//! Integration tests: gRPC against a real authd backed by real PostgreSQL and Redis.
mod binary;
mod helpers;
mod proxy;
mod redis_server;
mod topology;

mod admin;
mod consistency;
mod degraded;
mod deployments;
mod hardening;
mod local_cache;
mod login;
mod manage;
mod operability;
mod pg_tls;
mod profiles;
mod rate_limit;
mod register;
mod revocation;
mod server;
mod sessions;
