//! The records that PostgreSQL stores and Redis copies, shared by the domain (`auth`, `profile`)
//! and the storage layers (`store`, `cache`), which therefore never import from the domain.
pub mod profile;
pub mod session;
pub mod token;
pub mod totp;

pub use profile::{ProfileChanges, ProfileRecord};
pub use session::SessionRecord;
pub use token::TokenHash;
