//! Property tests of everything that parses untrusted input: request fields, session tokens,
//! admin page tokens and settings. On any input: no panic, a bounded answer; what is accepted
//! is accepted again in the form it was stored in (parsing is idempotent), and what is signed
//! or generated round-trips.
use authd::{
    admin::PageTokens,
    auth::input,
    config::Settings,
    model::token::{self, TokenHash},
    profile::model as profile,
    store::SessionCursor,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use sha2::Digest;
use uuid::Uuid;

/// Any text, with a bias towards what breaks parsers: controls, combining marks, look-alikes,
/// expanding characters, surrogate neighbours, and the ASCII of addresses and URLs.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9.@:/_%+-]{0,80}",
        proptest::collection::vec(
            prop_oneof![
                Just('\u{FDFA}'),
                Just('\u{212A}'),
                Just('\u{202E}'),
                Just('\u{200B}'),
                Just('\u{0301}'),
                Just('\u{2800}'),
                Just('\u{FFFF}'),
                Just('\r'),
                Just('\n'),
                Just('\0'),
                Just(' '),
                Just('@'),
                Just('.'),
                any::<char>(),
            ],
            0..200,
        )
        .prop_map(|chars| chars.into_iter().collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// An accepted email is accepted again from its normalised form, to the same form; a
    /// refusal is a short message.
    #[test]
    fn emails(raw in hostile()) {
        match input::email(&raw) {
            Ok(email) => {
                let again = input::email(&email.normalized).expect("the normal form is valid");
                prop_assert_eq!(&again.normalized, &email.normalized);
                prop_assert_eq!(email.display.as_str(), raw.trim());
            }
            Err(reason) => prop_assert!(reason.len() < 200, "{}", reason),
        }
    }

    #[test]
    fn display_names_and_texts_are_idempotent(raw in hostile()) {
        if let Ok(name) = input::display_name(&raw) {
            prop_assert_eq!(input::display_name(&name), Ok(name.clone()));
        }
        if let Ok(text) = input::text(&raw, 500) {
            prop_assert!(text.chars().count() <= 500);
            prop_assert_eq!(input::text(&text, 500), Ok(text.clone()));
        }
        if let Ok(bio) = profile::bio(&raw) {
            prop_assert_eq!(profile::bio(&bio), Ok(bio.clone()));
        }
    }

    /// Passwords are taken as given (never trimmed or truncated) or refused.
    #[test]
    fn passwords(raw in hostile()) {
        if let Ok(secret) = input::password(&raw) {
            use secrecy::ExposeSecret;
            prop_assert_eq!(secret.expose_secret(), raw.as_str());
        }
    }

    /// Addresses come out canonical: parsing the canonical form gives it back.
    #[test]
    fn ip_addresses(raw in prop_oneof![hostile(), any::<std::net::IpAddr>().prop_map(|ip| ip.to_string())]) {
        if let Ok(ip) = input::ip_address(&raw) {
            prop_assert_eq!(input::ip_address(&ip), Ok(ip.clone()));
        }
    }

    #[test]
    fn ip_addresses_of_every_form_are_accepted(ip in any::<std::net::IpAddr>()) {
        let canonical = input::ip_address(&ip.to_string()).expect("an address is accepted");
        prop_assert_eq!(canonical, ip.to_canonical().to_string());
    }

    #[test]
    fn client_fields_and_profile_fields(raw in hostile()) {
        let kept = [
            input::device_id(&raw),
            input::user_agent(&raw),
            profile::avatar_url(&raw),
            profile::locale(&raw),
            profile::time_zone(&raw),
        ];
        // Kept as given when accepted.
        for accepted in kept.into_iter().flatten() {
            prop_assert_eq!(accepted, raw.clone());
        }
        if let Ok(id) = input::uuid(&raw) {
            prop_assert_eq!(input::uuid(&id.to_string()), Ok(id));
        }
    }

    #[test]
    fn uuids_round_trip(id in any::<u128>()) {
        let id = Uuid::from_u128(id);
        prop_assert_eq!(input::uuid(&id.to_string()), Ok(id));
    }

    /// Session tokens: any string is either refused, or `authd_` and the unpadded base64url of
    /// 32 bytes (a token of an earlier release), or that followed by `.<key id>.<22 base64url
    /// characters>` (a minted one); every 32 bytes make a token that parses.
    #[test]
    fn session_tokens(raw in prop_oneof![
        hostile(),
        "authd_[A-Za-z0-9_-]{40,46}",
        "authd_[A-Za-z0-9_-]{43}\\.[0-9]{1,11}\\.[A-Za-z0-9_-]{20,23}",
    ]) {
        if let Some(parsed) = token::Token::parse(&raw) {
            let body = raw.strip_prefix(token::TOKEN_PREFIX).expect("the prefix");
            let random = match parsed.proof {
                token::Proof::Legacy => body,
                token::Proof::Minted { key_id, .. } => {
                    let mut parts = body.split('.');
                    let random = parts.next().unwrap();
                    prop_assert_eq!(parts.next().unwrap(), key_id.to_string());
                    let tag = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).expect("base64url");
                    prop_assert_eq!(tag.len(), 16);
                    prop_assert!(parts.next().is_none());
                    random
                }
            };
            let bytes = URL_SAFE_NO_PAD.decode(random).expect("base64url");
            prop_assert_eq!(bytes.len(), 32);
            prop_assert_eq!(URL_SAFE_NO_PAD.encode(bytes), random);
        }
    }

    /// Account flow codes: any string is refused with a short message, or is the unpadded
    /// base64url of 18 bytes (what authd issues), which is what is hashed; every 18 bytes make
    /// a code.
    #[test]
    fn account_flow_codes(raw in prop_oneof![hostile(), "[A-Za-z0-9_=+/-]{20,28}"]) {
        match input::code(&raw) {
            Ok(hash) => {
                let bytes = URL_SAFE_NO_PAD.decode(&raw).expect("base64url");
                prop_assert_eq!(bytes.len(), 18);
                prop_assert_eq!(URL_SAFE_NO_PAD.encode(bytes), raw.clone());
                let expected: [u8; 32] = sha2::Sha256::digest(raw.as_bytes()).into();
                prop_assert_eq!(hash, expected);
            }
            Err(message) => prop_assert!(message.len() < 100, "{}", message),
        }
    }

    /// A TOTP code is 6 ASCII digits once spaces are dropped, and is those digits; anything else
    /// is refused with a short message.
    #[test]
    fn totp_codes(raw in prop_oneof![hostile(), "[0-9 ]{0,10}", "[0-9]{6}"]) {
        match input::totp_code(&raw) {
            Ok(code) => {
                prop_assert_eq!(code.len(), 6);
                prop_assert!(code.bytes().all(|b| b.is_ascii_digit()));
                prop_assert_eq!(code, raw.replace(' ', ""));
            }
            Err(message) => prop_assert!(message.len() < 100, "{}", message),
        }
    }

    /// A recovery code is hashed as its 16 base32 characters, lowercase, without dashes or
    /// spaces: every way of typing one code gives one hash, and nothing else is accepted.
    #[test]
    fn recovery_codes(
        raw in prop_oneof![hostile(), "[a-zA-Z2-7 -]{14,24}"],
        plain in "[a-z2-7]{16}",
        upper in any::<[bool; 16]>(),
    ) {
        match input::recovery_code(&raw) {
            Ok(hash) => {
                let normalized: String = raw
                    .chars()
                    .filter(|c| !matches!(c, '-' | ' '))
                    .map(|c| c.to_ascii_lowercase())
                    .collect();
                prop_assert_eq!(normalized.len(), 16);
                let expected: [u8; 32] = sha2::Sha256::digest(normalized.as_bytes()).into();
                prop_assert_eq!(hash, expected);
            }
            Err(message) => prop_assert!(message.len() < 100, "{}", message),
        }
        let grouped = plain
            .as_bytes()
            .chunks(4)
            .map(|g| std::str::from_utf8(g).unwrap())
            .collect::<Vec<_>>()
            .join("-");
        let typed: String = grouped
            .chars()
            .zip(upper.iter().cycle())
            .map(|(c, &up)| if up { c.to_ascii_uppercase() } else { c })
            .collect();
        prop_assert_eq!(
            input::recovery_code(&typed).unwrap(),
            input::recovery_code(&plain).unwrap()
        );
    }

    #[test]
    fn every_18_bytes_make_a_code(bytes in any::<[u8; 18]>()) {
        prop_assert!(input::code(&URL_SAFE_NO_PAD.encode(bytes)).is_ok());
    }

    #[test]
    fn every_32_bytes_make_a_token(bytes in any::<[u8; 32]>()) {
        let token = format!("{}{}", token::TOKEN_PREFIX, URL_SAFE_NO_PAD.encode(bytes));
        prop_assert!(TokenHash::of_token(&token).is_some());
    }

    /// A minted token is proven by its key and by nothing else: changing any one character
    /// makes it malformed or unproven.
    #[test]
    fn a_minted_token_changed_anywhere_is_not_proven(
        secret in any::<[u8; 32]>(),
        id in any::<u32>(),
        at in any::<prop::sample::Index>(),
        to in "[A-Za-z0-9_.-]",
    ) {
        let key = token::SigningKey::new(id, &secret).unwrap();
        let (minted, _) = token::generate(&key);
        prop_assert!(token::Token::parse(&minted).unwrap().minted_by(&key));
        let i = at.index(minted.len());
        let mut changed = minted.clone();
        changed.replace_range(i..=i, &to);
        if changed != minted {
            let proven = token::Token::parse(&changed).is_some_and(|t| t.minted_by(&key));
            prop_assert!(!proven, "{changed}");
        }
    }

    /// Page tokens: what is signed verifies to the same cursor for the same listing only; any
    /// change of a character, and any other string, is refused.
    #[test]
    fn page_tokens(
        key in proptest::collection::vec(any::<u8>(), 32),
        user in any::<u128>(),
        other in any::<u128>(),
        micros in 0i64..4_102_444_800_000_000,
        id in any::<u128>(),
        flip in any::<prop::sample::Index>(),
        garbage in hostile(),
    ) {
        let tokens = PageTokens::new(key);
        let (user, other) = (Uuid::from_u128(user), Uuid::from_u128(other));
        let cursor = SessionCursor {
            created_at: Utc.timestamp_micros(micros).single().expect("in range"),
            id: Uuid::from_u128(id),
        };
        let signed = tokens.sign(user, cursor);
        prop_assert_eq!(tokens.verify(user, &signed), Some(cursor));
        if other != user {
            prop_assert_eq!(tokens.verify(other, &signed), None);
        }
        let mut chars: Vec<char> = signed.chars().collect();
        let at = flip.index(chars.len());
        chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
        let tampered: String = chars.into_iter().collect();
        // A change in the last character may only touch its unused low bits (base64 of 40
        // bytes ends in 2 bits of padding); the payload and tag are what is checked.
        if tokens.verify(user, &tampered).is_some() {
            prop_assert_eq!(
                URL_SAFE_NO_PAD.decode(&tampered).ok(),
                URL_SAFE_NO_PAD.decode(&signed).ok()
            );
        }
        prop_assert_eq!(tokens.verify(user, &garbage), None);
    }
}

/// The case the property below found on CI: figment 0.10 slices a quoted value at a character
/// index where it meets a backslash, and panicked inside it after a multi-byte character. Now such
/// a value stops startup naming its variable.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
fn a_quoted_value_with_a_backslash_after_non_ascii_names_its_setting() {
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        jail.set_env("REDIS__KEY_PREFIX", "\"\u{fe20}\u{fffc}ਖ਼ெa A\\ \"");
        let error = Settings::load(None).expect_err("refused");
        assert!(error.to_string().contains("REDIS__KEY_PREFIX"), "{error}");
        jail.set_env("REDIS__KEY_PREFIX", "\"plain\\\\ascii\"");
        Settings::load(None).expect("an ASCII quoted value with an escape loads");
        Ok(())
    });
}

/// The settings a hostile or careless operator writes: any value of any setting either loads
/// or stops startup with a message naming that setting — never a panic.
#[test]
#[allow(clippy::result_large_err)] // figment's Jail closures return its large error type
fn settings() {
    const KEYS: &[&str] = &[
        "GRPC__ADDR",
        "GRPC__MAX_MESSAGE_SIZE",
        "GRPC__MAX_CONNECTIONS",
        "GRPC__MAX_CONNECTIONS_PER_ADDRESS",
        "GRPC__REQUEST_TIMEOUT",
        "GRPC__SHUTDOWN_GRACE",
        "REDIS__URL",
        "REDIS__ENABLED",
        "REDIS__KEY_PREFIX",
        "DATABASE__URL",
        "DATABASE__MAX_CONNECTIONS",
        "SESSION__IDLE_TIMEOUT",
        "RATE_LIMIT__LOGIN_WINDOW",
        "RATE_LIMIT__LOGIN_PER_EMAIL",
        "RATE_LIMIT__IPV6_PREFIX",
        "ADMIN__ALLOWED_CLIENTS",
        "METRICS__ADDR",
        "LOG__LEVEL",
        "LOG__FORMAT",
    ];
    let values = proptest::collection::vec(
        (
            0..KEYS.len(),
            prop_oneof![
                hostile(),
                "[0-9]{1,25}",
                "-?[0-9]{1,6}(ms|s|m|h|d|KiB|MiB)?",
                "(redis|rediss|redis-cluster|redis-sentinel|postgres)://[a-z0-9.:@,/?=_-]{0,40}",
            ],
        ),
        1..4,
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(256));
    runner
        .run(&values, |pairs| {
            figment::Jail::expect_with(|jail| {
                jail.clear_env();
                let mut set = Vec::new();
                for (key, value) in &pairs {
                    // The environment cannot hold NUL bytes.
                    let value = value.replace('\0', "");
                    jail.set_env(KEYS[*key], &value);
                    set.push(KEYS[*key]);
                }
                // What `config` parses, then what the pieces judge as startup builds them.
                let judged = Settings::load(None).and_then(|settings| {
                    authd::store::Db::check(&settings.database)?;
                    authd::cache::Redis::check(&settings.redis)
                });
                if let Err(error) = judged {
                    let message = error.to_string();
                    assert!(
                        set.iter().any(|key| message.contains(key)),
                        "{message:?} names none of {set:?}"
                    );
                }
                Ok(())
            });
            Ok(())
        })
        .unwrap();
}
