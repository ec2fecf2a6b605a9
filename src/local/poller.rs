//! One poll of the lease table for every wait of this instance: while any revoking call waits
//! for holders that may have caught up through the logs, one task asks PostgreSQL every
//! [`POLL`] how far those holders have applied the logs, and every waiting call reads the
//! answer. N concurrent waits cost one query per poll, not N.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::store::lock;
use crate::store::{self, Db, LeaseProgress};

/// How often the waits of this instance ask PostgreSQL who caught up.
pub const POLL: Duration = Duration::from_millis(100);

/// What one poll saw.
#[derive(Debug)]
pub struct Poll {
    /// The PostgreSQL history the rows come from.
    pub timeline: String,
    pub rows: HashMap<Uuid, LeaseProgress>,
}

impl Poll {
    /// Whether `instance` is done with everything committed before `since`: its lease ended
    /// (or is gone), or it applied the logs past `since`.
    pub fn caught_up(&self, instance: &Uuid, since: DateTime<Utc>) -> bool {
        self.rows.get(instance).is_none_or(|row| {
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

    /// Polls every [`POLL`] while some wait is interested, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let instances: Vec<Uuid> = lock(&self.interest).keys().copied().collect();
            if instances.is_empty() {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = self.wake.notified() => continue,
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
            self.poll(&instances).await;
        }
    }

    /// One query for every holder some wait is waiting for. A failed poll is simply missed: the
    /// waits end by acknowledgements or their leases' ends meanwhile.
    async fn poll(&self, instances: &[Uuid]) {
        let leases = self.db.leases();
        let query = leases.progress(instances);
        // A slow PostgreSQL does not delay the next poll by more than a poll.
        match tokio::time::timeout(POLL * 5, store::in_background(query)).await {
            Ok(Ok((timeline, rows))) => {
                self.latest
                    .send_replace(Some(Arc::new(Poll { timeline, rows })));
            }
            Ok(Err(error)) => tracing::debug!(%error, "lease poll failed"),
            Err(_) => tracing::debug!("lease poll timed out"),
        }
    }
}
