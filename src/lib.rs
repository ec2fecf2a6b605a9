//! authd: authentication sessions and user profiles over gRPC.
//!
//! PostgreSQL (`store`) is the source of truth; Redis (`cache`) holds hot copies, never the only
//! copy; `local` keeps copies in the process' memory under a lease, so that a revocation can wait
//! until no instance holds one. `grpc` is a thin transport over the rules of `auth`, `profile` and
//! `admin`; `jobs` runs what no call does (following the outbox logs into Redis, purging); `app`
//! builds everything once from `config::Settings` (which only parses) and serves.
//!
//! # How a call travels
//!
//! **ValidateSession.** `grpc::auth` reads the request (INVALID_ARGUMENT naming the field), and
//! `auth::AuthService::validate` checks the token's MAC against the signing keys (`auth::keys`,
//! no I/O). A copy in `local` answers at once; else `cache::SessionStore` reads Redis; on a miss
//! it takes a fill lease, `store::SessionRepo` reads PostgreSQL, and the fill writes Redis only
//! if nothing revoked the session since the lease (then `local` keeps a copy, if its ticket, taken
//! before the read, is still good). Errors become statuses in one place, `grpc::status`.
//!
//! **Logout.** `auth` revokes in one PostgreSQL transaction that also appends the revocation to
//! the outbox log (`store::outbox`). It writes the tombstone to Redis, then `local::LocalCache::
//! invalidate` publishes the keys (and what was written, `cache::Announcement`) to every instance
//! and waits until each instance that may hold a copy has dropped it or its lease has run out.
//! Only then does the call answer OK: after that, no instance validates the session. Whatever
//! the call could not write, `jobs::follow` writes from the log (rows read once, `store::follow`).
//!
//! # Layers
//!
//! Imports point down. A module imports exactly the modules its row names (its own submodules
//! aside); `layers::every_import_points_down` (in `tests/api`) reads `src/` and fails naming the
//! file and the import that does not, or the arrow of the table nothing uses; another test checks
//! that the table has no circle.
//!
//! | module | may import |
//! |---|---|
//! | `app` | `admin`, `auth`, `cache`, `clock`, `config`, `events`, `grpc`, `health`, `jobs`, `local`, `metrics`, `profile`, `proto`, `store` |
//! | `healthcheck` | `grpc` |
//! | `grpc` | `admin`, `auth`, `events`, `profile`, `store`, `clock`, `config`, `metrics`, `proto`, `tls_files`, `telemetry` |
//! | `events` | `local`, `store`, `clock`, `config`, `metrics` |
//! | `jobs` | `admin`, `auth`, `profile`, `health`, `local`, `cache`, `store`, `clock`, `config`, `metrics` |
//! | `admin` | `auth`, `store`, `config`, `metrics` |
//! | `profile` | `auth`, `local`, `cache`, `store`, `model`, `telemetry` |
//! | `auth` | `local`, `cache`, `store`, `clock`, `config`, `metrics`, `model`, `telemetry` |
//! | `health` | `store`, `clock`, `metrics` |
//! | `local` | `cache`, `store`, `clock`, `config`, `metrics`, `model`, `telemetry` |
//! | `cache` | `clock`, `config`, `metrics`, `model`, `tls_files` |
//! | `store` | `clock`, `config`, `metrics`, `model` |
//! | `telemetry` | `config` |
//! | `metrics` | `config`, `proto` |
//! | `tls_files` | `config` |
//! | `config` | `clock` |
//! | `clock` | |
//! | `model` | |
//! | `proto` | |
pub mod admin;
pub mod app;
pub mod auth;
pub mod cache;
pub mod clock;
pub mod config;
pub mod events;
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
