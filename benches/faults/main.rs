//! `cargo bench --bench faults [-- --quick] [--seed N] [--duration 10m] [--topology single|cluster|all]`
//!
//! A fault-injection run with a history checker (README "Reliability"): three authd processes
//! (the release binary, so SIGKILL and SIGTERM are real), each behind TCP proxies to Redis and
//! PostgreSQL, under a concurrent workload that records every operation, while a schedule drawn
//! from the seed injects faults. Afterwards the checker reads the whole history and the final
//! state; any violation is a non-zero exit.
#[allow(dead_code, clippy::all)]
#[path = "../../tests/api/topology/mod.rs"]
mod topology;

mod check;
mod history;
#[path = "../../tests/support/proxy.rs"]
mod net;
mod postgres;
mod procs;
mod report;
mod revoking;
mod schedule;
mod settled;
mod workload;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use authd::proto::authd::v1::{self as pb, auth_service_client::AuthServiceClient};
use clap::Parser;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    check::Violation,
    history::{Fault, History},
    net::{Link, Proxy},
    procs::*,
    report::*,
    schedule::*,
    settled::*,
    workload::{Account, PASSWORDS, Shared},
};

const BIN: &str = env!("CARGO_BIN_EXE_authd");
const INSTANCES: usize = 3;
/// The guess limit the run configures (per account, per window).
const GUESS_LIMIT: usize = 4;
const GUESS_WINDOW: Duration = Duration::from_secs(10);
/// After the last fault, everything must be back within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

#[derive(Parser, Debug, Clone)]
struct Opts {
    /// The short run (about a minute per topology) CI executes.
    #[arg(long)]
    quick: bool,
    /// Seed of the fault schedule and of the clients' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the loaded, faulted part of each run (e.g. `60s`, `1h`).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// `single`, `cluster`, `sentinel` or `all`.
    #[arg(long, default_value = "all")]
    topology: String,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    // `cargo bench` passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

async fn run(topology: &str, seed: u64, duration: Duration, clients: usize) -> Report {
    println!(
        "faults: {topology}: starting Redis, PostgreSQL proxies and {INSTANCES} authd processes"
    );
    let env = start_env(topology).await;
    let accounts = accounts(&env, "user", 24).await;
    let targets = accounts_emails(&env).await;
    let locals = callers(&env).await;
    let shared = Arc::new(Shared {
        channels: env.instances.iter().map(|i| channel(i.grpc)).collect(),
        locals,
        accounts: accounts.into_iter().map(Mutex::new).collect(),
        targets,
        history: History::default(),
        t0: Instant::now(),
        admin_key: env.admin_key.clone(),
    });
    let plan = schedule(seed, topology, duration);
    println!(
        "faults: {topology}: seed {seed}, {} faults planned over {} s",
        plan.len(),
        duration.as_secs()
    );
    let deadline = Instant::now() + duration;
    let workers: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(workload::client(
                shared.clone(),
                seed.wrapping_add(c as u64 + 1),
                deadline,
            ))
        })
        .collect();
    let mut samples = vec![sample(&env, &shared).await];
    let mut next_sample = Instant::now() + Duration::from_secs(10);
    for fault in &plan {
        let at = shared.t0 + Duration::from_millis(fault.at_ms);
        while Instant::now() < at {
            if Instant::now() >= next_sample {
                samples.push(sample(&env, &shared).await);
                next_sample += Duration::from_secs(10);
            }
            tokio::time::sleep(
                Duration::from_millis(100).min(at.saturating_duration_since(Instant::now())),
            )
            .await;
        }
        inject(&env, &shared, fault).await;
    }
    for worker in workers {
        let _ = worker.await;
    }
    samples.push(sample(&env, &shared).await);
    let recovery = recovers(&env).await;
    let ops = shared.history.ops();
    let faults = shared.history.faults();
    let mut violations = check::revoked_sessions_stay_revoked(&ops, &faults);
    violations.extend(
        faults
            .iter()
            .filter(|f| f.target.contains(STOP_FAILED))
            .map(|f| Violation {
                rule: "stops on SIGTERM",
                what: format!(
                    "instance {} at {:.1} s: no clean exit within 30 s (grace 5 s)",
                    f.target,
                    f.start_us as f64 / 1e6
                ),
                ops: vec![],
            }),
    );
    violations.extend(check::profiles_never_go_back(&ops, &faults));
    violations.extend(check::deleted_accounts_stay_deleted(&ops, &faults));
    violations.extend(acknowledged_writes_are_kept(&env, &shared, &ops).await);
    violations.extend(check::errors_only_when_expected(&ops, &faults));
    violations.extend(check::guesses_stay_within_the_limit(
        &ops,
        &faults,
        GUESS_LIMIT,
        u64::try_from(GUESS_WINDOW.as_micros()).unwrap_or(u64::MAX),
        INSTANCES,
    ));
    let recovery_s = match recovery {
        Ok(took) => Some(took.as_secs_f64()),
        Err(violation) => {
            violations.push(violation);
            None
        }
    };
    let mut operations: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for op in &ops {
        let kind = match op.local {
            Some(mode) => format!("{:?} ({mode} caller)", op.kind),
            None => format!("{:?}", op.kind),
        };
        *operations
            .entry(kind)
            .or_default()
            .entry(op.outcome.clone())
            .or_default() += 1;
    }
    if !violations.is_empty() {
        // The whole logs are kept beside the report (the run's directory goes with it).
        let kept = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
        for instance in &env.instances {
            let log = std::fs::read_to_string(&instance.log).unwrap_or_default();
            let copy = kept.join(format!("faults-{topology}-authd-{}.log", instance.index));
            let copied = std::fs::create_dir_all(&kept).and_then(|()| std::fs::write(&copy, &log));
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "--- authd-{} log tail (whole log: {}) ---\n{}",
                instance.index,
                match copied {
                    Ok(()) => copy.display().to_string(),
                    Err(error) => format!("not kept: {error}"),
                },
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    let evidence: Vec<history::Op> = violations
        .iter()
        .flat_map(|v| v.ops.iter().copied())
        .filter_map(|id| ops.get(id).cloned())
        .collect();
    drop_database(&env).await;
    Report {
        evidence,
        topology: topology.to_owned(),
        seed,
        duration_s: duration.as_secs(),
        operations,
        faults,
        violations,
        recovery_s,
        samples,
    }
}

/// Two callers validating in their own memory: a strict one following instance 0's event
/// stream, a bounded one following instance 1's; once both trust their memory.
async fn callers(env: &Env) -> Vec<workload::Local> {
    use authd_client::{Config, Mode, Validator};
    let follow = |instance: usize, mode: Mode, stale_after: Duration| {
        // No call timeout: the stream lasts.
        let channel =
            Channel::from_shared(format!("http://127.0.0.1:{}", env.instances[instance].grpc))
                .expect("a URL")
                .connect_timeout(Duration::from_secs(1))
                .connect_lazy();
        let config = Config {
            mode,
            api_key: Some(env.admin_key.clone()),
            stale_after,
            ..Config::default()
        };
        Validator::new(channel, config)
    };
    let locals = vec![
        workload::Local {
            validator: follow(0, Mode::Strict, Config::default().stale_after),
            instance: 0,
            mode: "strict",
        },
        workload::Local {
            validator: follow(
                1,
                Mode::Bounded,
                Duration::from_micros(check::BOUNDED_STALE_US),
            ),
            instance: 1,
            mode: "bounded",
        },
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !locals.iter().all(|l| l.validator.trusted()) {
        assert!(
            Instant::now() < deadline,
            "the callers did not come to trust their memory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    locals
}

fn main() -> std::process::ExitCode {
    let opts = Opts::parse();
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let duration = opts.duration.unwrap_or(if opts.quick {
        Duration::from_secs(50)
    } else {
        Duration::from_secs(300)
    });
    let topologies: Vec<&str> = match opts.topology.as_str() {
        "all" => vec!["single", "cluster", "sentinel"],
        one => vec![one],
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut failed = false;
    let mut reports = Vec::new();
    for topology in topologies {
        let report = runtime.block_on(run(topology, seed, duration, opts.clients));
        summary(&report);
        failed |= !report.violations.is_empty();
        reports.push(report);
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/faults.json");
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_string_pretty(&reports) {
        let _ = std::fs::write(&out, json);
        println!("\nwrote {}", out.display());
    }
    let mut again = format!("--seed {seed}");
    if opts.quick {
        again.push_str(" --quick");
    }
    if opts.topology != "all" {
        again.push_str(&format!(" --topology {}", opts.topology));
    }
    if let Some(duration) = opts.duration {
        again.push_str(&format!(
            " --duration {}",
            humantime::format_duration(duration)
        ));
    }
    println!("seed {seed}: reproduce with `cargo bench --bench faults -- {again}`");
    if failed {
        println!("VIOLATIONS FOUND");
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
