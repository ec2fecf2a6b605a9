//! Outages: Redis down at start, killed and restarted, cut while revoking; PostgreSQL refused or
//! hanging. The service stays correct, answers fast, and recovers by itself.
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

use crate::{
    helpers::{
        Mode, PASSWORD, TestApp, assert_code, eventually, spawn_sharing, spawn_with, test_settings,
    },
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

/// With Redis down: a new session is logged out and rejected. Then Redis (re)starts: `token`
/// is served from Redis again, and the logged-out session stays rejected.
async fn logout_during_outage_then_restart(
    app: &TestApp,
    redis: &mut RedisServer,
    email: &str,
    token: &str,
) {
    let login = app.login(email, PASSWORD).await.unwrap();
    app.logout(&login.session_token).await.unwrap();
    assert_code(
        app.validate(&login.session_token).await,
        Code::Unauthenticated,
    );
    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "validation served from Redis",
        || app.served_from_redis(token),
    )
    .await;
    assert_code(
        app.validate(&login.session_token).await,
        Code::Unauthenticated,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_at_start_serves_from_postgres() {
    let mut redis = RedisServer::start().await;
    redis.kill();
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis.url());
    let app = spawn_with(settings).await;

    let (email, reg) = app.register().await;
    app.validate(&reg.session_token).await.unwrap();
    // Redis appears: the cache is used from then on, without a restart.
    logout_during_outage_then_restart(&app, &mut redis, &email, &reg.session_token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_test_then_used_again_after_restart() {
    let mut redis = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis.url());
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;
    assert!(app.served_from_redis(&reg.session_token).await);

    redis.kill();
    let before = app.queries();
    let session = app.validate(&reg.session_token).await.unwrap();
    assert_eq!(session.user_id, reg.user_id);
    assert!(
        app.queries() > before,
        "served by PostgreSQL while Redis is down"
    );
    // Restarted empty: nobody is logged out, the revoked session stays revoked, the cache refills.
    logout_during_outage_then_restart(&app, &mut redis, &email, &reg.session_token).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_while_redis_is_cut_off_is_never_undone_by_the_cache() {
    let redis = RedisServer::start().await;
    let link = Proxy::start(redis.addr()).await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(format!("redis://{}", link.addr));
    let app = spawn_with(settings).await;
    // A second instance that keeps its Redis connection throughout.
    let other = spawn_sharing(&app, |s| {
        s.redis.url = SecretString::from(redis.url());
    })
    .await;

    let (_, reg) = app.register().await;
    assert!(app.served_from_redis(&reg.session_token).await);
    assert!(other.served_from_redis(&reg.session_token).await);

    // The cached copy survives in Redis, but this instance cannot reach it to bury it.
    link.set(Link::Refused);
    app.logout(&reg.session_token).await.unwrap();
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
    // The other instance applies the queued revocation within the drain interval.
    eventually(
        Duration::from_secs(2),
        "the other instance rejects the token",
        || async { other.validate(&reg.session_token).await.is_err() },
    )
    .await;

    link.set(Link::Up);
    for _ in 0..20 {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
        assert_code(
            other.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_unavailable_fast_and_recovers_with_redis() {
    postgres_outage(Mode::Redis).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_answers_unavailable_fast_and_recovers_without_redis() {
    postgres_outage(Mode::NoRedis).await
}

async fn postgres_outage(mode: Mode) {
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = test_settings(mode);
    let url = settings.database.url.expose_secret().to_owned();
    let proxied = url.replace("127.0.0.1:5432", &postgres.addr.to_string());
    assert_ne!(
        url, proxied,
        "TEST_DATABASE_URL must point at 127.0.0.1:5432"
    );
    settings.database.url = SecretString::from(proxied);
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;

    for state in [Link::Refused, Link::Blackhole] {
        postgres.set(state);
        // The test channel gives up after 10 s: a hang would surface as CANCELLED, not this.
        let status = assert_code(app.login(&email, PASSWORD).await, Code::Unavailable);
        assert!(!status.message().contains("sql"), "{status:?}");
        // A token authd never minted needs no PostgreSQL to be refused.
        let unknown = crate::helpers::made_up_token();
        assert_code(app.validate(&unknown).await, Code::Unauthenticated);
        if mode != Mode::NoRedis {
            // A cached copy is served only while authd can read what was revoked meanwhile:
            // once `SESSION__INVALIDATION_INTERVAL` + `REDIS__COMMAND_TIMEOUT` have passed
            // without reading it, validations need PostgreSQL too.
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_code(app.validate(&reg.session_token).await, Code::Unavailable);
        }
        postgres.set(Link::Up);
        eventually(Duration::from_secs(10), "login works again", || async {
            app.login(&email, PASSWORD).await.is_ok()
        })
        .await;
    }
}
