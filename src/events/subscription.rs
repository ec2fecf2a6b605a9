//! One stream: its start, its position, its lease (strict mode) and the acknowledgements that
//! extend it (see the module comment of `crate::events`).
use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::{OwnedSemaphorePermit, broadcast};
use uuid::Uuid;

use super::{Events, EventsError, Position, position::Refused};
use crate::store::{ChangeEvent, follow::Ids};

/// How a subscriber trusts its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bounded,
    Strict,
}

/// What the subscriber sent after its subscribe request.
#[derive(Debug)]
pub enum Inbound {
    Acknowledge {
        position: String,
        sequence: u64,
    },
    /// It closed its side: it keeps nothing from the stream any more.
    Closed,
}

/// A lease granted before a batch's read began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub valid_for: Duration,
    /// The acknowledgement it answers (0: the subscribe request).
    pub acknowledgement: u64,
}

/// One pass's batch.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<ChangeEvent>,
    pub position: String,
    pub complete_through: DateTime<Utc>,
    pub lease: Option<Grant>,
    pub replayed: bool,
    /// The latest acknowledgement received when the pass began (0: the subscribe request).
    pub read_after: u64,
}

/// A batch sent and not yet acknowledged (strict mode).
pub(super) struct Sent {
    pub position: String,
    /// PostgreSQL's time when its pass began.
    pub at: DateTime<Utc>,
    /// It carried events or revokers' messages: a revoker may wait for its acknowledgement.
    pub awaited: bool,
    pub relays: Vec<(Uuid, u64)>,
}

/// Batches a strict subscriber may leave unacknowledged; the stream pauses at that many.
pub(super) const UNACKNOWLEDGED: usize = 64;

pub struct Subscription {
    pub(super) events: Arc<Events>,
    pub(super) mode: Mode,
    pub(super) history: String,
    pub(super) ids: Ids,
    /// Strict mode: the lease's id in the lease table.
    pub(super) lease: Option<Uuid>,
    /// When the host last extended (or took) the lease.
    pub(super) extended: Instant,
    /// An extension not yet told: the acknowledgement it answers.
    pub(super) grant: Option<u64>,
    pub(super) messages: broadcast::Receiver<(Uuid, u64)>,
    /// Messages received since the last pass began.
    pub(super) relays: Vec<(Uuid, u64)>,
    pub(super) sent: VecDeque<Sent>,
    /// The first pass replays the recent past.
    pub(super) replay: bool,
    /// The latest acknowledgement received (0: none yet, the subscribe request).
    pub(super) heard: u64,
    /// The last pass read events no revoker's message came with: the next one's
    /// acknowledgement extends the lease too. (An event committed after a pass began may be
    /// read by it; the extension records as applied only what was committed before the pass
    /// began. A revoker waiting through the lease table, not a message, sees its change
    /// applied once a pass that began after its read of the holders is acknowledged: usually
    /// the next one; else the quarter-lease extension.)
    pub(super) follow_up: bool,
    _permits: (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>),
}

impl Subscription {
    /// `resume`: a position an earlier stream sent, or `None` to start from now (replaying
    /// the wait horizon). A strict subscription takes its lease here, before its first pass.
    pub async fn open(
        events: Arc<Events>,
        mode: Mode,
        resume: Option<&str>,
    ) -> Result<Self, EventsError> {
        let full = |strict| move |_| EventsError::Full { strict };
        let stream = events
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(full(false))?;
        if mode == Mode::Strict && events.settings.max_strict == 0 {
            return Err(EventsError::StrictOff);
        }
        let strict = match mode {
            Mode::Strict => Some(
                events
                    .strict
                    .clone()
                    .try_acquire_owned()
                    .map_err(full(true))?,
            ),
            Mode::Bounded => None,
        };
        let until = Instant::now() + gap_allowance(events.in_flight);
        let resume = resume
            .map(|text| Position::parse(text, until))
            .transpose()
            .map_err(|refused| match refused {
                Refused::Malformed => EventsError::Invalid {
                    field: "subscribe.resume_position",
                    reason: "not a position this service sent".to_owned(),
                },
                Refused::TooWide => EventsError::Expired,
            })?;
        // Heard from now on: a message that arrives before the first pass rides with it.
        let messages = events.local.messages();
        let log = events.db.events();
        let now = log.stream().await?;
        let (ids, replay) = match resume {
            Some(position) => {
                let held = position.history == now.history
                    && position.ids.top >= now.purged_through
                    && position.ids.top <= now.high;
                if !held {
                    return Err(EventsError::Expired);
                }
                (position.ids, false)
            }
            None => {
                let horizon = events.local.horizon().to_std().unwrap_or_default();
                let top = log.start_after(horizon).await?;
                (
                    Ids {
                        top,
                        gaps: Vec::new(),
                    },
                    true,
                )
            }
        };
        let lease = match mode {
            Mode::Strict => Some(take_lease(&events).await?),
            Mode::Bounded => None,
        };
        Ok(Self {
            mode,
            history: now.history,
            ids,
            lease,
            extended: Instant::now(),
            grant: lease.map(|_| 0),
            messages,
            relays: Vec::new(),
            sent: VecDeque::new(),
            replay,
            heard: 0,
            follow_up: false,
            _permits: (stream, strict),
            events,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The subscriber applied everything through `position` (a batch this stream sent). In
    /// strict mode, the lease is extended when a revoker may wait for this acknowledgement or
    /// a quarter lease went by; the extension records as applied what was committed before the
    /// acknowledged pass began, the revokers' messages it covers are acknowledged, and the
    /// grant goes with the next pass (`true`: pass now to send it).
    pub async fn acknowledged(
        &mut self,
        position: &str,
        sequence: u64,
    ) -> Result<bool, EventsError> {
        let Some(lease) = self.lease else {
            self.heard = self.heard.max(sequence);
            return Ok(false);
        };
        let Some(k) = self.sent.iter().position(|s| s.position == position) else {
            return Err(EventsError::Invalid {
                field: "acknowledge.position",
                reason: "not a batch of this stream awaiting acknowledgement".to_owned(),
            });
        };
        self.heard = self.heard.max(sequence);
        let covered: Vec<Sent> = self.sent.drain(..=k).collect();
        let awaited = covered.iter().any(|s| s.awaited);
        let length = self.events.local.lease();
        if !awaited && self.extended.elapsed() < length / 4 {
            return Ok(false);
        }
        let at = covered.last().map(|s| s.at).unwrap_or_default();
        let asked = Instant::now();
        let extended = self.events.db.leases().extend(lease, length, at).await?;
        if extended.is_none() {
            return Err(EventsError::LeaseLost);
        }
        self.extended = asked;
        self.grant = Some(sequence);
        let local = &self.events.local;
        let relays = covered.into_iter().flat_map(|s| s.relays);
        let acks = relays.map(|(origin, nonce)| local.acknowledge_for(lease, origin, nonce));
        futures::future::join_all(acks).await;
        Ok(true)
    }

    /// When the lease ends unless extended before (strict mode).
    pub fn lease_ends(&self) -> Option<Instant> {
        self.lease
            .map(|_| self.extended + self.events.local.lease())
    }

    /// Whether the stream must wait for acknowledgements before its next pass.
    pub fn paused(&self) -> bool {
        self.sent.len() >= UNACKNOWLEDGED
    }

    /// The subscriber closed its side: it keeps nothing, and its lease ends now.
    pub async fn closed(&mut self) {
        if let Some(lease) = self.lease {
            let _ = self.events.db.leases().release(lease).await;
            self.extended = Instant::now()
                .checked_sub(self.events.local.lease())
                .unwrap_or_else(Instant::now);
        }
    }

    /// The stream ended: once its lease has run out (revokers no longer wait for it), its row
    /// goes, on a task of its own (a subscriber that reconnects often leaves no rows behind).
    pub(super) async fn forget_lease(&mut self) {
        let Some(ends) = self.lease_ends() else {
            return;
        };
        let Some(lease) = self.lease.take() else {
            return;
        };
        let db = self.events.db.clone();
        let margin = crate::clock::lease_wait(Duration::ZERO);
        tokio::spawn(crate::store::in_background(async move {
            tokio::time::sleep_until((ends + margin).into()).await;
            if let Err(error) = db.leases().forget(lease).await {
                tracing::debug!(%error, "an ended subscriber's lease row stays (purged in a day)");
            }
        }));
    }
}

/// A fresh lease of the fleet's length for a strict subscription.
async fn take_lease(events: &Events) -> Result<Uuid, EventsError> {
    let id = Uuid::new_v4();
    let length = events.local.lease();
    match events.db.leases().register(id, length).await? {
        Some(_) => Ok(id),
        // The fleet's lease changed while this instance ran: it takes no lease of the old one.
        None => Err(EventsError::Store(crate::store::StoreError::Unavailable(
            None,
        ))),
    }
}

/// The allowance after which a gap of a position is forgotten.
pub(super) fn gap_allowance(in_flight: TimeDelta) -> Duration {
    in_flight.to_std().unwrap_or_default() + Duration::from_secs(1)
}
