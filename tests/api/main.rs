//! Integration tests: gRPC against a real authd backed by real PostgreSQL and Redis.
mod bearer;
mod binary;
#[path = "../support/database.rs"]
mod database;
mod docs;
mod helpers;
#[path = "../support/proxy.rs"]
mod proxy;
mod redis_server;
#[path = "../support/seeded.rs"]
mod seeded;
mod topology;

mod accounts;
mod admin;
mod consistency;
mod degraded;
mod deployments;
mod events;
mod ext_authz;
mod fleet;
mod hardening;
mod history;
mod jwt;
mod layers;
mod lease_cases;
mod local_cache;
mod login;
mod manage;
mod operability;
mod pg_tls;
mod profiles;
mod rate_limit;
mod register;
mod retry_safety;
mod revocation;
mod server;
mod sessions;
mod tokens;
mod traces;
