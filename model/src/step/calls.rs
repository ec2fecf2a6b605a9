//! What a call does, step by step: a read (start, PostgreSQL, keep) and a revoking call (commit,
//! its Redis write, reading the lease holders).
use super::*;

impl Protocol {
    /// `validate_checked`: the local copy when trusted; otherwise a ticket, then Redis (a copy of
    /// the generation served, a tombstone, or a miss that takes the fill lease).
    pub(super) fn read_start(&self, s: &mut State, i: usize) {
        s.reads_left -= 1;
        let promised = s.call.ok;
        if self.trusted_local(s, i)
            && let Some(version) = s.nodes[i].copy
        {
            self.answer(s, i, promised, version);
            return;
        }
        let to_pg = |lease| ReadStage::Postgres { lease };
        let stage = if !self.cfg.nodes[i].redis || !s.nodes[i].redis_link {
            to_pg(false)
        } else {
            match s.redis.slot {
                Slot::Invalidation { version } if self.is_session() => {
                    self.answer(s, i, promised, version);
                    return;
                }
                Slot::Copy {
                    version,
                    generation,
                } if self.serving_redis(s, i) && generation == s.nodes[i].generation => {
                    self.answer(s, i, promised, version);
                    ReadStage::Keep {
                        version,
                        lease: false,
                    }
                }
                Slot::Empty if s.nodes[i].generation == self.gen_of(s, i) => {
                    s.redis.slot = Slot::Lease(i as u8);
                    to_pg(true)
                }
                _ => to_pg(false),
            }
        };
        s.nodes[i].read = Some(Read {
            promised,
            voided: false,
            stage,
        });
    }

    pub(super) fn read_postgres(&self, s: &mut State, i: usize) {
        let read = s.nodes[i].read.expect("a read at its PostgreSQL stage");
        let ReadStage::Postgres { lease } = read.stage else {
            unreachable!()
        };
        if !s.nodes[i].pg_link {
            s.nodes[i].read = None;
            return;
        }
        let version = s.pg.version;
        self.answer(s, i, read.promised, version);
        if self.is_session() && version > 0 {
            // Nothing to fill: the lease is given back.
            if lease && s.nodes[i].redis_link && s.redis.slot == Slot::Lease(i as u8) {
                s.redis.slot = Slot::Empty;
            }
            s.nodes[i].read = None;
            return;
        }
        s.nodes[i].read = Some(Read {
            stage: ReadStage::Keep { version, lease },
            ..read
        });
    }

    /// The fill under the lease, then `LocalCache::keep_session`: kept only while trusted, if no
    /// drop happened since the read began, and (...but, the fix of case 5, nothing below what a
    /// renewal read in the logs is kept again) not below what the logs showed.
    pub(super) fn read_keep(&self, s: &mut State, i: usize) {
        let read = s.nodes[i].read.take().expect("a read at its keep stage");
        let ReadStage::Keep { version, lease } = read.stage else {
            unreachable!()
        };
        if lease && s.nodes[i].redis_link && s.redis.slot == Slot::Lease(i as u8) {
            s.redis.slot = Slot::Copy {
                version,
                generation: self.gen_of(s, i),
            };
        }
        let above_logs = self.cfg.bugs.rows_dropped_once || version >= s.nodes[i].seen;
        if self.trusted_local(s, i) && !read.voided && above_logs {
            s.nodes[i].copy = Some(version);
        }
    }

    /// The revoking statement: the session revoked if it was not, and the rows the call
    /// covers.
    pub(super) fn call_commit(&self, s: &mut State) {
        let node = s.call.node as usize;
        if !s.nodes[node].pg_link {
            s.call.stage = Stage::Idle;
            return;
        }
        let (version, age, fresh) = self.commit(s);
        if fresh && self.cfg.change == Change::UpdateProfile {
            s.call.redis_confirmed = false;
        }
        s.call.version = version;
        s.call.committed_age = age;
        // Case 1: only rows that are new, or logged after this instance's log position.
        let covered = !self.cfg.bugs.retry_from_position
            || fresh
            || (self.cfg.nodes[node].redis && s.nodes[node].position_age.is_none_or(|p| age <= p));
        s.call.stage = if covered {
            Stage::RedisWrite
        } else {
            Stage::Wait {
                waits: Vec::new(),
                since_age: 0,
                timeline: s.pg.timeline,
            }
        };
    }

    pub(super) fn call_redis_write(&self, s: &mut State) {
        let c = s.call.node as usize;
        let version = s.call.version;
        if self.cfg.nodes[c].redis {
            let identity = s.redis.identity;
            if !s.nodes[c].redis_link {
                s.nodes[c].pending = true;
            } else {
                if !applied(s.nodes[c].applied, identity, version) {
                    raise(s, version, self.cfg.faults.redis_failover);
                    s.nodes[c].applied = (identity, version);
                    announce(self, s, c, version);
                }
                s.nodes[c].pending = false;
                s.call.redis_confirmed = true;
            }
        }
        Self::forget(s, c);
        // `LocalCache::invalidate`: the keys are published as soon as the Redis write is done,
        // to every instance subscribed (the holders, read next, acknowledge them).
        if self.cfg.nodes[c].redis && s.nodes[c].redis_link {
            // The host of a subscriber hears every message, its own included.
            let host = self.cfg.subscriber.map(usize::from);
            let hears = |j: usize| (j != c && self.cfg.nodes[j].local) || host == Some(j);
            for j in (0..s.nodes.len()).filter(|j| hears(*j)) {
                s.wire.push(Wire::Invalidation {
                    to: j as u8,
                    from: c as u8,
                    attempt: s.call.attempts,
                });
            }
            s.wire.sort();
        }
        s.call.stage = Stage::ReadHolders;
        if self.cfg.change == Change::Eviction && self.cfg.bugs.eviction_without_wait {
            // Case 2: announced to everyone, waited for by no one.
            s.call.stage = Stage::Wait {
                waits: Vec::new(),
                since_age: 0,
                timeline: s.pg.timeline,
            };
        }
    }

    /// `LeaseRepo::holders` (the keys were published before it): every other live lease, and (the fix of
    /// a PostgreSQL failover) for one lease after a new timeline was first seen, whoever may
    /// have held one before it.
    pub(super) fn read_holders(&self, s: &mut State) {
        let c = s.call.node as usize;
        if !self.reach_pg(s, c) {
            s.call.stage = Stage::Idle;
            return;
        }
        let mut waits: Vec<Wait> =
            s.pg.leases
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != c)
                .filter_map(|(j, row)| row.filter(|r| r.end_in > 0).map(|r| (j, r.end_in)))
                .map(|(j, end_in)| Wait {
                    node: j as u8,
                    end_in,
                    done: false,
                })
                .collect();
        let lease = self.cfg.lease;
        if !self.cfg.bugs.timeline_ignored
            && let Some(age) = s.pg.timeline_seen_age
            && age < lease
        {
            waits.push(Wait {
                node: ANYONE,
                end_in: lease - age,
                done: false,
            });
        }
        let checked = self.cfg.checked_lease(c);
        if let Some(w) = waits.iter().find(|w| w.end_in > checked)
            && s.violation.is_none()
        {
            s.violation = Some(Violation::WaitOutlastsTimeout { holder: w.node });
        }
        // Acknowledgements that arrived before the read count.
        for w in waits.iter_mut().filter(|w| w.node != ANYONE) {
            if s.call.acked & (1 << w.node) != 0 {
                w.done = true;
            }
        }
        s.call.stage = Stage::Wait {
            waits,
            since_age: 0,
            timeline: s.pg.timeline,
        };
    }
}
