//! The two promises — once a revoking call returned OK no instance accepts the token, and once
//! UpdateProfile returned version N no read returns an older one — under everything that can make
//! Redis or the fleet forget: a mixed fleet (instances with and without Redis on one database),
//! FLUSHALL or a restart between a fill's read and its write, a restart from an old snapshot,
//! clocks and settings that differ between instances, retried revocations, a full Redis.
use std::time::{Duration, Instant};

use authd::proto::authd::v1 as pb;
use fred::interfaces::{ClientLike, KeysInterface};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

use crate::{
    helpers::{
        Hooks, Mode, PASSWORD, PauseOnce, TestApp, assert_code, eventually, redis_client,
        redis_command_calls, session_key, spawn_app, spawn_sharing, spawn_with,
        spawn_with_fill_hook, spawn_with_hooks, test_settings,
    },
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

mod data_loss;
mod log;

async fn pg(app: &TestApp) -> sqlx::PgPool {
    sqlx::PgPool::connect(app.settings.database.url.expose_secret())
        .await
        .unwrap()
}

fn bio(text: &str) -> pb::Profile {
    pb::Profile {
        bio: text.into(),
        ..pb::Profile::default()
    }
}

/// How long a revocation made without Redis may take to reach the caches of instances with
/// Redis: `SESSION__INVALIDATION_INTERVAL` (100 ms in tests) plus a command timeout, with slack.
const MIXED_FLEET_BOUND: Duration = Duration::from_millis(600);

/// Revokes `victim` in one of the four ways, on `app`.
async fn revoke(app: &TestApp, how: usize, owner: &str, victim: &pb::LoginResponse) {
    let id = &victim.session.as_ref().unwrap().session_id;
    match how {
        0 => app.logout(&victim.session_token).await.unwrap(),
        1 => app.revoke_session(owner, id).await.unwrap(),
        2 => assert_eq!(app.revoke_all(owner, false).await.unwrap(), 1),
        _ => assert_eq!(
            app.change_password(owner, PASSWORD, "another fine passphrase")
                .await
                .unwrap(),
            1
        ),
    }
}

/// A fleet mid-way through a rolling change of `REDIS__ENABLED`: revocations made by an instance
/// without Redis reach the cached copies of an instance with Redis within the stated bound, and
/// the other way round at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_never_serves_a_revoked_session() {
    let with = spawn_with(test_settings(Mode::Redis)).await;
    let without = spawn_sharing(&with, |s| s.redis.enabled = false).await;
    for (revoker, other) in [(&without, &with), (&with, &without)] {
        for how in 0..4 {
            let (email, owner) = with.register().await;
            let victim = with.login(&email, PASSWORD).await.unwrap();
            with.validate(&victim.session_token).await.unwrap();
            other.validate(&victim.session_token).await.unwrap();
            revoke(revoker, how, &owner.session_token, &victim).await;
            assert_code(
                revoker.validate(&victim.session_token).await,
                Code::Unauthenticated,
            );
            if revoker.settings.redis.enabled {
                assert_code(
                    other.validate(&victim.session_token).await,
                    Code::Unauthenticated,
                );
            } else {
                tokio::time::sleep(MIXED_FLEET_BOUND).await;
            }
            for _ in 0..3 {
                assert_code(
                    other.validate(&victim.session_token).await,
                    Code::Unauthenticated,
                );
            }
        }
    }
}

/// The same for profile updates, in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_fleet_never_serves_an_older_profile() {
    let with = spawn_with(test_settings(Mode::Redis)).await;
    let without = spawn_sharing(&with, |s| s.redis.enabled = false).await;
    let (_, reg) = with.register().await;
    with.get_profile(&reg.user_id).await.unwrap();
    let v2 = without
        .update_profile(&reg.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    assert_eq!(without.get_profile(&reg.user_id).await.unwrap().version, 2);
    tokio::time::sleep(MIXED_FLEET_BOUND).await;
    assert_eq!(
        with.get_profile(&reg.user_id).await.unwrap().version,
        v2.version
    );
    let v3 = with
        .update_profile(&reg.session_token, bio("v3"), &["bio"], 0)
        .await
        .unwrap();
    assert_eq!(
        without.get_profile(&reg.user_id).await.unwrap().version,
        v3.version
    );
    assert_eq!(
        with.get_profile(&reg.user_id).await.unwrap().version,
        v3.version
    );
}

/// Instances whose clocks are 3 s ahead and behind judge expiry exactly as PostgreSQL's clock
/// says (idle timeout 2 s).
async fn skewed_clocks_agree_on_expiry(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.session.idle_timeout = Duration::from_secs(2);
    settings.session.touch_interval = Duration::from_millis(1900);
    let a = spawn_with(settings).await;
    let ahead = spawn_sharing(&a, |s| s.test_clock_skew_ms = 3000).await;
    let behind = spawn_sharing(&a, |s| s.test_clock_skew_ms = -3000).await;
    let (_, reg) = a.register().await;
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for app in [&a, &ahead, &behind] {
        app.validate(&reg.session_token).await.unwrap();
    }
    tokio::time::sleep_until((t0 + Duration::from_millis(2300)).into()).await;
    for app in [&a, &ahead, &behind] {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
    }
}

crate::both_modes!(skewed_clocks_agree_on_expiry);

/// A rolling change of `SESSION__IDLE_TIMEOUT` (1 s here, 1 h there): ChangePassword on the
/// instance that thinks an older session expired still ends it, for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_password_ends_every_older_session_whatever_the_idle_setting() {
    let mut settings = test_settings(Mode::Redis);
    settings.session.idle_timeout = Duration::from_secs(1);
    settings.session.touch_interval = Duration::from_millis(100);
    let short = spawn_with(settings).await;
    let long = spawn_sharing(&short, |s| {
        s.session.idle_timeout = Duration::from_secs(3600);
        s.test_clock_skew_ms = -1500;
    })
    .await;
    let (email, owner) = short.register().await;
    let victim = short.login(&email, PASSWORD).await.unwrap();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        short.validate(&owner.session_token).await.unwrap();
    }
    short
        .change_password(&owner.session_token, PASSWORD, "another fine passphrase")
        .await
        .unwrap();
    assert_code(
        long.validate(&victim.session_token).await,
        Code::Unauthenticated,
    );
    assert_code(
        short.validate(&victim.session_token).await,
        Code::Unauthenticated,
    );
}

/// A validation that read the session, then waited on its row lock past the idle deadline,
/// cannot extend the session after RevokeAllSessions returned (it neither touches an expired
/// session nor escapes a revocation that does not look at expiry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_delayed_past_expiry_cannot_outlive_revoke_all() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.session.idle_timeout = Duration::from_secs(2);
    settings.session.touch_interval = Duration::from_millis(100);
    settings.database.query_timeout = Duration::from_secs(5);
    let app = spawn_with(settings).await;
    let (email, owner) = app.register().await;
    let victim = app.login(&email, PASSWORD).await.unwrap();
    let victim_id: uuid::Uuid = victim.session.unwrap().session_id.parse().unwrap();
    let t0 = Instant::now();
    let at = |ms: u64| tokio::time::sleep_until((t0 + Duration::from_millis(ms)).into());
    at(1000).await;
    app.validate(&owner.session_token).await.unwrap();
    let pool = pg(&app).await;
    at(1500).await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("select 1 from sessions where id = $1 for update")
        .bind(victim_id)
        .execute(&mut *lock)
        .await
        .unwrap();
    let racing = {
        let mut auth = app.auth.clone();
        let token = victim.session_token.clone();
        tokio::spawn(async move {
            auth.validate_session(pb::ValidateSessionRequest {
                session_token: token,
                ..Default::default()
            })
            .await
        })
    };
    at(2300).await;
    app.validate(&owner.session_token).await.unwrap();
    let revoking = {
        let app_auth = app.auth.clone();
        let token = owner.session_token.clone();
        tokio::spawn(async move {
            let mut auth = app_auth;
            auth.revoke_all_sessions(pb::RevokeAllSessionsRequest {
                session_token: token,
                include_current: false,
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.rollback().await.unwrap();
    revoking.await.unwrap().unwrap();
    racing.await.unwrap().ok();
    assert_code(
        app.validate(&victim.session_token).await,
        Code::Unauthenticated,
    );
}

/// What an instance that died between its commit and its Redis step leaves behind: the
/// revocation committed and queued, the cached copy untouched.
async fn commit_without_redis_step(app: &TestApp, token: &str) {
    let hash = authd::auth::token::TokenHash::of_token(token).unwrap();
    sqlx::query(
        "with revoked as (update sessions set revoked_at = now()
           where token_hash = $1 and revoked_at is null
           returning token_hash, user_id, absolute_expires_at)
         insert into session_invalidations (token_hash, user_id, expires_at)
         select * from revoked",
    )
    .bind(hash.as_bytes().to_vec())
    .execute(&pg(app).await)
    .await
    .unwrap();
}

/// A client retries a revocation whose first attempt committed but never wrote its tombstone
/// (nobody drains the queue for an hour here): the retry answers OK only once the tombstone is in
/// place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_revocation_writes_the_tombstone_the_first_attempt_did_not() {
    let mut settings = test_settings(Mode::Redis);
    settings.session.invalidation_interval = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (email, owner) = app.register().await;
    for how in 0..3 {
        let victim = app.login(&email, PASSWORD).await.unwrap();
        app.validate(&victim.session_token).await.unwrap();
        commit_without_redis_step(&app, &victim.session_token).await;
        app.validate(&victim.session_token)
            .await
            .expect("the stale copy is what a retry must not leave behind");
        match how {
            0 => app.logout(&victim.session_token).await.unwrap(),
            1 => {
                let id = &victim.session.as_ref().unwrap().session_id;
                app.revoke_session(&owner.session_token, id).await.unwrap();
            }
            _ => {
                app.revoke_all(&owner.session_token, false).await.unwrap();
            }
        }
        assert_code(
            app.validate(&victim.session_token).await,
            Code::Unauthenticated,
        );
    }
}

/// ChangePassword and a login at the session cap lock the same rows — the user, and the
/// caller's session, which is also the least recently used one the login evicts. Lined up so that
/// the login holds the user while ChangePassword holds the session (the order that deadlocked),
/// they must serialise instead: ChangePassword answers OK or UNAUTHENTICATED (its session was
/// evicted first), never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_password_racing_a_login_at_the_cap_never_deadlocks() {
    let mut settings = test_settings(Mode::Redis);
    settings.session.max_per_user = 2;
    settings.auth.hash_concurrency = 2;
    let app = spawn_with(settings).await;
    let (email, owner) = app.register().await;
    app.login(&email, PASSWORD).await.unwrap();
    let pool = pg(&app).await;
    let mut gate = pool.begin().await.unwrap();
    sqlx::query("select 1 from users where id = $1::uuid for update")
        .bind(&owner.user_id)
        .execute(&mut *gate)
        .await
        .unwrap();
    let login = {
        let (auth, email) = (app.auth.clone(), email.clone());
        tokio::spawn(async move {
            let mut auth = auth;
            let login = pb::LoginRequest {
                email,
                password: PASSWORD.into(),
                client: None,
            };
            auth.login(login).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let change = {
        let (auth, token) = (app.auth.clone(), owner.session_token.clone());
        tokio::spawn(async move {
            let mut auth = auth;
            auth.change_password(pb::ChangePasswordRequest {
                session_token: token,
                current_password: PASSWORD.into(),
                new_password: "another fine passphrase".into(),
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gate.rollback().await.unwrap();
    login.await.unwrap().expect("the login succeeds");
    if let Err(status) = change.await.unwrap() {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
}

/// A Redis that refuses writes (`maxmemory` reached, `noeviction`): everything works from
/// PostgreSQL, a logout made meanwhile is never undone, and once memory frees the queued
/// tombstone is applied and the cache used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_is_survived_and_drained() {
    let server = RedisServer::start_with(
        false,
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    )
    .await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    let a = spawn_with(settings).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (email, keeper) = a.register().await;
    let victim = a.login(&email, PASSWORD).await.unwrap().session_token;
    a.validate(&victim).await.unwrap();
    b.validate(&victim).await.unwrap();
    let redis = redis_client(&server.url()).await;
    let ballast = "x".repeat(512 * 1024);
    let mut keys = Vec::new();
    loop {
        let key = format!("ballast:{}", keys.len());
        let filled: Result<(), _> = redis.set(&key, ballast.as_str(), None, None, false).await;
        if filled.is_err() {
            break;
        }
        keys.push(key);
    }
    a.logout(&victim).await.unwrap();
    let (_, other) = a.register().await;
    a.validate(&other.session_token).await.unwrap();
    // The revoking instance could not write the tombstone: the others learn it from the queue
    // (the bound of a revocation made without Redis).
    tokio::time::sleep(MIXED_FLEET_BOUND).await;
    for app in [&a, &b] {
        assert_code(app.validate(&victim).await, Code::Unauthenticated);
        app.validate(&keeper.session_token).await.unwrap();
    }
    // Memory frees; the stale copy of the victim is still in Redis.
    let _: i64 = redis.del(keys).await.unwrap();
    for app in [&a, &b] {
        eventually(Duration::from_secs(10), "the cache is used again", || {
            app.served_from_redis(&keeper.session_token)
        })
        .await;
        assert_code(app.validate(&victim).await, Code::Unauthenticated);
    }
    let _ = redis.quit().await;
}
