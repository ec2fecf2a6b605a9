//! The audit of every AdminService call: refused floods in bounded rows, callers that gave up, any bytes in a target.
use super::*;

/// (caller, method, outcome, count) of every audit row, oldest first.
async fn audit_counts(url: &str) -> Vec<(String, String, String, i32)> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(url)
        .await
        .unwrap();
    sqlx::query_as("select caller, method, outcome, count from admin_audit order by id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

/// Before: every refused call wrote a row, so anyone who reaches the port could make the
/// instance write to PostgreSQL as fast as it could send. Now refused calls get a row each only
/// within a budget (`REFUSED_ROWS_PER_SECOND`, a burst of twice that); the rest are summed up,
/// per method and outcome, into rows with their count — written every few seconds and when the
/// server stops — so the audit still accounts for every call. Admitted calls always get a row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_is_audited_in_bounded_rows() {
    const FLOOD: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let mut app = keyed_app(Mode::NoRedis, dir.path()).await;
    let (_, reg) = app.register().await;
    let started = std::time::Instant::now();
    for chunk in 0..FLOOD / 50 {
        join_all((0..50).map(|i| {
            let key = if (chunk + i) % 2 == 0 {
                "not-the-key"
            } else {
                "another-bad-key"
            };
            get_user(&app, key, &reg.user_id)
        }))
        .await
        .into_iter()
        .for_each(|r| {
            assert_code(r, Code::PermissionDenied);
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    get_user(&app, KEY, &reg.user_id).await.unwrap();
    let url = app.settings.database.url.expose_secret().to_owned();
    let single = audit_counts(&url)
        .await
        .iter()
        .filter(|r| r.0 == "key:unknown")
        .count();
    let budget = authd::admin::REFUSED_ROWS_PER_SECOND;
    assert!(
        (single as f64) <= budget * 2.0 + budget * elapsed + 1.0,
        "{single} rows for {FLOOD} refusals in {elapsed:.2} s"
    );
    assert!(single < FLOOD, "{single} rows");
    app.stop().await.unwrap();
    let rows = audit_counts(&url).await;
    let refused: i32 = rows
        .iter()
        .filter(|r| r.1 == "GetUser" && r.2 == "PermissionDenied")
        .map(|r| r.3)
        .sum();
    assert_eq!(
        refused, FLOOD as i32,
        "every refusal is accounted for: {rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.0 == "key:unknown" && r.3 > 1),
        "summed-up rows keep their caller: {rows:?}"
    );
    assert!(rows.contains(&("key:ops".into(), "GetUser".into(), "Ok".into(), 1)));
}

/// Before: the audit row was written after the action, in the call's own future: a caller that
/// hung up (or whose deadline passed) while the action ran dropped it, and an action could take
/// effect with no audit row; and a shutdown right after closed the pool under a call still
/// running. Now action and audit run on their own task, which shutdown waits for: with
/// PostgreSQL hung, a DisableUser whose caller gave up, followed at once by a SIGTERM, is
/// audited once PostgreSQL answers again, before the process exits. PostgreSQL stays away
/// past the pool's acquire timeout twice over, so the action fails and so does the audit
/// row's first write (which once lost the row: CI saw it when load stretched the timings):
/// the row is written again until PostgreSQL takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_whose_caller_gave_up_is_still_audited() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = test_settings(Mode::NoRedis);
    let url = settings.database.url.expose_secret().to_owned();
    settings.database.url = url
        .replace("127.0.0.1:5432", &postgres.addr.to_string())
        .into();
    settings.admin.api_keys_file = Some(keys);
    let mut app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    postgres.set(Link::Blackhole);
    let mut request = with_key(
        KEY,
        pb::DisableUserRequest {
            user_id: reg.user_id.clone(),
            reason: "lost laptop".into(),
        },
    );
    request.set_timeout(Duration::from_millis(500));
    let status = admin(&app).disable_user(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    // SIGTERM now; PostgreSQL answers again 2.5 s later (the action's acquire timed out at
    // 1 s, the audit row's first write at 2 s).
    let (stopped, ()) = tokio::join!(app.stop(), async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        postgres.set(Link::Up);
    });
    stopped.unwrap();
    let rows = audit_counts(&url).await;
    assert!(
        rows.iter()
            .any(|r| r.0 == "key:ops" && r.1 == "DisableUser"),
        "{rows:?}"
    );
}

/// Review found: PostgreSQL text cannot hold a NUL byte, so a target with one made the audit
/// insert fail — no row, for refused and admitted callers alike (200 wrong-key guesses left 0
/// rows) — and newlines and ANSI escapes were stored raw, to drive the terminal of an operator
/// reading the table. Now control characters are written `\u{XX}` (and a backslash `\\`): each
/// such call, refused or admitted, leaves one row naming what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_bytes_in_a_target_leave_one_readable_audit_row() {
    let dir = tempfile::tempdir().unwrap();
    let app = keyed_app(Mode::NoRedis, dir.path()).await;
    let targets = [
        "a\0b",
        "line\nforged row",
        "\x1b[2J\x1b[31mred",
        "back\\slash",
    ];
    for target in targets {
        let refused = get_user(&app, "not-the-key", target).await.unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
        let admitted = get_user(&app, KEY, target).await.unwrap_err();
        assert_eq!(admitted.code(), Code::InvalidArgument, "{admitted:?}");
    }
    let url = app.settings.database.url.expose_secret().to_owned();
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select caller, target from admin_audit where method = 'GetUser' order by id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let expected = [
        "a\\u{0}b",
        "line\\u{a}forged row",
        "\\u{1b}[2J\\u{1b}[31mred",
        "back\\\\slash",
    ];
    let mut want = Vec::new();
    for target in expected {
        want.push(("key:unknown".to_owned(), target.to_owned()));
        want.push(("key:ops".to_owned(), target.to_owned()));
    }
    assert_eq!(rows, want);
    assert!(
        rows.iter().all(|(_, t)| !t.chars().any(char::is_control)),
        "{rows:?}"
    );
}
