//! Redis forgetting under a fill: FLUSHALL or a restart between a fill's read and its write, a restore from an older snapshot.
use super::*;

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
            ..Default::default()
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
