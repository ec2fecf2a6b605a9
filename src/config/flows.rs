//! `ACCOUNTS__*`: the account flows (password reset): who may start them and receive their codes
//! (admitted as AdminService callers are, from lists of their own), how long a code lives, what
//! the flows may cost; and how recent a sign-in deleting an account without its password needs.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{AdminSettings, ConfigError, invalid};

/// AccountService: served only when a notifier (the caller that delivers the codes) can be
/// admitted.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsSettings {
    /// Comma-separated SANs of client certificates admitted as notifiers.
    pub allowed_clients: String,
    /// TOML file of `[[key]]` tables (`name`, `sha256`) of bearer keys admitted as notifiers.
    pub api_keys_file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
    /// A password reset code is valid this long.
    #[serde(with = "humantime_serde")]
    pub reset_code_ttl: Duration,
    /// Flows started per account (per email, known or not) in a window.
    pub starts_per_account: u32,
    /// Flow calls (starts and completions, right or wrong) per end-user address in a window.
    pub attempts_per_address: u32,
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// DeleteAccount without the current password: the session's password was checked at most
    /// this long ago.
    #[serde(with = "humantime_serde")]
    pub delete_max_auth_age: Duration,
    /// An email verification or email change code is valid this long.
    #[serde(with = "humantime_serde")]
    pub verify_code_ttl: Duration,
    /// StartEmailChange without the current password: the session's password was checked at
    /// most this long ago.
    #[serde(with = "humantime_serde")]
    pub email_change_max_auth_age: Duration,
    /// The issuer an authenticator app shows next to the account (in the `otpauth://` URI of a
    /// TOTP enrolment); no `:`.
    pub totp_issuer: String,
    /// RemoveTotp and RegenerateRecoveryCodes need a session created by a sign-in with the
    /// factor at most this long ago.
    #[serde(with = "humantime_serde")]
    pub second_factor_max_auth_age: Duration,
    /// A login's second-factor challenge is valid this long.
    #[serde(with = "humantime_serde")]
    pub second_factor_challenge_ttl: Duration,
    /// Wrong codes a login's challenge takes before it is void (the login starts over, with
    /// its password).
    pub second_factor_attempts: u32,
}

impl Default for AccountsSettings {
    fn default() -> Self {
        Self {
            allowed_clients: String::new(),
            api_keys_file: None,
            reload_interval: Duration::from_secs(2),
            reset_code_ttl: Duration::from_secs(3600),
            starts_per_account: 5,
            attempts_per_address: 30,
            window: Duration::from_secs(3600),
            delete_max_auth_age: Duration::from_secs(300),
            verify_code_ttl: Duration::from_secs(86_400),
            email_change_max_auth_age: Duration::from_secs(300),
            totp_issuer: "authd".to_owned(),
            second_factor_max_auth_age: Duration::from_secs(300),
            second_factor_challenge_ttl: Duration::from_secs(300),
            second_factor_attempts: 5,
        }
    }
}

impl AccountsSettings {
    /// Whether AccountService is served: some notifier can be admitted.
    pub fn served(&self) -> bool {
        self.admission().served()
    }

    /// Who is admitted, in the form AdminService's admission reads.
    pub fn admission(&self) -> AdminSettings {
        AdminSettings {
            allowed_clients: self.allowed_clients.clone(),
            api_keys_file: self.api_keys_file.clone(),
            reload_interval: self.reload_interval,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.reload_interval.is_zero() {
            return invalid("ACCOUNTS__RELOAD_INTERVAL", "must be greater than zero");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400))
            .contains(&self.reset_code_ttl)
        {
            return invalid("ACCOUNTS__RESET_CODE_TTL", "must be 1s to 7d");
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(7 * 86_400))
            .contains(&self.verify_code_ttl)
        {
            return invalid("ACCOUNTS__VERIFY_CODE_TTL", "must be 1s to 7d");
        }
        if self.delete_max_auth_age > Duration::from_secs(86_400) {
            return invalid("ACCOUNTS__DELETE_MAX_AUTH_AGE", "must be at most 1d");
        }
        if self.email_change_max_auth_age > Duration::from_secs(86_400) {
            return invalid("ACCOUNTS__EMAIL_CHANGE_MAX_AUTH_AGE", "must be at most 1d");
        }
        if self.totp_issuer.trim().is_empty()
            || self.totp_issuer.contains(':')
            || self.totp_issuer.chars().count() > 64
        {
            return invalid(
                "ACCOUNTS__TOTP_ISSUER",
                "must be 1 to 64 characters, without ':'",
            );
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(86_400))
            .contains(&self.second_factor_max_auth_age)
        {
            return invalid("ACCOUNTS__SECOND_FACTOR_MAX_AUTH_AGE", "must be 10s to 1d");
        }
        if !(Duration::from_secs(10)..=Duration::from_secs(3600))
            .contains(&self.second_factor_challenge_ttl)
        {
            return invalid("ACCOUNTS__SECOND_FACTOR_CHALLENGE_TTL", "must be 10s to 1h");
        }
        if !(1..=10).contains(&self.second_factor_attempts) {
            return invalid("ACCOUNTS__SECOND_FACTOR_ATTEMPTS", "must be 1 to 10");
        }
        if self.window < Duration::from_secs(1) {
            return invalid("ACCOUNTS__WINDOW", "must be at least 1s");
        }
        Ok(())
    }
}
