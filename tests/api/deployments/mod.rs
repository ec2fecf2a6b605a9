//! Redis deployments: a Cluster (3 primaries + 3 replicas), Sentinel, TLS with and without client
//! certificates, ACL users. The promises hold across failovers to replicas that missed writes;
//! nothing a cluster refuses (CROSSSLOT, MOVED, ASK) reaches authd's error metrics; a
//! misconfiguration is named in the log while authd serves from PostgreSQL.
use std::time::{Duration, Instant};

use authd::proto::authd::v1 as pb;
use secrecy::SecretString;
use tonic::Code;

use crate::{
    binary::{self, Binary},
    helpers::{
        Mode, PASSWORD, TestApp, assert_code, cluster_ready, eventually, profile_key, session_key,
        spawn_sharing, spawn_with, test_settings,
    },
    redis_server::RedisServer,
    topology::{self, Certs, Cluster, Sentinel, TlsOptions, TlsRedis},
};

mod access;
mod cluster;

/// How long after a failover the cache must be used again: the fault runs' recovery bound (README,
/// Reliability, rule 6).
const RECOVERY: Duration = Duration::from_secs(30);

fn bio(text: &str) -> pb::Profile {
    pb::Profile {
        bio: text.into(),
        ..pb::Profile::default()
    }
}

/// Two instances on `url`. `lazy`: the outbox log is followed once an hour only (and once when a
/// new generation is adopted, before any copy of it is served), so that a write Redis lost stays
/// lost in the generation it was lost in (the log would otherwise write it again within an
/// interval) and what is tested is the generations.
async fn two_instances(url: String, lazy: bool) -> (TestApp, TestApp) {
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(url);
    if lazy {
        settings.session.invalidation_interval = Duration::from_secs(3600);
    }
    let a = spawn_with(settings).await;
    let b = spawn_sharing(&a, |_| {}).await;
    (a, b)
}

/// Until the replicas of `primary` hold every write made to it so far: a write of our own in
/// the slot of `key`, then `WAIT` for it on the same connection.
async fn replicated(primary: u16, key: &str) {
    let marker = format!("{{{key}}}:marker");
    let replies = topology::pipeline(primary, &[&["SET", &marker, "1"], &["WAIT", "1", "5000"]])
        .await
        .unwrap();
    assert_eq!(replies[1].int(), Some(1), "the replica caught up");
}

/// Makes `replica` miss every write to `primary` from now on: paused (`stop`), and its
/// replication link closed by the primary, so nothing more is even sent to it.
async fn cut_off(primary: u16, stop: impl Fn(u16), replica: u16) {
    stop(replica);
    let killed = topology::command(primary, &["CLIENT", "KILL", "TYPE", "replica"])
        .await
        .unwrap();
    assert!(killed.int().is_some_and(|n| n >= 1), "{killed:?}");
}

/// Every kind of operation on the shared cluster: no Redis error at all is recorded (a CROSSSLOT,
/// MOVED or ASK reaching authd would be), every primary is watched, and the cache serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serves_every_operation_without_a_redis_error() {
    cluster_ready().await;
    let app = spawn_with(test_settings(Mode::Cluster)).await;
    let (email, owner) = app.register().await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(app.login(&email, PASSWORD).await.unwrap());
    }
    for t in &tokens {
        assert!(app.served_from_redis(&t.session_token).await);
    }
    app.logout(&tokens[0].session_token).await.unwrap();
    let id = &tokens[1].session.as_ref().unwrap().session_id;
    app.revoke_session(&owner.session_token, id).await.unwrap();
    app.list_sessions(&owner.session_token).await.unwrap();
    app.change_password(&owner.session_token, PASSWORD, "another fine passphrase")
        .await
        .unwrap();
    app.revoke_all(&owner.session_token, false).await.unwrap();
    assert_code(
        app.login(&email, "wrong password").await,
        Code::Unauthenticated,
    );
    let mut ids = vec![owner.user_id.clone()];
    for _ in 0..5 {
        ids.push(app.register().await.1.user_id);
    }
    ids.extend((0..20).map(|_| uuid::Uuid::now_v7().to_string()));
    app.update_profile(&owner.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    for _ in 0..2 {
        let batch = app.batch_get(&ids).await.unwrap();
        assert_eq!(
            (batch.profiles.len(), batch.not_found_user_ids.len()),
            (6, 20)
        );
        assert_eq!(app.get_profile(&owner.user_id).await.unwrap().version, 2);
    }
    let before = app.queries();
    app.batch_get(&ids).await.unwrap();
    assert_eq!(app.queries(), before, "a cached batch reads no PostgreSQL");
    let metrics = app.metrics().await;
    let errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("authd_redis_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 0.0, "{metrics}");
    let watched = metrics
        .lines()
        .filter(|l| l.starts_with("authd_redis_node_up{") && l.ends_with(" 1"))
        .count();
    assert_eq!(watched, 3, "each primary is watched: {metrics}");
}

/// A replica paused so that it misses a logout's tombstone and an update's new version; its
/// primary killed; the replica resumed and promoted (`CLUSTER FAILOVER TAKEOVER`). The new
/// primary holds the old copy and the old version — and neither is ever served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_to_a_replica_that_missed_writes_brings_nothing_back() {
    let cluster = Cluster::start().await;
    let (a, b) = two_instances(cluster.url(), true).await;
    let (email, keeper) = a.register().await;
    let victim = a.login(&email, PASSWORD).await.unwrap().session_token;
    for app in [&a, &b] {
        assert!(app.served_from_redis(&victim).await);
        assert_eq!(app.get_profile(&keeper.user_id).await.unwrap().version, 1);
    }
    let session = session_key(&a, &victim);
    let profile = profile_key(&a, &keeper.user_id);
    // Lose both writes: cut off the replica of each key's primary (they may differ).
    let mut lost = Vec::new();
    for key in [&session, &profile] {
        let primary = cluster.primary_for_key(key).await;
        replicated(primary, key).await;
        let replica = cluster.replica_of(primary).await;
        if !lost.contains(&(primary, replica)) {
            lost.push((primary, replica));
        }
    }
    for (primary, replica) in &lost {
        cut_off(*primary, |port| cluster.stop(port), *replica).await;
    }
    a.logout(&victim).await.unwrap();
    let v2 = a
        .update_profile(&keeper.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    for (primary, replica) in &lost {
        cluster.kill(*primary);
        cluster.cont(*replica);
        cluster.failover_takeover(*replica).await;
    }
    let new_primary = cluster.primary_for_key(&session).await;
    let copy = topology::command(new_primary, &["GET", &session])
        .await
        .unwrap();
    assert!(
        copy.text().is_some_and(|v| v.contains("|S|")),
        "the promoted replica holds the old copy: {copy:?}"
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        for app in [&a, &b] {
            assert_code(app.validate(&victim).await, Code::Unauthenticated);
            assert_eq!(
                app.get_profile(&keeper.user_id).await.unwrap().version,
                v2.version
            );
        }
    }
    // Liveness, not a promise: within the fault runs' recovery bound (30 s; a killed primary's
    // slots, a new generation and a first log pass in it, on a loaded machine).
    for app in [&a, &b] {
        eventually(RECOVERY, "the cache is used again", || {
            app.served_from_redis(&keeper.session_token)
        })
        .await;
        assert_code(app.validate(&victim).await, Code::Unauthenticated);
        assert_eq!(
            app.get_profile(&keeper.user_id).await.unwrap().version,
            v2.version
        );
    }
}

/// The same with Sentinel: 1 primary, 1 replica, 3 sentinels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_to_a_replica_that_missed_writes_brings_nothing_back() {
    let sentinel = Sentinel::start("authd").await;
    let (a, b) = two_instances(sentinel.url(), true).await;
    let (email, keeper) = a.register().await;
    let victim = a.login(&email, PASSWORD).await.unwrap().session_token;
    for app in [&a, &b] {
        assert!(app.served_from_redis(&victim).await);
        assert_eq!(app.get_profile(&keeper.user_id).await.unwrap().version, 1);
    }
    let primary = sentinel.primary_port().await;
    let replica = sentinel.replica_port().await;
    sentinel.wait_replicated().await;
    cut_off(primary, |port| sentinel.stop(port), replica).await;
    a.logout(&victim).await.unwrap();
    let v2 = a
        .update_profile(&keeper.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    sentinel.kill(primary);
    sentinel.cont(replica);
    let promoted = sentinel.wait_primary_change(primary).await;
    assert_eq!(promoted, replica);
    let copy = topology::command(replica, &["GET", &session_key(&a, &victim)])
        .await
        .unwrap();
    assert!(
        copy.text().is_some_and(|v| v.contains("|S|")),
        "the promoted replica holds the old copy: {copy:?}"
    );
    for app in [&a, &b] {
        eventually(RECOVERY, "the cache is used again", || {
            app.served_from_redis(&keeper.session_token)
        })
        .await;
    }
    for app in [&a, &b] {
        assert_code(app.validate(&victim).await, Code::Unauthenticated);
        assert_eq!(
            app.get_profile(&keeper.user_id).await.unwrap().version,
            v2.version
        );
    }
}

/// The fault run on Sentinel found five wrong passwords evaluated within ten seconds with a
/// limit of four. After `SENTINEL FAILOVER` the old primary stays up and keeps taking writes
/// until Sentinel demotes it (some ten seconds later) and it discards them; authd, connected to
/// it, kept counting guesses there, and the count started over at the demotion. Now every
/// identity check asks the sentinels which server is the primary and moves what is connected
/// elsewhere: guesses made after the failover are counted on the new primary and survive the
/// demotion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_after_a_sentinel_failover_are_still_counted_once_the_old_primary_is_demoted() {
    let sentinel = Sentinel::start("authd").await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(sentinel.url());
    settings.rate_limit.login_per_email = 4;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let old = sentinel.primary_port().await;
    let new = sentinel.failover().await;
    assert_ne!(old, new);
    // Past one identity check (REDIS__CHECK_INTERVAL, 1 s): the clients moved.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..2 {
        assert_code(
            app.login(&email, "wrong guess").await,
            Code::Unauthenticated,
        );
    }
    assert_code(app.login(&email, PASSWORD).await, Code::ResourceExhausted);
    // The old primary is demoted and discards what it took since the failover.
    sentinel.wait_healthy().await;
    assert_code(
        app.login(&email, "wrong guess").await,
        Code::ResourceExhausted,
    );
}

/// A primary killed while validations run: every one answers OK (from PostgreSQL for the
/// affected slots during the failover), none INTERNAL; afterwards cached validation costs no
/// PostgreSQL query again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_costs_no_failed_validation() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    };
    let cluster = Cluster::start().await;
    let (app, _) = two_instances(cluster.url(), false).await;
    let mut tokens = Vec::new();
    for _ in 0..12 {
        tokens.push(app.register().await.1.session_token);
    }
    for t in &tokens {
        app.validate(t).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (client, tokens) = (app.auth.clone(), tokens.clone());
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut client = client;
                let mut i = w;
                let mut errors = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let request = pb::ValidateSessionRequest {
                        session_token: tokens[i % tokens.len()].clone(),
                        ..Default::default()
                    };
                    match client.validate_session(request).await {
                        Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                        Err(status) => {
                            errors.push(status);
                            failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                    i += 1;
                }
                errors
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = cluster.primaries().await[0];
    cluster.kill(victim);
    cluster.wait_primary_change(victim).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert!(
        ok.load(Ordering::SeqCst) > 100,
        "validations kept answering"
    );
    assert!(
        errors.is_empty(),
        "{} failed: {:?}",
        failed.load(Ordering::SeqCst),
        errors.first()
    );
    eventually(
        Duration::from_secs(15),
        "cached validation reads no PostgreSQL again",
        || async {
            for t in &tokens {
                app.validate(t).await.unwrap();
            }
            let before = app.queries();
            for t in &tokens {
                app.validate(t).await.unwrap();
            }
            app.queries() == before
        },
    )
    .await;
}

/// `SENTINEL FAILOVER` leaves the old primary taking writes for some 10 s. An instance that
/// moved to the promoted replica first (B) establishes the new generation there and fills
/// profile copies of it; an instance still on the old primary (A, its identity checks far apart
/// here) updates the profiles there — confirmed by a server the new generation never hears from
/// — and is moved when Sentinel demotes the old primary. A then adopts the generation B
/// established: it must not serve B's copies, older than the versions its UpdateProfiles
/// returned. (The fault run's Sentinel seed 1795755029 found it: a read saw v3 0.2 s after the
/// same instance's UpdateProfile returned v4.) Nothing of a new generation is served before a
/// pass over the logs in it (one profile is read all along, from the move on), and that pass
/// starts from the generation's birth, not from when some instance first followed it (the other
/// profile is read only once A's first pass is done, and no pass ran in it before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_confirmed_by_a_demoted_primary_is_not_lost_to_copies_filled_on_the_new_one() {
    let sentinel = Sentinel::start("authd").await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(sentinel.url());
    // A: no identity check of its own during the test (only a reconnection moves it); the logs
    // followed every 3 s, and at once when it adopts a new generation.
    settings.redis.check_interval = Duration::from_secs(600);
    settings.session.invalidation_interval = Duration::from_secs(3);
    // A pass re-reads the rows of the in-flight allowance (10 × this + 1 s = 6 s) before its
    // cursor: shorter than from A's updates to its first pass after the demotion (~10 s).
    settings.database.query_timeout = Duration::from_millis(500);
    let a = spawn_with(settings).await;
    // B: checks every second, follows the logs once an hour (it only fills).
    let b = spawn_sharing(&a, |s| {
        s.redis.check_interval = Duration::from_secs(1);
        s.session.invalidation_interval = Duration::from_secs(3600);
    })
    .await;
    let (_, watched) = a.register().await;
    let (_, later) = a.register().await;
    let old = sentinel.primary_port().await;
    let new = sentinel.failover().await;
    assert_ne!(old, new);
    // B moves (its next identity check), establishes the new generation and fills copies of
    // version 1 there.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for user in [&watched, &later] {
        for _ in 0..3 {
            assert_eq!(b.get_profile(&user.user_id).await.unwrap().version, 1);
        }
    }
    // A, still on the old primary, updates both.
    for user in [&watched, &later] {
        let updated = a
            .update_profile(&user.session_token, bio("v2"), &["bio"], 0)
            .await
            .unwrap();
        assert_eq!(updated.version, 2);
    }
    // Sentinel demotes the old primary and drops its clients: A reconnects to the new one and
    // adopts B's generation. Every read from then on returns version 2 at least.
    let until = Instant::now() + Duration::from_secs(25);
    let mut demoted = false;
    while !demoted && Instant::now() < until {
        let read = a.get_profile(&watched.user_id).await.unwrap();
        assert!(
            read.version >= 2,
            "A read version {} after its UpdateProfile returned 2",
            read.version
        );
        let role = topology::command(old, &["ROLE"]).await;
        demoted = role.is_ok_and(|r| format!("{r:?}").contains("slave"));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(demoted, "Sentinel demoted the old primary within 25 s");
    // Past the move and A's first pass in the new generation (every 3 s).
    let rest = Instant::now() + Duration::from_secs(5);
    while Instant::now() < rest {
        let read = a.get_profile(&watched.user_id).await.unwrap();
        assert!(read.version >= 2, "A read version {}", read.version);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for _ in 0..3 {
        let read = a.get_profile(&later.user_id).await.unwrap();
        assert!(
            read.version >= 2,
            "A read version {} of a profile no pass had followed",
            read.version
        );
    }
}
