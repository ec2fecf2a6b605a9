//! What operators do to accounts: disable against racing logins, session pages, a transaction paused under a row lock.
use super::*;

/// GetUser (by id, by email in any case), the sessions of another user, revocations that every
/// instance sees at once, unknown users and bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_act_on_accounts_and_every_instance_sees_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = keyed_app(Mode::Redis, dir.path()).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let (email, reg) = a.register().await;
    let second = a.login(&email, PASSWORD).await.unwrap();
    for app in [&a, &b] {
        assert!(app.served_from_redis(&second.session_token).await);
    }
    let by_email = admin(&a)
        .get_user(with_key(
            KEY,
            pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::Email(email.to_uppercase())),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(by_email.user_id, reg.user_id);
    assert_eq!(by_email.active_session_count, 2);
    assert!(by_email.last_login_at.is_some());

    // One session, then the rest.
    let second_id = second.session.unwrap().session_id;
    admin(&a)
        .revoke_user_session(with_key(
            KEY,
            pb::RevokeUserSessionRequest {
                user_id: reg.user_id.clone(),
                session_id: second_id.clone(),
            },
        ))
        .await
        .unwrap();
    for app in [&a, &b] {
        assert_code(
            app.validate(&second.session_token).await,
            Code::Unauthenticated,
        );
        app.validate(&reg.session_token).await.unwrap();
    }
    let (_, other) = a.register().await;
    let foreign = admin(&a)
        .revoke_user_session(with_key(
            KEY,
            pb::RevokeUserSessionRequest {
                user_id: other.user_id.clone(),
                session_id: second_id.clone(),
            },
        ))
        .await;
    assert_code(foreign, Code::NotFound);
    let revoked = admin(&a)
        .revoke_user_sessions(with_key(
            KEY,
            pb::RevokeUserSessionsRequest {
                user_id: reg.user_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .revoked_count;
    assert_eq!(revoked, 1);
    for app in [&a, &b] {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
        app.validate(&other.session_token).await.unwrap();
    }

    let unknown = uuid::Uuid::now_v7().to_string();
    assert_code(get_user(&a, KEY, &unknown).await, Code::NotFound);
    let status = assert_code(get_user(&a, KEY, "not-a-uuid").await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["user_id"]);
    let status = assert_code(
        admin(&a)
            .get_user(with_key(KEY, pb::GetUserRequest { lookup: None }))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["lookup"]);
    let status = assert_code(
        admin(&a)
            .disable_user(with_key(
                KEY,
                pb::DisableUserRequest {
                    user_id: reg.user_id.clone(),
                    reason: "x".repeat(501),
                },
            ))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["reason"]);
    for call in [
        admin(&a)
            .revoke_user_sessions(with_key(
                KEY,
                pb::RevokeUserSessionsRequest {
                    user_id: unknown.clone(),
                },
            ))
            .await
            .map(|_| ()),
        admin(&a)
            .enable_user(with_key(
                KEY,
                pb::EnableUserRequest {
                    user_id: unknown.clone(),
                },
            ))
            .await
            .map(|_| ()),
        admin(&a)
            .disable_user(with_key(
                KEY,
                pb::DisableUserRequest {
                    user_id: unknown.clone(),
                    reason: String::new(),
                },
            ))
            .await
            .map(|_| ()),
    ] {
        assert_code(call, Code::NotFound);
    }
}

/// DisableUser racing 50 logins with the right password, on two instances: whatever each login
/// answered, no session of the user is valid anywhere once DisableUser returned. Then Login
/// tells only a caller with the right password that the account is disabled; EnableUser lets
/// it in again without bringing any session back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabling_an_account_leaves_no_session_whatever_races_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = keyed_app(Mode::Redis, dir.path()).await;
    let b = spawn_sharing(&a, |s| s.rate_limit.login_per_email = 0).await;
    let (email, reg) = a.register().await;
    let logins = (0..50).map(|i| {
        let app = if i % 2 == 0 { &a } else { &b };
        let email = email.clone();
        async move { app.login(&email, PASSWORD).await }
    });
    let disable = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        admin(&a)
            .disable_user(with_key(
                KEY,
                pb::DisableUserRequest {
                    user_id: reg.user_id.clone(),
                    reason: "compromised".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
    };
    let (results, disabled) = tokio::join!(join_all(logins), disable);
    assert!(
        disabled.revoked_count >= 1,
        "the registration's session at least"
    );
    let tokens: Vec<String> = std::iter::once(reg.session_token.clone())
        .chain(
            results
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .map(|r| r.session_token.clone()),
        )
        .collect();
    for result in &results {
        if let Err(status) = result {
            assert!(
                matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated | Code::ResourceExhausted
                ),
                "{status:?}"
            );
        }
    }
    for app in [&a, &b] {
        for token in &tokens {
            assert_code(app.validate(token).await, Code::Unauthenticated);
        }
    }
    let user = get_user(&a, KEY, &reg.user_id).await.unwrap();
    assert!(user.disabled && user.disabled_at.is_some());
    assert_eq!(
        (user.disabled_reason.as_str(), user.active_session_count),
        ("compromised", 0)
    );
    let status = assert_code(a.login(&email, PASSWORD).await, Code::PermissionDenied);
    assert!(status.message().contains("disabled"), "{status:?}");
    let status = assert_code(
        a.login(&email, "a wrong password").await,
        Code::Unauthenticated,
    );
    assert!(!status.message().contains("disabled"), "{status:?}");

    admin(&a)
        .enable_user(with_key(
            KEY,
            pb::EnableUserRequest {
                user_id: reg.user_id.clone(),
            },
        ))
        .await
        .unwrap();
    let fresh = b.login(&email, PASSWORD).await.unwrap();
    a.validate(&fresh.session_token).await.unwrap();
    for token in &tokens {
        assert_code(a.validate(token).await, Code::Unauthenticated);
    }
    assert!(!get_user(&a, KEY, &reg.user_id).await.unwrap().disabled);
}

/// Sessions written straight to the store: `count` of `user_id`, one millisecond apart.
async fn seed_sessions(app: &TestApp, user_id: &str, count: i32) {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    sqlx::query(
        "insert into sessions (id, user_id, token_hash, created_at, last_seen_at,
                               absolute_expires_at, authenticated_at)
         select gen_random_uuid(), $1::uuid, sha256(gen_random_uuid()::text::bytea),
                now() - (i || ' milliseconds')::interval, now(), now() + interval '1 day', now()
         from generate_series(1, $2) as i",
    )
    .bind(user_id)
    .bind(count)
    .execute(&mut conn)
    .await
    .unwrap();
}

/// 120 sessions in pages of 50 while more are being created: every one exactly once, newest
/// first; page tokens that were tampered with or belong to another listing are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_page_without_gaps_or_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(Mode::NoRedis);
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    settings.admin.api_keys_file = Some(keys);
    settings.session.max_per_user = 1000;
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    seed_sessions(&app, &reg.user_id, 119).await;
    let list = |token: String, size: i32| {
        let mut client = admin(&app);
        let user_id = reg.user_id.clone();
        async move {
            client
                .list_user_sessions(with_key(
                    KEY,
                    pb::ListUserSessionsRequest {
                        user_id,
                        page_size: size,
                        page_token: token,
                    },
                ))
                .await
                .map(|r| r.into_inner())
        }
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(token.clone(), 50).await.unwrap();
        pages += 1;
        seen.extend(page.sessions.iter().map(|s| {
            let at = s.created_at.as_ref().unwrap();
            ((at.seconds, at.nanos), s.session_id.clone())
        }));
        // Sessions created meanwhile are newer than the cursor: they never shift a page.
        seed_sessions(&app, &reg.user_id, 3).await;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 120);
    let mut distinct = seen.iter().map(|s| s.1.clone()).collect::<Vec<_>>();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 120, "no session twice");
    assert!(seen.windows(2).all(|w| w[0].0 >= w[1].0), "newest first");

    let first = list(String::new(), 2).await.unwrap();
    let good = first.next_page_token;
    let mut tampered = good.clone().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for bad in [tampered, "garbage".to_owned()] {
        let status = assert_code(list(bad, 2).await, Code::InvalidArgument);
        assert_eq!(violation_fields(&status), ["page_token"]);
    }
    let (_, other) = app.register().await;
    let foreign = admin(&app)
        .list_user_sessions(with_key(
            KEY,
            pb::ListUserSessionsRequest {
                user_id: other.user_id,
                page_size: 2,
                page_token: good,
            },
        ))
        .await;
    assert_eq!(
        violation_fields(&assert_code(foreign, Code::InvalidArgument)),
        ["page_token"]
    );
    let status = assert_code(list(String::new(), 101).await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["page_size"]);
}

/// An instance paused (a GC-like stall, SIGSTOP) in the middle of a transaction that holds a
/// user's row: the other instances' calls on that user, whose statements were already waiting
/// for the row when the paused transaction ran its last statement, must be delayed by it, not
/// failed — PostgreSQL ends the idle transaction before their own statement timeout ends them.
/// The paused instance, resuming, finds its transaction ended: UNAVAILABLE (nothing of it was
/// committed), never INTERNAL. (The fault run's Sentinel seed 1795755029 met both: DisableUser
/// and RevokeUserSessions UNAVAILABLE on another instance, INTERNAL on the resumed one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_paused_under_a_row_lock_delays_the_others_calls_only() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = keyed_settings(Mode::Redis, dir.path());
    // A connection each for the two admin calls: what is shown is the row's wait, not the
    // share's queue.
    settings.database.shares.admin = 20;
    let app = spawn_with(settings).await;
    let (_, victim) = app.register().await;
    // The paused instance's connection: made as authd makes its own.
    let options = authd::store::session_options(&app.settings.database).unwrap();
    let mut paused = <sqlx::PgConnection as sqlx::Connection>::connect_with(&options)
        .await
        .unwrap();
    let mut tx = sqlx::Connection::begin(&mut paused).await.unwrap();
    sqlx::query("select 1 from users where id = $1::uuid for update")
        .bind(&victim.user_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let disable = {
        let (mut admin, user_id) = (admin(&app), victim.user_id.clone());
        tokio::spawn(async move {
            let request = pb::DisableUserRequest {
                user_id,
                reason: "paused holder".into(),
            };
            admin.disable_user(with_key(KEY, request)).await
        })
    };
    let revoke = {
        let (mut admin, user_id) = (admin(&app), victim.user_id.clone());
        tokio::spawn(async move {
            let request = pb::RevokeUserSessionsRequest { user_id };
            admin.revoke_user_sessions(with_key(KEY, request)).await
        })
    };
    // Both wait for the row; the paused transaction runs its last statement, then stands idle.
    tokio::time::sleep(app.settings.database.query_timeout / 4).await;
    sqlx::query("select 1").execute(&mut *tx).await.unwrap();
    disable
        .await
        .unwrap()
        .expect("DisableUser, delayed by the paused transaction");
    revoke
        .await
        .unwrap()
        .expect("RevokeUserSessions, delayed by the paused transaction");
    assert_code(
        app.validate(&victim.session_token).await,
        Code::Unauthenticated,
    );
    // The paused instance resumes.
    let resumed = sqlx::query("select 1").execute(&mut *tx).await.unwrap_err();
    let error = authd::store::StoreError::from(resumed);
    assert!(
        matches!(error, authd::store::StoreError::Unavailable(_)),
        "a transaction PostgreSQL ended is a passing condition: {error:?}"
    );
}
