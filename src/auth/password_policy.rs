//! What a new password must be (NIST SP 800-63B §3.1.1.2): long enough
//! (`AUTH__PASSWORD_MIN_LENGTH` characters after NFKC, the form that is hashed), not one of the
//! 100,000 most common passwords (`data/common-passwords.txt`, shipped inside the binary), and
//! not made of words of its context: the email, its local part, the display name and its words,
//! the service's name. Comparisons ignore case and compatibility forms (NFKC, then lower case).
use std::sync::LazyLock;

use secrecy::{ExposeSecret, SecretString};
use unicode_normalization::UnicodeNormalization;

use super::{AuthError, input::FieldViolation};

/// The list, one password per line (see `data/README.md` for its origin).
const COMMON: &str = include_str!("../../data/common-passwords.txt");

/// The list in comparison form, sorted for binary search (~100k short strings, built once).
static BLOCKLIST: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut list: Vec<String> = COMMON.lines().map(comparable).collect();
    list.sort_unstable();
    list.dedup();
    list
});

/// The service's own name: a password containing it is a context word.
const SERVICE_NAME: &str = "authd";

/// Context words shorter than this count only when they are the whole password (a 3-letter
/// name inside a long password is no weakness).
const CONTAINED_MIN_CHARS: usize = 4;

fn comparable(s: &str) -> String {
    s.nfkc().flat_map(char::to_lowercase).collect()
}

/// The rules for new passwords.
#[derive(Debug, Clone)]
pub struct PasswordPolicy {
    min_chars: usize,
}

/// Whose password it is: the words it must not be made of.
pub struct PasswordContext<'a> {
    pub email: &'a str,
    pub display_name: &'a str,
}

impl PasswordPolicy {
    /// Builds the blocklist now, so the first Register does not pay for it.
    pub fn new(min_chars: usize) -> Self {
        LazyLock::force(&BLOCKLIST);
        Self { min_chars }
    }

    /// `Ok` when `password` may become the account's; otherwise INVALID_ARGUMENT naming `field`.
    pub fn check(
        &self,
        field: &str,
        password: &SecretString,
        context: &PasswordContext<'_>,
    ) -> Result<(), AuthError> {
        self.problem(password.expose_secret(), context)
            .map_or(Ok(()), |description| {
                Err(AuthError::InvalidInput(vec![FieldViolation {
                    field: field.to_owned(),
                    description,
                }]))
            })
    }

    fn problem(&self, password: &str, context: &PasswordContext<'_>) -> Option<String> {
        let candidate = comparable(password);
        if password.nfkc().count() < self.min_chars {
            return Some(format!("must be at least {} characters", self.min_chars));
        }
        if BLOCKLIST.binary_search(&candidate).is_ok() {
            return Some("is one of the most common passwords; choose another".into());
        }
        let email = comparable(context.email);
        let local = email.rsplit_once('@').map_or(email.as_str(), |(l, _)| l);
        let name = comparable(context.display_name);
        let words = [email.as_str(), local, name.as_str(), SERVICE_NAME]
            .into_iter()
            .chain(name.split(|c: char| !c.is_alphanumeric()));
        for word in words.filter(|w| !w.is_empty()) {
            let contained = word.chars().count() >= CONTAINED_MIN_CHARS && candidate.contains(word);
            if candidate == word || contained {
                return Some(
                    "must not contain the email, the display name or the service's name".into(),
                );
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADA: PasswordContext<'static> = PasswordContext {
        email: "Ada.Lovelace@example.com",
        display_name: "Ada Lovelace",
    };

    fn problem(password: &str) -> Option<String> {
        PasswordPolicy::new(8).problem(password, &ADA)
    }

    #[test]
    fn the_list_is_the_top_100_000() {
        assert!(BLOCKLIST.len() > 95_000, "{}", BLOCKLIST.len());
    }

    #[test]
    fn common_passwords_are_refused_whatever_their_case_or_form() {
        for common in [
            "password",
            "12345678",
            "PASSWORD",
            "Qwertyuiop",
            "ｐａｓｓｗｏｒｄ",
        ] {
            assert!(problem(common).is_some(), "{common}");
        }
        assert_eq!(problem("correct horse battery staple"), None);
    }

    #[test]
    fn context_words_are_refused() {
        for weak in [
            "ada.lovelace@example.com",
            "ADA.LOVELACE",
            "my ada.lovelace 1815",
            "lovelace1815",
            "authd-secret-99",
        ] {
            assert!(problem(weak).is_some(), "{weak}");
        }
        // "Ada" alone is too short to count inside a longer password.
        assert_eq!(problem("adamant analytical engine"), None);
    }

    #[test]
    fn the_minimum_is_counted_after_nfkc() {
        let policy = PasswordPolicy::new(15);
        assert!(policy.problem("fourteen chars", &ADA).is_some());
        assert_eq!(policy.problem("fifteen chars!!", &ADA), None);
        // U+FB03 "ﬃ" is three characters once normalised.
        assert_eq!(PasswordPolicy::new(9).problem("ﬃﬃﬃ", &ADA), None);
    }
}
