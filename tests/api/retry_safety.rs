//! "Retrying is safe": a revoking call whose first attempt committed and then failed (the lease
//! holders could not be read, so it answered UNAVAILABLE) is retried, and the retry returns OK only
//! once no instance serves the session from memory — whoever revoked it. (Before: the retry found
//! nothing new to invalidate and returned at once, while a holder that could neither renew nor read
//! the logs kept accepting the token; the review's first finding.) For Logout, RevokeSession,
//! RevokeAllSessions, the AdminService's RevokeUserSessions, DisableUser and DeleteUser, and
//! CompletePasswordReset (retried with the same code and password), retried from an instance with
//! Redis and from one with `REDIS__ENABLED=false`. VerifyEmail and ConfirmEmailChange, which
//! revoke nothing, retried the same way: the same answer, after the same catch-up.
use std::time::Duration;

use authd::proto::authd::v1::{self as pb, admin_service_client::AdminServiceClient};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Status};

use crate::{
    helpers::*,
    proxy::{Link, Proxy},
};

const KEY: &str = "retry-key-0123456789abcdef";

/// Waits of the in-process caches that ended with every holder's acknowledgement.
const ACKED_WAITS: &str = "authd_local_cache_wait_seconds_count{ended=\"acked\"}";

/// The revoker with Redis (`a`, which owns the database), the revoker without (`c`), and the
/// holder (`b`): its PostgreSQL behind a proxy the test cuts, its follower slow enough that only
/// the protocol (not a follower pass) can drop its copy in the test's time.
pub struct Fleet {
    pub a: TestApp,
    pub b: TestApp,
    pub c: TestApp,
    pub pg: Proxy,
    _dir: tempfile::TempDir,
}

/// PostgreSQL's address (the tests' default).
pub fn pg_target() -> std::net::SocketAddr {
    let base = postgres_base_url();
    let hostport = base.rsplit('@').next().unwrap().trim_end_matches('/');
    hostport
        .parse()
        .expect("TEST_DATABASE_URL with a numeric host:port")
}

/// `app`'s database URL, through `proxy`.
pub fn db_url_via(app: &TestApp, proxy: &Proxy) -> String {
    let url = app.settings.database.url.expose_secret().to_owned();
    let target = pg_target().to_string();
    assert!(url.contains(&target), "{url}");
    url.replace(&target, &proxy.addr.to_string())
}

impl Fleet {
    /// `lease`: the fleet's (a holder cut off from PostgreSQL believes in its lease that long).
    pub async fn start(lease: Duration) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.toml");
        let text = format!(
            "[[key]]\nname = \"ops\"\nsha256 = \"{}\"\n",
            hex::encode(Sha256::digest(KEY))
        );
        std::fs::write(&keys, text).unwrap();
        let mut settings = test_settings(Mode::Redis);
        let notifiers = dir.path().join("notifiers.toml");
        crate::admin::write_keys(&notifiers, &[("mailer", crate::accounts::NOTIFIER_KEY)]);
        settings.accounts.api_keys_file = Some(notifiers);
        settings.local_cache.lease = lease;
        settings.grpc.request_timeout = lease * 2 + Duration::from_secs(5);
        settings.database.query_timeout = Duration::from_millis(300);
        settings.admin.api_keys_file = Some(keys);
        settings.rate_limit.login_per_email = 0;
        let a = spawn_with(settings).await;
        let pg = Proxy::start(pg_target()).await;
        let b_url = db_url_via(&a, &pg);
        let b = spawn_sharing(&a, |s| {
            s.database.url = b_url.into();
            s.session.invalidation_interval = Duration::from_secs(60);
        })
        .await;
        let c = spawn_sharing(&a, |s| {
            s.redis.enabled = false;
            s.local_cache.enabled = false;
        })
        .await;
        eventually(Duration::from_secs(15), "two lease holders", || async {
            a.db.leases().held().await.unwrap() == 2
        })
        .await;
        Self {
            a,
            b,
            c,
            pg,
            _dir: dir,
        }
    }

    pub fn revoker(&self, redis: bool) -> &TestApp {
        if redis { &self.a } else { &self.c }
    }

    /// `b` serves `token` from its memory.
    pub async fn hold(&self, token: &str) {
        let hits = "authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
        self.b.validate(token).await.unwrap();
        let before = self.b.metric(hits).await;
        self.b.validate(token).await.unwrap();
        assert_eq!(
            self.b.metric(hits).await,
            before + 1.0,
            "served from memory"
        );
    }

    /// Runs `attempt` while the lease table is locked: it commits, writes Redis, and cannot read
    /// the holders.
    pub async fn failing<T: std::fmt::Debug>(
        &self,
        attempt: impl Future<Output = Result<T, Status>>,
    ) -> Status {
        let pool = sqlx::PgPool::connect(self.a.settings.database.url.expose_secret())
            .await
            .unwrap();
        let mut lock = pool.begin().await.unwrap();
        sqlx::query("lock table local_cache_leases in access exclusive mode")
            .execute(&mut *lock)
            .await
            .unwrap();
        let answer = attempt.await;
        lock.rollback().await.unwrap();
        assert_code(answer, Code::Unavailable)
    }
}

pub fn admin(app: &TestApp) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::new(app.channel.clone())
}

pub fn with_key<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    let value = format!("Bearer {KEY}").parse().unwrap();
    request.metadata_mut().insert("authorization", value);
    request
}

/// What is retried.
#[derive(Debug, Clone, Copy)]
enum Call {
    Logout,
    RevokeSession,
    RevokeAllSessions,
    RevokeUserSessions,
    DisableUser,
    CompletePasswordReset,
    DeleteUser,
}

/// The target's user, and the token of another session of the same user (the caller of the
/// session-authenticated calls).
struct Target {
    user_id: String,
    token: String,
    session_id: String,
    caller: String,
    /// A password reset code of the user.
    code: String,
}

async fn call(on: &TestApp, what: Call, t: &Target) -> Result<(), Status> {
    match what {
        Call::Logout => on.logout(&t.token).await,
        Call::RevokeSession => on.revoke_session(&t.caller, &t.session_id).await,
        Call::RevokeAllSessions => on.revoke_all(&t.caller, false).await.map(|_| ()),
        Call::RevokeUserSessions => {
            let user_id = t.user_id.clone();
            let request = with_key(pb::RevokeUserSessionsRequest { user_id });
            admin(on).revoke_user_sessions(request).await.map(|_| ())
        }
        Call::DisableUser => {
            let request = with_key(pb::DisableUserRequest {
                user_id: t.user_id.clone(),
                reason: "retried".into(),
            });
            admin(on).disable_user(request).await.map(|_| ())
        }
        Call::DeleteUser => {
            let request = with_key(pb::DeleteUserRequest {
                user_id: t.user_id.clone(),
            });
            admin(on).delete_user(request).await.map(|_| ())
        }
        Call::CompletePasswordReset => on
            .complete_reset(&t.code, "a brand new passphrase 42")
            .await
            .map(|_| ()),
    }
}

/// The first attempt commits and fails; the holder is cut off from PostgreSQL (it can neither
/// renew nor read the logs, but it hears Redis); the retry comes once the revoker's log position
/// has passed the first attempt's row (so the retry's own rows name nothing new); after it
/// returned, the holder must reject the token.
async fn retried(what: Call, redis: bool) {
    let fleet = Fleet::start(Duration::from_secs(if redis { 20 } else { 8 })).await;
    let (email, registered) = fleet.a.register().await;
    let target = fleet.a.login(&email, PASSWORD).await.unwrap();
    let target = Target {
        user_id: registered.user_id,
        token: target.session_token,
        session_id: target.session.unwrap().session_id,
        caller: registered.session_token,
        code: fleet.a.start_reset(&email).await.unwrap().code,
    };
    fleet.hold(&target.token).await;
    if let Call::DeleteUser = what {
        // Its profile in b's memory too.
        for _ in 0..2 {
            fleet.b.get_profile(&target.user_id).await.unwrap();
        }
    }
    fleet.pg.set(Link::Blackhole);
    let revoker = fleet.revoker(redis);
    let first = fleet.failing(call(revoker, what, &target)).await;
    eprintln!("{what:?}, first attempt: {first:?}");
    if redis {
        // Past the in-flight allowance (10 x 300 ms + 1 s) and the clock margin.
        tokio::time::sleep(Duration::from_millis(6_500)).await;
    }
    // A retry may itself meet a busy share of the pool (the first attempt's audit row is still
    // being written again): it answers UNAVAILABLE then, and is retried — what matters is that
    // the attempt that answers OK has waited.
    let mut retry = call(revoker, what, &target).await;
    for _ in 0..5 {
        match &retry {
            Err(status) if status.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                retry = call(revoker, what, &target).await;
            }
            _ => break,
        }
    }
    retry.expect("a retry returns OK");
    let on_b = fleet.b.validate(&target.token).await;
    let profile_on_b = fleet.b.get_profile(&target.user_id).await;
    fleet.pg.set(Link::Up);
    assert_code(on_b, Code::Unauthenticated);
    if let Call::DeleteUser = what {
        // Dropped from b's memory: b, cut off from PostgreSQL, cannot read it again.
        let status = profile_on_b.expect_err("the deleted profile is not served");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
}

macro_rules! retried {
    ($($name:ident: $call:ident, $redis:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            retried(Call::$call, $redis).await
        }
    )*};
}

retried! {
    a_retried_logout_waits_for_the_holders: Logout, true;
    a_retried_logout_without_redis_waits_for_the_holders: Logout, false;
    a_retried_revoke_session_waits_for_the_holders: RevokeSession, true;
    a_retried_revoke_session_without_redis_waits_for_the_holders: RevokeSession, false;
    a_retried_revoke_all_sessions_waits_for_the_holders: RevokeAllSessions, true;
    a_retried_revoke_all_sessions_without_redis_waits_for_the_holders: RevokeAllSessions, false;
    a_retried_revoke_user_sessions_waits_for_the_holders: RevokeUserSessions, true;
    a_retried_revoke_user_sessions_without_redis_waits_for_the_holders: RevokeUserSessions, false;
    a_retried_disable_user_waits_for_the_holders: DisableUser, true;
    a_retried_disable_user_without_redis_waits_for_the_holders: DisableUser, false;
    a_retried_password_reset_waits_for_the_holders: CompletePasswordReset, true;
    a_retried_password_reset_without_redis_waits_for_the_holders: CompletePasswordReset, false;
    a_retried_delete_user_waits_for_the_holders: DeleteUser, true;
    a_retried_delete_user_without_redis_waits_for_the_holders: DeleteUser, false;
}

/// VerifyEmail and ConfirmEmailChange, first attempt committed and then UNAVAILABLE (the holders
/// could not be read): the retry with the same code answers OK with the same verification, after
/// a wait for the holders of its own (one more acknowledged wait on the revoker), and the holder's
/// copy of the session, served from memory before, says verified. (The holder heard the first
/// attempt's keys too: what the retry itself must do is shown by its wait.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_email_verification_or_change_answers_the_same_after_the_same_catch_up() {
    let fleet = Fleet::start(Duration::from_secs(20)).await;
    for change in [false, true] {
        let (_, registered) = fleet.a.register().await;
        let token = &registered.session_token;
        fleet.hold(token).await;
        assert!(!fleet.b.validate_full(token).await.unwrap().email_verified);
        let at = if change {
            let started = fleet.a.start_change(token, &unique_email(), "").await;
            let code = started.unwrap().code;
            let first = fleet.failing(fleet.a.confirm_change(&code)).await;
            eprintln!("ConfirmEmailChange, first attempt: {first:?}");
            let waits = fleet.a.metric(ACKED_WAITS).await;
            let retried = fleet.a.confirm_change(&code).await.unwrap();
            assert_eq!(
                fleet.a.metric(ACKED_WAITS).await,
                waits + 1.0,
                "the retry waited"
            );
            retried.email_verified_at
        } else {
            let started = fleet.a.start_verification(&registered.user_id).await;
            let code = started.unwrap().code;
            let first = fleet.failing(fleet.a.verify_email(&code)).await;
            eprintln!("VerifyEmail, first attempt: {first:?}");
            let waits = fleet.a.metric(ACKED_WAITS).await;
            let retried = fleet.a.verify_email(&code).await.unwrap();
            assert_eq!(
                fleet.a.metric(ACKED_WAITS).await,
                waits + 1.0,
                "the retry waited"
            );
            retried.email_verified_at
        };
        let on_b = fleet.b.validate_full(token).await.unwrap();
        assert!(on_b.email_verified, "{on_b:?}");
        assert_eq!(on_b.email_verified_at, at);
    }
    for flow in ["email_verification", "email_change"] {
        for outcome in ["completed", "retried"] {
            let sample = crate::accounts::completions(flow, outcome);
            assert_eq!(fleet.a.metric(&sample).await, 1.0, "{sample}");
        }
    }
}
