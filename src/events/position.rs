//! A stream position: the PostgreSQL history its ids belong to, and how far the log was read
//! (the highest id, and the ids below it not yet committed then: see `store::follow`). Opaque
//! to callers: URL-safe base64 of `1;<history>;<top>;<from>-<to>,…`.
use std::time::Instant;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::store::follow::{Gap, Ids};

/// Gaps a position may carry, and the ids they may span in all: a stream's gaps are ids of
/// transactions in flight when it read, a few at a time; a position beyond this was not sent
/// by this service, and would make its pass read a whole log.
const MOST_GAPS: usize = 1_000;
const MOST_GAP_IDS: i64 = 100_000;

/// Why a position is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a position this service sent.
    Malformed,
    /// Well-formed, but more gaps than a stream is resumed from (a spell of rollbacks can
    /// leave a stream with them): it starts over.
    TooWide,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub history: String,
    pub ids: Ids,
}

impl Position {
    pub fn encode(&self) -> String {
        let gaps: Vec<String> = self
            .ids
            .gaps
            .iter()
            .map(|g| format!("{}-{}", g.from, g.to))
            .collect();
        let text = format!("1;{};{};{}", self.history, self.ids.top, gaps.join(","));
        URL_SAFE_NO_PAD.encode(text)
    }

    /// A position a stream sent; its gaps are looked at until `until` (a new allowance). What
    /// is wrong with it, otherwise.
    pub fn parse(text: &str, until: Instant) -> Result<Self, Refused> {
        const MALFORMED: Refused = Refused::Malformed;
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|_| MALFORMED)?;
        let text = String::from_utf8(bytes).map_err(|_| MALFORMED)?;
        let mut parts = text.split(';');
        let (Some("1"), Some(history), Some(top), Some(gaps), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(MALFORMED);
        };
        let top: i64 = top.parse().map_err(|_| MALFORMED)?;
        if history.is_empty() || top < 0 {
            return Err(MALFORMED);
        }
        let mut parsed = Vec::new();
        let mut span = 0i64;
        for gap in gaps.split(',').filter(|g| !g.is_empty()) {
            let (from, to) = gap.split_once('-').ok_or(MALFORMED)?;
            let (from, to): (i64, i64) = (
                from.parse().map_err(|_| MALFORMED)?,
                to.parse().map_err(|_| MALFORMED)?,
            );
            if from < 1 || to < from || to >= top {
                return Err(Refused::Malformed);
            }
            span += to - from + 1;
            if parsed.len() == MOST_GAPS || span > MOST_GAP_IDS {
                return Err(Refused::TooWide);
            }
            parsed.push(Gap { from, to, until });
        }
        Ok(Self {
            history: history.to_owned(),
            ids: Ids { top, gaps: parsed },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_back_as_it_was_written() {
        let until = Instant::now();
        let position = Position {
            history: "7301234567890/00000001".to_owned(),
            ids: Ids {
                top: 42,
                gaps: vec![Gap {
                    from: 3,
                    to: 5,
                    until,
                }],
            },
        };
        assert_eq!(Position::parse(&position.encode(), until), Ok(position));
    }

    #[test]
    fn anything_else_is_refused() {
        let until = Instant::now();
        let encode = |text: &str| URL_SAFE_NO_PAD.encode(text);
        for bad in [
            String::new(),
            "!!".to_owned(),
            encode("2;h;1;"),
            encode("1;;1;"),
            encode("1;h;-1;"),
            encode("1;h;x;"),
            encode("1;h;10;5-3"),
            encode("1;h;10;3-12"),
            encode("1;h;10;0-3"),
            encode("1;h;10;3"),
            encode("1;h;10;;"),
        ] {
            assert_eq!(
                Position::parse(&bad, until),
                Err(Refused::Malformed),
                "{bad:?}"
            );
        }
        let wide = encode("1;h;200000;1-150000");
        assert_eq!(Position::parse(&wide, until), Err(Refused::TooWide));
    }
}
