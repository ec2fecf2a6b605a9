//! One poll of the lease table for every wait of this instance: while any revoking call waits
//! for holders that may have caught up through the logs, one task asks PostgreSQL every
//! [`POLL`] how far those holders have applied the logs, and every waiting call reads the
//! answer. N concurrent waits cost one query per poll, not N.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::lock;
use crate::store::{self, Db, Progress};

/// How often the waits of this instance ask PostgreSQL who caught up.
pub const POLL: Duration = Duration::from_millis(100);

/// What one poll saw.
#[derive(Debug)]
pub struct Poll {
    /// The holders it asked about: a holder it did not ask about is not answered by its
    /// missing row.
    pub asked: HashSet<Uuid>,
    /// The PostgreSQL history, time and rows of the read.
    pub read: Progress,
}

impl Poll {
    /// Whether `instance` is done with everything committed before `since` (PostgreSQL's time
    /// of the wait's holders read): this poll asked about it, was read after `since` (by more
    /// than a clock step may take back), and saw
    /// its lease ended (or gone), or the logs applied past `since`. A poll read before `since`
    /// (it was under way when the wait began) answers nothing: the lease it saw ended may have
    /// been taken again, with copies, before the holders read.
    pub fn caught_up(&self, instance: &Uuid, since: DateTime<Utc>) -> bool {
        // PostgreSQL's clock may step back by up to FIXED_MARGIN (README "Assumptions").
        let margin = chrono::TimeDelta::from_std(crate::clock::FIXED_MARGIN).unwrap_or_default();
        self.read.at > since + margin
            && self.asked.contains(instance)
            && self.read.rows.get(instance).is_none_or(|row| {
                row.ended || row.applied_through.is_some_and(|applied| applied > since)
            })
    }
}

pub struct Poller {
    db: Arc<Db>,
    /// The holders some wait is waiting for, with the number of such waits.
    interest: Mutex<HashMap<Uuid, usize>>,
    latest: watch::Sender<Option<Arc<Poll>>>,
    wake: Notify,
}

/// A wait's interest in some holders, withdrawn when it is dropped.
pub struct Interest<'a> {
    poller: &'a Poller,
    instances: Vec<Uuid>,
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        let mut interest = lock(&self.poller.interest);
        for instance in &self.instances {
            if let Some(count) = interest.get_mut(instance) {
                *count -= 1;
                if *count == 0 {
                    interest.remove(instance);
                }
            }
        }
    }
}

impl Poller {
    pub fn new(db: Arc<Db>) -> Self {
        Self {
            db,
            interest: Mutex::new(HashMap::new()),
            latest: watch::channel(None).0,
            wake: Notify::new(),
        }
    }

    /// Registers interest in `instances` and subscribes to the polls.
    pub fn watch(&self, instances: &[Uuid]) -> (Interest<'_>, watch::Receiver<Option<Arc<Poll>>>) {
        {
            let mut interest = lock(&self.interest);
            for instance in instances {
                *interest.entry(*instance).or_default() += 1;
            }
        }
        let mut polls = self.latest.subscribe();
        // What was polled before this wait read the holders says nothing about it.
        polls.mark_unchanged();
        self.wake.notify_one();
        let interest = Interest {
            poller: self,
            instances: instances.to_vec(),
        };
        (interest, polls)
    }

    /// Polls every [`POLL`] while some wait is interested, until `stop`. Each poll asks about
    /// the holders waited for when it is sent (not when the pause before it began: a wait that
    /// began meanwhile is in it).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            if lock(&self.interest).is_empty() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.wake.notified() => continue,
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
            let instances: Vec<Uuid> = lock(&self.interest).keys().copied().collect();
            if !instances.is_empty() {
                self.poll(instances).await;
            }
        }
    }

    /// One query for every holder some wait is waiting for. A failed poll is simply missed: the
    /// waits end by acknowledgements or their leases' ends meanwhile.
    async fn poll(&self, instances: Vec<Uuid>) {
        // A slow PostgreSQL does not delay the next poll by more than a poll. The query itself
        // runs to its end on a task of its own: a statement cut short never gives its
        // connection back to sqlx's pool (see `store::CLIENT_MARGIN`).
        let query = {
            let (db, instances) = (self.db.clone(), instances.clone());
            tokio::spawn(store::in_background(async move {
                db.leases().progress(&instances).await
            }))
        };
        match tokio::time::timeout(POLL * 5, query).await {
            Ok(Err(failed)) => tracing::error!(error = %failed, "the lease poll's task failed"),
            Ok(Ok(Ok(read))) => {
                let asked = instances.into_iter().collect();
                self.latest
                    .send_replace(Some(Arc::new(Poll { asked, read })));
            }
            Ok(Ok(Err(error))) => tracing::debug!(%error, "lease poll failed"),
            Err(_) => tracing::debug!("lease poll timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::DatabaseSettings, metrics::Metrics};

    /// A database of its own on the test PostgreSQL (`TEST_DATABASE_URL`), migrated.
    async fn database() -> (Arc<Db>, String) {
        let base = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("authd_poller_{}", Uuid::now_v7().simple());
        let settings = DatabaseSettings {
            url: format!("{base}/{name}").into(),
            ..DatabaseSettings::default()
        };
        let db = Db::connect(&settings, Metrics::new()).await.unwrap();
        db.migrate().await.unwrap();
        (Arc::new(db), format!("{base}/{name}"))
    }

    /// The next poll delivered to `polls`.
    async fn next(polls: &mut watch::Receiver<Option<Arc<Poll>>>) -> Arc<Poll> {
        tokio::time::timeout(Duration::from_secs(5), polls.changed())
            .await
            .expect("a poll within 5 s")
            .unwrap();
        polls.borrow_and_update().clone().unwrap()
    }

    /// Review found: the poller took the set of holders to ask about before its pause, and a
    /// holder missing from a poll's rows counted as caught up. A wait for holder B that began
    /// while the poller paused for another wait's holder C took the next poll — which never
    /// asked about B — as B caught up, and returned while B (its lease live, the revocation
    /// not yet heard) still held copies. Also a poll already under way when the wait read the
    /// holders answered for it. Now a poll answers only for holders it asked about, read after
    /// the wait's holders read.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poll_answers_only_for_holders_it_asked_about_after_the_wait_began() {
        let (db, url) = database().await;
        let (b, c, me) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let lease = Duration::from_secs(30);
        db.leases().register(b, lease).await.unwrap();
        db.leases().register(c, lease).await.unwrap();
        db.leases().release(c).await.unwrap();
        let poller = Arc::new(Poller::new(db.clone()));
        let stop = CancellationToken::new();
        tokio::spawn(poller.clone().run(stop.clone()));

        // A first wait, for C only, keeps the poller polling.
        let (_first, mut first_polls) = poller.watch(&[c]);
        let seen = next(&mut first_polls).await;
        // The second wait reads the holders (B's lease live, its logs applied through its
        // registration) during the poller's pause.
        let since = db.leases().holders(me).await.unwrap().since;
        let (_second, mut polls) = poller.watch(&[b]);
        assert!(!seen.caught_up(&b, since), "a poll from before the wait");
        let mut asked_about_b = 0;
        while asked_about_b < 3 {
            let poll = next(&mut polls).await;
            assert!(
                !poll.caught_up(&b, since),
                "B holds a live lease and has not applied the logs past the wait: {poll:?}"
            );
            asked_about_b += usize::from(poll.asked.contains(&b));
        }
        // B lets go: the next poll says so.
        db.leases().release(b).await.unwrap();
        let poll = next(&mut polls).await;
        assert!(poll.caught_up(&b, since), "{poll:?}");
        stop.cancel();
        db.close().await;
        let _ = <sqlx::Postgres as sqlx::migrate::MigrateDatabase>::drop_database(&url).await;
    }
}
