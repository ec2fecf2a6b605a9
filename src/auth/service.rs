//! The AuthService rules: registration, login, validation and logout, with PostgreSQL as the
//! source of truth and Redis as the hot copy.
//!
//! Consistency: PostgreSQL commits first, Redis follows. A revocation is queued in PostgreSQL in
//! the same statement that revokes (see `store::sessions`), so a failed Redis step is retried by
//! [`AuthService::drain_invalidations`] on any instance; until a drain pass succeeds after a Redis
//! failure, this instance does not trust cached copies.
use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError,
    input::Email,
    password::PasswordHasher,
    session::{self, ClientInfo, SessionPolicy, SessionRecord},
    token::{self, TokenHash},
};
use crate::{
    cache::{Cached, SessionStore},
    store::{Db, EMAIL_UNIQUE, Invalidation, NewUser, StoreError},
};

/// At most this many queued invalidations are applied per drain pass.
const DRAIN_BATCH: i64 = 500;

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
    db: Arc<Db>,
    cache: SessionStore,
    hasher: PasswordHasher,
    policy: SessionPolicy,
}

impl AuthService {
    pub fn new(
        db: Arc<Db>,
        cache: SessionStore,
        hasher: PasswordHasher,
        policy: SessionPolicy,
    ) -> Self {
        Self {
            db,
            cache,
            hasher,
            policy,
        }
    }

    #[instrument(skip_all)]
    pub async fn register(&self, r: Registration) -> Result<(Uuid, IssuedSession), AuthError> {
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

    #[instrument(skip_all)]
    pub async fn login(&self, c: Credentials) -> Result<IssuedSession, AuthError> {
        let found = self
            .db
            .users()
            .find_credentials(&c.email.normalized)
            .await?;
        let (user_id, phc) = found.unzip();
        if !self.hasher.verify(c.password, phc).await? {
            return Err(AuthError::InvalidCredentials);
        }
        let user_id = user_id.ok_or(AuthError::InvalidCredentials)?;
        let record = self.policy.start(user_id, c.client);
        let (token, hash) = token::generate();
        self.db.sessions().insert(&record, hash.as_bytes()).await?;
        tracing::info!(%user_id, session_id = %record.id, "session created");
        Ok(self.issued(token, hash, record).await)
    }

    async fn issued(&self, token: String, hash: TokenHash, record: SessionRecord) -> IssuedSession {
        let view = self.view(record);
        if let Some(ttl) = self.policy.time_left(&view.record, session::now()) {
            self.cache.put(&hash, &view.record, ttl).await;
        }
        IssuedSession {
            token: SecretString::from(token),
            session: view,
        }
    }

    fn view(&self, record: SessionRecord) -> SessionView {
        SessionView {
            expires_at: self.policy.expires_at(&record),
            record,
        }
    }

    /// The hot path: one Redis GET when cached, no PostgreSQL query unless activity is due to be
    /// recorded (once per touch interval per session).
    #[instrument(skip_all)]
    pub async fn validate(&self, token: &str) -> Result<SessionView, AuthError> {
        let hash = TokenHash::of_token(token).ok_or(AuthError::InvalidSession)?;
        let now = session::now();
        let (record, fill) = match self.cache.get(&hash).await {
            Cached::Hit(record) if self.cache.redis().trusted() => (record, false),
            Cached::Revoked => return Err(AuthError::InvalidSession),
            Cached::Miss => (self.load(&hash).await?, true),
            Cached::Hit(_) | Cached::Unavailable => (self.load(&hash).await?, false),
        };
        if self.policy.is_expired(&record, now) {
            return Err(AuthError::InvalidSession);
        }
        let (record, touched) = self.touch(record, now).await?;
        if (fill || touched)
            && let Some(ttl) = self.policy.time_left(&record, now)
        {
            self.cache.put(&hash, &record, ttl).await;
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
        match self.db.sessions().touch(record.id, now).await {
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
            self.invalidate(&[invalidation], now).await;
        }
        Ok(())
    }

    /// Writes the tombstones and forgets the queued invalidations Redis confirmed.
    async fn invalidate(&self, invalidations: &[Invalidation], now: DateTime<Utc>) -> bool {
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

    /// One pass over the invalidations queued by any instance. When everything queued has
    /// reached Redis, cached copies are trusted again.
    pub async fn drain_invalidations(&self) -> Result<(), StoreError> {
        let mark = self.cache.redis().failure_mark();
        let now = session::now();
        let pending = self
            .db
            .sessions()
            .pending_invalidations(DRAIN_BATCH)
            .await?;
        let complete = self.invalidate(&pending, now).await;
        if complete && (pending.len() as i64) < DRAIN_BATCH {
            self.cache.redis().trust(mark);
        }
        Ok(())
    }
}
