//! Costs that do not grow with the fleet: a revocation is written to a Redis deployment once,
//! whatever the number of instances sharing it, and still re-applied by another instance when its
//! revoker's write failed.
use std::{collections::HashMap, time::Duration};

use secrecy::SecretString;
use tonic::Code;

use crate::{
    helpers::{
        Mode, TestApp, assert_code, eventually, redis_client, redis_command_calls, session_key,
        spawn_sharing, spawn_with, test_settings,
    },
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

/// The commands that write a cache entry (tombstones, the index, profile versions) and the
/// messages between instances.
const WRITES: [&str; 4] = ["set", "srem", "evalsha", "publish"];

fn count(calls: &HashMap<String, u64>, names: &[&str]) -> u64 {
    names
        .iter()
        .map(|n| calls.get(*n).copied().unwrap_or(0))
        .sum()
}

/// Commands of `names` Redis ran for one Logout on `revoker` (its effects on every instance
/// followed for a few passes), once every instance of `fleet` served the session from Redis;
/// every instance rejects the token as soon as the Logout returned.
async fn logout_cost(
    revoker: &TestApp,
    fleet: &[&TestApp],
    watcher: &fred::clients::Client,
    names: &[&str],
) -> u64 {
    let (_, reg) = revoker.register().await;
    for app in fleet {
        assert!(app.served_from_redis(&reg.session_token).await);
    }
    // What the registration and the fills left to do is done.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let before = redis_command_calls(watcher).await;
    revoker.logout(&reg.session_token).await.unwrap();
    for app in fleet {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
    }
    // Every follower has passed over the row several times (every 100 ms here).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after = redis_command_calls(watcher).await;
    // The INFO of `before` is not among these names.
    count(&after, names) - count(&before, names)
}

/// One instance, then four on the same Redis: a Logout costs the same Redis commands.
async fn four_instances_cost_what_one_does(local_cache: bool) {
    let redis = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis.url());
    settings.local_cache.enabled = local_cache;
    let first = spawn_with(settings).await;
    let watcher = redis_client(&redis.url()).await;
    // Without the in-process cache, no heartbeat runs: every message is the Logout's.
    let names: &[&str] = if local_cache { &WRITES[..3] } else { &WRITES };
    let alone = logout_cost(&first, &[&first], &watcher, names).await;
    if !local_cache {
        assert!(alone <= 4, "one Logout costs {alone} Redis commands");
    }
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(spawn_sharing(&first, |_| {}).await);
    }
    let fleet: Vec<&TestApp> = std::iter::once(&first).chain(&others).collect();
    for revoker in &fleet {
        let cost = logout_cost(revoker, &fleet, &watcher, names).await;
        assert_eq!(
            cost, alone,
            "a Logout on one of four instances costs {cost} commands ({names:?}), {alone} on one \
             instance alone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_costs_the_same_redis_commands_on_four_instances_as_on_one() {
    four_instances_cost_what_one_does(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_writes_redis_once_on_four_instances_with_the_in_process_cache() {
    four_instances_cost_what_one_does(true).await;
}

/// The re-application the fleet keeps: a revoker cut off from Redis writes nothing there, and
/// another instance's follower writes the tombstone within README's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_the_revoker_could_not_write_is_written_by_another_instance() {
    let redis = RedisServer::start().await;
    let link = Proxy::start(redis.addr()).await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(format!("redis://{}", link.addr));
    settings.local_cache.enabled = false;
    let revoker = spawn_with(settings).await;
    let others = [
        spawn_sharing(&revoker, |s| s.redis.url = SecretString::from(redis.url())).await,
        spawn_sharing(&revoker, |s| s.redis.url = SecretString::from(redis.url())).await,
    ];
    let (_, reg) = revoker.register().await;
    for app in &others {
        assert!(app.served_from_redis(&reg.session_token).await);
    }
    let watcher = redis_client(&redis.url()).await;
    let key = session_key(&revoker, &reg.session_token);

    link.set(Link::Refused);
    revoker.logout(&reg.session_token).await.unwrap();
    let written = std::time::Instant::now();
    // README's bound: one invalidation interval plus one command timeout (and the poll's step).
    let bound = revoker.settings.session.invalidation_interval
        + revoker.settings.redis.command_timeout
        + Duration::from_millis(100);
    eventually(bound, "another instance wrote the tombstone", || async {
        use fred::interfaces::KeysInterface;
        let value: Option<String> = watcher.get(&key).await.unwrap();
        value.is_some_and(|v| v.ends_with("|R"))
    })
    .await;
    assert!(written.elapsed() <= bound);
    for app in &others {
        assert_code(
            app.validate(&reg.session_token).await,
            Code::Unauthenticated,
        );
    }
}
