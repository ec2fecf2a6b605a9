//! The state of the whole system: PostgreSQL, Redis, the wire between instances, every instance,
//! the caller making the change, and what callers have observed.
//!
//! One key is modelled (one session, or one profile): the key's *version* is 0 at the start and
//! each change raises it (a revocation is version 1, and stays so). Every copy carries the version
//! it was read at; a read answers with a version, and a promise is broken when it answers less
//! than what a change that already returned made.
//!
//! Time is relative: every instant is kept as an age (ticks since it) or a remaining duration
//! (ticks until it), saturating, so two states that differ only by when they happen are one
//! state, and the space is finite without a horizon. PostgreSQL's clock is the only clock
//! (instances' clocks are modelled as agreeing with it; their rate margins as the tick by which
//! a holder's belief falls short of its lease's end).

/// PostgreSQL: the source of truth.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pg {
    /// The key's version (`sessions.revoked_at`, `profiles.version`).
    pub version: u8,
    /// How long ago the session was revoked (its invalidation-log row, same statement).
    pub revoked_age: Option<u8>,
    /// `local_cache_leases`, per instance.
    pub leases: Vec<Option<LeaseRow>>,
    /// The timeline (`pg_control_checkpoint()`): a promoted standby starts a new one.
    pub timeline: u8,
    /// How long ago an instance first saw the current timeline
    /// (`database_timelines.first_seen_at`).
    pub timeline_seen_age: Option<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseRow {
    /// Until `expires_at` (0: ended).
    pub end_in: u8,
    /// Since `applied_through`: the holder has read the logs (and dropped what they name) in a
    /// read that began after it.
    pub applied_age: u8,
}

/// What one Redis key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    Empty,
    /// A fill lease, taken by this instance's read before its PostgreSQL read.
    Lease(u8),
    /// A copy, written under a lease, in a generation.
    Copy {
        version: u8,
        generation: u8,
    },
    /// A tombstone or profile version: honoured in every generation.
    Invalidation {
        version: u8,
    },
}

impl Slot {
    /// The version an invalidation write leaves (never lower than what is there).
    pub fn raised(self, version: u8) -> Slot {
        match self {
            Slot::Invalidation { version: v } if v >= version => self,
            _ => Slot::Invalidation { version },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Redis {
    pub slot: Slot,
    /// The identity of the primary's data (run id + replication id): every restart, restore or
    /// promotion changes it, hence the generation an instance binds to it.
    pub identity: u8,
    /// What the key held before the last invalidation was written, which a replica may still
    /// hold (kept when a failover is a fault of the run).
    pub unreplicated: Option<Slot>,
}

/// A message on Redis pub/sub.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Wire {
    /// `<prefix>local:invalidations`: drop the key (from `from`, for its attempt `attempt`).
    Invalidation { to: u8, from: u8, attempt: u8 },
    /// `<prefix>local:acks:<from>`: `holder` dropped it.
    Ack { to: u8, holder: u8, attempt: u8 },
    /// On the invalidation channel too: the log's rows through `version` were written to the
    /// cache of `generation` (by a revoker or a follower), so the receiver's follower need not
    /// write them again in that generation.
    Applied { to: u8, generation: u8, version: u8 },
}

impl Wire {
    pub fn to(self) -> u8 {
        match self {
            Wire::Invalidation { to, .. } | Wire::Ack { to, .. } | Wire::Applied { to, .. } => to,
        }
    }
}

/// One authd instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Instance {
    pub paused: bool,
    pub pg_link: bool,
    pub redis_link: bool,
    /// The generation this instance serves Redis copies of (0: none established).
    pub generation: u8,
    /// Redis copies are served for this long still (a follower pass began `bound` before that).
    pub trusted_for: u8,
    /// Since its follower last completed a pass (its namespace's cursor); `None` before one.
    pub position_age: Option<u8>,
    /// The (identity, version) its Redis cache has applied (the registry of applied rows).
    pub applied: (u8, u8),
    /// The highest version its follower has read in its generation (each row is read once, and
    /// its local copy dropped then, whether or not the row still needed writing).
    pub followed: u8,
    /// Its own invalidation write of the key failed: it serves no Redis copy of it.
    pub pending: bool,
    /// The in-process copy (a version), if any.
    pub copy: Option<u8>,
    /// How much longer it believes its lease lasts (copies are served while it is not 0).
    pub belief_for: u8,
    /// Its subscription works and its heartbeat came back.
    pub hearing: bool,
    /// A doubt happened: the keeper releases the lease and takes a fresh one.
    pub lost: bool,
    /// The lease it holds: since PostgreSQL's time of its last extension (or grant).
    pub held_age: Option<u8>,
    /// The highest version the logs showed its renewal (fills below it are not kept).
    pub seen: u8,
    /// The PostgreSQL timeline it knows.
    pub timeline: u8,
    /// The read in progress on it (one at a time).
    pub read: Option<Read>,
}

/// A validation (or profile read) in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Read {
    /// What the change had returned when this read began: the version it promised.
    pub promised: Option<Promise>,
    /// A drop happened on the instance since the read began (its ticket is void).
    pub voided: bool,
    pub stage: ReadStage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadStage {
    /// About to read Redis.
    Redis,
    /// About to read PostgreSQL, holding the fill lease or not.
    Postgres { lease: bool },
    /// Answered with `version`; about to fill Redis (under the lease) and keep a local copy.
    Keep { version: u8, lease: bool },
}

/// What a change that returned OK promised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Promise {
    pub version: u8,
    /// Since that version was committed.
    pub committed_age: u8,
    /// Whether any attempt's Redis write of it was confirmed before the OK: if not, README's one
    /// bound applies (other instances may serve the old copy until `committed_at + bound`).
    pub redis_confirmed: bool,
}

/// The caller making the change, attempt after attempt.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Call {
    pub attempts: u8,
    pub stage: Stage,
    /// The instance the current attempt runs on.
    pub node: u8,
    /// Until the current attempt's deadline.
    pub deadline_in: u8,
    /// The version the current attempt covers, and since it was committed.
    pub version: u8,
    pub committed_age: u8,
    /// Some attempt's Redis write of the covered version was confirmed.
    pub redis_confirmed: bool,
    pub ok: Option<Promise>,
    /// Instances (a bit each) whose acknowledgement of the current attempt's message arrived
    /// before its holders were read (the keys are published right after the Redis write).
    pub acked: u8,
    /// An attempt was cut by the server's timeout after it committed (CANCELLED).
    pub cancelled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// No attempt running (none yet, or the last one failed UNAVAILABLE).
    Idle,
    Commit,
    RedisWrite,
    ReadHolders,
    /// Waiting since the holders were read (`since_age` ago, on `timeline`).
    Wait {
        waits: Vec<Wait>,
        since_age: u8,
        timeline: u8,
    },
    Done,
}

/// One holder a revoking call waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Wait {
    pub node: u8,
    /// Until its lease's end as the holders read saw it.
    pub end_in: u8,
    pub done: bool,
}

/// A broken promise, recorded when a caller observed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// A read begun after the change returned OK answered an older version.
    Revocation { node: u8, answered: u8 },
    /// A version the previous release committed was still answered past README's bound.
    Bound { node: u8, answered: u8 },
    /// A revoking call found a holder whose lease outlasts what its request timeout was
    /// checked against: the call would be cut after it committed.
    WaitOutlastsTimeout { holder: u8 },
}

/// A caller of the event stream in strict mode: its validations are kept in its own memory
/// while it holds a lease, which its host extends in `local_cache_leases` (row
/// `nodes.len() + k`) each time it acknowledges a pass.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subscriber {
    /// Its stream to the host is open.
    pub connected: bool,
    /// It applied the first pass of its subscription (the horizon's rows: its floors).
    pub primed: bool,
    /// The validation kept in memory (a version), if any.
    pub copy: Option<u8>,
    /// How much longer it believes its lease lasts.
    pub belief_for: u8,
    /// How much longer its memory is fresh: the bound from when it sent the last request the
    /// host had received before the read of the last pass it applied (no read is older).
    pub fresh_for: u8,
    /// Since it sent the latest request (subscribe or acknowledgement) the host received.
    pub heard: Option<u8>,
    /// The highest version the stream showed it: no fetched validation below it is kept.
    pub seen: u8,
    /// Rows up to this version were committed before the subscription began and are not
    /// shown ([`crate::config::Bugs::subscriber_starts_at_the_end`]; 0 otherwise).
    pub from: u8,
    /// A pass of the host on its way to it.
    pub event: Option<Event>,
    /// The host extended its lease (or took it) and sends the grant with its next pass: since
    /// the acknowledgement that asked for it was sent.
    pub granted: Option<u8>,
    /// Its acknowledgement of a pass on its way to the host.
    pub ack: Option<Ack>,
    /// A revoker's message (from, attempt) the host received and relays once a pass begun
    /// after it is acknowledged.
    pub relay: Option<(u8, u8)>,
    /// A validation fetched from authd (the version answered), to be kept.
    pub fetch: Option<u8>,
}

/// A pass of the host over the logs, sent on the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    /// The key's version the pass read.
    pub version: u8,
    /// Since the pass's read began.
    pub read_age: u8,
    /// The message it acknowledges once applied (received before the pass began).
    pub relay: Option<(u8, u8)>,
    /// A lease granted before the pass began: since the acknowledgement that asked for it was
    /// sent.
    pub grant: Option<u8>,
    /// Since the subscriber sent the latest request the host had received when the read began.
    pub read_after: Option<u8>,
}

/// A subscriber's acknowledgement of a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    pub read_age: u8,
    /// Since it was sent (the lease it asks for runs from then).
    pub sent_age: u8,
    pub relay: Option<(u8, u8)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub faults_left: u8,
    pub reads_left: u8,
    pub pg: Pg,
    pub redis: Redis,
    /// Messages in flight, sorted.
    pub wire: Vec<Wire>,
    pub nodes: Vec<Instance>,
    pub call: Call,
    pub subscribers: Vec<Subscriber>,
    pub sub_reads_left: u8,
    /// The previous release committed this version, this long ago.
    pub legacy: Option<(u8, u8)>,
    /// A PostgreSQL failover lost a committed version (an asynchronous standby missed it):
    /// README states this loss; the promise of that change is void.
    pub lost_commit: bool,
    pub violation: Option<Violation>,
}
