//! What reads cost: no query for a cached read, one Redis round trip per batch, one load for concurrent misses, and made-up ids within the caller's budget.
use super::*;

both_modes!(a_cached_read_makes_no_postgres_query,);

async fn a_cached_read_makes_no_postgres_query(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let (_, reg) = app.register().await;
    app.get_profile(&reg.user_id).await.unwrap();
    let before = app.queries();
    for _ in 0..10 {
        app.get_profile(&reg.user_id).await.unwrap();
    }
    let ids = vec![reg.user_id.clone()];
    app.batch_get(&ids).await.unwrap();
    let queries = app.queries() - before;
    match mode {
        Mode::Redis | Mode::Cluster => assert_eq!(queries, 0),
        Mode::NoRedis => assert_eq!(queries, 11),
    }
}

/// 50 concurrent reads of an uncached profile: one PostgreSQL query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_load_once() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let before = app.queries();
    let reads = join_all((0..50).map(|_| app.get_profile(&reg.user_id))).await;
    for read in reads {
        assert_eq!(read.unwrap().version, 1);
    }
    assert_eq!(app.queries() - before, 1);
}

/// A cached batch of 100 costs one Redis command (MGET) and no PostgreSQL query; an uncached
/// one, one PostgreSQL query and one Redis write besides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_one_redis_round_trip_and_at_most_one_query() {
    let redis_server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis_server.url());
    let app = spawn_with(settings).await;
    let redis = redis_client(&redis_server.url()).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(app.register().await.1.user_id);
    }
    ids.extend((0..80).map(|_| uuid::Uuid::now_v7().to_string()));

    let (queries, calls) = (app.queries(), redis_command_calls(&redis).await);
    let batch = app.batch_get(&ids).await.unwrap();
    assert_eq!(
        (batch.profiles.len(), batch.not_found_user_ids.len()),
        (20, 80)
    );
    assert_eq!(app.queries() - queries, 1, "all misses in one query");
    let after = redis_command_calls(&redis).await;
    let delta = |c: &str| after.get(c).copied().unwrap_or(0) - calls.get(c).copied().unwrap_or(0);
    assert_eq!(delta("mget"), 1);

    let (queries, calls) = (app.queries(), redis_command_calls(&redis).await);
    let again = app.batch_get(&ids).await.unwrap();
    assert_eq!(again.profiles, batch.profiles);
    assert_eq!(app.queries(), queries, "all cached");
    let after = redis_command_calls(&redis).await;
    // Not the background's: this INFO, and the in-process cache's heartbeat (a PUBLISH every
    // quarter lease, which CI once caught inside the window).
    let total = |m: &std::collections::HashMap<String, u64>| {
        m.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "info" | "publish"))
            .map(|(_, v)| v)
            .sum::<u64>()
    };
    assert_eq!(
        total(&after) - total(&calls),
        1,
        "one Redis command: {after:?}"
    );
    assert_eq!(after["mget"] - calls["mget"], 1);
}

/// Review found: GetProfile and BatchGetProfiles with made-up ids cost a PostgreSQL query each,
/// for anyone. Now a caller address pays for lookups that find nothing
/// (`RATE_LIMIT__UNKNOWN_LOOKUPS_PER_IP`, 20 in 10 s): past its budget it is refused
/// (RESOURCE_EXHAUSTED with a retry delay) before any query, while cached profiles are still
/// served to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_ids_cost_at_most_the_callers_budget() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    app.get_profile(&reg.user_id).await.unwrap();
    let before = app.queries();
    let (mut unknown, mut refused) = (0, 0);
    for i in 0..300 {
        let read = if i % 3 == 0 {
            let ids: Vec<String> = (0..100).map(|_| uuid::Uuid::now_v7().to_string()).collect();
            app.batch_get(&ids)
                .await
                .map(|b| assert_eq!(b.profiles.len(), 0))
        } else {
            app.get_profile(&uuid::Uuid::now_v7().to_string())
                .await
                .map(|_| panic!("a made-up id was found"))
        };
        match read {
            Err(status) if status.code() == Code::NotFound => unknown += 1,
            Ok(()) => unknown += 1,
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    let queries = app.queries() - before;
    assert!(
        queries <= 12,
        "{queries} queries for 300 reads of made-up ids"
    );
    assert!(
        unknown <= 12 && refused >= 288,
        "{unknown} answered, {refused} refused"
    );
    assert_eq!(
        app.get_profile(&reg.user_id).await.unwrap().user_id,
        reg.user_id
    );
}

/// Review found: lookups that failed (PostgreSQL busy) were paid as if they found nothing, so a
/// caller reading an existing profile was refused RESOURCE_EXHAUSTED during the outage and after
/// it. Now a failed lookup costs nothing: UNAVAILABLE while it lasts, OK after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_that_fail_are_not_paid_for() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.database.query_timeout = Duration::from_millis(300);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let lock = TableLock::hold(&app, "profiles").await;
    for _ in 0..30 {
        assert_code(app.get_profile(&reg.user_id).await, Code::Unavailable);
    }
    lock.release().await;
    // Once the pool has its connections back, reads answer: never RESOURCE_EXHAUSTED.
    crate::helpers::eventually(Duration::from_secs(5), "reads answer again", || async {
        match app.get_profile(&reg.user_id).await {
            Ok(_) => true,
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                false
            }
        }
    })
    .await;
    for _ in 0..5 {
        app.get_profile(&reg.user_id).await.unwrap();
    }
}

/// Review found: with Redis disabled, BatchGetProfiles skipped the ids remembered as absent, so a
/// batch holding one deleted user's id paid a lookup on every call and was refused from the
/// 11th. Now absent ids need no lookup, with or without Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_an_absent_id_pays_once_without_redis() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (_, reg) = app.register().await;
    let gone = uuid::Uuid::now_v7().to_string();
    for _ in 0..30 {
        let batch = app
            .batch_get(&[reg.user_id.clone(), gone.clone()])
            .await
            .unwrap();
        assert_eq!(batch.not_found_user_ids, std::slice::from_ref(&gone));
    }
}
