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
use sha2::{Digest, Sha256};
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, FillHook,
    input::Email,
    password::PasswordHasher,
    session::{ClientInfo, SessionPolicy, SessionRecord},
    token::{self, TokenHash},
};
use crate::{
    cache::{Bucket, Cached, Lease, RateLimiter, SessionStore},
    clock::Clock,
    config::RateLimitSettings,
    metrics::Metrics,
    store::{Db, EMAIL_UNIQUE, Invalidation, NewSession, NewUser, Revocation, StoreError},
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
    pub(super) clock: Arc<Clock>,
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
    pub clock: Arc<Clock>,
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
            clock,
        } = parts;
        Self {
            db,
            cache,
            hasher,
            policy,
            limiter,
            limits,
            clock,
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
        let record = self.policy.start(user_id, r.client, self.clock.now());
        let (token, hash) = token::generate();
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
            .create_with_session(&user, &record, hash.as_bytes())
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

        let record = self.policy.start(user_id, c.client, self.clock.now());
        let (token, hash) = token::generate();
        let lease = self.cache.lease(&hash).await;
        // Only if the password checked is still the user's: a ChangePassword that committed while
        // the hash was being verified must not be outlived by a session of the old password.
        let session = NewSession {
            record: &record,
            token_hash: hash.as_bytes(),
            verified_hash: &verified_hash,
            max_per_user: i64::from(self.policy.max_per_user),
        };
        let evicted = self
            .db
            .sessions()
            .insert_capped(&session, self.policy.idle_timeout)
            .await?
            .ok_or(AuthError::InvalidCredentials)?;
        tracing::info!(%user_id, session_id = %record.id, evicted = evicted.revoked, "session created");
        self.invalidate(Some("session_cap"), &evicted).await;
        Ok(self.issued(token, hash, record, lease).await)
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
        let hash = TokenHash::of_token(token).ok_or(AuthError::InvalidSession)?;
        self.validate_hash(&hash).await
    }

    pub(super) async fn validate_hash(&self, hash: &TokenHash) -> Result<SessionView, AuthError> {
        let (record, lease, from_db) = match self.cache.get(hash).await {
            Cached::Hit(record) => (record, None, false),
            Cached::Revoked => return Err(AuthError::InvalidSession),
            // The lease is taken before PostgreSQL is read: whatever revokes the session, or
            // flushes Redis, after this point makes the fill a no-op.
            Cached::Miss => {
                let lease = self.cache.lease(hash).await;
                (self.load(hash).await?, lease, true)
            }
            Cached::Unavailable => (self.load(hash).await?, None, true),
        };
        if self.policy.is_expired(&record, self.clock.now()) {
            return Err(AuthError::InvalidSession);
        }
        let (record, touched) = self.touch(record).await?;
        if from_db && let Some(hook) = self.fill_hook.get() {
            hook(record.id).await;
        }
        match lease {
            Some(lease) => self.fill(lease, hash, &record).await,
            None if touched => self.refresh_copy(hash, &record).await,
            None => {}
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
    async fn touch(&self, mut record: SessionRecord) -> Result<(SessionRecord, bool), AuthError> {
        if !self.policy.touch_due(&record, self.clock.now()) {
            return Ok((record, false));
        }
        let idle = self.policy.idle_timeout;
        match self.db.sessions().touch(record.id, idle).await {
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

    /// Revokes the token's session. Unknown or already revoked tokens are fine (idempotent), and
    /// a repeated call re-applies the tombstone an earlier attempt may not have written.
    #[instrument(skip_all)]
    pub async fn logout(&self, token: &str) -> Result<(), AuthError> {
        let hash = TokenHash::of_token(token).ok_or(AuthError::InvalidSession)?;
        let revocation = self
            .db
            .sessions()
            .revoke_by_token_hash(hash.as_bytes(), self.policy.idle_timeout)
            .await?;
        if revocation.revoked > 0 {
            tracing::info!("session revoked");
        }
        self.invalidate(Some("logout"), &revocation).await;
        Ok(())
    }

    /// Writes the tombstones of everything `revocation` left queued and forgets the queued
    /// invalidations Redis confirmed. `true` when every one was confirmed. `reason` (absent when
    /// re-applying) labels the new revocations in metrics.
    pub(super) async fn invalidate(&self, reason: Option<&str>, revocation: &Revocation) -> bool {
        if let Some(reason) = reason {
            let revoked = self.metrics().sessions_revoked.with_label_values(&[reason]);
            revoked.inc_by(revocation.revoked as u64);
        }
        self.apply(&revocation.pending).await
    }

    /// Writes these tombstones (concurrently) and deletes the queued invalidations Redis
    /// confirmed; `true` when all were.
    pub(super) async fn apply(&self, pending: &[Invalidation]) -> bool {
        if pending.is_empty() {
            return true;
        }
        let now = self.clock.now();
        let confirmed = futures::future::join_all(pending.iter().map(|invalidation| async move {
            let Some(hash) = TokenHash::from_bytes(&invalidation.token_hash) else {
                tracing::error!(
                    id = invalidation.id,
                    "invalidation with a malformed token hash"
                );
                return Some(invalidation.id);
            };
            let confirmed = match (invalidation.expires_at - now).to_std() {
                Ok(ttl) if !ttl.is_zero() => {
                    self.cache.bury(&hash, &invalidation.user_id, ttl).await
                }
                // Expired anyway: no copy can outlive it, and none would be accepted.
                _ => true,
            };
            confirmed.then_some(invalidation.id)
        }))
        .await;
        let done: Vec<i64> = confirmed.into_iter().flatten().collect();
        let all = done.len() == pending.len();
        if !done.is_empty()
            && let Err(error) = self.db.outbox().confirm_sessions(&done).await
        {
            tracing::warn!(%error, "could not clear applied invalidations; they will be re-applied");
        }
        all
    }
}
