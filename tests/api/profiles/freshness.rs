//! No read goes back: reads racing updates and fills, updates while Redis is cut off, an outage.
use super::*;

both_modes!(
    after_an_update_every_read_sees_it,
    concurrent_reads_racing_updates_never_go_back,
);

async fn after_an_update_every_read_sees_it(mode: Mode) {
    let a = spawn_with(test_settings(mode)).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (_, reg) = a.register().await;
    for app in [&a, &b] {
        app.get_profile(&reg.user_id).await.unwrap();
        app.batch_get(std::slice::from_ref(&reg.user_id))
            .await
            .unwrap();
    }
    for version in 2..6 {
        let mut p = values();
        p.bio = format!("version {version}");
        a.update_profile(&reg.session_token, p, &["bio"], 0)
            .await
            .unwrap();
        for app in [&a, &b] {
            assert_eq!(
                app.get_profile(&reg.user_id).await.unwrap().version,
                version
            );
            let batch = app
                .batch_get(std::slice::from_ref(&reg.user_id))
                .await
                .unwrap();
            assert_eq!(batch.profiles[0].bio, format!("version {version}"));
        }
    }
}

async fn concurrent_reads_racing_updates_never_go_back(mode: Mode) {
    let a = spawn_with(test_settings(mode)).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let redis = match mode {
        Mode::Redis | Mode::Cluster => {
            Some(redis_client(a.settings.redis.url.expose_secret()).await)
        }
        Mode::NoRedis => None,
    };
    let (_, reg) = a.register().await;
    let committed = Arc::new(AtomicI64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let stale = Arc::new(AtomicUsize::new(0));
    let mut readers = Vec::new();
    for i in 0..6 {
        let client = if i % 2 == 0 {
            a.profiles.clone()
        } else {
            b.profiles.clone()
        };
        let (user_id, committed, stop, stale) = (
            reg.user_id.clone(),
            committed.clone(),
            stop.clone(),
            stale.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut client = client;
            while !stop.load(Ordering::SeqCst) {
                let floor = committed.load(Ordering::SeqCst);
                let p = client
                    .get_profile(pb::GetProfileRequest {
                        user_id: user_id.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .profile
                    .unwrap();
                if p.version < floor {
                    stale.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for _ in 0..20 {
        if let Some(redis) = &redis {
            // Force misses, so reads race the update through PostgreSQL and the fill.
            use fred::interfaces::KeysInterface;
            let _: i64 = redis
                .del(crate::helpers::profile_key(&a, &reg.user_id))
                .await
                .unwrap();
        }
        let p = a
            .update_profile(&reg.session_token, values(), &["bio"], 0)
            .await
            .unwrap();
        committed.store(p.version, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.await.unwrap();
    }
    assert_eq!(
        stale.load(Ordering::SeqCst),
        0,
        "reads older than a returned update"
    );
}

/// A read that loaded version 1 from PostgreSQL, paused, and writes it to Redis after an update
/// wrote version 2 cannot bring version 1 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_racing_an_update_cannot_bring_the_old_version_back() {
    let pause = PauseOnce::default();
    let app = spawn_with_hooks(
        test_settings(Mode::Redis),
        Hooks {
            profile_fill: Some(pause.hook()),
            ..Hooks::default()
        },
    )
    .await;
    let (_, reg) = app.register().await;
    pause.arm();
    let reader = {
        let mut client = app.profiles.clone();
        let user_id = reg.user_id.clone();
        tokio::spawn(async move { client.get_profile(pb::GetProfileRequest { user_id }).await })
    };
    pause.reached().await;
    let v2 = app
        .update_profile(&reg.session_token, values(), &["bio"], 0)
        .await
        .unwrap();
    pause.resume();
    assert_eq!(
        reader
            .await
            .unwrap()
            .unwrap()
            .into_inner()
            .profile
            .unwrap()
            .version,
        1
    );
    for _ in 0..5 {
        assert_eq!(
            app.get_profile(&reg.user_id).await.unwrap().version,
            v2.version
        );
    }
}

/// An update made while this instance cannot reach Redis (whose copy survives) is never followed
/// by a stale read, here or on an instance that kept Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_while_redis_is_cut_off_is_never_read_stale() {
    let redis_server = RedisServer::start().await;
    let link = Proxy::start(redis_server.addr()).await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(format!("redis://{}", link.addr));
    let app = spawn_with(settings).await;
    let other = spawn_sharing(&app, |s| {
        s.redis.url = SecretString::from(redis_server.url())
    })
    .await;
    let (_, reg) = app.register().await;
    app.get_profile(&reg.user_id).await.unwrap();
    other.get_profile(&reg.user_id).await.unwrap();

    link.set(Link::Refused);
    let v2 = app
        .update_profile(&reg.session_token, values(), &["bio"], 0)
        .await
        .unwrap();
    assert_eq!(app.get_profile(&reg.user_id).await.unwrap().version, 2);
    eventually(
        Duration::from_secs(2),
        "the other instance sees version 2",
        || async { other.get_profile(&reg.user_id).await.unwrap().version == v2.version },
    )
    .await;
    link.set(Link::Up);
    for _ in 0..20 {
        assert_eq!(app.get_profile(&reg.user_id).await.unwrap().version, 2);
        assert_eq!(other.get_profile(&reg.user_id).await.unwrap().version, 2);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Redis killed: reads and writes go on from PostgreSQL; after a restart the cache is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_survive_a_redis_outage() {
    let mut redis_server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis_server.url());
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    app.get_profile(&reg.user_id).await.unwrap();
    redis_server.kill();
    let v2 = app
        .update_profile(&reg.session_token, values(), &["bio"], 0)
        .await
        .unwrap();
    assert_eq!(
        app.get_profile(&reg.user_id).await.unwrap().version,
        v2.version
    );
    redis_server.restart().await;
    eventually(
        Duration::from_secs(10),
        "profile reads served from Redis again",
        || async {
            let _ = app.get_profile(&reg.user_id).await;
            let before = app.queries();
            let p = app.get_profile(&reg.user_id).await.unwrap();
            p.version == v2.version && app.queries() == before
        },
    )
    .await;
}
