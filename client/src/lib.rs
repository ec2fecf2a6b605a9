#![doc = include_str!("../README.md")]
mod clock;
mod layer;
mod state;
mod validator;

pub use layer::{Auth, AuthLayer, Authenticated};
pub use state::{Kept, State, Ticket, TokenHash};
pub use validator::{Config, Mode, Validator};

/// authd's public protos (the client's half: AuthService, ProfileService and EventService).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("authd.v1");
}
