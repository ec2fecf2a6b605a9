//! What operators do to an account's password: a reset code they deliver themselves, and a new
//! password required at the next login (the login answers with a code instead of a session).
use authd::proto::authd::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use super::admit_operator;
use crate::{
    admin::{KEY as ADMIN_KEY, admin, get_user, with_key},
    both_modes,
    helpers::*,
};

const NEW_PASSWORD: &str = "a brand new passphrase 42";

/// An app admitting [`ADMIN_KEY`] to AdminService (and no notifier: neither needs one).
async fn operated(mode: Mode, dir: &std::path::Path) -> TestApp {
    let mut settings = test_settings(mode);
    admit_operator(&mut settings, dir);
    spawn_with(settings).await
}

both_modes!(a_required_change_turns_the_next_login_into_a_code);

async fn a_required_change_turns_the_next_login_into_a_code(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let app = operated(mode, dir.path()).await;
    let (email, registered) = app.register().await;
    let user_id = registered.user_id.clone();
    let request = pb::RequirePasswordChangeRequest {
        user_id: user_id.clone(),
    };
    for _ in 0..2 {
        admin(&app)
            .require_password_change(with_key(ADMIN_KEY, request.clone()))
            .await
            .expect("idempotent");
    }
    assert!(
        get_user(&app, ADMIN_KEY, &user_id)
            .await
            .unwrap()
            .password_change_required
    );
    // The session already open is kept; a wrong password is answered as always.
    app.validate(&registered.session_token).await.unwrap();
    assert_code(
        app.login(&email, "not the password").await,
        Code::Unauthenticated,
    );
    let status = assert_code(app.login(&email, PASSWORD).await, Code::FailedPrecondition);
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(
        (info.reason.as_str(), info.domain.as_str()),
        ("PASSWORD_CHANGE_REQUIRED", "authd")
    );
    let code = info.metadata.get("code").expect("a code").clone();
    assert!(info.metadata.contains_key("expires_at"), "{info:?}");

    assert_eq!(app.complete_reset(&code, NEW_PASSWORD).await.unwrap(), 1);
    assert_code(
        app.validate(&registered.session_token).await,
        Code::Unauthenticated,
    );
    app.login(&email, NEW_PASSWORD).await.unwrap();
    assert!(
        !get_user(&app, ADMIN_KEY, &user_id)
            .await
            .unwrap()
            .password_change_required
    );
}

/// ChangePassword clears the requirement too; an operator's reset code completes like a
/// notifier's, one per call; unknown and disabled accounts are NOT_FOUND; only operators ask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reset_passwords_with_codes_they_deliver() {
    let dir = tempfile::tempdir().unwrap();
    let app = operated(Mode::Redis, dir.path()).await;
    let (email, registered) = app.register().await;
    let user_id = registered.user_id.clone();
    let request = pb::RequirePasswordChangeRequest {
        user_id: user_id.clone(),
    };
    admin(&app)
        .require_password_change(with_key(ADMIN_KEY, request))
        .await
        .unwrap();
    app.change_password(&registered.session_token, PASSWORD, NEW_PASSWORD)
        .await
        .unwrap();
    app.login(&email, NEW_PASSWORD)
        .await
        .expect("cleared by ChangePassword");

    let reset = || pb::ResetUserPasswordRequest {
        user_id: user_id.clone(),
    };
    let first = admin(&app)
        .reset_user_password(with_key(ADMIN_KEY, reset()))
        .await;
    let second = admin(&app)
        .reset_user_password(with_key(ADMIN_KEY, reset()))
        .await;
    let (first, second) = (first.unwrap().into_inner(), second.unwrap().into_inner());
    assert_ne!(first.code, second.code);
    assert!(first.expires_at.is_some());
    let later = "an operator-led passphrase";
    assert_eq!(app.complete_reset(&second.code, later).await.unwrap(), 2);
    assert_code(
        app.complete_reset(&first.code, later).await,
        Code::Unauthenticated,
    );
    app.login(&email, later).await.unwrap();

    let unknown = pb::ResetUserPasswordRequest {
        user_id: uuid::Uuid::new_v4().to_string(),
    };
    let status = admin(&app)
        .reset_user_password(with_key(ADMIN_KEY, unknown))
        .await;
    assert_code(status, Code::NotFound);
    let disable = pb::DisableUserRequest {
        user_id: user_id.clone(),
        reason: "test".into(),
    };
    admin(&app)
        .disable_user(with_key(ADMIN_KEY, disable))
        .await
        .unwrap();
    let disabled = admin(&app)
        .reset_user_password(with_key(ADMIN_KEY, reset()))
        .await;
    assert_code(disabled, Code::NotFound);
    let anonymous = admin(&app)
        .reset_user_password(tonic::Request::new(reset()))
        .await;
    assert_code(anonymous, Code::Unauthenticated);
}
