//! A Redis Cluster under change: replicas attaching and down, slot migrations, connections split between primaries.
use super::*;

/// The sum of every `authd_redis_errors_total` series.
async fn redis_errors(app: &TestApp) -> f64 {
    app.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("authd_redis_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A primary that gets its first replica changes its replication id (keeping the old one as its
/// second): the same history, so the same generation — the cache stays warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_attaching_keeps_the_cache_warm() {
    let primary = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(primary.url());
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    assert!(app.served_from_redis(&reg.session_token).await);
    let generation = app.metric("authd_redis_generation").await;
    let port = primary.port.to_string();
    let replica = RedisServer::start_with(false, &["--replicaof", "127.0.0.1", &port]).await;
    eventually(
        Duration::from_secs(10),
        "the replica is in sync",
        || async {
            let info = topology::command(replica.port, &["INFO", "replication"]).await;
            info.is_ok_and(|i| {
                i.text()
                    .is_some_and(|t| t.contains("master_link_status:up"))
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.metric("authd_redis_generation").await, generation);
    assert_eq!(
        app.metric("authd_redis_generation_changes_total").await,
        0.0
    );
    assert!(app.served_from_redis(&reg.session_token).await);
}

/// A replica down (or a shard left without one) costs nothing: revocations do not wait for
/// replicas, and the cache keeps serving on every shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_down_costs_nothing() {
    let cluster = Cluster::start().await;
    let (app, _) = two_instances(cluster.url(), false).await;
    let (email, keeper) = app.register().await;
    let victim = app.login(&email, PASSWORD).await.unwrap().session_token;
    assert!(app.served_from_redis(&victim).await);
    let primary = cluster.primary_for_key(&session_key(&app, &victim)).await;
    cluster.stop(cluster.replica_of(primary).await);
    app.logout(&victim).await.unwrap();
    assert_code(app.validate(&victim).await, Code::Unauthenticated);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(app.served_from_redis(&keeper.session_token).await);
    assert_eq!(redis_errors(&app).await, 0.0);
}

/// A slot migrating between primaries (MIGRATING/IMPORTING, its key already moved): commands on
/// that key are redirected (ASK) and, where the client cannot follow, answered from PostgreSQL;
/// nothing revoked is ever accepted, the rest of the cache keeps serving, and once the slot has
/// moved the cache serves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_loses_nothing_and_stops_nothing() {
    let cluster = Cluster::start().await;
    let (a, _) = two_instances(cluster.url(), false).await;
    let (email, keeper) = a.register().await;
    let victim = a.login(&email, PASSWORD).await.unwrap().session_token;
    let key = session_key(&a, &victim);
    let slot = cluster.slot_of(&key).await.to_string();
    let source = cluster.primary_for_key(&key).await;
    let primaries = cluster.primaries().await;
    let target = *primaries.iter().find(|p| **p != source).unwrap();
    assert!(a.served_from_redis(&victim).await);
    assert!(a.served_from_redis(&keeper.session_token).await);
    let id = |port: u16| async move {
        let reply = topology::command(port, &["CLUSTER", "MYID"]).await.unwrap();
        reply.text().unwrap().to_owned()
    };
    let (source_id, target_id) = (id(source).await, id(target).await);
    let set = |port: u16, args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        topology::command(port, &args).await.unwrap();
    };
    let setslot = |how: &str, node: &str| {
        ["CLUSTER", "SETSLOT", &slot, how, node]
            .map(str::to_owned)
            .to_vec()
    };
    set(target, setslot("IMPORTING", &source_id)).await;
    set(source, setslot("MIGRATING", &target_id)).await;
    let port = target.to_string();
    let migrate = ["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS", &key];
    topology::command(source, &migrate).await.unwrap();
    assert!(
        a.served_from_redis(&keeper.session_token).await,
        "other slots keep serving"
    );
    a.validate(&victim).await.unwrap();
    a.logout(&victim).await.unwrap();
    assert_code(a.validate(&victim).await, Code::Unauthenticated);
    assert!(
        a.served_from_redis(&keeper.session_token).await,
        "a tombstone that could not be written stops only its own key"
    );
    for p in primaries {
        set(p, setslot("NODE", &target_id)).await;
    }
    eventually(
        Duration::from_secs(15),
        "the moved slot is served again",
        || async {
            a.validate(&victim).await.is_err() && a.served_from_redis(&keeper.session_token).await
        },
    )
    .await;
    eventually(
        Duration::from_secs(15),
        "the tombstone reaches the slot's new primary",
        || async {
            let tombstone = topology::command(target, &["GET", &key]).await.unwrap();
            tombstone.text().is_some_and(|v| v.ends_with("|R"))
        },
    )
    .await;
    for _ in 0..5 {
        assert_code(a.validate(&victim).await, Code::Unauthenticated);
    }
}

/// The pool's connections on two different primaries (an address moved to a new server while
/// the old one stays up): not one history, so nothing is served from either until they agree —
/// and a logout is never undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_split_between_primaries_serve_nothing() {
    use std::sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    };
    let old = RedisServer::start().await;
    let new = RedisServer::start().await;
    let upstream = Arc::new(AtomicU16::new(old.port));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    let to = upstream.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let port = to.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(format!("redis://{proxy}"));
    settings.redis.pool_size = 2;
    let a = spawn_with(settings).await;
    let (email, keeper) = a.register().await;
    let token = a.login(&email, PASSWORD).await.unwrap().session_token;
    assert!(a.served_from_redis(&token).await);
    // One connection moves to the new server; the other stays on the old one.
    upstream.store(new.port, Ordering::SeqCst);
    let clients = topology::command(old.port, &["CLIENT", "LIST"])
        .await
        .unwrap();
    let first = clients
        .text()
        .unwrap()
        .lines()
        .find(|l| !l.contains("cmd=client|list"))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("id=")))
        .unwrap()
        .to_owned();
    topology::command(old.port, &["CLIENT", "KILL", "ID", &first])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    a.logout(&token).await.unwrap();
    for _ in 0..10 {
        assert_code(a.validate(&token).await, Code::Unauthenticated);
        a.validate(&keeper.session_token).await.unwrap();
    }
    assert_eq!(
        a.metric("authd_redis_generation").await,
        0.0,
        "no generation is served"
    );
}
