//! Reading the outbox logs (see [`outbox`](super::outbox)) each row once: the part of following
//! them that the log follower of `jobs` and the in-process cache's lease keeper (`local`) share.
//!
//! A reader remembers, per log, the highest id it read and the *gaps* below it: ids drawn by
//! transactions that had not committed when a later id was read (in flight then, or rolled
//! back). A pass reads the rows above that id and those that appeared in a gap; a gap is forgotten
//! after a pass that began once the in-flight allowance had passed since it was seen (no
//! transaction lasts longer, see [`in_flight`](super::in_flight)). [`follow_log`] reads a log by
//! time instead, from a moment on (less the allowance), for readers without a memory of ids.
use std::{future::Future, time::Duration, time::Instant};

use chrono::{DateTime, TimeDelta, Utc};

use super::{Invalidation, ProfileInvalidation, StoreError};

/// Rows read per query.
pub const BATCH: i64 = 500;

/// Gaps one log may carry before they are merged into one range (each is a range of ids, so this
/// is only reached by many transactions rolled back or in flight at once).
const MOST_GAPS: usize = 10_000;

/// Where a follower stands in one log: every id up to `top` was read, but those in `gaps`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ids {
    pub top: i64,
    pub gaps: Vec<Gap>,
}

/// Ids `from..=to`, not committed when a later one was read; looked at by every pass until one
/// that began at or after `until`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    pub from: i64,
    pub to: i64,
    pub until: Instant,
}

/// A row of either log.
pub trait Row: Clone {
    fn position(&self) -> (DateTime<Utc>, i64);

    fn id(&self) -> i64 {
        self.position().1
    }
}

impl Row for Invalidation {
    fn position(&self) -> (DateTime<Utc>, i64) {
        (self.created_at, self.id)
    }
}

impl Row for ProfileInvalidation {
    fn position(&self) -> (DateTime<Utc>, i64) {
        (self.created_at, self.id)
    }
}

/// One log's part of a pass from `at`: the rows that appeared in its gaps, then the rows above
/// its top (in batches) up to `high`, the last id handed out when the pass began (what commits
/// later is not owed to it: copies are trusted from its start), each batch applied. Where it
/// then stands; `None` when a batch was not applied (the pass is void, and reads them again).
/// With `settle_from` (PostgreSQL's time at the pass's start), a batch whose rows are younger
/// than [`SETTLE`] waits for them to settle first (their announcements travel meanwhile).
pub async fn follow_ids<T, A, W, R, RF, AF>(
    at: &Ids,
    high: i64,
    in_flight: TimeDelta,
    settle_from: Option<DateTime<Utc>>,
    above: A,
    within: W,
    apply: impl Fn(Vec<T>) -> AF,
) -> Result<Option<Ids>, StoreError>
where
    T: Row,
    A: Fn(i64) -> R,
    R: Future<Output = Result<Vec<T>, StoreError>>,
    W: FnOnce(Vec<(i64, i64)>) -> RF,
    RF: Future<Output = Result<Vec<T>, StoreError>>,
    AF: Future<Output = bool>,
{
    let began = Instant::now();
    let mut next = at.clone();
    if !next.gaps.is_empty() {
        let ranges = next.gaps.iter().map(|g| (g.from, g.to)).collect();
        let found = within(ranges).await?;
        for row in &found {
            next.fill(row.id());
        }
        if !found.is_empty() && !apply(found).await {
            return Ok(None);
        }
        // Any transaction that drew these ids has ended before this pass began.
        next.gaps.retain(|g| g.until > began);
    }
    let allowance = in_flight.to_std().unwrap_or(Duration::MAX) + CLOCK_MARGIN_STD;
    while next.top < high {
        let rows = above(next.top).await?;
        let until = Instant::now() + allowance;
        for row in &rows {
            next.extend(row.id(), until);
        }
        let full = rows.len() as i64 == BATCH;
        if !rows.is_empty() {
            if let Some(now) = settle_from {
                settle(
                    &rows,
                    now + TimeDelta::from_std(began.elapsed()).unwrap_or_default(),
                )
                .await;
            }
            if !apply(rows).await {
                return Ok(None);
            }
        }
        if !full {
            break;
        }
    }
    next.coarsen();
    Ok(Some(next))
}

const CLOCK_MARGIN_STD: Duration = Duration::from_secs(1);

/// How old a row must be before a follower writes it: its writer's announcement (a revoking
/// call writes Redis and announces within milliseconds of its commit) has then reached this
/// instance, and the row is not written a second time. A pass that meets younger rows waits
/// that much longer; copies are trusted from when it began, so the wait costs no freshness.
const SETTLE: TimeDelta = TimeDelta::milliseconds(50);

/// Waits until the youngest of `rows` is [`SETTLE`] old (by the fleet clock, `now`).
async fn settle<T: Row>(rows: &[T], now: DateTime<Utc>) {
    let youngest = rows.iter().map(|r| r.position().0).max();
    let Some(wait) = youngest.and_then(|at| (at + SETTLE - now).to_std().ok()) else {
        return;
    };
    tokio::time::sleep(wait.min(SETTLE.to_std().unwrap_or_default())).await;
}

impl Ids {
    /// A row above the top was read: the ids skipped on the way are a gap until `until`.
    fn extend(&mut self, id: i64, until: Instant) {
        if id <= self.top {
            return;
        }
        if id > self.top + 1 {
            self.gaps.push(Gap {
                from: self.top + 1,
                to: id - 1,
                until,
            });
        }
        self.top = id;
    }

    /// Past [`MOST_GAPS`], the gaps become one range (one query all the same; the rows read in
    /// it already are read again, and skipped as applied).
    fn coarsen(&mut self) {
        if self.gaps.len() <= MOST_GAPS {
            return;
        }
        let from = self.gaps.iter().map(|g| g.from).min().unwrap_or(0);
        let to = self.gaps.iter().map(|g| g.to).max().unwrap_or(0);
        let until = self.gaps.iter().map(|g| g.until).max();
        self.gaps = vec![Gap {
            from,
            to,
            until: until.unwrap_or_else(Instant::now),
        }];
    }

    /// A row appeared in a gap: its id is read.
    fn fill(&mut self, id: i64) {
        let Some(k) = self.gaps.iter().position(|g| g.from <= id && id <= g.to) else {
            return;
        };
        let gap = self.gaps.remove(k);
        if gap.from < id {
            self.gaps.push(Gap { to: id - 1, ..gap });
        }
        if id < gap.to {
            self.gaps.push(Gap {
                from: id + 1,
                ..gap
            });
        }
    }
}

/// Applies every row of one log after `after` (less `in_flight`, see `store::in_flight`), in
/// keyset order and in batches until nothing is left; the newest row's time when all were
/// applied (`apply` said so), `None` when one batch was not.
pub async fn follow_log<T, R, A>(
    after: DateTime<Utc>,
    in_flight: TimeDelta,
    read: impl Fn((DateTime<Utc>, i64)) -> R,
    apply: impl Fn(Vec<T>) -> A,
) -> Result<Option<DateTime<Utc>>, StoreError>
where
    T: Row,
    R: Future<Output = Result<Vec<T>, StoreError>>,
    A: Future<Output = bool>,
{
    let mut position = (after - in_flight, 0);
    let mut newest = after;
    loop {
        let rows = read(position).await?;
        let Some(last) = rows.last().map(Row::position) else {
            return Ok(Some(newest));
        };
        let full = rows.len() as i64 == BATCH;
        if !apply(rows).await {
            return Ok(None);
        }
        newest = newest.max(last.0);
        if !full {
            return Ok(Some(newest));
        }
        position = last;
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;

    /// A log whose rows become visible (commit) in any order.
    #[derive(Default)]
    struct Log {
        visible: RefCell<BTreeMap<i64, ProfileInvalidation>>,
        reads: RefCell<usize>,
    }

    impl Log {
        fn commit(&self, id: i64) {
            let row = ProfileInvalidation {
                id,
                user_id: uuid::Uuid::nil(),
                version: id,
                created_at: Utc::now(),
            };
            self.visible.borrow_mut().insert(id, row);
        }

        fn above(&self, top: i64) -> Vec<ProfileInvalidation> {
            *self.reads.borrow_mut() += 1;
            let visible = self.visible.borrow();
            let rows = visible.range(top + 1..).map(|(_, r)| r.clone());
            rows.take(BATCH as usize).collect()
        }

        fn within(&self, ranges: &[(i64, i64)]) -> Vec<ProfileInvalidation> {
            let visible = self.visible.borrow();
            let rows = ranges.iter().flat_map(|(lo, hi)| visible.range(lo..=hi));
            rows.map(|(_, r)| r.clone()).collect()
        }
    }

    /// One pass over `log` from `at`, every applied id appended to `applied` (`fail`: the
    /// cache refuses the batch).
    async fn pass(
        log: &Log,
        at: &Ids,
        in_flight: TimeDelta,
        applied: &RefCell<Vec<i64>>,
        fail: bool,
    ) -> Option<Ids> {
        let apply = |rows: Vec<ProfileInvalidation>| async move {
            if !fail {
                applied.borrow_mut().extend(rows.iter().map(|r| r.id));
            }
            !fail
        };
        let high = log.visible.borrow().keys().max().copied().unwrap_or(0);
        follow_ids(
            at,
            high,
            in_flight,
            Some(Utc::now()),
            |top| std::future::ready(Ok(log.above(top))),
            |ranges| std::future::ready(Ok(log.within(&ranges))),
            apply,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn rows_committed_out_of_order_are_each_applied_once() {
        let log = Log::default();
        let applied = RefCell::new(Vec::new());
        let long = TimeDelta::seconds(60);
        for id in [1, 2, 4, 7] {
            log.commit(id);
        }
        let at = pass(&log, &Ids::default(), long, &applied, false)
            .await
            .unwrap();
        assert_eq!(at.top, 7);
        let gaps: Vec<(i64, i64)> = at.gaps.iter().map(|g| (g.from, g.to)).collect();
        assert_eq!(gaps, [(3, 3), (5, 6)]);
        // 6 and then 3 commit (in flight before), 8 is new; 5 never commits (rolled back).
        log.commit(6);
        log.commit(8);
        let at = pass(&log, &at, long, &applied, false).await.unwrap();
        log.commit(3);
        let at = pass(&log, &at, long, &applied, false).await.unwrap();
        let at = pass(&log, &at, long, &applied, false).await.unwrap();
        assert_eq!(*applied.borrow(), [1, 2, 4, 7, 6, 8, 3]);
        let gaps: Vec<(i64, i64)> = at.gaps.iter().map(|g| (g.from, g.to)).collect();
        assert_eq!(gaps, [(5, 5)], "looked at until its allowance has passed");
        // With no allowance left, a pass forgets the gap.
        let mut expired = at.clone();
        for gap in &mut expired.gaps {
            gap.until = Instant::now();
        }
        let at = pass(&log, &expired, long, &applied, false).await.unwrap();
        assert!(at.gaps.is_empty());
    }

    #[tokio::test]
    async fn a_backlog_is_read_in_one_pass_and_not_again() {
        let log = Log::default();
        let applied = RefCell::new(Vec::new());
        for id in 1..=1_234 {
            log.commit(id);
        }
        let start = Ids::default();
        let at = pass(&log, &start, TimeDelta::seconds(60), &applied, false);
        let at = at.await.unwrap();
        assert_eq!(applied.borrow().len(), 1_234);
        assert!(at.gaps.is_empty());
        let reads = *log.reads.borrow();
        assert_eq!(reads, 3, "batches of {BATCH}");
        pass(&log, &at, TimeDelta::seconds(60), &applied, false)
            .await
            .unwrap();
        assert_eq!(applied.borrow().len(), 1_234, "nothing read twice");
        assert_eq!(
            *log.reads.borrow(),
            reads,
            "at rest, the last id handed out says there is nothing to read"
        );
    }

    /// A review found: with rows committed faster than a batch is applied, a pass that read
    /// until nothing was left never ended (and copies were never trusted again). A pass reads
    /// up to the last id handed out when it began.
    #[tokio::test]
    async fn a_pass_ends_at_the_id_it_began_with() {
        let log = Log::default();
        for id in 1..=2_000 {
            log.commit(id);
        }
        let applied = RefCell::new(0usize);
        let apply = |rows: Vec<ProfileInvalidation>| {
            *applied.borrow_mut() += rows.len();
            std::future::ready(true)
        };
        let at = follow_ids(
            &Ids::default(),
            700,
            TimeDelta::seconds(60),
            Some(Utc::now()),
            |top| std::future::ready(Ok(log.above(top))),
            |ranges| std::future::ready(Ok(log.within(&ranges))),
            apply,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(at.top, 1_000, "two batches, the second past the id");
        assert_eq!(*applied.borrow(), 1_000);
    }

    #[tokio::test]
    async fn a_batch_the_cache_refused_is_read_again() {
        let log = Log::default();
        let applied = RefCell::new(Vec::new());
        log.commit(1);
        let long = TimeDelta::seconds(60);
        let at = Ids::default();
        assert!(pass(&log, &at, long, &applied, true).await.is_none());
        let at = pass(&log, &at, long, &applied, false).await.unwrap();
        assert_eq!(*applied.borrow(), [1]);
        assert_eq!(at.top, 1);
    }
}
