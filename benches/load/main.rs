//! `cargo bench --bench load [-- OPTIONS]`: authd's throughput and latency, side by side with
//! the ceiling of the same server (its health check), against the local PostgreSQL and Redis.
//! `--quick` is a short smoke run (CI runs it so the benchmark never rots).
#[path = "../../tests/support/database.rs"]
mod database;
mod driver;
mod ext_authz;
mod fleet;
mod flood;
mod jwt;
mod report;
mod scenarios;
#[path = "../../tests/support/seeded.rs"]
mod seeded;
mod setup;
mod subscribers;

use std::time::Duration;

use clap::Parser;

/// The same allocator as the `authd` binary, so the numbers are the service's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone, serde::Serialize)]
#[command(about = "authd load benchmark")]
pub struct Opts {
    /// Measured seconds per scenario.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Warm-up seconds before each measurement.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Run only scenarios whose name contains this.
    #[arg(long)]
    scenario: Option<String>,
    /// Open-loop rate as a fraction of the closed-loop peak.
    #[arg(long, default_value_t = 0.5)]
    open_loop_fraction: f64,
    /// Seeded users (each with a session and a profile).
    #[arg(long, default_value_t = 2000)]
    users: usize,
    /// Sessions seeded for the `logout` scenario (each call revokes one).
    #[arg(long, default_value_t = 20000)]
    logout_sessions: usize,
    /// LOCAL_CACHE__MAX_ENTRIES of the local-cache instances; `local_memory` fills it.
    #[arg(long, default_value_t = 100_000)]
    local_max_entries: u64,
    /// Requests per second of the `*_forged_flood` scenarios' floods (and their control).
    #[arg(long, default_value_t = 3300.0)]
    flood_rate: f64,
    /// Runtime worker threads shared by the servers and the load (default: the cores).
    #[arg(long)]
    threads: Option<usize>,
    /// A short smoke run: 1 s per scenario, small load; fails only on unexpected errors.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON table.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench/load.json"))]
    json: std::path::PathBuf,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Opts {
    fn load(&self) -> driver::Load {
        driver::Load {
            connections: self.connections,
            concurrency: self.concurrency,
            warmup: Duration::from_secs_f64(self.warmup),
            duration: Duration::from_secs_f64(self.duration),
        }
    }

    fn wants(&self, scenario: &str) -> bool {
        self.scenario
            .as_deref()
            .is_none_or(|s| scenario.contains(s))
    }
}

fn main() -> anyhow::Result<()> {
    let mut opts = Opts::parse();
    if opts.quick {
        opts.duration = opts.duration.min(1.0);
        opts.warmup = opts.warmup.min(0.2);
        opts.connections = opts.connections.min(2);
        opts.concurrency = opts.concurrency.min(8);
        opts.users = opts.users.min(200);
        opts.logout_sessions = opts.logout_sessions.min(2000);
        opts.local_max_entries = opts.local_max_entries.min(5000);
        opts.flood_rate = opts.flood_rate.min(300.0);
    }
    opts.users = opts.users.max(100);
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let report = runtime.block_on(scenarios::run_all(&opts))?;
    report::print_rows(&report.rows);
    report::print_targets(&report.targets);
    if let Some(dir) = opts.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&opts.json, serde_json::to_vec_pretty(&report)?)?;
    println!("\nwrote {}", opts.json.display());
    let unexpected: u64 = report.rows.iter().map(|r| r.unexpected_errors).sum();
    anyhow::ensure!(unexpected == 0, "{unexpected} unexpected non-OK statuses");
    Ok(())
}
