//! The AuthService rules: registration, login, validation and logout, with PostgreSQL as the
//! source of truth and Redis as the hot copy. Session management lives in `manage.rs`, the
//! background jobs in `maintenance.rs`.
//!
//! Consistency: PostgreSQL commits first, Redis follows. Every revocation is queued in
//! PostgreSQL in the same statement that revokes (see `store::outbox`), and every revoking call
//! writes the tombstones of everything still queued for the sessions it concerns — an earlier
//! attempt's included — before it returns. What Redis could not confirm stays queued for the
//! drain of any instance with Redis; until a drain pass succeeds after a Redis failure, this
//! instance does not serve cached copies. Copies are written only under a lease taken before the
//! PostgreSQL read (see `cache`).
use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, FillHook,
    input::Email,
    jwt::JwtKeys,
    keys::{Checked, TokenKeys},
    lookups::{Found, Paid, UnknownLookups},
    password::PasswordHasher,
    password_policy::{PasswordContext, PasswordPolicy},
    security,
    session::{ClientInfo, SessionPolicy, SessionRecord},
    token::{self, TokenHash},
};
use crate::{
    cache::{Cached, Lease, RateLimiter, SessionStore},
    clock::Clock,
    config::RateLimitSettings,
    local::{Keys, LocalCache},
    store::{Db, EMAIL_UNIQUE, NewSession, NewUser, Proof, Refusal, StoreError},
    telemetry::{Tier, traces},
};

pub struct Registration {
    pub email: Email,
    pub password: SecretString,
    pub display_name: String,
    pub client: ClientInfo,
}

pub struct Credentials {
    pub email: Email,
    pub password: SecretString,
    pub client: ClientInfo,
}

/// A session as callers see it: the record and its current deadline.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub record: SessionRecord,
    pub expires_at: DateTime<Utc>,
}

/// A newly issued session and its bearer token (the only time the token exists in clear).
pub struct IssuedSession {
    pub token: SecretString,
    pub session: SessionView,
}

pub struct AuthService {
    pub(super) db: Arc<Db>,
    pub(super) cache: SessionStore,
    pub(super) hasher: PasswordHasher,
    pub(super) policy: SessionPolicy,
    pub(super) limiter: RateLimiter,
    pub(super) limits: RateLimitSettings,
    pub(super) passwords: PasswordPolicy,
    pub(super) clock: Arc<Clock>,
    pub(super) local: LocalCache,
    pub(super) keys: Arc<TokenKeys>,
    pub(super) jwt: Arc<JwtKeys>,
    pub(super) unknown: Arc<UnknownLookups>,
    pub(super) flows: super::FlowLimits,
    pub(super) fill_hook: std::sync::OnceLock<FillHook>,
}

/// What AuthService is built from.
pub struct AuthParts {
    pub db: Arc<Db>,
    pub cache: SessionStore,
    pub hasher: PasswordHasher,
    pub policy: SessionPolicy,
    pub limiter: RateLimiter,
    pub limits: RateLimitSettings,
    pub passwords: PasswordPolicy,
    pub clock: Arc<Clock>,
    pub local: LocalCache,
    pub keys: Arc<TokenKeys>,
    pub jwt: Arc<JwtKeys>,
    pub unknown: Arc<UnknownLookups>,
    pub flows: super::FlowLimits,
}

impl AuthService {
    pub fn new(parts: AuthParts) -> Self {
        let AuthParts {
            db,
            cache,
            hasher,
            policy,
            limiter,
            limits,
            passwords,
            clock,
            local,
            keys,
            jwt,
            unknown,
            flows,
        } = parts;
        Self {
            db,
            cache,
            hasher,
            policy,
            limiter,
            limits,
            passwords,
            clock,
            local,
            keys,
            jwt,
            unknown,
            flows,
            fill_hook: std::sync::OnceLock::new(),
        }
    }

    /// Test hook: runs after a validation has read a session from PostgreSQL and before it
    /// writes it to Redis, to pause a fill deterministically. Only the first call takes effect.
    #[doc(hidden)]
    pub fn set_fill_hook(&self, hook: FillHook) {
        let _ = self.fill_hook.set(hook);
    }

    /// Registration: the client's address pays (`RATE_LIMIT__REGISTER_PER_IP`), a taken email
    /// is refused before any hashing, and the hash itself waits for a hashing place.
    #[instrument(skip_all)]
    pub async fn register(&self, r: Registration) -> Result<(Uuid, IssuedSession), AuthError> {
        let context = PasswordContext {
            email: &r.email.normalized,
            display_name: &r.display_name,
        };
        self.passwords.check("password", &r.password, &context)?;
        self.limit("register", &[self.address_bucket("register", &r.client)])
            .await?;
        if self.db.users().email_taken(&r.email.normalized).await? {
            return Err(AuthError::EmailTaken);
        }
        let password_hash = self.hasher.hash(r.password).await?;
        let user_id = Uuid::now_v7();
        let record = self.policy.start(user_id, r.client, self.clock.now());
        let key = self.keys.minting()?;
        let (token, hash) = token::generate(&key);
        let lease = self.cache.lease(&hash).await;
        let user = NewUser {
            id: user_id,
            email: &r.email.display,
            email_normalized: &r.email.normalized,
            password_hash: &password_hash,
            display_name: &r.display_name,
        };
        match self
            .db
            .users()
            .create_with_session(&user, &record, hash.as_bytes(), key.id)
            .await
        {
            Err(StoreError::Conflict { constraint }) if constraint == EMAIL_UNIQUE => {
                return Err(AuthError::EmailTaken);
            }
            other => other?,
        }
        tracing::info!(%user_id, session_id = %record.id, "user registered");
        Ok((user_id, self.issued(token, hash, record, lease).await))
    }

    /// Login (see `limits` for who pays): the address first, then a hashing place (so a flood is
    /// refused before any database work), the account's bucket (its own for a client it
    /// trusts) and its consecutive-failure cap, and only then the password.
    #[instrument(skip_all)]
    pub async fn login(&self, c: Credentials) -> Result<IssuedSession, AuthError> {
        self.limit("login", &[self.address_bucket("login", &c.client)])
            .await?;
        let admitted = self.hasher.admit()?;
        let client = self.client_hash(&c.client);
        let stored = self
            .db
            .users()
            .find_credentials(
                &c.email.normalized,
                client.as_ref().map(|c| c.as_slice()),
                self.limits.trusted_client_ttl,
            )
            .await?;
        let trusted = stored.as_ref().is_some_and(|s| s.trusted);
        let trusted_client = client.as_ref().map(|c| c.as_slice()).filter(|_| trusted);
        let account = self.account_bucket(&c.email.normalized, trusted_client);
        self.limit("login", std::slice::from_ref(&account)).await?;
        let ip = c.client.ip_address.clone();
        if let Some(locked) = stored
            .as_ref()
            .filter(|s| !trusted && self.locked(s.failed_logins))
        {
            self.metrics()
                .rate_limited
                .with_label_values(&["login"])
                .inc();
            security::login_failed(Some(locked.id), &ip, "account_locked");
            return Err(AuthError::Locked);
        }
        let phc = stored.as_ref().map(|s| s.password_hash.clone());
        if !admitted.verify(c.password, phc).await? {
            self.metrics().failed_logins.inc();
            let reason = match &stored {
                Some(_) => "wrong_password",
                None => "unknown_account",
            };
            security::login_failed(stored.as_ref().map(|s| s.id), &ip, reason);
            if let Some(stored) = stored.filter(|s| !s.trusted) {
                self.count_failure(stored.id, &ip).await?;
            }
            return Err(AuthError::InvalidCredentials);
        }
        let stored = stored.ok_or(AuthError::InvalidCredentials)?;
        // Only a caller who knows the password learns that the account is disabled.
        if stored.disabled {
            security::login_failed(Some(stored.id), &ip, "account_disabled");
            return Err(AuthError::Disabled);
        }
        let user_id = stored.id;
        if stored.second_factor {
            // The right password does not refill the account's guess bucket until the second
            // factor is right too, and a required new password is asked for only then: the
            // password alone leads to nothing but the challenge (see `second_factor`).
            let trusted = (trusted_client, stored.trusted_with_factor);
            return Err(self
                .challenge(user_id, (&stored.password_hash, trusted), &ip)
                .await);
        }
        self.limiter.reset(&account).await;
        self.unless_change_required(&stored, &ip).await?;
        // Only if the password checked is still the user's: a ChangePassword that committed while
        // the hash was being verified must not be outlived by a session of the old password.
        let proof = Proof::Password(&stored.password_hash);
        match self
            .open_session(user_id, c.client, client, proof, 1)
            .await?
        {
            Ok(issued) => Ok(issued),
            // A second factor confirmed while the password was being checked.
            Err(Refusal::FactorRequired) => {
                let trusted = (trusted_client, false);
                Err(self
                    .challenge(user_id, (&stored.password_hash, trusted), &ip)
                    .await)
            }
            Err(_) => Err(AuthError::InvalidCredentials),
        }
    }

    /// Stores a new session of level `aal` for the account, on `proof` (why not, when it no
    /// longer holds), trusting `client` from now on.
    pub(super) async fn open_session(
        &self,
        user_id: Uuid,
        info: ClientInfo,
        client: Option<[u8; 32]>,
        proof: Proof<'_>,
        aal: u8,
    ) -> Result<Result<IssuedSession, Refusal>, AuthError> {
        let mut record = self.policy.start(user_id, info, self.clock.now());
        record.aal = aal;
        let key = self.keys.minting()?;
        let (token, hash) = token::generate(&key);
        let lease = self.cache.lease(&hash).await;
        let session = NewSession {
            record: &record,
            token_hash: hash.as_bytes(),
            key_id: key.id,
            proof,
            max_per_user: i64::from(self.policy.max_per_user),
            client: client.as_ref().map(|c| c.as_slice()),
        };
        let (evicted, email_verified_at) = match self
            .db
            .sessions()
            .insert_capped(&session, self.since())
            .await?
        {
            Ok(stored) => stored,
            Err(refusal) => return Ok(Err(refusal)),
        };
        record.email_verified_at = email_verified_at;
        tracing::info!(%user_id, session_id = %record.id, evicted = evicted.revoked, "session created");
        // The eviction is a revocation like any other: the login answers once no instance
        // serves the sessions it evicted (or UNAVAILABLE, when that cannot be known). The user's
        // earlier revocations are their own calls' to wait for; only their tombstones are
        // written again, where this cache may lack them.
        let hashes = evicted.revoked_hashes.iter().map(Vec::as_slice);
        self.invalidate_keys(Some("session_cap"), &evicted, Keys::sessions(hashes))
            .await?;
        Ok(Ok(self.issued(token, hash, record, lease).await))
    }

    async fn issued(
        &self,
        token: String,
        hash: TokenHash,
        record: SessionRecord,
        lease: Option<Lease>,
    ) -> IssuedSession {
        let view = self.view(record);
        self.metrics().sessions_created.inc();
        if let Some(lease) = lease {
            self.fill(lease, &hash, &view.record).await;
        }
        IssuedSession {
            token: SecretString::from(token),
            session: view,
        }
    }

    pub(super) fn view(&self, record: SessionRecord) -> SessionView {
        SessionView {
            expires_at: self.policy.expires_at(&record),
            record,
        }
    }

    /// Writes a copy under `lease` for as long as the session has left.
    async fn fill(&self, lease: Lease, hash: &TokenHash, record: &SessionRecord) {
        if let Some(ttl) = self.policy.time_left(record, self.clock.now()) {
            self.cache.fill(lease, hash, record, ttl).await;
        }
    }

    /// Replaces the live cached copy (if any) with `record`.
    pub(super) async fn refresh_copy(&self, hash: &TokenHash, record: &SessionRecord) {
        if let Some(ttl) = self.policy.time_left(record, self.clock.now()) {
            self.cache.refresh(hash, record, ttl).await;
        }
    }

    /// The hot path: one Redis GET when cached, no PostgreSQL query unless activity is due to be
    /// recorded (once per touch interval per session). No span of its own: the RPC's span says
    /// enough, and this runs on every request other services serve.
    pub async fn validate(&self, token: &str) -> Result<SessionView, AuthError> {
        let token = self.keys.check(token).await?;
        self.validate_checked(token).await
    }

    /// [`Self::validate`], and a step-up: the session's password checked at most `max_age` ago,
    /// and its level at least `min_aal` (judged on the same copy, at no extra cost).
    pub async fn validate_recent(
        &self,
        token: &str,
        max_age: Option<std::time::Duration>,
        min_aal: u8,
    ) -> Result<SessionView, AuthError> {
        let view = self.validate(token).await?;
        let at = view.record.authenticated_at;
        if view.record.aal < min_aal {
            return Err(AuthError::SecondFactorMissing(view.record.aal));
        }
        match max_age {
            Some(max) if (self.clock.now() - at).to_std().is_ok_and(|age| age > max) => {
                Err(AuthError::StaleAuthentication(at))
            }
            _ => Ok(view),
        }
    }

    pub(super) async fn validate_checked(&self, token: Checked) -> Result<SessionView, AuthError> {
        let hash = &token.hash;
        if let Some(record) = self.local.session(hash) {
            let now = self.clock.now();
            // A copy whose touch is due goes the shared way: Redis has the fleet's last touch.
            if !self.policy.is_expired(&record, now) && !self.policy.touch_due(&record, now) {
                traces::tier(Tier::Memory);
                return Ok(self.view(record));
            }
        }
        let ticket = self.local.session_ticket(hash);
        let view = self.validate_shared(token).await?;
        self.local.keep_session(ticket, hash, &view.record);
        Ok(view)
    }

    /// Validation through Redis (and PostgreSQL on a miss).
    async fn validate_shared(&self, token: Checked) -> Result<SessionView, AuthError> {
        let hash = &token.hash;
        // A token no MAC proves costs not even a Redis read from an address that spent its
        // budget of unknown lookups.
        if !token.proven {
            self.unknown.open()?;
        }
        let record = match self.cache.get(hash).await {
            Cached::Hit(record) => {
                traces::tier(Tier::Redis);
                record
            }
            Cached::Revoked => {
                traces::tier(Tier::Redis);
                return Err(AuthError::InvalidSession);
            }
            // The lease is taken before PostgreSQL is read: whatever revokes the session, or
            // flushes Redis, after this point makes the fill a no-op.
            Cached::Miss => {
                // A token no MAC proves pays before it costs Redis a lease or PostgreSQL a read.
                let paid = self.pay_unless(token.proven).await?;
                let lease = self.cache.lease(hash).await;
                let checked = self.load_and_check(hash, paid).await;
                return match (checked, lease) {
                    (Ok(record), Some(lease)) => {
                        self.fill(lease, hash, &record).await;
                        Ok(self.view(record))
                    }
                    (Ok(record), None) => Ok(self.view(record)),
                    // Nothing to fill: leave no key behind (bad tokens must not fill Redis).
                    (Err(error), Some(lease)) => {
                        self.cache.release(lease).await;
                        Err(error)
                    }
                    (Err(error), None) => Err(error),
                };
            }
            Cached::Unavailable => {
                let paid = self.pay_unless(token.proven).await?;
                return Ok(self.view(self.load_and_check(hash, paid).await?));
            }
        };
        if self.policy.is_expired(&record, self.clock.now()) {
            return Err(AuthError::InvalidSession);
        }
        let (record, touched) = self.touch(record).await?;
        if touched {
            self.refresh_copy(hash, &record).await;
        }
        Ok(self.view(record))
    }

    /// One unknown lookup paid by the caller, unless the token is `proven` (see `lookups`).
    async fn pay_unless(&self, proven: bool) -> Result<Option<Paid<'_>>, AuthError> {
        if proven {
            Ok(None)
        } else {
            self.unknown.pay().await.map(Some)
        }
    }

    /// The session from PostgreSQL, checked and its activity recorded when due; the fill hook
    /// runs after (tests pause there). A lookup `paid` for is settled by what it found.
    async fn load_and_check(
        &self,
        hash: &TokenHash,
        paid: Option<Paid<'_>>,
    ) -> Result<SessionRecord, AuthError> {
        traces::tier(Tier::Postgres);
        let found = self.db.sessions().find_by_token_hash(hash.as_bytes()).await;
        if let Some(paid) = paid {
            paid.settle(match &found {
                Ok(Some(_)) => Found::Yes,
                Ok(None) => Found::No,
                Err(_) => Found::Failed,
            });
        }
        let record = match found? {
            Some(stored) if !stored.revoked => stored.record,
            _ => return Err(AuthError::InvalidSession),
        };
        if self.policy.is_expired(&record, self.clock.now()) {
            return Err(AuthError::InvalidSession);
        }
        let (record, _) = self.touch(record).await?;
        if let Some(hook) = self.fill_hook.get() {
            hook(record.id).await;
        }
        Ok(record)
    }

    /// Records activity when due. A session revoked meanwhile is rejected; a PostgreSQL outage
    /// only postpones the write (the session is still valid by its own data).
    async fn touch(&self, mut record: SessionRecord) -> Result<(SessionRecord, bool), AuthError> {
        if !self.policy.touch_due(&record, self.clock.now()) {
            return Ok((record, false));
        }
        let idle = self.policy.idle_timeout;
        match self.db.sessions().touch(record.id, idle).await {
            Ok(Some(touched)) => {
                record.last_seen_at = touched.last_seen_at;
                record.email_verified_at = touched.email_verified_at;
                record.aal = u8::try_from(touched.aal).unwrap_or(1);
                Ok((record, true))
            }
            Ok(None) => Err(AuthError::InvalidSession),
            Err(StoreError::Unavailable(error)) => {
                tracing::warn!(?error, "could not record session activity; will retry");
                Ok((record, false))
            }
            Err(other) => Err(other.into()),
        }
    }

    /// Revokes the token's session. Unknown or already revoked tokens are fine (idempotent), and
    /// a repeated call re-applies the tombstone an earlier attempt may not have written.
    #[instrument(skip_all)]
    pub async fn logout(&self, token: &str) -> Result<(), AuthError> {
        let token = self.keys.check(token).await?;
        let paid = self.pay_unless(token.proven).await?;
        let revocation = self
            .db
            .sessions()
            .revoke_by_token_hash(token.hash.as_bytes(), self.since())
            .await;
        if let Some(paid) = paid {
            paid.settle(match &revocation {
                Ok(r) if r.revoked > 0 || !r.pending.is_empty() => Found::Yes,
                Ok(_) => Found::No,
                Err(_) => Found::Failed,
            });
        }
        let revocation = revocation?;
        if revocation.revoked > 0 {
            tracing::info!("session revoked");
        }
        self.invalidate(Some("logout"), &revocation).await
    }
}
