//! Single flight that stays linearizable: concurrent reads of one key share one read, but no
//! caller is ever answered by a read that began before the caller did.
//!
//! The usual single flight lets a caller join a read already in progress; if an update returned
//! between that read's start and the caller's arrival, the caller gets the old value (a read that
//! goes back in time). Here the read in progress is never joined: callers arriving during it queue
//! into the *next* flight, which starts when the current one ends and answers all of them (it
//! begins by looking at the cache again, which the previous flight has usually just filled). A
//! burst of misses for one key therefore costs at most two reads, however large the burst.
//! (`async_singleflight` and the like only offer the joining kind.)
//!
//! A caller that knows since when it needs a read ([`Coalescer::run_since`]: an event stream's
//! pass, which must read after the revokers' messages it took) also joins a read in progress
//! that began at or after that time.
use std::{collections::HashMap, future::Future, hash::Hash, sync::Mutex, time::Instant};

use tokio::sync::watch;

type Rx<V> = watch::Receiver<Option<V>>;

/// The flight reading now (with when it began), and the one collecting callers for after it.
struct Slot<V> {
    running: Option<(Rx<V>, Instant)>,
    queued: Option<Rx<V>>,
}

pub struct Coalescer<K, V> {
    slots: Mutex<HashMap<K, Slot<V>>>,
}

enum Role<V> {
    Follow(Rx<V>),
    Lead {
        tx: watch::Sender<Option<V>>,
        rx: Rx<V>,
        after: Option<Rx<V>>,
    },
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Coalescer<K, V> {
    fn default() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Coalescer<K, V> {
    /// Runs `work` for `key`, or waits for a flight that had not begun when this call arrived;
    /// with whether this call's `work` ran (it led the flight). `work` may run more than once
    /// per call if a leader is cancelled (its followers retry).
    pub async fn run<F, Fut>(&self, key: K, work: F) -> (V, bool)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = V>,
    {
        self.run_since(key, Instant::now(), work).await
    }

    /// [`run`](Self::run) for a caller that needs a read begun at or after `since` (not after
    /// its arrival): it may also join the flight reading now, if that began since.
    pub async fn run_since<F, Fut>(&self, key: K, since: Instant, work: F) -> (V, bool)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = V>,
    {
        loop {
            match self.role(&key, since) {
                Role::Follow(rx) => {
                    if let Some(value) = outcome(rx).await {
                        return (value, false);
                    }
                    // Its leader was cancelled: try again.
                }
                Role::Lead { tx, rx, after } => {
                    let _guard = Guard {
                        coalescer: self,
                        key: &key,
                        rx: &rx,
                    };
                    if let Some(previous) = after {
                        outcome(previous).await;
                        self.promote(&key, &rx);
                    }
                    let value = work().await;
                    tx.send_replace(Some(value.clone()));
                    return (value, true);
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Slot<V>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn role(&self, key: &K, since: Instant) -> Role<V> {
        let mut slots = self.lock();
        let slot = slots.entry(key.clone()).or_insert(Slot {
            running: None,
            queued: None,
        });
        if let Some((running, began)) = &slot.running
            && *began >= since
        {
            return Role::Follow(running.clone());
        }
        if let Some(queued) = &slot.queued {
            return Role::Follow(queued.clone());
        }
        let (tx, rx) = watch::channel(None);
        match &slot.running {
            Some((running, _)) => {
                let after = Some(running.clone());
                slot.queued = Some(rx.clone());
                Role::Lead { tx, rx, after }
            }
            None => {
                slot.running = Some((rx.clone(), Instant::now()));
                Role::Lead {
                    tx,
                    rx,
                    after: None,
                }
            }
        }
    }

    /// The queued flight `rx` begins: from now on it is the one reading.
    fn promote(&self, key: &K, rx: &Rx<V>) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(key)
            && slot.queued.as_ref().is_some_and(|q| q.same_channel(rx))
        {
            slot.running = slot.queued.take().map(|q| (q, Instant::now()));
        }
    }

    /// No key has a flight reading or queued.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// The leader's value, or `None` if the leader was dropped without one.
async fn outcome<V: Clone>(mut rx: Rx<V>) -> Option<V> {
    rx.wait_for(Option::is_some)
        .await
        .ok()
        .and_then(|v| v.clone())
}

/// Removes a leader's flight from its slot when it ends, however it ends (cancellation included).
struct Guard<'a, K: Hash + Eq + Clone, V: Clone> {
    coalescer: &'a Coalescer<K, V>,
    key: &'a K,
    rx: &'a Rx<V>,
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Guard<'_, K, V> {
    fn drop(&mut self) {
        let mut slots = self.coalescer.lock();
        let Some(slot) = slots.get_mut(self.key) else {
            return;
        };
        if slot
            .running
            .as_ref()
            .is_some_and(|(f, _)| f.same_channel(self.rx))
        {
            slot.running = None;
        }
        if slot
            .queued
            .as_ref()
            .is_some_and(|f| f.same_channel(self.rx))
        {
            slot.queued = None;
        }
        if slot.running.is_none() && slot.queued.is_none() {
            slots.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::*;

    /// A read that takes `ms` and answers the number of reads begun before it began.
    async fn counted(reads: Arc<AtomicUsize>, ms: u64) -> usize {
        let seen = reads.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        seen
    }

    #[tokio::test]
    async fn a_burst_costs_at_most_two_reads_and_nobody_gets_an_older_one() {
        let coalescer = Arc::new(Coalescer::<u8, usize>::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let work = |reads: Arc<AtomicUsize>| move || counted(reads.clone(), 20);
        let first = {
            let (c, w) = (coalescer.clone(), work(reads.clone()));
            tokio::spawn(async move { c.run(1, w).await.0 })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Arrive while the first read is in progress: they must not get its value.
        let late: Vec<_> = (0..50)
            .map(|_| {
                let (c, w) = (coalescer.clone(), work(reads.clone()));
                tokio::spawn(async move { c.run(1, w).await.0 })
            })
            .collect();
        assert_eq!(first.await.unwrap(), 0);
        for call in late {
            assert_eq!(
                call.await.unwrap(),
                1,
                "answered by the read begun after it"
            );
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert!(
            coalescer.is_empty(),
            "finished flights leave nothing behind"
        );
    }

    #[tokio::test]
    async fn a_cancelled_leader_leaves_its_followers_to_read_themselves() {
        let coalescer = Arc::new(Coalescer::<u8, u8>::default());
        let running = {
            let c = coalescer.clone();
            tokio::spawn(async move { c.run(1, std::future::pending::<u8>).await.0 })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let queued_leader = {
            let c = coalescer.clone();
            tokio::spawn(async move { c.run(1, std::future::pending::<u8>).await.0 })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        let follower = {
            let c = coalescer.clone();
            tokio::spawn(async move { c.run(1, || async { 7 }).await.0 })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        queued_leader.abort();
        running.abort();
        let answer = tokio::time::timeout(Duration::from_secs(1), follower).await;
        assert_eq!(answer.unwrap().unwrap(), 7);
        assert!(coalescer.is_empty());
    }

    #[tokio::test]
    async fn a_caller_joins_a_read_in_progress_only_if_it_began_since_the_caller_needs() {
        let coalescer = Arc::new(Coalescer::<u8, usize>::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let work = |reads: Arc<AtomicUsize>| move || counted(reads.clone(), 30);
        let before = std::time::Instant::now();
        let first = {
            let (c, w) = (coalescer.clone(), work(reads.clone()));
            tokio::spawn(async move { c.run(1, w).await.0 })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Needs a read begun since `before`: the one in progress began after it.
        let (joined, led) = coalescer.run_since(1, before, work(reads.clone())).await;
        assert_eq!((joined, led), (0, false), "joined the read in progress");
        // Needs a read begun since now: the next one.
        let late = {
            let (c, w) = (coalescer.clone(), work(reads.clone()));
            tokio::spawn(async move { c.run_since(1, std::time::Instant::now(), w).await.0 })
        };
        assert_eq!(first.await.unwrap(), 0);
        assert_eq!(late.await.unwrap(), 1, "a read begun after it");
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }
}
