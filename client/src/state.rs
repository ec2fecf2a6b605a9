//! What a subscriber knows: the validations it keeps, the floors no fetched validation may go
//! below, and whether it may trust its memory now. Each function is an action of authd's
//! protocol model (`model/`, the `Sub*` actions).
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use crate::{
    clock::{boot_us, us},
    proto::{self as pb, event::Kind},
};

/// SHA-256 of a session token: what the memory is keyed by (the token itself is kept nowhere).
pub type TokenHash = [u8; 32];

/// How long what the stream showed stays a floor: longer than authd's wait horizon (two of the
/// longest leases and the in-flight allowance, about two and a half minutes), after which no
/// authd instance still answers from a copy older than it, plus [`FETCH_BOUND`].
pub const FLOOR: Duration = Duration::from_secs(300);
/// A validation fetched from authd is kept only if it answered within this long.
pub const FETCH_BOUND: Duration = Duration::from_secs(10);

/// Cuts of one user's sessions remembered as floors; past this many, the user's validations
/// are not kept until the floors lapse (answers still come from authd).
const MOST_CUTS: usize = 16;

/// What became of an answer fetched from authd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// Kept in memory.
    Kept,
    /// Not kept (the memory is not trusted, a doubt came since the fetch began, the fetch took
    /// too long), though nothing says it is stale.
    Passed,
    /// The stream already showed it stale: the session revoked, or a newer profile version (an
    /// instance a revoking call still waits for answered from its old copy).
    Stale,
}

/// A validation kept in memory.
struct Entry {
    session: Arc<pb::Session>,
    /// Asked of authd again from then (its touch is due, or its idle deadline near).
    recheck_at: u64,
}

/// A profile kept in memory.
struct ProfileEntry {
    profile: pb::Profile,
    /// Asked of authd again from then.
    recheck_at: u64,
}

/// Taken before a validation is fetched from authd; the answer is kept only if nothing made the
/// memory doubtful meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    epoch: u64,
    at: u64,
}

#[derive(Default)]
struct Floors {
    /// Sessions the stream showed revoked, until when the floor holds.
    revoked: HashMap<String, u64>,
    /// Users whose sessions up to a cutoff the stream showed revoked: (cutoff, kept session,
    /// until).
    cutoffs: HashMap<String, Vec<(prost_types::Timestamp, String, u64)>>,
    /// Users whose profile the stream showed updated: (version, until when the floor holds).
    versions: HashMap<String, (i64, u64)>,
    /// Users with more than [`MOST_CUTS`] cuts: none of their validations is kept until then.
    frozen: HashMap<String, u64>,
    /// The entries kept, by session: (token hash, user, created).
    by_session: HashMap<String, (TokenHash, String, Option<prost_types::Timestamp>)>,
    by_user: HashMap<String, Vec<String>>,
    /// Floors are pruned when this many were added since the last prune.
    added: usize,
}

pub struct State {
    entries: moka::sync::Cache<TokenHash, Arc<Entry>>,
    /// Profiles kept, by user id.
    profiles: moka::sync::Cache<String, Arc<ProfileEntry>>,
    floors: Mutex<Floors>,
    /// Bumped by every doubt: a ticket of an older epoch keeps nothing.
    epoch: AtomicU64,
    /// The current stream's first batch is applied.
    primed: AtomicBool,
    /// The memory is trusted until then (boot clock, µs): the lease's believed end (strict;
    /// bounded mode holds none and sets it to the end of time).
    trusted_until: AtomicU64,
    /// ...and fresh until then: the staleness bound from when the last batch applied was read
    /// at the earliest (when the request it was read after was sent).
    fresh_until: AtomicU64,
    recheck: Duration,
    /// Validations answered from memory.
    hits: AtomicU64,
    /// Profiles answered from memory.
    profile_hits: AtomicU64,
}

impl State {
    pub fn new(max_entries: u64, max_profiles: u64, recheck: Duration) -> Self {
        Self {
            entries: moka::sync::Cache::new(max_entries),
            profiles: moka::sync::Cache::new(max_profiles),
            floors: Mutex::new(Floors::default()),
            epoch: AtomicU64::new(1),
            primed: AtomicBool::new(false),
            trusted_until: AtomicU64::new(0),
            fresh_until: AtomicU64::new(0),
            recheck,
            hits: AtomicU64::new(0),
            profile_hits: AtomicU64::new(0),
        }
    }

    fn floors(&self) -> MutexGuard<'_, Floors> {
        self.floors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the memory may answer now (never on a platform whose clock does not count time
    /// the machine slept: a lease would seem to last through it).
    pub fn trusted(&self) -> bool {
        let now = boot_us();
        crate::clock::COUNTS_STOPPED_TIME
            && self.primed.load(Ordering::Acquire)
            && now < self.trusted_until.load(Ordering::Acquire)
            && now < self.fresh_until.load(Ordering::Acquire)
    }

    /// A validation of `hash` from memory, when trusted and not due for a recheck.
    pub fn lookup(&self, hash: &TokenHash) -> Option<Arc<pb::Session>> {
        if !self.trusted() {
            return None;
        }
        let entry = self.entries.get(hash)?;
        if boot_us() >= entry.recheck_at {
            return None;
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(entry.session.clone())
    }

    /// The profile of `user_id` from memory, when trusted and not due for a recheck.
    pub fn lookup_profile(&self, user_id: &str) -> Option<pb::Profile> {
        if !self.trusted() {
            return None;
        }
        let entry = self.profiles.get(user_id)?;
        if boot_us() >= entry.recheck_at {
            return None;
        }
        self.profile_hits.fetch_add(1, Ordering::Relaxed);
        Some(entry.profile.clone())
    }

    /// Validations answered from memory so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Profiles answered from memory so far.
    pub fn profile_hits(&self) -> u64 {
        self.profile_hits.load(Ordering::Relaxed)
    }

    pub fn ticket(&self) -> Ticket {
        Ticket {
            epoch: self.epoch.load(Ordering::Acquire),
            at: boot_us(),
        }
    }

    /// Whether an answer fetched since `ticket` may be kept now: trusted, no doubt since, and
    /// within [`FETCH_BOUND`].
    fn keepable(&self, ticket: Ticket, now: u64) -> bool {
        let fresh = now.saturating_sub(ticket.at) < us(FETCH_BOUND);
        ticket.epoch == self.epoch.load(Ordering::Acquire) && fresh && self.trusted()
    }

    /// Keeps a validation fetched since `ticket`: never one the stream showed revoked (an authd
    /// instance a revoking call still waits for may answer from its old copy: [`Kept::Stale`]),
    /// and only while [keepable](Self::keepable).
    pub fn keep(&self, ticket: Ticket, hash: TokenHash, session: &pb::Session) -> Kept {
        let mut floors = self.floors();
        let now = boot_us();
        let revoked = floors.revoked.get(&session.session_id);
        if revoked.is_some_and(|until| *until > now)
            || floors
                .cutoffs
                .get(&session.user_id)
                .is_some_and(|cuts| cuts.iter().any(|cut| cut.2 > now && covers(cut, session)))
        {
            return Kept::Stale;
        }
        let frozen = floors.frozen.get(&session.user_id);
        if !self.keepable(ticket, now) || frozen.is_some_and(|until| *until > now) {
            return Kept::Passed;
        }
        let recheck_at = now.saturating_add(us(self.recheck.min(until(session.expires_at))));
        let entry = Arc::new(Entry {
            session: Arc::new(session.clone()),
            recheck_at,
        });
        self.entries.insert(hash, entry);
        let user = session.user_id.clone();
        let indexed = (hash, user.clone(), session.created_at);
        if floors
            .by_session
            .insert(session.session_id.clone(), indexed)
            .is_none()
        {
            floors
                .by_user
                .entry(user)
                .or_default()
                .push(session.session_id.clone());
        }
        // The index is pruned of evicted entries now and then, events or not.
        floors.added += 1;
        if floors.added > 1024 {
            self.prune(&mut floors);
        }
        Kept::Kept
    }

    /// Keeps a profile fetched since `ticket`: never one older than a version the stream
    /// showed ([`Kept::Stale`]) or than the one kept, and only while [keepable](Self::keepable).
    pub fn keep_profile(&self, ticket: Ticket, profile: &pb::Profile) -> Kept {
        let floors = self.floors();
        let now = boot_us();
        let floor = floors.versions.get(&profile.user_id);
        if floor.is_some_and(|(version, until)| *until > now && profile.version < *version) {
            return Kept::Stale;
        }
        if !self.keepable(ticket, now) {
            return Kept::Passed;
        }
        // Two fetches may finish out of order: the newer version stays.
        let kept = self.profiles.get(&profile.user_id);
        if kept.is_some_and(|kept| kept.profile.version > profile.version) {
            return Kept::Passed;
        }
        let entry = Arc::new(ProfileEntry {
            profile: profile.clone(),
            recheck_at: now.saturating_add(us(self.recheck)),
        });
        // Under the floors' lock, as `apply` drops: no newer version's event slips between.
        self.profiles.insert(profile.user_id.clone(), entry);
        Kept::Kept
    }

    /// Applies the events of a batch: what they show is dropped and becomes a floor.
    pub fn apply(&self, events: &[pb::Event]) {
        if events.is_empty() {
            return;
        }
        let mut floors = self.floors();
        let until = boot_us().saturating_add(us(FLOOR));
        for event in events {
            match &event.kind {
                Some(Kind::SessionRevoked(revoked)) => {
                    floors.revoked.insert(revoked.session_id.clone(), until);
                    self.drop_session(&mut floors, &revoked.session_id);
                }
                Some(Kind::SessionsRevoked(all)) => {
                    let Some(cutoff) = all.cutoff else { continue };
                    let cut = (cutoff, all.kept_session_id.clone(), until);
                    let sessions = floors
                        .by_user
                        .get(&all.user_id)
                        .cloned()
                        .unwrap_or_default();
                    for session_id in sessions {
                        let covered =
                            floors
                                .by_session
                                .get(&session_id)
                                .is_some_and(|(_, _, created)| {
                                    session_id != cut.1 && before(*created, cutoff)
                                });
                        if covered {
                            self.drop_session(&mut floors, &session_id);
                        }
                    }
                    let cuts = floors.cutoffs.entry(all.user_id.clone()).or_default();
                    // A later cut keeping the same session covers an earlier one.
                    match cuts.iter_mut().find(|c| c.1 == cut.1) {
                        Some(same) => {
                            if before(Some(same.0), cut.0) {
                                same.0 = cut.0;
                            }
                            same.2 = until;
                        }
                        None => cuts.push(cut),
                    }
                    if cuts.len() > MOST_CUTS {
                        floors.frozen.insert(all.user_id.clone(), until);
                    }
                }
                Some(Kind::ProfileUpdated(updated)) => {
                    let floor = floors
                        .versions
                        .entry(updated.user_id.clone())
                        .or_insert((updated.version, until));
                    *floor = (floor.0.max(updated.version), until);
                    let older = self
                        .profiles
                        .get(&updated.user_id)
                        .is_some_and(|kept| kept.profile.version < updated.version);
                    if older {
                        self.profiles.invalidate(&updated.user_id);
                    }
                }
                // Enabling brings no session back, and disabling comes with the revocation of
                // every session; a deletion, with that and a profile floor above every copy.
                Some(Kind::UserDisabled(_) | Kind::UserEnabled(_) | Kind::UserDeleted(_))
                | None => {}
            }
            floors.added += 1;
        }
        if floors.added > 1024 {
            self.prune(&mut floors);
        }
    }

    fn drop_session(&self, floors: &mut Floors, session_id: &str) {
        if let Some((hash, user, _)) = floors.by_session.remove(session_id) {
            self.entries.invalidate(&hash);
            if let Some(sessions) = floors.by_user.get_mut(&user) {
                sessions.retain(|s| s != session_id);
                if sessions.is_empty() {
                    floors.by_user.remove(&user);
                }
            }
        }
    }

    /// Forgets floors past their time, and index rows of entries the cache evicted.
    fn prune(&self, floors: &mut Floors) {
        let now = boot_us();
        floors.added = 0;
        // Evictions are applied lazily: apply them, so that the index follows.
        self.entries.run_pending_tasks();
        floors.revoked.retain(|_, until| *until > now);
        floors.versions.retain(|_, (_, until)| *until > now);
        floors.frozen.retain(|_, until| *until > now);
        floors.cutoffs.retain(|_, cuts| {
            cuts.retain(|(_, _, until)| *until > now);
            !cuts.is_empty()
        });
        let entries = &self.entries;
        floors
            .by_session
            .retain(|_, (hash, _, _)| entries.contains_key(hash));
        let Floors {
            by_session,
            by_user,
            ..
        } = floors;
        by_user.retain(|_, sessions| {
            sessions.retain(|s| by_session.contains_key(s));
            !sessions.is_empty()
        });
    }

    /// The current stream's first batch is applied: its floors cover the recent past.
    pub fn primed(&self) {
        self.primed.store(true, Ordering::Release);
    }

    /// Trusts the memory until `at` (boot clock, µs), never less than already.
    pub fn trust_until(&self, at: u64) {
        self.trusted_until.fetch_max(at, Ordering::AcqRel);
    }

    /// The memory is fresh until `at` (boot clock, µs), never less than already.
    pub fn fresh_until(&self, at: u64) {
        self.fresh_until.fetch_max(at, Ordering::AcqRel);
    }

    /// Not sure any more that every event arrives: stop trusting, drop every entry (the floors
    /// stay: a stream resumed without a gap keeps them right).
    pub fn doubt(&self) {
        let mut floors = self.floors();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.primed.store(false, Ordering::Release);
        self.trusted_until.store(0, Ordering::Release);
        self.fresh_until.store(0, Ordering::Release);
        self.entries.invalidate_all();
        self.profiles.invalidate_all();
        floors.by_session.clear();
        floors.by_user.clear();
    }

    /// A stream that cannot resume: forget the floors too (the next stream replays the recent
    /// past and sets them again before anything is trusted).
    pub fn reset(&self) {
        self.doubt();
        let mut floors = self.floors();
        floors.revoked.clear();
        floors.cutoffs.clear();
        floors.versions.clear();
        floors.frozen.clear();
    }
}

/// Whether a cut of a user's sessions covers `session`.
fn covers(cut: &(prost_types::Timestamp, String, u64), session: &pb::Session) -> bool {
    cut.1 != session.session_id && before(session.created_at, cut.0)
}

/// Whether `created` is at or before `cutoff` (a missing time is taken to be).
fn before(created: Option<prost_types::Timestamp>, cutoff: prost_types::Timestamp) -> bool {
    created.is_none_or(|c| (c.seconds, c.nanos) <= (cutoff.seconds, cutoff.nanos))
}

/// How long until `at` (wall clock), zero if past or missing.
fn until(at: Option<prost_types::Timestamp>) -> Duration {
    let Some(at) = at.and_then(|t| SystemTime::try_from(t).ok()) else {
        return Duration::ZERO;
    };
    at.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, user: &str, created: i64) -> pb::Session {
        let later = SystemTime::now() + Duration::from_secs(3600);
        pb::Session {
            session_id: id.into(),
            user_id: user.into(),
            created_at: Some(prost_types::Timestamp {
                seconds: created,
                nanos: 0,
            }),
            expires_at: Some(later.into()),
            ..Default::default()
        }
    }

    fn revoked(id: &str) -> pb::Event {
        pb::Event {
            occurred_at: None,
            kind: Some(Kind::SessionRevoked(pb::SessionRevoked {
                session_id: id.into(),
                ..Default::default()
            })),
        }
    }

    fn trusted() -> State {
        let state = State::new(100, 100, Duration::from_secs(60));
        trust(&state, 60_000_000);
        state
    }

    fn trust(state: &State, for_us: u64) {
        state.primed();
        state.trust_until(boot_us() + for_us);
        state.fresh_until(boot_us() + for_us);
    }

    #[test]
    fn a_revocation_drops_the_entry_and_refuses_a_later_fetch_of_it() {
        let state = trusted();
        let ticket = state.ticket();
        assert_eq!(
            state.keep(ticket, [1; 32], &session("a", "u", 10)),
            Kept::Kept
        );
        assert!(state.lookup(&[1; 32]).is_some());
        state.apply(&[revoked("a")]);
        assert!(state.lookup(&[1; 32]).is_none());
        // An instance still waited for answers from its old copy: not kept.
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Stale
        );
    }

    fn profile(user: &str, version: i64) -> pb::Profile {
        pb::Profile {
            user_id: user.into(),
            version,
            ..Default::default()
        }
    }

    fn updated(user: &str, version: i64) -> pb::Event {
        pb::Event {
            occurred_at: None,
            kind: Some(Kind::ProfileUpdated(pb::ProfileUpdated {
                user_id: user.into(),
                version,
            })),
        }
    }

    #[test]
    fn a_profile_update_drops_older_versions_and_refuses_a_later_fetch_of_one() {
        let state = trusted();
        assert_eq!(
            state.keep_profile(state.ticket(), &profile("u", 1)),
            Kept::Kept
        );
        assert_eq!(state.lookup_profile("u").map(|p| p.version), Some(1));
        state.apply(&[updated("u", 2)]);
        assert!(state.lookup_profile("u").is_none());
        // An instance still waited for answers from its old copy: not kept.
        assert_eq!(
            state.keep_profile(state.ticket(), &profile("u", 1)),
            Kept::Stale
        );
        assert_eq!(
            state.keep_profile(state.ticket(), &profile("u", 2)),
            Kept::Kept
        );
        // An event no newer than what is kept leaves it.
        state.apply(&[updated("u", 2)]);
        assert_eq!(state.lookup_profile("u").map(|p| p.version), Some(2));
        // A doubt drops profiles too; the floor stays until a reset.
        state.doubt();
        trust(&state, 60_000_000);
        assert!(state.lookup_profile("u").is_none());
        assert_eq!(
            state.keep_profile(state.ticket(), &profile("u", 1)),
            Kept::Stale
        );
        state.reset();
        trust(&state, 60_000_000);
        assert_eq!(
            state.keep_profile(state.ticket(), &profile("u", 1)),
            Kept::Kept
        );
    }

    fn cut(user: &str, cutoff: i64, kept: &str) -> pb::Event {
        pb::Event {
            occurred_at: None,
            kind: Some(Kind::SessionsRevoked(pb::SessionsRevoked {
                user_id: user.into(),
                cutoff: Some(prost_types::Timestamp {
                    seconds: cutoff,
                    nanos: 0,
                }),
                kept_session_id: kept.into(),
                reason: 0,
            })),
        }
    }

    #[test]
    fn a_profile_fetched_out_of_order_does_not_replace_a_newer_one() {
        let state = trusted();
        let older = state.ticket();
        assert_eq!(
            state.keep_profile(state.ticket(), &profile("u", 2)),
            Kept::Kept
        );
        assert_eq!(state.keep_profile(older, &profile("u", 1)), Kept::Passed);
        assert_eq!(state.lookup_profile("u").map(|p| p.version), Some(2));
    }

    #[test]
    fn many_cuts_of_a_user_stop_keeping_its_validations_but_stay_exact() {
        let state = trusted();
        // The same kept session cut a hundred times is one floor: the user's sessions are
        // still kept.
        for k in 0..100 {
            state.apply(&[cut("u", 10 + k, "kept")]);
        }
        assert_eq!(state.floors().cutoffs["u"].len(), 1);
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 50)),
            Kept::Stale
        );
        assert_eq!(
            state.keep(state.ticket(), [2; 32], &session("b", "u", 500)),
            Kept::Kept
        );
        // Cuts each keeping another session: past the limit, the user's validations pass
        // unkept, and a covered session is still known stale.
        for k in 0..=MOST_CUTS {
            state.apply(&[cut("v", 100, &format!("s{k}"))]);
        }
        assert_eq!(
            state.keep(state.ticket(), [3; 32], &session("c", "v", 50)),
            Kept::Stale
        );
        assert_eq!(
            state.keep(state.ticket(), [4; 32], &session("d", "v", 200)),
            Kept::Passed
        );
    }

    #[test]
    fn the_index_follows_evictions_without_events() {
        let state = State::new(10, 10, Duration::from_secs(60));
        trust(&state, 60_000_000);
        for k in 0..5_000u32 {
            let mut hash = [0; 32];
            hash[..4].copy_from_slice(&k.to_be_bytes());
            let kept = state.keep(state.ticket(), hash, &session(&format!("s{k}"), "u", 10));
            assert_eq!(kept, Kept::Kept);
        }
        let floors = state.floors();
        assert!(
            floors.by_session.len() <= 10 + 1025,
            "{} index rows for 10 entries",
            floors.by_session.len()
        );
    }

    #[test]
    fn a_cut_covers_the_users_sessions_up_to_it_but_the_kept_one() {
        let state = trusted();
        for (hash, id, created) in [(1, "a", 10), (2, "b", 20), (3, "c", 40)] {
            assert_eq!(
                state.keep(state.ticket(), [hash; 32], &session(id, "u", created)),
                Kept::Kept
            );
        }
        state.apply(&[pb::Event {
            occurred_at: None,
            kind: Some(Kind::SessionsRevoked(pb::SessionsRevoked {
                user_id: "u".into(),
                cutoff: Some(prost_types::Timestamp {
                    seconds: 30,
                    nanos: 0,
                }),
                kept_session_id: "b".into(),
                reason: 0,
            })),
        }]);
        let left: Vec<bool> = [1u8, 2, 3]
            .iter()
            .map(|h| state.lookup(&[*h; 32]).is_some())
            .collect();
        assert_eq!(left, [false, true, true]);
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Stale
        );
        assert_eq!(
            state.keep(state.ticket(), [4; 32], &session("d", "u", 50)),
            Kept::Kept
        );
    }

    #[test]
    fn nothing_is_served_or_kept_untrusted_and_a_doubt_voids_tickets() {
        let state = State::new(100, 100, Duration::from_secs(60));
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Passed
        );
        trust(&state, 60_000_000);
        let before = state.ticket();
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Kept
        );
        state.doubt();
        assert!(state.lookup(&[1; 32]).is_none());
        trust(&state, 60_000_000);
        assert_eq!(
            state.keep(before, [2; 32], &session("b", "u", 10)),
            Kept::Passed
        );
        // The floors survive a doubt; a reset forgets them.
        state.apply(&[revoked("c")]);
        state.doubt();
        trust(&state, 60_000_000);
        assert_eq!(
            state.keep(state.ticket(), [3; 32], &session("c", "u", 10)),
            Kept::Stale
        );
        state.reset();
        trust(&state, 60_000_000);
        assert_eq!(
            state.keep(state.ticket(), [3; 32], &session("c", "u", 10)),
            Kept::Kept
        );
    }

    #[test]
    fn a_lease_does_not_keep_stale_memory_trusted() {
        let state = State::new(100, 100, Duration::from_secs(60));
        state.primed();
        // A long lease, but the last batch read long ago (a stalled host, a silent path).
        state.trust_until(u64::MAX);
        state.fresh_until(boot_us() + 20_000);
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Kept
        );
        assert!(state.lookup(&[1; 32]).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(state.lookup(&[1; 32]).is_none(), "stale memory answered");
        // And the other way round: fresh batches, but the lease ran out.
        state.doubt();
        state.primed();
        state.fresh_until(u64::MAX);
        state.trust_until(boot_us() + 20_000);
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Kept
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            state.lookup(&[1; 32]).is_none(),
            "memory answered past its lease"
        );
    }

    #[test]
    fn trust_lapses_when_the_lease_or_heartbeat_is_not_renewed() {
        let state = State::new(100, 100, Duration::from_secs(60));
        trust(&state, 20_000);
        assert_eq!(
            state.keep(state.ticket(), [1; 32], &session("a", "u", 10)),
            Kept::Kept
        );
        assert!(state.lookup(&[1; 32]).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(state.lookup(&[1; 32]).is_none());
    }
}
