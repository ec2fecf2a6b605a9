//! The AuthService rules: registration, login, validation and logout, with PostgreSQL as the
//! source of truth and Redis as the hot copy. Session management lives in `manage.rs`, the
//! background jobs in `maintenance.rs`.
//!
//! Consistency: PostgreSQL commits first, Redis follows. Every revocation is queued in
//! PostgreSQL in the same statement that revokes (see `store::sessions`), so a failed Redis step
//! is retried by the invalidation drain on any instance; until a drain pass succeeds after a
//! Redis failure, this instance does not trust cached copies.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, FillHook,
    input::Email,
    password::PasswordHasher,
    session::{self, ClientInfo, SessionPolicy, SessionRecord},
    token::{self, TokenHash},
};
use crate::{
    cache::{Bucket, Cached, RateLimiter, SessionStore},
    config::RateLimitSettings,
    metrics::Metrics,
    store::{Db, EMAIL_UNIQUE, Invalidation, NewUser, StoreError},
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
    pub(super) fill_hook: std::sync::OnceLock<FillHook>,
}

impl AuthService {
    pub fn new(
        db: Arc<Db>,
        cache: SessionStore,
        hasher: PasswordHasher,
        policy: SessionPolicy,
        limiter: RateLimiter,
        limits: RateLimitSettings,
    ) -> Self {
        Self {
            db,
            cache,
            hasher,
            policy,
            limiter,
            limits,
            fill_hook: std::sync::OnceLock::new(),
        }
    }

    /// Test hook: runs after a validation has read a session from PostgreSQL and before it
    /// writes it to Redis, to pause a fill deterministically. Only the first call takes effect.
    #[doc(hidden)]
    pub fn set_fill_hook(&self, hook: FillHook) {
        let _ = self.fill_hook.set(hook);
    }

    pub(super) fn metrics(&self) -> &Metrics {
        self.cache.redis().metrics()
    }

    /// Counts an attempt of `operation` in `buckets`; refused (and counted in metrics) past a
    /// limit.
    pub(super) async fn limit(&self, operation: &str, buckets: &[Bucket]) -> Result<(), AuthError> {
        self.limiter.acquire(buckets).await.map_err(|retry_after| {
            self.metrics()
                .rate_limited
                .with_label_values(&[operation])
                .inc();
            AuthError::RateLimited { retry_after }
        })
    }

    fn ip_bucket(
        kind: &str,
        client: &ClientInfo,
        limit: u32,
        window: std::time::Duration,
    ) -> Option<Bucket> {
        (!client.ip_address.is_empty())
            .then(|| Bucket::new(kind, &client.ip_address, limit, window))
    }

    #[instrument(skip_all)]
    pub async fn register(&self, r: Registration) -> Result<(Uuid, IssuedSession), AuthError> {
        let l = &self.limits;
        let buckets: Vec<Bucket> = Self::ip_bucket(
            "register_ip",
            &r.client,
            l.register_per_ip,
            l.register_window,
        )
        .into_iter()
        .collect();
        self.limit("register", &buckets).await?;
        let password_hash = self.hasher.hash(r.password).await?;
        let user_id = Uuid::now_v7();
        let record = self.policy.start(user_id, r.client);
        let (token, hash) = token::generate();
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
            .create_with_session(&user, &record, hash.as_bytes())
            .await
        {
            Err(StoreError::Conflict { constraint }) if constraint == EMAIL_UNIQUE => {
                return Err(AuthError::EmailTaken);
            }
            other => other?,
        }
        tracing::info!(%user_id, session_id = %record.id, "user registered");
        Ok((user_id, self.issued(token, hash, record).await))
    }

    /// Failed logins count against the email and the client IP; past either limit the
    /// password is not even checked. Success clears the email's count.
    #[instrument(skip_all)]
    pub async fn login(&self, c: Credentials) -> Result<IssuedSession, AuthError> {
        let l = &self.limits;
        let email_key = hex::encode(Sha256::digest(c.email.normalized.as_bytes()));
        let email_bucket =
            Bucket::new("login_email", &email_key, l.login_per_email, l.login_window);
        let mut buckets = vec![email_bucket];
        buckets.extend(Self::ip_bucket(
            "login_ip",
            &c.client,
            l.login_per_ip,
            l.login_window,
        ));
        self.limit("login", &buckets).await?;

        let (user_id, verified_hash) = match self.check_password(&c.email, c.password).await {
            Ok(verified) => verified,
            Err(AuthError::InvalidCredentials) => {
                self.metrics().failed_logins.inc();
                tracing::info!("failed login");
                return Err(AuthError::InvalidCredentials);
            }
            Err(other) => {
                // Not an evaluation (overload, outage): the attempt does not count.
                self.limiter.forgive(&buckets).await;
                return Err(other);
            }
        };
        self.limiter.settle(&buckets[..1], &buckets[1..]).await;

        let record = self.policy.start(user_id, c.client);
        let (token, hash) = token::generate();
        let now = record.created_at;
        // Only if the password checked is still the user's: a ChangePassword that committed while
        // the hash was being verified must not be outlived by a session of the old password.
        let evicted = self
            .db
            .sessions()
            .insert_capped(
                &record,
                hash.as_bytes(),
                &verified_hash,
                self.policy.idle_cutoff(now),
                i64::from(self.policy.max_per_user),
            )
            .await?
            .ok_or(AuthError::InvalidCredentials)?;
        tracing::info!(%user_id, session_id = %record.id, evicted = evicted.len(), "session created");
        self.invalidate(Some("session_cap"), &evicted, now).await;
        Ok(self.issued(token, hash, record).await)
    }

    /// The user's id and the hash that matched, when the password is right (the same cost
    /// whether or not the user exists).
    async fn check_password(
        &self,
        email: &Email,
        password: SecretString,
    ) -> Result<(Uuid, String), AuthError> {
        let (user_id, phc) = self
            .db
            .users()
            .find_credentials(&email.normalized)
            .await?
            .unzip();
        match self.hasher.verify(password, phc.clone()).await {
            Ok(true) => user_id.zip(phc).ok_or(AuthError::InvalidCredentials),
            Ok(false) => Err(AuthError::InvalidCredentials),
            Err(e) => Err(e.into()),
        }
    }

    async fn issued(&self, token: String, hash: TokenHash, record: SessionRecord) -> IssuedSession {
        let view = self.view(record);
        self.metrics().sessions_created.inc();
        self.cache_copy(&hash, &view.record, session::now()).await;
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

    /// Writes a copy to Redis for as long as the session has left (never over a tombstone).
    pub(super) async fn cache_copy(
        &self,
        hash: &TokenHash,
        record: &SessionRecord,
        now: DateTime<Utc>,
    ) {
        if let Some(ttl) = self.policy.time_left(record, now) {
            self.cache.put(hash, record, ttl).await;
        }
    }

    /// The hot path: one Redis GET when cached, no PostgreSQL query unless activity is due to be
    /// recorded (once per touch interval per session). No span of its own: the RPC's span says
    /// enough, and this runs on every request other services serve.
    pub async fn validate(&self, token: &str) -> Result<SessionView, AuthError> {
        let hash = TokenHash::of_token(token).ok_or(AuthError::InvalidSession)?;
        self.validate_hash(&hash).await
    }

    pub(super) async fn validate_hash(&self, hash: &TokenHash) -> Result<SessionView, AuthError> {
        let now = session::now();
        let (record, fill) = match self.cache.get(hash).await {
            Cached::Hit(record) if self.cache.redis().trusted() => (record, false),
            Cached::Revoked => return Err(AuthError::InvalidSession),
            Cached::Miss => (self.load(hash).await?, true),
            Cached::Hit(_) | Cached::Unavailable => (self.load(hash).await?, false),
        };
        if self.policy.is_expired(&record, now) {
            return Err(AuthError::InvalidSession);
        }
        let (record, touched) = self.touch(record, now).await?;
        if fill || touched {
            if fill && let Some(hook) = self.fill_hook.get() {
                hook(record.id).await;
            }
            self.cache_copy(hash, &record, now).await;
        }
        Ok(self.view(record))
    }

    /// The session from PostgreSQL, if it exists and was not revoked.
    async fn load(&self, hash: &TokenHash) -> Result<SessionRecord, AuthError> {
        match self
            .db
            .sessions()
            .find_by_token_hash(hash.as_bytes())
            .await?
        {
            Some(stored) if !stored.revoked => Ok(stored.record),
            _ => Err(AuthError::InvalidSession),
        }
    }

    /// Records activity when due. A session revoked meanwhile is rejected; a PostgreSQL outage
    /// only postpones the write (the session is still valid by its own data).
    async fn touch(
        &self,
        mut record: SessionRecord,
        now: DateTime<Utc>,
    ) -> Result<(SessionRecord, bool), AuthError> {
        if !self.policy.touch_due(&record, now) {
            return Ok((record, false));
        }
        let idle_cutoff = self.policy.idle_cutoff(now);
        match self.db.sessions().touch(record.id, now, idle_cutoff).await {
            Ok(Some(last_seen_at)) => {
                record.last_seen_at = last_seen_at;
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

    /// Revokes the token's session. Unknown or already revoked tokens are fine (idempotent).
    #[instrument(skip_all)]
    pub async fn logout(&self, token: &str) -> Result<(), AuthError> {
        let hash = TokenHash::of_token(token).ok_or(AuthError::InvalidSession)?;
        let now = session::now();
        if let Some(invalidation) = self
            .db
            .sessions()
            .revoke_by_token_hash(hash.as_bytes(), now)
            .await?
        {
            tracing::info!(user_id = %invalidation.user_id, "session revoked");
            self.invalidate(Some("logout"), &[invalidation], now).await;
        }
        Ok(())
    }

    /// Writes the tombstones and forgets the queued invalidations Redis confirmed. `true` when
    /// every one was confirmed. `reason` (absent when re-applying) labels the revocations in
    /// metrics.
    pub(super) async fn invalidate(
        &self,
        reason: Option<&str>,
        invalidations: &[Invalidation],
        now: DateTime<Utc>,
    ) -> bool {
        if let Some(reason) = reason {
            let revoked = self.metrics().sessions_revoked.with_label_values(&[reason]);
            revoked.inc_by(invalidations.len() as u64);
        }
        let mut done = Vec::with_capacity(invalidations.len());
        for invalidation in invalidations {
            if self.cache.bury(invalidation, now).await {
                done.push(invalidation.id);
            }
        }
        let all = done.len() == invalidations.len();
        if !done.is_empty()
            && let Err(error) = self.db.sessions().delete_invalidations(&done).await
        {
            tracing::warn!(%error, "could not clear applied invalidations; they will be re-applied");
        }
        all
    }
}
