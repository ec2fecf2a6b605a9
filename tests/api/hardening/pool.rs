//! The PostgreSQL pool: one class of callers, and calls cut short.
use super::*;

/// Review found: one class of callers could take the whole PostgreSQL pool (a flood of
/// lookups left a user's Login waiting 1 s, then UNAVAILABLE). Now each class has its share
/// (`DATABASE__SHARES__*`): with every lookup connection stuck (a lock holds the profiles
/// table), Login still gets its own connections at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_class_leaves_the_others_their_share_of_the_pool() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.local_cache.enabled = false;
    // The lookups that got a connection stay stuck on the lock until it is released.
    settings.database.query_timeout = Duration::from_secs(30);
    let app = std::sync::Arc::new(spawn_with(settings).await);
    let mut users = Vec::new();
    for _ in 0..12 {
        users.push(app.register().await.1.user_id);
    }
    let (email, _) = app.register().await;
    let lock = TableLock::hold(&app, "profiles").await;
    // More lookups than the pool has connections, each stuck on the lock.
    let flood: Vec<_> = users
        .iter()
        .map(|id| {
            let (app, id) = (app.clone(), id.clone());
            tokio::spawn(async move { app.get_profile(&id).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.login(&email, PASSWORD)
        .await
        .expect("a login while every lookup connection is taken");
    // (Login had connections of its own: one queued behind the stuck lookups would have been
    // refused after DATABASE__ACQUIRE_TIMEOUT, long before any of them could end.)
    lock.release().await;
    for read in flood {
        let read = read.await.unwrap();
        assert!(
            read.is_ok() || read.as_ref().is_err_and(|s| s.code() == Code::Unavailable),
            "{read:?}"
        );
    }
    let shares = app.metrics().await;
    assert!(
        shares.contains("authd_db_connections{share=\"lookups\",state=\"in_use\"}"),
        "{shares}"
    );
}

/// Found while reviewing the budget of unknown lookups: a call cut short while its statement ran
/// (the caller's deadline, or the caller hanging up) never gave its connection back to sqlx's
/// pool, so six calls with a 100 ms `grpc-timeout` while PostgreSQL was slow (a lock) emptied the
/// lookups share for good — every lookup after was UNAVAILABLE. Calls now run to their end on a
/// task of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_cut_short_leave_the_pool_whole() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.database.query_timeout = Duration::from_millis(300);
    let app = spawn_with(settings).await;
    let (_, registered) = app.register().await;
    let lock = TableLock::hold(&app, "sessions, profiles").await;
    for _ in 0..6 {
        let mut validate = tonic::Request::new(pb::ValidateSessionRequest {
            session_token: registered.session_token.clone(),
            ..Default::default()
        });
        validate.set_timeout(Duration::from_millis(100));
        assert!(app.auth.clone().validate_session(validate).await.is_err());
        let mut read = tonic::Request::new(pb::GetProfileRequest {
            user_id: registered.user_id.clone(),
        });
        read.set_timeout(Duration::from_millis(100));
        assert!(app.profiles.clone().get_profile(read).await.is_err());
    }
    lock.release().await;
    crate::helpers::eventually(Duration::from_secs(5), "lookups answer again", || async {
        app.validate(&registered.session_token).await.is_ok()
    })
    .await;
    for _ in 0..10 {
        app.validate(&registered.session_token).await.unwrap();
        app.get_profile(&registered.user_id).await.unwrap();
    }
}
