//! The [`Validator`]: answers from memory when it may, from authd otherwise, and follows the
//! event stream in the background (resuming after reconnects).
use std::{collections::VecDeque, sync::Arc, time::Duration};

use sha2::{Digest, Sha256};
use tokio::{sync::mpsc, task::JoinHandle};
use tonic::{Code, Request, Status, metadata::MetadataValue, transport::Channel};

use crate::{
    clock::{RATE_MARGIN, boot_us, us},
    proto::{
        self as pb, auth_service_client::AuthServiceClient,
        event_service_client::EventServiceClient, profile_service_client::ProfileServiceClient,
        watch_request,
    },
    state::{FETCH_BOUND, Kept, State, TokenHash},
};

/// How the memory is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A lease: authd's revoking calls wait for this process. Nothing revoked is accepted here
    /// once the revoking call returned.
    Strict,
    /// No lease: the memory may answer a change at most [`Config::stale_after`] after it
    /// committed.
    Bounded,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// `authorization: Bearer <key>` for EventService (an EVENTS__API_KEYS_FILE key), if the
    /// channel does not authenticate with a client certificate.
    pub api_key: Option<String>,
    /// The memory is trusted at most this long after the last batch applied was read (measured
    /// from when the request it was read after was sent).
    /// A change no one waits for (the previous release's, during a rolling upgrade) is served
    /// from memory at most this long after it committed.
    pub stale_after: Duration,
    /// Validations kept at most.
    pub max_entries: u64,
    /// Profiles kept at most (a profile may take some 5 KB).
    pub max_profiles: u64,
    /// A kept validation is asked of authd again after this long (authd records the session's
    /// activity then: keep it at most `SESSION__TOUCH_INTERVAL`).
    pub recheck: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mode: Mode::Strict,
            api_key: None,
            stale_after: Duration::from_secs(3),
            max_entries: 100_000,
            max_profiles: 10_000,
            recheck: Duration::from_secs(60),
        }
    }
}

/// Validates session tokens, from memory when it may. Cheap to clone.
#[derive(Clone)]
pub struct Validator {
    inner: Arc<Inner>,
}

struct Inner {
    auth: AuthServiceClient<Channel>,
    profiles: ProfileServiceClient<Channel>,
    state: Arc<State>,
    follower: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

impl Validator {
    /// Starts following the event stream over `channel` (a tokio runtime must be running).
    pub fn new(channel: Channel, config: Config) -> Self {
        let state = Arc::new(State::new(
            config.max_entries,
            config.max_profiles,
            config.recheck,
        ));
        let follower = tokio::spawn(follow(channel.clone(), config, state.clone()));
        Self {
            inner: Arc::new(Inner {
                auth: AuthServiceClient::new(channel.clone()),
                profiles: ProfileServiceClient::new(channel),
                state,
                follower,
            }),
        }
    }

    /// Validations answered from memory so far.
    pub fn local_hits(&self) -> u64 {
        self.inner.state.hits()
    }

    /// Profiles answered from memory so far.
    pub fn local_profile_hits(&self) -> u64 {
        self.inner.state.profile_hits()
    }

    /// Whether validations are answered from memory now.
    pub fn trusted(&self) -> bool {
        self.inner.state.trusted()
    }

    /// The session of `token`: from memory when it may, else from authd (`ValidateSession`,
    /// whose answer is kept when it may be). authd's status otherwise (UNAUTHENTICATED for a
    /// token that is not valid — or that authd still answered valid though the event stream
    /// already showed its revocation).
    pub async fn validate(&self, token: &str) -> Result<pb::Session, Status> {
        let hash = token_hash(token);
        match self.inner.state.lookup(&hash) {
            Some(session) => Ok(Arc::unwrap_or_clone(session)),
            None => self.fetch(hash, token).await,
        }
    }

    /// The session of `token` from memory, if it may answer now (shared with the memory, not
    /// copied); nothing is asked of authd. [`AuthLayer`](crate::AuthLayer) answers with it
    /// without a task or an allocation, and calls [`validate`](Self::validate) otherwise.
    pub fn validate_from_memory(&self, token: &str) -> Option<Arc<pb::Session>> {
        self.inner.state.lookup(&token_hash(token))
    }

    /// Asks authd, and keeps the answer when it may be kept.
    async fn fetch(&self, hash: TokenHash, token: &str) -> Result<pb::Session, Status> {
        let state = &self.inner.state;
        let ticket = state.ticket();
        let request = pb::ValidateSessionRequest {
            session_token: token.to_owned(),
            ..Default::default()
        };
        let mut auth = self.inner.auth.clone();
        let answered = tokio::time::timeout(FETCH_BOUND, auth.validate_session(request))
            .await
            .map_err(|_| Status::deadline_exceeded("authd did not answer in time"))??;
        let session = answered
            .into_inner()
            .session
            .ok_or_else(|| Status::internal("authd answered a valid session without it"))?;
        match state.keep(ticket, hash, &session) {
            Kept::Stale => Err(Status::unauthenticated("the session was revoked")),
            Kept::Kept | Kept::Passed => Ok(session),
        }
    }

    /// The profile of `user_id`: from memory when it may, else from authd (`GetProfile`, whose
    /// answer is kept when it may be). Strict: never older than the version an UpdateProfile
    /// that returned wrote, nor older than one the event stream showed. authd's status
    /// otherwise (NOT_FOUND for an unknown user, INVALID_ARGUMENT for a malformed id), or
    /// UNAVAILABLE when authd kept answering a version older than the stream showed (for
    /// 1.5 s, past authd's own bound).
    pub async fn profile(&self, user_id: &str) -> Result<pb::Profile, Status> {
        // Kept under the id's one spelling (a UUID may be written several ways).
        let key = uuid::Uuid::try_parse(user_id).map(|id| id.to_string());
        let state = &self.inner.state;
        if let Some(profile) = key.as_ref().ok().and_then(|key| state.lookup_profile(key)) {
            return Ok(profile);
        }
        // authd's instances may answer an older version for a moment after an update (README:
        // 1.25 s at most, when the updating instance could not write Redis): ask again, for
        // longer than that, before giving up.
        let mut pause = Duration::from_millis(50);
        for attempt in 0..6 {
            if attempt > 0 {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            let ticket = state.ticket();
            let request = pb::GetProfileRequest {
                user_id: user_id.to_owned(),
            };
            let mut profiles = self.inner.profiles.clone();
            let answered = tokio::time::timeout(FETCH_BOUND, profiles.get_profile(request))
                .await
                .map_err(|_| Status::deadline_exceeded("authd did not answer in time"))??;
            let profile = answered
                .into_inner()
                .profile
                .ok_or_else(|| Status::internal("authd answered a profile without it"))?;
            // An instance an UpdateProfile still waits for answered from its old copy: ask
            // again.
            if state.keep_profile(ticket, &profile) != Kept::Stale {
                return Ok(profile);
            }
        }
        Err(Status::unavailable(
            "authd answered an older profile than its event stream showed; try again",
        ))
    }
}

/// Follows the stream for ever: every end is a doubt, then a new stream resumes where the last
/// one stopped (or starts over when its position is no longer held).
async fn follow(channel: Channel, config: Config, state: Arc<State>) {
    let mut position = String::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = boot_us();
        let ended = stream(&channel, &config, &state, &mut position).await;
        if let Err(status) = ended {
            if is_expired(&status) || status.code() == Code::InvalidArgument {
                state.reset();
                position.clear();
            }
            tracing::warn!(code = ?status.code(), message = status.message(), "authd event stream ended");
        }
        if boot_us().saturating_sub(started) > us(Duration::from_secs(30)) {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// authd no longer holds the position (OUT_OF_RANGE with ErrorInfo `POSITION_EXPIRED`).
fn is_expired(status: &Status) -> bool {
    use tonic_types::StatusExt;
    status.code() == Code::OutOfRange
        && status
            .get_details_error_info()
            .is_some_and(|info| info.reason == "POSITION_EXPIRED")
}

/// Doubts when dropped: declared after the stream's request sender, it runs before the sender
/// goes (closing the subscriber's side ends a strict lease at once, so the memory must be
/// untrusted first), however the stream ends.
struct DoubtOnExit<'a>(&'a State);

impl Drop for DoubtOnExit<'_> {
    fn drop(&mut self) {
        self.0.doubt();
    }
}

/// One stream: each batch applied, then acknowledged; freshness extended by each batch (from
/// when the request it was read after was sent), trust by each grant (strict, from when the
/// acknowledgement that asked for it was sent).
async fn stream(
    channel: &Channel,
    config: &Config,
    state: &State,
    position: &mut String,
) -> Result<(), Status> {
    let mode = match config.mode {
        Mode::Strict => pb::Mode::Strict,
        Mode::Bounded => pb::Mode::Bounded,
    };
    let (requests, outgoing) = mpsc::channel(64);
    let _doubt = DoubtOnExit(state);
    let subscribe = pb::WatchRequest {
        kind: Some(watch_request::Kind::Subscribe(pb::Subscribe {
            mode: mode as i32,
            resume_position: position.clone(),
        })),
    };
    let _ = requests.send(subscribe).await;
    // When each acknowledgement was sent (0: the subscribe request).
    let mut sent: VecDeque<(u64, u64)> = VecDeque::from([(0, boot_us())]);
    let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    if let Some(key) = &config.api_key {
        let value = MetadataValue::try_from(format!("Bearer {key}"))
            .map_err(|_| Status::invalid_argument("the API key is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut responses = EventServiceClient::new(channel.clone())
        .watch(request)
        .await?
        .into_inner();
    let mut sequence = 0u64;
    let mut warned = false;
    let mut unplaced = false;
    while let Some(batch) = responses.message().await? {
        let heartbeat = batch
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok());
        if let Some(heartbeat) = heartbeat
            && heartbeat * 2 >= config.stale_after
            && !std::mem::replace(&mut warned, true)
        {
            tracing::warn!(
                ?heartbeat,
                stale_after = ?config.stale_after,
                "authd's heartbeat is too long for stale_after: the memory will often be \
                 untrusted (set stale_after above twice the heartbeat plus a round trip)"
            );
        }
        state.apply(&batch.events);
        if batch.position.is_empty() {
            // More of the same pass follows.
            continue;
        }
        position.clone_from(&batch.position);
        state.primed();
        let sent_at = |sequence: u64| sent.iter().find(|(s, _)| *s == sequence).map(|(_, at)| *at);
        // Read no earlier than its `read_after` request was sent: fresh from then.
        match sent_at(batch.read_after) {
            Some(at) => state.fresh_until(at.saturating_add(us(config.stale_after))),
            None if !std::mem::replace(&mut unplaced, true) => tracing::warn!(
                read_after = batch.read_after,
                "a batch was read after an acknowledgement too old to place: the memory is \
                 not fresh until one is"
            ),
            None => {}
        }
        match config.mode {
            Mode::Strict => {
                if let Some(lease) = batch.lease {
                    let valid = lease
                        .valid_for
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or_default();
                    if let Some(at) = sent_at(lease.acknowledgement) {
                        let valid = us(valid.mul_f64(1.0 - RATE_MARGIN));
                        state.trust_until(at.saturating_add(valid));
                    }
                }
            }
            Mode::Bounded => state.trust_until(u64::MAX),
        }
        // Both modes acknowledge: strict for its lease, both for `read_after` (a batch read
        // long before it arrived — a stalled host — is then not believed fresh).
        sequence += 1;
        sent.push_back((sequence, boot_us()));
        if sent.len() > 256 {
            sent.pop_front();
        }
        let ack = pb::WatchRequest {
            kind: Some(watch_request::Kind::Acknowledge(pb::Acknowledge {
                position: batch.position,
                sequence,
            })),
        };
        if requests.send(ack).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// What the memory keeps a token under.
fn token_hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}
