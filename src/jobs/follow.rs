//! Following the outbox logs (see `store::outbox`): every instance with Redis makes each logged
//! revocation and profile version visible in its cache, and trusts its cached copies only for a
//! short while after each complete pass.
//!
//! Each row is read once per cache, not once per pass (the ids and gaps of `store::follow`). A
//! follower new to a namespace starts from a *floor*: the id of the newest row logged well before
//! its namespace's cursor (less the allowance), all of whose predecessors are settled and applied —
//! so its first pass reads what the time-based cursor promised, and nothing older.
//!
//! Rows are written to Redis unless this cache took them already: from this instance's own
//! revoking calls, or from another instance's announcement (see `cache::Announcement`); what the
//! follower writes itself it announces in turn. Its in-process copies it drops for every row it
//! reads, whoever wrote the row. The cursor moves to the time a pass began reading; copies are then
//! served until one `SESSION__INVALIDATION_INTERVAL` plus one `REDIS__COMMAND_TIMEOUT` after the
//! pass began: an instance that cannot read the logs stops serving copies rather than serve one
//! revoked meanwhile.
use std::{sync::Arc, time::Duration, time::Instant};

use chrono::{DateTime, TimeDelta, Utc};

use crate::{
    auth::AuthService,
    cache::{Announcement, Log, Redis},
    local::LocalCache,
    profile::ProfileService,
    store::{
        Cursor, Db, StoreError,
        follow::{BATCH, Ids, follow_ids},
    },
};

/// The fleet clock's error is well below this: the time a pass began reading, less this, is
/// certainly not after PostgreSQL's time at the read.
const CLOCK_MARGIN: TimeDelta = TimeDelta::seconds(1);

/// A follower announces a batch's writes only up to this many rows (see [`Follower::pass`]).
const ANNOUNCE_MOST: usize = 50;

pub struct Follower {
    pub auth: Arc<AuthService>,
    pub profiles: Arc<ProfileService>,
    pub local: LocalCache,
    pub redis: Redis,
    pub db: Arc<Db>,
    /// See `store::in_flight`.
    pub in_flight: TimeDelta,
    /// How long after a complete pass began copies are served.
    pub valid_for: Duration,
    /// One pass at a time; where it stands.
    running: tokio::sync::Mutex<Progress>,
}

/// A follower's memory between passes.
#[derive(Default)]
struct Progress {
    /// When the cursor was last written.
    cursor_written: Option<Instant>,
    /// Where it stands in its namespace (`None` before a first pass in it).
    reading: Option<Reading>,
}

#[derive(Clone)]
struct Reading {
    namespace: String,
    /// The PostgreSQL history the ids were read in (a promoted standby that missed commits
    /// hands out their ids again: a follower starts over from a floor in a new history).
    history: String,
    cursor: Cursor,
    sessions: Ids,
    profiles: Ids,
}

impl Follower {
    pub fn new(
        auth: Arc<AuthService>,
        profiles: Arc<ProfileService>,
        local: LocalCache,
        redis: Redis,
        db: Arc<Db>,
        in_flight: TimeDelta,
        valid_for: Duration,
    ) -> Self {
        Self {
            redis,
            auth,
            profiles,
            local,
            db,
            in_flight,
            valid_for,
            running: tokio::sync::Mutex::new(Progress::default()),
        }
    }

    /// One pass; `true` when everything logged reached the cache (and copies are trusted anew).
    pub async fn pass(&self) -> Result<bool, StoreError> {
        let mut progress = self.running.lock().await;
        let Some(namespace) = self.redis.namespace() else {
            return Ok(false);
        };
        let mark = self.redis.failure_mark();
        let started = Instant::now();
        let read_at = self.auth.clock().now() - CLOCK_MARGIN;
        let outbox = self.db.outbox();
        // Not while a reconnection is not yet looked at: what this pass writes might reach
        // servers of another history than its namespace's.
        if !self.redis.settled(namespace.stamp) {
            return Ok(false);
        }
        let history = self.db.history_key();
        let highs = outbox.highs().await?;
        let reading = match progress.reading.take() {
            Some(r)
                if r.namespace == namespace.name
                    && r.history == history
                    && r.sessions.top <= highs.0
                    && r.profiles.top <= highs.1 =>
            {
                r
            }
            previous => {
                if previous.is_some_and(|r| r.namespace == namespace.name) {
                    tracing::warn!(
                        "the outbox logs' ids went back (a restored database?): following them \
                         again from a floor"
                    );
                }
                self.start(&namespace.name, namespace.generation, read_at)
                    .await?
            }
        };
        let now = read_at + CLOCK_MARGIN;
        // Each batch's writes are announced as soon as they are made: followers racing over
        // rows nobody announced (the previous release's, a revoker's failed write) stop early.
        // Not a backlog's (a new generation's window): every follower reads it at once anyway,
        // and its announcements, delivered to every instance, could overflow their buffers.
        let read = async {
            let sessions = follow_ids(
                &reading.sessions,
                highs.0,
                self.in_flight,
                Some(now),
                |above| outbox.sessions_above(above, BATCH),
                |ranges| async move { outbox.sessions_within(&ranges).await },
                |rows| async move { self.announce(self.auth.apply(&rows).await).await },
            );
            let sessions = sessions.await?;
            let profiles = follow_ids(
                &reading.profiles,
                highs.1,
                self.in_flight,
                Some(now),
                |above| outbox.profiles_above(above, BATCH),
                |ranges| async move { outbox.profiles_within(&ranges).await },
                |rows| async move { self.announce(self.profiles.apply(&rows).await).await },
            );
            Ok::<_, StoreError>((sessions, profiles.await?))
        };
        let (sessions, profiles) = match read.await {
            Ok(read) => read,
            Err(error) => {
                // Where it stood is still right: the next pass goes on from there.
                progress.reading = Some(reading);
                return Err(error);
            }
        };
        let (Some(sessions), Some(profiles)) = (sessions, profiles) else {
            // Read again next pass (what was written is recorded, and skipped then).
            progress.reading = Some(reading);
            return Ok(false);
        };
        let reached = Cursor {
            sessions_after: reading.cursor.sessions_after.max(read_at),
            profiles_after: reading.cursor.profiles_after.max(read_at),
        };
        progress.reading = Some(Reading {
            namespace: namespace.name.clone(),
            history: reading.history.clone(),
            cursor: reached,
            sessions,
            profiles,
        });
        // The same at the end: the cursor moves, and copies are trusted, only for a pass whose
        // writes all went to the servers of its generation.
        if !self.redis.settled(namespace.stamp) {
            progress.reading = None;
            return Ok(false);
        }
        if progress
            .cursor_written
            .is_none_or(|at| at.elapsed() >= CURSOR_REFRESH)
        {
            outbox.advance(&namespace.name, reached).await?;
            progress.cursor_written = Some(Instant::now());
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

    /// Announces what one batch wrote, unless it is a backlog's (more than [`ANNOUNCE_MOST`]
    /// rows); whether the whole batch reached the cache.
    async fn announce(&self, (all, announcement): (bool, Announcement)) -> bool {
        if announcement.len() <= ANNOUNCE_MOST {
            self.local.announce(announcement).await;
        }
        all
    }

    /// Where a follower new to `namespace` starts: its cursor, and in each log the floor below
    /// which every row has reached the namespace (see the module comment). Logged before the
    /// cursor less the in-flight allowance means applied; the floor is taken a second (the
    /// clock's margin, and more than an id and its time ever lie apart) before the earlier of that
    /// and the allowance before now, so that its predecessors are settled too.
    async fn start(
        &self,
        namespace: &str,
        generation: u64,
        read_at: DateTime<Utc>,
    ) -> Result<Reading, StoreError> {
        let outbox = self.db.outbox();
        let cursor = outbox.cursor(namespace, generation).await?;
        let before = |after: DateTime<Utc>| after.min(read_at) - self.in_flight - CLOCK_MARGIN;
        let sessions = outbox.floor(false, before(cursor.sessions_after)).await?;
        let profiles = outbox.floor(true, before(cursor.profiles_after)).await?;
        let ids = |top| Ids {
            top,
            gaps: Vec::new(),
        };
        Ok(Reading {
            namespace: namespace.to_owned(),
            history: self.db.history_key(),
            cursor,
            sessions: ids(sessions),
            profiles: ids(profiles),
        })
    }
}

/// The cursor is written at most this often: it only bounds what a follower new to the
/// namespace reads first (once), and writing it on every pass of every instance would cost the
/// database work that grows with the fleet.
const CURSOR_REFRESH: Duration = Duration::from_secs(10);
