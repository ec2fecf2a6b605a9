//! Redis over TLS and with ACL users; misconfigurations named in the log while authd serves from PostgreSQL, or stopping startup.
use super::*;

/// TLS with the test's own CA, and mutual TLS: the cache serves as over plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls_serve_the_cache() {
    let certs = Certs::new();
    for require_client_cert in [false, true] {
        let server = TlsRedis::start(&certs, require_client_cert).await;
        let mut settings = test_settings(Mode::Redis);
        settings.redis.url = SecretString::from(server.url());
        settings.redis.tls.ca_file = Some(certs.ca_file.clone());
        if require_client_cert {
            settings.redis.tls.cert_file = Some(certs.client_cert.clone());
            settings.redis.tls.key_file = Some(certs.client_key.clone());
        }
        let app = spawn_with(settings).await;
        let (_, reg) = app.register().await;
        eventually(Duration::from_secs(10), "served over TLS", || {
            app.served_from_redis(&reg.session_token)
        })
        .await;
    }
}

/// What a misconfigured TLS or ACL connection does: a log line that names the setting to fix,
/// and authd serving from PostgreSQL meanwhile.
async fn misconfigured(server_url: String, env: &[(&str, String)], setting: &str) {
    let settings = test_settings(Mode::Redis);
    let mut cmd = binary::command(&settings, &server_url);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let binary = Binary::start(cmd).await;
    binary
        .wait_for_line(
            &["cannot connect to redis", setting],
            Duration::from_secs(10),
        )
        .await;
    let mut auth = binary.auth().await;
    let email = crate::helpers::unique_email();
    let registered = auth
        .register(crate::helpers::register_request(&email))
        .await
        .expect("served from PostgreSQL")
        .into_inner();
    auth.validate_session(pb::ValidateSessionRequest {
        session_token: registered.session_token,
        ..Default::default()
    })
    .await
    .expect("validated from PostgreSQL");
    drop(binary);
    crate::helpers::drop_database(secrecy::ExposeSecret::expose_secret(&settings.database.url))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_named_in_the_log_and_authd_serves_degraded() {
    let certs = Certs::new();
    let server = TlsRedis::start(&certs, false).await;
    let ca = certs.other_ca_file.display().to_string();
    misconfigured(
        server.url(),
        &[("REDIS__TLS__CA_FILE", ca)],
        "REDIS__TLS__CA_FILE",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_acl_password_is_named_in_the_log_and_authd_serves_degraded() {
    let certs = Certs::new();
    let options = TlsOptions {
        users: vec![("authd".into(), "right".into())],
        disable_default_user: true,
        ..TlsOptions::default()
    };
    let server = TlsRedis::start_with(&certs, options).await;
    let env = [
        ("REDIS__TLS__CA_FILE", certs.ca_file.display().to_string()),
        ("REDIS__USERNAME", "authd".to_owned()),
        ("REDIS__PASSWORD", "wrong".to_owned()),
    ];
    misconfigured(server.url(), &env, "REDIS__PASSWORD").await;
}

/// The ACL rule README gives, and nothing more, is enough for every operation (no Redis error
/// recorded); the password comes from `REDIS__PASSWORD`, not the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_rule_is_enough() {
    let mut settings = test_settings(Mode::Redis);
    let rule = format!(
        "~{prefix}* &{prefix}* {}",
        authd::cache::ACL_COMMANDS,
        prefix = settings.redis.key_prefix,
    );
    let mut args = vec![
        "--user", "default", "off", "--user", "authd", "on", ">s3cret",
    ];
    args.extend(rule.split(' '));
    let server = RedisServer::start_with(false, &args).await;
    settings.redis.url = SecretString::from(server.url());
    settings.redis.username = Some("authd".into());
    settings.redis.password = Some(SecretString::from("s3cret"));
    let app = spawn_with(settings).await;
    let (email, owner) = app.register().await;
    let other = app.login(&email, PASSWORD).await.unwrap().session_token;
    assert!(app.served_from_redis(&owner.session_token).await);
    app.logout(&other).await.unwrap();
    assert_code(
        app.login(&email, "wrong password").await,
        Code::Unauthenticated,
    );
    app.update_profile(&owner.session_token, bio("v2"), &["bio"], 0)
        .await
        .unwrap();
    app.batch_get(&[owner.user_id.clone(), uuid::Uuid::now_v7().to_string()])
        .await
        .unwrap();
    assert_eq!(app.get_profile(&owner.user_id).await.unwrap().version, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = app.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("authd_redis_errors_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(app.metric("authd_redis_up").await, 1.0);
    // The in-process cache (on in tests) works under the rule: it hears its own heartbeat on
    // the channels and holds a lease.
    eventually(Duration::from_secs(10), "a local-cache lease", || async {
        app.metric("authd_local_cache_lease_valid").await == 1.0
    })
    .await;
}

/// Settings that cannot work together stop startup with exit code 2 and name the setting.
#[tokio::test]
async fn invalid_redis_settings_stop_startup_naming_them() {
    let settings = test_settings(Mode::Redis);
    let certs = Certs::new();
    let ca = certs.ca_file.display().to_string();
    let cert = certs.client_cert.display().to_string();
    for (url, env, named) in [
        (
            "redis://127.0.0.1:6379",
            vec![("REDIS__TLS__CA_FILE", ca.clone())],
            "REDIS__TLS__CA_FILE",
        ),
        (
            "rediss://127.0.0.1:6379",
            vec![("REDIS__TLS__CERT_FILE", cert)],
            "REDIS__TLS__KEY_FILE",
        ),
        (
            "rediss://127.0.0.1:6379",
            vec![("REDIS__TLS__CA_FILE", "/nonexistent.pem".into())],
            "REDIS__TLS__CA_FILE",
        ),
        (
            "redis://127.0.0.1:6379",
            vec![("REDIS__SENTINEL__PASSWORD", "x".into())],
            "REDIS__SENTINEL",
        ),
        ("redis-sentinel://127.0.0.1:26379", vec![], "REDIS__URL"),
        ("redis://a:1,b:2", vec![], "REDIS__URL"),
        ("memcached://127.0.0.1:11211", vec![], "REDIS__URL"),
    ] {
        let mut cmd = binary::command(&settings, url);
        for (key, value) in &env {
            cmd.env(key, value);
        }
        let output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{url} {env:?}: {stderr}");
        assert!(stderr.contains(named), "{url} {env:?}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}

/// `authd_redis_up` follows reality without traffic: an idle instance sees Redis die and return
/// within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_up_follows_reality_on_an_idle_instance() {
    let mut server = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(server.url());
    let app = spawn_with(settings).await;
    assert_eq!(app.metric("authd_redis_up").await, 1.0);
    server.kill();
    eventually(
        Duration::from_secs(5),
        "authd_redis_up drops to 0",
        || async { app.metric("authd_redis_up").await == 0.0 },
    )
    .await;
    server.restart().await;
    eventually(
        Duration::from_secs(10),
        "authd_redis_up is 1 again",
        || async { app.metric("authd_redis_up").await == 1.0 },
    )
    .await;
    // Redis' own figures come with the next read of its INFO, a moment after it answers.
    let names = [
        "authd_redis_used_memory_bytes",
        "authd_redis_maxmemory_bytes",
        "authd_redis_evicted_keys",
        "authd_redis_connected_clients",
        "authd_redis_maxmemory_policy",
        "authd_redis_generation ",
        "authd_sessions_live",
    ];
    eventually(
        Duration::from_secs(10),
        "Redis' figures are exported again",
        || async {
            let metrics = app.metrics().await;
            names.iter().all(|name| metrics.contains(name))
        },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "a restart is a new generation",
        || async { app.metric("authd_redis_generation_changes_total").await >= 1.0 },
    )
    .await;
}
