//! Account deletion: by the user (with the password, or a recent sign-in) and by an operator;
//! nothing of the account's personal data stays in PostgreSQL or Redis, and no instance accepts
//! its sessions or serves its profile once the call returns.
use std::time::Duration;

use authd::proto::authd::v1::{self as pb, event::Kind};
use fred::prelude::*;
use secrecy::ExposeSecret;
use tonic::Code;
use tonic_types::StatusExt;

use super::{admit_operator, held, notifier_settings, watched_fleet};
use crate::{
    admin::{KEY as ADMIN_KEY, admin, get_user, with_key},
    both_modes,
    helpers::*,
};

/// What the account holds that is personal: each must be gone after the deletion.
struct Personal {
    email: String,
    display_name: String,
    bio: String,
    ip: String,
    user_agent: String,
    /// An address the account was moving to (a pending email change).
    moving_to: String,
    /// The address it had before `email` (a confirmed email change).
    former: String,
    /// Its second factor as stored: the TOTP secret and the recovery codes' hashes (hex).
    factor: std::sync::Mutex<Vec<String>>,
}

impl Personal {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            email: format!("Erased-{id}@Example.com"),
            display_name: format!("Erasable {}", &id[..8]),
            bio: format!("a very personal bio {}", &id[8..16]),
            ip: "203.0.113.77".into(),
            user_agent: format!("ErasureAgent/{}", &id[16..24]),
            moving_to: format!("Moving-{}@Example.org", &id[24..]),
            former: format!("Former-{id}@Example.net"),
            factor: std::sync::Mutex::default(),
        }
    }

    fn strings(&self) -> Vec<String> {
        let mut strings = vec![
            self.former.clone(),
            self.former.to_lowercase(),
            self.moving_to.clone(),
            self.moving_to.to_lowercase(),
            self.email.clone(),
            self.email.to_lowercase(),
            self.display_name.clone(),
            self.bio.clone(),
            self.ip.clone(),
            self.user_agent.clone(),
        ];
        strings.extend(self.factor.lock().unwrap().iter().cloned());
        strings
    }

    /// Gives the account a confirmed TOTP second factor, and remembers how it is stored.
    async fn add_second_factor(&self, app: &TestApp, token: &str) {
        use sha2::Digest;
        let enrolment = app
            .auth
            .clone()
            .enroll_totp(pb::EnrollTotpRequest {
                session_token: token.into(),
                password: PASSWORD.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let secret = totp_rs::Secret::Encoded(enrolment.secret)
            .to_bytes()
            .unwrap();
        let totp = totp_rs::TOTP::new_unchecked(
            totp_rs::Algorithm::SHA1,
            6,
            1,
            30,
            secret.clone(),
            None,
            String::new(),
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let recovery = app
            .auth
            .clone()
            .confirm_totp(pb::ConfirmTotpRequest {
                session_token: token.into(),
                code: totp.generate(now),
            })
            .await
            .unwrap()
            .into_inner()
            .recovery_codes;
        let mut factor = self.factor.lock().unwrap();
        factor.push(hex::encode(&secret));
        for code in recovery {
            factor.push(hex::encode(sha2::Sha256::digest(code.replace('-', ""))));
        }
    }

    /// Registers the account, gives it a bio and a second session, and leaves traces of it
    /// everywhere: cached sessions and profile, a reset code, a verification code, a pending
    /// email change, audit rows naming its email and the one it had before, a second factor.
    async fn create(&self, app: &TestApp) -> (String, [String; 2]) {
        let flows = app.settings.accounts.served();
        let registered = app
            .auth
            .clone()
            .register(pb::RegisterRequest {
                email: if flows { &self.former } else { &self.email }.clone(),
                password: PASSWORD.into(),
                display_name: self.display_name.clone(),
                client: Some(pb::ClientInfo {
                    ip_address: self.ip.clone(),
                    user_agent: self.user_agent.clone(),
                    device_id: String::new(),
                }),
            })
            .await
            .unwrap()
            .into_inner();
        let token = registered.session_token;
        if flows {
            // An operator looked it up by its former address, then it moved to `email`.
            let lookup = pb::get_user_request::Lookup::Email(self.former.clone());
            let request = pb::GetUserRequest {
                lookup: Some(lookup),
            };
            let found = admin(app).get_user(with_key(ADMIN_KEY, request)).await;
            assert_eq!(found.unwrap().into_inner().user.unwrap().email, self.former);
            app.start_verification(&registered.user_id).await.unwrap();
            let moving = app.start_change(&token, &self.email, PASSWORD).await;
            let confirmed = app.confirm_change(&moving.unwrap().code).await.unwrap();
            assert_eq!(confirmed.email, self.email);
        }
        let profile = pb::Profile {
            bio: self.bio.clone(),
            ..Default::default()
        };
        app.update_profile(&token, profile, &["bio"], 0)
            .await
            .unwrap();
        let other = app
            .login_from(&self.email, PASSWORD, &self.ip)
            .await
            .unwrap();
        for t in [&token, &other.session_token] {
            app.validate(t).await.unwrap();
        }
        app.get_profile(&registered.user_id).await.unwrap();
        if flows {
            app.start_reset(&self.email).await.unwrap();
            let moving = app.start_change(&token, &self.moving_to, PASSWORD).await;
            assert_eq!(moving.unwrap().current_email, self.email);
        }
        let lookup = pb::get_user_request::Lookup::Email(self.email.clone());
        let request = pb::GetUserRequest {
            lookup: Some(lookup),
        };
        admin(app)
            .get_user(with_key(ADMIN_KEY, request))
            .await
            .unwrap();
        self.add_second_factor(app, &token).await;
        (registered.user_id, [token, other.session_token])
    }

    /// No row of any table, and no key of the app's Redis prefix, holds any of it.
    async fn assert_gone(&self, app: &TestApp, mode: Mode) {
        let url = app.settings.database.url.expose_secret().to_owned();
        let pool = sqlx::PgPool::connect(&url).await.unwrap();
        let tables: Vec<String> = sqlx::query_scalar(
            "select table_name::text from information_schema.tables
             where table_schema = current_schema() and table_type = 'BASE TABLE'",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert!(tables.len() >= 20, "{tables:?}");
        for table in &tables {
            let sql = format!("select t::text from \"{table}\" t");
            let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap();
            for row in rows {
                for personal in self.strings() {
                    assert!(
                        !row.contains(&personal),
                        "{table} keeps {personal:?}: {row}"
                    );
                }
            }
        }
        if mode != Mode::Redis {
            return;
        }
        let redis = redis_client(&redis_url()).await;
        let pattern = format!("{}*", app.settings.redis.key_prefix);
        let keys: Vec<String> = redis
            .custom(fred::cmd!("KEYS"), vec![pattern])
            .await
            .unwrap();
        assert!(!keys.is_empty(), "the test reads the app's keys");
        for key in keys {
            let kind: String = redis
                .custom(fred::cmd!("TYPE"), vec![key.clone()])
                .await
                .unwrap();
            let read = match kind.as_str() {
                "string" => "GET",
                "hash" => "HGETALL",
                "set" => "SMEMBERS",
                "zset" => "ZRANGE",
                "list" => "LRANGE",
                other => panic!("{key}: a {other} the test cannot read"),
            };
            let mut args = vec![key.clone()];
            if matches!(read, "ZRANGE" | "LRANGE") {
                args.extend(["0".to_owned(), "-1".to_owned()]);
            }
            let value: Value = redis.custom(fred::cmd!(read), args).await.unwrap();
            let value = format!("{value:?}");
            for personal in self.strings() {
                assert!(!key.contains(&personal), "key {key}");
                assert!(
                    !value.contains(&personal),
                    "{key} keeps {personal:?}: {value}"
                );
            }
        }
    }
}

async fn operated(settings: authd::config::Settings, dir: &std::path::Path) -> TestApp {
    let mut settings = settings;
    admit_operator(&mut settings, dir);
    spawn_with(settings).await
}

async fn delete_account(app: &TestApp, token: &str, password: &str) -> Result<i32, tonic::Status> {
    app.auth
        .clone()
        .delete_account(pb::DeleteAccountRequest {
            session_token: token.to_owned(),
            password: password.to_owned(),
        })
        .await
        .map(|r| r.into_inner().revoked_count)
}

both_modes!(a_deleted_account_leaves_no_personal_data);

async fn a_deleted_account_leaves_no_personal_data(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let app = operated(notifier_settings(mode, dir.path()), dir.path()).await;
    let personal = Personal::new();
    let (user_id, tokens) = personal.create(&app).await;
    assert_eq!(delete_account(&app, &tokens[0], PASSWORD).await.unwrap(), 2);
    for token in &tokens {
        assert_code(app.validate(token).await, Code::Unauthenticated);
    }
    assert_code(app.get_profile(&user_id).await, Code::NotFound);
    assert_code(
        app.login(&personal.email, PASSWORD).await,
        Code::Unauthenticated,
    );
    assert_code(get_user(&app, ADMIN_KEY, &user_id).await, Code::NotFound);
    // A retry finds the session gone: it took effect.
    assert_code(
        delete_account(&app, &tokens[0], PASSWORD).await,
        Code::Unauthenticated,
    );
    personal.assert_gone(&app, mode).await;
    let deleted = "authd_accounts_deleted_total{by=\"user\"}";
    assert_eq!(app.metric(deleted).await, 1.0);
    // The address is free again.
    let mut again = register_request(&personal.email);
    again.display_name = "Someone Else".into();
    app.auth.clone().register(again).await.unwrap();
}

/// Without the password, only a recent sign-in may delete; a wrong password deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_without_the_password_needs_a_recent_sign_in() {
    let mut settings = test_settings(Mode::Redis);
    settings.accounts.delete_max_auth_age = Duration::from_secs(2);
    let app = spawn_with(settings).await;
    let (email, registered) = app.register().await;
    let token = registered.session_token;
    assert_code(
        delete_account(&app, &token, "not the password").await,
        Code::Unauthenticated,
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stale = assert_code(
        delete_account(&app, &token, "").await,
        Code::FailedPrecondition,
    );
    let info = stale.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "REAUTHENTICATION_REQUIRED");
    app.validate(&token).await.expect("still there");
    let fresh = app.login(&email, PASSWORD).await.unwrap();
    assert_eq!(
        delete_account(&app, &fresh.session_token, "")
            .await
            .unwrap(),
        2
    );
    assert_code(app.validate(&token).await, Code::Unauthenticated);
}

/// An operator's deletion on one instance: two others, holding the sessions and the profile in
/// memory, reject and no longer serve them when the call returns; the stream says so; a second
/// DeleteUser is OK, an unknown id NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_deletion_is_seen_at_once_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let ([a, b, c], mut watcher) = watched_fleet(dir.path()).await;
    let personal = Personal::new();
    let (user_id, tokens) = personal.create(&a).await;
    let hits = |cache: &str| {
        format!("authd_local_cache_lookups_total{{cache=\"{cache}\",result=\"hit\"}}")
    };
    for holder in [&b, &c] {
        held(holder, &tokens).await;
        // Its follower may drop the profile once more for a version logged before (the email
        // change, the bio): read until it is kept.
        eventually(
            Duration::from_secs(15),
            "profile held in memory",
            || async {
                let before = holder.metric(&hits("profiles")).await;
                holder.get_profile(&user_id).await.unwrap();
                holder.get_profile(&user_id).await.unwrap();
                holder.metric(&hits("profiles")).await > before
            },
        )
        .await;
    }
    let delete = || pb::DeleteUserRequest {
        user_id: user_id.clone(),
    };
    let deleted = admin(&a).delete_user(with_key(ADMIN_KEY, delete())).await;
    assert_eq!(deleted.unwrap().into_inner().revoked_count, 2);
    for holder in [&b, &c] {
        for token in &tokens {
            assert_code(holder.validate(token).await, Code::Unauthenticated);
        }
        assert_code(holder.get_profile(&user_id).await, Code::NotFound);
    }
    let again = admin(&a).delete_user(with_key(ADMIN_KEY, delete())).await;
    assert_eq!(again.unwrap().into_inner().revoked_count, 0);
    let unknown = pb::DeleteUserRequest {
        user_id: uuid::Uuid::new_v4().to_string(),
    };
    assert_code(
        admin(&a).delete_user(with_key(ADMIN_KEY, unknown)).await,
        Code::NotFound,
    );
    let mut events = Vec::new();
    while !events
        .iter()
        .any(|e: &pb::Event| matches!(&e.kind, Some(Kind::UserDeleted(_))))
    {
        events.extend(watcher.next().await.unwrap().events);
    }
    let mine: Vec<&Kind> = events
        .iter()
        .filter_map(|e| e.kind.as_ref())
        .filter(|kind| match kind {
            Kind::SessionsRevoked(r) => r.user_id == user_id,
            Kind::UserDeleted(d) => d.user_id == user_id,
            _ => false,
        })
        .collect();
    assert!(
        matches!(mine.as_slice(), [Kind::SessionsRevoked(r), Kind::UserDeleted(_)]
            if r.reason() == pb::RevocationReason::UserDeleted),
        "{mine:?}"
    );
    personal.assert_gone(&a, Mode::Redis).await;
}

/// What the owner proved is checked again under the account's lock: a revocation of their
/// session, or a new password, that commits while DeleteAccount waits for the lock wins, and
/// the account stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_or_new_password_meanwhile_stops_a_deletion() {
    let app = spawn_app(Mode::Redis).await;
    let url = app.settings.database.url.expose_secret().to_owned();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for change in [
        "update sessions set revoked_at = clock_timestamp() where user_id = $1",
        "update users set password_hash = password_hash || 'x' where id = $1",
    ] {
        let (_, registered) = app.register().await;
        let user_id = uuid::Uuid::parse_str(&registered.user_id).unwrap();
        let mut lock = pool.begin().await.unwrap();
        sqlx::query("select 1 from users where id = $1 for update")
            .bind(user_id)
            .execute(&mut *lock)
            .await
            .unwrap();
        let token = registered.session_token.clone();
        let deletion = tokio::spawn({
            let auth = app.auth.clone();
            async move {
                let mut auth = auth;
                auth.delete_account(pb::DeleteAccountRequest {
                    session_token: token,
                    password: PASSWORD.into(),
                })
                .await
            }
        });
        // The deletion has checked the session and the password, and waits for the lock.
        tokio::time::sleep(Duration::from_millis(700)).await;
        sqlx::query(sqlx::AssertSqlSafe(change))
            .bind(user_id)
            .execute(&mut *lock)
            .await
            .unwrap();
        lock.commit().await.unwrap();
        let answer = deletion.await.unwrap();
        assert_code(answer, Code::Unauthenticated);
        let left: bool = sqlx::query_scalar("select exists (select 1 from users where id = $1)")
            .bind(user_id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(left, "{change}: the account stays");
    }
}

/// Addresses change hands: an audit row is rewritten at a deletion only if it found the deleted
/// account. X had an address when an operator looked it up, then moved away; Y moved to it and is
/// deleted: the row stays (it was about X). X is deleted: the row names X, pseudonymously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_rewrites_only_the_audit_rows_about_its_account() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = notifier_settings(Mode::Redis, dir.path());
    settings.accounts.attempts_per_address = 1000;
    let app = operated(settings, dir.path()).await;
    let (shared, x) = app.register().await;
    let lookup = pb::get_user_request::Lookup::Email(shared.clone());
    let request = pb::GetUserRequest {
        lookup: Some(lookup),
    };
    admin(&app)
        .get_user(with_key(ADMIN_KEY, request))
        .await
        .unwrap();
    let moved = app
        .start_change(&x.session_token, &unique_email(), "")
        .await;
    app.confirm_change(&moved.unwrap().code).await.unwrap();
    let (_, y) = app.register().await;
    let taken = app.start_change(&y.session_token, &shared, "").await;
    app.confirm_change(&taken.unwrap().code).await.unwrap();

    let target = format!("email:{}", shared.to_lowercase());
    let audit = |target: String| {
        let app = &app;
        async move {
            let url = app.settings.database.url.expose_secret();
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            sqlx::query_scalar::<_, i64>(
                "select count(*) from admin_audit where method = 'GetUser' and target = $1",
            )
            .bind(target)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(audit(target.clone()).await, 1);
    assert_eq!(
        delete_account(&app, &y.session_token, PASSWORD)
            .await
            .unwrap(),
        1
    );
    assert_eq!(audit(target.clone()).await, 1, "about X, not Y");
    assert_eq!(audit(format!("deleted_user:{}", y.user_id)).await, 0);
    assert_eq!(
        delete_account(&app, &x.session_token, PASSWORD)
            .await
            .unwrap(),
        1
    );
    assert_eq!(audit(target).await, 0);
    assert_eq!(audit(format!("deleted_user:{}", x.user_id)).await, 1);
}
