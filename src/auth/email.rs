//! Email verification and email change. The notifier (admitted by `grpc::account`) starts a
//! flow and receives the single-use code to deliver; whoever holds the code completes it
//! (`VerifyEmail`, `ConfirmEmailChange`). Codes are those of `recovery` (144 random bits, stored
//! as SHA-256, single-use, bound to the flow and the account) and bound to an address too: a
//! verification code to the address it was sent to, a change code to the new address, which
//! replaces the old one only when its code comes back — verified.
//!
//! **What ValidateSession and GetProfile answer.** `email_verified_at` is a fact of the account
//! that the session copies (Redis, in-process) and the profile copies carry. It only ever goes
//! from "not verified" to a time: an address is replaced only by one whose code was presented,
//! and the change sets it. So a late copy can only say "not verified" of a verified address, never
//! the reverse: staleness here cannot grant anything. A completion makes the copies catch up
//! before it returns, through the mechanisms that already hold the revocation promise:
//!
//! - the profile's version is raised and logged in the completing transaction, and written to
//!   Redis after the commit, as UpdateProfile's is (`ProfileService`'s closure);
//! - the account's live sessions are listed in that transaction, which holds the account's row as
//!   Login's insert does (`users::lock_for_login`): a session created before is listed, one created
//!   after reads the new state. After the commit each one's Redis copy, and any fill's lease on
//!   it, is deleted (`SessionStore::forget`: what a Redis eviction of that key does, so no
//!   revocation guarantee depends on it being skipped), so a fill that read PostgreSQL before the
//!   commit cannot write;
//! - then one `LocalCache::invalidate` drops every in-process copy of both, on every instance,
//!   and waits for it, as a revocation does.
//!
//! Three cases are left, each only "not verified" for a while: a touch that read the account
//! before the commit and rewrites its session's copy after the delete; a Redis that lost the
//! delete (away during the call, a failover); a completion on an instance without Redis while
//! others use it (it can neither delete their copies nor publish the keys, and the logs the
//! holders catch up from do not name sessions that were not revoked). The next touch of that
//! session (`SESSION__TOUCH_INTERVAL`) reads the account again (`SessionRepo::touch`) and mends
//! the copy.
use chrono::{DateTime, Utc};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use tracing::instrument;
use uuid::Uuid;

use super::{
    AuthError, AuthService,
    input::Email,
    recovery::{IssuedCode, new_code},
    session::ClientInfo,
    token::TokenHash,
};
use crate::{
    cache::{Announcement, Bucket},
    local::Keys,
    model::ProfileRecord,
    store::{Completion, EmailDone, Flow, NotIssued},
};

/// A completed verification or change: the account's address now, verified when.
#[derive(Debug, Clone)]
pub struct EmailVerified {
    pub user_id: Uuid,
    pub email: String,
    pub email_verified_at: DateTime<Utc>,
}

/// A started change: the code for the new address, and the current address to notify.
#[derive(Debug)]
pub struct EmailChangeStarted {
    pub issued: IssuedCode,
    pub new_email: String,
    pub current_email: String,
}

/// A completion presented by an end user: the code's hash (see `input::code`) and the client.
pub struct EmailCode {
    pub code_hash: [u8; 32],
    pub client: ClientInfo,
}

impl AuthService {
    /// The starts of one account's email flows, keyed by its id (a change's new address has a
    /// bucket of its own: [`Self::flow_account_bucket`]).
    fn flow_user_bucket(&self, user_id: Uuid) -> Bucket {
        let f = &self.flows;
        let subject = hex::encode(Sha256::digest(user_id.as_bytes()));
        Bucket::new("flow_user", &subject, f.starts_per_account, f.window)
    }

    /// A start's limits (every bucket pays), counted and logged when refused.
    async fn limit_start(
        &self,
        flow: Flow,
        user_id: Option<Uuid>,
        client: &ClientInfo,
        buckets: &[Bucket],
    ) -> Result<(), AuthError> {
        let result = self.limit(flow.as_str(), buckets).await;
        if result.is_err() {
            self.flow_start(flow, user_id, client, "rate_limited");
        }
        result
    }

    fn flow_start(
        &self,
        flow: Flow,
        user_id: Option<Uuid>,
        client: &ClientInfo,
        outcome: &'static str,
    ) {
        self.flow_outcome(flow, ("start", outcome), user_id, &client.ip_address);
    }

    /// Starts the verification of the account's current address: the code, and the address to
    /// deliver it to.
    #[instrument(skip_all)]
    pub async fn start_email_verification(
        &self,
        user_id: Uuid,
        client: &ClientInfo,
    ) -> Result<(IssuedCode, String), AuthError> {
        let flow = Flow::EmailVerification;
        let buckets = [
            self.flow_address_bucket(client),
            self.flow_user_bucket(user_id),
        ];
        self.limit_start(flow, Some(user_id), client, &buckets)
            .await?;
        let ttl = self.flows.verify_code_ttl;
        let (code, hash) = new_code();
        let expires_at = self.clock.now() + ttl;
        match self
            .db
            .codes()
            .issue_verification(user_id, &hash, ttl)
            .await?
        {
            Ok(email) => {
                self.flow_start(flow, Some(user_id), client, "issued");
                Ok((IssuedCode { code, expires_at }, email))
            }
            Err(NotIssued::NoAccount) => {
                self.flow_start(flow, None, client, "unknown");
                Err(AuthError::UserNotFound)
            }
            Err(NotIssued::Verified) => {
                self.flow_start(flow, Some(user_id), client, "already_verified");
                Err(AuthError::EmailAlreadyVerified)
            }
        }
    }

    /// Starts a change of the caller's address to `new_email`, its owner proven again (see
    /// [`Self::reauthenticated`]).
    #[instrument(skip_all)]
    pub async fn start_email_change(
        &self,
        token: &str,
        new_email: &Email,
        password: Option<SecretString>,
        client: &ClientInfo,
    ) -> Result<EmailChangeStarted, AuthError> {
        let flow = Flow::EmailChange;
        let address = self.flow_address_bucket(client);
        self.limit_start(flow, None, client, std::slice::from_ref(&address))
            .await?;
        let max_age = self.flows.email_change_max_auth_age;
        let (current, _) = match self
            .reauthenticated(token, password, max_age, flow.as_str())
            .await
        {
            Ok(current) => current,
            Err(error) => {
                self.flow_start(flow, None, client, "refused");
                return Err(error);
            }
        };
        let user_id = current.record.user_id;
        // Starts per account, and per new address (a stranger's mailbox is not to be flooded).
        let buckets = [
            self.flow_user_bucket(user_id),
            self.flow_account_bucket(&new_email.normalized),
        ];
        self.limit_start(flow, Some(user_id), client, &buckets)
            .await?;
        let ttl = self.flows.verify_code_ttl;
        let (code, hash) = new_code();
        let expires_at = self.clock.now() + ttl;
        let new = (new_email.display.as_str(), new_email.normalized.as_str());
        let issued = self
            .db
            .codes()
            .issue_change(user_id, new, &hash, ttl)
            .await?;
        let Some((current_email, fresh)) = issued else {
            return Err(AuthError::InvalidSession);
        };
        if !fresh {
            return Err(AuthError::InvalidInput(vec![
                super::input::FieldViolation {
                    field: "new_email".into(),
                    description: "is already the account's address".into(),
                },
            ]));
        }
        self.flow_start(flow, Some(user_id), client, "issued");
        Ok(EmailChangeStarted {
            issued: IssuedCode { code, expires_at },
            new_email: new_email.display.clone(),
            current_email,
        })
    }

    /// Completes a verification (`Flow::EmailVerification`) or a change (`Flow::EmailChange`)
    /// and returns once no instance serves a copy of the account's sessions or profile made
    /// before it (see the module). `publish` writes the new profile version to Redis (with its
    /// log row, `None` for a retry) and answers what it wrote.
    #[instrument(skip_all)]
    pub async fn complete_email<F, Fut>(
        &self,
        flow: Flow,
        presented: EmailCode,
        publish: F,
    ) -> Result<EmailVerified, AuthError>
    where
        F: FnOnce(ProfileRecord, Option<(i64, DateTime<Utc>)>) -> Fut,
        Fut: Future<Output = Announcement>,
    {
        let ip = presented.client.ip_address.as_str();
        let refused = |outcome, error| {
            self.flow_outcome(flow, ("complete", outcome), None, ip);
            error
        };
        let address = self.flow_address_bucket(&presented.client);
        if let Err(error) = self.limit(flow.as_str(), &[address]).await {
            return Err(refused("rate_limited", error));
        }
        let context = (self.clock.now(), self.policy.idle_timeout);
        let done = match self
            .db
            .codes()
            .complete_email(&presented.code_hash, flow, context)
            .await?
        {
            Completion::Done(done) => done,
            Completion::Invalid => {
                return Err(refused("invalid_code", AuthError::InvalidCode));
            }
            Completion::Taken => return Err(refused("email_taken", AuthError::EmailTaken)),
        };
        let outcome = if done.retried { "retried" } else { "completed" };
        self.flow_outcome(flow, ("complete", outcome), Some(done.user_id), ip);
        let verified = EmailVerified {
            user_id: done.user_id,
            email: done.email.clone(),
            email_verified_at: done.email_verified_at,
        };
        self.catch_up(*done, publish).await?;
        Ok(verified)
    }

    /// Drops the Redis copies of the account's sessions (and fills' leases on them), has
    /// `publish` write the profile's new version, then waits until no instance holds an
    /// in-process copy of either.
    async fn catch_up<F, Fut>(&self, done: EmailDone, publish: F) -> Result<(), AuthError>
    where
        F: FnOnce(ProfileRecord, Option<(i64, DateTime<Utc>)>) -> Fut,
        Fut: Future<Output = Announcement>,
    {
        let mut keys = Keys::sessions(done.sessions.iter().map(Vec::as_slice));
        keys.profiles.push(done.user_id);
        let hashes: Vec<TokenHash> = done
            .sessions
            .iter()
            .filter_map(|h| TokenHash::from_bytes(h))
            .collect();
        let written = async {
            futures::future::join_all(hashes.iter().map(|h| self.cache.forget(h))).await;
            publish(done.profile, done.logged).await
        };
        self.local.invalidate(keys, written).await?;
        Ok(())
    }
}
