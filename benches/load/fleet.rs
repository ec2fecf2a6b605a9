//! The `fleet` scenario: what one revocation costs Redis and PostgreSQL as instances are added.
//! For N = 1, 2, 4 and 8 instances on a database and key prefix of their own (small pools, so
//! that eight fit on a small machine), with the in-process cache off and on: Redis commands
//! (Redis' own count) and PostgreSQL queries (the instances' own counts, background jobs
//! included) per Logout, per UpdateProfile and per RevokeAllSessions of a user with 10
//! sessions — each call sent to the next instance in turn, one at a time, the fleet's at-rest
//! cost over the same time subtracted — Logout's latency, and the at-rest cost per instance.
use std::time::{Duration, Instant};

use authd::proto::authd::v1::{
    self as pb, auth_service_client::AuthServiceClient,
    profile_service_client::ProfileServiceClient,
};
use tonic::transport::Channel;

use crate::{
    Opts,
    report::{Row, Target},
    setup::{self, Env, Server, User},
};

/// The fleet sizes measured.
const SIZES: [usize; 4] = [1, 2, 4, 8];
/// Sessions of each user RevokeAllSessions revokes.
const SESSIONS_PER_USER: usize = 10;

/// What one fleet measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub instances: usize,
    pub local_cache: bool,
    pub logout: Cost,
    pub update_profile: Cost,
    pub revoke_all: Cost,
    pub logout_p50_ms: f64,
    pub logout_p99_ms: f64,
    /// Per instance, per second.
    pub rest_redis: f64,
    pub rest_pg: f64,
}

/// Per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub redis: f64,
    pub pg: f64,
}

struct Fleet {
    servers: Vec<Server>,
    channels: Vec<Channel>,
}

/// The counters the costs come from: Redis' commands, the instances' queries.
#[derive(Clone, Copy)]
struct Counts {
    redis: u64,
    pg: u64,
    at: Instant,
}

impl Fleet {
    async fn start(instances: usize, local_cache: bool) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (db_name, prefix) = (format!("authd_fleet_{id}"), format!("authd-fleet:{id}:"));
        let mut servers = Vec::with_capacity(instances);
        for _ in 0..instances {
            let mut settings = setup::settings(true, &db_name, &prefix);
            settings.local_cache.enabled = local_cache;
            settings.database.max_connections = 6;
            settings.database.min_connections = 2;
            settings.redis.pool_size = 2;
            servers.push(setup::serve(settings).await?);
        }
        let mut channels = Vec::with_capacity(instances);
        for server in &servers {
            channels.push(server.channels(1).await?.remove(0));
        }
        // Every instance established its generation, took its lease and followed the logs once.
        let deadline = Instant::now() + Duration::from_secs(20);
        let held = servers[0].db.leases();
        while local_cache && held.held().await.unwrap_or(0) < instances as i64 {
            anyhow::ensure!(Instant::now() < deadline, "the fleet took no leases");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(Self { servers, channels })
    }

    async fn counts(&self, env: &Env) -> anyhow::Result<Counts> {
        let pg = self
            .servers
            .iter()
            .map(|s| s.db.all_queries_executed())
            .sum();
        Ok(Counts {
            redis: env.redis_commands().await?,
            pg,
            at: Instant::now(),
        })
    }

    /// The fleet's at-rest rates (Redis commands/s, PostgreSQL queries/s), over `seconds`.
    async fn at_rest(&self, env: &Env, seconds: f64) -> anyhow::Result<(f64, f64)> {
        let before = self.counts(env).await?;
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let after = self.counts(env).await?;
        let elapsed = after.at.duration_since(before.at).as_secs_f64();
        // The second INFO counts the first one.
        let redis = after.redis.saturating_sub(before.redis + 1) as f64;
        let pg = (after.pg - before.pg) as f64;
        Ok((redis / elapsed, pg / elapsed))
    }

    /// Runs `calls` one after the other, call `i` on instance `i % N`, then lets every follower
    /// pass over what they logged: the cost per call, the fleet's at-rest `rest` subtracted, and
    /// each call's latency.
    async fn per_call<F, Fut>(
        &self,
        env: &Env,
        rest: (f64, f64),
        calls: usize,
        call: F,
    ) -> anyhow::Result<(Cost, Vec<f64>)>
    where
        F: Fn(Channel, usize) -> Fut,
        Fut: Future<Output = Result<(), tonic::Status>>,
    {
        let before = self.counts(env).await?;
        let mut latencies = Vec::with_capacity(calls);
        for i in 0..calls {
            let channel = self.channels[i % self.channels.len()].clone();
            let started = Instant::now();
            call(channel, i).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        // Two follower passes (SESSION__INVALIDATION_INTERVAL is 1 s).
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let after = self.counts(env).await?;
        let elapsed = after.at.duration_since(before.at).as_secs_f64();
        let redis = after.redis.saturating_sub(before.redis + 1) as f64 - rest.0 * elapsed;
        let pg = (after.pg - before.pg) as f64 - rest.1 * elapsed;
        let cost = Cost {
            redis: (redis / calls as f64).max(0.0),
            pg: (pg / calls as f64).max(0.0),
        };
        Ok((cost, latencies))
    }

    async fn stop(self) {
        use secrecy::ExposeSecret;
        let url = self.servers[0]
            .settings
            .database
            .url
            .expose_secret()
            .to_owned();
        drop(self);
        tokio::time::sleep(Duration::from_millis(300)).await;
        setup::drop_database(&url).await;
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// One fleet of `instances`, measured.
async fn measure(
    env: &Env,
    opts: &Opts,
    instances: usize,
    local_cache: bool,
    background: f64,
) -> anyhow::Result<Measured> {
    let fleet = Fleet::start(instances, local_cache).await?;
    let (logouts, updates, revokes) = if opts.quick {
        (20, 10, 4)
    } else {
        (200, 50, 20)
    };
    let server = &fleet.servers[0];
    let mut users = setup::seed(server, revokes + 2).await?;
    let owner: User = users.pop().expect("seeded");
    let editor: User = users.pop().expect("seeded");
    let tokens = setup::seed_sessions(server, &owner, logouts).await?;
    for user in &users {
        setup::seed_sessions(server, user, SESSIONS_PER_USER - 1).await?;
    }
    // Each instance's first calls open its connections and load its keys (one Logout each, of
    // a session of its own, makes the revocation path's): not measured. The sessions then
    // revoked are cached as they would be in use.
    let spare = setup::seed_sessions(server, &owner, instances).await?;
    for (k, channel) in fleet.channels.iter().enumerate() {
        AuthServiceClient::new(channel.clone())
            .logout(pb::LogoutRequest {
                session_token: spare[k].clone(),
            })
            .await?;
        for token in tokens.iter().skip(k).step_by(instances) {
            AuthServiceClient::new(channel.clone())
                .validate_session(pb::ValidateSessionRequest {
                    session_token: token.clone(),
                    ..Default::default()
                })
                .await?;
        }
    }
    let rest_seconds = if opts.quick { 2.0 } else { 5.0 };
    let rest = fleet.at_rest(env, rest_seconds).await?;

    let (logout, mut latencies) = fleet
        .per_call(env, rest, logouts, |channel, i| {
            let session_token = tokens[i].clone();
            async move {
                AuthServiceClient::new(channel)
                    .logout(pb::LogoutRequest { session_token })
                    .await
                    .map(|_| ())
            }
        })
        .await?;
    latencies.sort_by(f64::total_cmp);
    let (update_profile, _) = fleet
        .per_call(env, rest, updates, |channel, i| {
            let request = pb::UpdateProfileRequest {
                session_token: editor.token.clone(),
                profile: Some(pb::Profile {
                    display_name: format!("Editor {i}"),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
                expected_version: 0,
            };
            async move {
                ProfileServiceClient::new(channel)
                    .update_profile(request)
                    .await
                    .map(|_| ())
            }
        })
        .await?;
    let (revoke_all, _) = fleet
        .per_call(env, rest, revokes, |channel, i| {
            let session_token = users[i].token.clone();
            async move {
                AuthServiceClient::new(channel)
                    .revoke_all_sessions(pb::RevokeAllSessionsRequest {
                        session_token,
                        include_current: true,
                    })
                    .await
                    .map(|_| ())
            }
        })
        .await?;
    fleet.stop().await;
    let n = instances as f64;
    let measured = Measured {
        instances,
        local_cache,
        logout,
        update_profile,
        revoke_all,
        logout_p50_ms: quantile(&latencies, 0.5),
        logout_p99_ms: quantile(&latencies, 0.99),
        // The fleet's own: less what the rest of the benchmark sends Redis meanwhile.
        rest_redis: (rest.0 - background).max(0.0) / n,
        rest_pg: rest.1 / n,
    };
    println!(
        "  fleet N={instances} cache {}: Logout {:.1} Redis / {:.2} PostgreSQL, p50 {:.2} ms p99 {:.2} ms",
        if local_cache { "on" } else { "off" },
        logout.redis,
        logout.pg,
        measured.logout_p50_ms,
        measured.logout_p99_ms
    );
    Ok(measured)
}

/// Every fleet size, with the in-process cache off then on.
pub async fn run(env: &Env, opts: &Opts) -> anyhow::Result<Vec<Measured>> {
    println!("starting fleets of 1 to 8 instances…");
    let sizes: &[usize] = if opts.quick { &SIZES[..2] } else { &SIZES };
    // The other servers' Redis commands at rest, counted in Redis' figures.
    let before = env.redis_commands().await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let background = env.redis_commands().await?.saturating_sub(before + 1) as f64
        / started.elapsed().as_secs_f64();
    let mut out = Vec::new();
    for local_cache in [false, true] {
        for &n in sizes {
            out.push(measure(env, opts, n, local_cache, background).await?);
        }
    }
    Ok(out)
}

/// One row per fleet (its Logouts), the other costs in the note.
pub fn rows(measured: &[Measured]) -> Vec<Row> {
    measured
        .iter()
        .map(|m| Row {
            scenario: format!(
                "fleet_logout_n{}_cache_{}",
                m.instances,
                if m.local_cache { "on" } else { "off" }
            ),
            pace: "sequential".into(),
            requests_per_s: 0.0,
            p50_ms: m.logout_p50_ms,
            p99_ms: m.logout_p99_ms,
            p999_ms: 0.0,
            unexpected_errors: 0,
            expected_errors: 0,
            ratio_to_baseline: None,
            pg_queries_per_request: m.logout.pg,
            redis_commands_per_request: m.logout.redis,
            note: format!(
                "UpdateProfile {:.1} Redis / {:.2} PostgreSQL; RevokeAllSessions (10 sessions) \
                 {:.1} / {:.2}; at rest per instance {:.1} Redis commands/s, {:.1} PostgreSQL \
                 queries/s",
                m.update_profile.redis,
                m.update_profile.pg,
                m.revoke_all.redis,
                m.revoke_all.pg,
                m.rest_redis,
                m.rest_pg
            ),
        })
        .collect()
}

/// The targets for the fleet.
pub fn targets(measured: &[Measured], out: &mut Vec<Target>) {
    let find = |n: usize, cache: bool| {
        measured
            .iter()
            .find(|m| m.instances == n && m.local_cache == cache)
    };
    let mut check = |target: String, met: bool, measured: String| {
        out.push(Target {
            target,
            met,
            measured,
        })
    };
    // Commands per call are whole numbers; what the at-rest subtraction leaves is noise of a
    // few hundredths.
    const NOISE: f64 = 0.05;
    for cache in [false, true] {
        let mode = if cache { "on" } else { "off" };
        let (Some(one), Some(two), Some(four), Some(eight)) = (
            find(1, cache),
            find(2, cache),
            find(4, cache),
            find(8, cache),
        ) else {
            continue;
        };
        let (limit, limit_text) = if cache {
            (8.0 + 3.0, "N + 3".to_owned())
        } else {
            (
                one.logout.redis + 1.0,
                format!("{:.1} + 1", one.logout.redis),
            )
        };
        check(
            format!("fleet, cache {mode}: Redis commands/Logout at N=8 <= {limit_text}"),
            eight.logout.redis <= limit + NOISE,
            format!("{:.2} (N=1: {:.2})", eight.logout.redis, one.logout.redis),
        );
        check(
            format!("fleet, cache {mode}: PostgreSQL queries/Logout at N=8 <= N=1 + 0.5"),
            eight.logout.pg <= one.logout.pg + 0.5 + NOISE,
            format!("{:.2} (N=1: {:.2})", eight.logout.pg, one.logout.pg),
        );
        check(
            format!("fleet, cache {mode}: Logout p99 at N=8 <= 1.5 x N=2"),
            eight.logout_p99_ms <= 1.5 * two.logout_p99_ms,
            format!(
                "{:.2} ms (N=2: {:.2} ms)",
                eight.logout_p99_ms, two.logout_p99_ms
            ),
        );
        // From 4 to 8 instances: the error of the subtracted background (the rest of the
        // benchmark's Redis traffic) weighs on a fleet of one in full.
        check(
            format!("fleet, cache {mode}: at-rest cost per instance does not grow with N (4 -> 8)"),
            eight.rest_redis <= four.rest_redis * 1.25 + 0.5
                && eight.rest_pg <= four.rest_pg * 1.25 + 0.5,
            format!(
                "Redis {:.1}/s, PostgreSQL {:.1}/s (N=4: {:.1}/s, {:.1}/s)",
                eight.rest_redis, eight.rest_pg, four.rest_redis, four.rest_pg
            ),
        );
    }
}
