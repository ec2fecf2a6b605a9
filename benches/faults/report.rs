//! Resource samples during the run, and the report printed and written after it.
use super::*;

#[derive(Serialize)]
pub(crate) struct Sample {
    pub(crate) at_s: u64,
    pub(crate) rss_kib: Vec<u64>,
    pub(crate) fds: Vec<usize>,
    pub(crate) redis_bytes: u64,
    pub(crate) pg_bytes: i64,
}

pub(crate) async fn sample(env: &Env, shared: &Shared) -> Sample {
    let usage: Vec<(u64, usize)> = env
        .instances
        .iter()
        .map(|i| i.usage().unwrap_or((0, 0)))
        .collect();
    let pg_bytes =
        match <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url()).await {
            Ok(mut conn) => sqlx::query_scalar::<_, i64>(
                "select coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint from pg_class c
             join pg_namespace n on n.oid = c.relnamespace
             where n.nspname = 'public' and c.relkind = 'r'",
            )
            .fetch_one(&mut conn)
            .await
            .unwrap_or(0),
            Err(_) => 0,
        };
    Sample {
        at_s: shared.now_us() / 1_000_000,
        rss_kib: usage.iter().map(|u| u.0).collect(),
        fds: usage.iter().map(|u| u.1).collect(),
        redis_bytes: env.redis.used_memory().await,
        pg_bytes,
    }
}

#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) topology: String,
    pub(crate) seed: u64,
    pub(crate) duration_s: u64,
    pub(crate) operations: BTreeMap<String, BTreeMap<String, usize>>,
    pub(crate) faults: Vec<Fault>,
    pub(crate) violations: Vec<Violation>,
    /// The operations named by the violations.
    pub(crate) evidence: Vec<history::Op>,
    pub(crate) recovery_s: Option<f64>,
    pub(crate) samples: Vec<Sample>,
}

pub(crate) fn summary(report: &Report) {
    println!(
        "\n== {} (seed {}, {} s) ==",
        report.topology, report.seed, report.duration_s
    );
    let total: usize = report.operations.values().flat_map(|m| m.values()).sum();
    println!("operations: {total}");
    for (kind, outcomes) in &report.operations {
        let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o} {n}")).collect();
        println!("  {kind:<18} {}", parts.join(", "));
    }
    println!("faults: {}", report.faults.len());
    for f in &report.faults {
        println!(
            "  {:>7.1} s  {:<20} {:<12} {:.1} s",
            f.start_us as f64 / 1e6,
            f.kind,
            f.target,
            (f.end_us - f.start_us) as f64 / 1e6
        );
    }
    match report.recovery_s {
        Some(s) => println!(
            "recovered {s:.1} s after the last fault (bound {} s)",
            RECOVERY_BOUND.as_secs()
        ),
        None => println!("did not recover within {} s", RECOVERY_BOUND.as_secs()),
    }
    if let (Some(first), Some(last)) = (report.samples.first(), report.samples.last()) {
        println!(
            "resources, first → last sample: RSS KiB {:?} → {:?}; fds {:?} → {:?}; Redis {} → {} bytes; PostgreSQL {} → {} bytes",
            first.rss_kib,
            last.rss_kib,
            first.fds,
            last.fds,
            first.redis_bytes,
            last.redis_bytes,
            first.pg_bytes,
            last.pg_bytes
        );
    }
    println!("violations: {}", report.violations.len());
    for v in &report.violations {
        println!("  [{}] {} (ops {:?})", v.rule, v.what, v.ops);
        for op in report.evidence.iter().filter(|o| v.ops.contains(&o.id)) {
            println!(
                "      op {}: {:?} on instance {}, {:.3}–{:.3} s, {}",
                op.id,
                op.kind,
                op.instance,
                op.start_us as f64 / 1e6,
                op.end_us as f64 / 1e6,
                op.outcome
            );
        }
    }
}
