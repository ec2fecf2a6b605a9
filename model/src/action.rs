//! The actions: what authd's code does (each names the function in `src/` it models) and what
//! the environment does (time, the previous release, replication, faults).

/// One step of the system.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Time passes (one tick).
    Tick,
    Establish(u8),
    Follow(u8),
    Register(u8),
    Renew(u8),
    Release(u8),
    Hear(u8),
    Doubt(u8),
    Deliver(u8),
    ReadStart(u8),
    ReadPostgres(u8),
    ReadKeep(u8),
    CallStart(u8),
    CallCommit,
    CallRedisWrite,
    CallReadHolders,
    CallPoll,
    CallReturn,
    CallDeadline,
    /// The strict subscriber `k` (of [`crate::state::State::subscribers`]) opens its stream:
    /// its host takes it a lease.
    SubConnect(u8),
    /// Its host reads the logs and sends what changed.
    SubPass(u8),
    /// It applies a pass (drops what it names, raises its floors) and acknowledges it.
    SubApply(u8),
    /// Its host relays to their revokers the messages an acknowledgement it received covers
    /// (before the lease's extension, which may follow).
    SubRelay(u8),
    /// Its host extends its lease on the acknowledgement and relays the messages it covers
    /// (those not relayed yet).
    SubExtend(u8),
    /// A validation by subscriber `sub`: from its memory when trusted, else fetched from
    /// instance `via`.
    SubRead {
        sub: u8,
        via: u8,
    },
    /// It keeps what it fetched.
    SubKeep(u8),
    /// Its stream breaks.
    SubDisconnect(u8),
    /// The previous release changes the key (its SQL, optionally its Redis write), waiting for
    /// nobody.
    LegacyWrite {
        redis: bool,
    },
    CutPg(u8),
    HealPg(u8),
    CutRedis(u8),
    HealRedis(u8),
    Pause(u8),
    Resume(u8),
    LoseMessage {
        index: u8,
        silently: bool,
    },
    RedisFlush,
    RedisRestart,
    RedisFailover,
    /// A failover to an asynchronous standby that may have missed the last commit, and the last
    /// extensions of the leases in `stale` (a bit per instance).
    PgFailover {
        lose_commit: bool,
        stale: u8,
    },
}

/// Where an action's behaviour lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The function in `src/` (file, then the function's name) this action models.
    Code(&'static str, &'static str),
    /// The world around authd.
    Environment(&'static str),
}

impl Action {
    /// Every action of the model either names the function of `src/` it models or says which
    /// part of the environment it is (a test checks that each named function exists).
    pub fn origin(self) -> Origin {
        use Origin::{Code, Environment};
        match self {
            Action::Tick => Environment("time passes"),
            Action::Establish(_) => Code("src/jobs/generation.rs", "establish"),
            Action::Follow(_) => Code("src/jobs/follow.rs", "pass"),
            Action::Register(_) => Code("src/local/keeper.rs", "renew"),
            Action::Renew(_) => Code("src/local/keeper.rs", "read_logs"),
            Action::Release(_) => Code("src/local/keeper.rs", "release"),
            Action::Hear(_) => Code("src/local/keeper.rs", "acknowledged"),
            Action::Doubt(_) => Code("src/local/keeper.rs", "heartbeat"),
            Action::Deliver(_) => Code("src/local/keeper.rs", "deliver"),
            Action::ReadStart(_) => Code("src/auth/service.rs", "validate_checked"),
            Action::ReadPostgres(_) => Code("src/auth/service.rs", "load_and_check"),
            Action::ReadKeep(_) => Code("src/local/store.rs", "keep_session"),
            Action::CallStart(_) => Code("src/auth/service.rs", "logout"),
            Action::CallCommit => Code("src/store/sessions.rs", "revoke_by_token_hash"),
            Action::CallRedisWrite => Code("src/auth/invalidation.rs", "apply"),
            Action::CallReadHolders => Code("src/store/leases.rs", "holders"),
            Action::CallPoll => Code("src/local/poller.rs", "poll"),
            Action::CallReturn => Code("src/local/wait.rs", "invalidate"),
            Action::CallDeadline => Code("src/local/wait.rs", "wait_for"),
            Action::SubConnect(_) => Code("src/events/subscription.rs", "open"),
            Action::SubPass(_) => Code("src/events/hub.rs", "pass"),
            Action::SubApply(_) => Code("client/src/state.rs", "apply"),
            Action::SubRelay(_) => Code("src/events/subscription.rs", "relay"),
            Action::SubExtend(_) => Code("src/events/subscription.rs", "extend"),
            Action::SubRead { .. } => Code("client/src/validator.rs", "validate"),
            Action::SubKeep(_) => Code("client/src/state.rs", "keep"),
            Action::SubDisconnect(_) => Environment("fault: a subscriber's stream breaks"),
            Action::LegacyWrite { .. } => Environment("the previous release"),
            Action::CutPg(_) | Action::HealPg(_) => Environment("fault: PostgreSQL link"),
            Action::CutRedis(_) | Action::HealRedis(_) => Environment("fault: Redis link"),
            Action::Pause(_) | Action::Resume(_) => Environment("fault: SIGSTOP/SIGCONT"),
            Action::LoseMessage { .. } => Environment("fault: pub/sub loss"),
            Action::RedisFlush => Environment("fault: FLUSHALL"),
            Action::RedisRestart => Environment("fault: Redis restart without data"),
            Action::RedisFailover => Environment("fault: Redis failover"),
            Action::PgFailover { .. } => Environment("fault: PostgreSQL failover"),
        }
    }

    /// Every action, for the test of [`Action::origin`].
    pub fn examples() -> Vec<Action> {
        vec![
            Action::Tick,
            Action::Establish(0),
            Action::Follow(0),
            Action::Register(0),
            Action::Renew(0),
            Action::Release(0),
            Action::Hear(0),
            Action::Doubt(0),
            Action::Deliver(0),
            Action::ReadStart(0),
            Action::ReadPostgres(0),
            Action::ReadKeep(0),
            Action::CallStart(0),
            Action::CallCommit,
            Action::CallRedisWrite,
            Action::CallReadHolders,
            Action::CallPoll,
            Action::CallReturn,
            Action::CallDeadline,
            Action::SubConnect(0),
            Action::SubPass(0),
            Action::SubApply(0),
            Action::SubRelay(0),
            Action::SubExtend(0),
            Action::SubRead { sub: 0, via: 0 },
            Action::SubKeep(0),
            Action::SubDisconnect(0),
            Action::LegacyWrite { redis: true },
            Action::CutPg(0),
            Action::HealPg(0),
            Action::CutRedis(0),
            Action::HealRedis(0),
            Action::Pause(0),
            Action::Resume(0),
            Action::LoseMessage {
                index: 0,
                silently: true,
            },
            Action::RedisFlush,
            Action::RedisRestart,
            Action::RedisFailover,
            Action::PgFailover {
                lose_commit: true,
                stale: 1,
            },
        ]
    }
}
