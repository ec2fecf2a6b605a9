//! The in-process cache (LOCAL_CACHE__*): validations served from memory, and revocations and
//! profile updates that no instance outlives — with three instances, with one paused (SIGSTOP),
//! with one cut off from Redis, with Redis restarted under them.
use std::time::{Duration, Instant};

use authd::{
    clock::{FIXED_MARGIN, RATE_MARGIN},
    proto::authd::v1 as pb,
};
use fred::interfaces::ClientLike;
use tonic::Code;

use crate::{
    binary::{Binary, command},
    helpers::*,
    proxy::{Link, Proxy},
};

fn bio(text: &str) -> pb::Profile {
    pb::Profile {
        bio: text.into(),
        ..Default::default()
    }
}

/// Waits until `count` instances hold a lease on `app`'s database.
async fn holders(app: &TestApp, count: i64) {
    eventually(
        Duration::from_secs(15),
        "instances to hold leases",
        || async { app.db.leases().held().await.unwrap() == count },
    )
    .await;
}

async fn local_hits(app: &TestApp, cache: &str) -> f64 {
    let sample = format!("authd_local_cache_lookups_total{{cache=\"{cache}\",result=\"hit\"}}");
    app.metric(&sample).await
}

/// Longest a revocation may wait for an instance that does not answer: its lease plus the
/// margins, and scheduling slack.
fn lease_bound(app: &TestApp) -> Duration {
    app.settings.local_cache.lease.mul_f64(1.0 + RATE_MARGIN)
        + FIXED_MARGIN
        + Duration::from_millis(400)
}

async fn three() -> (TestApp, TestApp, TestApp) {
    let a = spawn_app(Mode::Redis).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let c = spawn_sharing(&a, |_| {}).await;
    holders(&a, 3).await;
    (a, b, c)
}

/// A warm validation is served from memory: no PostgreSQL query, no Redis command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_validations_cost_no_query_and_no_redis_command() {
    let server = crate::redis_server::RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = server.url().into();
    let app = spawn_with(settings).await;
    holders(&app, 1).await;
    let (_, registered) = app.register().await;
    let token = registered.session_token;
    app.validate(&token).await.unwrap();
    let client = redis_client(&server.url()).await;
    let reads = || async {
        let calls = redis_command_calls(&client).await;
        ["get", "mget"].map(|c| calls.get(c).copied().unwrap_or(0))
    };
    let (queries, before, hits) = (
        app.queries(),
        reads().await,
        local_hits(&app, "sessions").await,
    );
    for _ in 0..50 {
        app.validate(&token).await.unwrap();
    }
    assert_eq!(app.queries(), queries, "no PostgreSQL query");
    assert_eq!(local_hits(&app, "sessions").await, hits + 50.0);
    assert_eq!(reads().await, before, "no Redis read");
}

/// 1,000 rounds: a session validated (and kept) by two instances is logged out on a third;
/// validations on the two at once never accept it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_on_one_instance_rejected_at_once_by_the_others() {
    let (a, b, c) = three().await;
    let (email, _) = a.register().await;
    let hits = local_hits(&b, "sessions").await;
    for round in 0..1_000 {
        let token = a.login(&email, PASSWORD).await.unwrap().session_token;
        for app in [&b, &c, &b, &c] {
            app.validate(&token).await.unwrap();
        }
        a.logout(&token).await.unwrap();
        let (on_b, on_c) = tokio::join!(b.validate(&token), c.validate(&token));
        assert_code(on_b, Code::Unauthenticated);
        assert_code(on_c, Code::Unauthenticated);
        if round % 100 == 0 {
            assert!(a.validate(&token).await.is_err());
        }
    }
    let lookups: Vec<String> = b
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("authd_local_cache"))
        .map(str::to_owned)
        .collect();
    assert!(
        local_hits(&b, "sessions").await >= hits + 950.0,
        "the second validation of nearly every round was served from memory: {lookups:#?}"
    );
}

/// 1,000 rounds: once UpdateProfile returned version N on one instance, the other two (which
/// held version N-1 in memory) never answer an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updated_profile_is_never_older_on_the_other_instances() {
    let (a, b, c) = three().await;
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    let user = registered.user_id;
    let hits = local_hits(&b, "profiles").await;
    let mut version = a.get_profile(&user).await.unwrap().version;
    for round in 0..1_000 {
        for app in [&b, &c, &b, &c] {
            assert_eq!(app.get_profile(&user).await.unwrap().version, version);
        }
        let updated = a
            .update_profile(&token, bio(&format!("round {round}")), &["bio"], version)
            .await
            .unwrap();
        version = updated.version;
        let (on_b, on_c) = tokio::join!(b.get_profile(&user), c.get_profile(&user));
        assert!(on_b.unwrap().version >= version, "B went back");
        let batch = c.batch_get(std::slice::from_ref(&user)).await.unwrap();
        assert!(on_c.unwrap().version >= version, "C went back");
        assert!(batch.profiles[0].version >= version, "C's batch went back");
    }
    assert!(local_hits(&b, "profiles").await >= hits + 950.0);
}

/// An instance paused (SIGSTOP) while holding a copy: the revocation returns once its lease has
/// run out (not before most of it, not after it plus the margins), and the instance, resumed,
/// rejects the token on its first call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_holds_a_revocation_for_at_most_its_lease() {
    let a = spawn_app(Mode::Redis).await;
    let lease = a.settings.local_cache.lease;
    let mut cmd = command(&a.settings, &redis_url());
    cmd.env("LOCAL_CACHE__ENABLED", "true").env(
        "LOCAL_CACHE__LEASE",
        humantime::format_duration(lease).to_string(),
    );
    let paused = Binary::start(cmd).await;
    holders(&a, 2).await;
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    let mut client = paused.auth().await;
    let validate = |token: &str| pb::ValidateSessionRequest {
        session_token: token.to_owned(),
        ..Default::default()
    };
    for _ in 0..2 {
        client.validate_session(validate(&token)).await.unwrap();
    }
    let (email, _) = a.register().await;
    let other = a.login(&email, PASSWORD).await.unwrap().session_token;
    a.logout(&other).await.unwrap();
    paused.signal(libc::SIGSTOP);
    // A login is no revoking call: even one that finds revocations of its user queued does not
    // wait for the paused instance (no wait is counted; the logout's is).
    let waits = |ended: &'static str| {
        let a = &a;
        async move {
            a.metric(&format!(
                "authd_local_cache_wait_seconds_count{{ended=\"{ended}\"}}"
            ))
            .await
        }
    };
    let all = || async {
        let mut counts = Vec::new();
        for ended in ["acked", "caught_up", "lease_ended", "none", "deadline"] {
            counts.push(waits(ended).await);
        }
        counts
    };
    let before = all().await;
    let ended_by_lease = waits("caught_up").await + waits("lease_ended").await;
    a.login(&email, PASSWORD).await.unwrap();
    assert_eq!(
        all().await,
        before,
        "the login waited for the other instances"
    );
    let started = Instant::now();
    a.logout(&token).await.unwrap();
    let waited = started.elapsed();
    paused.signal(libc::SIGCONT);
    // The paused instance acknowledged nothing: the wait ended with its lease (seen by the
    // poll, `caught_up`, or by the clock, `lease_ended`).
    let unacked = waits("caught_up").await + waits("lease_ended").await;
    assert_eq!(unacked, ended_by_lease + 1.0);
    assert!(
        waited >= lease.mul_f64(0.5),
        "the revocation waited for the paused instance's lease ({waited:?})"
    );
    assert!(waited <= lease_bound(&a), "waited {waited:?}");
    assert_code(
        client.validate_session(validate(&token)).await,
        Code::Unauthenticated,
    );
}

/// An instance whose Redis connections are cut (a partition: nothing passes, nothing is closed)
/// while it holds a copy: the revocation returns within the lease and the margins, and the
/// instance rejects the token on its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_cut_off_from_redis_holds_a_revocation_for_at_most_its_lease() {
    let a = spawn_app(Mode::Redis).await;
    let redis: std::net::SocketAddr = "127.0.0.1:6379".parse().unwrap();
    let proxy = Proxy::start(redis).await;
    let b = spawn_sharing(&a, |s| {
        s.redis.url = format!("redis://{}", proxy.addr).into();
    })
    .await;
    holders(&a, 2).await;
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    let hits = local_hits(&b, "sessions").await;
    b.validate(&token).await.unwrap();
    b.validate(&token).await.unwrap();
    assert_eq!(local_hits(&b, "sessions").await, hits + 1.0);
    proxy.set(Link::Blackhole);
    let started = Instant::now();
    a.logout(&token).await.unwrap();
    let waited = started.elapsed();
    assert!(waited <= lease_bound(&a), "waited {waited:?}");
    assert_code(b.validate(&token).await, Code::Unauthenticated);
    // While it cannot hear itself the instance does not spin: a few background queries a beat.
    let queries = "authd_db_queries_total{origin=\"background\"}";
    let before = b.metric(queries).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = b.metric(queries).await - before;
    assert!(spent < 60.0, "{spent} background queries in 2 s");
    proxy.set(Link::Up);
    // Heard again: a fresh lease, and copies served again.
    eventually(
        Duration::from_secs(15),
        "B to hold a lease again",
        || async { b.metric("authd_local_cache_lease_valid").await == 1.0 },
    )
    .await;
}

/// FLUSHALL under two instances keeps their copies (they are right: every invalidation still
/// reaches them) and a revocation after it is seen at once; Redis restarted under them: their
/// copies are dropped (the subscriber reconnected) and not served again until the instance hears
/// itself and holds a fresh lease; a revocation made meanwhile is never undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_redis_restart_no_copy_from_before_is_served() {
    let mut server = crate::redis_server::RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = server.url().into();
    let a = spawn_with(settings).await;
    let b = spawn_sharing(&a, |_| {}).await;
    holders(&a, 2).await;
    let (email, registered) = a.register().await;
    let kept = registered.session_token;
    let revoked = a.login(&email, PASSWORD).await.unwrap().session_token;
    let flushed = a.login(&email, PASSWORD).await.unwrap().session_token;
    for token in [&kept, &revoked, &flushed, &kept, &revoked, &flushed] {
        b.validate(token).await.unwrap();
    }
    let client = redis_client(&server.url()).await;
    let _: () = client.flushall(false).await.unwrap();
    a.logout(&flushed).await.unwrap();
    assert_code(b.validate(&flushed).await, Code::Unauthenticated);
    let hits = local_hits(&b, "sessions").await;
    b.validate(&kept).await.unwrap();
    assert_eq!(
        local_hits(&b, "sessions").await,
        hits + 1.0,
        "kept over FLUSHALL"
    );
    server.restart().await;
    let hits = local_hits(&b, "sessions").await;
    // The restart is noticed (subscriber reconnected): nothing from before is served.
    eventually(Duration::from_secs(10), "B to drop its copies", || async {
        b.metric("authd_local_cache_entries{cache=\"sessions\"}")
            .await
            == 0.0
            || b.metric("authd_local_cache_lease_valid").await == 0.0
    })
    .await;
    a.logout(&revoked).await.unwrap();
    assert_code(b.validate(&revoked).await, Code::Unauthenticated);
    b.validate(&kept).await.unwrap();
    assert_eq!(
        local_hits(&b, "sessions").await,
        hits,
        "no copy from before the restart was served"
    );
    holders(&a, 2).await;
    drop(server);
}
