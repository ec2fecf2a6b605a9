//! Finding 5: unauthenticated traffic and Redis.
use super::*;

/// Before: every unknown id of a BatchGetProfiles was cached in Redis as "not found"
/// (`<prefix>profile:v2:<id>`), so anyone could fill Redis with random ids. Negative entries are
/// kept in process now: no profile key is written for an unknown id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_profile_ids_write_nothing_to_redis() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let redis = redis_client(&redis_url()).await;
    let prefix = app.settings.redis.key_prefix.clone();
    let before = keys_under(&redis, &prefix).await;
    let ids: Vec<String> = (0..100).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    for _ in 0..2 {
        let batch = app.batch_get(&ids).await.unwrap();
        assert_eq!(batch.not_found_user_ids.len(), 100);
    }
    assert_code(app.get_profile(&ids[0]).await, Code::NotFound);
    let added: Vec<_> = keys_under(&redis, &prefix)
        .await
        .difference(&before)
        .cloned()
        .collect();
    assert!(added.is_empty(), "keys written for unknown ids: {added:?}");
    let _ = redis.quit().await;
}

/// Before: every Login counted in the email's counter before the address's limit was looked at,
/// so logins refused by the address limit still created one Redis key per (fresh) email. Now the
/// address is checked first and a refusal stops there: no key is created, and no PostgreSQL query
/// is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_refused_by_the_address_limit_create_no_keys() {
    let mut settings = test_settings(Mode::Redis);
    settings.rate_limit.login_per_ip = 2;
    let app = spawn_with(settings).await;
    let redis = redis_client(&redis_url()).await;
    let prefix = app.settings.redis.key_prefix.clone();
    let ip = "198.51.100.30";
    assert_code(
        app.login_from(&unique_email(), PASSWORD, ip).await,
        Code::Unauthenticated,
    );
    let before = keys_under(&redis, &prefix).await;
    let queries = app.queries();
    for _ in 0..30 {
        assert_limited(app.login_from(&unique_email(), PASSWORD, ip).await);
    }
    assert_eq!(keys_under(&redis, &prefix).await, before);
    assert_eq!(app.queries(), queries, "refused before any database work");
    let _ = redis.quit().await;
}

/// Before: when Redis refused writes (maxmemory reached, `noeviction`), the counting script failed
/// and the limiter fell back to in-process counters — empty on every instance — so an account
/// locked in Redis was open again. Now the buckets are still read in Redis (a read-only script):
/// the lock holds on every instance, including one that never saw the guesses, while an account
/// that is not locked logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_still_enforces_a_lock_recorded_before_it_filled() {
    let server = RedisServer::start_with(
        false,
        &["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"],
    )
    .await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let a = spawn_with(settings).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (email, _) = a.register().await;
    let (other, _) = a.register().await;
    for _ in 0..2 {
        assert_code(a.login(&email, "wrong guess").await, Code::Unauthenticated);
    }
    assert_limited(a.login(&email, PASSWORD).await);

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
    for app in [&b, &a] {
        assert_limited(app.login(&email, PASSWORD).await);
    }
    b.login(&other, PASSWORD)
        .await
        .expect("an account that is not locked logs in");
    let _: i64 = redis.del(keys).await.unwrap();
    let _ = redis.quit().await;
}
