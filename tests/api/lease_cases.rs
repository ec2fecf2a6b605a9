//! The in-process cache's cases of the review "Revocation by construction" (besides the retries of
//! `retry_safety`): a login's eviction at the session cap waits like a revocation, memory is
//! trusted no longer than README's bound for Redis copies, and the fleet holds one lease length.
use std::{sync::Arc, time::Duration};

use secrecy::ExposeSecret;
use tonic::Code;

use crate::{
    helpers::*,
    proxy::{Link, Proxy},
    retry_safety::{db_url_via, pg_target},
};

async fn two_holders(a: &TestApp) {
    eventually(Duration::from_secs(15), "two lease holders", || async {
        a.db.leases().held().await.unwrap() == 2
    })
    .await;
}

/// `app` serves `token` from its memory.
async fn keep_in_memory(app: &TestApp, token: &str) {
    let hits = "authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
    app.validate(token).await.unwrap();
    let before = app.metric(hits).await;
    app.validate(token).await.unwrap();
    assert_eq!(app.metric(hits).await, before + 1.0, "served from memory");
}

/// Before: a login at the cap only announced its eviction, and returned while B (whose Redis
/// replies arrive 150 ms late) still accepted the evicted session from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_at_the_cap_returns_once_no_instance_accepts_the_evicted_session() {
    let mut settings = test_settings(Mode::Redis);
    settings.session.max_per_user = 1;
    let a = spawn_with(settings).await;
    let slow = Proxy::start(redis_addr()).await;
    slow.set(Link::Delayed(Duration::from_millis(150)));
    let b = spawn_sharing(&a, |s| {
        s.redis.url = format!("redis://{}", slow.addr).into()
    })
    .await;
    two_holders(&a).await;
    let (email, registered) = a.register().await;
    let evicted = registered.session_token;
    keep_in_memory(&b, &evicted).await;
    a.login(&email, PASSWORD).await.expect("the login succeeds");
    assert_code(b.validate(&evicted).await, Code::Unauthenticated);
    assert_code(a.validate(&evicted).await, Code::Unauthenticated);
}

/// 200 logins at a cap of one on A, each evicting the session the one before made, while B
/// validates the current session continuously (its memory keeps refilling): after each login
/// returned, B rejects the evicted session at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_racing_validations_elsewhere_leave_nothing_accepted() {
    let mut settings = test_settings(Mode::Redis);
    settings.session.max_per_user = 1;
    settings.rate_limit.login_per_email = 0;
    let a = spawn_with(settings).await;
    let b = Arc::new(spawn_sharing(&a, |_| {}).await);
    two_holders(&a).await;
    let (email, registered) = a.register().await;
    let (current, watch) = tokio::sync::watch::channel(registered.session_token);
    let hammer = {
        let b = b.clone();
        tokio::spawn(async move {
            loop {
                let token = watch.borrow().clone();
                let _ = b.validate(&token).await;
            }
        })
    };
    let mut accepted = 0;
    for _ in 0..200 {
        let old = current.borrow().clone();
        let _ = b.validate(&old).await;
        let login = a.login(&email, PASSWORD).await.expect("the login succeeds");
        if b.validate(&old).await.is_ok() {
            accepted += 1;
        }
        current.send_replace(login.session_token);
    }
    hammer.abort();
    let hits = b
        .metric("authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}")
        .await;
    assert_eq!(accepted, 0, "evicted sessions accepted after the login");
    assert!(hits > 200.0, "B served from memory ({hits} hits)");
}

/// Before: B, cut off from PostgreSQL, kept validating from memory on its lease and heartbeat
/// alone, past README's bound (a session revoked by the previous release's SQL, which waits for
/// no one, was accepted 1.5 s later). Now memory is trusted as long as B's Redis copies: until
/// one interval plus one command timeout after its last follower pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_postgres_stops_serving_from_memory_within_the_bound() {
    let a = spawn_app(Mode::Redis).await;
    let pg = Proxy::start(pg_target()).await;
    let b_url = db_url_via(&a, &pg);
    let b = spawn_sharing(&a, |s| s.database.url = b_url.into()).await;
    two_holders(&a).await;
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    keep_in_memory(&b, &token).await;
    pg.set(Link::Blackhole);
    // Revoked as the previous release does it: the row and its log entry, no lease wait.
    let pool = sqlx::PgPool::connect(a.settings.database.url.expose_secret())
        .await
        .unwrap();
    let hash = authd::auth::token::TokenHash::of_token(&token).unwrap();
    sqlx::query(
        "with revoked as (
             update sessions set revoked_at = clock_timestamp()
             where token_hash = $1 and revoked_at is null
             returning token_hash, user_id, absolute_expires_at)
         insert into session_invalidations (token_hash, user_id, expires_at)
         select token_hash, user_id, absolute_expires_at from revoked",
    )
    .bind(hash.as_bytes())
    .execute(&pool)
    .await
    .unwrap();
    let bound = a.settings.session.invalidation_interval + a.settings.redis.command_timeout;
    tokio::time::sleep(bound + Duration::from_millis(200)).await;
    let on_b = b.validate(&token).await;
    pg.set(Link::Up);
    assert!(
        on_b.is_err(),
        "B accepted past the bound {bound:?}: {on_b:?}"
    );
}

/// Before: each instance held leases of its own LOCAL_CACHE__LEASE, and A (lease 3 s, request
/// timeout 5 s), waiting for B's 10 s lease, was cut after it committed. Now B holds the fleet's
/// lease (3 s, set by A) and A's Logout returns OK within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_configured_with_a_longer_lease_holds_the_fleets() {
    let mut settings = test_settings(Mode::Redis);
    settings.grpc.request_timeout = Duration::from_secs(5);
    let a = spawn_with(settings).await;
    let pg = Proxy::start(pg_target()).await;
    let redis = Proxy::start(redis_addr()).await;
    let b_url = db_url_via(&a, &pg);
    let b = spawn_sharing(&a, |s| {
        s.database.url = b_url.into();
        s.redis.url = format!("redis://{}", redis.addr).into();
        s.local_cache.lease = Duration::from_secs(10);
        s.grpc.request_timeout = Duration::from_secs(20);
    })
    .await;
    two_holders(&a).await;
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    keep_in_memory(&b, &token).await;
    pg.set(Link::Blackhole);
    redis.set(Link::Blackhole);
    let logout = a.logout(&token).await;
    pg.set(Link::Up);
    redis.set(Link::Up);
    drop(b);
    logout.expect("the Logout returns OK within A's request timeout");
}

/// An instance whose request timeout cannot cover the fleet's lease refuses to start, naming the
/// setting (its own cache on or off: it waits for the holders either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_timeout_cannot_cover_the_fleets_lease_does_not_start() {
    let mut settings = test_settings(Mode::Redis);
    settings.local_cache.lease = Duration::from_secs(10);
    settings.grpc.request_timeout = Duration::from_secs(20);
    let a = spawn_with(settings).await;
    for cache in [true, false] {
        let mut other = a.settings.clone();
        other.local_cache.enabled = cache;
        other.local_cache.lease = Duration::from_secs(3);
        other.grpc.request_timeout = Duration::from_secs(5);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let error = match authd::app::Application::build_with_listener(other, listener).await {
            Ok(_) => panic!("started with a request timeout shorter than the fleet's lease"),
            Err(error) => error,
        };
        let text = format!("{error:#}");
        assert!(
            text.contains("invalid setting GRPC__REQUEST_TIMEOUT"),
            "{text}"
        );
        assert!(error.downcast_ref::<authd::config::ConfigError>().is_some());
    }
}

/// Before: every waiting call polled the lease table on its own, every 100 ms (200 concurrent
/// repeats of one RevokeSession during a paused holder cost 14.3 queries each). Now one poll per
/// instance serves every wait: 40 concurrent Logouts waiting for a paused holder's lease cost
/// their own statements and a shared poll, not 40 polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_waits_share_one_poll_of_the_lease_table() {
    const CALLS: usize = 40;
    let a = Arc::new(spawn_app(Mode::Redis).await);
    let mut cmd = crate::binary::command(&a.settings, &redis_url());
    cmd.env("LOCAL_CACHE__ENABLED", "true");
    let paused = crate::binary::Binary::start(cmd).await;
    two_holders(&a).await;
    let mut tokens = Vec::new();
    for _ in 0..CALLS {
        tokens.push(a.register().await.1.session_token);
    }
    let queries = || async {
        let request = a.metric("authd_db_queries_total{origin=\"request\"}").await;
        request
            + a.metric("authd_db_queries_total{origin=\"background\"}")
                .await
    };
    let before = queries().await;
    paused.signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    let logouts = tokens.into_iter().map(|token| {
        let a = a.clone();
        async move { a.logout(&token).await }
    });
    let answers = futures::future::join_all(logouts).await;
    let waited = started.elapsed();
    paused.signal(libc::SIGCONT);
    for answer in answers {
        answer.expect("each Logout returns OK once the paused holder's lease ended");
    }
    let spent = queries().await - before;
    // Each Logout's own two statements, the follower (3 queries a pass, every 100 ms in tests),
    // the keeper and one poll every 100 ms; 40 polls every 100 ms would be 400 a second more.
    let per_second = (spent - 2.0 * CALLS as f64) / waited.as_secs_f64();
    eprintln!("{spent} queries in {waited:?}: {per_second:.0}/s besides the Logouts' own");
    assert!(
        per_second < 150.0,
        "{spent} queries in {waited:?} ({per_second:.0}/s besides the Logouts' own)"
    );
}

/// `select` one number from `app`'s database.
async fn scalar(app: &TestApp, sql: &str) -> i64 {
    let pool = sqlx::PgPool::connect(app.settings.database.url.expose_secret())
        .await
        .unwrap();
    let value: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    value
}

/// Review found: the fleet counted as having let its lease go when no lease was held and no
/// instance had started for two leases — which is also a running fleet during a Redis outage
/// (every instance doubts and releases). An instance starting then with LOCAL_CACHE__LEASE=10s
/// replaced the fleet's 3 s, and the running instances took 10 s leases when Redis came back:
/// longer than their request timeouts were checked against. Now running instances are
/// recorded every 5 s, and the fleet's lease changes only once none that holds leases runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleets_lease_does_not_change_under_a_running_fleet_without_leases() {
    let redis = Proxy::start(redis_addr()).await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = format!("redis://{}", redis.addr).into();
    settings.grpc.request_timeout = Duration::from_secs(5);
    let a = spawn_with(settings).await;
    eventually(Duration::from_secs(15), "A holds a lease", || async {
        a.db.leases().held().await.unwrap() == 1
    })
    .await;
    // Redis away: A doubts and lets its lease go; the fleet row is long unclaimed.
    redis.set(Link::Blackhole);
    eventually(Duration::from_secs(15), "A released its lease", || async {
        a.db.leases().held().await.unwrap() == 0
    })
    .await;
    scalar(
        &a,
        "with u as (update local_cache_fleet set updated_at = clock_timestamp() - interval '1 hour'
                    returning 1) select count(*) from u",
    )
    .await;
    let b = spawn_sharing(&a, |s| {
        s.redis.url = redis_url().into();
        s.local_cache.lease = Duration::from_secs(10);
        s.grpc.request_timeout = Duration::from_secs(20);
    })
    .await;
    assert_eq!(
        scalar(&a, "select lease_us from local_cache_fleet").await,
        3_000_000,
        "B adopted the running fleet's lease"
    );
    redis.set(Link::Up);
    eventually(
        Duration::from_secs(15),
        "both hold leases again",
        || async { a.db.leases().held().await.unwrap() == 2 },
    )
    .await;
    assert_eq!(
        scalar(
            &a,
            "select max(lease_us) from local_cache_leases where expires_at > clock_timestamp()"
        )
        .await,
        3_000_000,
        "every lease held is the fleet's 3 s"
    );
    drop(b);
}

/// Review found: an instance with its cache off that started before any instance had the
/// cache on was never checked against a lease (there was none), and a cache-on instance
/// starting later set one longer than its request timeout covers. Now the later one refuses to
/// start, naming LOCAL_CACHE__LEASE, while such an instance runs; a lease it covers is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_instance_sets_a_lease_that_a_running_instance_cannot_wait_for() {
    let mut settings = test_settings(Mode::Redis);
    settings.local_cache.enabled = false;
    // Covers a lease of (3 s - 1.1 s) / 1.01 = 1.88 s.
    settings.grpc.request_timeout = Duration::from_secs(3);
    let off = spawn_with(settings).await;
    let mut other = off.settings.clone();
    other.local_cache.enabled = true;
    other.local_cache.lease = Duration::from_secs(3);
    other.grpc.request_timeout = Duration::from_secs(10);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = match authd::app::Application::build_with_listener(other.clone(), listener).await {
        Ok(_) => panic!("set a lease the running instance cannot wait for"),
        Err(error) => error,
    };
    let text = format!("{error:#}");
    assert!(
        text.contains("invalid setting LOCAL_CACHE__LEASE"),
        "{text}"
    );
    assert!(error.downcast_ref::<authd::config::ConfigError>().is_some());
    assert_eq!(
        scalar(&off, "select count(*) from local_cache_fleet").await,
        0,
        "nothing was set"
    );
    let on = spawn_sharing(&off, |s| {
        s.local_cache.enabled = true;
        s.local_cache.lease = Duration::from_secs(1);
        s.grpc.request_timeout = Duration::from_secs(10);
    })
    .await;
    assert_eq!(
        scalar(&off, "select lease_us from local_cache_fleet").await,
        1_000_000
    );
    drop(on);
}

/// A running instance takes leases of the length it started with only: when the fleet's
/// length is replaced under it (by hand here), it keeps no copies — correct, slower — instead
/// of holding a lease the others' timeouts were not checked against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_takes_no_lease_of_a_length_it_did_not_start_with() {
    let a = spawn_app(Mode::Redis).await;
    eventually(Duration::from_secs(15), "A holds a lease", || async {
        a.db.leases().held().await.unwrap() == 1
    })
    .await;
    scalar(
        &a,
        "with f as (update local_cache_fleet set lease_us = 5000000 returning 1),
              l as (update local_cache_leases set expires_at = clock_timestamp() returning 1)
         select (select count(*) from f) + (select count(*) from l)",
    )
    .await;
    // Several beats (0.75 s each) later, A still holds none.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(a.db.leases().held().await.unwrap(), 0);
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    let hits = "authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
    let before = a.metric(hits).await;
    a.validate(&token).await.unwrap();
    a.validate(&token).await.unwrap();
    assert_eq!(a.metric(hits).await, before, "nothing served from memory");
}

/// Review found: the instances' beats stop while PostgreSQL is out of their reach, so after an
/// outage of more than 30 s an instance starting with another LOCAL_CACHE__LEASE took the fleet
/// for stopped and replaced its lease; every running holder then kept no copies. Now an instance
/// about to replace the length of a fleet that held leases lately waits two beats and looks
/// again: the running instance beat meanwhile, and its length stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_starting_after_a_postgres_outage_keeps_the_fleets_lease() {
    let pg = Proxy::start(pg_target()).await;
    let mut settings = test_settings(Mode::Redis);
    let direct = settings.database.url.expose_secret().to_owned();
    settings.database.url = direct
        .replace("127.0.0.1:5432", &pg.addr.to_string())
        .into();
    let a = spawn_with(settings).await;
    eventually(Duration::from_secs(15), "A holds a lease", || async {
        a.db.leases().held().await.unwrap() == 1
    })
    .await;
    // PostgreSQL out of A's reach for "long": its lease ends, its last beat is a minute old.
    pg.set(Link::Blackhole);
    let pool = sqlx::PgPool::connect(&direct).await.unwrap();
    for sql in [
        "update local_cache_instances set seen_at = clock_timestamp() - interval '1 minute'",
        "update local_cache_leases set expires_at = clock_timestamp()",
        "update local_cache_fleet set updated_at = clock_timestamp() - interval '1 hour'",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    // PostgreSQL is back for A a second after B begins to start.
    let back = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        pg.set(Link::Up);
    };
    let start = spawn_sharing(&a, |s| {
        s.database.url = direct.clone().into();
        s.local_cache.lease = Duration::from_secs(10);
        s.grpc.request_timeout = Duration::from_secs(20);
    });
    let (b, ()) = tokio::join!(start, back);
    let fleet: i64 = sqlx::query_scalar("select lease_us from local_cache_fleet")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(fleet, 3_000_000, "B adopted the fleet's lease");
    eventually(Duration::from_secs(15), "both hold leases", || async {
        b.db.leases().held().await.unwrap() == 2
    })
    .await;
    drop(b);
}
