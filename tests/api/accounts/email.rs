//! Email verification and email change: the notifier starts them and receives the code; the end
//! user presents it; ValidateSession, GetProfile and GetUser say the address is verified on
//! every instance when the call returns.
use std::time::Duration;

use authd::proto::authd::v1 as pb;
use futures::future::join_all;
use tonic::Code;
use tonic_types::StatusExt;

use super::{
    NOTIFIER_KEY, accounts, admit_notifier, admit_operator, client, completions, held,
    notifier_settings,
};
use crate::{
    admin::{KEY as ADMIN_KEY, get_user, with_key},
    both_modes,
    helpers::*,
};

fn seconds(t: &Option<prost_types::Timestamp>) -> (i64, i32) {
    let t = t.as_ref().expect("a timestamp");
    (t.seconds, t.nanos)
}

both_modes!(a_verified_address_is_told_by_every_read);

/// Not verified at registration; verified by the code the notifier got, as ValidateSession,
/// GetProfile and GetUser all say, at the same instant. A retry answers the same; a new start
/// says it is verified already.
async fn a_verified_address_is_told_by_every_read(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(mode, dir.path());
    admit_operator(&mut settings, dir.path());
    let app = spawn_with(settings).await;
    let (email, registered) = app.register().await;
    let token = &registered.session_token;
    let before = app.validate_full(token).await.unwrap();
    assert!(!before.email_verified && before.email_verified_at.is_none());
    let profile = app.get_profile(&registered.user_id).await.unwrap();
    assert!(!profile.email_verified, "{profile:?}");
    let user = get_user(&app, ADMIN_KEY, &registered.user_id)
        .await
        .unwrap();
    assert!(!user.email_verified, "{user:?}");

    let started = app.start_verification(&registered.user_id).await.unwrap();
    assert_eq!(started.email, email);
    assert_eq!(started.code.len(), 24);
    let expires = started.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((86_300..=86_500).contains(&expires), "a day: {expires}");
    let verified = app.verify_email(&started.code).await.unwrap();
    assert_eq!(verified.user_id, registered.user_id);
    assert_eq!(verified.email, email);
    let at = seconds(&verified.email_verified_at);

    let session = app.validate_full(token).await.unwrap();
    assert!(session.email_verified);
    assert_eq!(seconds(&session.email_verified_at), at);
    let profile = app.get_profile(&registered.user_id).await.unwrap();
    assert!(profile.email_verified);
    assert_eq!(seconds(&profile.email_verified_at), at);
    assert_eq!(profile.version, 2, "the verification is a new version");
    let user = get_user(&app, ADMIN_KEY, &registered.user_id)
        .await
        .unwrap();
    assert!(user.email_verified);
    assert_eq!(seconds(&user.email_verified_at), at);
    // A later login's session says so too.
    let later = app.login(&email, PASSWORD).await.unwrap();
    let later = app.validate_full(&later.session_token).await.unwrap();
    assert_eq!(seconds(&later.email_verified_at), at);

    let retried = app.verify_email(&started.code).await.unwrap();
    assert_eq!(seconds(&retried.email_verified_at), at);
    let again = assert_code(
        app.start_verification(&registered.user_id).await,
        Code::FailedPrecondition,
    );
    let info = again.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "EMAIL_ALREADY_VERIFIED");
    for outcome in ["completed", "retried"] {
        let sample = completions("email_verification", outcome);
        assert_eq!(app.metric(&sample).await, 1.0, "{sample}");
    }
}

/// Verification on one instance: two others, holding the account's sessions and profile in
/// memory, answer "verified" when the call returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verification_is_seen_at_once_by_every_instance() {
    let dir = tempfile::tempdir().unwrap();
    let ([a, b, c], _watcher) = super::watched_fleet(dir.path()).await;
    let (email, registered) = a.register().await;
    let other = a.login(&email, PASSWORD).await.unwrap();
    let tokens = [registered.session_token, other.session_token];
    for holder in [&b, &c] {
        held(holder, &tokens).await;
        for token in &tokens {
            assert!(!holder.validate_full(token).await.unwrap().email_verified);
        }
        holder.get_profile(&registered.user_id).await.unwrap();
        let profile = holder.get_profile(&registered.user_id).await.unwrap();
        assert!(!profile.email_verified);
    }
    let code = a
        .start_verification(&registered.user_id)
        .await
        .unwrap()
        .code;
    let verified = a.verify_email(&code).await.unwrap();
    for holder in [&b, &c] {
        for token in &tokens {
            let session = holder.validate_full(token).await.unwrap();
            assert!(session.email_verified, "{session:?}");
            assert_eq!(session.email_verified_at, verified.email_verified_at);
        }
        let profile = holder.get_profile(&registered.user_id).await.unwrap();
        assert!(profile.email_verified, "{profile:?}");
    }
}

/// A code works only for its flow, its account and the address it went to, once, until it
/// expires; concurrent presentations of one code complete it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_code_is_bound_to_its_flow_and_address_used_once_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    settings.accounts.verify_code_ttl = Duration::from_secs(2);
    // Every call here comes from one end-user address.
    settings.accounts.attempts_per_address = 1000;
    let app = spawn_with(settings).await;
    let (alice, alice_registered) = app.register().await;
    let (_, bob) = app.register().await;

    // Another flow's codes are refused alike, both ways.
    let reset = app.start_reset(&alice).await.unwrap().code;
    let verification = app.start_verification(&bob.user_id).await.unwrap().code;
    let change = app
        .start_change(&bob.session_token, &unique_email(), "")
        .await
        .unwrap()
        .code;
    assert_code(app.verify_email(&reset).await, Code::Unauthenticated);
    assert_code(app.verify_email(&change).await, Code::Unauthenticated);
    assert_code(
        app.confirm_change(&verification).await,
        Code::Unauthenticated,
    );
    let as_reset = app.complete_reset(&verification, "a brand new passphrase 42");
    assert_code(as_reset.await, Code::Unauthenticated);
    assert_code(
        app.verify_email("AAAAAAAAAAAAAAAAAAAAAAAA").await,
        Code::Unauthenticated,
    );

    // Eight presentations of one code at once: one completes, the others are its retries, and
    // the profile has one new version.
    let answers = join_all((0..8).map(|_| app.verify_email(&verification))).await;
    let at: Vec<_> = answers
        .iter()
        .map(|a| seconds(&a.as_ref().unwrap().email_verified_at))
        .collect();
    assert!(at.iter().all(|t| *t == at[0]), "{at:?}");
    let completed = completions("email_verification", "completed");
    assert_eq!(app.metric(&completed).await, 1.0);
    assert_eq!(app.get_profile(&bob.user_id).await.unwrap().version, 2);

    // A verification code sent to an address the account no longer has verifies nothing.
    let stale = app
        .start_verification(&alice_registered.user_id)
        .await
        .unwrap()
        .code;
    let moved = app
        .start_change(&alice_registered.session_token, &unique_email(), "")
        .await
        .unwrap();
    app.confirm_change(&moved.code).await.unwrap();
    assert_code(app.verify_email(&stale).await, Code::Unauthenticated);

    // Expired.
    let (_, carol) = app.register().await;
    let expiring = app.start_verification(&carol.user_id).await.unwrap().code;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_code(app.verify_email(&expiring).await, Code::Unauthenticated);
    let carol_session = app.validate_full(&carol.session_token).await.unwrap();
    assert!(!carol_session.email_verified);
}

/// An email change: the owner proves it again (password, or a recent sign-in), the notifier gets
/// the code for the new address and the old address to notify, and the new address replaces the
/// old one only when its code comes back — verified, with the codes sent to the old address
/// void. Login follows the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_address_replaces_the_old_only_once_verified() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    admit_operator(&mut settings, dir.path());
    settings.accounts.email_change_max_auth_age = Duration::from_secs(2);
    let app = spawn_with(settings).await;
    let (old, registered) = app.register().await;
    let token = &registered.session_token;
    let new = unique_email();

    let wrong = app.start_change(token, &new, "not the password").await;
    assert_code(wrong, Code::Unauthenticated);
    let started = app
        .start_change(token, &format!(" {new} "), "")
        .await
        .unwrap();
    assert_eq!(started.current_email, old);
    assert_eq!(started.new_email, new);
    // Not yet: the old address is the account's.
    app.login(&old, PASSWORD).await.unwrap();
    assert_code(app.login(&new, PASSWORD).await, Code::Unauthenticated);
    let reset_to_old = app.start_reset(&old).await.unwrap().code;

    let confirmed = app.confirm_change(&started.code).await.unwrap();
    assert_eq!(confirmed.user_id, registered.user_id);
    assert_eq!(confirmed.email, new);
    let session = app.validate_full(token).await.unwrap();
    assert!(session.email_verified);
    assert_eq!(session.email_verified_at, confirmed.email_verified_at);
    let user = get_user(&app, ADMIN_KEY, &registered.user_id)
        .await
        .unwrap();
    assert_eq!(
        (user.email.as_str(), user.email_verified),
        (new.as_str(), true)
    );
    app.login(&new, PASSWORD).await.unwrap();
    assert_code(app.login(&old, PASSWORD).await, Code::Unauthenticated);
    let voided = app.complete_reset(&reset_to_old, "a brand new passphrase 42");
    assert_code(voided.await, Code::Unauthenticated);
    // Retried after a lost answer: the same answer.
    let retried = app.confirm_change(&started.code).await.unwrap();
    assert_eq!(retried.email_verified_at, confirmed.email_verified_at);

    // The session's sign-in is now too old: the password, or REAUTHENTICATION_REQUIRED.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stale = assert_code(
        app.start_change(token, &unique_email(), "").await,
        Code::FailedPrecondition,
    );
    let info = stale.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "REAUTHENTICATION_REQUIRED");
    app.start_change(token, &unique_email(), PASSWORD)
        .await
        .unwrap();
    // The address it has already.
    let same = assert_code(
        app.start_change(token, &new.to_uppercase(), PASSWORD).await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&same), ["new_email"]);
}

/// Whether another account uses the new address is not told at the start; at the confirmation,
/// of two accounts moving to one address exactly one gets it, and an address registered
/// meanwhile is kept by its account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_accounts_moving_to_one_address_exactly_one_gets_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    // Four starts for one new address, from one end-user address (both are limited).
    settings.accounts.attempts_per_address = 1000;
    settings.accounts.starts_per_account = 100;
    let app = spawn_with(settings).await;
    let target = unique_email();
    let mut codes = Vec::new();
    let mut accounts = Vec::new();
    for _ in 0..4 {
        let (email, registered) = app.register().await;
        let started = app
            .start_change(&registered.session_token, &target, "")
            .await
            .unwrap();
        codes.push(started.code);
        accounts.push(email);
    }
    let answers = join_all(codes.iter().map(|code| app.confirm_change(code))).await;
    let winners: Vec<usize> = (0..4).filter(|i| answers[*i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{answers:?}");
    for (i, answer) in answers.iter().enumerate() {
        if !winners.contains(&i) {
            let status = answer.as_ref().unwrap_err();
            assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
            // The loser keeps its address.
            app.login(&accounts[i], PASSWORD).await.unwrap();
        }
    }
    app.login(&target, PASSWORD).await.unwrap();

    // Registered by someone else before the confirmation: the start answers as for any address.
    let (_, mover) = app.register().await;
    let taken = unique_email();
    let started = app
        .start_change(&mover.session_token, &taken, "")
        .await
        .unwrap();
    app.auth
        .clone()
        .register(register_request(&taken))
        .await
        .unwrap();
    assert_code(app.confirm_change(&started.code).await, Code::AlreadyExists);
}

/// Only notifiers start the flows; input errors name their fields; starts are limited per
/// account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_notifiers_start_them_and_bad_input_names_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(Mode::Redis);
    admit_notifier(&mut settings, dir.path());
    settings.accounts.starts_per_account = 4;
    let app = spawn_with(settings).await;
    let (_, registered) = app.register().await;
    let request = pb::StartEmailVerificationRequest {
        user_id: registered.user_id.clone(),
        client: client("192.0.2.1"),
    };
    let stranger = accounts(&app)
        .start_email_verification(with_key(ADMIN_KEY, request.clone()))
        .await;
    assert_code(stranger, Code::PermissionDenied);
    let anonymous = accounts(&app)
        .start_email_verification(tonic::Request::new(request))
        .await;
    assert_code(anonymous, Code::Unauthenticated);

    let bad = pb::StartEmailVerificationRequest {
        user_id: "nobody".into(),
        client: None,
    };
    let status = accounts(&app)
        .start_email_verification(with_key(NOTIFIER_KEY, bad))
        .await;
    let status = assert_code(status, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["user_id", "client.ip_address"]);
    let unknown = app
        .start_verification(&uuid::Uuid::now_v7().to_string())
        .await;
    assert_code(unknown, Code::NotFound);

    let bad = pb::StartEmailChangeRequest {
        new_email: "no at sign".into(),
        client: client("192.0.2.1"),
        ..Default::default()
    };
    let status = accounts(&app)
        .start_email_change(with_key(NOTIFIER_KEY, bad))
        .await;
    let status = assert_code(status, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["new_email", "session_token"]);
    let status = assert_code(app.verify_email("short").await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["code"]);
    let mut auth = app.auth.clone();
    let no_client = auth.confirm_email_change(pb::ConfirmEmailChangeRequest {
        code: "AAAAAAAAAAAAAAAAAAAAAAAA".into(),
        client: None,
    });
    let status = assert_code(no_client.await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["client.ip_address"]);
    let bad_token = app.start_change("not a token", &unique_email(), "").await;
    assert_code(bad_token, Code::Unauthenticated);

    // Bursts of half the limit: 2 starts for the account, then refused with RetryInfo.
    for _ in 0..2 {
        app.start_verification(&registered.user_id).await.unwrap();
    }
    let limited = assert_code(
        app.start_verification(&registered.user_id).await,
        Code::ResourceExhausted,
    );
    assert!(limited.get_details_retry_info().is_some(), "{limited:?}");
}

/// The app's database, as another client.
async fn database(app: &TestApp) -> sqlx::PgPool {
    use secrecy::ExposeSecret;
    let url = app.settings.database.url.expose_secret();
    sqlx::PgPool::connect(url).await.unwrap()
}

/// What a verification's transaction holds while it commits: the account's row (verified), then
/// the profile's row.
async fn verifying(app: &TestApp, user_id: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = database(app).await;
    let user_id: uuid::Uuid = user_id.parse().unwrap();
    let mut tx = pool.begin().await.unwrap();
    for statement in [
        "select 1 from users where id = $1 for update",
        "update users set email_verified_at = clock_timestamp() where id = $1",
        "update profiles set version = version where user_id = $1",
    ] {
        sqlx::query(statement)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx
}

/// An UpdateProfile or a Login that waited for a verification's transaction carries what it
/// committed: the profile version it writes, and the session it creates, say verified (read
/// after the wait, under the account's row). Otherwise that version would say "not verified"
/// until the next one, and the session until its next touch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_or_login_that_waited_for_a_verification_shows_it() {
    let app = spawn_app(Mode::Redis).await;
    let (_, registered) = app.register().await;
    let commit_later = |tx: sqlx::Transaction<'static, sqlx::Postgres>| async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.commit().await.unwrap();
    };

    let tx = verifying(&app, &registered.user_id).await;
    let profile = pb::Profile {
        bio: "raced".into(),
        ..Default::default()
    };
    let update = app.update_profile(&registered.session_token, profile, &["bio"], 0);
    let (updated, ()) = tokio::join!(update, commit_later(tx));
    let updated = updated.unwrap();
    assert!(updated.email_verified, "{updated:?}");
    let read = app.get_profile(&registered.user_id).await.unwrap();
    assert!(read.email_verified && read.bio == "raced", "{read:?}");

    let (other_email, other) = app.register().await;
    let tx = verifying(&app, &other.user_id).await;
    let (login, ()) = tokio::join!(app.login(&other_email, PASSWORD), commit_later(tx));
    let token = login.unwrap().session_token;
    for _ in 0..2 {
        let session = app.validate_full(&token).await.unwrap();
        assert!(session.email_verified, "{session:?}");
    }
}

/// Codes sent to an address the account moved away from do nothing, even one issued while the
/// move committed (simulated: the move's voiding of the account's codes undone): a verification
/// code verifies nothing, a reset code resets nothing. And the start of a move does not tell
/// whether another account has the new address: the same answer as for a free one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codes_sent_to_an_old_address_do_nothing_after_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    settings.accounts.attempts_per_address = 1000;
    let app = spawn_with(settings).await;
    let (old, registered) = app.register().await;
    let token = &registered.session_token;
    let verification = app.start_verification(&registered.user_id).await.unwrap();
    let reset = app.start_reset(&old).await.unwrap();

    let (taken, _) = app.register().await;
    let to_taken = app.start_change(token, &taken, "").await.unwrap();
    let new = unique_email();
    let to_free = app.start_change(token, &new, "").await.unwrap();
    for started in [&to_taken, &to_free] {
        assert_eq!(started.current_email, old);
        assert_eq!(started.code.len(), 24);
        assert!(started.expires_at.is_some());
    }
    app.confirm_change(&to_free.code).await.unwrap();

    let undo = "update account_codes set used_at = null
                where user_id = $1 and completed_at is null";
    let user_id: uuid::Uuid = registered.user_id.parse().unwrap();
    let undone = sqlx::query(undo)
        .bind(user_id)
        .execute(&database(&app).await)
        .await
        .unwrap();
    assert_eq!(
        undone.rows_affected(),
        3,
        "the verification, the reset, the other move"
    );
    assert_code(
        app.verify_email(&verification.code).await,
        Code::Unauthenticated,
    );
    let reset = app.complete_reset(&reset.code, "a brand new passphrase 42");
    assert_code(reset.await, Code::Unauthenticated);
    app.login(&new, PASSWORD).await.unwrap();
}
