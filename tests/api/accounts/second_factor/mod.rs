//! The second factor as an end user meets it: a TOTP enrolment read by an independent
//! authenticator (pyotp), logins that answer a challenge, recovery codes, removal, and
//! ValidateSession's level requirement.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use authd::proto::authd::v1::{self as pb, complete_second_factor_request::Factor};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::admit_operator;

mod guessing;
use crate::{
    admin::{KEY as ADMIN_KEY, admin, get_user, with_key},
    helpers::*,
};

/// What pyotp (an independent RFC 6238 implementation) computes for `secret` at Unix time `t`.
async fn pyotp(secret: &str, t: i64) -> String {
    let out = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import pyotp, sys; print(pyotp.TOTP(sys.argv[1]).at(int(sys.argv[2])))",
            secret,
            &t.to_string(),
        ])
        .output()
        .await
        .expect("python3 is on PATH");
    assert!(
        out.status.success(),
        "pyotp failed (pip install pyotp; see docs/development.md): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What pyotp reads from an `otpauth://` URI: (secret, issuer, account, digits, period).
async fn pyotp_uri(uri: &str) -> Vec<String> {
    let script = "import pyotp, sys\n\
                  t = pyotp.parse_uri(sys.argv[1])\n\
                  print(t.secret); print(t.issuer); print(t.name); print(t.digits); \
                  print(t.interval); print(t.digest().name)";
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, uri])
        .output()
        .await
        .expect("python3 is on PATH");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Unix time now. A code of the step after it is right, and later than any accepted before, for
/// the next 30 s at least, whenever the server checks it: what a test needs but where it checks
/// the previous step's code ([`mid_step`]).
fn unix_now() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(now.as_secs()).unwrap()
}

/// Unix time now, at least 10 s from the end of its 30-second step (so that a code computed now
/// for the previous step is still within the server's window when it is checked).
async fn mid_step() -> i64 {
    loop {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let into = now.as_secs() % 30;
        if into < 20 {
            return i64::try_from(now.as_secs()).unwrap();
        }
        tokio::time::sleep(Duration::from_secs(31 - into)).await;
    }
}

async fn enroll(app: &TestApp, token: &str) -> pb::EnrollTotpResponse {
    app.auth
        .clone()
        .enroll_totp(pb::EnrollTotpRequest {
            session_token: token.into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("enrolment starts")
        .into_inner()
}

async fn confirm(app: &TestApp, token: &str, code: &str) -> Result<Vec<String>, Status> {
    app.auth
        .clone()
        .confirm_totp(pb::ConfirmTotpRequest {
            session_token: token.into(),
            code: code.into(),
        })
        .await
        .map(|r| r.into_inner().recovery_codes)
}

/// The challenge a Login's FAILED_PRECONDITION carries.
fn challenge_of(status: Status) -> String {
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SECOND_FACTOR_REQUIRED", "{info:?}");
    assert!(info.metadata.contains_key("expires_at"), "{info:?}");
    info.metadata["challenge"].clone()
}

/// Login with the right password: the challenge it answers instead of a session.
async fn challenge(app: &TestApp, email: &str) -> String {
    challenge_with(app, email, PASSWORD).await
}

async fn challenge_with(app: &TestApp, email: &str, password: &str) -> String {
    challenge_of(assert_code(
        app.login(email, password).await,
        Code::FailedPrecondition,
    ))
}

async fn complete(
    app: &TestApp,
    challenge: &str,
    factor: Factor,
) -> Result<pb::CompleteSecondFactorResponse, Status> {
    app.auth
        .clone()
        .complete_second_factor(pb::CompleteSecondFactorRequest {
            challenge: challenge.into(),
            factor: Some(factor),
            client: Some(pb::ClientInfo {
                ip_address: "198.51.100.7".into(),
                ..Default::default()
            }),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn validate_at(
    app: &TestApp,
    token: &str,
    level: pb::AssuranceLevel,
) -> Result<pb::ValidateSessionResponse, Status> {
    app.auth
        .clone()
        .validate_session(pb::ValidateSessionRequest {
            session_token: token.into(),
            min_assurance_level: level.into(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// An account with a confirmed TOTP.
struct Enrolled {
    email: String,
    user_id: String,
    /// The session it registered with (of level 1).
    token: String,
    secret: String,
    recovery: Vec<String>,
    /// The step whose code confirmed it.
    step: i64,
}

async fn enrolled(app: &TestApp) -> Enrolled {
    let (email, registered) = app.register().await;
    let token = registered.session_token;
    let secret = enroll(app, &token).await.secret;
    let now = unix_now();
    let recovery = confirm(app, &token, &pyotp(&secret, now).await)
        .await
        .expect("confirmed");
    Enrolled {
        email,
        user_id: registered.user_id,
        token,
        secret,
        recovery,
        step: now.div_euclid(30),
    }
}

/// A code that is none of `secret`'s for the steps around `now`.
async fn wrong_code(secret: &str, now: i64) -> String {
    let mut right = Vec::new();
    for t in [now - 30, now, now + 30] {
        right.push(pyotp(secret, t).await);
    }
    (0..)
        .map(|n| format!("{:06}", n * 7919 % 1_000_000))
        .find(|c| !right.contains(c))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_factor_from_enrolment_to_removal_with_redis() {
    the_second_factor_from_enrolment_to_removal(Mode::Redis).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_second_factor_from_enrolment_to_removal_without_redis() {
    the_second_factor_from_enrolment_to_removal(Mode::NoRedis).await;
}

async fn the_second_factor_from_enrolment_to_removal(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = crate::jwt::enable(test_settings(mode));
    admit_operator(&mut settings, dir.path());
    // The guess limits have a test of their own (below): here every call is answered.
    settings.rate_limit.login_per_email = 0;
    let app = spawn_with(settings).await;
    let (email, registered) = app.register().await;
    let first = registered.session_token;

    // The enrolment, as an authenticator app reads it.
    let enrolment = enroll(&app, &first).await;
    let read = pyotp_uri(&enrolment.otpauth_uri).await;
    assert_eq!(read[0], enrolment.secret, "the URI carries the secret");
    assert_eq!(&read[1..], ["authd", email.as_str(), "6", "30", "sha1"]);
    // Until it is confirmed, nothing changes: Login still answers a session.
    app.login(&email, PASSWORD).await.expect("not yet a factor");
    let secret = enrolment.secret;

    // A wrong code does not confirm; a code of the previous step (30 s of skew) does.
    let now = mid_step().await;
    let wrong = wrong_code(&secret, now).await;
    assert_code(confirm(&app, &first, &wrong).await, Code::Unauthenticated);
    let recovery = confirm(&app, &first, &pyotp(&secret, now - 30).await)
        .await
        .expect("a code of the previous step confirms");
    assert_eq!(recovery.len(), 10);
    let status = assert_code(
        confirm(&app, &first, &pyotp(&secret, now).await).await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        status.get_details_error_info().unwrap().reason,
        "SECOND_FACTOR_ENROLLED"
    );
    // The session opened with the password alone stays, at level 1.
    let v = validate_at(&app, &first, pb::AssuranceLevel::Unspecified)
        .await
        .unwrap();
    assert_eq!(v.assurance_level(), pb::AssuranceLevel::Aal1);

    // Login now answers a challenge; a wrong password is answered as always.
    assert_code(
        app.login(&email, "not the password").await,
        Code::Unauthenticated,
    );
    let first_challenge = challenge(&app, &email).await;
    // A code of the next step (30 s of skew the other way) completes it: a session of level 2.
    let next = pyotp(&secret, now + 30).await;
    let done = complete(&app, &first_challenge, Factor::TotpCode(next.clone()))
        .await
        .expect("a code of the next step completes the login");
    let session = done.session.unwrap();
    assert_eq!(session.assurance_level(), pb::AssuranceLevel::Aal2);
    let strong = done.session_token;
    let v = validate_at(&app, &strong, pb::AssuranceLevel::Aal2)
        .await
        .expect("a level-2 session meets a level-2 requirement");
    assert_eq!(v.assurance_level(), pb::AssuranceLevel::Aal2);
    // Its JWTs say so (RFC 8176 `amr`); a level-1 session's say `pwd` only.
    for (token, amr) in [(&strong, vec!["pwd", "otp"]), (&first, vec!["pwd"])] {
        let jwt = crate::jwt::issue(&app, token, crate::jwt::AUDIENCE, None)
            .await
            .unwrap()
            .jwt;
        let payload = jwt.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["amr"], serde_json::json!(amr));
    }
    // A level-1 session does not, from whichever copy answers (the second ask is cached).
    for _ in 0..2 {
        let status = assert_code(
            validate_at(&app, &first, pb::AssuranceLevel::Aal2).await,
            Code::FailedPrecondition,
        );
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "SECOND_FACTOR_REQUIRED");
        assert_eq!(info.metadata["assurance_level"], "ASSURANCE_LEVEL_AAL1");
    }
    if mode == Mode::Redis {
        // Judged on the copy that answers: once the instance holds a session in its memory, a
        // level requirement is answered from there, with no lookup of its own.
        let hits = "authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
        for (token, level) in [
            (&first, pb::AssuranceLevel::Aal1),
            (&strong, pb::AssuranceLevel::Aal2),
        ] {
            eventually(Duration::from_secs(15), "held in memory", || async {
                let before = app.metric(hits).await;
                validate_at(&app, token, pb::AssuranceLevel::Unspecified)
                    .await
                    .unwrap();
                app.metric(hits).await > before
            })
            .await;
            let before = app.metric(hits).await;
            let answer = validate_at(&app, token, pb::AssuranceLevel::Aal2).await;
            assert_eq!(app.metric(hits).await, before + 1.0, "answered from memory");
            match level {
                pb::AssuranceLevel::Aal2 => {
                    assert_eq!(answer.unwrap().assurance_level(), level);
                }
                _ => {
                    assert_code(answer, Code::FailedPrecondition);
                }
            }
        }
    }
    // A level this release does not know is refused, never taken for "none".
    let unknown = app
        .auth
        .clone()
        .validate_session(pb::ValidateSessionRequest {
            session_token: first.clone(),
            min_assurance_level: 3,
            ..Default::default()
        })
        .await;
    let unknown = assert_code(unknown, Code::InvalidArgument);
    assert_eq!(violation_fields(&unknown), ["min_assurance_level"]);
    // The factor's changes need a session of level 2 (and a code of it).
    let weak = app
        .auth
        .clone()
        .regenerate_recovery_codes(pb::RegenerateRecoveryCodesRequest {
            session_token: first.clone(),
            factor: Some(pb::regenerate_recovery_codes_request::Factor::RecoveryCode(
                recovery[5].clone(),
            )),
        })
        .await;
    let weak = assert_code(weak, Code::FailedPrecondition);
    assert_eq!(
        weak.get_details_error_info().unwrap().reason,
        "SECOND_FACTOR_REQUIRED"
    );
    // The challenge is used; the code is used (and so is every earlier step's).
    assert_code(
        complete(&app, &first_challenge, Factor::TotpCode(next.clone())).await,
        Code::Unauthenticated,
    );
    let second_challenge = challenge(&app, &email).await;
    for code in [
        next,
        pyotp(&secret, now).await,
        pyotp(&secret, now - 60).await,
    ] {
        assert_code(
            complete(&app, &second_challenge, Factor::TotpCode(code)).await,
            Code::Unauthenticated,
        );
    }
    // A recovery code completes a login once, whatever its case and dashes.
    let typed = recovery[0].to_uppercase().replace('-', " ");
    let third_challenge = challenge(&app, &email).await;
    let by_recovery = complete(&app, &third_challenge, Factor::RecoveryCode(typed.clone()))
        .await
        .expect("a recovery code completes the login");
    assert_eq!(
        by_recovery.session.unwrap().assurance_level(),
        pb::AssuranceLevel::Aal2
    );
    let fourth_challenge = challenge(&app, &email).await;
    assert_code(
        complete(&app, &fourth_challenge, Factor::RecoveryCode(typed)).await,
        Code::Unauthenticated,
    );

    // New recovery codes (paid with one of the old ones) replace the old ones.
    let renewed = app
        .auth
        .clone()
        .regenerate_recovery_codes(pb::RegenerateRecoveryCodesRequest {
            session_token: strong.clone(),
            factor: Some(pb::regenerate_recovery_codes_request::Factor::RecoveryCode(
                recovery[1].clone(),
            )),
        })
        .await
        .expect("regenerated")
        .into_inner()
        .recovery_codes;
    assert_eq!(renewed.len(), 10);
    let fifth_challenge = challenge(&app, &email).await;
    assert_code(
        complete(
            &app,
            &fifth_challenge,
            Factor::RecoveryCode(recovery[2].clone()),
        )
        .await,
        Code::Unauthenticated,
    );

    // A new password voids the open challenges (a right recovery code then completes nothing).
    let before_change = challenge(&app, &email).await;
    let changed = "a brand new passphrase 42";
    app.change_password(&strong, PASSWORD, changed)
        .await
        .unwrap();
    let after_change = complete(
        &app,
        &before_change,
        Factor::RecoveryCode(renewed[1].clone()),
    )
    .await;
    assert_code(after_change, Code::Unauthenticated);
    // Removal needs a code of the factor; then Login answers a session again.
    let remove = |factor| pb::RemoveTotpRequest {
        session_token: strong.clone(),
        factor: Some(factor),
    };
    assert_code(
        app.auth
            .clone()
            .remove_totp(remove(pb::remove_totp_request::Factor::RecoveryCode(
                recovery[3].clone(),
            )))
            .await,
        Code::Unauthenticated,
    );
    app.auth
        .clone()
        .remove_totp(remove(pb::remove_totp_request::Factor::RecoveryCode(
            renewed[0].clone(),
        )))
        .await
        .expect("removed with a current recovery code");
    app.login(&email, changed)
        .await
        .expect("a password alone signs in again");

    // An operator removes a factor its owner lost: idempotent, and the open challenges die.
    let lost = enrolled(&app).await;
    let shown = get_user(&app, ADMIN_KEY, &lost.user_id).await.unwrap();
    assert_eq!((shown.second_factor, shown.recovery_codes_left), (true, 10));
    // An operator requiring a new password does not open a way around the factor: the password
    // still leads to a challenge, and only its right code to the reset code.
    admin(&app)
        .require_password_change(with_key(
            ADMIN_KEY,
            pb::RequirePasswordChangeRequest {
                user_id: lost.user_id.clone(),
            },
        ))
        .await
        .unwrap();
    let required = challenge(&app, &lost.email).await;
    let by_code = complete(
        &app,
        &required,
        Factor::RecoveryCode(lost.recovery[0].clone()),
    )
    .await;
    let by_code = assert_code(by_code, Code::FailedPrecondition);
    let info = by_code.get_details_error_info().unwrap();
    assert_eq!(info.reason, "PASSWORD_CHANGE_REQUIRED");
    app.complete_reset(&info.metadata["code"], "a brand new passphrase 42")
        .await
        .unwrap();
    // A challenge is stored only while the password the login checked is the account's: one
    // whose check raced the reset stores nothing.
    let stale = app
        .db
        .second_factor()
        .issue_challenge(
            uuid::Uuid::parse_str(&lost.user_id).unwrap(),
            &[7; 32],
            (Duration::from_secs(60), "the hash before the reset"),
            (None, false),
        )
        .await
        .unwrap();
    assert!(
        !stale,
        "a challenge for a password that is no longer the account's"
    );
    let lost = Enrolled {
        recovery: lost.recovery[1..].to_vec(),
        ..lost
    };
    let open = challenge_with(&app, &lost.email, "a brand new passphrase 42").await;
    for removed in [true, false] {
        let answer = admin(&app)
            .remove_second_factor(with_key(
                ADMIN_KEY,
                pb::RemoveSecondFactorRequest {
                    user_id: lost.user_id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.removed, removed);
    }
    let again = app
        .login(&lost.email, "a brand new passphrase 42")
        .await
        .expect("a session again")
        .session_token;
    let shown = get_user(&app, ADMIN_KEY, &lost.user_id).await.unwrap();
    assert_eq!((shown.second_factor, shown.recovery_codes_left), (false, 0));
    // The challenge opened before the removal stays void, even for a new factor's right code.
    let renewed_secret = app
        .auth
        .clone()
        .enroll_totp(pb::EnrollTotpRequest {
            session_token: again.clone(),
            password: "a brand new passphrase 42".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let now = unix_now();
    confirm(&app, &again, &pyotp(&renewed_secret, now).await)
        .await
        .unwrap();
    let code = pyotp(&renewed_secret, now + 30).await;
    assert_code(
        complete(&app, &open, Factor::TotpCode(code)).await,
        Code::Unauthenticated,
    );
}
