//! The outbox logs: rolling changes of the Redis prefix or URL, a backlog, an instance that cannot read them, purging, the previous release beside this one.
use super::*;

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
