//! Following the outbox logs (see `store::outbox`): every instance with Redis makes each logged
//! revocation and profile version visible in its cache, from where its namespace's cursor stands,
//! and trusts its cached copies only for a short while after each complete pass.
//!
//! A pass reads everything logged since the cursor (less the in-flight allowance), in keyset
//! order and in batches until nothing is left — a backlog is never spread over several passes —
//! applies what this cache has not taken yet, and moves the cursor to the time it began reading.
//! Copies are then served until one `SESSION__INVALIDATION_INTERVAL` plus one
//! `REDIS__COMMAND_TIMEOUT` after the pass began: an instance that cannot read the logs stops
//! serving copies rather than serve one revoked meanwhile.
use std::{sync::Arc, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};

use crate::{
    auth::AuthService,
    cache::{Log, Redis},
    profile::ProfileService,
    store::{Cursor, Db, Invalidation, ProfileInvalidation, StoreError},
};

/// Rows read per query.
pub const BATCH: i64 = 500;
/// The fleet clock's error is well below this: the time a pass began reading, less this, is
/// certainly not after PostgreSQL's time at the read.
const CLOCK_MARGIN: TimeDelta = TimeDelta::seconds(1);

pub struct Follower {
    pub auth: Arc<AuthService>,
    pub profiles: Arc<ProfileService>,
    pub redis: Redis,
    pub db: Arc<Db>,
    /// See `store::in_flight`.
    pub in_flight: TimeDelta,
    /// How long after a complete pass began copies are served.
    pub valid_for: Duration,
    /// One pass at a time; when the cursor was last written.
    running: tokio::sync::Mutex<Option<std::time::Instant>>,
}

/// A cursor with nothing new to record is written at most this often (it only shortens what a
/// pass re-reads).
const CURSOR_REFRESH: Duration = Duration::from_secs(60);

/// A row of either log.
pub trait Row: Clone {
    fn position(&self) -> (DateTime<Utc>, i64);
}

impl Row for Invalidation {
    fn position(&self) -> (DateTime<Utc>, i64) {
        (self.created_at, self.id)
    }
}

impl Row for ProfileInvalidation {
    fn position(&self) -> (DateTime<Utc>, i64) {
        (self.created_at, self.id)
    }
}

impl Follower {
    pub fn new(
        auth: Arc<AuthService>,
        profiles: Arc<ProfileService>,
        redis: Redis,
        db: Arc<Db>,
        in_flight: TimeDelta,
        valid_for: Duration,
    ) -> Self {
        Self {
            auth,
            profiles,
            redis,
            db,
            in_flight,
            valid_for,
            running: tokio::sync::Mutex::new(None),
        }
    }

    /// One pass; `true` when everything logged reached the cache (and copies are trusted anew).
    pub async fn pass(&self) -> Result<bool, StoreError> {
        let mut last_written = self.running.lock().await;
        let Some(namespace) = self.redis.namespace() else {
            return Ok(false);
        };
        let mark = self.redis.failure_mark();
        let started = std::time::Instant::now();
        let read_at = self.auth.clock().now() - CLOCK_MARGIN;
        let outbox = self.db.outbox();
        // Not while a reconnection is not yet looked at: what this pass writes might reach
        // servers of another history than its namespace's.
        if !self.redis.settled(namespace.stamp) {
            return Ok(false);
        }
        let cursor = outbox.cursor(&namespace.name, namespace.generation).await?;
        let sessions = follow_log(
            cursor.sessions_after,
            self.in_flight,
            |after| outbox.sessions_after(after, BATCH),
            |rows| async move { self.auth.apply(&rows).await },
        )
        .await?;
        let profiles = follow_log(
            cursor.profiles_after,
            self.in_flight,
            |after| outbox.profiles_after(after, BATCH),
            |rows| async move { self.profiles.apply(&rows).await },
        )
        .await?;
        let (Some(sessions), Some(profiles)) = (sessions, profiles) else {
            return Ok(false);
        };
        let reached = Cursor {
            sessions_after: sessions.max(read_at),
            profiles_after: profiles.max(read_at),
        };
        // The same at the end: the cursor moves, and copies are trusted, only for a pass whose
        // writes all went to the servers of its generation.
        if !self.redis.settled(namespace.stamp) {
            return Ok(false);
        }
        let moved = sessions > cursor.sessions_after || profiles > cursor.profiles_after;
        if moved || last_written.is_none_or(|at| at.elapsed() >= CURSOR_REFRESH) {
            outbox.advance(&namespace.name, reached).await?;
            *last_written = Some(std::time::Instant::now());
        }
        self.redis
            .set_log_position(reached.sessions_after - self.in_flight);
        if !self.redis.trust(&namespace, mark, started, self.valid_for) {
            return Ok(false);
        }
        let horizon = |at: DateTime<Utc>| at - self.in_flight - CLOCK_MARGIN;
        self.redis
            .prune_applied(Log::Sessions, horizon(reached.sessions_after));
        self.redis
            .prune_applied(Log::Profiles, horizon(reached.profiles_after));
        Ok(true)
    }
}

/// Applies every row of one log after `after` (less `in_flight`, see `store::in_flight`), in
/// keyset order and in batches until nothing is left; the newest row's time when all were
/// applied (`apply` said so), `None` when one batch was not.
pub async fn follow_log<T, R, A>(
    after: DateTime<Utc>,
    in_flight: TimeDelta,
    read: impl Fn((DateTime<Utc>, i64)) -> R,
    apply: impl Fn(Vec<T>) -> A,
) -> Result<Option<DateTime<Utc>>, StoreError>
where
    T: Row,
    R: Future<Output = Result<Vec<T>, StoreError>>,
    A: Future<Output = bool>,
{
    let mut position = (after - in_flight, 0);
    let mut newest = after;
    loop {
        let rows = read(position).await?;
        let Some(last) = rows.last().map(Row::position) else {
            return Ok(Some(newest));
        };
        let full = rows.len() as i64 == BATCH;
        if !apply(rows).await {
            return Ok(None);
        }
        newest = newest.max(last.0);
        if !full {
            return Ok(Some(newest));
        }
        position = last;
    }
}
