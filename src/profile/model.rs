//! The rules for a profile's fields (the record itself is in `crate::model`).
pub use crate::model::profile::{ProfileChanges, ProfileRecord};

pub const BIO_MAX_CHARS: usize = 500;
pub const AVATAR_URL_MAX_CHARS: usize = 2048;

/// Displayed text of several lines (see [`crate::auth::input::text`]).
pub fn bio(raw: &str) -> Result<String, String> {
    crate::auth::input::text(raw, BIO_MAX_CHARS)
}

pub fn avatar_url(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    if raw.len() > AVATAR_URL_MAX_CHARS * 4 || raw.chars().count() > AVATAR_URL_MAX_CHARS {
        return Err(format!("must be at most {AVATAR_URL_MAX_CHARS} characters"));
    }
    match url::Url::parse(raw) {
        Ok(url) if url.scheme() == "https" && url.host_str().is_some_and(|h| !h.is_empty()) => {
            Ok(raw.to_owned())
        }
        _ => Err("must be empty or an https:// URL".into()),
    }
}

/// Empty, or a well-formed BCP 47 language tag (kept as given).
pub fn locale(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    if raw.len() > 64 {
        return Err("must be empty or a BCP 47 language tag such as en-GB".into());
    }
    oxilangtag::LanguageTag::parse(raw)
        .map(|_| raw.to_owned())
        .map_err(|_| "must be empty or a BCP 47 language tag such as en-GB".into())
}

/// Empty, or a zone of the IANA time zone database.
pub fn time_zone(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    if raw.len() > 64 {
        return Err("must be empty or an IANA time zone such as Europe/Berlin".into());
    }
    raw.parse::<chrono_tz::Tz>()
        .map(|_| raw.to_owned())
        .map_err(|_| "must be empty or an IANA time zone such as Europe/Berlin".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_rules() {
        assert!(bio(&"b".repeat(500)).is_ok());
        assert!(bio(&"b".repeat(501)).is_err());
        assert!(avatar_url("").is_ok());
        assert!(avatar_url("https://cdn.example.com/a.png").is_ok());
        assert!(avatar_url("http://cdn.example.com/a.png").is_err());
        assert!(avatar_url("javascript:alert(1)").is_err());
        assert!(avatar_url(&format!("https://e.com/{}", "a".repeat(2040))).is_err());
        assert!(locale("en-GB").is_ok());
        assert!(locale("zh-Hant-TW").is_ok());
        assert!(locale("english please").is_err());
        assert!(time_zone("Europe/Berlin").is_ok());
        assert!(time_zone("Mars/Olympus").is_err());
    }
}
