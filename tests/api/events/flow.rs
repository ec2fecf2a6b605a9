//! What each change sends, resuming without a gap, and what a stream refuses.
use std::time::Duration;

use authd::proto::authd::v1::{self as pb, event::Kind, watch_request};
use tonic::Code;

use super::{SUBSCRIBER_KEY, Watcher, kinds, reason, sid, subscribed_settings};
use crate::{
    admin::{KEY as ADMIN_KEY, with_key},
    both_modes,
    helpers::{Mode, PASSWORD, assert_code, spawn_with, violation_fields},
};

both_modes!(
    every_change_is_one_event_in_commit_order,
    a_stream_resumes_without_a_gap
);

async fn every_change_is_one_event_in_commit_order(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(subscribed_settings(mode, dir.path())).await;
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    let first = watcher.next().await.unwrap();
    assert!(
        first.replayed,
        "a stream from now replays the recent past first"
    );
    assert!(first.heartbeat_interval.is_some());
    assert!(!first.position.is_empty() && first.complete_through.is_some());
    let (email, reg) = app.register().await;
    let second = app.login(&email, PASSWORD).await.unwrap();
    app.logout(&second.session_token).await.unwrap();
    let third = app.login(&email, PASSWORD).await.unwrap();
    app.revoke_all(&reg.session_token, false).await.unwrap();
    let profile = pb::Profile {
        display_name: "Ada".into(),
        ..Default::default()
    };
    app.update_profile(&reg.session_token, profile, &["display_name"], 0)
        .await
        .unwrap();
    let mut admin = crate::admin::admin(&app);
    admin
        .disable_user(with_key(
            ADMIN_KEY,
            pb::DisableUserRequest {
                user_id: reg.user_id.clone(),
                reason: "test".into(),
            },
        ))
        .await
        .unwrap();
    admin
        .enable_user(with_key(
            ADMIN_KEY,
            pb::EnableUserRequest {
                user_id: reg.user_id.clone(),
            },
        ))
        .await
        .unwrap();
    let (events, _) = watcher.events(6).await;
    assert_eq!(
        kinds(&events),
        [
            "session_revoked",
            "sessions_revoked",
            "profile_updated",
            "user_disabled",
            "sessions_revoked",
            "user_enabled"
        ]
    );
    let Some(Kind::SessionRevoked(revoked)) = &events[0].kind else {
        unreachable!()
    };
    assert_eq!(revoked.session_id, sid(&second.session));
    assert_eq!(revoked.user_id, reg.user_id);
    assert_eq!(revoked.reason, pb::RevocationReason::Logout as i32);
    let Some(Kind::SessionsRevoked(all)) = &events[1].kind else {
        unreachable!()
    };
    // RevokeAllSessions keeping the caller's session: one event for the user's other two.
    assert_eq!(all.kept_session_id, sid(&reg.session));
    assert_eq!(all.reason, pb::RevocationReason::RevokedAll as i32);
    let created = third.session.as_ref().and_then(|s| s.created_at).unwrap();
    let cutoff = all.cutoff.unwrap();
    assert!(
        (cutoff.seconds, cutoff.nanos) >= (created.seconds, created.nanos),
        "the cutoff covers the sessions it revoked"
    );
    let Some(Kind::ProfileUpdated(profile)) = &events[2].kind else {
        unreachable!()
    };
    assert_eq!(
        (profile.user_id.as_str(), profile.version),
        (reg.user_id.as_str(), 2)
    );
    let Some(Kind::SessionsRevoked(disabled)) = &events[4].kind else {
        unreachable!()
    };
    assert_eq!(disabled.reason, pb::RevocationReason::UserDisabled as i32);
    assert_eq!(disabled.kept_session_id, "");
    // Nothing changes: heartbeats, each a position with no events.
    for _ in 0..2 {
        let heartbeat = watcher.next().await.unwrap();
        assert!(heartbeat.events.is_empty() && !heartbeat.position.is_empty());
    }
}

async fn a_stream_resumes_without_a_gap(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(subscribed_settings(mode, dir.path())).await;
    let open = |resume: String| {
        let app = &app;
        async move {
            Watcher::open(app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, &resume)
                .await
                .unwrap()
        }
    };
    let mut watcher = open(String::new()).await;
    let (email, _) = app.register().await;
    let mut tokens = Vec::new();
    for _ in 0..6 {
        tokens.push(app.login(&email, PASSWORD).await.unwrap());
    }
    for login in &tokens[..3] {
        app.logout(&login.session_token).await.unwrap();
    }
    let (events, at) = watcher.events(3).await;
    assert_eq!(events.len(), 3);
    drop(watcher.close());
    // Changes while no stream is open arrive on the resumed one, and nothing before them.
    for login in &tokens[3..] {
        app.logout(&login.session_token).await.unwrap();
    }
    let mut resumed = open(at.position.clone()).await;
    let (later, _) = resumed.events(3).await;
    let ids = |events: &[pb::Event]| -> Vec<String> {
        events
            .iter()
            .map(|e| match &e.kind {
                Some(Kind::SessionRevoked(r)) => r.session_id.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    let expected: Vec<String> = tokens[3..].iter().map(|t| sid(&t.session)).collect();
    assert_eq!(ids(&later), expected);
    assert!(!resumed.next().await.unwrap().replayed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_no_longer_held_tells_the_subscriber_to_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(subscribed_settings(Mode::NoRedis, dir.path())).await;
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    let (email, _) = app.register().await;
    let login = app.login(&email, PASSWORD).await.unwrap();
    app.logout(&login.session_token).await.unwrap();
    let (_, at) = watcher.events(1).await;
    // The retention purged the rows the position stands on.
    let mut conn = super::sql(&app).await;
    sqlx::query(
        "update change_events_purged set through = (select max(id) + 1 from change_events)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let expired = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, &at.position).await;
    let status = assert_code(expired.map(|_| ()), Code::OutOfRange);
    assert_eq!(reason(&status), "POSITION_EXPIRED");
    // So is a stream held up past the purge (its next pass would skip the purged rows).
    let status = loop {
        match watcher.next().await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(reason(&status), "POSITION_EXPIRED");
    // A position of another PostgreSQL history (a failover) is not held either.
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let text = String::from_utf8(engine.decode(&at.position).unwrap()).unwrap();
    let mut parts: Vec<&str> = text.split(';').collect();
    parts[1] = "1/00000009";
    let forged = engine.encode(parts.join(";"));
    let other = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, &forged).await;
    let status = assert_code(other.map(|_| ()), Code::OutOfRange);
    assert_eq!(reason(&status), "POSITION_EXPIRED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(subscribed_settings(Mode::NoRedis, dir.path())).await;
    let open = |first| Watcher::open_with(&app, Some(SUBSCRIBER_KEY), first);
    let subscribe = |mode: pb::Mode, resume: &str| pb::WatchRequest {
        kind: Some(watch_request::Kind::Subscribe(pb::Subscribe {
            mode: mode as i32,
            resume_position: resume.to_owned(),
        })),
    };
    let ack = pb::WatchRequest {
        kind: Some(watch_request::Kind::Acknowledge(pb::Acknowledge::default())),
    };
    // Over GRPC__MAX_MESSAGE_SIZE: it does not decode.
    let oversized_subscribe = subscribe(pb::Mode::Bounded, &"x".repeat(32 * 1024));
    let cases = [
        (oversized_subscribe, "subscribe"),
        (ack.clone(), "subscribe"),
        (pb::WatchRequest { kind: None }, "subscribe"),
        (subscribe(pb::Mode::Unspecified, ""), "subscribe.mode"),
        (
            subscribe(pb::Mode::Bounded, "not a position"),
            "subscribe.resume_position",
        ),
        (
            subscribe(pb::Mode::Strict, "MTtoOzEwOzUtMw"),
            "subscribe.resume_position",
        ),
    ];
    for (first, field) in cases {
        let status = assert_code(open(first).await.map(|_| ()), Code::InvalidArgument);
        assert_eq!(violation_fields(&status), [field]);
    }
    // Later requests: a second subscribe, an acknowledgement of nothing this stream sent, one
    // over GRPC__MAX_MESSAGE_SIZE (it does not decode).
    let oversized = pb::WatchRequest {
        kind: Some(watch_request::Kind::Acknowledge(pb::Acknowledge {
            position: "x".repeat(32 * 1024),
            sequence: 1,
        })),
    };
    for (later, field) in [
        (subscribe(pb::Mode::Strict, ""), "subscribe"),
        (ack, "acknowledge.position"),
        (oversized, "acknowledge"),
    ] {
        let mut watcher = open(subscribe(pb::Mode::Strict, "")).await.unwrap();
        watcher.next().await.unwrap();
        watcher.send(later).await;
        let status = loop {
            match watcher.next().await {
                Ok(_) => continue,
                Err(status) => break status,
            }
        };
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(violation_fields(&status), [field]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_may_offer_bounded_mode_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::NoRedis, dir.path());
    settings.events.max_strict = 0;
    let app = spawn_with(settings).await;
    let open = |mode| Watcher::open(&app, Some(SUBSCRIBER_KEY), mode, "");
    let refused = open(pb::Mode::Strict).await.map(|_| ());
    let status = assert_code(refused, Code::FailedPrecondition);
    assert_eq!(reason(&status), "STRICT_MODE_OFF");
    assert!(open(pb::Mode::Bounded).await.is_ok());
}

/// The previous release writes the invalidation logs but no event: its rows become events too
/// (a strict subscriber would otherwise keep a session another instance revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_by_the_previous_release_is_an_event_too() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(subscribed_settings(Mode::NoRedis, dir.path())).await;
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    watcher.next().await.unwrap();
    let (email, reg) = app.register().await;
    let login = app.login(&email, PASSWORD).await.unwrap();
    let mut conn = super::sql(&app).await;
    // What the previous release's Logout and UpdateProfile write.
    let session: uuid::Uuid = sid(&login.session).parse().unwrap();
    sqlx::query(
        "with revoked as (
             update sessions set revoked_at = now() where id = $1
             returning token_hash, user_id, absolute_expires_at
         )
         insert into session_invalidations (token_hash, user_id, expires_at)
         select token_hash, user_id, absolute_expires_at from revoked",
    )
    .bind(session)
    .execute(&mut conn)
    .await
    .unwrap();
    let user: uuid::Uuid = reg.user_id.parse().unwrap();
    sqlx::query("insert into profile_invalidations (user_id, version) values ($1, 7)")
        .bind(user)
        .execute(&mut conn)
        .await
        .unwrap();
    let (events, _) = watcher.events(2).await;
    assert_eq!(kinds(&events), ["session_revoked", "profile_updated"]);
    let Some(Kind::SessionRevoked(revoked)) = &events[0].kind else {
        unreachable!()
    };
    assert_eq!(revoked.session_id, session.to_string());
    assert_eq!(revoked.user_id, reg.user_id);
    let Some(Kind::ProfileUpdated(profile)) = &events[1].kind else {
        unreachable!()
    };
    assert_eq!(profile.version, 7);
    // This release's own changes are one event each, not two.
    let other = app.login(&email, PASSWORD).await.unwrap();
    app.logout(&other.session_token).await.unwrap();
    let (events, _) = watcher.events(1).await;
    assert_eq!(kinds(&events), ["session_revoked"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_serves_at_most_its_share_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::NoRedis, dir.path());
    settings.events.max_subscribers = 2;
    settings.events.max_strict = 1;
    let app = spawn_with(settings).await;
    let open = |mode| Watcher::open(&app, Some(SUBSCRIBER_KEY), mode, "");
    let strict = open(pb::Mode::Strict).await.unwrap();
    let full = assert_code(
        open(pb::Mode::Strict).await.map(|_| ()),
        Code::ResourceExhausted,
    );
    assert!(full.message().contains("event streams"));
    let bounded = open(pb::Mode::Bounded).await.unwrap();
    assert_code(
        open(pb::Mode::Bounded).await.map(|_| ()),
        Code::ResourceExhausted,
    );
    // A stream that ends gives its place back.
    drop(bounded.close());
    crate::helpers::eventually(Duration::from_secs(10), "a place is free again", || async {
        open(pb::Mode::Bounded).await.is_ok()
    })
    .await;
    drop(strict);
}

/// A bounded subscriber keeping a cache acknowledges too: later batches name the latest
/// acknowledgement received before their read (`read_after`), which bounds how old the read
/// may be; one that never acknowledges gets 0 (its subscribe request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_stream_says_which_acknowledgement_its_read_came_after() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(subscribed_settings(Mode::NoRedis, dir.path())).await;
    let mut silent = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    let mut acking = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    let first = acking.next().await.unwrap();
    assert_eq!(first.read_after, 0);
    let mut sequence = 0;
    let mut position = first.position;
    for _ in 0..3 {
        sequence = acking.ack(&position).await;
        // The batch read before the acknowledgement arrived may still come: the next ones
        // name it.
        let batch = loop {
            let batch = acking.next().await.unwrap();
            if batch.read_after == sequence {
                break batch;
            }
            assert!(batch.read_after < sequence, "{batch:?}");
        };
        position = batch.position;
    }
    assert_eq!(sequence, 3);
    for _ in 0..3 {
        assert_eq!(silent.next().await.unwrap().read_after, 0);
    }
}
