//! Tokens carry proof that authd minted them (a MAC under a signing key kept in PostgreSQL): a
//! made-up token costs no lookup; tokens of the previous release work while their sessions live,
//! and a flood of made-up ones in that format costs at most the caller's budget of unknown
//! lookups; signing keys rotate.
use std::time::Duration;

use authd::auth::token::{SigningKey, TOKEN_PREFIX, TokenHash};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::{ExposeSecret, SecretString};
use tonic::Code;

use crate::{
    helpers::{
        Mode, PASSWORD, TestApp, assert_code, made_up_token, redis_client, redis_command_calls,
        spawn_with, test_settings,
    },
    redis_server::RedisServer,
};

/// Redis commands that would touch a session or a profile (the background's heartbeats, pings
/// and identity checks left out).
async fn data_commands(redis: &fred::clients::Client) -> u64 {
    redis_command_calls(redis)
        .await
        .iter()
        .filter(|(command, _)| {
            matches!(
                command.as_str(),
                "get" | "mget" | "set" | "del" | "evalsha" | "eval" | "exists"
            )
        })
        .map(|(_, calls)| calls)
        .sum()
}

/// Review found: a ValidateSession with a made-up token missed Redis and queried PostgreSQL
/// (1.03 queries per call), so a flood of them starved the pool. Now a token authd did not
/// mint is refused by its MAC: no PostgreSQL query and no Redis command, for any call that
/// takes a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_made_up_token_costs_no_lookup() {
    let redis_server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis_server.url());
    let app = spawn_with(settings).await;
    let redis = redis_client(&redis_server.url()).await;
    let (_, registered) = app.register().await;
    let (queries, commands) = (app.queries(), data_commands(&redis).await);
    for _ in 0..200 {
        let token = made_up_token();
        assert_code(app.validate(&token).await, Code::Unauthenticated);
        assert_code(app.logout(&token).await, Code::Unauthenticated);
        assert_code(app.list_sessions(&token).await, Code::Unauthenticated);
    }
    // A real token's random part under another key's MAC, and a key id nobody has.
    let real = &registered.session_token;
    let (random, _) = real.rsplit_once('.').unwrap();
    let (random, _) = random.rsplit_once('.').unwrap();
    let forged = made_up_token();
    let (_, forged_tail) = forged.split_once('.').unwrap();
    assert_code(
        app.validate(&format!("{random}.{forged_tail}")).await,
        Code::Unauthenticated,
    );
    assert_eq!(app.queries(), queries, "no PostgreSQL query");
    assert_eq!(data_commands(&redis).await, commands, "no Redis command");
    app.validate(real).await.unwrap();
}

/// A session of the previous release (its token has no key id), written as that release did.
async fn legacy_session(app: &TestApp, user_id: &str) -> String {
    let token = format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(SigningKey::random_secret())
    );
    let hash = TokenHash::of_token(&token).unwrap();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    sqlx::query(
        "insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                               absolute_expires_at, authenticated_at)
         values ($1, $2, $3, now(), now(), now() + interval '1 day', now())",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(user_id.parse::<uuid::Uuid>().unwrap())
    .bind(hash.as_bytes())
    .execute(&mut conn)
    .await
    .unwrap();
    token
}

fn legacy_made_up() -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        URL_SAFE_NO_PAD.encode(SigningKey::random_secret())
    )
}

/// During the upgrade: a token of the previous release validates while its session lives; a
/// flood of made-up tokens in that format (which no MAC can refuse) costs at most the caller's
/// budget of unknown lookups (`RATE_LIMIT__UNKNOWN_LOOKUPS_PER_IP`, 20 in 10 s: a burst of 10),
/// then RESOURCE_EXHAUSTED with a retry delay, without a query — and a lookup that finds its
/// session is given back, so real tokens keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_the_previous_release_work_and_made_up_ones_cost_at_most_the_budget() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.local_cache.enabled = false;
    let first = spawn_with(settings.clone()).await;
    let (_, registered) = first.register().await;
    let legacy = legacy_session(&first, &registered.user_id).await;
    // An instance starting now sees a live session without a key: the transition is on.
    let app = crate::helpers::spawn_sharing(&first, |_| {}).await;
    for _ in 0..30 {
        app.validate(&legacy).await.expect("the old token works");
    }
    let before = app.queries();
    let mut refused = 0;
    for _ in 0..200 {
        match app.validate(&legacy_made_up()).await {
            Err(status) if status.code() == Code::Unauthenticated => {}
            Err(status) if status.code() == Code::ResourceExhausted => {
                refused += 1;
                assert!(!status.details().is_empty(), "a RetryInfo");
            }
            other => panic!("{other:?}"),
        }
    }
    let queries = app.queries() - before;
    assert!(queries <= 11, "{queries} queries for 200 made-up tokens");
    assert!(refused >= 189, "{refused} refused");
    assert!(
        app.metric("authd_rate_limited_total{operation=\"unknown_lookup\"}")
            .await
            >= 189.0
    );
    // The budget is the address's: real tokens minted by authd are not concerned.
    app.validate(&registered.session_token).await.unwrap();

    // Once no live session has a token without a key (revoked here), an instance refuses such
    // tokens without any lookup.
    first.logout(&legacy).await.unwrap();
    let later = crate::helpers::spawn_sharing(&first, |_| {}).await;
    let before = later.queries();
    for _ in 0..50 {
        assert_code(
            later.validate(&legacy_made_up()).await,
            Code::Unauthenticated,
        );
    }
    assert_eq!(later.queries(), before);
}

/// `TOKENS__LEGACY_UNTIL` ends the transition early: tokens without a key id are refused
/// (without a lookup), even those of live sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transition_ends_at_the_configured_time() {
    let first = spawn_with(test_settings(Mode::Redis)).await;
    let (_, registered) = first.register().await;
    let legacy = legacy_session(&first, &registered.user_id).await;
    let app = crate::helpers::spawn_sharing(&first, |s| {
        s.tokens.legacy_until = Some(chrono::Utc::now() - chrono::TimeDelta::minutes(1));
    })
    .await;
    let before = app.queries();
    assert_code(app.validate(&legacy).await, Code::Unauthenticated);
    assert_eq!(app.queries(), before);
    first.validate(&legacy).await.unwrap();
}

/// A key made by another instance (and active before this one reloaded) is learnt from the
/// first token that names it; a token naming a key nobody made costs at most one reload per
/// 5 s, however many come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_key_is_learnt_from_its_first_token() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let (email, _) = app.register().await;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    let secret = SigningKey::random_secret();
    let id: i32 = sqlx::query_scalar(
        "insert into token_keys (secret, activates_at) values ($1, now()) returning id",
    )
    .bind(secret.to_vec())
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let key = SigningKey::new(u32::try_from(id).unwrap(), &secret).unwrap();
    let (token, hash) = authd::auth::token::generate(&key);
    let user_id: uuid::Uuid = sqlx::query_scalar("select id from users where email = $1")
        .bind(&email)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                               absolute_expires_at, authenticated_at, key_id)
         values ($1, $2, $3, now(), now(), now() + interval '1 day', now(), $4)",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(user_id)
    .bind(hash.as_bytes())
    .bind(id)
    .execute(&mut conn)
    .await
    .unwrap();
    app.validate(&token).await.expect("the new key was loaded");
    // New sessions are minted under it from now on.
    let login = app.login(&email, PASSWORD).await.unwrap();
    assert!(
        login.session_token.contains(&format!(".{id}.")),
        "{}",
        login.session_token
    );

    let background = "authd_db_queries_total{origin=\"background\"}";
    let nobody = SigningKey::new(u32::MAX, &SigningKey::random_secret()).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = app.metric(background).await;
    for _ in 0..100 {
        let (token, _) = authd::auth::token::generate(&nobody);
        assert_code(app.validate(&token).await, Code::Unauthenticated);
    }
    let reloads = app.metric(background).await - before;
    // One reload is two queries; the health check and the other jobs run meanwhile too.
    assert!(reloads < 40.0, "{reloads} background queries");
}

/// Keys rotate: the next is made when the newest is older than `TOKENS__KEY_ROTATION` less
/// the lead (10 minutes), activates after the lead, and tokens of the older key stay valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_and_older_tokens_stay_valid() {
    let app = spawn_with(test_settings(Mode::Redis)).await;
    let (email, registered) = app.register().await;
    let keys = || async {
        let state = app.db.token_keys().load().await.unwrap();
        state.keys.len()
    };
    assert_eq!(keys().await, 1, "one key on a new database");
    let rotation = Duration::from_secs(3600);
    let lead = authd::auth::keys::KEY_LEAD;
    assert!(!app.db.token_keys().rotate(rotation, lead).await.unwrap());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    sqlx::query("update token_keys set activates_at = activates_at - interval '55 minutes'")
        .execute(&mut conn)
        .await
        .unwrap();
    assert!(app.db.token_keys().rotate(rotation, lead).await.unwrap());
    assert!(
        !app.db.token_keys().rotate(rotation, lead).await.unwrap(),
        "one at a time"
    );
    assert_eq!(keys().await, 2);
    app.refresh_keys().await;
    // Not active yet: still minted under the first key.
    let login = app.login(&email, PASSWORD).await.unwrap();
    assert!(
        login.session_token.contains(".1."),
        "{}",
        login.session_token
    );
    sqlx::query("update token_keys set activates_at = now() where id = 2")
        .execute(&mut conn)
        .await
        .unwrap();
    app.refresh_keys().await;
    let login = app.login(&email, PASSWORD).await.unwrap();
    assert!(
        login.session_token.contains(".2."),
        "{}",
        login.session_token
    );
    app.validate(&registered.session_token)
        .await
        .expect("a token of the first key");
    app.validate(&login.session_token).await.unwrap();
}

/// Review found: an instance whose reload of the keys failed answered a valid token under a
/// newer key UNAUTHENTICATED for 5 s (clients take that as logged out). Now UNAVAILABLE while it
/// cannot know, and OK as soon as a reload succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_under_a_key_an_instance_cannot_load_yet_is_unavailable_not_refused() {
    let mut settings = test_settings(Mode::Redis);
    settings.database.query_timeout = Duration::from_millis(500);
    let a = spawn_with(settings).await;
    let b = crate::helpers::spawn_sharing(&a, |_| {}).await;
    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(a.settings.database.url.expose_secret())
            .await
            .unwrap();
    // A newer key, active now, which A loads and B has not (as if B missed it).
    sqlx::query("insert into token_keys (secret, activates_at) values ($1, now())")
        .bind(SigningKey::random_secret().to_vec())
        .execute(&mut conn)
        .await
        .unwrap();
    a.refresh_keys().await;
    let (_, registered) = a.register().await;
    let token = registered.session_token;
    let mut lock = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::query("lock table token_keys in access exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    for _ in 0..4 {
        assert_code(b.validate(&token).await, Code::Unavailable);
    }
    lock.rollback().await.unwrap();
    crate::helpers::eventually(Duration::from_secs(10), "B loads the key", || async {
        b.validate(&token).await.is_ok()
    })
    .await;
}
