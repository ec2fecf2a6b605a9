//! Validate [authd](https://github.com/) session tokens in your own memory, with revocation as
//! strict as authd's own.
//!
//! A [`Validator`] subscribes to authd's event stream (`authd.v1.EventService.Watch`) and keeps
//! the validations it fetched from authd (`ValidateSession`) in memory. In
//! [`Mode::Strict`] it holds a lease: every revoking call of the fleet waits until this process
//! has dropped what the call revokes (or its lease has ended), so once `Logout` returned, no
//! `validate` here accepts the token. In [`Mode::Bounded`] it holds no lease and may lag by the
//! bound the README states. Whenever it is not sure it hears every event (disconnected, lease
//! or heartbeat late, the process paused), it stops trusting its memory and asks authd.
//!
//! See README.md for the protocol, so that a caller in another language can implement it.
mod clock;
mod layer;
mod state;
mod validator;

pub use layer::{Auth, AuthLayer, Authenticated};
pub use state::{State, Ticket, TokenHash};
pub use validator::{Config, Mode, Validator};

/// authd's public protos (the client's half: AuthService and EventService).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("authd.v1");
}
