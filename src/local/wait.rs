//! A revoking call's wait (see the module comment of `crate::local`): publish the keys, then wait
//! for each holder's acknowledgement, its catch-up through the logs, or its lease's end — within
//! the call's deadline.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::Notify;
use uuid::Uuid;

use super::{
    INVALIDATIONS, Keys, LocalCache,
    keys::{MESSAGE_KEYS, Message},
    store::lock,
};
use crate::{
    cache::Announcement,
    clock::lease_wait,
    store::{Holders, StoreError},
    telemetry::traces,
};

/// The waits of this instance, by the nonce of each message they sent.
#[derive(Default)]
pub(super) struct Waits(Mutex<HashMap<u64, Arc<Waiter>>>);

/// One wait: the (instance, message nonce) pairs not acknowledged yet.
#[derive(Default)]
pub(super) struct Waiter {
    pending: Mutex<Pending>,
    done: Notify,
}

/// Before the holders are read, acknowledgements are kept aside (the keys went out first).
#[derive(Default)]
struct Pending {
    holders_known: bool,
    owed: HashSet<(Uuid, u64)>,
    early: HashSet<(Uuid, u64)>,
}

impl LocalCache {
    /// Once `written` (the change's Redis write) is done, drops `keys` here and waits until no
    /// other instance can serve a copy of them (see the module comment). Call after the change
    /// committed, with every key the call covers, whoever changed it. The keys are published as
    /// soon as `written` is done, to every instance subscribed then, and the lease holders read
    /// after that: an instance that takes a lease after the read fills from a Redis that has the
    /// change, and a holder's log read after it (`applied_through > since`) comes after the Redis
    /// write too; a holder that did not get the message (not subscribed when it went out) sends
    /// no acknowledgement and is waited for until it catches up or its lease ends, and one that
    /// did dropped the keys before acknowledging. The message travels while the holders are read. UNAVAILABLE when the holders cannot be read,
    /// or when the wait would outlast the call's deadline (`clock::deadline`).
    ///
    /// `written` answers what it wrote to the cache ([`Announcement`]): the other instances hear
    /// it with the keys, in the same message, at once.
    pub async fn invalidate(
        &self,
        keys: Keys,
        written: impl Future<Output = Announcement>,
    ) -> Result<(), StoreError> {
        if keys.is_empty() {
            self.announce(written.await).await;
            return Ok(());
        }
        let started = Instant::now();
        let announcement = written.await;
        // After Redis: a fill that read the old copy before this cannot keep it.
        self.forget(&keys);
        let partial = keys.partial;
        let chunks = keys.chunks(MESSAGE_KEYS);
        let nonces: Vec<u64> = chunks.iter().map(|_| fastrand::u64(1..)).collect();
        let waiter = Arc::new(Waiter::default());
        let _registered = Registered::new(&self.shared.waits, &nonces, &waiter);
        self.publish(chunks, &nonces, announcement).await;
        let read = self
            .shared
            .db
            .leases()
            .holders(self.shared.instance)
            .await?;
        if read.holders.is_empty() && read.window.is_none() {
            self.waited(started, "none");
            return Ok(());
        }
        // With some keys unnamed, each holder also owes an acknowledgement nobody sends (nonce 0
        // is never drawn for a message).
        let owed: Vec<u64> = nonces.iter().copied().chain(partial.then_some(0)).collect();
        waiter.expect(
            read.holders
                .iter()
                .flat_map(|h| owed.iter().map(|n| (h.instance, *n))),
        );
        let ended = self.wait_for(&read, &waiter).await;
        self.waited(started, ended.unwrap_or("deadline"));
        match ended {
            Some(_) => Ok(()),
            None => {
                tracing::warn!(
                    waiting_for = waiter.instances().len(),
                    "a revoking call's wait would outlast its deadline; answering UNAVAILABLE \
                     (the change is committed and a retry waits again)"
                );
                Err(StoreError::Unavailable(None))
            }
        }
    }

    /// Waits until every holder of `read` acknowledged, caught up or saw its lease end, and any
    /// timeline window passed; how it ended, or `None` when the call's deadline came first.
    async fn wait_for(&self, read: &Holders, waiter: &Waiter) -> Option<&'static str> {
        let asked = read.asked;
        let mut ends: HashMap<Uuid, Instant> = read
            .holders
            .iter()
            .map(|h| (h.instance, asked + lease_wait(h.remaining)))
            .collect();
        let mut window = read.window.map(|w| asked + w);
        let deadline = crate::clock::answer_by();
        let watching: Vec<Uuid> = ends.keys().copied().collect();
        let (_interest, mut polls) = self.shared.poller.watch(&watching);
        let mut polling = true;
        let mut ended = "acked";
        loop {
            let now = Instant::now();
            if waiter.retain(|instance| ends.get(instance).is_some_and(|end| *end > now)) {
                ended = "lease_ended";
            }
            let waiting = waiter.instances();
            window = window.filter(|w| *w > now);
            if waiting.is_empty() && window.is_none() {
                return Some(ended);
            }
            ends.retain(|instance, _| waiting.contains(instance));
            let next = ends.values().chain(window.iter()).min().copied();
            let next = next.unwrap_or(now + Duration::from_secs(1));
            if deadline.is_some_and(|d| d <= now) {
                return None;
            }
            let wake = deadline.map_or(next, |d| next.min(d));
            tokio::select! {
                () = waiter.done.notified() => {}
                () = tokio::time::sleep_until(wake.into()) => {}
                changed = polls.changed(), if polling => {
                    if changed.is_err() {
                        polling = false;
                        continue;
                    }
                    let poll = polls.borrow_and_update().clone();
                    let Some(poll) = poll else { continue };
                    if poll.read.timeline != read.timeline {
                        // The lease table of another history cannot end a wait: one lease from
                        // when that history was first seen, whoever held a lease before.
                        if window.is_none() {
                            window = Some(Instant::now() + self.shared.db.history_window());
                        }
                        continue;
                    }
                    if waiter.retain(|instance| !poll.caught_up(instance, read.since)) {
                        ended = "caught_up";
                    }
                }
            }
        }
    }

    /// Publishes each chunk of keys with its nonce on the invalidation channel, the
    /// announcement's chunks riding along (any left over in messages of their own).
    pub(super) async fn publish(&self, chunks: Vec<Keys>, nonces: &[u64], applied: Announcement) {
        let shared = &self.shared;
        let Some(channel) = shared.redis.channel(INVALIDATIONS) else {
            return;
        };
        let mut announced = applied.chunks(MESSAGE_KEYS).into_iter();
        let mut messages: Vec<Message> = chunks
            .into_iter()
            .zip(nonces)
            .map(|(keys, nonce)| Message::new(shared.instance, *nonce, keys, announced.next()))
            .collect();
        messages
            .extend(announced.map(|a| Message::new(shared.instance, 0, Keys::default(), Some(a))));
        let sends = messages.into_iter().map(|message| {
            let text = serde_json::to_string(&message).unwrap_or_default();
            shared.redis.publish(&channel, text)
        });
        futures::future::join_all(sends).await;
    }

    /// Tells the other instances which log rows this one wrote to its Redis generation, so
    /// that their followers do not write them again (one message per [`MESSAGE_KEYS`] rows;
    /// none when there is nothing to tell).
    pub async fn announce(&self, applied: Announcement) {
        if !applied.is_empty() {
            self.publish(Vec::new(), &[], applied).await;
        }
    }

    fn waited(&self, started: Instant, ended: &'static str) {
        let wait = &self.shared.metrics.local_wait;
        let seconds = started.elapsed().as_secs_f64();
        traces::note(traces::REVOCATION_WAIT, ended);
        traces::note(traces::REVOCATION_WAIT_SECONDS, seconds);
        wait.with_label_values(&[ended]).observe(seconds);
    }

    /// An acknowledgement of `nonce` by `instance` arrived.
    pub(super) fn acknowledged_by(&self, instance: Uuid, nonce: u64) {
        let waiter = lock(&self.shared.waits.0).get(&nonce).cloned();
        if let Some(waiter) = waiter {
            waiter.acknowledged(instance, nonce);
        }
    }
}

/// A wait's nonces in the waits map, removed however the wait ends (a cancelled call included).
struct Registered<'a> {
    waits: &'a Waits,
    nonces: &'a [u64],
}

impl<'a> Registered<'a> {
    fn new(waits: &'a Waits, nonces: &'a [u64], waiter: &Arc<Waiter>) -> Self {
        let mut map = lock(&waits.0);
        for nonce in nonces {
            map.insert(*nonce, waiter.clone());
        }
        Self { waits, nonces }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.waits.0);
        for nonce in self.nonces {
            map.remove(nonce);
        }
    }
}

impl Waiter {
    /// The holders are known: these pairs are owed, less what arrived already.
    fn expect(&self, owed: impl IntoIterator<Item = (Uuid, u64)>) {
        let mut pending = lock(&self.pending);
        let early = std::mem::take(&mut pending.early);
        pending.owed = owed.into_iter().filter(|p| !early.contains(p)).collect();
        pending.holders_known = true;
    }

    /// Keeps the (instance, nonce) pairs whose instance `keep` says; whether any went.
    fn retain(&self, keep: impl Fn(&Uuid) -> bool) -> bool {
        let mut pending = lock(&self.pending);
        let before = pending.owed.len();
        pending.owed.retain(|(instance, _)| keep(instance));
        pending.owed.len() != before
    }

    /// The instances still owing an acknowledgement.
    fn instances(&self) -> HashSet<Uuid> {
        lock(&self.pending).owed.iter().map(|(i, _)| *i).collect()
    }

    fn acknowledged(&self, instance: Uuid, nonce: u64) {
        let mut pending = lock(&self.pending);
        if !pending.holders_known {
            pending.early.insert((instance, nonce));
            return;
        }
        if pending.owed.remove(&(instance, nonce)) && pending.owed.is_empty() {
            self.done.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_ends_when_every_holder_acknowledged_every_message() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let waiter = Waiter::default();
        // Before the holders are read: kept aside, and counted once they are.
        waiter.acknowledged(a, 1);
        waiter.expect([(a, 1), (a, 2), (b, 1), (b, 2)]);
        assert_eq!(waiter.instances(), [a, b].into_iter().collect());
        waiter.acknowledged(a, 1);
        waiter.acknowledged(b, 3);
        assert_eq!(waiter.instances(), [a, b].into_iter().collect());
        assert!(waiter.retain(|i| *i != b), "b's lease ended");
        assert!(!waiter.retain(|i| *i != b));
        waiter.acknowledged(a, 2);
        assert!(waiter.instances().is_empty());
    }
}
