//! `authd.v1.EventService` over gRPC: admission (as AdminService's, from lists of its own), the
//! subscribe request, and batches turned into responses (see `crate::events`).
use std::{pin::Pin, sync::Arc};

use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::timestamp;
use crate::{
    admin::{Access, Admission},
    events::{Batch, Events, EventsError, Inbound, Mode},
    proto::authd::v1::{
        self as pb, event::Kind, event_service_server::EventService as EventServiceRpc,
        watch_request,
    },
    store::{ChangeEvent, EventKind, Reason},
};

pub use crate::proto::authd::v1::event_service_server::EventServiceServer;

/// Events per response: a pass with more is sent as several responses, only the last carrying
/// the position (and the lease, and how fresh the stream is).
const EVENTS_PER_RESPONSE: usize = 1000;
/// The subscribe request must come within this long.
const FIRST_REQUEST: std::time::Duration = std::time::Duration::from_secs(10);

pub struct EventsGrpc {
    events: Arc<Events>,
    access: Arc<Access>,
    /// Streams end (UNAVAILABLE) when the service stops.
    stop: CancellationToken,
}

impl EventsGrpc {
    pub fn new(events: Arc<Events>, access: Arc<Access>, stop: CancellationToken) -> Self {
        Self {
            events,
            access,
            stop,
        }
    }
}

type Responses = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl EventServiceRpc for EventsGrpc {
    type WatchStream = Responses;

    async fn watch(
        &self,
        request: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Responses>, Status> {
        let admission = super::admission(&self.access, &request);
        let caller = match admission {
            Admission::Admitted { caller } => caller,
            Admission::Unauthenticated => {
                return Err(Status::unauthenticated(
                    "EventService needs a client certificate or `authorization: Bearer <key>`",
                ));
            }
            Admission::Denied { caller } => {
                tracing::warn!(caller, "event stream refused");
                return Err(Status::permission_denied(
                    "this caller may not subscribe to EventService",
                ));
            }
        };
        let mut requests = request.into_inner();
        // Bounded even when the call's deadline already answered: the handler runs to its end.
        let first = match tokio::time::timeout(FIRST_REQUEST, requests.message()).await {
            Err(_) => return Err(Status::deadline_exceeded("no subscribe request came")),
            Ok(Ok(first)) => first,
            Ok(Err(status)) => {
                return Err(unreadable(&status, "subscribe").map_or(status, Into::into));
            }
        };
        let Some(watch_request::Kind::Subscribe(subscribe)) = first.and_then(|r| r.kind) else {
            return Err(EventsError::Invalid {
                field: "subscribe",
                reason: "the first request must subscribe".to_owned(),
            }
            .into());
        };
        let mode = match pb::Mode::try_from(subscribe.mode) {
            Ok(pb::Mode::Bounded) => Mode::Bounded,
            Ok(pb::Mode::Strict) => Mode::Strict,
            _ => {
                return Err(EventsError::Invalid {
                    field: "subscribe.mode",
                    reason: "must be MODE_BOUNDED or MODE_STRICT".to_owned(),
                }
                .into());
            }
        };
        let resume = Some(subscribe.resume_position).filter(|p| !p.is_empty());
        let inbound = inbound(requests);
        let batches = self
            .events
            .watch(mode, resume.as_deref(), inbound, self.stop.clone())
            .await?;
        tracing::info!(
            caller,
            ?mode,
            resumed = resume.is_some(),
            "event stream opened"
        );
        let heartbeat = prost_types::Duration::try_from(self.events.heartbeat()).ok();
        let mut first = true;
        let responses =
            tokio_stream::wrappers::ReceiverStream::new(batches).flat_map(move |batch| {
                let responses: Vec<Result<pb::WatchResponse, Status>> = match batch {
                    Ok(batch) => {
                        let heartbeat = std::mem::take(&mut first).then_some(heartbeat).flatten();
                        responses(batch, heartbeat).into_iter().map(Ok).collect()
                    }
                    Err(error) => vec![Err(error.into())],
                };
                futures::stream::iter(responses)
            });
        Ok(Response::new(Box::pin(responses)))
    }
}

/// The requests after the subscribe one: acknowledgements, or the subscriber's close. A
/// broken stream is not a close (the subscriber may still serve from memory: its lease runs
/// out instead).
fn inbound(
    requests: Streaming<pb::WatchRequest>,
) -> impl Stream<Item = Result<Inbound, EventsError>> + Unpin + Send + 'static {
    Box::pin(futures::stream::unfold(
        Some(requests),
        |requests| async move {
            let mut requests = requests?;
            let next = match requests.message().await {
                Ok(None) => Ok(Inbound::Closed),
                Ok(Some(request)) => match request.kind {
                    Some(watch_request::Kind::Acknowledge(ack)) => Ok(Inbound::Acknowledge {
                        position: ack.position,
                        sequence: ack.sequence,
                    }),
                    Some(watch_request::Kind::Subscribe(_)) => Err(EventsError::Invalid {
                        field: "subscribe",
                        reason: "only the first request subscribes".to_owned(),
                    }),
                    None => Err(EventsError::Invalid {
                        field: "acknowledge",
                        reason: "is required after the first request".to_owned(),
                    }),
                },
                // A request that does not decode ends the stream with an error; a stream the
                // subscriber reset ends without one (nobody hears it).
                Err(status) => Err(unreadable(&status, "acknowledge")?),
            };
            let more = matches!(next, Ok(Inbound::Acknowledge { .. }));
            Some((next, more.then_some(requests)))
        },
    ))
}

/// A request that did not decode (too large, malformed) is the subscriber's error:
/// INVALID_ARGUMENT naming `field`. A stream the subscriber reset or lost is none (`None`).
fn unreadable(status: &Status, field: &'static str) -> Option<EventsError> {
    use tonic::Code;
    let lost = matches!(
        status.code(),
        Code::Cancelled | Code::Unavailable | Code::Unknown
    );
    (!lost).then(|| EventsError::Invalid {
        field,
        reason: format!("the request could not be read: {}", status.message()),
    })
}

/// One batch as responses of at most [`EVENTS_PER_RESPONSE`] events.
fn responses(batch: Batch, heartbeat: Option<prost_types::Duration>) -> Vec<pb::WatchResponse> {
    let Batch {
        events,
        position,
        complete_through,
        lease,
        replayed,
        read_after,
    } = batch;
    let mut events: Vec<pb::Event> = events.iter().filter_map(event).collect();
    let mut parts = Vec::new();
    while events.len() > EVENTS_PER_RESPONSE {
        let rest = events.split_off(EVENTS_PER_RESPONSE);
        parts.push(pb::WatchResponse {
            events: std::mem::replace(&mut events, rest),
            replayed,
            ..Default::default()
        });
    }
    parts.push(pb::WatchResponse {
        events,
        position,
        complete_through: Some(timestamp(complete_through)),
        heartbeat_interval: heartbeat,
        lease: lease.map(|grant| pb::Lease {
            valid_for: prost_types::Duration::try_from(grant.valid_for).ok(),
            acknowledgement: grant.acknowledgement,
        }),
        replayed,
        read_after,
    });
    parts
}

/// A row as the API shows it (`None`: a kind this release does not know).
fn event(row: &ChangeEvent) -> Option<pb::Event> {
    let user_id = row.user_id.to_string();
    let reason = row
        .reason()
        .map_or(pb::RevocationReason::Unspecified, reason) as i32;
    let kind = match row.kind()? {
        EventKind::SessionRevoked { session_id } => Kind::SessionRevoked(pb::SessionRevoked {
            session_id: session_id.to_string(),
            user_id,
            reason,
        }),
        EventKind::SessionsRevoked { cutoff, kept } => Kind::SessionsRevoked(pb::SessionsRevoked {
            user_id,
            cutoff: Some(timestamp(cutoff)),
            kept_session_id: kept.map(|k| k.to_string()).unwrap_or_default(),
            reason,
        }),
        EventKind::UserDisabled => Kind::UserDisabled(pb::UserDisabled { user_id }),
        EventKind::UserEnabled => Kind::UserEnabled(pb::UserEnabled { user_id }),
        EventKind::UserDeleted => Kind::UserDeleted(pb::UserDeleted { user_id }),
        EventKind::ProfileUpdated { version } => {
            Kind::ProfileUpdated(pb::ProfileUpdated { user_id, version })
        }
    };
    Some(pb::Event {
        occurred_at: Some(timestamp(row.created_at)),
        kind: Some(kind),
    })
}

fn reason(reason: Reason) -> pb::RevocationReason {
    match reason {
        Reason::Logout => pb::RevocationReason::Logout,
        Reason::Revoked => pb::RevocationReason::Revoked,
        Reason::RevokedAll => pb::RevocationReason::RevokedAll,
        Reason::SessionLimit => pb::RevocationReason::SessionLimit,
        Reason::PasswordChanged => pb::RevocationReason::PasswordChanged,
        Reason::PasswordReset => pb::RevocationReason::PasswordReset,
        Reason::UserDeleted => pb::RevocationReason::UserDeleted,
        Reason::UserDisabled => pb::RevocationReason::UserDisabled,
        Reason::Admin => pb::RevocationReason::Admin,
    }
}
