//! The event stream (EventService.Watch): a caller keeps validations and profiles in its own
//! memory and hears, in commit order and without gaps, every change that invalidates one —
//! read from the log the changes' own statements write (`store::EventRepo`).
//!
//! # Strict subscribers hold leases, as instances do
//!
//! A strict subscriber's lease is a row of the lease table (`local_cache_leases`), taken by the
//! instance serving its stream (its *host*) and of the fleet's length. Every revoking call and
//! UpdateProfile already waits for every row of that table (see `crate::local`): for the
//! holder's acknowledgement of its message, its catch-up through the logs (`applied_through`),
//! or its lease's end. So it waits for subscribers without a line of its own. The protocol is
//! checked by the model (`model/`, its `Sub*` actions):
//!
//! - **Pass** (`Subscription::pass`): the host reads where the log stands (PostgreSQL's time,
//!   the last id handed out), then every row committed since the subscription's position, and
//!   sends them in one batch with that time (`complete_through`) and the position after them.
//!   The revokers' messages the host received before the pass began ride with it. Streams at
//!   one position share a read that began after the messages a pass carries were received
//!   (`hub`'s `Events::read`): the pass is then one that began when that read did, and carries
//!   only the grant made and names only the acknowledgement received before it.
//! - **Acknowledgement** (`Subscription::acknowledged`): the subscriber applied a batch. The
//!   host acknowledges the messages it carried to their revokers at once (`relay`: the
//!   subscriber applied them, whatever becomes of its lease). When a revoker may be waiting
//!   (the batches it covers carried events or messages) or a quarter of the lease went by, the
//!   host then extends the lease (`extend`, beside the stream; extensions asked for together go
//!   in one statement), recording as applied the time the acknowledged pass began (never the
//!   extension's: a pass read before a revocation would then end its wait).
//! - **Grant**: the extension is told to the subscriber with the *next* pass, which began after
//!   it, and the subscriber believes it from before it sent the acknowledgement. (A grant
//!   believed before the pass that follows it is applied would cover a revocation committed
//!   between the acknowledged pass's read and the extension, whose revoker saw the old end.)
//! - **A new subscription** starts with a fresh lease and replays the recent past (the wait
//!   horizon): a validation the subscriber fetches from authd may come from an instance still
//!   waited for, so what the stream showed is kept as floors no fetched copy may go below, and
//!   the first batch sets them for revocations committed before it began.
//! - **The end.** A lease is never released for a subscriber that did not say it stopped (it
//!   may still serve until it notices): it runs out. One that half-closes its stream has
//!   dropped everything, and its lease ends at once.
mod extensions;
mod hub;
mod position;
mod subscription;

use std::{sync::Arc, time::Duration};

use tokio::sync::Semaphore;

pub use position::Position;
pub use subscription::{Batch, Grant, Inbound, Mode, Subscription};

use crate::{
    config::EventsSettings,
    local::LocalCache,
    metrics::Metrics,
    store::{Db, coalesce::Coalescer},
};

/// What goes wrong with a stream, as its caller is told.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// A request field is wrong.
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The position is older than what is kept, or of another PostgreSQL history.
    #[error("the position is no longer held: drop the cache and subscribe with no position")]
    Expired,
    /// This instance serves as many streams (strict ones, when `strict`) as it may.
    #[error("this instance serves as many event streams as it may")]
    Full { strict: bool },
    /// `EVENTS__MAX_STRICT` is 0: this fleet offers bounded mode only.
    #[error("strict mode is not offered (EVENTS__MAX_STRICT=0): subscribe in MODE_BOUNDED")]
    StrictOff,
    /// The subscriber stopped acknowledging and its lease ended.
    #[error("the subscriber's lease ended: drop the cache and subscribe anew")]
    LeaseLost,
    /// The service is stopping.
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Everything the streams of this instance share.
pub struct Events {
    db: Arc<Db>,
    local: LocalCache,
    settings: EventsSettings,
    metrics: Arc<Metrics>,
    /// See `store::in_flight`.
    in_flight: chrono::TimeDelta,
    streams: Arc<Semaphore>,
    strict: Arc<Semaphore>,
    /// The passes' reads, shared by the streams at one position (see `hub`).
    reads: Coalescer<hub::At, Option<Arc<hub::Read>>>,
    /// The strict streams' lease extensions, gathered.
    extensions: extensions::Extensions,
}

impl Events {
    pub fn new(
        db: Arc<Db>,
        local: LocalCache,
        settings: EventsSettings,
        in_flight: chrono::TimeDelta,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            streams: Arc::new(Semaphore::new(settings.max_subscribers)),
            strict: Arc::new(Semaphore::new(settings.max_strict)),
            reads: Coalescer::default(),
            extensions: extensions::Extensions::start(db.clone(), local.lease()),
            db,
            local,
            settings,
            metrics,
            in_flight,
        }
    }

    pub fn heartbeat(&self) -> Duration {
        self.settings.heartbeat
    }
}
