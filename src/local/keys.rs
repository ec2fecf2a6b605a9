//! What an invalidation names, and its form on the wire (token hashes in hex there only).
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::cache::Announcement;

/// Keys of the in-process caches: token hashes and profile ids.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Keys {
    pub sessions: Vec<[u8; 32]>,
    pub profiles: Vec<Uuid>,
    /// Not every key the change covers is named (too many): an acknowledgement of these does
    /// not end a wait, only a holder's catch-up or its lease's end does.
    pub partial: bool,
}

impl Keys {
    /// The sessions of these token hashes (anything not 32 bytes long names nothing).
    pub fn sessions<'a>(hashes: impl IntoIterator<Item = &'a [u8]>) -> Self {
        Self {
            sessions: hashes
                .into_iter()
                .filter_map(|h| <[u8; 32]>::try_from(h).ok())
                .collect(),
            profiles: Vec::new(),
            partial: false,
        }
    }

    pub fn profiles(user_ids: impl IntoIterator<Item = Uuid>) -> Self {
        Self {
            sessions: Vec::new(),
            profiles: user_ids.into_iter().collect(),
            partial: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.profiles.is_empty()
    }

    /// Split so that no message names more than `most` keys.
    pub(super) fn chunks(self, most: usize) -> Vec<Keys> {
        let mut out: Vec<Keys> = self
            .sessions
            .chunks(most)
            .map(|c| Keys::sessions(c.iter().map(|h| h.as_slice())))
            .collect();
        out.extend(
            self.profiles
                .chunks(most)
                .map(|c| Keys::profiles(c.to_vec())),
        );
        out
    }
}

/// Keys per message: about 35 KB of JSON, far below Redis' pub/sub output buffer limits.
pub(super) const MESSAGE_KEYS: usize = 500;

/// The message on the invalidation channel (JSON: `{"o":…,"n":…,"s":[hex…],"p":[uuid…],"a":…}`):
/// keys to drop (acknowledged by each holder), and the log rows the sender wrote to its Redis
/// generation (`a`, see `cache::Announcement`; a message may carry only those, with nonce 0).
#[derive(Serialize, Deserialize)]
pub(super) struct Message {
    /// The revoker.
    #[serde(rename = "o")]
    pub origin: Uuid,
    #[serde(rename = "n")]
    pub nonce: u64,
    #[serde(rename = "s", default, with = "hex_hashes")]
    pub sessions: Vec<[u8; 32]>,
    #[serde(rename = "p", default)]
    pub profiles: Vec<Uuid>,
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<Announcement>,
}

impl Message {
    pub fn new(origin: Uuid, nonce: u64, keys: Keys, applied: Option<Announcement>) -> Self {
        Self {
            origin,
            nonce,
            sessions: keys.sessions,
            profiles: keys.profiles,
            applied,
        }
    }

    pub fn keys(self) -> Keys {
        Keys {
            sessions: self.sessions,
            profiles: self.profiles,
            partial: false,
        }
    }
}

/// Token hashes as hex strings on the wire; one that does not decode to 32 bytes is skipped.
mod hex_hashes {
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};

    pub fn serialize<S: Serializer>(hashes: &[[u8; 32]], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(hashes.len()))?;
        for hash in hashes {
            seq.serialize_element(&hex::encode(hash))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<[u8; 32]>, D::Error> {
        let texts = Vec::<String>::deserialize(d)?;
        Ok(texts
            .iter()
            .filter_map(|t| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(t, &mut out).ok().map(|()| out)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn big_invalidations_are_split_into_bounded_messages() {
        let hashes: Vec<[u8; 32]> = (0..1_201u32)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_be_bytes());
                h
            })
            .collect();
        let mut keys = Keys::sessions(hashes.iter().map(|h| h.as_slice()));
        keys.profiles = vec![Uuid::new_v4(), Uuid::new_v4()];
        let chunks = keys.chunks(MESSAGE_KEYS);
        assert_eq!(chunks.len(), 4);
        assert!(
            chunks
                .iter()
                .all(|c| c.sessions.len() + c.profiles.len() <= MESSAGE_KEYS)
        );
        let sessions: usize = chunks.iter().map(|c| c.sessions.len()).sum();
        assert_eq!(sessions, 1_201);
        let message = Message::new(Uuid::new_v4(), u64::MAX, chunks[0].clone(), None);
        let text = serde_json::to_string(&message).unwrap();
        assert!(text.len() < 40_000, "{} bytes", text.len());
        let back: Message = serde_json::from_str(&text).unwrap();
        assert_eq!(back.keys(), chunks[0]);
    }

    #[test]
    fn the_wire_carries_hex_and_skips_what_is_not_a_hash() {
        let text = format!(
            r#"{{"o":"{}","n":7,"s":["{}","zz","ab"]}}"#,
            Uuid::nil(),
            "11".repeat(32)
        );
        let message: Message = serde_json::from_str(&text).unwrap();
        assert_eq!(message.keys().sessions, vec![[0x11u8; 32]]);
    }
}
