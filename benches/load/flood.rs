//! Floods of made-up requests against a victim's logins: each flood runs open loop at
//! `--flood-rate` (every request different: made-up tokens, random profile ids) for the
//! scenario's duration, while a victim logs in 3 times a second on a connection of its own. The
//! same with a flood of Health/Check at the same rate is the control: what sharing the machine's
//! CPU alone costs the victim. A row per flood: the victim's Login latency, its p50's ratio to
//! the control's (`ratio` column), any UNAVAILABLE it got, and the flood's own PostgreSQL
//! queries and Redis commands per request (the victim's, measured under the control, taken
//! off).

use authd::proto::authd::v1::{
    self as pb, auth_service_client::AuthServiceClient,
    profile_service_client::ProfileServiceClient,
};
use tonic::{Code, transport::Channel};

use crate::{
    driver::{self, Call, Load, Outcome, Pace},
    report::Row,
    setup::{Env, PASSWORD, Server},
};

/// The victim's logins per second.
const VICTIM_RATE: f64 = 3.0;

/// A made-up token of today's shape: a MAC under a key of its own.
fn made_up_token() -> String {
    use authd::auth::token::{SigningKey, generate};
    let key = SigningKey::new(1, &SigningKey::random_secret()).expect("32 bytes");
    generate(&key).0
}

fn forged_validate() -> impl Call {
    |ch: Channel, _| async move {
        AuthServiceClient::new(ch)
            .validate_session(pb::ValidateSessionRequest {
                session_token: made_up_token(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }
}

fn random_get_profile() -> impl Call {
    |ch: Channel, _| async move {
        ProfileServiceClient::new(ch)
            .get_profile(pb::GetProfileRequest {
                user_id: uuid::Uuid::new_v4().to_string(),
            })
            .await
            .map(|_| ())
    }
}

fn random_batch() -> impl Call {
    |ch: Channel, _| async move {
        let user_ids = (0..100).map(|_| uuid::Uuid::new_v4().to_string()).collect();
        ProfileServiceClient::new(ch)
            .batch_get_profiles(pb::BatchGetProfilesRequest { user_ids })
            .await
            .map(|_| ())
    }
}

fn victim_login(email: String) -> impl Call {
    move |ch: Channel, _| {
        let email = email.clone();
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

/// What one flood did, with the victim's logins beside it.
struct Run {
    victim: Outcome,
    flood: Outcome,
    queries: u64,
    commands: u64,
}

async fn flooded(
    env: &Env,
    server: &Server,
    load: Load,
    rate: f64,
    flood: impl Call,
) -> anyhow::Result<Run> {
    let flood_channels = server.channels(load.connections).await?;
    let victim_channels = server.channels(1).await?;
    let email = env.victim.email.clone();
    let (queries, commands) = (server.db.queries_executed(), env.redis_commands().await?);
    let flooding =
        tokio::spawn(
            async move { driver::run(&flood_channels, load, Pace::Open(rate), flood).await },
        );
    let victim_load = Load {
        connections: 1,
        concurrency: 1,
        ..load
    };
    let victim = driver::run(
        &victim_channels,
        victim_load,
        Pace::Open(VICTIM_RATE),
        victim_login(email),
    )
    .await;
    let flood = flooding.await?;
    Ok(Run {
        victim,
        flood,
        queries: server.db.queries_executed() - queries,
        commands: env.redis_commands().await?.saturating_sub(commands + 1),
    })
}

/// The floods (those `wants` names), each against the same control, as rows.
pub async fn floods(
    env: &Env,
    server: &Server,
    load: Load,
    rate: f64,
    wants: impl Fn(&str) -> bool,
) -> anyhow::Result<Vec<Row>> {
    type Flood = (&'static str, BoxedCall, &'static [Code]);
    let kinds: Vec<Flood> = vec![
        (
            "validate_forged_flood",
            boxed(forged_validate()),
            &[Code::Unauthenticated],
        ),
        (
            "get_profile_forged_flood",
            boxed(random_get_profile()),
            &[Code::NotFound, Code::ResourceExhausted],
        ),
        (
            "batch_get_profiles_forged_flood",
            boxed(random_batch()),
            &[Code::ResourceExhausted],
        ),
    ];
    let kinds: Vec<Flood> = kinds.into_iter().filter(|(name, ..)| wants(name)).collect();
    if kinds.is_empty() {
        return Ok(Vec::new());
    }
    let health = |ch: Channel, _| async move {
        tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ())
    };
    let control = flooded(env, server, load, rate, health).await?;
    let control_p50 = control.victim.quantile_ms(0.5);
    let logins = control.victim.total.max(1) as f64;
    let (victim_queries, victim_commands) = (
        control.queries as f64 / logins,
        control.commands as f64 / logins,
    );
    println!(
        "  control (Health/Check at {rate:.0}/s): victim Login p50 {control_p50:.1} ms, {:.1} \
         queries and {:.1} Redis commands per login",
        victim_queries, victim_commands
    );
    let mut rows = Vec::new();
    for (name, call, expected) in kinds {
        let run = flooded(env, server, load, rate, call).await?;
        let victim_p50 = run.victim.quantile_ms(0.5);
        let ratio = victim_p50 / control_p50.max(0.001);
        let own = |total: u64, per_login: f64| {
            (total as f64 - per_login * run.victim.total as f64).max(0.0)
                / run.flood.total.max(1) as f64
        };
        let unexpected = run.victim.unexpected(&[]) + run.flood.unexpected(expected);
        println!("  {name}: victim Login p50 {victim_p50:.1} ms ({ratio:.2}x the control)");
        rows.push(Row {
            scenario: name.to_owned(),
            pace: format!("open@{rate:.0}/s"),
            requests_per_s: run.flood.rate(),
            p50_ms: victim_p50,
            p99_ms: run.victim.quantile_ms(0.99),
            p999_ms: run.victim.quantile_ms(0.999),
            unexpected_errors: unexpected,
            expected_errors: run.flood.requests() - run.flood.ok - run.flood.unexpected(expected),
            ratio_to_baseline: Some(ratio),
            pg_queries_per_request: own(run.queries, victim_queries),
            redis_commands_per_request: own(run.commands, victim_commands),
            note: format!(
                "latencies and ratio are the victim's Login (3/s; control p50 {control_p50:.1} \
                 ms under Health/Check at the same rate); victim {} OK {:?}; flood {:?}; \
                 queries and commands are the flood's per request",
                run.victim.ok, run.victim.statuses, run.flood.statuses
            ),
        });
    }
    Ok(rows)
}

type BoxedCall = Box<dyn Fn(Channel, u64) -> CallFuture + Send + Sync>;
type CallFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>;

/// Boxes a call so that floods of different kinds fit in one list.
fn boxed(call: impl Call) -> BoxedCall {
    Box::new(move |ch, seq| Box::pin(call(ch, seq)))
}

pub fn targets(rows: &[Row], mut check: impl FnMut(&str, bool, String)) {
    for row in rows
        .iter()
        .filter(|r| r.scenario.ends_with("_forged_flood"))
    {
        let ratio = row.ratio_to_baseline.unwrap_or(f64::INFINITY);
        check(
            &format!("{}: victim Login p50 <= 1.5x the control's", row.scenario),
            ratio <= 1.5,
            format!("{ratio:.2}x ({:.1} ms)", row.p50_ms),
        );
        check(
            &format!(
                "{}: no UNAVAILABLE or other unexpected status",
                row.scenario
            ),
            row.unexpected_errors == 0,
            row.unexpected_errors.to_string(),
        );
        if row.scenario == "validate_forged_flood" {
            check(
                "validate_forged_flood: <= 0.001 PostgreSQL queries per made-up token",
                row.pg_queries_per_request <= 0.001,
                format!("{:.4}", row.pg_queries_per_request),
            );
        }
    }
}
