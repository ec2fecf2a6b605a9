//! Guessing codes of a second factor: what stops it, and what concurrent guesses cost.
use std::time::Duration;

use authd::proto::authd::v1::complete_second_factor_request::Factor;
use tonic::Code;
use tonic_types::StatusExt;

use super::{
    Enrolled, challenge, challenge_of, challenge_with, complete, confirm, enroll, enrolled, pyotp,
    unix_now, wrong_code,
};
use crate::helpers::*;

/// Guessing TOTP codes is a password guess's cost: the right password does not refill the
/// account's bucket, each challenge dies after a few wrong codes, and the account's limit stops
/// the guesses after RATE_LIMIT__LOGIN_PER_EMAIL of them per window — 10⁶ guesses would take
/// 10⁵ windows (at the default 10 per 15 minutes, three years). Concurrent completions of one
/// challenge: exactly one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_totp_codes_is_stopped_by_the_rate_limit() {
    let app = spawn_app(Mode::Redis).await;
    let per_window = app.settings.rate_limit.login_per_email;
    let per_challenge = app.settings.accounts.second_factor_attempts;
    let Enrolled {
        email,
        secret,
        step,
        ..
    } = enrolled(&app).await;
    let mut right = Vec::new();
    for s in step - 1..=step + 2 {
        right.push(pyotp(&secret, s * 30).await);
    }
    let wrong = (0..)
        .map(|n| format!("{:06}", n * 7919 % 1_000_000))
        .filter(|c| !right.contains(c));
    let mut guesses = 0;
    let mut logins = 0;
    let mut on_challenge = 0;
    let mut open = None;
    let mut stopped = None;
    for guess in wrong.take(50) {
        let current = match open.take() {
            Some(current) => current,
            None => match app.login(&email, PASSWORD).await {
                Err(status) if status.code() == Code::ResourceExhausted => {
                    stopped = Some(status);
                    break;
                }
                other => {
                    let status = assert_code(other, Code::FailedPrecondition);
                    logins += 1;
                    on_challenge = 0;
                    status.get_details_error_info().unwrap().metadata["challenge"].clone()
                }
            },
        };
        match complete(&app, &current, Factor::TotpCode(guess)).await {
            Err(status) if status.code() == Code::Unauthenticated => {
                guesses += 1;
                on_challenge += 1;
                // A challenge takes ACCOUNTS__SECOND_FACTOR_ATTEMPTS wrong codes, then a new
                // login (its password) is needed.
                if on_challenge < per_challenge {
                    open = Some(current);
                }
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                stopped = Some(status);
                break;
            }
            other => panic!("a wrong code: {other:?}"),
        }
    }
    let stopped = stopped.expect("the guesses were stopped");
    assert!(
        stopped.get_details_retry_info().is_some(),
        "RetryInfo: {stopped:?}"
    );
    // Every login and every guess took one of the account's attempts of the window (the
    // enrolment's password another).
    assert!(
        guesses + logins < per_window,
        "{guesses} guesses and {logins} logins passed a limit of {per_window} per window"
    );
    assert!(guesses >= 1, "some guesses are answered");
    // The right code is refused too until the window passes: the limit holds the account.
    let code = pyotp(&secret, unix_now() + 30).await;
    let attempt = match app.login(&email, PASSWORD).await {
        Err(status) if status.code() == Code::FailedPrecondition => {
            let challenge = status.get_details_error_info().unwrap().metadata["challenge"].clone();
            complete(&app, &challenge, Factor::TotpCode(code))
                .await
                .map(|_| ())
        }
        other => other.map(|_| ()),
    };
    assert_code(attempt, Code::ResourceExhausted);

    // Without the guess bucket, what stops guesses is counted under the account's lock.
    let mut settings = test_settings(Mode::Redis);
    settings.rate_limit.login_per_email = 0;
    settings.rate_limit.max_failed_logins = 3;
    settings.accounts.second_factor_attempts = 1;
    let app = spawn_with(settings).await;
    let failed = "authd_failed_logins_total";

    // One challenge completed by four callers at once with one recovery code: one session, and
    // no failure counted for the others (they found the challenge used, before the code).
    let Enrolled {
        email, recovery, ..
    } = enrolled(&app).await;
    let shared = challenge(&app, &email).await;
    let before = app.metric(failed).await;
    let attempts = (0..4).map(|_| {
        let (app, shared, code) = (&app, shared.clone(), recovery[0].clone());
        async move { complete(app, &shared, Factor::RecoveryCode(code)).await }
    });
    let results = futures::future::join_all(attempts).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "{results:?}");
    for result in results.into_iter().filter(Result::is_err) {
        assert_code(result, Code::Unauthenticated);
    }
    assert_eq!(
        app.metric(failed).await,
        before,
        "the losers are no failures"
    );

    // A device trusted from a password-only sign-in, before the factor existed, is capped like
    // any other: only a sign-in with the factor makes a device trusted with it.
    let (email, registered) = app.register().await;
    let device = "203.0.113.9";
    app.login_from(&email, PASSWORD, device).await.unwrap();
    let secret = enroll(&app, &registered.session_token).await.secret;
    let now = unix_now();
    confirm(&app, &registered.session_token, &pyotp(&secret, now).await)
        .await
        .unwrap();
    capped_after_three_wrong_codes(&app, &email, device, &secret).await;

    // A password-only session is never stored for an account whose factor is confirmed, even by
    // a Login that checked the password before the confirmation committed: the insert, holding
    // the account's row, sees the factor (and the Login answers a challenge).
    let id = uuid::Uuid::parse_str(&registered.user_id).unwrap();
    let (stored, _, _) = app
        .db
        .users()
        .find_credentials_by_id(id)
        .await
        .unwrap()
        .unwrap();
    let policy = authd::auth::session::SessionPolicy::from(&app.settings.session);
    let record = policy.start(id, Default::default(), chrono::Utc::now());
    let session = authd::store::NewSession {
        record: &record,
        token_hash: &[9; 32],
        key_id: 1,
        proof: authd::store::Proof::Password(&stored.password_hash),
        max_per_user: 50,
        client: None,
    };
    let since = authd::store::Since {
        idle: Duration::from_secs(3600),
        pending_after: chrono::Utc::now(),
    };
    let inserted = app.db.sessions().insert_capped(&session, since).await;
    assert!(
        matches!(inserted, Ok(Err(authd::store::Refusal::FactorRequired))),
        "a password-only session for an account with a factor"
    );

    // The client `complete` speaks for: a sign-in completed from it makes it trusted with the
    // factor, until the factor is removed or replaced.
    let device = "198.51.100.7";
    // A device trusted from a password-only sign-in keeps, at the completion, what it has at
    // Login: its own bucket, and no lockout by wrong passwords from elsewhere.
    let (email, registered) = app.register().await;
    app.login_from(&email, PASSWORD, device).await.unwrap();
    let secret = enroll(&app, &registered.session_token).await.secret;
    let now = unix_now();
    let first_recovery = confirm(&app, &registered.session_token, &pyotp(&secret, now).await)
        .await
        .unwrap();
    for _ in 0..3 {
        let guess = app
            .login_from(&email, "not the password", "192.0.2.1")
            .await;
        assert_code(guess, Code::Unauthenticated);
    }
    let status = app.login_from(&email, PASSWORD, device).await;
    let open = challenge_of(assert_code(status, Code::FailedPrecondition));
    let right = pyotp(&secret, now + 30).await;
    let owner = complete(&app, &open, Factor::TotpCode(right)).await;
    let owner = owner.expect("the owner's device signs in despite the lockout");

    // Trust earned with a factor ends with it: once it is removed and another confirmed, the
    // device is capped like any other.
    let strong = owner.session_token;
    let secret = replace_factor(&app, &strong, &first_recovery[0]).await;
    capped_after_three_wrong_codes(&app, &email, device, &secret).await;

    // Twenty wrong codes at once on a challenge that takes one: one is checked.
    let guessed = enrolled(&app).await;
    let shared = challenge(&app, &guessed.email).await;
    let wrong = wrong_code(&guessed.secret, unix_now()).await;
    let before = app.metric(failed).await;
    let attempts = (0..20).map(|_| {
        let (app, shared, wrong) = (&app, shared.clone(), wrong.clone());
        async move { complete(app, &shared, Factor::TotpCode(wrong)).await }
    });
    for result in futures::future::join_all(attempts).await {
        assert_code(result, Code::Unauthenticated);
    }
    assert_eq!(
        app.metric(failed).await,
        before + 1.0,
        "one guess was checked"
    );
    // A second, then a new password (which clears the account's count of failed logins, and
    // would refill a guess bucket), then a third: the lockout's 3 reached on the factor, which
    // now refuses even its right code — no new password lifts its count.
    let open = challenge(&app, &guessed.email).await;
    let result = complete(&app, &open, Factor::TotpCode(wrong.clone())).await;
    assert_code(result, Code::Unauthenticated);
    let renewed = "a brand new passphrase 42";
    app.change_password(&guessed.token, PASSWORD, renewed)
        .await
        .unwrap();
    let open = challenge_with(&app, &guessed.email, renewed).await;
    let result = complete(&app, &open, Factor::TotpCode(wrong.clone())).await;
    assert_code(result, Code::Unauthenticated);
    let open = challenge_with(&app, &guessed.email, renewed).await;
    let right = pyotp(&guessed.secret, unix_now() + 30).await;
    let refused = complete(&app, &open, Factor::TotpCode(right)).await;
    assert_code(refused, Code::ResourceExhausted);
}

/// From a fresh session of level 2: removes the factor (with one of its recovery codes) and
/// confirms a new one; the new secret.
async fn replace_factor(app: &TestApp, strong: &str, recovery_code: &str) -> String {
    use authd::proto::authd::v1 as pb;
    let removal = app
        .auth
        .clone()
        .remove_totp(pb::RemoveTotpRequest {
            session_token: strong.into(),
            factor: Some(pb::remove_totp_request::Factor::RecoveryCode(
                recovery_code.into(),
            )),
        })
        .await;
    removal.expect("removed");
    let secret = enroll(app, strong).await.secret;
    let now = unix_now();
    confirm(app, strong, &pyotp(&secret, now).await)
        .await
        .unwrap();
    secret
}

/// Signing in from `device`, three wrong codes (a challenge takes one here, and the app's cap is
/// 3) are answered as wrong, and then even the right one is refused: the factor's cap holds.
async fn capped_after_three_wrong_codes(app: &TestApp, email: &str, device: &str, secret: &str) {
    let wrong = wrong_code(secret, unix_now()).await;
    for _ in 0..3 {
        let status = app.login_from(email, PASSWORD, device).await;
        let open = challenge_of(assert_code(status, Code::FailedPrecondition));
        let result = complete(app, &open, Factor::TotpCode(wrong.clone())).await;
        assert_code(result, Code::Unauthenticated);
    }
    let status = app.login_from(email, PASSWORD, device).await;
    let open = challenge_of(assert_code(status, Code::FailedPrecondition));
    let right = pyotp(secret, unix_now() + 30).await;
    let capped = complete(app, &open, Factor::TotpCode(right)).await;
    assert_code(capped, Code::ResourceExhausted);
}
