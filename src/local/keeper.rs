//! The tasks behind the in-process cache: the subscriber (invalidations, acknowledgements,
//! heartbeats; on every instance with Redis, so that revokers hear acknowledgements even with
//! their own cache off) and the keeper (heartbeats sent, the lease taken, renewed and released,
//! the logs read; only with the cache on). See the module comment of `crate::local` for why this
//! is enough.
use std::{sync::atomic::Ordering, time::Duration};

use chrono::{DateTime, TimeDelta, Utc};
use fred::{
    clients::Client,
    interfaces::{ClientLike, EventInterface, PubsubInterface},
    types::Message as Delivered,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Heard, INVALIDATIONS, Keys, LocalCache, acks_channel,
    keys::Message,
    store::{Beat, Store, lock},
};
use crate::{
    clock::{RATE_MARGIN, boot_us},
    store::{
        self, StoreError,
        follow::{BATCH, follow_log},
    },
};

/// Messages the subscriber may fall behind by before it counts itself deaf.
const BACKLOG: usize = 65_536;
/// The keeper's rounds are at least this far apart, whatever wakes it.
const MIN_GAP: Duration = Duration::from_millis(20);

pub(super) fn spawn(cache: LocalCache, stop: CancellationToken) -> Vec<JoinHandle<()>> {
    let Some(client) = cache.shared.redis.new_client(BACKLOG) else {
        return Vec::new();
    };
    let mut tasks = vec![tokio::spawn(listen(cache.clone(), client, stop.clone()))];
    if cache.shared.store.is_some() {
        tasks.push(tokio::spawn(keep(cache, stop)));
    }
    tasks
}

impl LocalCache {
    /// This instance can no longer be sure it hears every invalidation: stop serving copies at
    /// once, drop them, and have the keeper take a fresh lease once it hears itself again.
    pub(super) fn doubt(&self, why: &str) {
        let Some(store) = &self.shared.store else {
            return;
        };
        {
            let _drops = lock(&store.drops);
            store.epoch.fetch_add(1, Ordering::AcqRel);
            store.lease_until.store(0, Ordering::Release);
            store.lost.store(true, Ordering::Release);
            store.clear_locked();
        }
        self.shared.metrics.local_lease_valid.set(0);
        if store.hearing.swap(false, Ordering::AcqRel) {
            store.wake.notify_one();
            tracing::warn!(
                why,
                "local cache: not sure invalidations arrive; copies dropped"
            );
        }
    }

    /// One delivery on either channel. Every instance with Redis takes the announcements of
    /// applied log rows; only holders drop keys and acknowledge them.
    fn deliver(&self, delivered: &Delivered, mine: &str, all: &str) {
        let Some(text) = delivered.value.as_str() else {
            return;
        };
        if delivered.channel == all {
            let Ok(mut message) = serde_json::from_str::<Message>(&text) else {
                tracing::warn!("local cache: an invalidation message could not be read");
                return;
            };
            if let Some(applied) = message.applied.take()
                && message.origin != self.shared.instance
            {
                self.shared.redis.take_announcement(&applied);
            }
            let (origin, nonce) = (message.origin, message.nonce);
            let keys = message.keys();
            if !keys.is_empty() && nonce != 0 {
                let _ = self.shared.messages.send(Heard {
                    origin,
                    nonce,
                    at: std::time::Instant::now(),
                });
            }
            if keys.is_empty() || !self.is_enabled() {
                return;
            }
            self.forget(&keys);
            self.shared.metrics.local_invalidations.inc();
            if origin != self.shared.instance
                && let Some(channel) = acks_channel(&self.shared.redis, origin)
            {
                let redis = self.shared.redis.clone();
                let ack = format!("ack:{nonce}:{}", self.shared.instance);
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
                let Some(store) = &self.shared.store else {
                    return;
                };
                let mut beat = lock(&store.heartbeat);
                if nonce.parse() == Ok(beat.nonce) && !beat.back {
                    beat.back = true;
                    if !store.hearing.swap(true, Ordering::AcqRel) {
                        store.wake.notify_one();
                    }
                }
            }
            (Some("ack"), Some(nonce), Some(instance)) => {
                let (Ok(nonce), Ok(instance)) = (nonce.parse::<u64>(), instance.parse()) else {
                    return;
                };
                self.acknowledged_by(instance, nonce);
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
    // The invalidation channel on every instance: its announcements spare this instance's
    // follower the rows others wrote.
    let channels = vec![mine.clone(), all.clone()];
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
        if let Err(error) = client.subscribe(channels.clone()).await {
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

/// Where the keeper stands while it holds a lease.
struct Lease {
    /// PostgreSQL's time of the last extension (or grant): the logs are read from there.
    position: DateTime<Utc>,
    /// Its length: the fleet's when it was granted.
    length: Duration,
}

/// Every quarter lease (or sooner on a doubt or a heartbeat back): the heartbeat checked and
/// sent again, the lease renewed (or released, or taken afresh). On the way out the lease is
/// released.
async fn keep(cache: LocalCache, stop: CancellationToken) {
    let store = cache.store();
    let beat = store.lease / 4;
    let mut held: Option<Lease> = None;
    let mut counted = None;
    loop {
        heartbeat(&cache, beat).await;
        // Read before `lost`: a doubt after this makes the renewal below leave `lease_until` be.
        let epoch = store.epoch.load(Ordering::Acquire);
        if store.lost.swap(false, Ordering::AcqRel) || !store.hearing.load(Ordering::Acquire) {
            if held.take().is_some() {
                {
                    let _drops = lock(&store.drops);
                    store.lease_until.store(0, Ordering::Release);
                    store.clear_locked();
                }
                let _ = store::in_background(release(&cache)).await;
            }
        } else {
            let renewed = renew(&cache, held.as_ref(), epoch);
            held = match store::in_background(renewed).await {
                Ok(next) => {
                    count_leases(&cache, &mut counted);
                    Some(next)
                }
                // Tried again next beat; meanwhile the lease runs out on its own.
                Err(error) => {
                    tracing::debug!(%error, "local cache: lease not renewed");
                    held
                }
            };
        }
        observe(&cache);
        tokio::time::sleep(MIN_GAP).await;
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

impl LocalCache {
    fn store(&self) -> &Store {
        self.shared
            .store
            .as_ref()
            .expect("the keeper runs only when enabled")
    }
}

async fn release(cache: &LocalCache) -> Result<(), StoreError> {
    cache
        .shared
        .db
        .leases()
        .release(cache.shared.instance)
        .await
}

/// The fleet's leases are counted for their gauge at most this often: a count per renewal would
/// cost every instance work that grows with the fleet.
const COUNT_LEASES: Duration = Duration::from_secs(60);

/// Refreshes `authd_local_cache_instances` when its count is older than [`COUNT_LEASES`], on a
/// task of its own: a slow count never delays a renewal.
fn count_leases(cache: &LocalCache, counted: &mut Option<std::time::Instant>) {
    if counted.is_some_and(|at| at.elapsed() < COUNT_LEASES) {
        return;
    }
    *counted = Some(std::time::Instant::now());
    let shared = cache.shared.clone();
    tokio::spawn(store::in_background(async move {
        if let Ok(held) = shared.db.leases().held().await {
            shared.metrics.local_instances.set(held);
        }
    }));
}

/// The lease and entry gauges.
fn observe(cache: &LocalCache) {
    let store = cache.store();
    let metrics = &cache.shared.metrics;
    metrics.local_lease_valid.set(i64::from(cache.is_trusted()));
    let entries = &metrics.local_entries;
    let (sessions, profiles) = store.entries();
    entries
        .with_label_values(&["sessions"])
        .set(gauge(sessions));
    entries
        .with_label_values(&["profiles"])
        .set(gauge(profiles));
}

fn gauge(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// A doubt if the last heartbeat is a beat old and has not come back; the next one sent when
/// the last came back or is a beat old.
async fn heartbeat(cache: &LocalCache, beat: Duration) {
    let store = cache.store();
    let now = boot_us();
    let beat_us = u64::try_from(beat.as_micros()).unwrap_or(u64::MAX);
    let last = *lock(&store.heartbeat);
    let old = now.saturating_sub(last.sent) >= beat_us;
    if last.nonce != 0 && !last.back && old {
        cache.doubt("the heartbeat did not come back");
    }
    if last.nonce != 0 && !last.back && !old {
        return;
    }
    let nonce = fastrand::u64(1..);
    *lock(&store.heartbeat) = Beat {
        nonce,
        sent: now,
        back: false,
    };
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

/// Extends the lease and then reads the logs, or takes a fresh lease (with an empty cache) when
/// there is none or it ended.
async fn renew(cache: &LocalCache, held: Option<&Lease>, epoch: u64) -> Result<Lease, StoreError> {
    let store = cache.store();
    let shared = &cache.shared;
    let asked = boot_us();
    let extended = match held {
        Some(held) => {
            let leases = shared.db.leases();
            let extended = leases
                .extend(shared.instance, held.length, held.position)
                .await?;
            match extended {
                Some(at) => {
                    read_logs(cache, held.position).await?;
                    Some((at, held.length))
                }
                // It ended (this instance was paused, or PostgreSQL out of reach too long).
                None => None,
            }
        }
        None => None,
    };
    let fresh = extended.is_none();
    let (at, length) = match extended {
        Some(extended) => extended,
        None => {
            {
                let mut floors = lock(&store.drops);
                store.clear_locked();
                floors.clear();
            }
            let leases = shared.db.leases();
            let Some(at) = leases.register(shared.instance, store.lease).await? else {
                if !store.fleet_changed.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        lease = ?store.lease,
                        "local cache: the fleet's lease is no longer the one this instance                          started with; it keeps no copies (still correct, slower) until restarted"
                    );
                }
                return Err(StoreError::Unavailable(None));
            };
            tracing::debug!(instance = %shared.instance, "local cache: lease taken");
            (at, store.lease)
        }
    };
    let believed = length.mul_f64(1.0 - RATE_MARGIN);
    let until = asked + u64::try_from(believed.as_micros()).unwrap_or(u64::MAX);
    let _drops = lock(&store.drops);
    if store.epoch.load(Ordering::Acquire) == epoch {
        if fresh {
            // A fill that read before the grant may predate a revocation whose revoker did
            // not count this instance as a holder: none is kept.
            store.clear_locked();
        }
        store.lease_until.store(until, Ordering::Release);
    }
    Ok(Lease {
        position: at,
        length,
    })
}

/// Drops whatever the logs name from `after` (less the in-flight allowance) on, each row once
/// (the reads overlap by the allowance), and raises the floors no fill may go below while the
/// row is in the window (see `store::Floors`).
async fn read_logs(cache: &LocalCache, after: DateTime<Utc>) -> Result<(), StoreError> {
    let store = cache.store();
    let outbox = cache.shared.db.outbox();
    let in_flight = cache.shared.in_flight;
    follow_log(
        after,
        in_flight,
        |from| outbox.sessions_after(from, BATCH),
        |rows| async move {
            let mut floors = lock(&store.drops);
            let new = rows.iter().filter_map(|r| {
                let hash = <[u8; 32]>::try_from(r.token_hash.as_slice()).ok()?;
                floors.revoked(hash, r.created_at).then_some(hash)
            });
            let keys = Keys {
                sessions: new.collect(),
                ..Keys::default()
            };
            store.forget_locked(&keys);
            true
        },
    )
    .await?;
    follow_log(
        after,
        in_flight,
        |from| outbox.profiles_after(from, BATCH),
        |rows| async move {
            let mut floors = lock(&store.drops);
            let new = rows
                .iter()
                .filter(|r| floors.version(r.user_id, r.version, r.created_at))
                .map(|r| r.user_id);
            let keys = Keys::profiles(new.collect::<Vec<_>>());
            store.forget_locked(&keys);
            true
        },
    )
    .await?;
    // What the next read cannot return any more.
    let horizon = after - in_flight - TimeDelta::seconds(1);
    lock(&store.drops).prune(horizon);
    Ok(())
}
