//! The two tasks of an instance with the in-process cache on: the subscriber (invalidations,
//! acknowledgements, heartbeats) and the keeper (heartbeats sent, the lease taken, renewed and
//! released, the logs read). See the module comment of `crate::local` for why this is enough.
use std::{sync::atomic::Ordering, time::Duration};

use chrono::{DateTime, Utc};
use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    types::Message as Delivered,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    INVALIDATIONS, Keys, LocalCache, Message, RATE_MARGIN, Store, acks_channel, lock, now_us,
};
use crate::{
    jobs::follow::{BATCH, follow_log},
    store::{self, StoreError},
};

/// Messages the subscriber may fall behind by before it counts itself deaf.
const BACKLOG: usize = 65_536;

pub(super) fn spawn(cache: LocalCache, stop: CancellationToken) -> Vec<JoinHandle<()>> {
    if cache.shared.store.is_none() {
        return Vec::new();
    }
    let Some(client) = cache.shared.redis.new_client(BACKLOG) else {
        return Vec::new();
    };
    vec![
        tokio::spawn(listen(cache.clone(), client, stop.clone())),
        tokio::spawn(keep(cache, stop)),
    ]
}

impl LocalCache {
    fn store(&self) -> &Store {
        self.shared
            .store
            .as_ref()
            .expect("the keeper runs only when enabled")
    }

    /// This instance can no longer be sure it hears every invalidation: stop serving copies at
    /// once, drop them, and have the keeper release the lease and take a fresh one later.
    fn doubt(&self, why: &str) {
        let store = self.store();
        let was = store.hearing.swap(false, Ordering::AcqRel);
        store.lease_until.store(0, Ordering::Release);
        store.epoch.fetch_add(1, Ordering::AcqRel);
        store.lost.store(true, Ordering::Release);
        store.clear();
        self.shared.metrics.local_lease_valid.set(0);
        store.wake.notify_one();
        if was {
            tracing::warn!(
                why,
                "local cache: not sure invalidations arrive; copies dropped"
            );
        }
    }

    /// One delivery on either channel.
    fn deliver(&self, delivered: &Delivered, mine: &str, all: &str) {
        let Some(text) = delivered.value.as_str() else {
            return;
        };
        if delivered.channel == all {
            let Ok(message) = serde_json::from_str::<Message>(&text) else {
                tracing::warn!("local cache: an invalidation message could not be read");
                return;
            };
            self.store().forget(&message.keys);
            self.shared.metrics.local_invalidations.inc();
            if message.origin != self.shared.instance
                && let Some(channel) = acks_channel(&self.shared.redis, message.origin)
            {
                let redis = self.shared.redis.clone();
                let ack = format!("ack:{}:{}", message.nonce, self.shared.instance);
                tokio::spawn(async move { redis.publish(&channel, ack).await });
            }
        } else if delivered.channel == mine {
            self.acknowledged(&text);
        }
    }

    /// An acknowledgement for one of this instance's waits, or its own heartbeat.
    fn acknowledged(&self, text: &str) {
        let mut parts = text.split(':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("hb"), Some(nonce), None) => {
                let store = self.store();
                let mut heartbeat = lock(&store.heartbeat);
                if nonce.parse() == Ok(heartbeat.0) && !heartbeat.1 {
                    heartbeat.1 = true;
                    if !store.hearing.swap(true, Ordering::AcqRel) {
                        store.wake.notify_one();
                    }
                }
            }
            (Some("ack"), Some(nonce), Some(instance)) => {
                let (Ok(nonce), Ok(instance)) = (nonce.parse::<u64>(), instance.parse()) else {
                    return;
                };
                let waiter = lock(&self.shared.waiters).get(&nonce).cloned();
                if let Some(waiter) = waiter {
                    let mut pending = lock(&waiter.pending);
                    if pending.remove(&instance) && pending.is_empty() {
                        waiter.done.notify_one();
                    }
                }
            }
            _ => {}
        }
    }
}

/// Subscribes (again after every reconnection) and delivers; every connection event is a doubt.
async fn listen(cache: LocalCache, client: Client, stop: CancellationToken) {
    let redis = &cache.shared.redis;
    let (Some(all), Some(mine)) = (
        redis.channel(INVALIDATIONS),
        acks_channel(redis, cache.shared.instance),
    ) else {
        return;
    };
    let mut messages = client.message_rx();
    let mut reconnections = client.reconnect_rx();
    let mut errors = client.error_rx();
    let _connection = client.connect();
    'connection: loop {
        tokio::select! {
            () = stop.cancelled() => break,
            connected = client.wait_for_connect() => if connected.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        if let Err(error) = client.subscribe(vec![all.clone(), mine.clone()]).await {
            tracing::debug!(%error, "local cache: subscribe failed; retrying");
            cache.doubt("subscribe failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        loop {
            tokio::select! {
                () = stop.cancelled() => break 'connection,
                delivered = messages.recv() => match delivered {
                    Ok(delivered) => cache.deliver(&delivered, &mine, &all),
                    Err(_) => cache.doubt("invalidations were dropped unread"),
                },
                _ = reconnections.recv() => {
                    cache.doubt("the subscriber reconnected");
                    continue 'connection;
                }
                _ = errors.recv() => cache.doubt("the subscriber's connection failed"),
            }
        }
    }
    let _ = client.quit().await;
}

/// Where the keeper stands.
struct Lease {
    /// PostgreSQL's time of the last extension (or grant): the logs were read from there.
    position: DateTime<Utc>,
    /// The extension before it, whose log read is complete (recorded as `applied_through`).
    applied: DateTime<Utc>,
}

/// Every quarter lease (or at once on a doubt or a heartbeat back): the heartbeat checked and
/// sent again, the lease renewed (or released, or taken afresh). On the way out the lease is
/// released.
async fn keep(cache: LocalCache, stop: CancellationToken) {
    let store = cache.store();
    let beat = store.settings.lease / 4;
    let mut held: Option<Lease> = None;
    loop {
        heartbeat(&cache).await;
        if store.lost.swap(false, Ordering::AcqRel) || !store.hearing.load(Ordering::Acquire) {
            if held.take().is_some() {
                let _ = store::in_background(release(&cache)).await;
            }
        } else {
            held = match store::in_background(renew(&cache, held.as_ref())).await {
                Ok(next) => Some(next),
                // Tried again next beat; meanwhile the lease runs out on its own.
                Err(error) => {
                    tracing::debug!(%error, "local cache: lease not renewed");
                    held
                }
            };
        }
        observe(&cache).await;
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(beat) => {}
            () = store.wake.notified() => {}
        }
    }
    store.lease_until.store(0, Ordering::Release);
    store.clear();
    let released = store::in_background(release(&cache));
    let _ = tokio::time::timeout(Duration::from_secs(2), released).await;
}

async fn release(cache: &LocalCache) -> Result<(), StoreError> {
    cache
        .shared
        .db
        .leases()
        .release(cache.shared.instance)
        .await
}

/// The lease and entry gauges.
async fn observe(cache: &LocalCache) {
    let store = cache.store();
    let metrics = &cache.shared.metrics;
    metrics.local_lease_valid.set(i64::from(cache.is_trusted()));
    let entries = &metrics.local_entries;
    entries
        .with_label_values(&["sessions"])
        .set(gauge(store.sessions.entry_count()));
    entries
        .with_label_values(&["profiles"])
        .set(gauge(store.profiles.entry_count()));
    if let Ok(count) = store::in_background(cache.shared.db.leases().held()).await {
        metrics.local_instances.set(count);
    }
}

fn gauge(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// Checks that the last heartbeat came back (a doubt otherwise) and sends the next one.
async fn heartbeat(cache: &LocalCache) {
    let store = cache.store();
    let (last, back) = *lock(&store.heartbeat);
    if last != 0 && !back {
        cache.doubt("the heartbeat did not come back");
    }
    let nonce = fastrand::u64(1..);
    *lock(&store.heartbeat) = (nonce, false);
    let Some(channel) = acks_channel(&cache.shared.redis, cache.shared.instance) else {
        return;
    };
    if !cache
        .shared
        .redis
        .publish(&channel, format!("hb:{nonce}"))
        .await
    {
        cache.doubt("the heartbeat could not be sent");
    }
}

/// Extends the lease (reading the logs), or takes a fresh one when there is none or it ended.
async fn renew(cache: &LocalCache, held: Option<&Lease>) -> Result<Lease, StoreError> {
    let store = cache.store();
    let shared = &cache.shared;
    let lease = store.settings.lease;
    let epoch = store.epoch.load(Ordering::Acquire);
    let asked = now_us();
    let extended = match held {
        Some(held) => {
            let leases = shared.db.leases();
            match leases.extend(shared.instance, lease, held.applied).await? {
                Some(at) => {
                    read_logs(cache, held.position).await?;
                    Some(at)
                }
                // It ended (this instance was paused, or PostgreSQL out of reach too long).
                None => None,
            }
        }
        None => None,
    };
    let at = match extended {
        Some(at) => at,
        None => {
            store.clear();
            let at = shared.db.leases().register(shared.instance, lease).await?;
            tracing::debug!(instance = %shared.instance, "local cache: lease taken");
            at
        }
    };
    let believed = lease.mul_f64(1.0 - RATE_MARGIN);
    let until = asked + u64::try_from(believed.as_micros()).unwrap_or(u64::MAX);
    let _drops = lock(&store.drops);
    if store.epoch.load(Ordering::Acquire) == epoch {
        store.lease_until.store(until, Ordering::Release);
    }
    Ok(Lease {
        position: at,
        applied: at,
    })
}

/// Drops whatever the logs name from `after` (less the in-flight allowance) on.
async fn read_logs(cache: &LocalCache, after: DateTime<Utc>) -> Result<(), StoreError> {
    let store = cache.store();
    let outbox = cache.shared.db.outbox();
    let in_flight = cache.shared.in_flight;
    follow_log(
        after,
        in_flight,
        |from| outbox.sessions_after(from, BATCH),
        |rows| async move {
            store.forget(&Keys::sessions(
                rows.iter().map(|r| r.token_hash.as_slice()),
            ));
            true
        },
    )
    .await?;
    follow_log(
        after,
        in_flight,
        |from| outbox.profiles_after(from, BATCH),
        |rows| async move {
            store.forget(&Keys::profiles(rows.iter().map(|r| r.user_id)));
            true
        },
    )
    .await?;
    Ok(())
}
