//! The scenarios, each measured with the servers' own counters: PostgreSQL queries made while
//! serving requests (authd's counter) and Redis commands processed (Redis INFO).
use std::{sync::Arc, time::Duration};

use authd::{
    auth::password::PasswordHasher,
    proto::authd::v1::{
        self as pb, auth_service_client::AuthServiceClient,
        profile_service_client::ProfileServiceClient,
    },
};
use secrecy::SecretString;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    Opts,
    driver::{self, Load, Outcome, Pace},
    report::{Report, Row},
    setup::{Env, PASSWORD, Server},
};

/// Runs one scenario against `server` and turns what it saw into a row.
pub(crate) async fn measure(
    env: &Env,
    server: &Server,
    name: &str,
    load: Load,
    pace: Pace,
    expected: &[Code],
    call: impl driver::Call,
) -> anyhow::Result<(Row, Outcome)> {
    let channels = server.channels(load.connections).await?;
    let (queries, commands) = (server.db.queries_executed(), env.redis_commands().await?);
    let outcome = driver::run(&channels, load, pace, call).await;
    let queries = server.db.queries_executed() - queries;
    // The second INFO counts the first one.
    let commands = env.redis_commands().await?.saturating_sub(commands + 1);
    let per = |n: u64| n as f64 / outcome.total.max(1) as f64;
    let unexpected = outcome.unexpected(expected);
    let row = Row {
        scenario: name.to_owned(),
        pace: match pace {
            Pace::Closed => "closed".into(),
            Pace::Open(rate) => format!("open@{rate:.0}/s"),
        },
        requests_per_s: outcome.rate(),
        p50_ms: outcome.quantile_ms(0.5),
        p99_ms: outcome.quantile_ms(0.99),
        p999_ms: outcome.quantile_ms(0.999),
        unexpected_errors: unexpected,
        expected_errors: outcome.requests() - outcome.ok - unexpected,
        ratio_to_baseline: None,
        pg_queries_per_request: per(queries),
        redis_commands_per_request: per(commands),
        note: if outcome.statuses.is_empty() {
            String::new()
        } else {
            format!("non-OK: {:?}", outcome.statuses)
        },
    };
    println!("  {name}: {:.0} req/s", row.requests_per_s);
    Ok((row, outcome))
}

/// [`measure`]s `call` on `server` (closed loop) while a login storm is offered to the same
/// server at `storm_rate` (open loop, on a connection of its own, every user's email in turn).
/// The storm's answers go in the row's note; any but OK and RESOURCE_EXHAUSTED (the hashing
/// pool full) counts as unexpected.
pub(crate) async fn measure_during_login_storm(
    env: &Env,
    server: &Server,
    name: &str,
    load: Load,
    storm_rate: f64,
    call: impl driver::Call,
) -> anyhow::Result<(Row, Outcome)> {
    let emails: Arc<Vec<String>> = Arc::new(env.users.iter().map(|u| u.email.clone()).collect());
    let storm_load = Load {
        connections: 1,
        concurrency: 64,
        ..load
    };
    let channels = server.channels(1).await?;
    let storm = tokio::spawn(async move {
        driver::run(
            &channels,
            storm_load,
            Pace::Open(storm_rate),
            login_call(emails),
        )
        .await
    });
    let (mut row, outcome) = measure(env, server, name, load, Pace::Closed, &[], call).await?;
    let storm = storm.await?;
    let other = storm.unexpected(&[Code::ResourceExhausted]);
    row.note = format!(
        "logins offered {storm_rate:.0}/s: {} OK, {} RESOURCE_EXHAUSTED, {other} other; {}",
        storm.ok,
        storm
            .statuses
            .get("ResourceExhausted")
            .copied()
            .unwrap_or(0),
        row.note
    );
    row.unexpected_errors += other;
    Ok((row, outcome))
}

fn tokens(env: &Env) -> Arc<Vec<String>> {
    Arc::new(env.users.iter().map(|u| u.token.clone()).collect())
}

fn user_ids(env: &Env) -> Arc<Vec<String>> {
    Arc::new(env.users.iter().map(|u| u.user_id.clone()).collect())
}

pub(crate) fn health_call() -> impl driver::Call {
    |ch: Channel, _| async move {
        HealthClient::new(ch)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
    }
}

fn validate_call(tokens: Arc<Vec<String>>) -> impl driver::Call {
    move |ch: Channel, seq| {
        let token = tokens[seq as usize % tokens.len()].clone();
        async move {
            AuthServiceClient::new(ch)
                .validate_session(pb::ValidateSessionRequest {
                    session_token: token,
                    ..Default::default()
                })
                .await
                .map(|_| ())
        }
    }
}

fn get_profile_call(ids: Arc<Vec<String>>) -> impl driver::Call {
    move |ch: Channel, seq| {
        let user_id = ids[seq as usize % ids.len()].clone();
        async move {
            ProfileServiceClient::new(ch)
                .get_profile(pb::GetProfileRequest { user_id })
                .await
                .map(|_| ())
        }
    }
}

fn batch_call(ids: Arc<Vec<String>>) -> impl driver::Call {
    move |ch: Channel, seq| {
        let start = (seq as usize * 100) % (ids.len() - 99);
        let user_ids = ids[start..start + 100].to_vec();
        async move {
            ProfileServiceClient::new(ch)
                .batch_get_profiles(pb::BatchGetProfilesRequest { user_ids })
                .await
                .map(|_| ())
        }
    }
}

/// Each call logs out a session of its own (as many as the run needs were seeded).
fn logout_call(tokens: Arc<Vec<String>>) -> impl driver::Call {
    move |ch: Channel, seq| {
        let token = tokens[seq as usize % tokens.len()].clone();
        async move {
            AuthServiceClient::new(ch)
                .logout(pb::LogoutRequest {
                    session_token: token,
                })
                .await
                .map(|_| ())
        }
    }
}

fn login_call(emails: Arc<Vec<String>>) -> impl driver::Call {
    move |ch: Channel, seq| {
        let email = emails[seq as usize % emails.len()].clone();
        async move {
            AuthServiceClient::new(ch)
                .login(pb::LoginRequest {
                    email,
                    password: PASSWORD.into(),
                    client: None,
                })
                .await
                .map(|_| ())
        }
    }
}

/// argon2id verifications per second with the server's parameters and concurrency limit,
/// measured the way the server runs them (blocking pool, behind the same semaphore).
async fn raw_verify_rate(server: &Server, seconds: f64) -> anyhow::Result<f64> {
    let hasher = Arc::new(PasswordHasher::new(
        &server.settings.auth,
        authd::metrics::Metrics::new(),
    )?);
    let phc = hasher.hash(SecretString::from(PASSWORD)).await?;
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(seconds);
    let workers = server.settings.auth.hash_concurrency;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (hasher, phc) = (hasher.clone(), phc.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < end {
                let ok = hasher
                    .verify(SecretString::from(PASSWORD), Some(phc.clone()))
                    .await;
                assert!(matches!(ok, Ok(true)));
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / seconds)
}

/// Warms the caches `server` reads: every session and profile once.
async fn warm(env: &Env, server: &Server) -> anyhow::Result<()> {
    use futures::StreamExt;
    let channel = server.channels(1).await?.remove(0);
    let results: Vec<Result<(), tonic::Status>> = futures::stream::iter(&env.users)
        .map(|user| {
            let channel = channel.clone();
            async move {
                AuthServiceClient::new(channel.clone())
                    .validate_session(pb::ValidateSessionRequest {
                        session_token: user.token.clone(),
                        ..Default::default()
                    })
                    .await?;
                ProfileServiceClient::new(channel)
                    .get_profile(pb::GetProfileRequest {
                        user_id: user.user_id.clone(),
                    })
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), _>>()?;
    Ok(())
}

/// The scenarios run against instances with LOCAL_CACHE__ENABLED=true.
const LOCAL_SCENARIOS: [&str; 5] = [
    "validate_local",
    "validate_local_open",
    "get_profile_local",
    "revoke_latency",
    "local_memory",
];
/// The scenarios of `subscribers`.
const SUBSCRIBER_SCENARIOS: [&str; 2] = ["revoke_with_subscribers", "tower_layer"];

/// Resident memory of this process (`VmRSS`), in bytes.
fn resident() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// One more instance with the in-process cache, its LOCAL_CACHE__MAX_ENTRIES sessions validated
/// (and kept): the growth of this process' resident memory per session kept.
async fn local_memory(env: &Env, opts: &Opts) -> anyhow::Result<Row> {
    use futures::StreamExt;
    let count = usize::try_from(opts.local_max_entries)?;
    let tokens = env.more_sessions(count).await?;
    let server = env.start_local(1, opts.local_max_entries).await?.remove(0);
    let channel = server.channels(1).await?.remove(0);
    let validate = |token: String| {
        let channel = channel.clone();
        async move {
            AuthServiceClient::new(channel)
                .validate_session(pb::ValidateSessionRequest {
                    session_token: token,
                    ..Default::default()
                })
                .await
                .map(|_| ())
        }
    };
    let before = resident();
    let started = std::time::Instant::now();
    let results: Vec<Result<(), tonic::Status>> = futures::stream::iter(tokens)
        .map(validate)
        .buffer_unordered(64)
        .collect()
        .await;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    results.into_iter().collect::<Result<(), _>>()?;
    let after = resident();
    let per_session = after.saturating_sub(before) as f64 / count as f64;
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("  local_memory: {per_session:.0} bytes per kept session");
    Ok(Row {
        scenario: "local_memory".into(),
        pace: "closed".into(),
        requests_per_s: rate,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        unexpected_errors: 0,
        expected_errors: 0,
        ratio_to_baseline: None,
        pg_queries_per_request: 0.0,
        redis_commands_per_request: 0.0,
        note: format!(
            "{count} sessions kept (LOCAL_CACHE__MAX_ENTRIES full): {per_session:.0} bytes per \
             session; this process (6 servers and the load) {:.0} -> {:.0} MiB resident",
            mib(before),
            mib(after)
        ),
    })
}

pub async fn run_all(opts: &Opts) -> anyhow::Result<Report> {
    println!("seeding {} users…", opts.users);
    let spare = if opts.wants("logout") || opts.wants("revoke_latency") {
        opts.logout_sessions
    } else {
        0
    };
    let env = Env::start(opts.users, spare).await?;
    println!("warming caches…");
    warm(&env, &env.cached).await?;
    let load = opts.load();
    let mut rows: Vec<Row> = Vec::new();
    let mut peaks = std::collections::HashMap::new();
    let (cached, pg) = (&env.cached, &env.pg_only);
    let closed = Pace::Closed;

    macro_rules! scenario {
        ($name:expr, $server:expr, $load:expr, $pace:expr, $expected:expr, $call:expr) => {
            if opts.wants($name) {
                let (row, outcome) =
                    measure(&env, $server, $name, $load, $pace, $expected, $call).await?;
                peaks.insert($name.to_string(), outcome.ok_rate());
                rows.push(row);
            }
        };
    }

    scenario!("health_check", cached, load, closed, &[], health_call());
    scenario!(
        "validate_cached",
        cached,
        load,
        closed,
        &[],
        validate_call(tokens(&env))
    );
    if opts.wants("validate_cached_open") {
        let peak = match peaks.get("validate_cached") {
            Some(p) => *p,
            None => measure(
                &env,
                cached,
                "validate_cached",
                load,
                closed,
                &[],
                validate_call(tokens(&env)),
            )
            .await?
            .1
            .ok_rate(),
        };
        let rate = peak * opts.open_loop_fraction;
        scenario!(
            "validate_cached_open",
            cached,
            load,
            Pace::Open(rate),
            &[],
            validate_call(tokens(&env))
        );
    }
    scenario!(
        "validate_pg_only",
        pg,
        load,
        closed,
        &[],
        validate_call(tokens(&env))
    );
    scenario!(
        "get_profile_cached",
        cached,
        load,
        closed,
        &[],
        get_profile_call(user_ids(&env))
    );
    scenario!(
        "get_profile_uncached",
        pg,
        load,
        closed,
        &[],
        get_profile_call(user_ids(&env))
    );
    scenario!(
        "batch_get_profiles_100",
        cached,
        load,
        closed,
        &[],
        batch_call(user_ids(&env))
    );

    // Revocation latency: a few callers at a time, each logging out a session of its own
    // (tombstone written, and acknowledged by REDIS__REPLICA_ACKS replicas).
    let revoke_load = Load {
        connections: 1,
        concurrency: 4,
        ..load
    };
    scenario!(
        "logout",
        cached,
        revoke_load,
        closed,
        &[],
        logout_call(Arc::new(env.spare_tokens.clone()))
    );

    let emails: Arc<Vec<String>> = Arc::new(env.users.iter().map(|u| u.email.clone()).collect());
    let slots = cached.settings.auth.hash_concurrency;
    let login_load = Load {
        connections: 1,
        concurrency: slots * 2,
        ..load
    };
    scenario!(
        "login",
        cached,
        login_load,
        closed,
        &[],
        login_call(emails.clone())
    );
    let mut verify_rate = None;
    if opts.wants("login") {
        let rate = raw_verify_rate(cached, load.duration.as_secs_f64()).await?;
        println!("  raw argon2id verify: {rate:.1}/s with {slots} slot(s)");
        verify_rate = Some(rate);
    }
    if opts.wants("validate_during_login_storm") {
        let login_rate = match peaks.get("login") {
            Some(r) => *r,
            None => verify_rate.unwrap_or(40.0),
        };
        let storm_rate = (login_rate * 5.0).max(1.0);
        let (row, outcome) = measure_during_login_storm(
            &env,
            cached,
            "validate_during_login_storm",
            load,
            storm_rate,
            validate_call(tokens(&env)),
        )
        .await?;
        peaks.insert("validate_during_login_storm".into(), outcome.ok_rate());
        rows.push(row);
    }

    // Floods of made-up requests against a victim's logins (see `flood`).
    rows.extend(
        crate::flood::floods(&env, cached, load, opts.flood_rate, |name| opts.wants(name)).await?,
    );

    let local_wanted = LOCAL_SCENARIOS
        .iter()
        .chain(&crate::ext_authz::SCENARIOS)
        .chain(&["issue_jwt"]);
    if local_wanted.into_iter().any(|name| opts.wants(name)) {
        println!("starting three instances with the in-process cache…");
        let local = env.start_local(3, opts.local_max_entries).await?;
        warm(&env, &local[0]).await?;
        let server = &local[0];
        scenario!(
            "validate_local",
            server,
            load,
            closed,
            &[],
            validate_call(tokens(&env))
        );
        if opts.wants("validate_local_open") {
            let peak = match peaks.get("validate_local") {
                Some(p) => *p,
                None => {
                    let call = validate_call(tokens(&env));
                    let (_, outcome) =
                        measure(&env, server, "validate_local", load, closed, &[], call).await?;
                    outcome.ok_rate()
                }
            };
            let rate = Pace::Open(peak * opts.open_loop_fraction);
            scenario!(
                "validate_local_open",
                server,
                load,
                rate,
                &[],
                validate_call(tokens(&env))
            );
        }
        // Minting from a session the instance holds in memory: the signature's cost.
        if opts.wants("issue_jwt") {
            rows.push(crate::jwt::issue_jwt(&env, server, load).await?);
        }
        scenario!(
            "get_profile_local",
            server,
            load,
            closed,
            &[],
            get_profile_call(user_ids(&env))
        );
        scenario!(
            "revoke_latency",
            server,
            revoke_load,
            closed,
            &[],
            logout_call(Arc::new(env.spare_local_tokens.clone()))
        );
        // Envoy's external authorization, on the same instance (`ext_authz`).
        let rounds = if opts.quick { 1 } else { 5 };
        let ext_authz = crate::ext_authz::run(&env, server, load, rounds, |name| opts.wants(name));
        rows.extend(ext_authz.await?);
        if opts.wants("local_memory") {
            rows.push(local_memory(&env, opts).await?);
        }
    }

    // Callers that validate in their own memory (an instance and database of their own).
    let subscribers = if SUBSCRIBER_SCENARIOS.iter().any(|name| opts.wants(name)) {
        println!("strict subscribers and the tower layer…");
        crate::subscribers::run(&env, opts, load).await?
    } else {
        crate::subscribers::Measured::default()
    };
    rows.extend(crate::subscribers::rows(&subscribers));

    // Fleets of their own (their own databases), after everything else.
    let fleets = if opts.wants("fleet") {
        crate::fleet::run(&env, opts).await?
    } else {
        Vec::new()
    };
    rows.extend(crate::fleet::rows(&fleets));

    let baseline = peaks.get("health_check").copied();
    for row in &mut rows {
        if row.pace == "closed" {
            row.ratio_to_baseline = baseline.map(|b| row.requests_per_s / b);
        }
    }
    let mut targets = crate::report::targets(&rows, &peaks, verify_rate, slots);
    crate::fleet::targets(&fleets, &mut targets);
    crate::subscribers::targets(&subscribers, &mut targets);
    crate::ext_authz::targets(&rows, &mut targets);
    let settings = serde_json::to_value(opts)?;
    env.cleanup().await;
    Ok(Report {
        settings,
        rows,
        targets,
    })
}
