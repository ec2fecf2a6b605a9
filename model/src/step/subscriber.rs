//! A caller in strict mode (`client/`): validations kept in its own memory under a lease that
//! its host (the authd instance serving its event stream, `src/events`) takes for it and extends
//! each time it acknowledges a pass over the logs. Its lease is a row of the lease table like an
//! instance's, so every revoking call waits for it exactly as for an instance: its
//! acknowledgement (relayed by the host), its catch-up through the logs (`applied_through`), or
//! its lease's end.
use super::*;
use crate::state::{Ack, Event};

impl Protocol {
    /// The lease table's row of subscriber `k`.
    pub(crate) fn sub_row(&self, k: usize) -> usize {
        self.cfg.nodes.len() + k
    }

    fn host(&self) -> Option<usize> {
        self.cfg.subscriber.map(usize::from)
    }

    /// The client's `State::trusted`: its stream is open, its first pass applied (its floors
    /// cover the horizon), its lease believed, and (unless
    /// [`crate::config::Bugs::subscriber_trusts_stale_passes`]) the pass it applied last was
    /// read within the bound (a change that no one waits for, the previous release's, reaches
    /// it within the bound as it reaches the instances).
    fn trusted_sub(&self, s: &State, k: usize) -> bool {
        let sub = &s.subscribers[k];
        let fresh = self.cfg.bugs.subscriber_trusts_stale_passes || sub.fresh_for > 0;
        sub.connected && sub.primed && sub.belief_for > 0 && fresh
    }

    /// The stream broke (or the host ended it): the client drops everything and trusts
    /// nothing until a new subscription is primed and granted.
    fn sub_reset(s: &mut State, k: usize) {
        let sub = &mut s.subscribers[k];
        sub.connected = false;
        sub.primed = false;
        sub.copy = None;
        sub.belief_for = 0;
        sub.event = None;
        sub.ack = None;
        sub.relay = None;
        sub.granted = None;
        sub.fresh_for = 0;
        sub.heard = None;
    }

    /// What instance `i` answers a ValidateSession at once (`None`: UNAVAILABLE): its trusted
    /// copy, a tombstone or a copy of its generation in Redis, else PostgreSQL.
    fn instance_answer(&self, s: &State, i: usize) -> Option<u8> {
        let n = &s.nodes[i];
        if n.paused {
            return None;
        }
        if self.trusted_local(s, i)
            && let Some(version) = n.copy
        {
            return Some(version);
        }
        if self.cfg.nodes[i].redis && n.redis_link {
            match s.redis.slot {
                Slot::Invalidation { version } if self.is_session() => return Some(version),
                Slot::Copy {
                    version,
                    generation,
                } if self.serving_redis(s, i) && generation == n.generation => {
                    return Some(version);
                }
                _ => {}
            }
        }
        n.pg_link.then_some(s.pg.version)
    }

    pub(super) fn sub_actions(&self, s: &State, out: &mut Vec<Action>) {
        let Some(host) = self.host() else {
            return;
        };
        let h = &s.nodes[host];
        let host_up = !h.paused && h.pg_link;
        for (k, sub) in s.subscribers.iter().enumerate() {
            let id = k as u8;
            if !sub.connected && host_up {
                out.push(Action::SubConnect(id));
            }
            if sub.connected && sub.event.is_none() && host_up {
                out.push(Action::SubPass(id));
            }
            if sub.event.is_some() && sub.ack.is_none() {
                out.push(Action::SubApply(id));
            }
            if sub.ack.as_ref().is_some_and(|a| a.relay.is_some()) && !h.paused {
                out.push(Action::SubRelay(id));
            }
            if sub.ack.is_some() && host_up {
                out.push(Action::SubExtend(id));
            }
            if sub.fetch.is_none() && s.sub_reads_left > 0 {
                for via in (0..s.nodes.len()).filter(|i| self.cfg.readers & (1 << i) != 0) {
                    out.push(Action::SubRead {
                        sub: id,
                        via: via as u8,
                    });
                }
            }
            if sub.fetch.is_some() {
                out.push(Action::SubKeep(id));
            }
            if sub.connected && self.cfg.faults.stream_cut && s.faults_left > 0 {
                out.push(Action::SubDisconnect(id));
            }
        }
    }

    /// `subscription::open`: a lease for the new subscription, then passes from the horizon
    /// back (unless [`crate::config::Bugs::subscriber_starts_at_the_end`]). The model keeps one
    /// row per subscriber: a new subscription's lease runs to the later end of the two, and
    /// records no progress of its own (the code gives it a row of its own).
    pub(super) fn sub_connect(&self, s: &mut State, k: usize) {
        let host = self.host().expect("a host");
        if !self.reach_pg(s, host) {
            return;
        }
        let row = self.sub_row(k);
        let lease = self.cfg.lease;
        let cap = self.cfg.cap();
        let applied_age = s.pg.leases[row].map_or(cap, |r| r.applied_age);
        s.pg.leases[row] = Some(LeaseRow {
            end_in: lease,
            applied_age,
        });
        let from = if self.cfg.bugs.subscriber_starts_at_the_end {
            s.pg.version
        } else {
            0
        };
        let sub = &mut s.subscribers[k];
        sub.connected = true;
        sub.primed = false;
        sub.seen = 0;
        sub.from = from;
        sub.granted = Some(0);
        sub.heard = Some(0);
    }

    /// `Hub::pass`: the host reads the logs and sends what they show, with the revokers'
    /// messages it received before the read began.
    pub(super) fn sub_pass(&self, s: &mut State, k: usize) {
        let host = self.host().expect("a host");
        if !self.reach_pg(s, host) {
            return;
        }
        let version = s.pg.version;
        let sub = &mut s.subscribers[k];
        sub.event = Some(Event {
            version,
            read_age: 0,
            relay: sub.relay.take(),
            grant: sub.granted.take(),
            read_after: sub.heard,
        });
    }

    /// The client's `State::apply`: what the pass shows is dropped and becomes a floor; the
    /// lease granted before the pass began is believed, from before the acknowledgement that
    /// asked for it was sent; then the pass is acknowledged. (A grant believed before the pass
    /// after it is applied would cover a revocation committed between the acknowledged pass's
    /// read and the extension, whose revoker read the old end.)
    pub(super) fn sub_apply(&self, s: &mut State, k: usize) {
        let sub = &mut s.subscribers[k];
        let event = sub.event.take().expect("a pass to apply");
        let shown = if event.version > sub.from {
            event.version
        } else {
            0
        };
        if shown > sub.seen {
            sub.seen = shown;
            sub.copy = None;
        }
        sub.primed = true;
        if let Some(age) = event.read_after {
            sub.fresh_for = self.cfg.bound.saturating_sub(age);
        }
        if let Some(age) = event.grant {
            sub.belief_for = (self.cfg.lease - 1).saturating_sub(age);
        }
        sub.ack = Some(Ack {
            read_age: event.read_age,
            sent_age: 0,
            relay: event.relay,
        });
    }

    /// `Subscription::relay`: the host received an acknowledgement and tells the revokers whose
    /// messages the acknowledged passes carried, before extending the lease: the subscriber
    /// applied those passes, whatever becomes of its lease.
    pub(super) fn sub_relay(&self, s: &mut State, k: usize) {
        let row = self.sub_row(k);
        let relay = s.subscribers[k]
            .ack
            .as_mut()
            .and_then(|ack| ack.relay.take());
        if let Some((from, attempt)) = relay {
            s.wire.push(Wire::Ack {
                to: from,
                holder: row as u8,
                attempt,
            });
            s.wire.sort();
        }
    }

    /// `Subscription::acknowledged`: the host extends the lease, recording as applied what was
    /// committed before the acknowledged pass began, and sends the grant with its next pass.
    /// The messages the pass covers are acknowledged to their revokers. A lease that had ended
    /// ends the stream.
    pub(super) fn sub_extend(&self, s: &mut State, k: usize) {
        let host = self.host().expect("a host");
        if !self.reach_pg(s, host) {
            return;
        }
        let row = self.sub_row(k);
        let lease = self.cfg.lease;
        let bugs = self.cfg.bugs;
        let ack = s.subscribers[k].ack.take().expect("an acknowledgement");
        match &mut s.pg.leases[row] {
            Some(r) if r.end_in > 0 => {
                r.end_in = lease;
                r.applied_age = if bugs.subscriber_applied_through_at_extension {
                    0
                } else {
                    r.applied_age.min(ack.read_age)
                };
            }
            _ => {
                Self::sub_reset(s, k);
                return;
            }
        }
        s.subscribers[k].granted = Some(ack.sent_age);
        s.subscribers[k].heard = Some(ack.sent_age);
        if let Some((from, attempt)) = ack.relay {
            s.wire.push(Wire::Ack {
                to: from,
                holder: row as u8,
                attempt,
            });
            s.wire.sort();
        }
    }

    /// The host received a revoker's message: relayed once a pass begun after it is
    /// acknowledged (or, [`crate::config::Bugs::subscriber_acks_pass_before_message`], on the
    /// pass already under way).
    pub(super) fn sub_message(&self, s: &mut State, to: usize, from: u8, attempt: u8) {
        if self.host() != Some(to) {
            return;
        }
        let early = self.cfg.bugs.subscriber_acks_pass_before_message;
        for sub in s.subscribers.iter_mut().filter(|sub| sub.connected) {
            let relay = Some((from, attempt));
            if early && let Some(event) = &mut sub.event {
                event.relay = relay;
            } else if early && let Some(ack) = &mut sub.ack {
                ack.relay = relay;
            } else {
                sub.relay = relay;
            }
        }
    }

    /// The client's `Validator::validate`: from memory when trusted, else ValidateSession on
    /// instance `via` (its answer is a read of authd like any other).
    pub(super) fn sub_read(&self, s: &mut State, k: usize, via: usize) {
        s.sub_reads_left -= 1;
        let promised = s.call.ok;
        let row = self.sub_row(k);
        if self.trusted_sub(s, k)
            && let Some(version) = s.subscribers[k].copy
        {
            self.answer(s, row, promised, version);
            return;
        }
        if let Some(version) = self.instance_answer(s, via) {
            self.answer(s, via, promised, version);
            if !self.is_session() || version == 0 {
                s.subscribers[k].fetch = Some(version);
            }
        }
    }

    /// The client's `State::keep`: kept only while trusted, and (unless
    /// [`crate::config::Bugs::subscriber_fills_below_floor`]) not below what the stream
    /// showed.
    pub(super) fn sub_keep(&self, s: &mut State, k: usize) {
        let version = s.subscribers[k].fetch.take().expect("a fetch to keep");
        let above = self.cfg.bugs.subscriber_fills_below_floor || version >= s.subscribers[k].seen;
        if self.trusted_sub(s, k) && above {
            s.subscribers[k].copy = Some(version);
        }
    }

    pub(super) fn sub_disconnect(&self, s: &mut State, k: usize) {
        s.faults_left -= 1;
        Self::sub_reset(s, k);
    }

    pub(super) fn sub_tick(&self, s: &mut State) {
        let cap = self.cfg.cap();
        for sub in &mut s.subscribers {
            sooner(&mut sub.belief_for);
            sooner(&mut sub.fresh_for);
            if let Some(age) = &mut sub.heard {
                older(age, cap);
            }
            if let Some(event) = &mut sub.event {
                older(&mut event.read_age, cap);
                if let Some(age) = &mut event.grant {
                    older(age, cap);
                }
                if let Some(age) = &mut event.read_after {
                    older(age, cap);
                }
            }
            if let Some(age) = &mut sub.granted {
                older(age, cap);
            }
            if let Some(ack) = &mut sub.ack {
                older(&mut ack.read_age, cap);
                older(&mut ack.sent_age, cap);
            }
        }
    }
}
