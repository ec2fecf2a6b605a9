use std::time::Duration;

use tonic::Code;

use crate::{
    both_modes,
    helpers::{
        Mode, PASSWORD, assert_code, eventually, spawn_app, spawn_with, test_settings,
        violation_fields,
    },
};

both_modes!(
    logout_revokes_and_is_idempotent,
    malformed_tokens_are_rejected_without_any_query,
    a_cached_session_is_validated_without_postgres,
    idle_sessions_expire,
    activity_extends_the_idle_deadline_up_to_the_absolute_one,
    last_seen_is_written_at_most_once_per_touch_interval,
);

async fn logout_revokes_and_is_idempotent(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let other = app.login(&email, PASSWORD).await.unwrap();
    app.validate(&reg.session_token).await.unwrap();

    app.logout(&reg.session_token).await.unwrap();
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
    // Again: still OK. A token authd never minted (its MAC does not check) is refused like a
    // malformed one, nothing looked up.
    app.logout(&reg.session_token).await.unwrap();
    let never_issued = crate::helpers::made_up_token();
    assert_code(app.logout(&never_issued).await, Code::Unauthenticated);
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
    // Only that session ended.
    app.validate(&other.session_token).await.unwrap();
}

async fn malformed_tokens_are_rejected_without_any_query(mode: Mode) {
    let app = spawn_app(mode).await;
    let (_, reg) = app.register().await;
    let before = app.queries();
    let valid = &reg.session_token;
    for bad in [
        String::new(),
        "authd_".into(),
        "Bearer xyz".into(),
        valid[..valid.len() - 1].into(),
        format!("{valid}x"),
        valid.replacen("authd_", "authz_", 1),
        format!("{}*", &valid[..valid.len() - 1]),
    ] {
        let status = assert_code(app.validate(&bad).await, Code::Unauthenticated);
        assert_eq!(status.message(), "invalid or expired session");
        assert_code(app.logout(&bad).await, Code::Unauthenticated);
    }
    assert_eq!(app.queries(), before, "rejected before reaching PostgreSQL");
}

async fn a_cached_session_is_validated_without_postgres(mode: Mode) {
    let app = spawn_app(mode).await;
    let (_, reg) = app.register().await;
    let before = app.queries();
    for _ in 0..20 {
        app.validate(&reg.session_token).await.unwrap();
    }
    let per_validation = (app.queries() - before) as f64 / 20.0;
    match mode {
        Mode::Redis | Mode::Cluster => assert_eq!(per_validation, 0.0),
        Mode::NoRedis => assert_eq!(per_validation, 1.0),
    }
}

async fn idle_sessions_expire(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.session.idle_timeout = Duration::from_secs(2);
    settings.session.touch_interval = Duration::from_secs(1);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let session = app.validate(&reg.session_token).await.unwrap();
    assert_eq!(
        session.expires_at.unwrap().seconds - session.created_at.unwrap().seconds,
        2
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
}

async fn activity_extends_the_idle_deadline_up_to_the_absolute_one(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.session.idle_timeout = Duration::from_millis(1500);
    settings.session.absolute_timeout = Duration::from_secs(4);
    settings.session.touch_interval = Duration::from_millis(500);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    // Used every 0.7 s, the session outlives its 1.5 s idle timeout...
    let mut last = None;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        last = Some(app.validate(&reg.session_token).await.unwrap());
    }
    // ...and its deadline is now capped by the absolute lifetime (created + 4 s).
    let last = last.unwrap();
    let created = last.created_at.unwrap();
    let expires = last.expires_at.unwrap();
    let lifetime =
        (expires.seconds - created.seconds) as f64 + f64::from(expires.nanos - created.nanos) / 1e9;
    assert!((lifetime - 4.0).abs() < 1e-3, "lifetime {lifetime}");
    // Past the absolute deadline, activity no longer helps.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
}

async fn last_seen_is_written_at_most_once_per_touch_interval(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.session.touch_interval = Duration::from_secs(1);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let created = reg.session.unwrap().created_at;
    for _ in 0..5 {
        let session = app.validate(&reg.session_token).await.unwrap();
        assert_eq!(session.last_seen_at, created, "not yet due");
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let touched = app.validate(&reg.session_token).await.unwrap();
    assert!(touched.last_seen_at.unwrap().seconds > created.unwrap().seconds);
    // The write is durable and visible on the next read, cached or not.
    let again = app.validate(&reg.session_token).await.unwrap();
    assert_eq!(again.last_seen_at, touched.last_seen_at);
    assert_eq!(again.expires_at, touched.expires_at);
}

/// Step-up: ValidateSession with `max_auth_age` accepts a session whose password was checked
/// within it and answers FAILED_PRECONDITION (REAUTHENTICATION_REQUIRED, with the session's
/// `authenticated_at`) past it — judged on the in-process copy, with no other lookup; a
/// ChangePassword on the session makes it recent again. A negative age is INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_needs_a_recent_password_check() {
    use tonic_types::StatusExt;
    let app = spawn_app(Mode::Redis).await;
    let (_, registered) = app.register().await;
    let token = registered.session_token.as_str();
    let validate = |seconds: i64| {
        let mut auth = app.auth.clone();
        async move {
            let request = authd::proto::authd::v1::ValidateSessionRequest {
                session_token: token.to_owned(),
                max_auth_age: Some(prost_types::Duration { seconds, nanos: 0 }),
                ..Default::default()
            };
            auth.validate_session(request).await.map(|r| r.into_inner())
        }
    };
    let fresh = validate(3600).await.unwrap();
    let authenticated_at = fresh.authenticated_at.unwrap();
    let hits = "authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
    // Once the instance holds its lease, the session is served from its memory.
    eventually(
        Duration::from_secs(15),
        "the session held in memory",
        || async {
            let before = app.metric(hits).await;
            validate(3600).await.unwrap();
            app.metric(hits).await > before
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = app.metric(hits).await;
    let stale = assert_code(validate(1).await, Code::FailedPrecondition);
    assert_eq!(app.metric(hits).await, before + 1.0, "answered from memory");
    let info = stale.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "REAUTHENTICATION_REQUIRED");
    let at = chrono::DateTime::parse_from_rfc3339(&info.metadata["authenticated_at"]).unwrap();
    assert_eq!(at.timestamp(), authenticated_at.seconds);
    validate(3600).await.unwrap();

    let negative = assert_code(validate(-1).await, Code::InvalidArgument);
    assert_eq!(violation_fields(&negative), ["max_auth_age"]);

    app.change_password(token, PASSWORD, "a brand new passphrase 42")
        .await
        .unwrap();
    let stepped_up = validate(1).await.unwrap();
    assert!(stepped_up.authenticated_at.unwrap().seconds > authenticated_at.seconds);
}
