//! EventService.Watch as a subscriber sees it: admission, the events each change sends, resuming
//! without a gap, positions no longer held, limits, and strict mode's lease (a revoking call
//! waits for the subscriber's acknowledgement, or its lease's end).
use std::{path::Path, time::Duration};

use authd::proto::authd::v1::{
    self as pb, event::Kind, event_service_client::EventServiceClient, watch_request,
};
use tokio::sync::mpsc;
use tonic::{Code, Request, Status, Streaming};

use crate::{
    admin::{KEY as ADMIN_KEY, with_key, write_keys},
    helpers::{Mode, TestApp, test_settings},
};

mod flow;
mod outages;
mod process;
mod strict;
mod validator;

pub const SUBSCRIBER_KEY: &str = "subscriber-key-0123456789abcdef";

/// Settings with EventService admitting [`SUBSCRIBER_KEY`] and AdminService [`ADMIN_KEY`] (keys
/// files in `dir`).
pub fn subscribed_settings(mode: Mode, dir: &Path) -> authd::config::Settings {
    let mut settings = test_settings(mode);
    let subscribers = dir.join("subscribers.toml");
    write_keys(&subscribers, &[("orders", SUBSCRIBER_KEY)]);
    let operators = dir.join("operators.toml");
    write_keys(&operators, &[("ops", ADMIN_KEY)]);
    settings.events.api_keys_file = Some(subscribers);
    settings.admin.api_keys_file = Some(operators);
    settings.events.heartbeat = Duration::from_millis(200);
    settings.session.max_per_user = 1000;
    settings
}

/// One stream, as a subscriber holds it.
pub struct Watcher {
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: Streaming<pb::WatchResponse>,
    sequence: u64,
}

/// How long a test waits for a response before failing.
const PATIENCE: Duration = Duration::from_secs(20);

impl Watcher {
    pub async fn open(
        app: &TestApp,
        key: Option<&str>,
        mode: pb::Mode,
        resume: &str,
    ) -> Result<Self, Status> {
        let subscribe = pb::WatchRequest {
            kind: Some(watch_request::Kind::Subscribe(pb::Subscribe {
                mode: mode as i32,
                resume_position: resume.to_owned(),
            })),
        };
        Self::open_with(app, key, subscribe).await
    }

    /// Opens a stream whose first request is `first`.
    pub async fn open_with(
        app: &TestApp,
        key: Option<&str>,
        first: pb::WatchRequest,
    ) -> Result<Self, Status> {
        let (requests, outgoing) = mpsc::channel(16);
        requests.send(first).await.unwrap();
        let stream = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let request = match key {
            Some(key) => with_key(key, stream),
            None => Request::new(stream),
        };
        let responses = EventServiceClient::new(app.channel.clone())
            .watch(request)
            .await?
            .into_inner();
        Ok(Self {
            requests,
            responses,
            sequence: 0,
        })
    }

    /// The next response (an error ends the stream).
    pub async fn next(&mut self) -> Result<pb::WatchResponse, Status> {
        let next = tokio::time::timeout(PATIENCE, self.responses.message())
            .await
            .expect("a response within the patience");
        next?.ok_or_else(|| Status::aborted("the stream ended"))
    }

    /// Reads responses until `events` have come (what came, in order), answering none.
    pub async fn events(&mut self, count: usize) -> (Vec<pb::Event>, pb::WatchResponse) {
        let mut events = Vec::new();
        loop {
            let response = self.next().await.expect("a response");
            events.extend(response.events.iter().cloned());
            if events.len() >= count && !response.position.is_empty() {
                return (events, response);
            }
        }
    }

    /// Acknowledges `position`; the sequence number it used.
    pub async fn ack(&mut self, position: &str) -> u64 {
        self.sequence += 1;
        let ack = pb::WatchRequest {
            kind: Some(watch_request::Kind::Acknowledge(pb::Acknowledge {
                position: position.to_owned(),
                sequence: self.sequence,
            })),
        };
        self.requests.send(ack).await.unwrap();
        self.sequence
    }

    pub async fn send(&self, request: pb::WatchRequest) {
        self.requests.send(request).await.unwrap();
    }

    /// Closes the subscriber's side (it keeps nothing from the stream any more).
    pub fn close(self) -> Streaming<pb::WatchResponse> {
        drop(self.requests);
        self.responses
    }
}

/// The kinds of `events`, as short names, in order.
pub fn kinds(events: &[pb::Event]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e.kind.as_ref().expect("a kind") {
            Kind::SessionRevoked(_) => "session_revoked",
            Kind::SessionsRevoked(_) => "sessions_revoked",
            Kind::UserDisabled(_) => "user_disabled",
            Kind::UserEnabled(_) => "user_enabled",
            Kind::UserDeleted(_) => "user_deleted",
            Kind::ProfileUpdated(_) => "profile_updated",
        })
        .collect()
}

/// The session id of a Login's or Register's session.
pub fn sid(session: &Option<pb::Session>) -> String {
    session.as_ref().expect("a session").session_id.clone()
}

/// A connection to the database of `app` (what a test reads or writes behind the service).
pub async fn sql(app: &TestApp) -> sqlx::PgConnection {
    use secrecy::ExposeSecret;
    let url = app.settings.database.url.expose_secret();
    <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap()
}

/// The ErrorInfo reason of `status`.
pub fn reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_service_is_not_served_unless_configured() {
    let app = crate::helpers::spawn_with(test_settings(Mode::NoRedis)).await;
    let refused = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "").await;
    assert_eq!(refused.err().map(|s| s.code()), Some(Code::Unimplemented));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_subscribers_are_admitted_and_they_are_not_operators() {
    let dir = tempfile::tempdir().unwrap();
    let app = crate::helpers::spawn_with(subscribed_settings(Mode::NoRedis, dir.path())).await;
    let open = |key| Watcher::open(&app, key, pb::Mode::Bounded, "");
    assert_eq!(
        open(None).await.err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );
    let denied = [Some("not-a-key"), Some(ADMIN_KEY)];
    for key in denied {
        assert_eq!(
            open(key).await.err().map(|s| s.code()),
            Some(Code::PermissionDenied),
            "{key:?}"
        );
    }
    assert!(open(Some(SUBSCRIBER_KEY)).await.is_ok());
    // A subscriber is no operator.
    let (_, reg) = app.register().await;
    let get = crate::admin::get_user(&app, SUBSCRIBER_KEY, &reg.user_id).await;
    assert_eq!(get.err().map(|s| s.code()), Some(Code::PermissionDenied));
}
