//! What operators see: metrics, request ids, health that follows PostgreSQL, secret-free logs,
//! the deployment files.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use authd::proto::authd::v1 as pb;
use futures::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    both_modes,
    helpers::{
        Mode, PASSWORD, TestApp, assert_code, eventually, register_request, spawn_app, spawn_with,
        test_settings, unique_email,
    },
    proxy::{Link, Proxy},
    redis_server::RedisServer,
};

both_modes!(metrics_count_rpcs_caches_sessions_and_failures);

async fn metrics_count_rpcs_caches_sessions_and_failures(mode: Mode) {
    let mut settings = test_settings(mode);
    // At most 4 guesses per window: 2 at once.
    settings.rate_limit.login_per_email = 4;
    let app = spawn_with(settings).await;
    let (email, reg) = app.register().await;
    for _ in 0..3 {
        app.validate(&reg.session_token).await.unwrap();
    }
    for _ in 0..2 {
        assert_code(
            app.login(&email, "wrong guess").await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        app.login(&email, "wrong guess").await,
        Code::ResourceExhausted,
    );
    app.get_profile(&reg.user_id).await.unwrap();
    app.logout(&reg.session_token).await.unwrap();

    let rpc = |method: &str, code: &str| {
        format!(
            "authd_rpc_requests_total{{code=\"{code}\",method=\"{method}\",service=\"authd.v1.AuthService\"}}"
        )
    };
    assert_eq!(app.metric(&rpc("ValidateSession", "Ok")).await, 3.0);
    assert_eq!(app.metric(&rpc("Login", "Unauthenticated")).await, 2.0);
    assert_eq!(app.metric(&rpc("Login", "ResourceExhausted")).await, 1.0);
    assert_eq!(
        app.metric("authd_rpc_duration_seconds_count{method=\"ValidateSession\",service=\"authd.v1.AuthService\"}").await,
        3.0
    );
    assert_eq!(app.metric("authd_sessions_created_total").await, 1.0);
    assert_eq!(
        app.metric("authd_sessions_revoked_total{reason=\"logout\"}")
            .await,
        1.0
    );
    assert_eq!(app.metric("authd_failed_logins_total").await, 2.0);
    assert_eq!(
        app.metric("authd_rate_limited_total{operation=\"login\"}")
            .await,
        1.0
    );
    assert_eq!(app.metric("authd_password_hash_queue_depth").await, 0.0);
    assert!(
        app.metric("authd_db_queries_total{origin=\"request\"}")
            .await
            >= 3.0
    );
    let text = app.metrics().await;
    assert!(
        text.contains("authd_db_connections{share=\"lookups\",state=\"idle\"}"),
        "{text}"
    );
    assert!(text.contains("authd_db_connections_waiting"), "{text}");
    assert!(
        text.contains("authd_password_hash_rejections_total"),
        "{text}"
    );
    assert_eq!(app.metric("authd_db_up").await, 1.0);
    match mode {
        Mode::Redis | Mode::Cluster => {
            assert_eq!(app.metric("authd_redis_up").await, 1.0);
            let hits = "authd_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
            assert_eq!(app.metric(hits).await, 3.0);
        }
        Mode::NoRedis => assert_eq!(app.metric("authd_redis_up").await, 0.0),
    }
}

#[tokio::test]
async fn a_request_id_is_taken_from_the_caller_or_made_and_always_returned() {
    let app = spawn_app(Mode::NoRedis).await;
    let mut request = Request::new(register_request(&unique_email()));
    request
        .metadata_mut()
        .insert("x-request-id", "req-4711".parse().unwrap());
    let response = app.auth.clone().register(request).await.unwrap();
    assert_eq!(response.metadata().get("x-request-id").unwrap(), "req-4711");

    // Also on errors, and generated when the caller sends none.
    let status = app.validate("bad token").await.unwrap_err();
    let generated = status
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(uuid::Uuid::parse_str(generated).is_ok(), "{generated}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_degraded_not_unhealthy() {
    let mut redis = RedisServer::start().await;
    let mut settings = test_settings(Mode::Redis);
    settings.redis.url = SecretString::from(redis.url());
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    redis.kill();
    app.validate(&reg.session_token).await.unwrap();
    assert_eq!(app.metric("authd_redis_up").await, 0.0);
    let mut errors = 0.0;
    for kind in ["timeout", "disconnected", "error"] {
        errors += app
            .metric(&format!("authd_redis_errors_total{{kind=\"{kind}\"}}"))
            .await;
    }
    assert!(errors >= 1.0, "Redis failures are counted");
    assert_eq!(health(&app, "").await, ServingStatus::Serving);
    redis.restart().await;
    eventually(
        Duration::from_secs(10),
        "the gauge says Redis is back",
        || async {
            let _ = app.validate(&reg.session_token).await;
            app.metric("authd_redis_up").await == 1.0
        },
    )
    .await;
}

async fn health(app: &TestApp, service: &str) -> ServingStatus {
    app.health_of(service).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_postgres_after_the_grace_period() {
    let postgres = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut settings = test_settings(Mode::NoRedis);
    let url = settings.database.url.expose_secret().to_owned();
    settings.database.url =
        SecretString::from(url.replace("127.0.0.1:5432", &postgres.addr.to_string()));
    settings.health.db_grace = Duration::from_secs(1);
    settings.health.db_check_interval = Duration::from_millis(200);
    let app = spawn_with(settings).await;
    let mut watch = app.watch_serving("authd.v1.ProfileService").await;

    postgres.set(Link::Refused);
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    for service in ["", "authd.v1.AuthService", "authd.v1.ProfileService"] {
        assert_eq!(
            health(&app, service).await,
            ServingStatus::NotServing,
            "{service:?}"
        );
    }
    assert_eq!(health(&app, "liveness").await, ServingStatus::Serving);
    assert_eq!(app.metric("authd_db_up").await, 0.0);

    postgres.set(Link::Up);
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );
    assert_eq!(health(&app, "").await, ServingStatus::Serving);
}

/// Runs a whole session lifecycle against the binary logging everything (trace, JSON), then
/// searches every line for tokens, passwords and password hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_any_level() {
    let settings = test_settings(Mode::Redis);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // A file, not a pipe: at trace level the logs would fill a pipe nobody reads yet and block
    // the server.
    let log_path = std::env::temp_dir().join(format!("authd-logs-{port}.txt"));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_authd"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GRPC__ADDR", &addr)
        .env("METRICS__ADDR", "127.0.0.1:0")
        .env("DATABASE__URL", settings.database.url.expose_secret())
        .env("REDIS__URL", crate::helpers::redis_url())
        .env("REDIS__KEY_PREFIX", &settings.redis.key_prefix)
        .env("LOG__LEVEL", "trace")
        .env("LOG__FORMAT", "json")
        .stdout(Stdio::from(log_file.try_clone().unwrap()))
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let channel = {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let mut tries = 0;
        loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(_) if tries < 300 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let mut auth = pb::auth_service_client::AuthServiceClient::new(channel.clone());
    let mut profiles = pb::profile_service_client::ProfileServiceClient::new(channel);
    let email = unique_email();
    let reg = auth
        .register(register_request(&email))
        .await
        .unwrap()
        .into_inner();
    let new_password = "a different secret phrase";
    let login = auth
        .login(pb::LoginRequest {
            email: email.clone(),
            password: PASSWORD.into(),
            client: None,
        })
        .await
        .unwrap()
        .into_inner();
    let _ = auth
        .login(pb::LoginRequest {
            email: email.clone(),
            password: "wrong secret guess".into(),
            client: None,
        })
        .await;
    let token = |t: &str| pb::ValidateSessionRequest {
        session_token: t.into(),
    };
    auth.validate_session(token(&login.session_token))
        .await
        .unwrap();
    auth.list_sessions(pb::ListSessionsRequest {
        session_token: login.session_token.clone(),
    })
    .await
    .unwrap();
    profiles
        .update_profile(pb::UpdateProfileRequest {
            session_token: login.session_token.clone(),
            profile: Some(pb::Profile {
                bio: "hello".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["bio".into()],
            }),
            expected_version: 0,
        })
        .await
        .unwrap();
    auth.change_password(pb::ChangePasswordRequest {
        session_token: login.session_token.clone(),
        current_password: PASSWORD.into(),
        new_password: new_password.into(),
    })
    .await
    .unwrap();
    auth.logout(pb::LogoutRequest {
        session_token: login.session_token.clone(),
    })
    .await
    .unwrap();
    let _ = auth.validate_session(token(&reg.session_token)).await;

    let mut conn =
        <sqlx::PgConnection as sqlx::Connection>::connect(settings.database.url.expose_secret())
            .await
            .unwrap();
    let phc: String =
        sqlx::query_scalar("select password_hash from users where email_normalized = $1")
            .bind(&email)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    drop(conn);

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(logs.lines().count() > 50, "trace logging was on");
    assert!(
        logs.contains("\"request_id\""),
        "per-RPC lines carry a request id"
    );
    for secret in [
        reg.session_token.as_str(),
        &reg.session_token["authd_".len()..],
        login.session_token.as_str(),
        PASSWORD,
        new_password,
        "wrong secret guess",
        phc.as_str(),
        &phc[phc.rfind('$').unwrap() + 1..],
    ] {
        assert!(
            !logs.contains(secret),
            "a secret reached the logs: {secret}"
        );
    }
    crate::helpers::drop_database(settings.database.url.expose_secret()).await;
}

/// Every YAML file the repository ships parses, and the Kubernetes manifests agree with the
/// service (probes on the health names, a termination grace above the drain grace).
#[test]
fn every_shipped_yaml_file_parses_and_the_manifests_fit_the_service() {
    use yaml_rust2::YamlLoader;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" && name != "node_modules" {
                    dirs.push(path);
                }
            } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 8, "{files:?}");
    let mut all = String::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(!docs.is_empty(), "{}", file.display());
        all.push_str(&text);
    }
    let deployment =
        std::fs::read_to_string(root.join("deploy/kubernetes/deployment.yaml")).unwrap();
    let doc = &YamlLoader::load_from_str(&deployment).unwrap()[0];
    let pod = &doc["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["livenessProbe"]["grpc"]["service"].as_str(),
        Some("liveness")
    );
    assert_eq!(
        container["readinessProbe"]["grpc"]["service"].as_str(),
        Some("")
    );
    // The gRPC port speaks TLS: probes use the plaintext health port, which the ConfigMap opens.
    let health_port = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("health"))
        .and_then(|p| p["containerPort"].as_i64())
        .expect("a health port");
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(health_port),
            "{probe}"
        );
    }
    assert!(
        all.contains(&format!("HEALTH__ADDR: \"0.0.0.0:{health_port}\"")),
        "the ConfigMap opens the probes' port"
    );
    assert!(all.contains("kind: Certificate") && all.contains("secretName: authd-tls"));
    let grace_s = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    let drain: Duration = authd::config::Settings::default().grpc.shutdown_grace;
    assert!(
        grace_s as u64 > drain.as_secs(),
        "terminationGracePeriodSeconds {grace_s} must exceed the drain grace"
    );
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
        "Job",
    ] {
        assert!(all.contains(&format!("kind: {kind}")), "missing a {kind}");
    }
    let compose = std::fs::read_to_string(root.join("docker-compose.yaml")).unwrap();
    let compose = &YamlLoader::load_from_str(&compose).unwrap()[0];
    for service in ["postgres", "redis", "authd"] {
        assert!(
            !compose["services"][service]["healthcheck"].is_badvalue(),
            "{service} has a health check"
        );
    }
    // Published on the loopback only: a trial is not an open PostgreSQL or Redis.
    let services = compose["services"].as_hash().unwrap();
    for (name, service) in services {
        for port in service["ports"].as_vec().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(port.starts_with("127.0.0.1:"), "{name:?} publishes {port}");
        }
    }
    // authd runs as the app role after the owner migrated (deploy/postgres/roles.sql).
    let authd = &compose["services"]["authd"];
    assert_eq!(
        authd["environment"]["DATABASE__MIGRATE"].as_str(),
        Some("false")
    );
    assert!(
        authd["environment"]["DATABASE__URL"]
            .as_str()
            .unwrap()
            .contains("authd_app")
    );
    assert_eq!(
        authd["depends_on"]["migrate"]["condition"].as_str(),
        Some("service_completed_successfully")
    );
    assert_eq!(
        compose["services"]["migrate"]["command"][0].as_str(),
        Some("migrate")
    );
    for volume in compose["services"]["postgres"]["volumes"].as_vec().unwrap() {
        if let Some(local) = volume.as_str().unwrap().strip_prefix("./") {
            let file = local.split(':').next().unwrap();
            assert!(root.join(file).exists(), "{file} is mounted but missing");
        }
    }
    assert!(
        all.contains("DATABASE__MIGRATE: \"false\""),
        "the Deployment does not migrate"
    );
    assert!(all.contains("args: [\"migrate\"]"), "a Job migrates");
}

/// The deployment files leave nothing open that authd does not need (issue "No caller can take
/// authd down", finding 6): callers only from named namespaces, egress to DNS, PostgreSQL and
/// Redis only, the runtime's default seccomp profile, no service-account token, base images
/// pinned by digest, and CA roots in the runtime image (a managed Redis or PostgreSQL with a
/// public certificate is verified with them).
#[test]
fn the_deployment_files_are_locked_down() {
    use yaml_rust2::YamlLoader;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |file: &str| std::fs::read_to_string(root.join(file)).unwrap();
    let policy = &YamlLoader::load_from_str(&read("deploy/kubernetes/networkpolicy.yaml")).unwrap()
        [0]["spec"];
    let types: Vec<_> = policy["policyTypes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|t| t.as_str())
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    for rule in policy["ingress"].as_vec().unwrap() {
        for from in rule["from"].as_vec().unwrap() {
            let namespaces = &from["namespaceSelector"];
            assert!(
                namespaces["matchLabels"]["kubernetes.io/metadata.name"]
                    .as_str()
                    .is_some()
                    || namespaces["matchExpressions"][0]["key"].as_str()
                        == Some("kubernetes.io/metadata.name"),
                "ingress from unnamed namespaces: {from:?}"
            );
        }
    }
    let egress_ports: Vec<i64> = policy["egress"]
        .as_vec()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_vec().unwrap().iter())
        .filter_map(|port| port["port"].as_i64())
        .collect();
    assert_eq!(egress_ports, [53, 53, 5432, 6379, 26379]);
    for (file, pod) in [
        ("deploy/kubernetes/deployment.yaml", 0),
        ("deploy/kubernetes/migrate-job.yaml", 0),
    ] {
        let doc = &YamlLoader::load_from_str(&read(file)).unwrap()[pod];
        let spec = &doc["spec"]["template"]["spec"];
        assert_eq!(
            spec["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{file}"
        );
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{file}"
        );
        let image = spec["containers"][0]["image"].as_str().unwrap();
        assert!(!image.ends_with(":latest"), "{file}: {image}");
    }
    let dockerfile = read("Dockerfile");
    let froms: Vec<_> = dockerfile
        .lines()
        .filter(|line| line.starts_with("FROM "))
        .collect();
    assert_eq!(froms.len(), 2);
    for from in froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let (_, digest) = image.split_once("@sha256:").expect("pinned by digest");
        assert!(
            digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()),
            "{from}"
        );
    }
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        runtime.contains("install -y --no-install-recommends ca-certificates"),
        "the runtime image has CA roots"
    );
}

/// Slowloris on `/metrics` (a port the Kubernetes Service exposes): connections that never
/// finish their headers are closed after a few seconds, and while more of them are open than
/// the endpoint serves at once, a scrape still gets through once they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_closes_slow_headers_and_caps_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut settings = test_settings(Mode::NoRedis);
    settings.metrics.max_connections = 4;
    settings.metrics.header_read_timeout = Duration::from_millis(500);
    let app = spawn_with(settings).await;
    let addr = app.metrics_addr.unwrap();
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: authd\r\n")
            .await
            .unwrap();
        slow.push(stream);
    }
    let started = std::time::Instant::now();
    // From another address (127.0.0.1 holds its 4 places): the scrape waits for a place.
    let scrape = tokio::time::timeout(Duration::from_secs(10), scrape_from(addr, [127, 0, 0, 2]))
        .await
        .expect("a scrape gets through once the slow connections are closed");
    assert!(scrape.contains("authd_"), "{scrape}");
    // Four slow connections held every place until their headers timed out (half a second);
    // the six past 127.0.0.1's share were closed at once.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the cap holds"
    );
    // Every slow connection was closed by the server (EOF or reset), none left hanging.
    for mut stream in slow {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            read.is_ok(),
            "a connection with unfinished headers stays open"
        );
    }
}

/// Every metric README's table lists is on `/metrics` right after startup — its documented
/// label sets at 0 — so that `rate()` alerts and dashboards see 0 rather than nothing on a
/// healthy server. (Per-node Redis gauges follow the nodes; they are checked once the first
/// node check has run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_metric_is_present_from_startup() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("### Metrics")
        .nth(1)
        .and_then(|rest| rest.split("\n### ").next())
        .expect("README has a Metrics section");
    let names: Vec<&str> = section
        .lines()
        .filter(|line| line.starts_with("| `authd_"))
        .flat_map(|line| line.split('|').nth(1).unwrap_or("").split(", "))
        .map(|name| name.trim().trim_matches('`'))
        .collect();
    assert!(names.len() >= 20, "{names:?}");
    let app = spawn_app(Mode::Redis).await;
    let text = app.metrics().await;
    let per_node = |name: &str| {
        name.starts_with("authd_redis_")
            && name != "authd_redis_up"
            && !name.starts_with("authd_redis_errors")
            && !name.starts_with("authd_redis_generation")
    };
    for name in names.iter().filter(|n| !per_node(n)) {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} is absent right after startup"
        );
    }
    for sample in [
        "authd_redis_errors_total{kind=\"timeout\"} 0",
        "authd_rate_limited_total{operation=\"login\"} 0",
        "authd_sessions_revoked_total{reason=\"admin\"} 0",
        "authd_cache_lookups_total{cache=\"profiles\",result=\"unavailable\"} 0",
        "authd_rpc_requests_total{code=\"Ok\",method=\"ValidateSession\",service=\"authd.v1.AuthService\"} 0",
    ] {
        assert!(text.contains(sample), "{sample} missing");
    }
    eventually(Duration::from_secs(10), "the per-node gauges", || async {
        let text = app.metrics().await;
        names
            .iter()
            .filter(|n| per_node(n))
            .all(|name| text.lines().any(|l| l.starts_with(name)))
    })
    .await;
}

/// `GET /metrics` on `addr` from the loopback address `source`: the body.
async fn scrape_from(addr: std::net::SocketAddr, source: [u8; 4]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: authd\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

/// Review found: the metrics port capped connections in all (16) but not per address: 16
/// keep-alive connections from one address, a GET every 3 s, left 4 of 4 outside scrapes
/// unanswered over 36 s. Now one address holds at most `METRICS__MAX_CONNECTIONS_PER_ADDRESS`
/// (4): the rest are closed at once, and a scrape from elsewhere is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_the_metrics_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app(Mode::NoRedis).await;
    let addr = app.metrics_addr.unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: authd\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = stream.write_all(request).await;
        held.push(stream);
    }
    // Keep every connection busy: read what each answered, ask again (as the attack did).
    let holding = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut open = 0;
        for _ in 0..3 {
            open = 0;
            for stream in &mut held {
                let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf));
                if matches!(read.await, Ok(Ok(1..))) && stream.write_all(request).await.is_ok() {
                    open += 1;
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        (open, held)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let scrape = tokio::time::timeout(Duration::from_secs(3), scrape_from(addr, [127, 0, 0, 2]))
        .await
        .expect("a scrape from another address is answered while 127.0.0.1 holds its share");
    assert!(scrape.contains("authd_"), "{scrape}");
    let (open, _held) = holding.await.unwrap();
    assert_eq!(open, 4, "127.0.0.1 holds its 4 places, no more");
}
