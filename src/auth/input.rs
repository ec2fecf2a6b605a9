//! The rules for what callers send. Each parser answers with the value in its canonical form or
//! a description of what is wrong; the transport layer names the field and collects every
//! violation of a request into one INVALID_ARGUMENT.
use std::net::IpAddr;

use email_address::{EmailAddress, Options};
use precis_core::profile::PrecisFastInvocation;
use precis_profiles::{Nickname, OpaqueString, UsernameCaseMapped};
use secrecy::SecretString;
use unicode_normalization::UnicodeNormalization;

use super::session::ClientInfo;
pub use crate::config::PASSWORD_MAX_CHARS;

pub const EMAIL_MAX_CHARS: usize = 254;
pub const DISPLAY_NAME_MAX_CHARS: usize = 64;
pub const USER_AGENT_MAX_CHARS: usize = 512;
/// A request records at most this many violations (each field at most once): a request that
/// is wrong in many places costs no more to answer than one wrong in a few.
pub const MAX_VIOLATIONS: usize = 10;

/// Rejects input longer than `chars` characters could ever be in UTF-8 (4 bytes each), before
/// any per-character work: a huge input costs one comparison, not a normalisation.
fn within_bytes(raw: &str, chars: usize) -> Result<(), String> {
    if raw.len() > chars * 4 {
        return Err(format!("must be at most {chars} characters"));
    }
    Ok(())
}

/// One thing wrong with one field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

/// Collects violations while a request is parsed.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps the value when it parsed, or records why it did not under `field` (at most
    /// [`MAX_VIOLATIONS`] are kept, each field once).
    pub fn check<T>(&mut self, field: &str, parsed: Result<T, String>) -> Option<T> {
        parsed
            .map_err(|description| {
                let seen = self.0.iter().any(|v| v.field == field);
                if !seen && self.0.len() < MAX_VIOLATIONS {
                    self.0.push(FieldViolation {
                        field: field.to_owned(),
                        description,
                    })
                }
            })
            .ok()
    }

    /// Whether anything was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was recorded.
    pub fn finish<T>(self, value: impl FnOnce() -> Option<T>) -> Result<T, Vec<FieldViolation>> {
        match (self.0.is_empty(), value()) {
            (true, Some(v)) => Ok(v),
            _ => Err(self.0),
        }
    }
}

/// An email address as given (trimmed) and in the form it is compared by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email {
    pub display: String,
    pub normalized: String,
}

pub fn email(raw: &str) -> Result<Email, String> {
    within_bytes(raw.trim(), EMAIL_MAX_CHARS)?;
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Err("is required".into());
    }
    if trimmed.chars().count() > EMAIL_MAX_CHARS {
        return Err(format!("must be at most {EMAIL_MAX_CHARS} characters"));
    }
    let options = Options::default()
        .with_required_tld()
        .without_display_text()
        .without_domain_literal();
    let parsed = EmailAddress::parse_with_options(trimmed, options)
        .map_err(|_| "must be an email address such as name@example.com".to_owned())?;
    // The local part is compared as a PRECIS username (RFC 8265, UsernameCaseMapped: NFC, lower
    // case, no compatibility characters such as the Kelvin sign, no spaces or invisible
    // characters); the domain in lower case.
    let local = UsernameCaseMapped::enforce(parsed.local_part()).map_err(|_| {
        "must be an email address whose part before the @ is letters, digits and ASCII \
         punctuation (RFC 8265)"
            .to_owned()
    })?;
    Ok(Email {
        display: trimmed.to_owned(),
        normalized: format!("{local}@{}", parsed.domain().to_lowercase()),
    })
}

/// A password presented to log in, or a new one before the policy (`password_policy`) looks at
/// it: present and at most [`PASSWORD_MAX_CHARS`] long. Length is counted after NFKC
/// normalisation (the form that is hashed); nothing is trimmed or truncated.
pub fn password(raw: &str) -> Result<SecretString, String> {
    if raw.is_empty() {
        return Err("is required".into());
    }
    within_bytes(raw, PASSWORD_MAX_CHARS)?;
    if raw.nfkc().count() > PASSWORD_MAX_CHARS {
        return Err(format!("must be at most {PASSWORD_MAX_CHARS} characters"));
    }
    Ok(SecretString::from(raw))
}

/// Why displayed text is refused by its PRECIS profile.
const NOT_DISPLAYABLE: &str = "must be printable text, without control, invisible or \
                               direction-changing characters";

/// A PRECIS nickname (RFC 8266): spaces trimmed and collapsed, NFKC; control, invisible
/// (zero-width, default-ignorable) and bidirectional override characters are refused.
pub fn display_name(raw: &str) -> Result<String, String> {
    within_bytes(raw.trim(), DISPLAY_NAME_MAX_CHARS)?;
    let length = || format!("must be 1 to {DISPLAY_NAME_MAX_CHARS} characters after trimming");
    if raw.trim().is_empty() {
        return Err(length());
    }
    let name = Nickname::enforce(raw).map_err(|_| NOT_DISPLAYABLE.to_owned())?;
    if name.chars().count() > DISPLAY_NAME_MAX_CHARS {
        return Err(length());
    }
    Ok(name.into_owned())
}

/// Multi-line displayed text (a bio): each line a PRECIS OpaqueString (RFC 8265: NFC, other
/// spaces mapped to ASCII space, control and invisible characters refused); lines end with
/// `\n` (a `\r\n` becomes `\n`), empty lines are kept. At most `max_chars` characters.
pub fn text(raw: &str, max_chars: usize) -> Result<String, String> {
    within_bytes(raw, max_chars)?;
    let lines: Result<Vec<String>, String> = raw
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .map(|line| match line {
            "" => Ok(String::new()),
            line => OpaqueString::enforce(line)
                .map(std::borrow::Cow::into_owned)
                .map_err(|_| NOT_DISPLAYABLE.to_owned()),
        })
        .collect();
    let text = lines?.join("\n");
    if text.chars().count() > max_chars {
        return Err(format!("must be at most {max_chars} characters"));
    }
    Ok(text)
}

pub fn ip_address(raw: &str) -> Result<String, String> {
    if raw.len() > 64 {
        return Err("must be an IPv4 or IPv6 address".into());
    }
    if raw.is_empty() {
        return Ok(String::new());
    }
    raw.parse::<IpAddr>()
        .map(|ip| ip.to_canonical().to_string())
        .map_err(|_| "must be an IPv4 or IPv6 address".into())
}

/// What an address is counted as by per-address limits: an IPv4 address itself (`::ffff:a.b.c.d`
/// as `a.b.c.d`), an IPv6 address by its network of `ipv6_prefix` bits (one host has a /64).
pub fn network(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// An opaque device identifier: at most 128 bytes of printable ASCII.
pub fn device_id(raw: &str) -> Result<String, String> {
    if raw.len() > 128 || raw.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err("must be at most 128 printable ASCII characters".into());
    }
    Ok(raw.to_owned())
}

pub fn user_agent(raw: &str) -> Result<String, String> {
    within_bytes(raw, USER_AGENT_MAX_CHARS)?;
    if raw.chars().count() > USER_AGENT_MAX_CHARS {
        return Err(format!("must be at most {USER_AGENT_MAX_CHARS} characters"));
    }
    Ok(raw.to_owned())
}

/// A UUID in its usual hyphenated text form.
pub fn uuid(raw: &str) -> Result<uuid::Uuid, String> {
    if raw.is_empty() {
        return Err("is required".into());
    }
    if raw.len() > 64 {
        return Err("must be a UUID".into());
    }
    uuid::Uuid::try_parse(raw).map_err(|_| "must be a UUID".into())
}

/// Characters of an account flow's code: 18 random bytes in unpadded base64url.
pub const CODE_LEN: usize = 24;

/// An account flow's code as authd issues it (its SHA-256 is what is stored and looked up).
pub fn code(raw: &str) -> Result<[u8; 32], String> {
    use sha2::{Digest, Sha256};
    if raw.is_empty() {
        return Err("is required".into());
    }
    let well_formed = raw.len() == CODE_LEN
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        return Err(format!(
            "must be the {CODE_LEN}-character code authd issued"
        ));
    }
    Ok(Sha256::digest(raw.as_bytes()).into())
}

/// A TOTP code as an authenticator app shows it: 6 digits (spaces around and between groups
/// ignored).
pub fn totp_code(raw: &str) -> Result<String, String> {
    let digits: String = raw.chars().filter(|c| *c != ' ').collect();
    if digits.is_empty() {
        return Err("is required".into());
    }
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be the 6 digits the authenticator app shows".into());
    }
    Ok(digits)
}

/// A recovery code as issued (`xxxx-xxxx-xxxx-xxxx`; dashes, spaces and case do not matter):
/// the hash it is stored as.
pub fn recovery_code(raw: &str) -> Result<[u8; 32], String> {
    use super::second_factor::{RECOVERY_CODE_LEN, recovery_hash};
    let plain: String = raw
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if plain.is_empty() {
        return Err("is required".into());
    }
    let well_formed = plain.len() == RECOVERY_CODE_LEN
        && plain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    if !well_formed {
        return Err(format!(
            "must be a {RECOVERY_CODE_LEN}-character recovery code authd issued"
        ));
    }
    Ok(recovery_hash(&plain))
}

/// A request's one field: its value, or the violation naming it.
pub fn field<T>(name: &str, parsed: Result<T, String>) -> Result<T, Vec<FieldViolation>> {
    let mut v = Violations::default();
    let value = v.check(name, parsed);
    v.finish(|| value)
}

/// Parses the client fields, naming them under `prefix` (e.g. `client`).
pub fn client_info(
    violations: &mut Violations,
    prefix: &str,
    ip: &str,
    agent: &str,
    device: &str,
) -> Option<ClientInfo> {
    let ip_address = violations.check(&format!("{prefix}.ip_address"), ip_address(ip));
    let user_agent = violations.check(&format!("{prefix}.user_agent"), user_agent(agent));
    let device_id = violations.check(&format!("{prefix}.device_id"), device_id(device));
    Some(ClientInfo {
        ip_address: ip_address?,
        user_agent: user_agent?,
        device_id: device_id?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_compared_lower_case() {
        let e = email("  Ada.Lovelace@Example.COM ").unwrap();
        assert_eq!(e.display, "Ada.Lovelace@Example.COM");
        assert_eq!(e.normalized, "ada.lovelace@example.com");
    }

    #[test]
    fn bad_emails_are_rejected() {
        let long = format!("{}@example.com", "a".repeat(250));
        for bad in [
            "",
            "   ",
            "no-at-sign",
            "a@",
            "@b.com",
            "a@b",
            "A <a@b.com>",
            &long,
        ] {
            assert!(email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn password_length_is_counted_in_characters_after_nfkc() {
        assert!(password("").is_err());
        assert!(password(&"é".repeat(128)).is_ok());
        assert!(password(&"é".repeat(129)).is_err());
        // U+FB03 "ﬃ" becomes three characters under NFKC: 43 of them are 129.
        assert!(password(&"ﬃ".repeat(42)).is_ok());
        assert!(password(&"ﬃ".repeat(43)).is_err());
    }

    #[test]
    fn display_names_are_trimmed_and_free_of_control_characters() {
        assert_eq!(display_name("  Ada  ").unwrap(), "Ada");
        assert!(display_name("   ").is_err());
        assert!(display_name("a\u{7}b").is_err());
        assert!(display_name(&"x".repeat(65)).is_err());
        assert!(display_name(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn email_local_parts_are_precis_usernames() {
        // The Kelvin sign is not a K: no account of k@example.com can be reached with it.
        assert!(email("\u{212A}@example.com").is_err());
        assert_eq!(email("K@Example.com").unwrap().normalized, "k@example.com");
        assert_eq!(
            email("J\u{F6}rg@example.com").unwrap().normalized,
            email("jo\u{308}rg@example.com").unwrap().normalized,
            "compared in NFC"
        );
        assert!(email("a\u{200B}b@example.com").is_err(), "zero-width space");
        assert_eq!(
            email("first.last+tag@example.com").unwrap().normalized,
            "first.last+tag@example.com"
        );
    }

    #[test]
    fn displayed_text_refuses_invisible_and_direction_changing_characters() {
        for bad in [
            "evil\u{202E}gnp.exe",
            "a\u{200B}b",
            "tab\there",
            "a\u{2066}b",
        ] {
            assert!(display_name(bad).is_err(), "{bad:?}");
            assert!(text(bad, 500).is_err(), "{bad:?}");
        }
        assert_eq!(display_name("  Ada   Lovelace ").unwrap(), "Ada Lovelace");
        assert_eq!(display_name("Ｒｅｎé").unwrap(), "René");
        assert_eq!(
            text("line one\r\n\nline  three", 500).unwrap(),
            "line one\n\nline  three"
        );
        assert_eq!(text("", 500).unwrap(), "");
        assert!(text(&"b".repeat(501), 500).is_err());
    }

    #[test]
    fn ip_addresses_are_optional_but_must_parse() {
        assert_eq!(ip_address("").unwrap(), "");
        assert_eq!(ip_address("::1").unwrap(), "::1");
        assert_eq!(ip_address("192.0.2.7").unwrap(), "192.0.2.7");
        assert_eq!(ip_address("::ffff:192.0.2.7").unwrap(), "192.0.2.7");
        assert_eq!(ip_address("2001:DB8::1").unwrap(), "2001:db8::1");
        assert!(ip_address("300.1.1.1").is_err());
        assert!(ip_address("localhost").is_err());
    }
}
