use std::time::Duration;

use futures::future::join_all;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    both_modes,
    helpers::{Mode, PASSWORD, assert_code, spawn_app, spawn_with, test_settings, unique_email},
};

both_modes!(
    login_issues_a_new_session_each_time,
    email_is_trimmed_and_case_insensitive,
    wrong_password_and_unknown_email_are_indistinguishable,
    excess_logins_are_refused_at_once_and_never_starve_validation,
);

async fn login_issues_a_new_session_each_time(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let first = app.login(&email, PASSWORD).await.unwrap();
    let second = app.login(&email, PASSWORD).await.unwrap();
    let ids: Vec<_> = [&first, &second]
        .iter()
        .map(|l| l.session.as_ref().unwrap().session_id.clone())
        .collect();
    assert_ne!(ids[0], ids[1]);
    assert_ne!(first.session_token, second.session_token);
    assert_ne!(first.session_token, reg.session_token);
    for token in [
        &reg.session_token,
        &first.session_token,
        &second.session_token,
    ] {
        let session = app.validate(token).await.unwrap();
        assert_eq!(session.user_id, reg.user_id);
    }
}

async fn email_is_trimmed_and_case_insensitive(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, reg) = app.register().await;
    let login = app
        .login(&format!("\t{} ", email.to_uppercase()), PASSWORD)
        .await
        .unwrap();
    assert_eq!(login.session.unwrap().user_id, reg.user_id);
}

async fn wrong_password_and_unknown_email_are_indistinguishable(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, _) = app.register().await;
    let wrong = assert_code(
        app.login(&email, "not the password").await,
        Code::Unauthenticated,
    );
    let unknown = assert_code(
        app.login(&unique_email(), PASSWORD).await,
        Code::Unauthenticated,
    );
    assert_eq!(wrong.message(), unknown.message());
    assert_eq!(wrong.details(), unknown.details());
    // Missing fields are input errors, not credential errors.
    let status = assert_code(app.login("", "").await, Code::InvalidArgument);
    assert_eq!(
        status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .len(),
        2
    );
}

async fn excess_logins_are_refused_at_once_and_never_starve_validation(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.auth.hash_concurrency = 1;
    settings.auth.hash_queue = 1;
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;

    let logins = join_all((0..12).map(|_| app.login(&email, PASSWORD)));
    let validations = join_all((0..50).map(|_| app.validate(&reg.session_token)));
    let (logins, validations) = tokio::join!(logins, validations);

    let mut refused = 0;
    for login in logins {
        match login {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let retry = status.get_details_retry_info().expect("RetryInfo attached");
                assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0,
        "12 concurrent logins against 1 slot + 1 queued"
    );
    assert!(refused < 12, "the admitted logins succeed");
    for validation in validations {
        validation.expect("validation is never refused for lack of hashing capacity");
    }
}
