//! Load generation: several HTTP/2 connections, many requests in flight on each.
//!
//! Closed loop: every worker sends its next request as soon as the previous one answered, which
//! finds peak throughput. Open loop: every worker sends on a fixed schedule and latency is
//! measured from each request's *intended* send time, so a stalled server shows in the tail
//! instead of silently slowing the load (no coordinated omission).
use std::{
    collections::BTreeMap,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tonic::{Code, Status, transport::Channel};

#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub connections: usize,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

#[derive(Clone, Copy, Debug)]
pub enum Pace {
    Closed,
    /// Requests per second over all workers.
    Open(f64),
}

/// What one run observed (after the warm-up).
pub struct Outcome {
    /// Every request answered, warm-up included (for per-request counter ratios).
    pub total: u64,
    pub ok: u64,
    /// Non-OK answers by code.
    pub statuses: BTreeMap<String, u64>,
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn requests(&self) -> u64 {
        self.ok + self.statuses.values().sum::<u64>()
    }

    pub fn rate(&self) -> f64 {
        self.requests() as f64 / self.elapsed.as_secs_f64()
    }

    pub fn ok_rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// Non-OK answers whose code is not in `expected`.
    pub fn unexpected(&self, expected: &[Code]) -> u64 {
        let expected: Vec<String> = expected.iter().map(|c| format!("{c:?}")).collect();
        self.statuses
            .iter()
            .filter(|(code, _)| !expected.contains(code))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
}

/// One request: the worker's channel and the request's sequence number (to pick its data).
pub trait Call: Fn(Channel, u64) -> Self::Fut + Send + Sync + 'static {
    type Fut: Future<Output = Result<(), Status>> + Send + 'static;
}

impl<F, Fut> Call for F
where
    F: Fn(Channel, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    type Fut = Fut;
}

struct Tally {
    total: u64,
    ok: u64,
    statuses: BTreeMap<String, u64>,
    latency: Histogram<u64>,
}

pub async fn run(channels: &[Channel], load: Load, pace: Pace, call: impl Call) -> Outcome {
    let call = Arc::new(call);
    let workers = load.connections * load.concurrency;
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let channel = channels[w % channels.len()].clone();
        let call = call.clone();
        let interval = match pace {
            Pace::Closed => None,
            Pace::Open(rate) => Some(Duration::from_secs_f64(workers as f64 / rate)),
        };
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally {
                total: 0,
                ok: 0,
                statuses: BTreeMap::new(),
                latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            };
            // Spread open-loop workers over one interval so they do not fire together.
            let mut intended =
                start + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / workers as f64));
            let mut seq = w as u64;
            loop {
                let sent = match interval {
                    Some(_) => {
                        tokio::time::sleep_until(intended.into()).await;
                        intended
                    }
                    None => Instant::now(),
                };
                if sent >= end {
                    break;
                }
                let result = call(channel.clone(), seq).await;
                let done = Instant::now();
                tally.total += 1;
                if sent >= measure_from {
                    let micros = u64::try_from((done - sent).as_micros()).unwrap_or(u64::MAX);
                    tally.latency.saturating_record(micros.max(1));
                    match result {
                        Ok(()) => tally.ok += 1,
                        Err(status) => {
                            *tally
                                .statuses
                                .entry(format!("{:?}", status.code()))
                                .or_default() += 1;
                        }
                    }
                }
                seq += workers as u64;
                if let Some(i) = interval {
                    intended += i;
                }
            }
            tally
        }));
    }
    let mut outcome = Outcome {
        total: 0,
        ok: 0,
        statuses: BTreeMap::new(),
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        elapsed: load.duration,
    };
    for task in tasks {
        let tally = task.await.expect("a load worker panicked");
        outcome.total += tally.total;
        outcome.ok += tally.ok;
        for (code, n) in tally.statuses {
            *outcome.statuses.entry(code).or_default() += n;
        }
        outcome.latency.add(&tally.latency).expect("same bounds");
    }
    outcome
}
