//! The email flows' statements (see `auth::email`): issuing a verification or change code, and
//! completing one in a transaction that holds the account's row — the address verified (or
//! replaced by the verified new one), the profile's version raised and logged (its cached copies
//! then show the verification), and the account's live sessions listed (their cached copies are
//! dropped after the commit).
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{CodeRepo, Flow, StoreError, micros, sessions::ACTIVE};
use crate::model::{ProfileChanges, ProfileRecord};

/// Why a verification code was not issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotIssued {
    /// No such account, or a disabled one.
    NoAccount,
    /// Its address is verified already.
    Verified,
}

/// A completed email flow: the account's address now, the profile version that shows it, and
/// the account's live sessions, whose cached copies are to be dropped.
#[derive(Debug)]
pub struct EmailDone {
    pub user_id: Uuid,
    /// The address, as entered.
    pub email: String,
    pub email_verified_at: DateTime<Utc>,
    pub profile: ProfileRecord,
    /// The profile log's row of that version (`None` for a retry: the first completion logged
    /// it, and `profile` is the current version).
    pub logged: Option<(i64, DateTime<Utc>)>,
    /// Token hashes of the account's sessions neither revoked nor expired.
    pub sessions: Vec<Vec<u8>>,
    /// A retry of a completion that succeeded before (the same code; the address unchanged since).
    pub retried: bool,
}

/// How completing a code ended.
#[derive(Debug)]
pub enum Completion {
    Done(Box<EmailDone>),
    /// Unknown, expired, used, of another flow, or sent to an address the account no longer has.
    Invalid,
    /// Another account uses the new address (an email change).
    Taken,
}

/// A code found under the account's lock.
#[derive(sqlx::FromRow)]
struct Found {
    user_id: Uuid,
    used: bool,
    completed: bool,
    /// The address the code is bound to (as entered, and as Login compares it).
    email: Option<String>,
    email_normalized: Option<String>,
    /// It is the account's address now.
    current: bool,
}

impl CodeRepo<'_> {
    /// Stores a verification code for the enabled account's current address; the address (as
    /// registered), or why not.
    pub async fn issue_verification(
        &self,
        user_id: Uuid,
        code_hash: &[u8],
        ttl: Duration,
    ) -> Result<Result<String, NotIssued>, StoreError> {
        let query = sqlx::query_as::<_, (Option<String>, bool)>(
            "with account as (
                 select id, email, email_normalized, email_verified_at is not null as verified
                 from users where id = $3 and disabled_at is null
             ), issued as (
                 insert into account_codes (code_hash, flow, user_id, expires_at, email,
                                            email_normalized)
                 select $1, 'email_verification', id,
                        clock_timestamp() + $2::bigint * interval '1 microsecond',
                        email, email_normalized
                 from account where not verified
                 returning email
             )
             select (select email from issued), coalesce((select verified from account), false)
             where exists (select 1 from account)",
        )
        .bind(code_hash)
        .bind(micros(ttl))
        .bind(user_id);
        let db = self.0;
        Ok(match db.run(query.fetch_optional(db.pool())).await? {
            None => Err(NotIssued::NoAccount),
            Some((Some(email), _)) => Ok(email),
            Some((None, _)) => Err(NotIssued::Verified),
        })
    }

    /// Stores a change code for the enabled account, bound to the new address (as entered, and
    /// as Login compares it) unless it is the account's address already: the account's current
    /// address (as registered) and whether a code was stored; `None` for no such account or a
    /// disabled one.
    pub async fn issue_change(
        &self,
        user_id: Uuid,
        new_email: (&str, &str),
        code_hash: &[u8],
        ttl: Duration,
    ) -> Result<Option<(String, bool)>, StoreError> {
        let query = sqlx::query_as::<_, (String, bool)>(
            "with account as (
                 select id, email, email_normalized from users
                 where id = $3 and disabled_at is null
             ), issued as (
                 insert into account_codes (code_hash, flow, user_id, expires_at, email,
                                            email_normalized)
                 select $1, 'email_change', id,
                        clock_timestamp() + $2::bigint * interval '1 microsecond', $4, $5
                 from account where email_normalized <> $5
                 returning 1
             )
             select email, exists (select 1 from issued) from account",
        )
        .bind(code_hash)
        .bind(micros(ttl))
        .bind(user_id)
        .bind(new_email.0)
        .bind(new_email.1);
        self.0.run(query.fetch_optional(self.0.pool())).await
    }

    /// Completes a verification or change code in one transaction (see the module). A used code
    /// answers as a retry while it completed its flow, at most the codes' retry grace ago, and its
    /// address is still the account's. The code's row is locked with the account's: a duplicate
    /// presented at once waits, then finds it used (its retry), not unused and gone.
    pub async fn complete_email(
        &self,
        code_hash: &[u8],
        flow: Flow,
        (now, idle): (DateTime<Utc>, Duration),
    ) -> Result<Completion, StoreError> {
        let db = self.0;
        db.retrying(|| async {
            let mut tx = db.run(db.pool().begin()).await?;
            // The account first, as every statement that changes it or several of its sessions.
            let found = sqlx::query_as::<_, Found>(
                "select u.id as user_id, c.used_at is not null as used,
                        c.completed_at is not null as completed, c.email, c.email_normalized,
                        u.email_normalized = c.email_normalized as current
                 from account_codes c join users u on u.id = c.user_id
                 where c.code_hash = $1 and c.flow = $2 and u.disabled_at is null
                   and ((c.used_at is null and c.expires_at > clock_timestamp())
                        or c.completed_at > clock_timestamp() - $3::bigint * interval '1 microsecond')
                 for update of u, c",
            )
            .bind(code_hash)
            .bind(flow.as_str())
            .bind(micros(super::codes::RETRY_GRACE));
            let Some(found) = db.run(found.fetch_optional(&mut *tx)).await? else {
                return Ok(Completion::Invalid);
            };
            let (Some(email), Some(normalized)) = (found.email, found.email_normalized) else {
                return Ok(Completion::Invalid);
            };
            let retried = found.used;
            let fresh_ok = !found.used
                && match flow {
                    Flow::EmailVerification => found.current,
                    _ => true,
                };
            if !(fresh_ok || (found.completed && found.current)) {
                return Ok(Completion::Invalid);
            }
            let user_id = found.user_id;
            let (profile, logged) = if retried {
                let current = db.profiles().get_in(&mut *tx, user_id).await?;
                (current, None)
            } else {
                let used = sqlx::query(
                    "update account_codes set used_at = clock_timestamp(),
                                              completed_at = clock_timestamp()
                     where code_hash = $1 and used_at is null and expires_at > clock_timestamp()",
                )
                .bind(code_hash);
                if db.run(used.execute(&mut *tx)).await?.rows_affected() != 1 {
                    return Ok(Completion::Invalid);
                }
                if flow == Flow::EmailChange {
                    // Audit rows that found the account by its old address are its own: its
                    // deletion rewrites them too (`store::erasure`).
                    let moved = sqlx::query(
                        "insert into previous_emails (user_id, email_normalized, acquired_at)
                         select id, email_normalized,
                                coalesce((select max(p.replaced_at) from previous_emails p
                                          where p.user_id = u.id), u.created_at)
                         from users u where id = $1 and email_normalized <> $2",
                    )
                    .bind(user_id)
                    .bind(&normalized);
                    self.0.run(moved.execute(&mut *tx)).await?;
                }
                let set = sqlx::query(
                    "update users set email = $2, email_normalized = $3,
                                      email_verified_at = case when email_normalized = $3
                                          then coalesce(email_verified_at, clock_timestamp())
                                          else clock_timestamp() end,
                                      updated_at = clock_timestamp()
                     where id = $1",
                )
                .bind(user_id)
                .bind(&email)
                .bind(&normalized);
                match db.run(set.execute(&mut *tx)).await {
                    Err(StoreError::Conflict { constraint }) if constraint == super::EMAIL_UNIQUE => {
                        return Ok(Completion::Taken);
                    }
                    other => other?,
                };
                if flow == Flow::EmailChange {
                    // A code sent to the old address (a reset, a verification) must not outlive it.
                    self.void_in(&mut tx, user_id).await?;
                }
                let changes = ProfileChanges::default();
                match db
                    .profiles()
                    .update_in(&mut *tx, user_id, &changes, None, now)
                    .await?
                {
                    Some((profile, logged)) => (Some(profile), Some(logged)),
                    None => (None, None),
                }
            };
            let Some(profile) = profile else {
                return Ok(Completion::Invalid);
            };
            let sql = format!("select token_hash from sessions where user_id = $2 and {ACTIVE}");
            let sessions = sqlx::query_scalar::<_, Vec<u8>>(sqlx::AssertSqlSafe(sql))
                .bind(micros(idle))
                .bind(user_id);
            let sessions = db.run(sessions.fetch_all(&mut *tx)).await?;
            db.run(tx.commit()).await?;
            let Some(email_verified_at) = profile.email_verified_at else {
                return Ok(Completion::Invalid);
            };
            Ok(Completion::Done(Box::new(EmailDone {
                user_id,
                email,
                email_verified_at,
                profile,
                logged,
                sessions,
                retried,
            })))
        })
        .await
    }
}
