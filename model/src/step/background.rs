//! What runs on its own: the poller, the clock, the follower, lease renewal, message delivery.
use super::*;

impl Protocol {
    /// `Poller::poll`: the lease table again. On a timeline other than the one the holders were
    /// read on, it cannot end a wait: the call waits one lease from when the new timeline was
    /// first seen (unless [`crate::config::Bugs::timeline_ignored`]). The model's poll is read
    /// now, for every holder the call waits for; the code's poller is shared by concurrent
    /// waits, so a poll counts for a wait only when it asked about the holder and PostgreSQL
    /// read it after the wait's holders read (`Poll::caught_up`) — which is this action.
    pub(super) fn poll(&self, s: &mut State) {
        let c = s.call.node as usize;
        if !self.reach_pg(s, c) {
            return;
        }
        let leases = s.pg.leases.clone();
        let (timeline, seen) = (s.pg.timeline, s.pg.timeline_seen_age);
        let lease = self.cfg.lease;
        let ignored = self.cfg.bugs.timeline_ignored;
        let Stage::Wait {
            waits,
            since_age,
            timeline: read_on,
        } = &mut s.call.stage
        else {
            return;
        };
        if *read_on != timeline && !ignored {
            let end_in = lease - seen.unwrap_or(0).min(lease);
            if !waits.iter().any(|w| w.node == ANYONE) {
                waits.push(Wait {
                    node: ANYONE,
                    end_in,
                    done: false,
                });
            }
            return;
        }
        for w in waits.iter_mut().filter(|w| w.node != ANYONE) {
            let row = leases[w.node as usize];
            if row.is_none_or(|r| r.end_in == 0 || r.applied_age < *since_age) {
                w.done = true;
            }
        }
    }

    /// One tick: every age grows, every remaining duration shrinks.
    pub(super) fn tick(&self, s: &mut State) {
        let cap = self.cfg.cap();
        // Commit ages are compared with the bound only (and with the log position, case 1).
        let bound = if self.cfg.bugs.retry_from_position {
            cap
        } else {
            self.cfg.bound
        };
        let lease = self.cfg.lease;
        for n in &mut s.nodes {
            sooner(&mut n.trusted_for);
            sooner(&mut n.belief_for);
            if let Some(age) = &mut n.held_age {
                older(age, cap);
            }
            if let Some(age) = &mut n.position_age {
                older(age, cap);
            }
            if let Some(p) = n.read.as_mut().and_then(|r| r.promised.as_mut()) {
                older(&mut p.committed_age, bound);
            }
        }
        let tick_pg = |pg: &mut Pg| {
            if let Some(age) = &mut pg.revoked_age {
                older(age, bound);
            }
            if let Some(age) = &mut pg.timeline_seen_age {
                older(age, lease);
            }
            for row in pg.leases.iter_mut().flatten() {
                sooner(&mut row.end_in);
                older(&mut row.applied_age, cap);
            }
        };
        tick_pg(&mut s.pg);
        let c = &mut s.call;
        sooner(&mut c.deadline_in);
        older(&mut c.committed_age, bound);
        if let Some(p) = &mut c.ok {
            older(&mut p.committed_age, bound);
        }
        if let Stage::Wait {
            waits, since_age, ..
        } = &mut c.stage
        {
            older(since_age, cap);
            for w in waits {
                sooner(&mut w.end_in);
            }
        }
        if let Some((_, age)) = &mut s.legacy {
            older(age, self.cfg.bound);
        }
        self.sub_tick(s);
    }

    /// `Follower::pass`: reads the log, writes what its cache has not applied (and drops its
    /// local copy), and serves its Redis copies for `bound` from now.
    pub(super) fn follow(&self, s: &mut State, i: usize) {
        if !self.reach_pg(s, i) || s.nodes[i].generation != self.gen_of(s, i) {
            return;
        }
        let version = s.pg.version;
        let identity = s.redis.identity;
        let written = !applied(s.nodes[i].applied, identity, version);
        let drops = !self.cfg.bugs.follower_drops_only_what_it_writes || written;
        if version > s.nodes[i].followed && drops {
            s.nodes[i].followed = version;
            Self::forget(s, i);
        }
        // A key whose own write failed here is written again, whoever announced it
        // (`Redis::unapplied` while anything is pending): only its own write clears it.
        if version > 0 && (!applied(s.nodes[i].applied, identity, version) || s.nodes[i].pending) {
            raise(s, version, self.cfg.faults.redis_failover);
            s.nodes[i].applied = (identity, version);
            s.nodes[i].pending = false;
            announce(self, s, i, version);
        }
        let n = &mut s.nodes[i];
        if self.cfg.bugs.retry_from_position {
            n.position_age = Some(0);
        }
        n.trusted_for = self.cfg.bound;
    }

    /// `keeper::renew` with a lease: extend it (recording `applied_through`), read the logs and
    /// drop what they name, then believe the new end. A lease PostgreSQL ended lapses.
    pub(super) fn renew(&self, s: &mut State, i: usize) {
        if !self.reach_pg(s, i) || s.nodes[i].lost {
            return;
        }
        let Some(position) = s.nodes[i].held_age else {
            return;
        };
        let lease = self.cfg.lease_of(i);
        match &mut s.pg.leases[i] {
            Some(row) if row.end_in > 0 => {
                row.end_in = lease;
                row.applied_age = row.applied_age.min(position);
            }
            _ => {
                Self::forget(s, i);
                let n = &mut s.nodes[i];
                n.held_age = None;
                n.belief_for = 0;
                return;
            }
        }
        // Each row is dropped once (the next read skips the rows this one read)...
        let logged = s.pg.version;
        if logged > s.nodes[i].seen {
            Self::forget(s, i);
        }
        let n = &mut s.nodes[i];
        n.seen = n.seen.max(logged);
        n.held_age = Some(0);
        n.belief_for = lease - 1;
    }

    pub(super) fn deliver(&self, s: &mut State, k: usize) {
        match s.wire.remove(k) {
            Wire::Invalidation { to, from, attempt } => {
                let to = to as usize;
                self.sub_message(s, to, from, attempt);
                if self.cfg.nodes[to].local && to != from as usize {
                    Self::forget(s, to);
                    s.wire.push(Wire::Ack {
                        to: from,
                        holder: to as u8,
                        attempt,
                    });
                    s.wire.sort();
                }
            }
            Wire::Applied {
                to,
                generation,
                version,
            } => {
                // `Redis::take_announcement`: recorded only by an instance settled in the
                // generation it names.
                let settled = self.gen_of(s, to as usize);
                let n = &mut s.nodes[to as usize];
                if n.generation == generation && generation == settled {
                    let identity = generation / 8;
                    if n.applied.0 != identity || n.applied.1 < version {
                        n.applied = (identity, version);
                    }
                }
            }
            Wire::Ack {
                to,
                holder,
                attempt,
            } => {
                let c = &mut s.call;
                if c.attempts == attempt && c.node == to {
                    match &mut c.stage {
                        Stage::Wait { waits, .. } => {
                            for w in waits.iter_mut().filter(|w| w.node == holder) {
                                w.done = true;
                            }
                        }
                        Stage::ReadHolders => c.acked |= 1 << holder,
                        _ => {}
                    }
                }
            }
        }
    }
}
