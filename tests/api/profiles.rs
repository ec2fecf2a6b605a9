//! ProfileService: reads, batches, updates, and the cache in front of PostgreSQL.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use authd::proto::authd::v1 as pb;
use futures::future::join_all;
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    both_modes,
    helpers::{
        Hooks, Mode, TableLock, TestApp, assert_code, eventually, redis_client,
        redis_command_calls, spawn_sharing, spawn_with, spawn_with_hooks, test_settings,
    },
    helpers::{PauseOnce, violation_fields},
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

both_modes!(
    a_registered_user_has_a_profile,
    get_rejects_bad_ids_and_reports_unknown_ones,
    batch_keeps_order_collapses_duplicates_and_lists_unknown_ids,
    batch_size_is_1_to_100,
    update_changes_only_the_masked_fields,
    update_validates_every_field_and_the_mask,
    expected_version_guards_updates,
    a_cached_read_makes_no_postgres_query,
    after_an_update_every_read_sees_it,
    concurrent_reads_racing_updates_never_go_back,
);

fn values() -> pb::Profile {
    pb::Profile {
        display_name: "  Grace Hopper ".into(),
        bio: "Rear admiral, compiler pioneer.".into(),
        avatar_url: "https://cdn.example.com/grace.png".into(),
        locale: "en-US".into(),
        time_zone: "America/New_York".into(),
        ..pb::Profile::default()
    }
}

async fn a_registered_user_has_a_profile(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let (_, reg) = app.register().await;
    let profile = app.get_profile(&reg.user_id).await.unwrap();
    assert_eq!(profile.user_id, reg.user_id);
    assert_eq!(profile.display_name, "Test User");
    assert_eq!(profile.version, 1);
    assert_eq!((profile.bio.as_str(), profile.locale.as_str()), ("", ""));
    assert!(profile.created_at.is_some() && profile.updated_at.is_some());
}

async fn get_rejects_bad_ids_and_reports_unknown_ones(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let status = assert_code(app.get_profile("nope").await, Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "user_id"
    );
    let unknown = uuid::Uuid::now_v7().to_string();
    let before = app.queries();
    for _ in 0..10 {
        assert_code(app.get_profile(&unknown).await, Code::NotFound);
    }
    // "Not found" is remembered (in process, with or without Redis): a stream of bad ids does
    // not reach PostgreSQL each time.
    assert_eq!(app.queries() - before, 1);
}

async fn batch_keeps_order_collapses_duplicates_and_lists_unknown_ids(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.register().await.1.user_id);
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    let asked = vec![
        ids[2].clone(),
        unknown.clone(),
        ids[0].clone(),
        ids[2].clone(),
        ids[1].clone(),
    ];
    for _ in 0..2 {
        // The second time from the cache: the same answer.
        let batch = app.batch_get(&asked).await.unwrap();
        let got: Vec<_> = batch.profiles.iter().map(|p| p.user_id.clone()).collect();
        assert_eq!(got, [ids[2].clone(), ids[0].clone(), ids[1].clone()]);
        assert_eq!(batch.not_found_user_ids, std::slice::from_ref(&unknown));
    }
    let status = assert_code(
        app.batch_get(&[ids[0].clone(), "bad".into()]).await,
        Code::InvalidArgument,
    );
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "user_ids[1]"
    );
}

async fn batch_size_is_1_to_100(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    assert_code(app.batch_get(&[]).await, Code::InvalidArgument);
    let ids: Vec<String> = (0..101).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let status = assert_code(app.batch_get(&ids).await, Code::InvalidArgument);
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "user_ids"
    );
    let batch = app.batch_get(&ids[..100]).await.unwrap();
    assert_eq!(batch.not_found_user_ids.len(), 100);
}

async fn update_changes_only_the_masked_fields(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let (_, reg) = app.register().await;
    let before = app.get_profile(&reg.user_id).await.unwrap();
    let updated = app
        .update_profile(&reg.session_token, values(), &["bio", "locale"], 0)
        .await
        .unwrap();
    assert_eq!(updated.version, 2);
    assert_eq!(updated.bio, "Rear admiral, compiler pioneer.");
    assert_eq!(updated.locale, "en-US");
    assert_eq!(
        updated.display_name, before.display_name,
        "outside the mask"
    );
    assert_eq!(updated.avatar_url, "");
    assert_eq!(updated.created_at, before.created_at);
    assert_ne!(updated.updated_at, before.updated_at);
    assert_eq!(app.get_profile(&reg.user_id).await.unwrap(), updated);

    let all = app
        .update_profile(
            &reg.session_token,
            values(),
            &["display_name", "avatar_url", "time_zone"],
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        all.display_name, "Grace Hopper",
        "trimmed like at registration"
    );
    assert_eq!(all.time_zone, "America/New_York");
    assert_eq!(all.version, 3);
    // Clearing a field: named in the mask with an empty value.
    let cleared = app
        .update_profile(&reg.session_token, pb::Profile::default(), &["bio"], 0)
        .await
        .unwrap();
    assert_eq!(cleared.bio, "");
    assert_eq!(cleared.locale, "en-US");
    // Only one's own profile, and only with a valid session.
    assert_code(
        app.update_profile("authd_nope", values(), &["bio"], 0)
            .await,
        Code::Unauthenticated,
    );
}

async fn update_validates_every_field_and_the_mask(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let (_, reg) = app.register().await;
    let cases: Vec<(&str, &str, pb::Profile)> = vec![
        (
            "display_name",
            "profile.display_name",
            pb::Profile {
                display_name: " ".into(),
                ..values()
            },
        ),
        (
            "bio",
            "profile.bio",
            pb::Profile {
                bio: "b".repeat(501),
                ..values()
            },
        ),
        (
            "display_name",
            "profile.display_name",
            pb::Profile {
                // A right-to-left override: "evil\u{202E}gnp.exe" shows as "evilexe.png".
                display_name: "evil\u{202E}gnp.exe".into(),
                ..values()
            },
        ),
        (
            "display_name",
            "profile.display_name",
            pb::Profile {
                display_name: "ad\u{200B}min".into(),
                ..values()
            },
        ),
        (
            "bio",
            "profile.bio",
            pb::Profile {
                bio: "line one\nsecretly \u{2067}reversed".into(),
                ..values()
            },
        ),
        (
            "avatar_url",
            "profile.avatar_url",
            pb::Profile {
                avatar_url: "http://x.com/a.png".into(),
                ..values()
            },
        ),
        (
            "avatar_url",
            "profile.avatar_url",
            pb::Profile {
                avatar_url: format!("https://x.com/{}", "a".repeat(2040)),
                ..values()
            },
        ),
        (
            "locale",
            "profile.locale",
            pb::Profile {
                locale: "not a tag".into(),
                ..values()
            },
        ),
        (
            "time_zone",
            "profile.time_zone",
            pb::Profile {
                time_zone: "Mars/Olympus".into(),
                ..values()
            },
        ),
    ];
    for (path, field, profile) in cases {
        let status = assert_code(
            app.update_profile(&reg.session_token, profile, &[path], 0)
                .await,
            Code::InvalidArgument,
        );
        let fields = violation_fields(&status);
        assert_eq!(fields, [field]);
    }
    for mask in [
        &["user_id"][..],
        &["version"],
        &["updated_at"],
        &["nickname"],
        &[],
    ] {
        let status = assert_code(
            app.update_profile(&reg.session_token, values(), mask, 0)
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(
            status.get_details_bad_request().unwrap().field_violations[0].field,
            "update_mask"
        );
    }
    assert_eq!(
        app.get_profile(&reg.user_id).await.unwrap().version,
        1,
        "nothing was written"
    );
}

async fn expected_version_guards_updates(mode: Mode) {
    let app = spawn_with(test_settings(mode)).await;
    let (_, reg) = app.register().await;
    let v2 = app
        .update_profile(&reg.session_token, values(), &["bio"], 1)
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_code(
        app.update_profile(&reg.session_token, values(), &["locale"], 1)
            .await,
        Code::Aborted,
    );
    assert_eq!(app.get_profile(&reg.user_id).await.unwrap().locale, "");
    app.update_profile(&reg.session_token, values(), &["locale"], 2)
        .await
        .unwrap();
    assert_code(
        app.update_profile(&reg.session_token, values(), &["locale"], -1)
            .await,
        Code::InvalidArgument,
    );
}

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

/// Health reports the profile service too.
#[tokio::test]
async fn health_reports_the_profile_service() {
    let app: TestApp = spawn_with(test_settings(Mode::NoRedis)).await;
    let status = app
        .health
        .clone()
        .check(tonic_health::pb::HealthCheckRequest {
            service: "authd.v1.ProfileService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
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
