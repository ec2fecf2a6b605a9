//! What is checked of the live system once the faults are over: acknowledged writes kept, the logs followed, recovery.
use super::*;

/// 3. Everything acknowledged is in PostgreSQL: registered users, profile versions, revoked
///    sessions.
pub(crate) async fn acknowledged_writes_are_kept(
    env: &Env,
    shared: &Shared,
    ops: &[history::Op],
) -> Vec<Violation> {
    let mut violations = Vec::new();
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url()).await
    else {
        return vec![Violation {
            rule: "acknowledged writes are kept",
            what: "cannot read PostgreSQL at the end".into(),
            ops: vec![],
        }];
    };
    let deleted: std::collections::HashSet<usize> = ops
        .iter()
        .filter(|o| o.kind == history::Kind::DeleteUser && o.outcome == "Ok")
        .map(|o| o.user)
        .collect();
    for op in ops.iter().filter(|o| o.outcome == "Ok") {
        if op.kind == history::Kind::DeleteUser {
            let id = shared.accounts[op.user].lock().unwrap().user_id.clone();
            let id = uuid::Uuid::parse_str(&id).unwrap_or_default();
            let back: bool =
                sqlx::query_scalar("select exists (select 1 from users where id = $1)")
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap_or(true);
            if back {
                violations.push(Violation {
                    rule: "acknowledged writes are kept",
                    what: format!("deleted user {} is back", op.user),
                    ops: vec![op.id],
                });
            }
        }
        if let Some(user) = &op.created_user {
            let id = uuid::Uuid::parse_str(user).unwrap_or_default();
            let found: bool =
                sqlx::query_scalar("select exists (select 1 from users where id = $1)")
                    .bind(id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap_or(false);
            if !found {
                violations.push(Violation {
                    rule: "acknowledged writes are kept",
                    what: format!("registered user {user} is missing"),
                    ops: vec![op.id],
                });
            }
        }
        if op.kind == history::Kind::UpdateProfile {
            for (user, version) in op.versions.iter().filter(|(u, _)| !deleted.contains(u)) {
                let id = shared.accounts[*user].lock().unwrap().user_id.clone();
                let id = uuid::Uuid::parse_str(&id).unwrap_or_default();
                let stored: i64 =
                    sqlx::query_scalar("select version from profiles where user_id = $1")
                        .bind(id)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap_or(0);
                if stored < *version {
                    violations.push(Violation {
                        rule: "acknowledged writes are kept",
                        what: format!(
                            "profile of user {user} is at {stored}, below acknowledged {version}"
                        ),
                        ops: vec![op.id],
                    });
                }
            }
        }
        let covered: Vec<uuid::Uuid> = op
            .covers
            .iter()
            .filter_map(|s| uuid::Uuid::parse_str(s).ok())
            .collect();
        if !covered.is_empty() {
            let live: Vec<uuid::Uuid> = sqlx::query_scalar(
                "select id from sessions where id = any($1) and revoked_at is null",
            )
            .bind(&covered)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
            if !live.is_empty() {
                violations.push(Violation {
                    rule: "acknowledged writes are kept",
                    what: format!(
                        "{} sessions of an acknowledged revocation are not revoked",
                        live.len()
                    ),
                    ops: vec![op.id],
                });
            }
        }
    }
    violations
}

/// Whether the cache has followed the outbox logs to their end: the cursor of the run's newest
/// namespace (key prefix and generation) stands past every logged row.
pub(crate) async fn logs_followed(env: &Env) -> bool {
    let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&env.database_url()).await
    else {
        return false;
    };
    sqlx::query_scalar::<_, bool>(
        "select coalesce((
             select c.sessions_after >= coalesce((select max(created_at) from session_invalidations), '-infinity')
                and c.profiles_after >= coalesce((select max(created_at) from profile_invalidations), '-infinity')
             from outbox_cursors c
             where starts_with(c.namespace, $1)
             order by c.updated_at desc
             limit 1), false)",
    )
    .bind(&env.prefix)
    .fetch_one(&mut conn)
    .await
    .unwrap_or(false)
}

/// 6. After the last fault, within [`RECOVERY_BOUND`]: every instance SERVING, Redis up, a
///    cached validation on every instance costs no PostgreSQL query, and the outbox logs are
///    followed to their end. The time it took.
pub(crate) async fn recovers(env: &Env) -> Result<Duration, Violation> {
    let started = Instant::now();
    let mut auth = AuthServiceClient::new(channel(env.instances[0].grpc));
    let email = format!("recovery-{}@faults.example", uuid::Uuid::new_v4().simple());
    let mut token = None;
    let mut last = String::new();
    while started.elapsed() < RECOVERY_BOUND {
        if token.is_none() {
            token = auth
                .register(pb::RegisterRequest {
                    email: email.clone(),
                    password: PASSWORDS[0].into(),
                    display_name: "Recovery".into(),
                    client: None,
                })
                .await
                .ok()
                .map(|r| r.into_inner().session_token);
        }
        let mut all = token.is_some();
        for instance in &env.instances {
            if !all {
                break;
            }
            let serving = instance.health().await == Some(ServingStatus::Serving);
            let redis_up = instance.metric("authd_redis_up").await == Some(1.0);
            let cached = match &token {
                Some(token) if serving && redis_up => {
                    let mut client = AuthServiceClient::new(channel(instance.grpc));
                    let validate = |client: &mut AuthServiceClient<Channel>| {
                        let request = pb::ValidateSessionRequest {
                            session_token: token.clone(),
                            ..Default::default()
                        };
                        let mut client = client.clone();
                        async move { client.validate_session(request).await.is_ok() }
                    };
                    let warm = validate(&mut client).await && validate(&mut client).await;
                    let sample = "authd_db_queries_total{origin=\"request\"}";
                    let before = instance.metric(sample).await;
                    let again = validate(&mut client).await;
                    warm && again && before.is_some() && instance.metric(sample).await == before
                }
                _ => false,
            };
            if !(serving && redis_up && cached) {
                last = format!(
                    "instance {}: serving {serving}, redis_up {redis_up}, cached validation {cached}",
                    instance.index
                );
                all = false;
            }
        }
        if all && !logs_followed(env).await {
            last = "the outbox logs are not followed to their end".into();
            all = false;
        }
        if all {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(Violation {
        rule: "recovers by itself",
        what: format!(
            "not recovered {} s after the last fault: {last}",
            RECOVERY_BOUND.as_secs()
        ),
        ops: vec![],
    })
}
