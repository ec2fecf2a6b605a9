//! Bulkheads: the pool is split into shares, one per class of work, so that a flood of one class
//! (made-up tokens, a login storm, a loop of revocations, a busy operator) leaves every other
//! class its own connections. Each share is a pool of its own with `DATABASE__SHARES__*` percent
//! of `DATABASE__MAX_CONNECTIONS`; a class that has used its share waits for its own connections
//! (at most `DATABASE__ACQUIRE_TIMEOUT`, then UNAVAILABLE), never for another's.
//!
//! The class travels with the work as a task-local ([`Work`]), set where a call enters
//! (`grpc::observe`, from the method) and by the background jobs ([`in_background`]); with the
//! caller's address, which the budget of unknown lookups is kept by (`auth::limits`).
use std::{future::Future, net::IpAddr};

pub use crate::config::Share;

/// What the running task is doing for whom: its share of the pool, and the caller's address
/// (a call's), if known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Work {
    pub share: Share,
    pub peer: Option<IpAddr>,
}

impl Work {
    pub const BACKGROUND: Work = Work {
        share: Share::Background,
        peer: None,
    };
}

tokio::task_local! {
    static WORK: Work;
}

/// Runs `job` as `work`: its queries use `work`'s share of the pool.
pub async fn as_work<F: Future>(work: Work, job: F) -> F::Output {
    WORK.scope(work, job).await
}

/// Runs `job` as background work: its own share, and its queries left out of
/// `Db::queries_executed`.
pub async fn in_background<F: Future>(job: F) -> F::Output {
    as_work(Work::BACKGROUND, job).await
}

/// The running task's work; background when nothing was said (startup, tests).
pub fn current() -> Work {
    WORK.try_with(|work| *work).unwrap_or(Work::BACKGROUND)
}

/// `job` as the running task's work, wherever it is spawned.
pub fn carry<F: Future>(job: F) -> impl Future<Output = F::Output> {
    as_work(current(), job)
}
