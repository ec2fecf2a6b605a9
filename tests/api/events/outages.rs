//! The stream through what a fleet goes through: an authd restart under a subscriber, a Redis
//! restart (empty) and a Sentinel failover under a strict caller, and a burst of 10,000 revocations under a bounded
//! subscriber.
use std::time::{Duration, Instant, SystemTime};

use authd::proto::authd::v1 as pb;
use authd_client::Validator;
use secrecy::SecretString;
use tonic::Code;

use super::{SUBSCRIBER_KEY, Watcher, sid, subscribed_settings, validator::strict_validator};
use crate::{
    helpers::{Mode, PASSWORD, TestApp, eventually, spawn_sharing, spawn_sharing_on, spawn_with},
    redis_server::RedisServer,
    topology::Sentinel,
};

async fn trusted(validator: &Validator) {
    eventually(
        Duration::from_secs(20),
        "the validator trusts its memory",
        || async { validator.trusted() },
    )
    .await;
}

/// authd restarts under a subscriber: the stream resumed from the last position holds exactly
/// what a fresh subscriber computes (every change while authd was down, nothing twice), and a
/// strict caller following the restarted instance refuses what was revoked meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_without_a_gap_across_an_authd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_with(subscribed_settings(Mode::Redis, dir.path())).await;
    let mut host = spawn_sharing(&first, |_| {}).await;
    let addr = host.addr;
    let (email, registered) = first.register().await;
    let mut logins = Vec::new();
    // Four to log out one by one, a fifth for RevokeAllSessions.
    for _ in 0..5 {
        logins.push(first.login(&email, PASSWORD).await.unwrap());
    }
    let validator = strict_validator(&host);
    trusted(&validator).await;
    let kept = &logins[2].session_token;
    validator.validate(kept).await.unwrap();
    validator.validate(kept).await.unwrap();
    assert!(validator.local_hits() >= 1, "the token is in memory");

    let mut watcher = Watcher::open(&host, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    let (mut seen, _) = watcher.events(0).await;
    for login in &logins[..2] {
        first.logout(&login.session_token).await.unwrap();
    }
    let (more, at) = watcher.events(2).await;
    seen.extend(more);

    tokio::time::timeout(Duration::from_secs(20), host.stop())
        .await
        .expect("authd stops with a stream open")
        .unwrap();
    let ended = watcher.next().await;
    assert!(ended.is_err(), "the stream ended with its instance");
    eventually(
        Duration::from_secs(5),
        "the caller doubts once its stream ended",
        || async { !validator.trusted() },
    )
    .await;
    // Changes while the host is down.
    first.logout(kept).await.unwrap();
    first.logout(&logins[3].session_token).await.unwrap();
    let profile = pb::Profile {
        display_name: "Ada".into(),
        ..Default::default()
    };
    first
        .update_profile(&registered.session_token, profile, &["display_name"], 0)
        .await
        .unwrap();
    first
        .revoke_all(&registered.session_token, false)
        .await
        .unwrap();

    let host = spawn_sharing_on(&first, addr).await;
    let mut resumed = Watcher::open(&host, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, &at.position)
        .await
        .unwrap();
    let (after, _) = resumed.events(4).await;
    seen.extend(after);
    let mut fresh = Watcher::open(&host, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    let (everything, _) = fresh.events(0).await;
    assert_eq!(
        seen, everything,
        "the resumed stream differs from what a fresh subscriber computes"
    );
    let revoked = |events: &[pb::Event]| {
        events
            .iter()
            .filter_map(|e| match &e.kind {
                Some(pb::event::Kind::SessionRevoked(r)) => Some(r.session_id.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    let expected: Vec<String> = logins[..4].iter().map(|l| sid(&l.session)).collect();
    assert_eq!(revoked(&seen), expected);
    assert_eq!(
        super::kinds(&seen[4..]),
        ["profile_updated", "sessions_revoked"]
    );

    // The caller resumed on the restarted instance, and refuses what was revoked meanwhile.
    trusted(&validator).await;
    let refused = validator.validate(kept).await;
    assert_eq!(refused.err().map(|s| s.code()), Some(Code::Unauthenticated));
}

/// Ten rounds: a login on `second`, validated twice by `validator` (following `second`), a
/// Logout on `first`, then at once a validation the caller must refuse. The sessions logged
/// out, in order.
async fn logouts_refused_at_once(
    first: &TestApp,
    second: &TestApp,
    validator: &Validator,
    email: &str,
    phase: &str,
) -> Vec<String> {
    let mut revoked = Vec::new();
    for round in 0..10 {
        let login = second.login(email, PASSWORD).await.unwrap();
        let token = login.session_token;
        validator.validate(&token).await.expect("a fresh session");
        validator.validate(&token).await.expect("still valid");
        first.logout(&token).await.unwrap();
        let answer = validator.validate(&token).await;
        assert_eq!(
            answer.as_ref().err().map(|s| s.code()),
            Some(Code::Unauthenticated),
            "{phase}, round {round}: the caller accepted a token whose Logout returned"
        );
        revoked.push(sid(&login.session));
    }
    revoked
}

/// Redis killed and restarted empty under a strict caller: before, during and after the
/// outage, a token whose Logout returned is refused by the caller at once (without Redis the
/// revoker sees the caller catch up through the lease table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_caller_stays_strict_across_a_redis_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start().await;
    let mut settings = subscribed_settings(Mode::Redis, dir.path());
    settings.redis.url = SecretString::from(redis.url());
    let first = spawn_with(settings).await;
    let second = spawn_sharing(&first, |_| {}).await;
    let validator = strict_validator(&second);
    trusted(&validator).await;
    let (email, _) = first.register().await;
    let rounds = |phase| logouts_refused_at_once(&first, &second, &validator, &email, phase);
    rounds("with Redis").await;
    redis.kill();
    rounds("Redis down").await;
    redis.restart().await;
    rounds("Redis back, empty").await;
    assert!(
        validator.local_hits() > 0,
        "the caller answered from memory"
    );
}

/// A Sentinel failover under a strict caller and a bounded subscriber, both on the instance
/// that does not revoke: a token whose Logout returned is refused by the caller at once —
/// before the failover, while the old primary still takes writes (the instances may sit on
/// different primaries, and a revoker's message may go where no host listens), and once
/// Sentinel demoted it — and the subscriber's stream, never interrupted, carries every
/// revocation once, in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_caller_stays_strict_and_a_stream_gapless_across_a_sentinel_failover() {
    let dir = tempfile::tempdir().unwrap();
    let sentinel = Sentinel::start("authd").await;
    let mut settings = subscribed_settings(Mode::Redis, dir.path());
    settings.redis.url = SecretString::from(sentinel.url());
    let first = spawn_with(settings).await;
    let second = spawn_sharing(&first, |_| {}).await;
    let validator = strict_validator(&second);
    trusted(&validator).await;
    let (email, _) = first.register().await;
    let mut watcher = Watcher::open(&second, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    watcher.events(0).await;
    // The subscriber reads all along (a stream not read for 30 s ends).
    let (done, mut stop) = tokio::sync::oneshot::channel::<usize>();
    let reader = tokio::spawn(async move {
        let mut revoked = Vec::new();
        let mut wanted = None;
        loop {
            if wanted.is_some_and(|n| revoked.len() >= n) {
                return revoked;
            }
            tokio::select! {
                n = &mut stop, if wanted.is_none() => wanted = Some(n.unwrap()),
                response = watcher.next() => {
                    let response = response.expect("the stream stays up through the failover");
                    for event in response.events {
                        if let Some(pb::event::Kind::SessionRevoked(r)) = event.kind {
                            revoked.push(r.session_id);
                        }
                    }
                }
            }
        }
    });
    let rounds = |phase| logouts_refused_at_once(&first, &second, &validator, &email, phase);
    let mut expected = rounds("before the failover").await;
    let old = sentinel.primary_port().await;
    let new = sentinel.failover().await;
    assert_ne!(old, new);
    expected.extend(rounds("just after the failover").await);
    sentinel.wait_healthy().await;
    expected.extend(rounds("the old primary demoted").await);
    done.send(expected.len()).unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("every revocation reached the subscriber")
        .unwrap();
    assert_eq!(
        seen, expected,
        "the stream carries every revocation once, in commit order"
    );
    assert!(
        validator.local_hits() > 0,
        "the caller answered from memory"
    );
}

/// A burst of 10,000 revocations (Logout, 16 at a time) under a bounded subscriber: every event
/// arrives within a heartbeat and a margin of its commit, and batches keep coming at least
/// every heartbeat — a bounded caller's memory stays trusted and within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_subscriber_keeps_up_with_a_burst_of_revocations() {
    const BURST: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = subscribed_settings(Mode::NoRedis, dir.path());
    // Room for the burst's calls (the changes' share: 4 connections).
    settings.database.max_connections = 20;
    let app = spawn_with(settings).await;
    let (_, registered) = app.register().await;
    let url = secrecy::ExposeSecret::expose_secret(&app.settings.database.url);
    let user = registered.user_id.parse().unwrap();
    let tokens = crate::seeded::seed(&app.db, url, user, BURST)
        .await
        .unwrap();
    let heartbeat = app.settings.events.heartbeat;

    let mut watcher = Watcher::open(&app, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    watcher.events(0).await;
    let auth = app.auth.clone();
    let burst = tokio::spawn(async move {
        use futures::StreamExt;
        futures::stream::iter(tokens)
            .map(|session_token| {
                let mut auth = auth.clone();
                async move {
                    auth.logout(pb::LogoutRequest { session_token })
                        .await
                        .unwrap();
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    });
    // The worst lag of an event behind its commit, and the longest silence between batches.
    let margin = Duration::from_secs(1);
    let mut worst = Duration::ZERO;
    let mut silence = Duration::ZERO;
    let mut last = Instant::now();
    let mut received = 0;
    while received < BURST {
        let batch = watcher.next().await.expect("the stream stays up");
        silence = silence.max(last.elapsed());
        last = Instant::now();
        for event in &batch.events {
            let occurred = SystemTime::try_from(event.occurred_at.expect("a time")).unwrap();
            let lag = SystemTime::now()
                .duration_since(occurred)
                .unwrap_or_default();
            worst = worst.max(lag);
        }
        received += batch.events.len();
    }
    burst.await.unwrap();
    assert_eq!(received, BURST, "one event per revocation");
    assert!(
        worst <= heartbeat + margin,
        "an event arrived {worst:?} after its commit (heartbeat {heartbeat:?})"
    );
    assert!(
        silence <= heartbeat + margin,
        "{silence:?} without a batch (heartbeat {heartbeat:?})"
    );
}
