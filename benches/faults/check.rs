//! The checker: reads the whole history after the run and lists every violation of the
//! guarantees, each with the operations that prove it.
use std::collections::HashMap;

use serde::Serialize;

use crate::history::{Fault, Kind, Op};

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub rule: &'static str,
    pub what: String,
    /// Ids of the operations that prove it.
    pub ops: Vec<usize>,
}

/// README's one bound: when the instance that made a change could not write it to Redis, other
/// instances may serve the old state for at most `SESSION__INVALIDATION_INTERVAL` (1 s) +
/// `REDIS__COMMAND_TIMEOUT` (250 ms) after the change returned. (Its own reads never do.)
pub const STALE_BOUND_US: u64 = 1_250_000;

/// How long a Redis fault's effect on an instance outlasts the fault: its connection comes back
/// after at most `REDIS__RECONNECT_MAX_DELAY` (2 s), and its copies are trusted again once the
/// generation is re-established (`REDIS__CHECK_INTERVAL`, 1 s) — writes fail meanwhile, and
/// README's bound then applies. The same after the writer itself restarted.
pub const REDIS_RECOVERY_US: u64 = 3_500_000;

/// Whether `reader` is excused for answering the state before `writer`'s change, which
/// returned at `at`: a bounded caller within its stale bound; an instance other than the
/// writer's (or a strict caller following one — on a miss it asks that instance) within
/// [`STALE_BOUND_US`] when the writer's Redis write may have failed.
fn excused(reader: &Op, writer: &Op, at: u64, faults: &[Fault]) -> bool {
    if reader.local == Some("bounded") && reader.start_us <= at + BOUNDED_STALE_US {
        return true;
    }
    reader.instance != writer.instance
        && reader.start_us <= at + STALE_BOUND_US
        && redis_write_may_have_failed(writer, faults)
}

/// A bounded caller's `stale_after` (the run's: 1 s): it answers a change from memory at most
/// this long after the change committed.
pub const BOUNDED_STALE_US: u64 = 1_000_000;

/// Whether `writer`'s Redis writes may have failed: a Redis fault (on every instance, or on that
/// instance's link), or a restart of the writer, overlapped it or had just ended.
fn redis_write_may_have_failed(writer: &Op, faults: &[Fault]) -> bool {
    faults.iter().any(|f| {
        let everyone = !matches!(f.kind.as_str(), "redis-cut" | "redis-slow");
        let this_instance =
            f.stops_instance() == Some(writer.instance) || f.target == writer.instance.to_string();
        let relevant = (f.on_redis() && (everyone || this_instance))
            || (f.stops_instance().is_some() && this_instance);
        relevant && overlaps(writer, f.start_us, f.end_us + REDIS_RECOVERY_US)
    })
}

/// How long after a PostgreSQL fault (or an instance's restart) UNAVAILABLE is still expected:
/// pooled connections notice the outage and reconnect within the query timeout (2 s) plus one
/// acquire timeout, and a restarted instance needs a moment before it listens.
pub const RECOVERY_US: u64 = 5_000_000;

fn overlaps(op: &Op, start: u64, end: u64) -> bool {
    op.start_us <= end && op.end_us >= start
}

/// Calls that present a session token and succeed only if it is valid.
fn authenticated(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Validate
            | Kind::ListSessions
            | Kind::UpdateProfile
            | Kind::RevokeAll
            | Kind::RevokeSession
            | Kind::ChangePassword
            | Kind::Logout
    )
}

/// 1. No session-authenticated call that started after a revocation covering its session
///    returned OK succeeded — on any instance. (Logout is idempotent, so it is not evidence.)
///    Within [`STALE_BOUND_US`] of a revocation whose Redis write may have failed, only other
///    instances are excused.
pub fn revoked_sessions_stay_revoked(ops: &[Op], faults: &[Fault]) -> Vec<Violation> {
    // Per session: when the first revocation covering it returned, by which op, and from when
    // every instance must refuse it.
    let mut revoked_at: HashMap<&str, (u64, usize)> = HashMap::new();
    for op in ops.iter().filter(|o| o.outcome == "Ok") {
        for session in &op.covers {
            let entry = revoked_at.entry(session).or_insert((op.end_us, op.id));
            if op.end_us < entry.0 {
                *entry = (op.end_us, op.id);
            }
        }
    }
    ops.iter()
        .filter(|o| o.outcome == "Ok" && authenticated(o.kind) && o.kind != Kind::Logout)
        .filter_map(|o| {
            let session = o.session.as_deref()?;
            let (at, by) = revoked_at.get(session)?;
            (o.start_us > *at && !excused(o, &ops[*by], *at, faults)).then(|| Violation {
                rule: "revoked sessions stay revoked",
                what: format!(
                    "{:?} on instance {} accepted session {session}, revoked by op {by} {} µs before it started",
                    o.kind,
                    o.instance,
                    o.start_us - at
                ),
                ops: vec![*by, o.id],
            })
        })
        .collect()
}

/// 2. No profile read that started after an update returned version N saw a version below N.
///    Within [`STALE_BOUND_US`] of an update whose Redis write may have failed, only other
///    instances are excused.
pub fn profiles_never_go_back(ops: &[Op], faults: &[Fault]) -> Vec<Violation> {
    // Per user, the updates acknowledged, by end time.
    let mut written: HashMap<usize, Vec<(u64, i64, usize)>> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::UpdateProfile && o.outcome == "Ok")
    {
        for (user, version) in &op.versions {
            written
                .entry(*user)
                .or_default()
                .push((op.end_us, *version, op.id));
        }
    }
    let mut violations = Vec::new();
    for read in ops.iter().filter(|o| {
        matches!(o.kind, Kind::GetProfile | Kind::BatchGetProfiles) && o.outcome == "Ok"
    }) {
        for (user, seen) in &read.versions {
            let newest = written
                .get(user)
                .into_iter()
                .flatten()
                .filter(|(end, _, by)| {
                    *end < read.start_us && !excused(read, &ops[*by], *end, faults)
                })
                .max_by_key(|(_, version, _)| *version);
            if let Some((_, version, by)) = newest
                && seen < version
            {
                violations.push(Violation {
                    rule: "profiles never go back",
                    what: format!(
                        "read on instance {} saw version {seen} of user {user} after op {by} returned version {version}",
                        read.instance
                    ),
                    ops: vec![*by, read.id],
                });
            }
        }
    }
    violations
}

/// 2b. No profile read or login that started after a deletion of the account returned OK
///    succeeded — excused as profile reads are (a bounded caller, or another instance within
///    [`STALE_BOUND_US`] of a deletion whose Redis write may have failed).
pub fn deleted_accounts_stay_deleted(ops: &[Op], faults: &[Fault]) -> Vec<Violation> {
    let mut deleted: HashMap<usize, (u64, usize)> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::DeleteUser && o.outcome == "Ok")
    {
        let entry = deleted.entry(op.user).or_insert((op.end_us, op.id));
        if op.end_us < entry.0 {
            *entry = (op.end_us, op.id);
        }
    }
    ops.iter()
        .filter(|o| o.outcome == "Ok")
        .filter_map(|o| {
            let users: Vec<usize> = match o.kind {
                Kind::GetProfile | Kind::BatchGetProfiles => {
                    o.versions.iter().map(|(u, _)| *u).collect()
                }
                Kind::Login => vec![o.user],
                _ => return None,
            };
            users.into_iter().find_map(|user| {
                let (at, by) = deleted.get(&user)?;
                (o.start_us > *at && !excused(o, &ops[*by], *at, faults)).then(|| Violation {
                    rule: "deleted accounts stay deleted",
                    what: format!(
                        "{:?} on instance {} found user {user}, deleted by op {by} {} µs before it started",
                        o.kind,
                        o.instance,
                        o.start_us - at
                    ),
                    ops: vec![*by, o.id],
                })
            })
        })
        .collect()
}

/// 4. No INTERNAL, ever; UNAVAILABLE (or no answer) only while PostgreSQL was faulted or the
///    instance was down, plus [`RECOVERY_US`].
pub fn errors_only_when_expected(ops: &[Op], faults: &[Fault]) -> Vec<Violation> {
    let excused = |op: &Op| {
        faults.iter().any(|f| {
            let window = (f.start_us, f.end_us + RECOVERY_US);
            (f.on_postgres() || f.stops_instance() == Some(op.instance))
                && overlaps(op, window.0, window.1)
        })
    };
    ops.iter()
        .filter_map(|o| {
            let bad = match o.outcome.as_str() {
                "Internal" | "Unknown" | "DataLoss" => true,
                "Unavailable" | "Transport" | "DeadlineExceeded" | "Cancelled" => !excused(o),
                _ => false,
            };
            bad.then(|| Violation {
                rule: "no unexpected errors",
                what: format!(
                    "{:?} on instance {} answered {}",
                    o.kind, o.instance, o.outcome
                ),
                ops: vec![o.id],
            })
        })
        .collect()
}

/// 5. Wrong passwords evaluated per account never exceed `limit` in any `window` without a Redis
///    fault. In a window with one, the shared count may be unreachable (each instance then
///    counts on its own — README "Rate limits") or lost: each loss of Redis data (a restart,
///    FLUSHALL, a failover) starts the shared count over, and each restart of an instance its
///    own count. At most `limit` × (1 + instances + losses and restarts in the window).
pub fn guesses_stay_within_the_limit(
    ops: &[Op],
    faults: &[Fault],
    limit: usize,
    window_us: u64,
    instances: usize,
) -> Vec<Violation> {
    let mut by_user: HashMap<usize, Vec<&Op>> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::WrongLogin && o.outcome == "Unauthenticated")
    {
        by_user.entry(op.user).or_default().push(op);
    }
    let within =
        |f: &Fault, start: u64, end: u64| f.start_us <= end && f.end_us + RECOVERY_US >= start;
    let redis_faulted =
        |start: u64, end: u64| faults.iter().any(|f| f.on_redis() && within(f, start, end));
    // Faults that forget counts: Redis data lost, or an instance's own counts.
    let losses = |start: u64, end: u64| {
        faults
            .iter()
            .filter(|f| {
                matches!(
                    f.kind.as_str(),
                    "redis-kill" | "redis-flushall" | "redis-primary-kill" | "redis-failover"
                ) || f.stops_instance().is_some()
            })
            .filter(|f| within(f, start, end))
            .count()
    };
    let mut violations = Vec::new();
    for (user, mut evaluated) in by_user {
        evaluated.sort_by_key(|o| o.start_us);
        // Attempts wholly inside [t, t + window], for t at each attempt's start.
        for (i, first) in evaluated.iter().enumerate() {
            let t = first.start_us;
            let inside: Vec<&&Op> = evaluated[i..]
                .iter()
                .filter(|o| o.end_us <= t + window_us)
                .collect();
            let bound = if redis_faulted(t, t + window_us) {
                limit * (1 + instances + losses(t, t + window_us))
            } else {
                limit
            };
            if inside.len() > bound {
                violations.push(Violation {
                    rule: "guesses stay within the limit",
                    what: format!(
                        "{} wrong passwords of user {user} evaluated within {} s (bound {bound})",
                        inside.len(),
                        window_us / 1_000_000
                    ),
                    ops: inside.iter().map(|o| o.id).collect(),
                });
                break;
            }
        }
    }
    violations
}
