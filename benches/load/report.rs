//! The result table: printed, and written as JSON.
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    /// `closed` (peak) or `open@<rate>` (fixed rate, latency from intended send time).
    pub pace: String,
    pub requests_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub unexpected_errors: u64,
    /// Non-OK answers that the scenario expects (e.g. RESOURCE_EXHAUSTED for excess logins).
    pub expected_errors: u64,
    /// requests_per_s / health_check requests_per_s.
    pub ratio_to_baseline: Option<f64>,
    pub pg_queries_per_request: f64,
    pub redis_commands_per_request: f64,
    pub note: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub target: String,
    pub met: bool,
    pub measured: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub settings: serde_json::Value,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
}

pub fn print_rows(rows: &[Row]) {
    println!(
        "| {:<28} | {:<14} | {:>9} | {:>7} | {:>7} | {:>8} | {:>6} | {:>6} | {:>7} | {:>8} |",
        "scenario",
        "pace",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "errors",
        "ratio",
        "pg/req",
        "redis/req"
    );
    println!("|{}|", ["-"; 10].map(|_| "---").join("|"));
    for r in rows {
        let ratio = r
            .ratio_to_baseline
            .map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "| {:<28} | {:<14} | {:>9.0} | {:>7.3} | {:>7.3} | {:>8.3} | {:>6} | {:>6} | {:>7.2} | {:>8.2} |",
            r.scenario,
            r.pace,
            r.requests_per_s,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.unexpected_errors,
            ratio,
            r.pg_queries_per_request,
            r.redis_commands_per_request,
        );
        if !r.note.is_empty() {
            println!("|   ↳ {}", r.note);
        }
    }
}

pub fn print_targets(targets: &[Target]) {
    println!();
    for t in targets {
        let mark = if t.met { "met    " } else { "MISSED " };
        println!("{mark} {:<70} {}", t.target, t.measured);
    }
}

/// The targets, checked against one run's rows (ratios within the run).
pub fn targets(
    rows: &[Row],
    peaks: &std::collections::HashMap<String, f64>,
    verify_rate: Option<f64>,
    slots: usize,
) -> Vec<Target> {
    let row = |name: &str| rows.iter().find(|r| r.scenario == name);
    let mut out = Vec::new();
    let mut check = |target: &str, met: bool, measured: String| {
        out.push(Target {
            target: target.to_owned(),
            met,
            measured,
        })
    };
    if let Some(r) = row("validate_cached") {
        let ratio = r.ratio_to_baseline.unwrap_or(0.0);
        check(
            "validate_cached >= 70% of health_check",
            ratio >= 0.70,
            format!("{:.0}%", ratio * 100.0),
        );
        check(
            "validate_cached: 0.00 PostgreSQL queries/request",
            r.pg_queries_per_request < 0.005,
            format!("{:.3}", r.pg_queries_per_request),
        );
        check(
            "validate_cached: <= 1.05 Redis commands/request",
            r.redis_commands_per_request <= 1.05,
            format!("{:.3}", r.redis_commands_per_request),
        );
    }
    if let Some(r) = row("validate_cached_open") {
        check(
            "validate_cached open loop at 50%: p99 <= 1 ms",
            r.p99_ms <= 1.0,
            format!("{:.3} ms", r.p99_ms),
        );
        check(
            "validate_cached open loop at 50%: p99.9 <= 5 ms",
            r.p999_ms <= 5.0,
            format!("{:.3} ms", r.p999_ms),
        );
    }
    if let (Some(c), Some(p)) = (peaks.get("validate_cached"), peaks.get("validate_pg_only")) {
        check(
            "validate_cached vs validate_pg_only: speed-up (reported)",
            true,
            format!("{:.2}x", c / p),
        );
    }
    if let Some(r) = row("get_profile_cached") {
        let ratio = r.ratio_to_baseline.unwrap_or(0.0);
        check(
            "get_profile_cached >= 60% of health_check",
            ratio >= 0.60,
            format!("{:.0}%", ratio * 100.0),
        );
        check(
            "get_profile_cached: 0.00 PostgreSQL queries/request",
            r.pg_queries_per_request < 0.005,
            format!("{:.3}", r.pg_queries_per_request),
        );
    }
    if let Some(r) = row("batch_get_profiles_100") {
        check(
            "batch_get_profiles_100: 1 Redis round trip/request",
            (r.redis_commands_per_request - 1.0).abs() < 0.005,
            format!("{:.3}", r.redis_commands_per_request),
        );
        check(
            "batch_get_profiles_100: 0 PostgreSQL queries/request",
            r.pg_queries_per_request < 0.005,
            format!("{:.3}", r.pg_queries_per_request),
        );
    }
    if let Some(r) = row("validate_local") {
        let ratio = r.ratio_to_baseline.unwrap_or(0.0);
        check(
            "validate_local >= 90% of health_check",
            ratio >= 0.90,
            format!("{:.0}%", ratio * 100.0),
        );
        check(
            "validate_local: 0.00 PostgreSQL queries/request",
            r.pg_queries_per_request < 0.005,
            format!("{:.3}", r.pg_queries_per_request),
        );
        // The only commands: each instance's heartbeat and lease work, a few a second.
        check(
            "validate_local: 0.00 Redis commands/request",
            r.redis_commands_per_request < 0.005,
            format!("{:.4}", r.redis_commands_per_request),
        );
    }
    if let Some(r) = row("validate_local_open") {
        check(
            "validate_local open loop at 50%: p99 <= 1 ms",
            r.p99_ms <= 1.0,
            format!("{:.3} ms", r.p99_ms),
        );
    }
    if let Some(r) = row("get_profile_local") {
        let ratio = r.ratio_to_baseline.unwrap_or(0.0);
        check(
            "get_profile_local >= 85% of health_check",
            ratio >= 0.85,
            format!("{:.0}%", ratio * 100.0),
        );
    }
    crate::flood::targets(rows, &mut check);
    if let Some(r) = row("revoke_latency") {
        check(
            "revoke_latency (3 instances holding leases): p99 <= 10 ms",
            r.p99_ms <= 10.0,
            format!("{:.2} ms", r.p99_ms),
        );
    }
    if let (Some(login), Some(raw)) = (peaks.get("login"), verify_rate) {
        let capacity = raw;
        check(
            "login >= 90% of hash concurrency x raw argon2id verify rate",
            *login >= 0.9 * capacity,
            format!("{login:.1}/s vs {capacity:.1}/s ({slots} slot(s))"),
        );
    }
    if let (Some(storm), Some(alone)) = (
        peaks.get("validate_during_login_storm"),
        peaks.get("validate_cached"),
    ) {
        check(
            "validate_during_login_storm >= 50% of validate_cached",
            storm / alone >= 0.5,
            format!("{:.0}%", storm / alone * 100.0),
        );
    }
    if let Some(r) = row("validate_during_login_storm") {
        check(
            "validate_during_login_storm: <= 0.05 PostgreSQL queries/validation",
            r.pg_queries_per_request <= 0.05,
            format!("{:.3}", r.pg_queries_per_request),
        );
    }
    let unexpected: u64 = rows.iter().map(|r| r.unexpected_errors).sum();
    check(
        "all: zero unexpected non-OK statuses (storm logins: only RESOURCE_EXHAUSTED)",
        unexpected == 0,
        unexpected.to_string(),
    );
    out
}
