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
use crate::{
    local::Heard,
    store::{ChangeEvent, follow::Ids},
};

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

/// Why an acknowledgement extended the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extension {
    /// A quarter lease went by since the last extension.
    Renewed,
    /// A revoker may wait for it.
    Awaited,
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
    pub(super) messages: broadcast::Receiver<Heard>,
    /// Messages received since the last pass began.
    pub(super) relays: Vec<(Uuid, u64)>,
    pub(super) sent: VecDeque<Sent>,
    /// The first pass replays the recent past.
    pub(super) replay: bool,
    /// The latest acknowledgement received (0: none yet, the subscribe request).
    pub(super) heard: u64,
    /// The next pass's read must begin at or after this: when the latest of what it answers
    /// for happened — the receipt of a message it carries or of the acknowledgement it is read
    /// after, the extension it grants, the lease taken — and no earlier than the last pass's
    /// read. (A read of the log shared with other streams that began since is this stream's
    /// read: the pass is one that began then. See `Events::read`.)
    pub(super) read_since: Instant,
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
            read_since: Instant::now(),
            follow_up: false,
            _permits: (stream, strict),
            events,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The subscriber applied everything through `position` (a batch this stream sent): the
    /// revokers' messages it covers are acknowledged at once (see [`Self::relay`]). In strict
    /// mode, the lease is then extended when a revoker may wait for this acknowledgement or a
    /// quarter lease went by; the extension records as applied what was committed before the
    /// acknowledged pass began, and the grant goes with the next pass. `true`: pass now — the
    /// lease was renewed for time (its grant keeps the subscriber trusting), a follow-up is
    /// due, or messages wait (a paused stream resumes); an extension a revoker asked for is
    /// told with whichever pass comes next (a lone revocation costs one pass, not two).
    pub async fn acknowledged(
        &mut self,
        position: &str,
        sequence: u64,
    ) -> Result<bool, EventsError> {
        let extended = self.acknowledge(position, sequence).await?;
        Ok(extended == Some(Extension::Renewed) || self.follow_up || !self.relays.is_empty())
    }

    async fn acknowledge(
        &mut self,
        position: &str,
        sequence: u64,
    ) -> Result<Option<Extension>, EventsError> {
        let received = Instant::now();
        let Some(lease) = self.lease else {
            self.heard = self.heard.max(sequence);
            self.read_since = self.read_since.max(received);
            return Ok(None);
        };
        let Some(k) = self.sent.iter().position(|s| s.position == position) else {
            return Err(EventsError::Invalid {
                field: "acknowledge.position",
                reason: "not a batch of this stream awaiting acknowledgement".to_owned(),
            });
        };
        self.heard = self.heard.max(sequence);
        self.read_since = self.read_since.max(received);
        let covered: Vec<Sent> = self.sent.drain(..=k).collect();
        self.relay(lease, &covered).await;
        let awaited = covered.iter().any(|s| s.awaited);
        let length = self.events.local.lease();
        let extension = if self.extended.elapsed() >= length / 4 {
            Extension::Renewed
        } else if awaited {
            Extension::Awaited
        } else {
            return Ok(None);
        };
        let at = covered.last().map(|s| s.at).unwrap_or_default();
        let asked = Instant::now();
        if !self.events.extensions.extend(lease, at).await? {
            return Err(EventsError::LeaseLost);
        }
        self.extended = asked;
        self.grant = Some(sequence);
        self.read_since = Instant::now();
        Ok(Some(extension))
    }

    /// The subscriber applied the passes `covered`: the revokers whose messages they carried
    /// are told at once, before the lease's extension (which is not on their path) and
    /// whatever becomes of the lease.
    async fn relay(&self, lease: Uuid, covered: &[Sent]) {
        let local = &self.events.local;
        let relays = covered.iter().flat_map(|s| &s.relays);
        let acks = relays.map(|(origin, nonce)| local.acknowledge_for(lease, *origin, *nonce));
        futures::future::join_all(acks).await;
    }

    /// When the lease ends unless extended before (strict mode).
    pub fn lease_ends(&self) -> Option<Instant> {
        self.lease
            .map(|_| self.extended + self.events.local.lease())
    }

    /// A strict subscriber that acknowledged every batch sent (a bounded one never counts as
    /// such: nobody waits for it).
    pub fn caught_up(&self) -> bool {
        self.mode == Mode::Strict && self.sent.is_empty()
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
