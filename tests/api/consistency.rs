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

async fn pg(app: &TestApp) -> sqlx::PgPool {
    sqlx::PgPool::connect(app.settings.database.url.expose_secret())
        .await
        .unwrap()
}

/// An app on a Redis server of the test's own, whose session fills pause when armed.
async fn app_on(server: &RedisServer, pause: &PauseOnce) -> TestApp {
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    spawn_with_fill_hook(settings, pause.hook()).await
}

/// Starts a validation of `token` whose fill pauses between its PostgreSQL read and its Redis
/// write; returns once it has paused.
async fn paused_validation(
    app: &TestApp,
    pause: &PauseOnce,
    token: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<pb::ValidateSessionResponse>, tonic::Status>> {
    pause.arm();
    let mut auth = app.auth.clone();
    let token = token.to_owned();
    let racing = tokio::spawn(async move {
        auth.validate_session(pb::ValidateSessionRequest {
            session_token: token,
        })
        .await
    });
    pause.reached().await;
    racing
}

/// FLUSHALL between a fill's PostgreSQL read and its Redis write takes the tombstone of a logout
/// made meanwhile: the fill must still not write the copy it read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_during_a_session_fill_revives_nothing() {
    let server = RedisServer::start().await;
    let pause = PauseOnce::default();
    let app = app_on(&server, &pause).await;
    let redis = redis_client(&server.url()).await;
    let (_, reg) = app.register().await;
    let _: i64 = redis
        .del(session_key(&app, &reg.session_token))
        .await
        .unwrap();
    let racing = paused_validation(&app, &pause, &reg.session_token).await;
    app.logout(&reg.session_token).await.unwrap();
    let _: () = redis.flushall(false).await.unwrap();
    pause.resume();
    racing.await.unwrap().ok();
    let cached: Option<String> = redis
        .get(session_key(&app, &reg.session_token))
        .await
        .unwrap();
    assert!(
        cached.as_deref().is_none_or(|v| !v.contains("|S|")),
        "{cached:?}"
    );
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
}

/// The same with Redis restarted (empty) while the fill is paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_session_fill_revives_nothing() {
    let mut server = RedisServer::start().await;
    let pause = PauseOnce::default();
    let app = app_on(&server, &pause).await;
    let (_, reg) = app.register().await;
    let redis = redis_client(&server.url()).await;
    let _: i64 = redis
        .del(session_key(&app, &reg.session_token))
        .await
        .unwrap();
    let racing = paused_validation(&app, &pause, &reg.session_token).await;
    app.logout(&reg.session_token).await.unwrap();
    server.restart().await;
    pause.resume();
    racing.await.unwrap().ok();
    for _ in 0..10 {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let redis = redis_client(&server.url()).await;
    let cached: Option<String> = redis
        .get(session_key(&app, &reg.session_token))
        .await
        .unwrap();
    assert!(
        cached.as_deref().is_none_or(|v| !v.contains("|S|")),
        "{cached:?}"
    );
}

/// A profile read whose PostgreSQL read (version 1) began before an update returned version 2,
/// Redis flushed (or restarted) meanwhile, and a read that began after the update: neither that
/// read nor any later one gets version 1.
async fn profile_fill_across_data_loss(restart: bool) {
    let mut server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    let pause = PauseOnce::default();
    let hooks = Hooks {
        profile_fill: Some(pause.hook()),
        ..Hooks::default()
    };
    let app = spawn_with_hooks(settings, hooks).await;
    let (_, reg) = app.register().await;
    pause.arm();
    let leader = {
        let mut c = app.profiles.clone();
        let user_id = reg.user_id.clone();
        tokio::spawn(async move { c.get_profile(pb::GetProfileRequest { user_id }).await })
    };
    pause.reached().await;
    let v2 = app
        .update_profile(&reg.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    if restart {
        server.restart().await;
    } else {
        let redis = redis_client(&server.url()).await;
        let _: () = redis.flushall(false).await.unwrap();
    }
    let follower = {
        let mut c = app.profiles.clone();
        let user_id = reg.user_id.clone();
        tokio::spawn(async move { c.get_profile(pb::GetProfileRequest { user_id }).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    pause.resume();
    assert_eq!(
        leader
            .await
            .unwrap()
            .unwrap()
            .into_inner()
            .profile
            .unwrap()
            .version,
        1
    );
    let followed = follower
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .profile
        .unwrap();
    assert_eq!(
        followed.version, v2.version,
        "a read that began after the update"
    );
    for _ in 0..10 {
        assert_eq!(
            app.get_profile(&reg.user_id).await.unwrap().version,
            v2.version
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_during_a_profile_fill_and_its_single_flight_goes_back_to_nothing() {
    profile_fill_across_data_loss(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_during_a_profile_fill_and_its_single_flight_goes_back_to_nothing() {
    profile_fill_across_data_loss(true).await;
}

/// Redis restarted from a snapshot saved before a logout and before an update: the snapshot
/// holds the live copy and version 1, and neither is ever served again, on either instance —
/// while the cache is used again for what is still valid. `hold`: the generation job of the first
/// instance is held before it reacts to the restart, so its reads of the restored server are
/// judged by the reconnection alone.
async fn restore_from_an_older_snapshot(hold: bool) {
    let mut server = RedisServer::start_persistent().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    let pause = PauseOnce::default();
    let hooks = Hooks {
        establish: Some(pause.establish_hook()),
        ..Hooks::default()
    };
    let a = spawn_with_hooks(settings, hooks).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (email, keeper) = a.register().await;
    let victim = a.login(&email, PASSWORD).await.unwrap().session_token;
    for app in [&a, &b] {
        app.validate(&victim).await.unwrap();
        assert_eq!(app.get_profile(&keeper.user_id).await.unwrap().version, 1);
    }
    let redis = redis_client(&server.url()).await;
    // The copy is written once the fill's reply is sent: the snapshot is taken with it in.
    let key = session_key(&a, &victim);
    eventually(Duration::from_secs(5), "the copy in Redis", || async {
        let copy: Option<String> = redis.get(&key).await.unwrap();
        copy.is_some_and(|v| v.contains("|S|"))
    })
    .await;
    let _: () = redis
        .custom(fred::cmd!("SAVE"), Vec::<String>::new())
        .await
        .unwrap();
    a.logout(&victim).await.unwrap();
    let v2 = a
        .update_profile(&keeper.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    if hold {
        pause.arm();
    }
    server.restart().await;
    let restored = redis_client(&server.url()).await;
    let copy: Option<String> = restored.get(session_key(&a, &victim)).await.unwrap();
    assert!(
        copy.is_some_and(|v| v.contains("|S|")),
        "the snapshot holds the old copy"
    );
    if hold {
        pause.reached().await;
    }
    let apps: &[&TestApp] = if hold { &[&a] } else { &[&a, &b] };
    let gets =
        |calls: std::collections::HashMap<String, u64>| calls.get("get").copied().unwrap_or(0);
    let gets_before = gets(redis_command_calls(&restored).await);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        for app in apps {
            assert_code(app.validate(&victim).await, Code::Unauthenticated);
            assert_eq!(
                app.get_profile(&keeper.user_id).await.unwrap().version,
                v2.version
            );
            app.validate(&keeper.session_token).await.unwrap();
        }
    }
    assert!(
        gets(redis_command_calls(&restored).await) > gets_before + 10,
        "the reads reached the restored server"
    );
    pause.resume();
    for app in [&a, &b] {
        eventually(Duration::from_secs(10), "the cache is used again", || {
            app.served_from_redis(&keeper.session_token)
        })
        .await;
        assert_code(app.validate(&victim).await, Code::Unauthenticated);
        assert_eq!(
            app.get_profile(&keeper.user_id).await.unwrap().version,
            v2.version
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_an_older_snapshot_brings_nothing_back() {
    restore_from_an_older_snapshot(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_is_caught_by_the_reconnection_before_the_generation_job_runs() {
    restore_from_an_older_snapshot(true).await;
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

/// The bound for revocations that reached no cache on the revoking instance: the follower's
/// interval plus a command timeout (1 s + 250 ms here), with slack.
const LOG_BOUND: Duration = Duration::from_millis(1600);

/// Settings whose outbox follower runs every second, as by default.
fn default_interval(mode: Mode) -> authd::config::Settings {
    let mut settings = test_settings(mode);
    settings.session.invalidation_interval = Duration::from_secs(1);
    settings
}

/// A rolling change of `REDIS__KEY_PREFIX`: instances on the old and the new prefix share the
/// database, and each cache gets every revocation (the log is followed per namespace, never
/// emptied by the first cache that applied a row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_change_of_the_key_prefix_serves_nothing_revoked() {
    let a = spawn_with(default_interval(Mode::Redis)).await;
    let b = spawn_sharing(&a, |s| {
        s.redis.key_prefix = format!("{}new:", s.redis.key_prefix)
    })
    .await;
    let (email, _) = a.register().await;
    for (revoker, other) in [(&a, &b), (&b, &a)] {
        let victim = a.login(&email, PASSWORD).await.unwrap().session_token;
        other.validate(&victim).await.unwrap();
        other.validate(&victim).await.unwrap();
        revoker.logout(&victim).await.unwrap();
        tokio::time::sleep(LOG_BOUND).await;
        assert_code(other.validate(&victim).await, Code::Unauthenticated);
    }
}

/// A rolling change of `REDIS__URL` to another Redis: profile versions reach both caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_change_of_the_redis_url_serves_no_older_profile() {
    let other = RedisServer::start().await;
    let a = spawn_with(default_interval(Mode::Redis)).await;
    let b = spawn_sharing(&a, |s| s.redis.url = SecretString::from(other.url())).await;
    let (_, reg) = a.register().await;
    for app in [&a, &b] {
        assert_eq!(app.get_profile(&reg.user_id).await.unwrap().version, 1);
    }
    let v2 = a
        .update_profile(&reg.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    tokio::time::sleep(LOG_BOUND).await;
    assert_eq!(
        b.get_profile(&reg.user_id).await.unwrap().version,
        v2.version
    );
}

/// A backlog in the log (a fleet that ran without Redis for a while) does not delay a new
/// revocation beyond the bound: each pass reads everything logged since its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_in_the_log_keeps_the_bound() {
    let with = spawn_with(default_interval(Mode::Redis)).await;
    let without = spawn_sharing(&with, |s| s.redis.enabled = false).await;
    sqlx::query(
        "insert into session_invalidations (token_hash, user_id, expires_at)
         select sha256(g::text::bytea), gen_random_uuid(), now() + interval '1 day'
         from generate_series(1, 4000) g",
    )
    .execute(&pg(&with).await)
    .await
    .unwrap();
    let (email, _) = with.register().await;
    let victim = with.login(&email, PASSWORD).await.unwrap().session_token;
    with.validate(&victim).await.unwrap();
    without.logout(&victim).await.unwrap();
    tokio::time::sleep(LOG_BOUND).await;
    for _ in 0..5 {
        assert_code(with.validate(&victim).await, Code::Unauthenticated);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An instance that cannot read the log (PostgreSQL out of its reach, Redis fine) stops serving
/// cached copies within the bound: a revocation made meanwhile without Redis is never accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_cannot_read_the_log_stops_serving_copies() {
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = default_interval(Mode::Redis);
    let direct = settings.database.url.expose_secret().to_owned();
    settings.database.url =
        SecretString::from(direct.replace("127.0.0.1:5432", &postgres.addr.to_string()));
    let cut = spawn_with(settings).await;
    let revoker = spawn_sharing(&cut, |s| {
        s.redis.enabled = false;
        s.database.url = SecretString::from(direct.clone());
    })
    .await;
    let (email, _) = revoker.register().await;
    let victim = revoker.login(&email, PASSWORD).await.unwrap().session_token;
    cut.validate(&victim).await.unwrap();
    postgres.set(Link::Refused);
    revoker.logout(&victim).await.unwrap();
    tokio::time::sleep(LOG_BOUND).await;
    for _ in 0..5 {
        assert!(
            cut.validate(&victim).await.is_err(),
            "a revoked token accepted"
        );
    }
    postgres.set(Link::Up);
    eventually(Duration::from_secs(10), "PostgreSQL is back", || async {
        cut.validate(&victim)
            .await
            .is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
}

/// A failed read (here Redis paused past the command timeout) is not a lost tombstone: the
/// cache keeps being used right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_read_does_not_turn_the_cache_off() {
    let server = RedisServer::start().await;
    let mut settings = default_interval(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    app.validate(&reg.session_token).await.unwrap();
    let admin = redis_client(&server.url()).await;
    let _: () = admin
        .custom(fred::cmd!("CLIENT"), vec!["PAUSE", "400", "ALL"])
        .await
        .unwrap();
    app.validate(&reg.session_token).await.unwrap(); // times out; served by PostgreSQL
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = app.queries();
    for _ in 0..20 {
        app.validate(&reg.session_token).await.unwrap();
    }
    assert_eq!(app.queries(), before, "served from Redis");
}

/// Unknown tokens (well-formed, random) leave nothing in Redis: the lease a miss takes is given
/// back when PostgreSQL knows no such session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_leave_no_keys_behind() {
    let server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    let app = spawn_with(settings).await;
    let redis = redis_client(&server.url()).await;
    let keys = || async {
        let n: i64 = redis
            .custom(fred::cmd!("DBSIZE"), Vec::<String>::new())
            .await
            .unwrap();
        n
    };
    let before = keys().await;
    for _ in 0..200 {
        let token = crate::helpers::made_up_token();
        assert_code(app.validate(&token).await, Code::Unauthenticated);
    }
    assert_eq!(keys().await, before);
}

/// A rolling upgrade from the previous release: its instances read `…:v1:` keys and delete log
/// rows they applied. This release writes v1 tombstones and profile floors too, and the
/// database keeps the rows those instances delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_release_can_run_beside_this_one() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let redis = redis_client(app.settings.redis.url.expose_secret()).await;
    let (email, reg) = app.register().await;
    let victim = app.login(&email, PASSWORD).await.unwrap().session_token;
    app.logout(&victim).await.unwrap();
    let hash = authd::auth::token::TokenHash::of_token(&victim).unwrap();
    let prefix = &app.settings.redis.key_prefix;
    let v1: Option<String> = redis
        .get(format!("{prefix}session:v1:{}", hash.to_hex()))
        .await
        .unwrap();
    assert_eq!(v1.as_deref(), Some("revoked"));
    app.update_profile(&reg.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    let v1: Option<String> = redis
        .get(format!("{prefix}profile:v1:{}", reg.user_id))
        .await
        .unwrap();
    assert_eq!(v1.as_deref(), Some("2|"), "a floor in the old format");
    let pool = pg(&app).await;
    // What the previous release does after applying a row.
    sqlx::query("delete from session_invalidations")
        .execute(&pool)
        .await
        .unwrap();
    let kept: i64 = sqlx::query_scalar("select count(*) from session_invalidations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 1);
}

/// Log rows are purged once nothing they invalidate can be cached: session rows after the
/// session's expiry, profile rows after the longest profile TTL (a day at least).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_purged_once_nothing_can_need_it() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.session.purge_interval = Duration::from_millis(200);
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;
    let victim = app.login(&email, PASSWORD).await.unwrap().session_token;
    app.logout(&victim).await.unwrap();
    for i in 0..3 {
        app.update_profile(&reg.session_token, bio(&format!("v{i}")), &["bio"], 0)
            .await
            .unwrap();
    }
    let pool = pg(&app).await;
    let count = |table: &'static str| {
        let pool = pool.clone();
        async move {
            let n: i64 =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("select count(*) from {table}")))
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            n
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count("session_invalidations").await, 1);
    assert_eq!(count("profile_invalidations").await, 3);
    // Age them past their usefulness.
    sqlx::query("update session_invalidations set expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("update profile_invalidations set created_at = now() - interval '2 days'")
        .execute(&pool)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "the log is purged", || async {
        count("session_invalidations").await == 0 && count("profile_invalidations").await == 0
    })
    .await;
}

/// Starting over: the database dropped and created again while Redis keeps what the old one
/// cached. Before, generations were numbered from 1 in every database, so the new database's
/// first generation had the old copies' number and served them: a token of the dropped
/// database validated. Now a new database numbers its generations from a random start: the old
/// copies are of no generation it knows, and the token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_created_again_does_not_serve_what_redis_kept_of_the_old_one() {
    let old = spawn_app(Mode::Redis).await;
    let (_, reg) = old.register().await;
    old.validate(&reg.session_token).await.unwrap();
    assert!(old.served_from_redis(&reg.session_token).await);
    let prefix = old.settings.redis.key_prefix.clone();
    drop(old); // drops its database
    let mut settings = test_settings(Mode::Redis);
    settings.redis.key_prefix = prefix;
    let new = spawn_with(settings).await;
    assert_code(
        new.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
}
