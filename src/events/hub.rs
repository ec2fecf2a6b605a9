//! A stream's passes over the log, and the loop that serves it: a pass when a revoker's
//! message arrives, when an acknowledgement's extension must be told, or at the heartbeat.
use std::{sync::Arc, time::Instant};

use futures::{Stream, StreamExt, future::BoxFuture};
use tokio::sync::{broadcast::error::TryRecvError, mpsc};
use tokio_util::sync::CancellationToken;

use super::{
    Events, EventsError,
    subscription::{Asked, Batch, Grant, Inbound, Mode, Sent, Subscription},
};
use crate::local::Heard;
use crate::store::{
    ChangeEvent, Stream as LogStream,
    follow::{BATCH, Ids, follow_ids},
};

impl Subscription {
    /// Reads where the log stands, then every row committed since the position, and answers
    /// them as one batch with the position after them; the messages received before the read
    /// began, and a grant made before it, ride with it. A position of another PostgreSQL
    /// history (a failover) is no longer held.
    pub async fn pass(&mut self) -> Result<Batch, EventsError> {
        let relays = std::mem::take(&mut self.relays);
        let read = self.events.read(&self.ids, self.read_since).await?;
        self.read_since = self.read_since.max(read.began);
        // What came before the read began rides with it; what came after waits for the next.
        let grant = self
            .grant
            .take_if(|(_, at)| *at <= read.began)
            .map(|(s, _)| s);
        let before = |at: &Instant| *at <= read.began;
        let heard = self
            .acks
            .iter()
            .filter(|(_, at)| before(at))
            .map(|(s, _)| *s);
        self.heard = heard.fold(self.heard, u64::max);
        self.acks.retain(|(_, at)| !before(at));
        let read_after = self.heard;
        let now = &read.now;
        // Another history (a failover), or rows this stream had not read were purged (it was
        // held up longer than the retention).
        let purged = self
            .ids
            .gaps
            .iter()
            .map(|g| g.from)
            .min()
            .unwrap_or(self.ids.top + 1)
            - 1;
        if now.history != self.history || purged < now.purged_through {
            return Err(EventsError::Expired);
        }
        let events = read.events.clone();
        if let Some(next) = &read.next {
            self.ids.clone_from(next);
        }
        let position = super::Position {
            history: self.history.clone(),
            ids: self.ids.clone(),
        }
        .encode();
        if self.mode == Mode::Strict {
            let follow_up = std::mem::replace(&mut self.follow_up, false);
            self.follow_up = !events.is_empty() && relays.is_empty();
            self.sent.push_back(Sent {
                position: position.clone(),
                at: now.at,
                awaited: !events.is_empty() || !relays.is_empty() || follow_up,
                relays,
            });
        }
        let length = self.events.local.lease();
        Ok(Batch {
            events,
            position,
            complete_through: now.at,
            lease: grant.map(|acknowledgement| Grant {
                valid_for: length,
                acknowledgement,
            }),
            replayed: std::mem::take(&mut self.replay),
            read_after,
        })
    }

    /// A revoker's message, relayed with the next pass (whose read begins after its receipt).
    fn heard_message(&mut self, message: Heard) {
        self.relays.push((message.origin, message.nonce));
        self.read_since = self.read_since.max(message.at);
    }

    /// Takes the messages received meanwhile; whether any came (or some were lost: the
    /// revokers then wait for the catch-up through the logs).
    fn take_messages(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.messages.try_recv() {
                Ok(message) => {
                    self.heard_message(message);
                    any = true;
                }
                Err(TryRecvError::Lagged(_)) => any = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => return any,
            }
        }
    }
}

/// The least time between the starts of two passes of a strict stream whose subscriber has
/// not acknowledged every batch (messages arriving meanwhile ride together). A pass starts at
/// once when the subscriber acknowledged every batch, so a revocation is not held (revokers
/// wait for strict subscribers) — a storm then costs a stream one pass per round trip to its
/// subscriber — or when the last began this long ago.
const MIN_GAP_STRICT: std::time::Duration = std::time::Duration::from_millis(2);
/// ...and of a bounded stream, whom nobody waits for: a storm costs it at most 100 passes a
/// second.
const MIN_GAP_BOUNDED: std::time::Duration = std::time::Duration::from_millis(10);
/// A stream whose subscriber has not taken a batch for this long ends.
const UNREAD: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves `subscription` until the subscriber closes its side, an error ends the stream, or
/// `stop`: batches go to `out` (an error last, if any), acknowledgements come from `inbound`.
pub async fn serve(
    mut subscription: Subscription,
    mut inbound: impl Stream<Item = Result<Inbound, EventsError>> + Unpin,
    out: mpsc::Sender<Result<Batch, EventsError>>,
    stop: CancellationToken,
) {
    // A strict stream passes at least every quarter lease: each pass's acknowledgement is
    // what extends the lease.
    let heartbeat = subscription.events.heartbeat();
    let (heartbeat, min_gap) = match subscription.mode() {
        Mode::Strict => (
            heartbeat.min(subscription.events.local.lease() / 4),
            MIN_GAP_STRICT,
        ),
        Mode::Bounded => (heartbeat, MIN_GAP_BOUNDED),
    };
    let mut listening = true;
    let mut delivered = false;
    let mut last_pass: Option<Instant> = None;
    let mut extending = Extending::default();
    let ended = 'serving: loop {
        if !subscription.paused() {
            // Messages arriving together make one pass.
            if let Some(last) = last_pass
                && !subscription.caught_up()
            {
                tokio::time::sleep_until((last + min_gap).into()).await;
            }
            last_pass = Some(Instant::now());
            subscription.take_messages();
            let batch = match subscription.pass().await {
                Ok(batch) => batch,
                Err(error) => break Some(error),
            };
            let sent = u64::try_from(batch.events.len()).unwrap_or(u64::MAX);
            subscription.events.metrics.events_sent.inc_by(sent);
            // A subscriber that does not read is not waited for past this.
            match tokio::time::timeout(UNREAD, out.send(Ok(batch))).await {
                Ok(Ok(())) => delivered = true,
                // Nobody took the first batch (the call was answered otherwise): nothing was
                // trusted on this lease, which ends now.
                Ok(Err(_)) if !delivered => {
                    extending.settle(&mut subscription).await;
                    subscription.closed().await;
                    break None;
                }
                Ok(Err(_)) | Err(_) => break None,
            }
        }
        let next_pass = Instant::now() + heartbeat;
        let woken = loop {
            let lease_ends = subscription.lease_ends();
            tokio::select! {
                made = extending.made(), if extending.running() => {
                    extending.next(&subscription);
                    match made.and_then(|(asked, running)| subscription.extended(asked, running)) {
                        Ok(true) => break None,
                        Ok(false) => {}
                        Err(error) => break Some(error),
                    }
                }
                () = stop.cancelled() => break Some(EventsError::ShuttingDown),
                // The call is gone (the subscriber left): its permit goes now.
                () = out.closed() => break 'serving None,
                () = tokio::time::sleep_until(next_pass.into()), if !subscription.paused() => {
                    break None;
                }
                // The host's own reckoning: an extension being made may yet move it.
                () = sleep_until(lease_ends), if !extending.running() => {
                    break Some(EventsError::LeaseLost);
                }
                received = subscription.messages.recv() => {
                    if let Ok(message) = received {
                        subscription.heard_message(message);
                    }
                    if !subscription.paused() {
                        break None;
                    }
                }
                request = inbound.next(), if listening => match request {
                    Some(Ok(Inbound::Acknowledge { position, sequence })) => {
                        match subscription.acknowledged(&position, sequence).await {
                            Ok(Some(asked)) => extending.ask(&subscription, asked),
                            Ok(None) => {}
                            Err(error) => break Some(error),
                        }
                        if subscription.due() {
                            break None;
                        }
                    }
                    Some(Err(error)) => break Some(error),
                    // A strict subscriber that closes its side keeps nothing: its lease ends now.
                    // A bounded one needs to send nothing (`grpcurl` closes its side at once).
                    Some(Ok(Inbound::Closed)) if subscription.mode() == Mode::Strict => {
                        extending.settle(&mut subscription).await;
                        subscription.closed().await;
                        break 'serving None;
                    }
                    Some(Ok(Inbound::Closed)) => listening = false,
                    // Broken: the subscriber may still serve until it notices; its lease runs
                    // out.
                    None => break 'serving None,
                },
            }
        };
        if let Some(error) = woken {
            break Some(error);
        }
    };
    if let Some(error) = ended {
        let _ = tokio::time::timeout(UNREAD, out.send(Err(error))).await;
    }
    // An extension asked for is made whether awaited or not: the lease's row is forgotten
    // once its end, that one included, has passed.
    extending.settle(&mut subscription).await;
    subscription.forget_lease().await;
}

type Extension = BoxFuture<'static, Result<bool, EventsError>>;

/// A stream's lease extensions: the one being made, beside the stream, and the one asked for
/// meanwhile (the newest: its time and acknowledgement are the latest).
#[derive(Default)]
struct Extending {
    running: Option<(Asked, Extension)>,
    next: Option<Asked>,
}

impl Extending {
    fn running(&self) -> bool {
        self.running.is_some()
    }

    fn ask(&mut self, subscription: &Subscription, asked: Asked) {
        match self.running {
            Some(_) => self.next = Some(asked.after(self.next)),
            None => self.running = Some((asked, subscription.extend(&asked))),
        }
    }

    /// The running extension's outcome (call only while [`Self::running`]); then call
    /// [`Self::next`].
    async fn made(&mut self) -> Result<(Asked, bool), EventsError> {
        let Some((asked, extension)) = self.running.as_mut() else {
            return std::future::pending().await;
        };
        let asked = *asked;
        let running = extension.await;
        self.running = None;
        running.map(|running| (asked, running))
    }

    /// Starts the extension asked for meanwhile, if any.
    fn next(&mut self, subscription: &Subscription) {
        if let Some(asked) = self.next.take() {
            self.ask(subscription, asked);
        }
    }

    /// Waits for the extension being made and takes it into account (the stream is ending, or
    /// its subscriber said it keeps nothing): none is asked for after.
    async fn settle(&mut self, subscription: &mut Subscription) {
        self.next = None;
        if self.running()
            && let Ok((asked, running)) = self.made().await
        {
            let _ = subscription.extended(asked, running);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A position as the streams share reads from it: its top and its gaps' ids. (Not when each
/// gap may be forgotten: a stream that shares a read takes the reader's times, and each is a
/// valid one — a transaction that drew a gap's ids began before any read saw the gap.)
pub(super) type At = (i64, Vec<(i64, i64)>);

/// One read of the log from a position: where the log stood, the rows committed since, and
/// the position after them (`None`: nothing to move).
pub(super) struct Read {
    /// When the read began.
    began: Instant,
    now: LogStream,
    events: Vec<ChangeEvent>,
    next: Option<Ids>,
}

impl Events {
    /// Where the log stands and the rows after `ids`, read at or after `since`. The streams
    /// at one position share one read (a revocation wakes every strict stream at once: one
    /// read for all of them, not one each), never one that began before `since`.
    async fn read(&self, ids: &Ids, since: Instant) -> Result<Arc<Read>, EventsError> {
        let failed = std::sync::Mutex::new(None);
        let at: At = (ids.top, ids.gaps.iter().map(|g| (g.from, g.to)).collect());
        let (read, led) = self
            .reads
            .run_since(at, since, || async {
                match self.read_alone(ids).await {
                    Ok(read) => Some(Arc::new(read)),
                    Err(error) => {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
                        None
                    }
                }
            })
            .await;
        match (read, led) {
            (Some(read), _) => Ok(read),
            (None, true) => Err(failed
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .unwrap_or(EventsError::Store(crate::store::StoreError::Unavailable(
                    None,
                )))),
            // The shared read failed: this stream's own read tells why (or succeeds).
            (None, false) => self.read_alone(ids).await.map(Arc::new),
        }
    }

    async fn read_alone(&self, ids: &Ids) -> Result<Read, EventsError> {
        let began = Instant::now();
        let log = self.db.events();
        let now = log.stream().await?;
        let rows = std::sync::Mutex::new(Vec::<ChangeEvent>::new());
        let next = follow_ids(
            ids,
            now.high,
            self.in_flight,
            None,
            |above| log.above(above, BATCH),
            |ranges| async move { log.within(&ranges).await },
            |batch| {
                rows.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .extend(batch);
                std::future::ready(true)
            },
        )
        .await?;
        let mut events = rows.into_inner().unwrap_or_else(|e| e.into_inner());
        events.sort_by_key(|e| (e.created_at, e.id));
        Ok(Read {
            began,
            now,
            events,
            next,
        })
    }

    /// Opens a stream for `mode` from `resume` and serves it on a task of its own (see
    /// [`serve`]).
    pub async fn watch(
        self: &Arc<Self>,
        mode: Mode,
        resume: Option<&str>,
        inbound: impl Stream<Item = Result<Inbound, EventsError>> + Unpin + Send + 'static,
        stop: CancellationToken,
    ) -> Result<mpsc::Receiver<Result<Batch, EventsError>>, EventsError> {
        let subscription = Subscription::open(self.clone(), mode, resume).await?;
        let (out, batches) = mpsc::channel(4);
        let streams = self.metrics.event_streams.with_label_values(&[match mode {
            Mode::Bounded => "bounded",
            Mode::Strict => "strict",
        }]);
        streams.inc();
        tokio::spawn(crate::store::in_background(async move {
            serve(subscription, inbound, out, stop).await;
            streams.dec();
        }));
        Ok(batches)
    }
}
