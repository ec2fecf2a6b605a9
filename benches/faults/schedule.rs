//! The faults: a schedule drawn from the seed, and their injection.
use super::*;

/// A fault of the schedule: what, on what, for how long (ms).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Planned {
    pub(crate) at_ms: u64,
    pub(crate) kind: &'static str,
    pub(crate) target: usize,
    pub(crate) hold_ms: u64,
}

pub(crate) fn schedule(seed: u64, topology: &str, run: Duration) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let redis: &[&str] = match topology {
        "cluster" => &[
            "redis-primary-kill",
            "redis-failover",
            "redis-stop",
            "redis-flushall",
        ],
        "sentinel" => &[
            "redis-primary-kill",
            "redis-failover",
            "redis-stop",
            "redis-flushall",
        ],
        _ => &[
            "redis-kill",
            "redis-stop",
            "redis-flushall",
            "redis-cut",
            "redis-slow",
        ],
    };
    let others = [
        "postgres-cut",
        "postgres-stop",
        "postgres-failover",
        "authd-kill",
        "authd-term",
        "authd-stop",
    ];
    // One failover a run: there is one standby to promote.
    let mut failed_over = false;
    let mut plan = Vec::new();
    let mut at = 4_000;
    // Leave the last part of the run free of faults: the recovery check needs it.
    let end = u64::try_from(run.as_millis())
        .unwrap_or(u64::MAX)
        .saturating_sub(8_000);
    while at < end {
        let mut kind = if rng.bool() {
            redis[rng.usize(..redis.len())]
        } else {
            others[rng.usize(..others.len())]
        };
        if kind == "postgres-failover" {
            if failed_over {
                kind = "postgres-cut";
            }
            failed_over = true;
        }
        plan.push(Planned {
            at_ms: at,
            kind,
            target: rng.usize(..INSTANCES),
            hold_ms: rng.u64(2_000..=5_000),
        });
        at += rng.u64(4_000..=9_000);
    }
    plan
}

/// Injects one fault and records its window.
pub(crate) async fn inject(env: &Env, shared: &Shared, fault: &Planned) {
    let hold = Duration::from_millis(fault.hold_ms);
    let start = shared.now_us();
    let target = fault.target;
    let instance = &env.instances[target];
    let mut target_name = target.to_string();
    match fault.kind {
        "redis-kill" => {
            if let Redis::Single { port, child, dir } = &env.redis {
                if let Some(mut c) = child.lock().unwrap().take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                tokio::time::sleep(Duration::from_millis(1_000)).await;
                *child.lock().unwrap() = Some(Redis::spawn_single(*port, dir.path()));
                Redis::wait_port(*port).await;
                target_name = "redis".into();
            }
        }
        "redis-stop" => {
            let ports = env.redis.primaries().await;
            let port = ports[target % ports.len()];
            match &env.redis {
                Redis::Single { child, .. } => {
                    let pid = child.lock().unwrap().as_ref().map(Child::id);
                    if let Some(pid) = pid {
                        signal(pid, libc::SIGSTOP);
                        tokio::time::sleep(hold).await;
                        signal(pid, libc::SIGCONT);
                    }
                }
                // Shorter than the cluster's node timeout and the sentinels' down-after: a
                // stall, not a failover.
                Redis::Cluster(c) => {
                    c.stop(port);
                    tokio::time::sleep(hold.min(Duration::from_millis(800))).await;
                    c.cont(port);
                }
                Redis::Sentinel(s) => {
                    s.stop(port);
                    tokio::time::sleep(hold.min(Duration::from_millis(800))).await;
                    s.cont(port);
                }
            }
            target_name = format!("redis:{port}");
        }
        "redis-flushall" => {
            for port in env.redis.primaries().await {
                let _ = topology::command(port, &["FLUSHALL"]).await;
            }
            target_name = "redis".into();
        }
        "redis-cut" => {
            env.redis_proxies[target].set(Link::Refused);
            tokio::time::sleep(hold).await;
            env.redis_proxies[target].set(Link::Up);
        }
        "redis-slow" => {
            env.redis_proxies[target].set(Link::Slow(Duration::from_millis(300)));
            tokio::time::sleep(hold).await;
            env.redis_proxies[target].set(Link::Up);
        }
        "redis-primary-kill" => match &env.redis {
            Redis::Cluster(c) => {
                let primaries = c.primaries().await;
                let port = primaries[target % primaries.len()];
                c.kill(port);
                let _ = tokio::time::timeout(Duration::from_secs(20), c.wait_primary_change(port))
                    .await;
                c.restart(port).await;
                target_name = format!("redis:{port}");
            }
            Redis::Sentinel(s) => {
                // The sentinels fail a primary over only once they see a fit replica (some
                // 20 s after the last failover): wait for that first.
                s.wait_healthy().await;
                let port = s.primary_port().await;
                s.kill(port);
                let _ = tokio::time::timeout(Duration::from_secs(20), s.wait_primary_change(port))
                    .await;
                s.restart(port).await;
                target_name = format!("redis:{port}");
            }
            Redis::Single { .. } => {}
        },
        "redis-failover" => match &env.redis {
            Redis::Cluster(c) => {
                let replicas = c.replicas().await;
                if let Some(port) = replicas.get(target % replicas.len().max(1)) {
                    c.failover_takeover(*port).await;
                    target_name = format!("redis:{port}");
                }
            }
            Redis::Sentinel(s) => {
                s.wait_healthy().await;
                target_name = format!("redis:{}", s.failover().await);
            }
            Redis::Single { .. } => {}
        },
        "postgres-cut" => {
            env.pg_proxies[target].set(Link::Blackhole);
            tokio::time::sleep(hold).await;
            env.pg_proxies[target].set(Link::Up);
        }
        "postgres-stop" => {
            // Every backend of the run's database stops (a PostgreSQL stall).
            let pids = backends(env).await;
            for pid in &pids {
                signal(*pid, libc::SIGSTOP);
            }
            tokio::time::sleep(hold.min(Duration::from_secs(4))).await;
            for pid in &pids {
                signal(*pid, libc::SIGCONT);
            }
            target_name = format!("{} backends", pids.len());
        }
        "postgres-failover" => {
            if let Some(port) = env.postgres.fail_over().await {
                for proxy in &env.pg_proxies {
                    proxy.retarget(([127, 0, 0, 1], port).into());
                }
                target_name = format!("standby on {port}");
            }
        }
        "authd-stop" => {
            // Paused, with whatever it holds in memory (a GC-like stall, a frozen VM).
            if let Some(pid) = instance.pid() {
                signal(pid, libc::SIGSTOP);
                tokio::time::sleep(hold).await;
                signal(pid, libc::SIGCONT);
            }
        }
        "authd-kill" => {
            instance.kill();
            tokio::time::sleep(Duration::from_millis(500)).await;
            instance.spawn();
            instance.wait_serving(Duration::from_secs(30)).await;
        }
        "authd-term" => {
            let status = instance.terminate().await;
            if !status.is_some_and(|s| s.success()) {
                eprintln!("faults: instance {target} exited {status:?} after SIGTERM");
                target_name = format!("{target} {STOP_FAILED}: {status:?}");
            }
            instance.spawn();
            instance.wait_serving(Duration::from_secs(30)).await;
        }
        _ => {}
    }
    shared.history.fault(Fault {
        kind: fault.kind.to_owned(),
        target: target_name,
        start_us: start,
        end_us: shared.now_us(),
    });
}

/// Marks an `authd-term` fault whose instance did not exit 0 within 30 s of SIGTERM.
pub(crate) const STOP_FAILED: &str = "did not stop cleanly";
