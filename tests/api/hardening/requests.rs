//! Finding 1: requests with thousands of fields, and requests over the message size.
use super::*;

/// Before: every unknown or empty path of the mask became a violation — 5000 paths made a status
/// message and details of hundreds of KiB — and the mask was parsed before the token was even
/// looked at, so a caller without a token could have it done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mask_of_thousands_of_paths_gets_one_small_violation_after_the_token_check() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (_, reg) = app.register().await;
    let empty: Vec<String> = vec![String::new(); 5000];
    let unknown: Vec<String> = (0..1500).map(|i| format!("p{i:05}")).collect();
    for paths in [empty, unknown] {
        let request = |token: &str| pb::UpdateProfileRequest {
            session_token: token.to_owned(),
            profile: Some(pb::Profile::default()),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.clone(),
            }),
            expected_version: 0,
        };
        // A token that cannot be one is refused before the mask is looked at.
        assert_code(
            app.profiles
                .clone()
                .update_profile(request("not-a-token"))
                .await,
            Code::Unauthenticated,
        );
        let status = assert_code(
            app.profiles
                .clone()
                .update_profile(request(&reg.session_token))
                .await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), ["update_mask"], "{status:?}");
        assert!(
            status_size(&status) < 2048,
            "{} bytes",
            status_size(&status)
        );
    }
    // Nothing changed.
    assert_eq!(app.get_profile(&reg.user_id).await.unwrap().version, 1);
}

/// Before: all 100 malformed ids became a violation each (~6 KiB of message and details).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_malformed_ids_gets_a_bounded_list_of_violations() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let ids: Vec<String> = (0..100).map(|i| format!("not-a-uuid-{i}")).collect();
    let status = assert_code(app.batch_get(&ids).await, Code::InvalidArgument);
    let fields = violation_fields(&status);
    assert!(
        !fields.is_empty() && fields.len() <= authd::auth::input::MAX_VIOLATIONS,
        "{fields:?}"
    );
    assert!(
        fields.iter().all(|f| f.starts_with("user_ids[")),
        "{fields:?}"
    );
    assert!(
        status_size(&status) < 2048,
        "{} bytes",
        status_size(&status)
    );
}

/// Before: tonic's 4 MiB default; now `GRPC__MAX_MESSAGE_SIZE` (16 KiB): a larger request gets
/// OUT_OF_RANGE (tonic's code for a message over the decoding limit) and the connection and the
/// server carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_message_size_is_out_of_range_and_the_server_carries_on() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    assert_eq!(app.settings.grpc.max_message_size, 16 * 1024);
    let (_, reg) = app.register().await;
    let big = pb::Profile {
        bio: "x".repeat(app.settings.grpc.max_message_size + 1),
        ..pb::Profile::default()
    };
    let status = assert_code(
        app.update_profile(&reg.session_token, big, &["bio"], 0)
            .await,
        Code::OutOfRange,
    );
    assert!(status_size(&status) < 2048, "{status:?}");
    // The same connection still serves, and so does the service.
    assert!(serving(app.channel.clone()).await);
    let small = pb::Profile {
        bio: "fits".into(),
        ..pb::Profile::default()
    };
    let updated = app
        .update_profile(&reg.session_token, small, &["bio"], 0)
        .await
        .unwrap();
    assert_eq!((updated.bio.as_str(), updated.version), ("fits", 2));
}
