//! AIP-158 page tokens for admin listings: opaque, signed (HMAC-SHA256 with a key every
//! instance shares, so any instance continues a listing), and bound to the listing they
//! continue — a malformed, tampered or foreign token is refused.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use crate::store::SessionCursor;

/// Bytes of the signature kept in a token.
const TAG: usize = 16;
/// user id, created_at (µs), session id.
const PAYLOAD: usize = 16 + 8 + 16;

pub struct PageTokens {
    key: Vec<u8>,
}

impl PageTokens {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC accepts any key length")
    }

    /// The token that continues `user_id`'s listing after `cursor`.
    pub fn sign(&self, user_id: Uuid, cursor: SessionCursor) -> String {
        let mut payload = Vec::with_capacity(PAYLOAD + TAG);
        payload.extend_from_slice(user_id.as_bytes());
        payload.extend_from_slice(&cursor.created_at.timestamp_micros().to_be_bytes());
        payload.extend_from_slice(cursor.id.as_bytes());
        let mut mac = self.mac();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        payload.extend_from_slice(&tag[..TAG]);
        URL_SAFE_NO_PAD.encode(payload)
    }

    /// Where `user_id`'s listing continues; `None` for anything this service did not sign for
    /// that listing.
    pub fn verify(&self, user_id: Uuid, token: &str) -> Option<SessionCursor> {
        if token.len() > 128 {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
        if bytes.len() != PAYLOAD + TAG {
            return None;
        }
        let (payload, tag) = bytes.split_at(PAYLOAD);
        let mut mac = self.mac();
        mac.update(payload);
        mac.verify_truncated_left(tag).ok()?;
        let (owner, rest) = payload.split_at(16);
        let (micros, id) = rest.split_at(8);
        if Uuid::from_slice(owner).ok()? != user_id {
            return None;
        }
        let micros = i64::from_be_bytes(micros.try_into().ok()?);
        Some(SessionCursor {
            created_at: chrono::DateTime::from_timestamp_micros(micros)?,
            id: Uuid::from_slice(id).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_continue_only_the_listing_they_were_made_for() {
        let tokens = PageTokens::new(b"key".to_vec());
        let (user, other) = (Uuid::now_v7(), Uuid::now_v7());
        let cursor = SessionCursor {
            created_at: chrono::DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap(),
            id: Uuid::now_v7(),
        };
        let token = tokens.sign(user, cursor);
        assert_eq!(tokens.verify(user, &token), Some(cursor));
        assert_eq!(tokens.verify(other, &token), None, "another user's listing");
        assert_eq!(
            PageTokens::new(b"other".to_vec()).verify(user, &token),
            None
        );
        let mut tampered = URL_SAFE_NO_PAD.decode(&token).unwrap();
        tampered[20] ^= 1;
        assert_eq!(tokens.verify(user, &URL_SAFE_NO_PAD.encode(tampered)), None);
        for junk in ["", "x", "!!!!", &"A".repeat(200)] {
            assert_eq!(tokens.verify(user, junk), None, "{junk}");
        }
    }
}
