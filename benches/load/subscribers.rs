//! What callers that validate in their own memory cost, and what they gain.
//!
//! - `revoke_with_subscribers`: Logout's latency, one at a time, on an instance (Redis on, its
//!   own database) followed by 0, 2 and 8 strict subscribers — `authd-client` `Validator`s in
//!   this process, each holding a lease every Logout waits for.
//! - `tower_layer`: a caller service (tonic's health service) behind `authd-client`'s
//!   `AuthLayer` (strict, warm), every request carrying a valid session's token, against the
//!   same service without the layer.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use authd::proto::authd::v1::{self as pb, auth_service_client::AuthServiceClient};
use authd_client::{AuthLayer, Config, Mode, Validator};
use tonic::{
    Request,
    transport::{Channel, Server as TonicServer},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    Opts,
    driver::{self, Load, Pace},
    report::{Row, Target},
    setup::{self, Env, Server, User},
};

/// The subscribers' key (EVENTS__API_KEYS_FILE holds its hash).
const KEY: &str = "bench-subscriber-key-0123456789abcdef";
/// Strict subscribers measured.
const COUNTS: [usize; 3] = [0, 2, 8];
/// Rounds of the layer's scenario, each side.
const LAYER_ROUNDS: usize = 5;

/// Logout's latency with `subscribers` strict subscribers.
pub struct Latency {
    pub subscribers: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// What the two scenarios measured.
#[derive(Default)]
pub struct Measured {
    pub revoke: Vec<Latency>,
    /// The cost the model predicts one more strict subscriber host adds to a revocation (ms).
    pub predicted_ms: f64,
    pub layer: Option<(Row, Row)>,
}

/// An instance serving EventService, on a database of its own.
async fn instance(dir: &std::path::Path) -> anyhow::Result<Server> {
    use sha2::Digest;
    let keys = dir.join("subscribers.toml");
    let hash = hex::encode(sha2::Sha256::digest(KEY));
    std::fs::write(
        &keys,
        format!("[[key]]\nname = \"bench\"\nsha256 = \"{hash}\"\n"),
    )?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (db_name, prefix) = (format!("authd_subs_{id}"), format!("authd-subs:{id}:"));
    let mut settings = setup::settings(true, &db_name, &prefix);
    settings.events.api_keys_file = Some(keys);
    setup::serve(settings).await
}

fn validator(server: &Server) -> anyhow::Result<Validator> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))?.connect_lazy();
    Ok(Validator::new(
        channel,
        Config {
            mode: Mode::Strict,
            api_key: Some(KEY.to_owned()),
            ..Config::default()
        },
    ))
}

/// Waits until every validator trusts its memory and the instance sees `count` leases.
async fn settled(server: &Server, validators: &[Validator], count: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let held = server.db.leases().held().await.unwrap_or(-1);
        if held == count as i64 && validators.iter().all(Validator::trusted) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{count} subscribers did not settle ({held} leases held)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len().saturating_sub(1)) as f64 * q).round() as usize;
    sorted.get(index).copied().unwrap_or(0.0)
}

/// Medians of the round trips the model's prediction is made of: a PostgreSQL statement, a
/// Redis command, a gRPC call (ms).
async fn round_trips(env: &Env, server: &Server, channel: &Channel) -> anyhow::Result<[f64; 3]> {
    use fred::interfaces::ClientLike;
    use secrecy::ExposeSecret;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        server.settings.database.url.expose_secret(),
    )
    .await?;
    let mut times = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..200 {
        let started = Instant::now();
        sqlx::query("select 1").execute(&mut conn).await?;
        times[0].push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let _: String = env.redis.ping(None).await?;
        times[1].push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await?;
        times[2].push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(times.map(|mut t| {
        t.sort_by(f64::total_cmp);
        quantile(&t, 0.5)
    }))
}

pub async fn run(env: &Env, opts: &Opts, load: Load) -> anyhow::Result<Measured> {
    let mut measured = Measured::default();
    let dir = tempfile::tempdir()?;
    let server = instance(dir.path()).await?;
    let logouts = if opts.quick { 30 } else { 500 };
    let mut users = setup::seed(&server, 64).await?;
    let owner: User = users.pop().expect("seeded");
    let channel = server.channels(1).await?.remove(0);
    // Each strict subscriber's host adds, on a revocation's path (README "What a strict
    // subscriber costs"): the revoker's message (Redis), a pass over the log (two reads), the
    // batch and its acknowledgement (a round trip on the stream) and the relayed
    // acknowledgement (Redis); the lease extension comes after. Subscribers of one host share
    // all but their round trips, which run at once.
    let [pg, redis, grpc] = round_trips(env, &server, &channel).await?;
    measured.predicted_ms = 2.0 * redis + 2.0 * pg + grpc;
    if opts.wants("revoke_with_subscribers") {
        for count in COUNTS {
            let validators = (0..count)
                .map(|_| validator(&server))
                .collect::<anyhow::Result<Vec<_>>>()?;
            settled(&server, &validators, count).await?;
            let tokens = setup::seed_sessions(&server, &owner, logouts + 1).await?;
            let mut latencies = Vec::with_capacity(logouts);
            for (k, token) in tokens.into_iter().enumerate() {
                let started = Instant::now();
                AuthServiceClient::new(channel.clone())
                    .logout(pb::LogoutRequest {
                        session_token: token,
                    })
                    .await?;
                // The first opens the revocation path's connections: not measured.
                if k > 0 {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies.sort_by(f64::total_cmp);
            let latency = Latency {
                subscribers: count,
                p50_ms: quantile(&latencies, 0.5),
                p99_ms: quantile(&latencies, 0.99),
            };
            println!(
                "  revoke_with_subscribers n={count}: p50 {:.2} ms, p99 {:.2} ms",
                latency.p50_ms, latency.p99_ms
            );
            measured.revoke.push(latency);
            // Closing their side ends their leases at once.
            drop(validators);
            settled(&server, &[], 0).await?;
        }
    }
    if opts.wants("tower_layer") {
        let validator = validator(&server)?;
        settled(&server, std::slice::from_ref(&validator), 1).await?;
        let tokens: Arc<Vec<String>> = Arc::new(users.iter().map(|u| u.token.clone()).collect());
        for token in tokens.iter() {
            validator.validate(token).await?;
        }
        let with = caller(Some(validator.clone())).await?;
        let without = caller(None).await?;
        // Rounds of one and the other, alternating (a run on this machine varies by a quarter
        // from one minute to the next): each side's median round.
        let rounds = if opts.quick { 1 } else { LAYER_ROUNDS };
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            on.push(layer_row("tower_layer_check_on", &with, load, tokens.clone()).await?);
            off.push(layer_row("tower_layer_check_off", &without, load, tokens.clone()).await?);
        }
        let rows = (median_round(on), median_round(off));
        anyhow::ensure!(
            validator.local_hits() > 0,
            "the layer answered from the validator's memory"
        );
        measured.layer = Some(rows);
    }
    let url = secrecy::ExposeSecret::expose_secret(&server.settings.database.url).to_owned();
    drop(server);
    tokio::time::sleep(Duration::from_millis(300)).await;
    setup::drop_database(&url).await;
    Ok(measured)
}

/// A caller service on 127.0.0.1: tonic's health service, behind `AuthLayer` when given a
/// validator. Its address.
async fn caller(validator: Option<Validator>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        let served = match validator {
            Some(v) => {
                TonicServer::builder()
                    .layer(AuthLayer::new(v))
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
            }
            None => {
                TonicServer::builder()
                    .add_service(health)
                    .serve_with_incoming(incoming)
                    .await
            }
        };
        if let Err(error) = served {
            eprintln!("the caller service stopped: {error}");
        }
    });
    Ok(addr)
}

async fn layer_row(
    name: &str,
    addr: &std::net::SocketAddr,
    load: Load,
    tokens: Arc<Vec<String>>,
) -> anyhow::Result<Row> {
    let mut channels = Vec::with_capacity(load.connections);
    for _ in 0..load.connections {
        channels.push(
            Channel::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let call = move |ch: Channel, seq: u64| {
        let token = &tokens[seq as usize % tokens.len()];
        let mut request = Request::new(HealthCheckRequest::default());
        let value = format!("Bearer {token}").parse();
        async move {
            request
                .metadata_mut()
                .insert("authorization", value.expect("a token is a header value"));
            HealthClient::new(ch).check(request).await.map(|_| ())
        }
    };
    let outcome = driver::run(&channels, load, Pace::Closed, call).await;
    println!("  {name}: {:.0} req/s", outcome.rate());
    Ok(Row {
        scenario: name.to_owned(),
        pace: "closed".into(),
        requests_per_s: outcome.rate(),
        p50_ms: outcome.quantile_ms(0.5),
        p99_ms: outcome.quantile_ms(0.99),
        p999_ms: outcome.quantile_ms(0.999),
        unexpected_errors: outcome.unexpected(&[]),
        expected_errors: 0,
        ratio_to_baseline: None,
        pg_queries_per_request: 0.0,
        redis_commands_per_request: 0.0,
        note: if outcome.statuses.is_empty() {
            String::new()
        } else {
            format!("non-OK: {:?}", outcome.statuses)
        },
    })
}

/// The round of median rate.
pub(crate) fn median_round(mut rounds: Vec<Row>) -> Row {
    rounds.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
    let count = rounds.len();
    let mut row = rounds.swap_remove(count / 2);
    row.note = format!("median of {count} alternating rounds. {}", row.note);
    row
}

/// One row per subscriber count, and the layer's two.
pub fn rows(measured: &Measured) -> Vec<Row> {
    let mut rows: Vec<Row> = measured
        .revoke
        .iter()
        .map(|l| Row {
            scenario: format!("revoke_with_subscribers_n{}", l.subscribers),
            pace: "sequential".into(),
            requests_per_s: 0.0,
            p50_ms: l.p50_ms,
            p99_ms: l.p99_ms,
            p999_ms: 0.0,
            unexpected_errors: 0,
            expected_errors: 0,
            ratio_to_baseline: None,
            pg_queries_per_request: 0.0,
            redis_commands_per_request: 0.0,
            note: format!(
                "{} strict subscribers holding leases; predicted cost {:.2} ms",
                l.subscribers, measured.predicted_ms
            ),
        })
        .collect();
    if let Some((with, without)) = &measured.layer {
        rows.push(with.clone());
        rows.push(without.clone());
    }
    rows
}

/// The targets.
pub fn targets(measured: &Measured, out: &mut Vec<Target>) {
    let find = |n: usize| measured.revoke.iter().find(|l| l.subscribers == n);
    if let (Some(none), Some(eight)) = (find(0), find(8)) {
        let limit = 2.0 * none.p99_ms + measured.predicted_ms;
        out.push(Target {
            target: "revoke_with_subscribers: Logout p99 with 8 strict subscribers <= 2 x p99 \
                     with 0 + the predicted cost"
                .into(),
            met: eight.p99_ms <= limit,
            measured: format!(
                "{:.2} ms (0: {:.2} ms, predicted cost {:.2} ms, limit {limit:.2} ms)",
                eight.p99_ms, none.p99_ms, measured.predicted_ms
            ),
        });
    }
    if let Some((with, without)) = &measured.layer {
        let ratio = with.requests_per_s / without.requests_per_s.max(1.0);
        out.push(Target {
            target: "tower_layer: a caller service behind AuthLayer >= 0.9 x without it".into(),
            met: ratio >= 0.9,
            measured: format!(
                "{ratio:.3} ({:.0} / {:.0} req/s)",
                with.requests_per_s, without.requests_per_s
            ),
        });
    }
}
