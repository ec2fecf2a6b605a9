//! Strict mode: a subscriber holding a lease is waited for by every revoking call of the fleet,
//! until it acknowledged a batch that covers the change or its lease ended.
use std::time::Duration;

use authd::proto::authd::v1::{self as pb, event::Kind};
use tonic::Code;

use super::{
    SUBSCRIBER_KEY, Watcher, reason, sid, subscribed_settings, validator::strict_validator,
};
use crate::{
    both_modes,
    helpers::{Mode, PASSWORD, eventually, spawn_sharing, spawn_with},
};

both_modes!(a_revocation_returns_once_the_subscriber_acknowledged_it);

/// A lease long enough that no wait in these tests ends by it.
fn long_lease(settings: &mut authd::config::Settings) {
    settings.local_cache.lease = Duration::from_secs(20);
    settings.grpc.request_timeout = Duration::from_secs(30);
}

async fn a_revocation_returns_once_the_subscriber_acknowledged_it(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(mode, dir.path());
    long_lease(&mut settings);
    let host = spawn_with(settings).await;
    // The revocation runs on another instance than the subscriber's host.
    let revoker = spawn_sharing(&host, |_| {}).await;
    let mut watcher = Watcher::open(&host, Some(SUBSCRIBER_KEY), pb::Mode::Strict, "")
        .await
        .unwrap();
    let first = watcher.next().await.unwrap();
    let granted = first.lease.expect("the first batch grants the lease");
    assert_eq!(granted.acknowledgement, 0);
    assert_eq!(
        granted.valid_for,
        Some(prost_types::Duration {
            seconds: 20,
            nanos: 0
        })
    );
    watcher.ack(&first.position).await;
    let (email, _) = revoker.register().await;
    let login = revoker.login(&email, PASSWORD).await.unwrap();
    let logout = {
        let revoker = revoker.auth.clone();
        let token = login.session_token.clone();
        tokio::spawn(async move {
            let mut client = revoker;
            client
                .logout(pb::LogoutRequest {
                    session_token: token,
                })
                .await
        })
    };
    let (events, at) = watcher.events(1).await;
    let Some(Kind::SessionRevoked(revoked)) = &events[0].kind else {
        panic!("{events:?}")
    };
    assert_eq!(revoked.session_id, sid(&login.session));
    // The subscriber has not acknowledged it: the call waits (its lease has 20 s to run).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !logout.is_finished(),
        "Logout returned before the subscriber applied it"
    );
    let acknowledged = watcher.ack(&at.position).await;
    let mut sequence = acknowledged;
    // Acknowledging every batch, as a subscriber does: without Redis the revoker sees the
    // change applied through the lease table, with the acknowledgement of a pass that began
    // after it read the holders (the one that read the change may have begun before). The extension is granted
    // with a later batch, naming an acknowledgement.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut granted = None;
    while !logout.is_finished() || granted.is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "Logout returns once acknowledged, and the extension is granted"
        );
        if let Ok(Ok(batch)) = tokio::time::timeout(Duration::from_millis(50), watcher.next()).await
        {
            granted = batch.lease.or(granted);
            sequence = watcher.ack(&batch.position).await;
        }
    }
    let answered = logout.await.unwrap();
    assert!(answered.is_ok(), "{answered:?}");
    let granted = granted.expect("a grant").acknowledgement;
    assert!(
        (acknowledged..=sequence).contains(&granted),
        "the grant names acknowledgement {granted}, not one of {acknowledged}..={sequence}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_acknowledging_loses_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::NoRedis, dir.path());
    settings.local_cache.lease = Duration::from_secs(1);
    let app = spawn_with(settings).await;
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Strict, "")
        .await
        .unwrap();
    let status = loop {
        match watcher.next().await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(reason(&status), "LEASE_ENDED");
}

/// Rows of the lease table, ended or not.
async fn rows(app: &crate::helpers::TestApp) -> i64 {
    let mut conn = super::sql(app).await;
    sqlx::query_scalar::<_, i64>("select count(*) from local_cache_leases")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// A strict stream passes at least every quarter lease, whatever the heartbeat: an
/// acknowledging subscriber keeps its lease with the shortest lease and a longer heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_stream_passes_often_enough_for_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::NoRedis, dir.path());
    settings.local_cache.lease = Duration::from_millis(500);
    settings.events.heartbeat = Duration::from_secs(2);
    let app = spawn_with(settings).await;
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Strict, "")
        .await
        .unwrap();
    let mut grants = 0;
    // Ten grants take some 2.5 s of 500 ms leases: far longer than one lease.
    while grants < 10 {
        let batch = watcher.next().await.expect("the stream stays up");
        grants += usize::from(batch.lease.is_some());
        watcher.ack(&batch.position).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_closes_its_side_ends_its_lease_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::NoRedis, dir.path());
    long_lease(&mut settings);
    let app = spawn_with(settings).await;
    let live = || async {
        let mut conn = super::sql(&app).await;
        sqlx::query_scalar::<_, i64>(
            "select count(*) from local_cache_leases where expires_at > clock_timestamp()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Strict, "")
        .await
        .unwrap();
    watcher.next().await.unwrap();
    assert_eq!(live().await, 1);
    let mut rest = watcher.close();
    assert!(
        matches!(rest.message().await, Ok(None)),
        "the stream ends cleanly"
    );
    eventually(Duration::from_secs(5), "the lease ended", || async {
        live().await == 0
    })
    .await;
    // Its row goes too (a subscriber that reconnects often leaves none behind).
    eventually(Duration::from_secs(10), "the lease row is gone", || async {
        rows(&app).await == 0
    })
    .await;
    // A revocation now waits for nobody: it returns long before the 20 s lease would end.
    let (email, _) = app.register().await;
    let login = app.login(&email, PASSWORD).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), app.logout(&login.session_token))
        .await
        .expect("Logout waits for no lease")
        .unwrap();
}

/// A revocation costs the subscribers' host alike whether it serves one strict subscriber or
/// six: the streams at one position share their pass's read, and the extensions asked for
/// together go to PostgreSQL in one statement (one read and one extension per subscriber would
/// cost six times as much). One host serves one subscriber, another six, and both follow the
/// same revocations of a third instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_costs_a_host_alike_for_one_strict_subscriber_or_six() {
    const LOGOUTS: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::Redis, dir.path());
    long_lease(&mut settings);
    // No pass but the revocations' during the count, and no pass over the outbox logs.
    settings.events.heartbeat = Duration::from_secs(60);
    settings.session.invalidation_interval = Duration::from_secs(3600);
    let lone = spawn_with(settings).await;
    let busy = spawn_sharing(&lone, |_| {}).await;
    let revoker = spawn_sharing(&lone, |_| {}).await;
    let validators: Vec<_> = std::iter::once(&lone)
        .chain([&busy; 6])
        .map(strict_validator)
        .collect();
    eventually(
        Duration::from_secs(20),
        "the subscribers trust their memory",
        || async { validators.iter().all(|v| v.trusted()) },
    )
    .await;
    let (email, _) = revoker.register().await;
    let mut tokens = Vec::new();
    for _ in 0..LOGOUTS {
        tokens.push(revoker.login(&email, PASSWORD).await.unwrap().session_token);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = [&lone, &busy].map(|host| host.db.all_queries_executed());
    for token in &tokens {
        revoker.logout(token).await.unwrap();
    }
    let [one, six] = [&lone, &busy].map(|host| host.db.all_queries_executed());
    let [one, six] = [one - before[0], six - before[1]].map(|n| n as f64 / LOGOUTS as f64);
    // One subscriber: a pass (two reads) and an extension. Six: the same, and now and then a
    // second read or extension for streams that came late to the first — not six of each.
    assert!(
        one >= 2.0,
        "{one} statements per revocation with one subscriber: its pass was not counted"
    );
    assert!(
        six < 3.0 * one,
        "{six} statements per revocation with six strict subscribers, {one} with one"
    );
}
