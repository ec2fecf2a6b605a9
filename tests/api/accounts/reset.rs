//! Password reset: the notifier starts it and receives the code; the end user completes it; every
//! session of the account is rejected everywhere when the completion returns.
use std::time::Duration;

use authd::proto::authd::v1::{self as pb, event::Kind};
use futures::future::join_all;
use tonic::{Code, Request};
use tonic_types::StatusExt;

use super::{
    NOTIFIER_KEY, accounts, admit_operator, client, completions, held, notifier_settings,
    watched_fleet,
};
use crate::{
    admin::{KEY as ADMIN_KEY, admin, with_key},
    both_modes,
    helpers::*,
};

const NEW_PASSWORD: &str = "a brand new passphrase 42";

both_modes!(a_reset_replaces_the_password_and_ends_every_session);

async fn a_reset_replaces_the_password_and_ends_every_session(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(notifier_settings(mode, dir.path())).await;
    let (email, registered) = app.register().await;
    let other = app.login(&email, PASSWORD).await.unwrap();
    let tokens = [registered.session_token, other.session_token];
    for token in &tokens {
        app.validate(token).await.unwrap();
        app.validate(token).await.unwrap();
    }
    let started = app
        .start_reset(&format!(" {} ", email.to_uppercase()))
        .await
        .unwrap();
    assert_eq!(started.code.len(), 24, "{started:?}");
    let expires = started.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((3500..=3700).contains(&expires), "an hour: {expires}");

    assert_eq!(
        app.complete_reset(&started.code, NEW_PASSWORD)
            .await
            .unwrap(),
        2
    );
    for token in &tokens {
        assert_code(app.validate(token).await, Code::Unauthenticated);
    }
    assert_code(app.login(&email, PASSWORD).await, Code::Unauthenticated);
    let after = app.login(&email, NEW_PASSWORD).await.unwrap();

    // Used: another password is refused; the same one is the first completion retried, which
    // answers as it did and revokes nothing new.
    let again = app.complete_reset(&started.code, "yet another passphrase 7");
    assert_code(again.await, Code::Unauthenticated);
    assert_eq!(
        app.complete_reset(&started.code, NEW_PASSWORD)
            .await
            .unwrap(),
        2
    );
    app.validate(&after.session_token).await.unwrap();
    for outcome in ["completed", "retried"] {
        let sample = completions("password_reset", outcome);
        assert_eq!(app.metric(&sample).await, 1.0, "{sample}");
    }
}

/// An email of no account, and a disabled account's, get what a known one gets: a code of the
/// same form and lifetime, which completes nothing (the answer to a made-up code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_disabled_accounts_get_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    admit_operator(&mut settings, dir.path());
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let (disabled_email, disabled) = app.register().await;
    let request = pb::DisableUserRequest {
        user_id: disabled.user_id,
        reason: "test".into(),
    };
    admin(&app)
        .disable_user(with_key(ADMIN_KEY, request))
        .await
        .unwrap();
    let known = app.start_reset(&email).await.unwrap();
    let made_up = app.complete_reset("AAAAAAAAAAAAAAAAAAAAAAAA", NEW_PASSWORD);
    let made_up = assert_code(made_up.await, Code::Unauthenticated);
    for other in [unique_email(), disabled_email.clone()] {
        let answer = app.start_reset(&other).await.unwrap();
        assert_eq!(answer.code.len(), known.code.len());
        let (a, b) = (answer.expires_at.unwrap(), known.expires_at.unwrap());
        assert!((a.seconds - b.seconds).abs() <= 5, "{a:?} {b:?}");
        let refused = assert_code(
            app.complete_reset(&answer.code, NEW_PASSWORD).await,
            Code::Unauthenticated,
        );
        assert_eq!(refused.message(), made_up.message());
    }
    // The disabled account kept its password.
    assert_code(
        app.login(&disabled_email, NEW_PASSWORD).await,
        Code::Unauthenticated,
    );
    assert_code(
        app.login(&disabled_email, PASSWORD).await,
        Code::PermissionDenied,
    );
}

/// A code resets only its own account, once; a newer reset's completion voids the older codes;
/// a code expires; a session token is not a code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_is_bound_to_its_account_used_once_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    settings.accounts.reset_code_ttl = Duration::from_secs(2);
    let app = spawn_with(settings).await;
    let (alice, _) = app.register().await;
    let (bob, bob_registered) = app.register().await;
    let older = app.start_reset(&alice).await.unwrap();
    let newer = app.start_reset(&alice).await.unwrap();
    assert_ne!(older.code, newer.code);
    assert_eq!(
        app.complete_reset(&newer.code, NEW_PASSWORD).await.unwrap(),
        1
    );
    // Bob is untouched.
    app.validate(&bob_registered.session_token).await.unwrap();
    app.login(&bob, PASSWORD).await.unwrap();
    // The older code was voided, whatever the password.
    for password in [NEW_PASSWORD, "yet another passphrase 7"] {
        let voided = app.complete_reset(&older.code, password).await;
        assert_code(voided, Code::Unauthenticated);
    }
    let expiring = app.start_reset(&bob).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_code(
        app.complete_reset(&expiring.code, NEW_PASSWORD).await,
        Code::Unauthenticated,
    );
    app.login(&bob, PASSWORD).await.unwrap();
    // A completion retried after its code expired (its answer lost) is still answered as the
    // first was.
    let completed = app.start_reset(&bob).await.unwrap();
    let revoked = app.complete_reset(&completed.code, NEW_PASSWORD).await;
    assert_eq!(revoked.unwrap(), 3, "registered, and two logins");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let retried = app.complete_reset(&completed.code, NEW_PASSWORD).await;
    assert_eq!(retried.unwrap(), 3);
}

/// A used code answers a retry only while the password it set is still the account's; a
/// password change, and disabling the account (even enabled again), void the codes issued
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_code_is_no_password_oracle_and_later_changes_void_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    admit_operator(&mut settings, dir.path());
    let app = spawn_with(settings).await;
    let (email, registered) = app.register().await;
    let used = app.start_reset(&email).await.unwrap();
    app.complete_reset(&used.code, NEW_PASSWORD).await.unwrap();
    let session = app.login(&email, NEW_PASSWORD).await.unwrap();
    let later = "a later passphrase of hers";
    app.change_password(&session.session_token, NEW_PASSWORD, later)
        .await
        .unwrap();
    for guess in [later, NEW_PASSWORD] {
        assert_code(
            app.complete_reset(&used.code, guess).await,
            Code::Unauthenticated,
        );
    }
    // Issued before a password change: void.
    let before_change = app.start_reset(&email).await.unwrap();
    let again = "yet another passphrase 7";
    app.change_password(&session.session_token, later, again)
        .await
        .unwrap();
    assert_code(
        app.complete_reset(&before_change.code, NEW_PASSWORD).await,
        Code::Unauthenticated,
    );
    // Issued before DisableUser, presented after EnableUser: void.
    let before_disable = app.start_reset(&email).await.unwrap();
    let user_id = registered.user_id;
    let disable = pb::DisableUserRequest {
        user_id: user_id.clone(),
        reason: "test".into(),
    };
    admin(&app)
        .disable_user(with_key(ADMIN_KEY, disable))
        .await
        .unwrap();
    let enable = pb::EnableUserRequest { user_id };
    admin(&app)
        .enable_user(with_key(ADMIN_KEY, enable))
        .await
        .unwrap();
    assert_code(
        app.complete_reset(&before_disable.code, NEW_PASSWORD).await,
        Code::Unauthenticated,
    );
    app.login(&email, again).await.unwrap();
}

/// Two completions of one code with the same password at once (a double submit): one completes
/// it, the other is answered as its retry — both OK, the same count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_double_submit_is_answered_twice_alike() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(notifier_settings(Mode::Redis, dir.path())).await;
    let (email, _) = app.register().await;
    let started = app.start_reset(&email).await.unwrap();
    let (first, second) = tokio::join!(
        app.complete_reset(&started.code, NEW_PASSWORD),
        app.complete_reset(&started.code, NEW_PASSWORD)
    );
    assert_eq!((first.unwrap(), second.unwrap()), (1, 1));
    for outcome in ["completed", "retried"] {
        let sample = completions("password_reset", outcome);
        assert_eq!(app.metric(&sample).await, 1.0, "{sample}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_completions_of_one_code_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    // Each completion pays the account's password-change bucket: let all of them race.
    settings.rate_limit.login_per_email = 100;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let started = app.start_reset(&email).await.unwrap();
    let passwords: Vec<String> = (0..8)
        .map(|i| format!("{NEW_PASSWORD} number {i}"))
        .collect();
    let answers = join_all(
        passwords
            .iter()
            .map(|p| app.complete_reset(&started.code, p)),
    )
    .await;
    let winners: Vec<&String> = passwords
        .iter()
        .zip(&answers)
        .filter_map(|(password, answer)| answer.is_ok().then_some(password))
        .collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for answer in answers.iter().filter(|a| a.is_err()) {
        let status = answer.as_ref().unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
    for password in &passwords {
        let login = app.login(&email, password).await;
        assert_eq!(login.is_ok(), password == winners[0], "{password}");
    }
}

/// Only admitted notifiers start flows: no credential is UNAUTHENTICATED, another caller's key
/// PERMISSION_DENIED, and a server without ACCOUNTS__* says how to turn the service on. Input
/// errors name their fields; a refused new password leaves the code usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_notifiers_start_flows_and_bad_input_names_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let app = spawn_with(notifier_settings(Mode::Redis, dir.path())).await;
    let (email, _) = app.register().await;
    let request = || pb::StartPasswordResetRequest {
        email: email.clone(),
        client: client("192.0.2.1"),
    };
    let mut service = accounts(&app);
    let anonymous = service.start_password_reset(Request::new(request())).await;
    assert_code(anonymous, Code::Unauthenticated);
    let stranger = service
        .start_password_reset(with_key(ADMIN_KEY, request()))
        .await;
    assert_code(stranger, Code::PermissionDenied);

    let bad = pb::StartPasswordResetRequest {
        email: "not an email".into(),
        client: client("not an address"),
    };
    let status = assert_code(
        accounts(&app)
            .start_password_reset(with_key(NOTIFIER_KEY, bad))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["email", "client.ip_address"]);
    let status = assert_code(app.complete_reset("short", "").await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["code", "new_password"]);

    let started = app.start_reset(&email).await.unwrap();
    let weak = assert_code(
        app.complete_reset(&started.code, "password").await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&weak), ["new_password"]);
    assert_eq!(
        app.complete_reset(&started.code, NEW_PASSWORD)
            .await
            .unwrap(),
        1
    );

    let plain = spawn_app(Mode::NoRedis).await;
    let mut service = accounts(&plain);
    let off = service
        .start_password_reset(with_key(NOTIFIER_KEY, request()))
        .await;
    let off = assert_code(off, Code::Unimplemented);
    assert!(off.message().contains("ACCOUNTS__API_KEYS_FILE"), "{off:?}");
}

/// Starts are limited per email — known or not, refused alike — and every flow call per end-user
/// address, so guessing codes stops long before it could matter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_and_guesses_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    // Bursts of half the limit (README, "Rate limits"): 2 starts, then 3 guesses.
    settings.accounts.starts_per_account = 4;
    settings.accounts.attempts_per_address = 5;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let start = |email: String, ip: &'static str| {
        let request = pb::StartPasswordResetRequest {
            email,
            client: client(ip),
        };
        let mut accounts = accounts(&app);
        async move {
            accounts
                .start_password_reset(with_key(NOTIFIER_KEY, request))
                .await
        }
    };
    let unknown = unique_email();
    for (i, ip) in ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
        .iter()
        .enumerate()
    {
        for email in [&email, &unknown] {
            let answer = start(email.clone(), ip).await;
            if i < 2 {
                answer.unwrap();
            } else {
                let status = assert_code(answer, Code::ResourceExhausted);
                assert!(status.get_details_retry_info().is_some(), "{status:?}");
            }
        }
    }
    let guess = |code: String| {
        let request = pb::CompletePasswordResetRequest {
            code,
            new_password: NEW_PASSWORD.into(),
            client: client("198.51.100.7"),
        };
        let mut auth = app.auth.clone();
        async move { auth.complete_password_reset(request).await }
    };
    let mut refused = 0;
    for i in 0..8 {
        match guess(format!("{i:0>24}")).await {
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            answer => {
                assert_code(answer, Code::Unauthenticated);
            }
        }
    }
    assert_eq!(refused, 5, "a burst of 3 guesses per address");
    let limited = completions("password_reset", "rate_limited");
    assert_eq!(app.metric(&limited).await, 5.0);
}

/// A reset on one instance: two others, holding the account's sessions in memory, reject them
/// when the completion returns. The stream says why they ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_is_seen_at_once_by_every_instance_and_on_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let ([a, b, c], mut watcher) = watched_fleet(dir.path()).await;
    let (email, registered) = a.register().await;
    let other = a.login(&email, PASSWORD).await.unwrap();
    let tokens = [registered.session_token, other.session_token];
    for holder in [&b, &c] {
        held(holder, &tokens).await;
    }
    let code = a.start_reset(&email).await.unwrap().code;
    assert_eq!(a.complete_reset(&code, NEW_PASSWORD).await.unwrap(), 2);
    for holder in [&b, &c] {
        for token in &tokens {
            assert_code(holder.validate(token).await, Code::Unauthenticated);
        }
    }
    let (events, _) = watcher.events(1).await;
    let reasons: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(Kind::SessionsRevoked(all)) if all.user_id == registered.user_id => {
                Some(all.reason())
            }
            _ => None,
        })
        .collect();
    assert_eq!(reasons, [pb::RevocationReason::PasswordReset]);
}

/// Whether an email has an account cannot be told from how long a start takes: starts for a
/// known email and for unknown ones, interleaved, take the same time (the median of the paired
/// differences is within a fraction of a PostgreSQL round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_emails_answer_in_the_same_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    settings.accounts.starts_per_account = 0;
    settings.accounts.attempts_per_address = 0;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let app = &app;
    let timed = |email: String| async move {
        let started = std::time::Instant::now();
        app.start_reset(&email).await.unwrap();
        started.elapsed().as_secs_f64() * 1e3
    };
    for _ in 0..20 {
        timed(email.clone()).await;
        timed(unique_email()).await;
    }
    let mut differences = Vec::new();
    let mut calls = Vec::new();
    for round in 0..300 {
        let (known, unknown) = if round % 2 == 0 {
            let known = timed(email.clone()).await;
            (known, timed(unique_email()).await)
        } else {
            let unknown = timed(unique_email()).await;
            (timed(email.clone()).await, unknown)
        };
        differences.push(known - unknown);
        calls.extend([known, unknown]);
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let difference = median(&mut differences);
    let call = median(&mut calls);
    eprintln!("median call {call:.3} ms, median paired difference {difference:.3} ms");
    // A start that wrote nothing for unknown emails answered 0.15 ms sooner here (and one whose
    // row had a foreign key to check, 0.04 ms); the same statement answers within 0.01 ms.
    assert!(
        difference.abs() < 0.08 + call * 0.02,
        "known emails take {difference:.3} ms longer (median call {call:.3} ms)"
    );
}
