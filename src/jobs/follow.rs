//! Following the outbox logs (see `store::outbox`): every instance with Redis makes each logged
//! revocation and profile version visible in its cache, from where its namespace's cursor stands,
//! and trusts its cached copies only for a short while after each complete pass.
//!
//! A pass reads everything logged since the cursor (less the in-flight allowance), in keyset
//! order and in batches until nothing is left — a backlog is never spread over several passes —
//! applies what this instance has not applied yet, and moves the cursor to the time it began
//! reading. Copies are then served until one `SESSION__INVALIDATION_INTERVAL` plus one
//! `REDIS__COMMAND_TIMEOUT` after the pass began: an instance that cannot read the logs stops
//! serving copies rather than serve one revoked meanwhile.
use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::Mutex;

use crate::{
    auth::AuthService,
    cache::Redis,
    profile::ProfileService,
    store::{Cursor, Db, Logged, StoreError},
};

/// Rows read per query.
const BATCH: i64 = 500;
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
    applied: Mutex<Applied>,
}

/// What this instance applied recently (rows inside the in-flight allowance are read by every
/// pass; applying them once is enough).
#[derive(Default)]
struct Applied {
    namespace: String,
    sessions: HashMap<i64, DateTime<Utc>>,
    profiles: HashMap<i64, DateTime<Utc>>,
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
            applied: Mutex::new(Applied::default()),
        }
    }

    /// One pass; `true` when everything logged reached the cache (and copies are trusted anew).
    pub async fn pass(&self) -> Result<bool, StoreError> {
        let Some(namespace) = self.redis.namespace() else {
            return Ok(false);
        };
        let mark = self.redis.failure_mark();
        let started = std::time::Instant::now();
        let read_at = self.auth.clock().now() - CLOCK_MARGIN;
        let mut applied = self.applied.lock().await;
        if applied.namespace != namespace {
            *applied = Applied {
                namespace: namespace.clone(),
                ..Applied::default()
            };
        }
        let outbox = self.db.outbox();
        let cursor = outbox.cursor(&namespace).await?;
        let sessions = self
            .follow(
                cursor.sessions_after,
                &mut applied.sessions,
                |after| outbox.sessions_after(after, BATCH),
                |rows| async move { self.auth.apply(&rows).await },
            )
            .await?;
        let profiles = self
            .follow(
                cursor.profiles_after,
                &mut applied.profiles,
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
        outbox.advance(&namespace, reached).await?;
        self.redis
            .set_log_position(reached.sessions_after - self.in_flight);
        self.redis.trust(mark, started, self.valid_for);
        let horizon = |at: DateTime<Utc>| at - self.in_flight - CLOCK_MARGIN;
        let (s, p) = (
            horizon(reached.sessions_after),
            horizon(reached.profiles_after),
        );
        applied.sessions.retain(|_, at| *at >= s);
        applied.profiles.retain(|_, at| *at >= p);
        Ok(true)
    }

    /// Applies every row of one log after `after` (less the allowance) that this instance has
    /// not applied; the newest row's time when all were confirmed.
    async fn follow<T, R, A>(
        &self,
        after: DateTime<Utc>,
        applied: &mut HashMap<i64, DateTime<Utc>>,
        read: impl Fn((DateTime<Utc>, i64)) -> R,
        apply: impl Fn(Vec<T>) -> A,
    ) -> Result<Option<DateTime<Utc>>, StoreError>
    where
        T: HasId + Clone,
        R: Future<Output = Result<Vec<Logged<T>>, StoreError>>,
        A: Future<Output = bool>,
    {
        let mut position = (after - self.in_flight, 0);
        let mut newest = after;
        loop {
            let rows = read(position).await?;
            let fresh: Vec<T> = rows
                .iter()
                .filter(|r| !applied.contains_key(&r.row.id()))
                .map(|r| r.row.clone())
                .collect();
            if !fresh.is_empty() && !apply(fresh).await {
                return Ok(None);
            }
            for row in &rows {
                applied.insert(row.row.id(), row.created_at);
                newest = newest.max(row.created_at);
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == BATCH => {
                    position = (last.created_at, last.row.id());
                }
                _ => return Ok(Some(newest)),
            }
        }
    }
}

/// Rows of the logs have ids.
pub trait HasId {
    fn id(&self) -> i64;
}

impl HasId for crate::store::Invalidation {
    fn id(&self) -> i64 {
        self.id
    }
}

impl HasId for crate::store::ProfileInvalidation {
    fn id(&self) -> i64 {
        self.id
    }
}
