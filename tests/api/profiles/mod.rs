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

mod costs;
mod freshness;

both_modes!(
    a_registered_user_has_a_profile,
    get_rejects_bad_ids_and_reports_unknown_ones,
    batch_keeps_order_collapses_duplicates_and_lists_unknown_ids,
    batch_size_is_1_to_100,
    update_changes_only_the_masked_fields,
    update_validates_every_field_and_the_mask,
    expected_version_guards_updates,
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
