//! What each action does to the state (the protocol as built), with each review bug behind its
//! flag in [`crate::config::Bugs`].
use crate::{
    Protocol,
    action::Action,
    config::Change,
    state::{
        Instance, LeaseRow, Pg, Promise, Read, ReadStage, Slot, Stage, State, Subscriber,
        Violation, Wait, Wire,
    },
};

mod background;
mod calls;
mod initial;
mod subscriber;

pub(crate) use initial::initial;

/// A wait for "whoever held a lease on the previous timeline" (see [`Protocol::read_holders`]).
pub const ANYONE: u8 = u8::MAX;

/// Whether the registry of applied rows has `version` for the cache of `identity`.
fn applied(registry: (u8, u8), identity: u8, version: u8) -> bool {
    registry.0 == identity && registry.1 >= version
}

/// An invalidation write to Redis (a tombstone or profile version); what it replaced is what a
/// replica may still hold when failovers are faults of the run.
fn raise(s: &mut State, version: u8, failovers: bool) {
    let before = s.redis.slot;
    s.redis.slot = before.raised(version);
    if failovers && s.redis.slot != before {
        s.redis.unreplicated = Some(before);
    }
}

/// `LocalCache::announce` (of what `Redis::mark_applied` recorded): a write of `version` to the cache of `from`'s generation is
/// announced to every other instance with Redis (delivered later, or lost) — only when `from`
/// is settled in the generation it wrote to.
fn announce(p: &Protocol, s: &mut State, from: usize, version: u8) {
    let generation = s.nodes[from].generation;
    if generation == 0 || generation != p.gen_of(s, from) {
        return;
    }
    for to in (0..s.nodes.len()).filter(|j| *j != from && p.cfg.nodes[*j].redis) {
        s.wire.push(Wire::Applied {
            to: to as u8,
            generation,
            version,
        });
    }
    s.wire.sort();
}

fn older(age: &mut u8, cap: u8) {
    *age = (*age + 1).min(cap);
}

fn sooner(remaining: &mut u8) {
    *remaining = remaining.saturating_sub(1);
}

impl Protocol {
    /// The generation an instance binds to the Redis data it talks to and the PostgreSQL
    /// timeline it knows.
    pub(crate) fn gen_of(&self, s: &State, i: usize) -> u8 {
        s.redis.identity * 8 + s.nodes[i].timeline
    }

    /// `LocalCache::is_trusted`: the heartbeat came back, the lease is believed, and (the fix of
    /// case 3) the follower completed a pass within README's bound.
    fn trusted_local(&self, s: &State, i: usize) -> bool {
        let n = &s.nodes[i];
        self.cfg.nodes[i].local
            && n.hearing
            && n.belief_for > 0
            && (self.cfg.bugs.local_ignores_follower || n.trusted_for > 0)
    }

    /// `Redis::serving_generation` (and `is_pending` for the key).
    fn serving_redis(&self, s: &State, i: usize) -> bool {
        let n = &s.nodes[i];
        self.cfg.nodes[i].redis
            && n.redis_link
            && n.generation != 0
            && n.generation == self.gen_of(s, i)
            && n.trusted_for > 0
            && !n.pending
    }

    /// `Store::forget`: the key's copy goes, and the stripe's counter voids a fill in flight.
    fn forget(s: &mut State, i: usize) {
        let n = &mut s.nodes[i];
        n.copy = None;
        if let Some(read) = &mut n.read {
            read.voided = true;
        }
    }

    /// `LocalCache::doubt`.
    fn doubt(&self, s: &mut State, i: usize) {
        if !self.cfg.nodes[i].local {
            return;
        }
        let n = &mut s.nodes[i];
        n.hearing = false;
        n.belief_for = 0;
        n.lost = true;
        Self::forget(s, i);
    }

    /// An instance reaches PostgreSQL (when its link is up) and notices a new timeline: (the
    /// fix of a PostgreSQL failover, unless [`crate::config::Bugs::timeline_ignored`]) its
    /// copies are doubted, its Redis generation is established anew, and the first instance to
    /// see the timeline records when.
    fn reach_pg(&self, s: &mut State, i: usize) -> bool {
        if !s.nodes[i].pg_link {
            return false;
        }
        if s.nodes[i].timeline != s.pg.timeline {
            s.nodes[i].timeline = s.pg.timeline;
            if self.cfg.bugs.timeline_ignored {
                s.nodes[i].generation = self.gen_of(s, i);
            } else {
                s.pg.timeline_seen_age.get_or_insert(0);
                self.doubt(s, i);
                s.nodes[i].generation = 0;
            }
        }
        true
    }

    /// A caller is answered `version` by instance `i`: a broken promise is recorded.
    fn answer(&self, s: &mut State, i: usize, promised: Option<Promise>, version: u8) {
        if s.violation.is_some() || s.lost_commit {
            return;
        }
        let bound = self.cfg.bound;
        if let Some(p) = promised
            && version < p.version
            && (p.redis_confirmed || p.committed_age >= bound)
        {
            s.violation = Some(Violation::Revocation {
                node: i as u8,
                answered: version,
            });
        }
        if let Some((legacy, age)) = s.legacy
            && version < legacy
            && age >= bound
        {
            s.violation = Some(Violation::Bound {
                node: i as u8,
                answered: version,
            });
        }
    }

    fn is_session(&self) -> bool {
        self.cfg.change != Change::UpdateProfile
    }

    /// Commits the key's next version (a revocation is the one version 1): `(version, age of
    /// its commit, fresh)`.
    fn commit(&self, s: &mut State) -> (u8, u8, bool) {
        if self.is_session() {
            if let Some(age) = s.pg.revoked_age {
                return (1, age, false);
            }
            s.pg.revoked_age = Some(0);
        }
        s.pg.version += 1;
        (s.pg.version, 0, true)
    }

    pub(crate) fn enabled(&self, s: &State, out: &mut Vec<Action>) {
        let cfg = &self.cfg;
        out.push(Action::Tick);
        for (i, node) in cfg.nodes.iter().enumerate() {
            let n = &s.nodes[i];
            let id = i as u8;
            if n.paused {
                if cfg.faults.pause {
                    out.push(Action::Resume(id));
                }
                continue;
            }
            let established = n.generation == self.gen_of(s, i);
            if node.redis && n.redis_link && n.pg_link {
                out.push(if established {
                    Action::Follow(id)
                } else {
                    Action::Establish(id)
                });
            }
            if node.local {
                if n.held_age.is_none() && n.hearing && n.pg_link {
                    out.push(Action::Register(id));
                }
                if n.held_age.is_some() && !n.lost && n.hearing && n.pg_link {
                    out.push(Action::Renew(id));
                }
                if n.held_age.is_some() && (n.lost || !n.hearing) {
                    out.push(Action::Release(id));
                }
                if !n.hearing && n.redis_link {
                    out.push(Action::Hear(id));
                }
                if n.hearing && !n.redis_link {
                    out.push(Action::Doubt(id));
                }
            }
            match n.read.map(|r| r.stage) {
                None if s.reads_left > 0 && cfg.readers & (1 << i) != 0 => {
                    out.push(Action::ReadStart(id))
                }
                Some(ReadStage::Postgres { .. }) => out.push(Action::ReadPostgres(id)),
                Some(ReadStage::Keep { .. }) => out.push(Action::ReadKeep(id)),
                _ => {}
            }
            if s.call.stage == Stage::Idle
                && s.call.ok.is_none()
                && s.call.attempts < cfg.attempts
                && (i == 0 || (s.call.attempts > 0 && cfg.retry_anywhere))
            {
                out.push(Action::CallStart(id));
            }
        }
        for (k, w) in s.wire.iter().enumerate() {
            let to = &s.nodes[w.to() as usize];
            if !to.paused && to.redis_link {
                out.push(Action::Deliver(k as u8));
            }
        }
        self.call_actions(s, out);
        self.sub_actions(s, out);
        if cfg.legacy_writer && s.legacy.is_none() && (!self.is_session() || s.pg.version == 0) {
            out.push(Action::LegacyWrite { redis: true });
            out.push(Action::LegacyWrite { redis: false });
        }
        self.faults(s, out);
    }

    fn call_actions(&self, s: &State, out: &mut Vec<Action>) {
        let c = &s.call;
        if matches!(c.stage, Stage::Idle | Stage::Done) || s.nodes[c.node as usize].paused {
            return;
        }
        if c.deadline_in == 0 {
            out.push(Action::CallDeadline);
        }
        let next = match &c.stage {
            Stage::Commit => Action::CallCommit,
            Stage::RedisWrite => Action::CallRedisWrite,
            Stage::ReadHolders => Action::CallReadHolders,
            Stage::Wait {
                waits,
                since_age,
                timeline,
            } => {
                let n = &s.nodes[c.node as usize];
                let moved = *timeline != s.pg.timeline
                    && !waits.iter().any(|w| w.node == ANYONE)
                    && !self.cfg.bugs.timeline_ignored;
                let pollable = moved
                    || waits.iter().any(|w| {
                        !w.done
                            && w.node != ANYONE
                            && s.pg.leases[w.node as usize]
                                .is_none_or(|r| r.end_in == 0 || r.applied_age < *since_age)
                    });
                if n.pg_link && pollable {
                    out.push(Action::CallPoll);
                }
                if !waits.iter().all(|w| w.done || w.end_in == 0) {
                    return;
                }
                Action::CallReturn
            }
            Stage::Idle | Stage::Done => return,
        };
        out.push(next);
    }

    fn faults(&self, s: &State, out: &mut Vec<Action>) {
        let f = &self.cfg.faults;
        let budget = s.faults_left > 0;
        for (i, n) in s.nodes.iter().enumerate() {
            let id = i as u8;
            if f.pg_link {
                if n.pg_link && budget {
                    out.push(Action::CutPg(id));
                } else if !n.pg_link {
                    out.push(Action::HealPg(id));
                }
            }
            if f.redis_link && self.cfg.nodes[i].redis {
                if n.redis_link && budget {
                    out.push(Action::CutRedis(id));
                } else if !n.redis_link {
                    out.push(Action::HealRedis(id));
                }
            }
            if f.pause && !n.paused && budget {
                out.push(Action::Pause(id));
            }
        }
        if !budget {
            return;
        }
        if f.message_loss {
            for k in 0..s.wire.len() as u8 {
                for silently in [false, true] {
                    out.push(Action::LoseMessage { index: k, silently });
                }
            }
        }
        if f.redis_data_loss {
            out.push(Action::RedisFlush);
            out.push(Action::RedisRestart);
        }
        if f.redis_failover {
            out.push(Action::RedisFailover);
        }
        if f.pg_failover && s.pg.timeline == 1 {
            for lose_commit in [false, true] {
                for stale in 0..1u8 << s.pg.leases.len() {
                    out.push(Action::PgFailover { lose_commit, stale });
                }
            }
        }
    }

    pub(crate) fn apply(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        let cfg = &self.cfg;
        match action {
            Action::Tick => self.tick(&mut s),
            Action::Establish(i) => {
                let i = i as usize;
                if self.reach_pg(&mut s, i) {
                    s.nodes[i].generation = self.gen_of(&s, i);
                    // A new generation's follower reads its window afresh.
                    s.nodes[i].followed = 0;
                }
            }
            Action::Follow(i) => self.follow(&mut s, i as usize),
            Action::Register(i) => {
                let i = i as usize;
                if self.reach_pg(&mut s, i) && s.nodes[i].hearing {
                    let lease = cfg.lease_of(i);
                    Self::forget(&mut s, i);
                    s.pg.leases[i] = Some(LeaseRow {
                        end_in: lease,
                        applied_age: 0,
                    });
                    let n = &mut s.nodes[i];
                    n.held_age = Some(0);
                    n.belief_for = lease - 1;
                    n.seen = 0;
                    n.lost = false;
                }
            }
            Action::Renew(i) => self.renew(&mut s, i as usize),
            Action::Release(i) => {
                let i = i as usize;
                Self::forget(&mut s, i);
                let n = &mut s.nodes[i];
                n.held_age = None;
                n.lost = false;
                n.belief_for = 0;
                if self.reach_pg(&mut s, i)
                    && let Some(row) = &mut s.pg.leases[i]
                {
                    row.end_in = 0;
                }
            }
            Action::Hear(i) => s.nodes[i as usize].hearing = true,
            Action::Doubt(i) => self.doubt(&mut s, i as usize),
            Action::Deliver(k) => self.deliver(&mut s, k as usize),
            Action::ReadStart(i) => self.read_start(&mut s, i as usize),
            Action::ReadPostgres(i) => self.read_postgres(&mut s, i as usize),
            Action::ReadKeep(i) => self.read_keep(&mut s, i as usize),
            Action::CallStart(i) => {
                let c = &mut s.call;
                c.attempts += 1;
                c.node = i;
                c.deadline_in = cfg.request_timeout;
                c.stage = Stage::Commit;
                c.acked = 0;
            }
            Action::CallCommit => self.call_commit(&mut s),
            Action::CallRedisWrite => self.call_redis_write(&mut s),
            Action::CallReadHolders => self.read_holders(&mut s),
            Action::CallPoll => self.poll(&mut s),
            Action::CallReturn => {
                let c = &mut s.call;
                c.ok = Some(Promise {
                    version: c.version,
                    committed_age: c.committed_age,
                    redis_confirmed: c.redis_confirmed,
                });
                c.stage = Stage::Done;
            }
            Action::CallDeadline => {
                let committed = !matches!(s.call.stage, Stage::Commit);
                if cfg.bugs.own_lease && committed {
                    s.call.cancelled = true;
                }
                s.call.stage = Stage::Idle;
            }
            Action::SubConnect(k) => self.sub_connect(&mut s, k as usize),
            Action::SubPass(k) => self.sub_pass(&mut s, k as usize),
            Action::SubApply(k) => self.sub_apply(&mut s, k as usize),
            Action::SubRelay(k) => self.sub_relay(&mut s, k as usize),
            Action::SubExtend(k) => self.sub_extend(&mut s, k as usize),
            Action::SubRead { sub, via } => self.sub_read(&mut s, sub as usize, via as usize),
            Action::SubKeep(k) => self.sub_keep(&mut s, k as usize),
            Action::SubDisconnect(k) => self.sub_disconnect(&mut s, k as usize),
            Action::LegacyWrite { redis } => {
                let (version, age, _) = self.commit(&mut s);
                s.legacy = Some((version, age));
                if redis {
                    raise(&mut s, version, cfg.faults.redis_failover);
                }
            }
            Action::CutPg(i) => {
                s.faults_left -= 1;
                s.nodes[i as usize].pg_link = false;
            }
            Action::HealPg(i) => s.nodes[i as usize].pg_link = true,
            Action::CutRedis(i) => {
                s.faults_left -= 1;
                s.nodes[i as usize].redis_link = false;
            }
            Action::HealRedis(i) => {
                // A reconnection: the subscriber doubts, the generation latch trips.
                let i = i as usize;
                s.nodes[i].redis_link = true;
                self.doubt(&mut s, i);
                s.nodes[i].generation = 0;
            }
            Action::Pause(i) => {
                s.faults_left -= 1;
                s.nodes[i as usize].paused = true;
            }
            Action::Resume(i) => s.nodes[i as usize].paused = false,
            Action::LoseMessage { index, silently } => {
                s.faults_left -= 1;
                let lost = s.wire.remove(index as usize);
                if !silently {
                    self.doubt(&mut s, lost.to() as usize);
                }
            }
            Action::RedisFlush => {
                s.faults_left -= 1;
                s.redis.slot = Slot::Empty;
                s.redis.unreplicated = None;
            }
            Action::RedisRestart | Action::RedisFailover => {
                s.faults_left -= 1;
                let promoted = match action {
                    Action::RedisFailover => s.redis.unreplicated.unwrap_or(s.redis.slot),
                    _ => Slot::Empty,
                };
                s.redis.slot = promoted;
                s.redis.identity += 1;
                s.redis.unreplicated = None;
                for i in 0..s.nodes.len() {
                    self.doubt(&mut s, i);
                    s.nodes[i].generation = 0;
                }
            }
            Action::PgFailover { lose_commit, stale } => {
                s.faults_left -= 1;
                // What the standby missed is lost, whether or not the call that committed it
                // has answered (README states it).
                if lose_commit && s.pg.version > 0 {
                    s.pg.version -= 1;
                    if s.pg.version == 0 {
                        s.pg.revoked_age = None;
                    }
                    s.lost_commit = true;
                }
                for (i, row) in s.pg.leases.iter_mut().enumerate() {
                    if stale & (1 << i) != 0
                        && let Some(row) = row
                    {
                        row.end_in = 0;
                    }
                }
                s.pg.timeline += 1;
                s.pg.timeline_seen_age = None;
            }
        }
        self.normalize(&mut s);
        (s != *last).then_some(s)
    }

    /// Forgets what can no longer make a difference, so that states differing only in it are
    /// one: an `applied_through` or a lease extension older than the holders read of the wait in
    /// progress (or with no wait in progress) can never end a wait (only one after the read can).
    fn normalize(&self, s: &mut State) {
        let cap = self.cfg.cap();
        let since = match &s.call.stage {
            Stage::Wait { since_age, .. } => *since_age,
            _ => 0,
        };
        for row in s.pg.leases.iter_mut().flatten() {
            if row.applied_age >= since {
                row.applied_age = cap;
            }
        }
        for n in &mut s.nodes {
            if let Some(age) = &mut n.held_age
                && *age >= since
            {
                *age = cap;
            }
        }
        for sub in &mut s.subscribers {
            let reads = sub
                .event
                .iter_mut()
                .map(|e| &mut e.read_age)
                .chain(sub.ack.iter_mut().map(|a| &mut a.read_age));
            for age in reads.filter(|age| **age >= since) {
                *age = cap;
            }
        }
    }
}
