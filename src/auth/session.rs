//! The session rules: when a session expires and when its activity is recorded. Expiry lives in
//! the data, not in Redis TTLs: every read, cached or not, checks both deadlines, by the fleet's
//! clock (PostgreSQL's, see `crate::clock`).
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::config::SessionSettings;
pub use crate::model::SessionRecord;

/// The idle and absolute lifetimes, how often activity is written, how many sessions a user
/// may hold.
#[derive(Debug, Clone, Copy)]
pub struct SessionPolicy {
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    pub touch_interval: Duration,
    pub max_per_user: u32,
}

impl From<&SessionSettings> for SessionPolicy {
    fn from(s: &SessionSettings) -> Self {
        Self {
            idle_timeout: s.idle_timeout,
            absolute_timeout: s.absolute_timeout,
            touch_interval: s.touch_interval,
            max_per_user: s.max_per_user,
        }
    }
}

/// Where the client connected from, as the caller reported it (already validated).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Canonical (an IPv4-mapped IPv6 address as IPv4), or empty.
    pub ip_address: String,
    pub user_agent: String,
    /// The caller's device identifier, or empty (never stored in clear).
    pub device_id: String,
}

impl SessionPolicy {
    /// A fresh session, starting `now`, for a user who has just proven their password.
    pub fn start(&self, user_id: Uuid, client: ClientInfo, now: DateTime<Utc>) -> SessionRecord {
        SessionRecord {
            id: Uuid::now_v7(),
            user_id,
            created_at: now,
            last_seen_at: now,
            absolute_expires_at: now + self.absolute_timeout,
            authenticated_at: now,
            ip_address: client.ip_address,
            user_agent: client.user_agent,
            email_verified_at: None,
            aal: 1,
        }
    }

    /// The earlier of the idle and the absolute deadline.
    pub fn expires_at(&self, session: &SessionRecord) -> DateTime<Utc> {
        (session.last_seen_at + self.idle_timeout).min(session.absolute_expires_at)
    }

    pub fn is_expired(&self, session: &SessionRecord, now: DateTime<Utc>) -> bool {
        now >= self.expires_at(session)
    }

    /// Whether this use of the session should be recorded as activity (at most once per
    /// touch interval, so a busy session costs one write per interval, not one per request).
    pub fn touch_due(&self, session: &SessionRecord, now: DateTime<Utc>) -> bool {
        (now - session.last_seen_at)
            .to_std()
            .is_ok_and(|since| since >= self.touch_interval)
    }

    /// How long a cached copy may live: until the session expires.
    pub fn time_left(&self, session: &SessionRecord, now: DateTime<Utc>) -> Option<Duration> {
        (self.expires_at(session) - now)
            .to_std()
            .ok()
            .filter(|d| !d.is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SessionPolicy {
        SessionPolicy {
            idle_timeout: Duration::from_secs(60),
            absolute_timeout: Duration::from_secs(600),
            touch_interval: Duration::from_secs(10),
            max_per_user: 5,
        }
    }

    #[test]
    fn idle_deadline_moves_with_activity_but_never_past_the_absolute_one() {
        let p = policy();
        let mut s = p.start(Uuid::now_v7(), ClientInfo::default(), Utc::now());
        let start = s.created_at;
        assert_eq!(p.expires_at(&s), start + Duration::from_secs(60));
        assert!(!p.is_expired(&s, start + Duration::from_secs(59)));
        assert!(p.is_expired(&s, start + Duration::from_secs(60)));

        s.last_seen_at = start + Duration::from_secs(590);
        assert_eq!(p.expires_at(&s), start + Duration::from_secs(600));
        assert!(p.is_expired(&s, start + Duration::from_secs(600)));
        assert_eq!(p.time_left(&s, start + Duration::from_secs(601)), None);
    }

    #[test]
    fn touch_is_due_once_per_interval() {
        let p = policy();
        let s = p.start(Uuid::now_v7(), ClientInfo::default(), Utc::now());
        assert!(!p.touch_due(&s, s.last_seen_at + Duration::from_secs(9)));
        assert!(p.touch_due(&s, s.last_seen_at + Duration::from_secs(10)));
    }
}
