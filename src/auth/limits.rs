//! Who pays for a password check (see README "Rate limits"). Every hash is paid for by a bucket
//! that its caller cannot refill at will:
//!
//! - the client's *address* (an IPv4 address, an IPv6 network of `RATE_LIMIT__IPV6_PREFIX`, or
//!   one shared bucket for requests without one) pays for every Login (`RATE_LIMIT__LOGIN_PER_IP`)
//!   and every Register (`RATE_LIMIT__REGISTER_PER_IP`), right or wrong, never refunded;
//! - the *account* pays for every guess (`RATE_LIMIT__LOGIN_PER_EMAIL`, also ChangePassword's
//!   current password), and starts over after a correct one — but a client that signed in to the
//!   account before (the same device identifier, or without one the same exact address) has a
//!   bucket of its own there, so guesses from elsewhere cannot lock its owner out;
//! - every ChangePassword (two hashes) also pays the account's password-change bucket (the same
//!   limit and window), never refunded;
//! - and in PostgreSQL, whatever Redis remembers, an account refuses clients it does not trust
//!   after `RATE_LIMIT__MAX_FAILED_LOGINS` consecutive wrong passwords (NIST SP 800-63B).
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use uuid::Uuid;

use super::{AuthError, AuthService, security, session::ClientInfo};
use crate::cache::Bucket;

impl AuthService {
    /// The address bucket key: `v4:a.b.c.d`, `v6:<network>/<prefix>`, or `none`.
    pub(super) fn address(&self, client: &ClientInfo) -> String {
        let prefix = self.limits.ipv6_prefix.min(128);
        match client
            .ip_address
            .parse::<IpAddr>()
            .map(|ip| super::input::network(ip, prefix))
        {
            Ok(IpAddr::V4(v4)) => format!("v4:{v4}"),
            Ok(IpAddr::V6(network)) => format!("v6:{network}/{prefix}"),
            Err(_) => "none".to_owned(),
        }
    }

    /// The bucket of the client's address for `operation` (`login` or `register`).
    pub(super) fn address_bucket(&self, operation: &str, client: &ClientInfo) -> Bucket {
        let l = &self.limits;
        let (limit, window) = match operation {
            "register" => (l.register_per_ip, l.register_window),
            _ => (l.login_per_ip, l.login_window),
        };
        Bucket::new(
            &format!("{operation}_address"),
            &self.address(client),
            limit,
            window,
        )
    }

    /// What identifies the client to an account that may trust it: its device identifier, or
    /// without one its exact address — never a network: a whole IPv6 /64 must not become
    /// trusted because the owner signed in from one address of it (hashed; nothing when it sent
    /// neither).
    pub(super) fn client_hash(&self, client: &ClientInfo) -> Option<[u8; 32]> {
        let id = match (client.device_id.is_empty(), client.ip_address.is_empty()) {
            (false, _) => format!("device:{}", client.device_id),
            // Canonical already (see `input::ip_address`).
            (true, false) => format!("address:{}", client.ip_address),
            (true, true) => return None,
        };
        Some(Sha256::digest(id.as_bytes()).into())
    }

    /// Password changes of an account: every one costs two hashes, so each is paid for here and
    /// never refunded (a correct current password resets the guess bucket, not this one).
    pub(super) fn password_change_bucket(&self, user_id: uuid::Uuid) -> Bucket {
        let l = &self.limits;
        Bucket::new(
            "password_change",
            &user_id.to_string(),
            l.login_per_email,
            l.login_window,
        )
    }

    /// The account's guess bucket; `client`: a client it trusts, with a bucket of its own.
    pub(super) fn account_bucket(&self, email_normalized: &str, client: Option<&[u8]>) -> Bucket {
        let account = hex::encode(Sha256::digest(email_normalized.as_bytes()));
        let subject = match client {
            Some(client) => format!("{account}:{}", hex::encode(client)),
            None => account,
        };
        let l = &self.limits;
        Bucket::new("guesses", &subject, l.login_per_email, l.login_window)
    }

    /// Takes an attempt from each bucket in order; refused (and counted in metrics) at the first
    /// that is exhausted.
    pub(super) async fn limit(&self, operation: &str, buckets: &[Bucket]) -> Result<(), AuthError> {
        self.limiter.acquire(buckets).await.map_err(|retry_after| {
            self.metrics()
                .rate_limited
                .with_label_values(&[operation])
                .inc();
            AuthError::RateLimited { retry_after }
        })
    }

    /// Whether the account refuses clients it does not trust (too many wrong passwords).
    pub(super) fn locked(&self, failed_logins: i32) -> bool {
        let max = self.limits.max_failed_logins;
        max > 0 && failed_logins >= i32::try_from(max).unwrap_or(i32::MAX)
    }
    /// Counts a wrong password against the account; the security event when it reaches the
    /// lockout.
    pub(super) async fn count_failure(&self, user_id: Uuid, ip: &str) -> Result<(), AuthError> {
        let failures = self.db.users().record_failure(user_id).await?;
        if let Some(failures) = failures.filter(|&n| self.locked(n) && !self.locked(n - 1)) {
            security::account_locked(user_id, ip, failures);
        }
        Ok(())
    }
}
