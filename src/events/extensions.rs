//! The strict streams' lease extensions, gathered: those asked for while one statement runs go
//! together in the next (a revocation acknowledged by every strict subscriber of an instance
//! costs it two statements at most, not one per subscriber).
use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::EventsError;
use crate::store::Db;

/// One statement extends at most this many leases.
const MOST: usize = 1024;

struct Ask {
    lease: Uuid,
    applied_through: DateTime<Utc>,
    /// Whether the lease was still running; `None`: the statement failed.
    reply: oneshot::Sender<Option<bool>>,
}

pub(super) struct Extensions {
    db: Arc<Db>,
    length: Duration,
    asks: mpsc::UnboundedSender<Ask>,
}

impl Extensions {
    /// Starts the task that runs the statements (it ends with the last sender).
    pub(super) fn start(db: Arc<Db>, length: Duration) -> Self {
        let (asks, mut queue) = mpsc::unbounded_channel::<Ask>();
        let gatherer = db.clone();
        tokio::spawn(crate::store::in_background(async move {
            let mut gathered = Vec::new();
            while queue.recv_many(&mut gathered, MOST).await > 0 {
                let leases: Vec<_> = gathered
                    .iter()
                    .map(|a| (a.lease, a.applied_through))
                    .collect();
                let extended = gatherer.leases().extend_all(&leases, length).await.ok();
                for ask in gathered.drain(..) {
                    let running = extended.as_ref().map(|e| e.contains(&ask.lease));
                    let _ = ask.reply.send(running);
                }
            }
        }));
        Self { db, length, asks }
    }

    /// Extends `lease` by the fleet's length, recording as applied what was committed through
    /// `applied_through`: asked for now (it is made whether or not the answer is awaited),
    /// answered with whether the lease was still running.
    pub(super) fn extend(
        &self,
        lease: Uuid,
        applied_through: DateTime<Utc>,
    ) -> BoxFuture<'static, Result<bool, EventsError>> {
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            lease,
            applied_through,
            reply,
        };
        let sent = self.asks.send(ask).is_ok();
        let (db, length) = (self.db.clone(), self.length);
        Box::pin(async move {
            if sent && let Ok(Some(running)) = answer.await {
                return Ok(running);
            }
            // The gathered statement failed: this lease's own tells why (or succeeds).
            let leases = db.leases();
            Ok(leases
                .extend(lease, length, applied_through)
                .await?
                .is_some())
        })
    }
}
