//! "Revocation is never lost": across instances, against racing cache fills, through Redis
//! outages and data loss; and ended sessions are purged.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use fred::interfaces::{ClientLike, KeysInterface};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

use crate::{
    both_modes,
    helpers::PauseOnce,
    helpers::{
        Mode, PASSWORD, TestApp, assert_code, eventually, redis_client, session_key, spawn_sharing,
        spawn_with, spawn_with_fill_hook, test_settings,
    },
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

both_modes!(
    every_kind_of_revocation_is_seen_by_every_instance,
    ended_sessions_are_purged_after_retention
);

/// Revokes `victim` (a session of the user owning `owner`) in one of the four ways.
async fn revoke(app: &TestApp, how: usize, owner: &str, victim: &str, victim_id: &str) {
    match how {
        0 => app.logout(victim).await.unwrap(),
        1 => app.revoke_session(owner, victim_id).await.unwrap(),
        2 => assert!(app.revoke_all(owner, false).await.unwrap() >= 1),
        _ => assert!(
            app.change_password(owner, PASSWORD, "another fine passphrase")
                .await
                .unwrap()
                >= 1
        ),
    }
}

async fn every_kind_of_revocation_is_seen_by_every_instance(mode: Mode) {
    let a = spawn_with(test_settings(mode)).await;
    let b = spawn_sharing(&a, |_| {}).await;
    for how in 0..4 {
        let (email, reg) = a.register().await;
        let victim = a.login(&email, PASSWORD).await.unwrap();
        let victim_id = victim.session.unwrap().session_id;
        // Both instances have validated (and, with Redis, cached) the session.
        for app in [&a, &b] {
            let cached = app.served_from_redis(&victim.session_token).await;
            assert_eq!(cached, mode != Mode::NoRedis, "served from the cache");
        }

        revoke(
            &a,
            how,
            &reg.session_token,
            &victim.session_token,
            &victim_id,
        )
        .await;
        let before = b.queries();
        assert_code(
            b.validate(&victim.session_token).await,
            Code::Unauthenticated,
        );
        if mode != Mode::NoRedis {
            assert_eq!(
                b.queries(),
                before,
                "the other instance was told by the tombstone"
            );
        }
        assert_code(
            a.validate(&victim.session_token).await,
            Code::Unauthenticated,
        );
    }
}

/// A validation that read the session from PostgreSQL before a revocation, and writes to Redis
/// after it, must not bring it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_racing_a_revocation_cannot_resurrect_it() {
    let pause = PauseOnce::default();
    let app = spawn_with_fill_hook(test_settings(Mode::Redis), pause.hook()).await;
    let redis = redis_client(app.settings.redis.url.expose_secret()).await;
    let (_, reg) = app.register().await;
    let key = session_key(&app, &reg.session_token);
    // Not cached: the next validation reads PostgreSQL and fills.
    let _: i64 = redis.del(&key).await.unwrap();

    pause.arm();
    let token = reg.session_token.clone();
    let auth = app.auth.clone();
    let racing = tokio::spawn(async move {
        let mut auth = auth;
        auth.validate_session(authd::proto::authd::v1::ValidateSessionRequest {
            session_token: token,
            ..Default::default()
        })
        .await
    });
    pause.reached().await;
    app.logout(&reg.session_token).await.unwrap();
    pause.resume();
    // It read the session before the logout, so its own answer may be OK...
    racing.await.unwrap().ok();
    // ...but nothing it wrote may outlive the logout.
    let cached: Option<String> = redis.get(&key).await.unwrap();
    assert!(
        cached.as_deref().is_some_and(|v| v.ends_with("|R")),
        "a tombstone: {cached:?}"
    );
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
}

/// Many validations race each revocation: none that starts after the revocation returned may
/// accept the token, on either instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_validations_never_accept_a_revoked_session() {
    let a = spawn_with(test_settings(Mode::Redis)).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let redis = redis_client(a.settings.redis.url.expose_secret()).await;
    let accepted_after = Arc::new(AtomicUsize::new(0));
    for round in 0..15 {
        let (_, reg) = a.register().await;
        let token = reg.session_token.clone();
        let _: i64 = redis.del(session_key(&a, &token)).await.unwrap();
        let revoked = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for worker in 0..8 {
            let client = if worker % 2 == 0 {
                a.auth.clone()
            } else {
                b.auth.clone()
            };
            let (token, revoked, stop, accepted_after) = (
                token.clone(),
                revoked.clone(),
                stop.clone(),
                accepted_after.clone(),
            );
            workers.push(tokio::spawn(async move {
                let mut client = client;
                while !stop.load(Ordering::SeqCst) {
                    let after = revoked.load(Ordering::SeqCst);
                    let answer = client
                        .validate_session(authd::proto::authd::v1::ValidateSessionRequest {
                            session_token: token.clone(),
                            ..Default::default()
                        })
                        .await;
                    if after && answer.is_ok() {
                        accepted_after.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(5 + round)).await;
        a.logout(&token).await.unwrap();
        revoked.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(30)).await;
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            w.await.unwrap();
        }
        assert_code(b.validate(&token).await, Code::Unauthenticated);
    }
    assert_eq!(accepted_after.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_all_redis_data_logs_nobody_out_and_revives_nothing() {
    let redis_server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis_server.url());
    // Redis' own refill is the subject here (the in-process cache would answer from memory; its
    // FLUSHALL case is in local_cache.rs).
    settings.local_cache.enabled = false;
    let app = spawn_with(settings).await;
    let redis = redis_client(&redis_server.url()).await;
    let (email, reg) = app.register().await;
    let revoked = app.login(&email, PASSWORD).await.unwrap().session_token;
    app.validate(&reg.session_token).await.unwrap();
    app.logout(&revoked).await.unwrap();

    let _: () = redis.flushall(false).await.unwrap();
    let session = app.validate(&reg.session_token).await.unwrap();
    assert_eq!(session.user_id, reg.user_id);
    assert_code(app.validate(&revoked).await, Code::Unauthenticated);
    // The cache refilled: validations no longer reach PostgreSQL.
    let before = app.queries();
    app.validate(&reg.session_token).await.unwrap();
    assert_eq!(app.queries(), before);
    let exists: i64 = redis
        .exists(session_key(&app, &reg.session_token))
        .await
        .unwrap();
    assert_eq!(exists, 1);
}

/// Revocations made while this instance cannot reach Redis (whose copies survive): the calls
/// succeed, and the stale copies are never served afterwards, by this instance or another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_while_redis_is_unreachable_are_never_undone() {
    let redis_server = RedisServer::start().await;
    let link = Proxy::start(redis_server.addr()).await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(format!("redis://{}", link.addr));
    let app = spawn_with(settings).await;
    let other = spawn_sharing(&app, |s| {
        s.redis.url = SecretString::from(redis_server.url());
    })
    .await;
    let (email, reg) = app.register().await;
    let (changer_email, changer) = app.register().await;
    let mut victims = Vec::new();
    for _ in 0..3 {
        let t = app.login(&email, PASSWORD).await.unwrap().session_token;
        victims.push(t);
    }
    victims.push(
        app.login(&changer_email, PASSWORD)
            .await
            .unwrap()
            .session_token,
    );
    for t in &victims {
        app.validate(t).await.unwrap();
        other.validate(t).await.unwrap();
    }

    link.set(Link::Refused);
    assert_eq!(app.revoke_all(&reg.session_token, false).await.unwrap(), 3);
    let changed = app
        .change_password(&changer.session_token, PASSWORD, "another fine passphrase")
        .await;
    assert_eq!(changed.unwrap(), 1);
    for t in &victims {
        assert_code(app.validate(t).await, Code::Unauthenticated);
    }
    link.set(Link::Up);
    eventually(
        Duration::from_secs(10),
        "this instance uses Redis again",
        || async {
            let before = app.queries();
            app.validate(&reg.session_token).await.is_ok()
                && app.validate(&reg.session_token).await.is_ok()
                && app.queries() == before
        },
    )
    .await;
    for t in &victims {
        assert_code(app.validate(t).await, Code::Unauthenticated);
        assert_code(other.validate(t).await, Code::Unauthenticated);
    }
}

async fn ended_sessions_are_purged_after_retention(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.session.retention = Duration::from_millis(500);
    settings.session.purge_interval = Duration::from_millis(200);
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;
    let ended = app.login(&email, PASSWORD).await.unwrap();
    let ended_id: uuid::Uuid = ended.session.unwrap().session_id.parse().unwrap();
    app.logout(&ended.session_token).await.unwrap();

    let url = app.settings.database.url.expose_secret().to_owned();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the revoked session row is purged",
        || {
            let pool = pool.clone();
            async move {
                let left: i64 = sqlx::query_scalar("select count(*) from sessions where id = $1")
                    .bind(ended_id)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                left == 0
            }
        },
    )
    .await;
    // The live session is untouched, and still valid.
    app.validate(&reg.session_token).await.unwrap();
    let invalidations: i64 = sqlx::query_scalar("select count(*) from session_invalidations")
        .fetch_one(&pool)
        .await
        .unwrap();
    // The revocation stays in the log until the session would have expired anyway: other
    // caches (instances on another Redis or key prefix) may still need it.
    assert_eq!(invalidations, 1);
}

/// Until the queue of failed invalidations has been re-applied, an instance that saw Redis fail
/// does not trust what Redis holds (here nobody re-applies it for an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_failure_cached_copies_wait_for_the_queue() {
    let redis_server = RedisServer::start().await;
    let link = Proxy::start(redis_server.addr()).await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(format!("redis://{}", link.addr));
    settings.session.invalidation_interval = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    app.validate(&reg.session_token).await.unwrap();

    link.set(Link::Refused);
    app.logout(&reg.session_token).await.unwrap();
    link.set(Link::Up);
    let redis = redis_client(&redis_server.url()).await;
    let stale: Option<String> = redis
        .get(session_key(&app, &reg.session_token))
        .await
        .unwrap();
    assert!(
        stale.is_some_and(|v| v.contains("|S|")),
        "the stale copy is still in Redis"
    );
    for _ in 0..20 {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
