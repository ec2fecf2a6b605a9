//! Smoke tests of the helpers themselves.
#[allow(unused_imports)] // the fault run (which includes this file) compiles no test
use super::*;

#[tokio::test]
async fn topology_cluster_routes_fails_over_and_heals() {
    let cluster = Cluster::start().await;
    let url = cluster.url();
    assert!(url.starts_with("redis-cluster://127.0.0.1:"), "{url}");
    assert_eq!(url.matches(',').count(), 2, "{url}");
    assert_eq!(cluster.ports().len(), 6);
    let seed = cluster.seed_ports()[0].to_string();

    // redis-cli -c follows MOVED to whichever primary serves the key.
    let set = redis_cli(&["-c", "-p", &seed, "SET", "topology:key", "v1"]).await;
    assert_eq!(stdout(&set), "OK", "{}", outputs(&set));
    let got = redis_cli(&["-c", "-p", &seed, "GET", "topology:key"]).await;
    assert_eq!(stdout(&got), "v1", "{}", outputs(&got));

    let primary = cluster.primary_for_key("topology:key").await;
    let replica = cluster.replica_of(primary).await;
    assert_ne!(primary, replica);
    assert!(cluster.primaries().await.contains(&primary));
    assert!(cluster.replicas().await.contains(&replica));
    // Make sure the replica has the key before it takes over.
    let replies = pipeline(
        primary,
        &[&["SET", "topology:key", "v2"], &["WAIT", "1", "5000"]],
    )
    .await
    .unwrap();
    assert_eq!(replies[1], Resp::Int(1), "{replies:?}");

    cluster.failover_takeover(replica).await;
    assert_eq!(cluster.primary_for_key("topology:key").await, replica);
    cluster.wait_healthy().await;
    // The old primary is now the new one's replica.
    assert_eq!(cluster.replica_of(replica).await, primary);
    let got = redis_cli(&["-c", "-p", &seed, "GET", "topology:key"]).await;
    assert_eq!(stdout(&got), "v2", "{}", outputs(&got));

    // A primary stopped past the node timeout is failed over by its replica on its own, and
    // rejoins as a replica once continued.
    let other = *cluster
        .primaries()
        .await
        .iter()
        .find(|p| **p != replica)
        .unwrap();
    let its_replica = cluster.replica_of(other).await;
    cluster.stop(other);
    assert_eq!(cluster.wait_primary_change(other).await, its_replica);
    assert!(cluster.primaries().await.contains(&its_replica));
    cluster.cont(other);
    cluster.wait_healthy().await;
    assert_eq!(cluster.replica_of(its_replica).await, other);

    // A replica (the old primary, `primary`) stopped past the node timeout is marked failing, and
    // healthy again once continued; a killed one rejoins when restarted.
    cluster.stop(primary);
    sleep(CLUSTER_NODE_TIMEOUT * 3).await;
    assert_eq!(cluster.run(primary), Run::Stopped);
    cluster.cont(primary);
    cluster.wait_healthy().await;
    cluster.kill(primary);
    assert_eq!(cluster.live_ports().len(), 5);
    cluster.wait_healthy().await;
    cluster.restart(primary).await;
    cluster.wait_healthy().await;
    assert_eq!(cluster.replica_of(replica).await, primary);
}

#[tokio::test]
async fn topology_shared_cluster_is_one() {
    let first = shared_cluster().await;
    let second = shared_cluster().await;
    assert!(std::ptr::eq(first, second));
    let port = first.seed_ports()[1].to_string();
    let set = redis_cli(&["-c", "-p", &port, "SET", "topology:shared", "yes"]).await;
    assert_eq!(stdout(&set), "OK", "{}", outputs(&set));
    let owner = first.primary_for_key("topology:shared").await;
    let got = command(owner, &["GET", "topology:shared"]).await.unwrap();
    assert_eq!(got.text(), Some("yes"));
}

#[tokio::test]
async fn topology_sentinel_fails_over() {
    let sentinel = Sentinel::start("authd").await;
    let url = sentinel.url();
    assert!(url.starts_with("redis-sentinel://127.0.0.1:"), "{url}");
    assert!(url.ends_with("/?service_name=authd"), "{url}");
    assert_eq!(url.matches(',').count(), 2, "{url}");

    let [first, second] = sentinel.data_ports()[..] else {
        panic!("two data nodes")
    };
    assert_eq!(sentinel.primary_port().await, first);
    assert_eq!(sentinel.replica_port().await, second);
    let replies = pipeline(
        first,
        &[&["SET", "topology:key", "v1"], &["WAIT", "1", "5000"]],
    )
    .await
    .unwrap();
    assert_eq!(replies[1], Resp::Int(1), "{replies:?}");

    let promoted = sentinel.failover().await;
    assert_eq!(promoted, second);
    assert_eq!(sentinel.primary_port().await, second);
    let role = redis_cli(&["-p", &second.to_string(), "ROLE"]).await;
    assert!(stdout(&role).starts_with("master"), "{}", outputs(&role));
    let got = redis_cli(&["-p", &second.to_string(), "GET", "topology:key"]).await;
    assert_eq!(stdout(&got), "v1");

    sentinel.wait_healthy().await;
    assert_eq!(sentinel.replica_port().await, first);
    let role = redis_cli(&["-p", &first.to_string(), "ROLE"]).await;
    assert!(stdout(&role).starts_with("slave"), "{}", outputs(&role));

    // A killed primary is failed over on its own.
    sentinel.kill(second);
    assert_eq!(sentinel.wait_primary_change(second).await, first);
}

#[tokio::test]
async fn topology_tls_redis_checks_certificates_and_users() {
    let certs = Certs::new();
    let ca = path_str(&certs.ca_file);
    let other_ca = path_str(&certs.other_ca_file);

    // The client certificate carries the SANs asked for and chains to the CA only.
    let verify = |ca: &str, cert: &Path| {
        Command::new("openssl")
            .args(["verify", "-CAfile", ca, &path_str(cert)])
            .output()
            .map(|o| o.status.success())
    };
    if let Ok(ok) = verify(&ca, &certs.client_cert) {
        assert!(ok, "the client certificate chains to the CA");
        assert!(!verify(&other_ca, &certs.client_cert).unwrap());
        assert!(verify(&ca, &certs.server_cert).unwrap());
        let text = Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-text",
                "-in",
                &path_str(&certs.client_cert),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("DNS:client.example.org"), "{text}");
        assert!(
            text.contains("URI:spiffe://example.org/ns/a/sa/b"),
            "{text}"
        );
    }

    let redis = TlsRedis::start(&certs, true).await;
    assert_eq!(redis.url(), format!("rediss://127.0.0.1:{}", redis.port));
    let port = redis.port.to_string();
    let pong = redis.cli(&["PING"]).await;
    assert_eq!(stdout(&pong), "PONG", "{}", outputs(&pong));

    // Without a client certificate, with one from the wrong CA, or trusting the wrong CA: no.
    let bare = redis_cli(&["--tls", "--cacert", &ca, "-p", &port, "PING"]).await;
    assert_ne!(stdout(&bare), "PONG", "{}", outputs(&bare));
    let (cert, key) = certs.other_client(&["intruder.example.org"], &[]);
    let wrong = redis_cli(&[
        "--tls",
        "--cacert",
        &ca,
        "--cert",
        &path_str(&cert),
        "--key",
        &path_str(&key),
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert_ne!(stdout(&wrong), "PONG", "{}", outputs(&wrong));
    let distrust = redis_cli(&[
        "--tls",
        "--cacert",
        &other_ca,
        "--cert",
        &path_str(&certs.client_cert),
        "--key",
        &path_str(&certs.client_key),
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert_ne!(stdout(&distrust), "PONG", "{}", outputs(&distrust));
    // A freshly minted client certificate is fine.
    let (cert, key) = certs.client(&[], &["spiffe://example.org/ns/x/sa/y"]);
    let minted = redis_cli(&[
        "--tls",
        "--cacert",
        &ca,
        "--cert",
        &path_str(&cert),
        "--key",
        &path_str(&key),
        "-p",
        &port,
        "PING",
    ])
    .await;
    assert_eq!(stdout(&minted), "PONG", "{}", outputs(&minted));

    // Client certificates optional; only the ACL user may do anything.
    let acl = TlsRedis::start_with(
        &certs,
        TlsOptions {
            users: vec![("alice".into(), "secret".into())],
            disable_default_user: true,
            ..TlsOptions::default()
        },
    )
    .await;
    let port = acl.port.to_string();
    let bare = redis_cli(&["--tls", "--cacert", &ca, "-p", &port, "PING"]).await;
    assert!(stdout(&bare).contains("NOAUTH"), "{}", outputs(&bare));
    let alice = redis_cli(&[
        "--tls",
        "--cacert",
        &ca,
        "-p",
        &port,
        "--user",
        "alice",
        "--pass",
        "secret",
        "--no-auth-warning",
        "PING",
    ])
    .await;
    assert_eq!(stdout(&alice), "PONG", "{}", outputs(&alice));
    let bad = acl
        .cli(&[
            "--user",
            "alice",
            "--pass",
            "wrong",
            "--no-auth-warning",
            "PING",
        ])
        .await;
    let said = format!("{}{}", stdout(&bad), String::from_utf8_lossy(&bad.stderr));
    assert!(said.contains("WRONGPASS"), "{}", outputs(&bad));
}
