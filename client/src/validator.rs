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
        event_service_client::EventServiceClient, watch_request,
    },
    state::{FETCH_BOUND, State, TokenHash},
};

/// How the memory is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A lease: authd's revoking calls wait for this process. Nothing revoked is accepted here
    /// once the revoking call returned.
    Strict,
    /// No lease: the memory may lag by [`Config::stale_after`] plus a batch's travel time.
    Bounded,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// `authorization: Bearer <key>` for EventService (an EVENTS__API_KEYS_FILE key), if the
    /// channel does not authenticate with a client certificate.
    pub api_key: Option<String>,
    /// The memory is trusted at most this long after the last batch applied was read (strict:
    /// measured from when the request it was read after was sent; bounded: from its arrival).
    /// A change no one waits for (the previous release's, during a rolling upgrade) is served
    /// from memory at most this long after it committed.
    pub stale_after: Duration,
    /// Validations kept at most.
    pub max_entries: u64,
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
        let state = Arc::new(State::new(config.max_entries, config.recheck));
        let follower = tokio::spawn(follow(channel.clone(), config, state.clone()));
        Self {
            inner: Arc::new(Inner {
                auth: AuthServiceClient::new(channel),
                state,
                follower,
            }),
        }
    }

    /// Validations answered from memory so far.
    pub fn local_hits(&self) -> u64 {
        self.inner.state.hits()
    }

    /// Whether validations are answered from memory now.
    pub fn trusted(&self) -> bool {
        self.inner.state.trusted()
    }

    /// The session of `token`: from memory when it may, else from authd (`ValidateSession`,
    /// whose answer is kept when it may be). authd's status otherwise (UNAUTHENTICATED for a
    /// token that is not valid).
    pub async fn validate(&self, token: &str) -> Result<pb::Session, Status> {
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        let state = &self.inner.state;
        if let Some(session) = state.lookup(&hash) {
            return Ok(session);
        }
        let ticket = state.ticket();
        let request = pb::ValidateSessionRequest {
            session_token: token.to_owned(),
        };
        let mut auth = self.inner.auth.clone();
        let answered = tokio::time::timeout(FETCH_BOUND, auth.validate_session(request))
            .await
            .map_err(|_| Status::deadline_exceeded("authd did not answer in time"))??;
        let session = answered
            .into_inner()
            .session
            .ok_or_else(|| Status::internal("authd answered a valid session without it"))?;
        state.keep(ticket, hash, &session);
        Ok(session)
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

/// One stream: each batch applied, then (strict) acknowledged; trust extended by each grant
/// (strict, from when the acknowledgement that asked for it was sent) or batch (bounded).
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
    while let Some(batch) = responses.message().await? {
        let heartbeat = batch
            .heartbeat_interval
            .and_then(|d| Duration::try_from(d).ok());
        if let Some(heartbeat) = heartbeat
            && heartbeat * 2 >= config.stale_after
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
        match config.mode {
            Mode::Strict => {
                // Read no earlier than its `read_after` request was sent: fresh from then.
                if let Some(at) = sent_at(batch.read_after) {
                    state.fresh_until(at + us(config.stale_after));
                }
                if let Some(lease) = batch.lease {
                    let valid = lease
                        .valid_for
                        .and_then(|d| Duration::try_from(d).ok())
                        .unwrap_or_default();
                    if let Some(at) = sent_at(lease.acknowledgement) {
                        state.trust_until(at + us(valid.mul_f64(1.0 - RATE_MARGIN)));
                    }
                }
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
            Mode::Bounded => {
                state.trust_until(u64::MAX);
                state.fresh_until(boot_us() + us(config.stale_after));
            }
        }
    }
    Ok(())
}
