//! One stream: its start, its position, its lease (strict mode) and the acknowledgements that
//! extend it (see the module comment of `crate::events`).
use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, TimeDelta, Utc};
use futures::future::BoxFuture;
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

/// A lease extension an acknowledgement asked for.
#[derive(Debug, Clone, Copy)]
pub struct Asked {
    lease: Uuid,
    /// The time the acknowledged pass began: what was committed before is applied.
    applied_through: DateTime<Utc>,
    /// When it was asked for: the lease runs from no earlier.
    asked: Instant,
    /// The acknowledgement it answers.
    sequence: u64,
    /// A quarter lease went by since the last extension (else a revoker may wait for it).
    renewal: bool,
}

impl Asked {
    /// This extension in place of `queued`, asked for earlier and not yet made: a renewal if
    /// either was (its grant is then told at once).
    pub fn after(self, queued: Option<Asked>) -> Asked {
        Asked {
            renewal: self.renewal || queued.is_some_and(|q| q.renewal),
            ..self
        }
    }
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
    /// When the host last asked for an extension (made or being made).
    pub(super) asked: Instant,
    /// An extension not yet told: the acknowledgement it answers, and when it was made (it
    /// goes with the first pass whose read began after).
    pub(super) grant: Option<(u64, Instant)>,
    pub(super) messages: broadcast::Receiver<Heard>,
    /// Messages received since the last pass began.
    pub(super) relays: Vec<(Uuid, u64)>,
    pub(super) sent: VecDeque<Sent>,
    /// The first pass replays the recent past.
    pub(super) replay: bool,
    /// The latest acknowledgement received before the last pass's read began (0: none yet,
    /// the subscribe request): that pass's `read_after`.
    pub(super) heard: u64,
    /// Acknowledgements received since, with when.
    pub(super) acks: Vec<(u64, Instant)>,
    /// The next pass's read must begin at or after this: the receipt of the latest message it
    /// carries (its revoker had committed), and no earlier than the last pass's read. (A read
    /// of the log shared with other streams that began since is this stream's read: the pass
    /// is one that began then, and carries the grant and names the acknowledgement made and
    /// received before that. See `Events::read`.)
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
            asked: Instant::now(),
            grant: lease.map(|_| (0, Instant::now())),
            messages,
            relays: Vec::new(),
            sent: VecDeque::new(),
            replay,
            heard: 0,
            acks: Vec::new(),
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
    /// mode, the lease is to be extended when a revoker may wait for this acknowledgement or a
    /// quarter lease went by: the extension to make (see [`Self::extend`]), which records as
    /// applied what was committed before the acknowledged pass began.
    pub async fn acknowledged(
        &mut self,
        position: &str,
        sequence: u64,
    ) -> Result<Option<Asked>, EventsError> {
        let received = Instant::now();
        // At most so many kept (a bounded subscriber need not name a batch): past it, the last
        // stands for the newest, received at the latest time (named no earlier).
        if self.acks.len() >= UNACKNOWLEDGED {
            self.acks.pop();
        }
        self.acks.push((sequence, received));
        let Some(lease) = self.lease else {
            return Ok(None);
        };
        let Some(k) = self.sent.iter().position(|s| s.position == position) else {
            return Err(EventsError::Invalid {
                field: "acknowledge.position",
                reason: "not a batch of this stream awaiting acknowledgement".to_owned(),
            });
        };
        let covered: Vec<Sent> = self.sent.drain(..=k).collect();
        self.relay(lease, &covered).await;
        if self.follow_up {
            // The follow-up pass reads after this acknowledgement arrived.
            self.read_since = self.read_since.max(received);
        }
        let awaited = covered.iter().any(|s| s.awaited);
        let length = self.events.local.lease();
        // Counted from the last extension asked for (one being made counts).
        let renewal = self.extended.max(self.asked).elapsed() >= length / 4;
        if !renewal && !awaited {
            return Ok(None);
        }
        self.asked = Instant::now();
        Ok(Some(Asked {
            lease,
            applied_through: covered.last().map(|s| s.at).unwrap_or_default(),
            asked: self.asked,
            sequence,
            renewal,
        }))
    }

    /// Makes the extension `asked` (extensions asked for together go in one statement); it
    /// runs beside the stream, which keeps passing meanwhile: whether the lease was running.
    pub fn extend(&self, asked: &Asked) -> BoxFuture<'static, Result<bool, EventsError>> {
        self.events
            .extensions
            .extend(asked.lease, asked.applied_through)
    }

    /// The extension `asked` was made (`running`: the lease had not ended): its grant goes
    /// with the first pass read after now. `true`: pass now — the lease was renewed for time
    /// (its grant keeps the subscriber trusting); an extension a revoker asked for is told
    /// with whichever pass comes next (a lone revocation costs one pass, not two).
    pub fn extended(&mut self, asked: Asked, running: bool) -> Result<bool, EventsError> {
        if !running {
            return Err(EventsError::LeaseLost);
        }
        self.extended = self.extended.max(asked.asked);
        let made = Instant::now();
        self.grant = Some((asked.sequence, made));
        if asked.renewal {
            // The pass that follows at once carries it.
            self.read_since = self.read_since.max(made);
        }
        Ok(asked.renewal)
    }

    /// A pass is due at once: a follow-up, or messages waiting (a paused stream resumes).
    pub fn due(&self) -> bool {
        self.follow_up || !self.relays.is_empty()
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
