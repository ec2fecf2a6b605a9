//! ListSessions, RevokeSession, RevokeAllSessions, ChangePassword, the per-user session cap.
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    both_modes,
    helpers::violation_fields,
    helpers::{Mode, PASSWORD, assert_code, spawn_app, spawn_with, test_settings},
};

const NEW_PASSWORD: &str = "a brand new passphrase";

both_modes!(
    list_shows_active_sessions_newest_first,
    revoke_session_only_reaches_the_callers_own_sessions,
    revoke_all_logs_out_everywhere,
    change_password_requires_the_current_one_and_revokes_the_others,
    the_least_recently_used_session_goes_beyond_the_cap,
);

async fn list_shows_active_sessions_newest_first(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let second = app.login(&email, PASSWORD).await.unwrap();
    let third = app
        .login_from(&email, PASSWORD, "2001:db8::1")
        .await
        .unwrap();
    app.logout(&second.session_token).await.unwrap();

    let list = app.list_sessions(&third.session_token).await.unwrap();
    let third_id = third.session.unwrap().session_id;
    assert_eq!(list.current_session_id, third_id);
    let ids: Vec<_> = list.sessions.iter().map(|s| s.session_id.clone()).collect();
    assert_eq!(ids, [third_id, reg.session.unwrap().session_id]);
    assert_eq!(list.sessions[0].ip_address, "2001:db8::1");
    assert_eq!(list.sessions[1].user_agent, "authd-tests/1.0");
    assert!(
        list.sessions
            .iter()
            .all(|s| s.created_at.is_some() && s.last_seen_at.is_some() && s.expires_at.is_some())
    );

    // Another user sees only their own.
    let (_, other) = app.register().await;
    let theirs = app.list_sessions(&other.session_token).await.unwrap();
    assert_eq!(theirs.sessions.len(), 1);
    assert_code(app.list_sessions("nonsense").await, Code::Unauthenticated);
}

async fn revoke_session_only_reaches_the_callers_own_sessions(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let phone = app.login(&email, PASSWORD).await.unwrap();
    let phone_id = phone.session.as_ref().unwrap().session_id.clone();
    let (_, stranger) = app.register().await;
    let stranger_id = stranger.session.as_ref().unwrap().session_id.clone();

    // Someone else's session and an unknown one look the same: NOT_FOUND.
    let theirs = assert_code(
        app.revoke_session(&reg.session_token, &stranger_id).await,
        Code::NotFound,
    );
    let unknown = assert_code(
        app.revoke_session(&reg.session_token, &uuid::Uuid::new_v4().to_string())
            .await,
        Code::NotFound,
    );
    assert_eq!(theirs.message(), unknown.message());
    app.validate(&stranger.session_token).await.unwrap();

    let status = assert_code(
        app.revoke_session(&reg.session_token, "not-a-uuid").await,
        Code::InvalidArgument,
    );
    assert_eq!(
        status.get_details_bad_request().unwrap().field_violations[0].field,
        "session_id"
    );

    app.revoke_session(&reg.session_token, &phone_id)
        .await
        .unwrap();
    assert_code(
        app.validate(&phone.session_token).await,
        Code::Unauthenticated,
    );
    app.validate(&reg.session_token).await.unwrap();
    // Repeating it is harmless.
    app.revoke_session(&reg.session_token, &phone_id)
        .await
        .unwrap();
}

async fn revoke_all_logs_out_everywhere(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(app.login(&email, PASSWORD).await.unwrap().session_token);
    }
    assert_eq!(app.revoke_all(&reg.session_token, false).await.unwrap(), 3);
    for token in &others {
        assert_code(app.validate(token).await, Code::Unauthenticated);
    }
    app.validate(&reg.session_token).await.unwrap();

    let fresh = app.login(&email, PASSWORD).await.unwrap().session_token;
    assert_eq!(app.revoke_all(&reg.session_token, true).await.unwrap(), 2);
    assert_code(
        app.validate(&reg.session_token).await,
        Code::Unauthenticated,
    );
    assert_code(app.validate(&fresh).await, Code::Unauthenticated);
}

async fn change_password_requires_the_current_one_and_revokes_the_others(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let before = app.validate_full(&reg.session_token).await.unwrap();
    let created = before.session.unwrap().created_at;
    assert_eq!(
        before.authenticated_at, created,
        "password checked at registration"
    );
    let other = app.login(&email, PASSWORD).await.unwrap().session_token;

    assert_code(
        app.change_password(&reg.session_token, "wrong password!", NEW_PASSWORD)
            .await,
        Code::Unauthenticated,
    );
    let status = assert_code(
        app.change_password(&reg.session_token, PASSWORD, "short")
            .await,
        Code::InvalidArgument,
    );
    let fields = violation_fields(&status);
    assert_eq!(fields, ["new_password"]);
    app.validate(&other).await.expect("nothing changed yet");

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let revoked = app
        .change_password(&reg.session_token, PASSWORD, NEW_PASSWORD)
        .await
        .unwrap();
    assert_eq!(revoked, 1);
    assert_code(app.validate(&other).await, Code::Unauthenticated);
    let after = app.validate_full(&reg.session_token).await.unwrap();
    assert!(
        after.authenticated_at.unwrap().seconds * 1_000_000_000
            + i64::from(after.authenticated_at.unwrap().nanos)
            > created.unwrap().seconds * 1_000_000_000 + i64::from(created.unwrap().nanos),
        "the calling session was just re-authenticated"
    );
    assert_code(app.login(&email, PASSWORD).await, Code::Unauthenticated);
    app.login(&email, NEW_PASSWORD).await.unwrap();
}

async fn the_least_recently_used_session_goes_beyond_the_cap(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.session.max_per_user = 3;
    settings.session.touch_interval = std::time::Duration::from_millis(100);
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;
    let second = app.login(&email, PASSWORD).await.unwrap().session_token;
    let third = app.login(&email, PASSWORD).await.unwrap().session_token;
    // Using the first session makes the second the least recently used.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    app.validate(&reg.session_token).await.unwrap();

    let fourth = app.login(&email, PASSWORD).await.unwrap().session_token;
    assert_code(app.validate(&second).await, Code::Unauthenticated);
    for token in [&reg.session_token, &third, &fourth] {
        app.validate(token).await.unwrap();
    }
    assert_eq!(app.list_sessions(&fourth).await.unwrap().sessions.len(), 3);
}

/// Logins with the old password racing a ChangePassword: none of the sessions they got may
/// outlive the change (a login whose password check started before the change committed must
/// not insert its session after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_login_with_the_old_password_outlives_a_password_change() {
    let mut settings = test_settings(Mode::Redis);
    settings.auth.hash_concurrency = 1;
    let app = std::sync::Arc::new(spawn_with(settings).await);
    for _ in 0..8 {
        let (email, reg) = app.register().await;
        let change = {
            let (app, token) = (app.clone(), reg.session_token.clone());
            tokio::spawn(async move {
                app.change_password(&token, PASSWORD, NEW_PASSWORD)
                    .await
                    .unwrap()
            })
        };
        // Logins keep arriving while the change runs: some read the old hash before it commits
        // and check the password after. At most 4, so that with the change they stay within
        // the account's burst of guesses (5): a refused change would test nothing.
        let mut logins = Vec::new();
        while !change.is_finished() && logins.len() < 4 {
            let (app, email) = (app.clone(), email.clone());
            logins.push(tokio::spawn(
                async move { app.login(&email, PASSWORD).await },
            ));
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
        change.await.unwrap();
        for login in logins {
            if let Ok(login) = login.await.unwrap() {
                assert_code(
                    app.validate(&login.session_token).await,
                    Code::Unauthenticated,
                );
            }
        }
        app.validate(&reg.session_token).await.unwrap();
    }
}
