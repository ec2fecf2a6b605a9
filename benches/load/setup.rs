//! The system under test: two authd servers in this process on 127.0.0.1:0 (one with Redis, one
//! with REDIS__ENABLED=false) sharing a fresh database, seeded with users, sessions and profiles;
//! for the local-cache scenarios, three more with LOCAL_CACHE__ENABLED=true, started later.
use std::{sync::Arc, time::Duration};

use anyhow::Context;
use authd::{
    app::Application,
    auth::{
        password::PasswordHasher,
        session::{ClientInfo, SessionPolicy},
        token,
    },
    config::{LogSettings, Settings},
    store::{Db, NewUser},
};
use fred::interfaces::ClientLike;
use secrecy::{ExposeSecret, SecretString};
use tokio::{net::TcpListener, sync::oneshot};
use tonic::transport::{Channel, Endpoint};

pub const PASSWORD: &str = "benchmark passphrase";
/// The audience `issue_jwt` asks for (the only one the settings allow).
pub const JWT_AUDIENCE: &str = "orders";

pub struct Server {
    pub db: Arc<Db>,
    pub addr: std::net::SocketAddr,
    pub settings: Settings,
    _stop: oneshot::Sender<()>,
}

pub struct User {
    pub email: String,
    pub user_id: String,
    pub token: String,
}

pub struct Env {
    pub cached: Server,
    pub pg_only: Server,
    pub users: Vec<User>,
    /// Extra sessions of the first user, for the scenarios that revoke.
    pub spare_tokens: Vec<String>,
    /// More, for `revoke_latency`.
    pub spare_local_tokens: Vec<String>,
    pub owner: User,
    /// The floods' victim (see `flood`).
    pub victim: User,
    pub redis: fred::clients::Client,
    database_url: String,
    db_name: String,
    prefix: String,
}

/// The usual settings (defaults, then `SECTION__KEY` environment variables, so any setting can be
/// benchmarked), with the benchmark's own database, key prefix and no rate limits.
pub fn settings(redis: bool, db_name: &str, prefix: &str) -> Settings {
    let mut s = Settings::load(None).expect("valid settings in the environment");
    s.grpc.addr = "127.0.0.1:0".parse().expect("a socket address");
    let url = s.database.url.expose_secret().to_owned();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    s.database.url = SecretString::from(format!("{base}/{db_name}"));
    s.redis.enabled = redis;
    s.metrics.addr = "127.0.0.1:0".parse().expect("a socket address");
    s.redis.key_prefix = prefix.to_owned();
    // The benchmark logs in the same users over and over: no limit should get in the way.
    s.rate_limit.login_per_email = 0;
    s.rate_limit.login_per_ip = 0;
    // Envoy's external authorization (the `ext_authz` scenarios), and JWTs (`issue_jwt`).
    s.ext_authz.enabled = true;
    s.jwt.enabled = true;
    s.jwt.audiences = vec![JWT_AUDIENCE.into()];
    s.log = LogSettings {
        level: std::env::var("BENCH_LOG").unwrap_or_else(|_| "off".into()),
        ..LogSettings::default()
    };
    s
}

pub async fn serve(settings: Settings) -> anyhow::Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let app = Application::build_with_listener(settings.clone(), listener).await?;
    let (addr, db) = (app.local_addr(), app.db());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));
    Ok(Server {
        db,
        addr,
        settings,
        _stop: stop,
    })
}

impl Server {
    /// `n` HTTP/2 connections to this server.
    pub async fn channels(&self, n: usize) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(n);
        for _ in 0..n {
            let endpoint = Endpoint::from_shared(format!("http://{}", self.addr))?
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(10));
            channels.push(endpoint.connect().await?);
        }
        Ok(channels)
    }
}

impl Env {
    pub async fn start(users: usize, spare: usize) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (db_name, prefix) = (format!("authd_bench_{id}"), format!("authd-bench:{id}:"));
        let cached = serve(settings(true, &db_name, &prefix)).await?;
        let pg_only = serve(settings(false, &db_name, &prefix)).await?;
        let (config, _) = authd::cache::fred_config(&cached.settings.redis)
            .map_err(|e| anyhow::anyhow!("{} {}", e.setting, e.reason))?;
        let redis = fred::prelude::Builder::from_config(config).build()?;
        redis.init().await.context("the benchmark needs Redis")?;
        let mut users = seed(&cached, users + 2).await?;
        // A user of its own, never logged in by the other scenarios (a login would evict them).
        let owner = users.pop().context("at least one user")?;
        // The floods' victim logs in over and over: past the session cap, each Login evicts one
        // of its sessions, so it is none of the users whose sessions the scenarios validate.
        let victim = users.pop().context("a victim")?;
        let spare_tokens = seed_sessions(&cached, &owner, spare).await?;
        let spare_local_tokens = seed_sessions(&cached, &owner, spare).await?;
        Ok(Self {
            database_url: cached.settings.database.url.expose_secret().to_owned(),
            cached,
            pg_only,
            users,
            spare_tokens,
            spare_local_tokens,
            owner,
            victim,
            redis,
            db_name,
            prefix,
        })
    }

    /// `count` servers with the in-process cache on (each keeping up to `max_entries` per kind),
    /// on the same database and Redis, once all hold a lease.
    pub async fn start_local(&self, count: usize, max_entries: u64) -> anyhow::Result<Vec<Server>> {
        let held = |db: Arc<Db>| async move { db.leases().held().await.unwrap_or(0) };
        let expected = held(self.cached.db.clone()).await + count as i64;
        let mut servers = Vec::with_capacity(count);
        for _ in 0..count {
            let mut settings = settings(true, &self.db_name, &self.prefix);
            settings.local_cache.enabled = true;
            settings.local_cache.max_entries = max_entries;
            servers.push(serve(settings).await?);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while held(self.cached.db.clone()).await < expected {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the local-cache servers did not take their leases"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(servers)
    }

    /// `count` more sessions of the owner (not among the users the other scenarios read).
    pub async fn more_sessions(&self, count: usize) -> anyhow::Result<Vec<String>> {
        seed_sessions(&self.cached, &self.owner, count).await
    }

    /// Commands Redis has processed so far (INFO stats; summed over the primaries of a
    /// cluster), not counting this query itself.
    pub async fn redis_commands(&self) -> anyhow::Result<u64> {
        use fred::interfaces::ClusterInterface;
        let count = |info: String| {
            info.lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .context("INFO stats has total_commands_processed")
        };
        let Some(state) = self.redis.cached_cluster_state() else {
            return count(self.redis.info(Some(fred::types::InfoKind::Stats)).await?);
        };
        let mut total = 0;
        for node in state.unique_primary_nodes() {
            let info: String = self
                .redis
                .with_cluster_node(node)
                .info(Some(fred::types::InfoKind::Stats))
                .await?;
            total += count(info)?;
        }
        Ok(total)
    }

    /// Drops the benchmark's database.
    pub async fn cleanup(self) {
        drop(self.cached);
        drop(self.pg_only);
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop_database(&self.database_url).await;
    }
}

pub use crate::database::drop_database;

/// `count` more sessions of `user`, written straight to the store in one statement.
pub async fn seed_sessions(
    server: &Server,
    user: &User,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let url = server.settings.database.url.expose_secret();
    crate::seeded::seed(&server.db, url, user.user_id.parse()?, count).await
}

/// Users with one session each, written straight to the store (registering through the API
/// would spend ~20 ms of CPU per user on password hashing).
pub async fn seed(server: &Server, count: usize) -> anyhow::Result<Vec<User>> {
    let hasher = PasswordHasher::new(&server.settings.auth, authd::metrics::Metrics::new())?;
    let phc = hasher.hash(SecretString::from(PASSWORD)).await?;
    let policy = SessionPolicy::from(&server.settings.session);
    let key = crate::seeded::minting_key(&server.db).await?;
    let mut users = Vec::with_capacity(count);
    for i in 0..count {
        let email = format!("user{i}@bench.example");
        let user_id = uuid::Uuid::now_v7();
        let record = policy.start(user_id, ClientInfo::default(), chrono::Utc::now());
        let (token, hash) = token::generate(&key);
        let user = NewUser {
            id: user_id,
            email: &email,
            email_normalized: &email,
            password_hash: &phc,
            display_name: &format!("Bench User {i}"),
        };
        server
            .db
            .users()
            .create_with_session(&user, &record, hash.as_bytes(), key.id)
            .await?;
        users.push(User {
            email,
            user_id: user_id.to_string(),
            token,
        });
    }
    Ok(users)
}
