//! TLS on the gRPC port: client certificates admitted by their SAN, rotation without a restart, the plaintext health port.
use super::*;

/// Client TLS towards an app whose server certificate is signed by `ca`, with an optional
/// client certificate.
fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    tls
}

async fn tls_channel(
    app: &TestApp,
    tls: ClientTlsConfig,
) -> Result<Channel, tonic::transport::Error> {
    let addr = app.addr;
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
}

/// Mutual TLS: a client certificate whose SAN is listed is admitted; another SAN is
/// PERMISSION_DENIED even with a valid certificate; without a certificate the bearer key still
/// admits; the other services take TLS without a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_admitted_by_their_san() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.tls.cert_file = Some(certs.server_cert.clone());
    settings.grpc.tls.key_file = Some(certs.server_key.clone());
    settings.grpc.tls.client_ca_file = Some(certs.ca_file.clone());
    settings.admin.allowed_clients = format!(
        "spiffe://example.org/ns/ops/sa/admin, {}",
        Certs::CLIENT_URI
    );
    settings.admin.api_keys_file = Some(keys);
    let app = spawn_with_hooks(
        settings,
        Hooks {
            client_tls: Some(client_tls(&certs.ca_file, None)),
            ..Hooks::default()
        },
    )
    .await;
    let (_, reg) = app.register().await;
    let get = |channel: Channel, key: Option<&'static str>| {
        let user_id = reg.user_id.clone();
        async move {
            let message = pb::GetUserRequest {
                lookup: Some(pb::get_user_request::Lookup::UserId(user_id)),
            };
            let request = match key {
                Some(key) => with_key(key, message),
                None => Request::new(message),
            };
            AdminServiceClient::new(channel).get_user(request).await
        }
    };
    let allowed = tls_channel(
        &app,
        client_tls(
            &certs.ca_file,
            Some((&certs.client_cert, &certs.client_key)),
        ),
    )
    .await
    .unwrap();
    get(allowed, None).await.unwrap();
    let (cert, key) = certs.client(
        &["intruder.example.org"],
        &["spiffe://example.org/ns/x/sa/y"],
    );
    let other = tls_channel(&app, client_tls(&certs.ca_file, Some((&cert, &key))))
        .await
        .unwrap();
    assert_code(get(other.clone(), None).await, Code::PermissionDenied);
    // A certificate signed by another CA does not get through the handshake at all.
    let (cert, key) = certs.other_client(&[Certs::CLIENT_DNS], &[Certs::CLIENT_URI]);
    let forged = tls_channel(&app, client_tls(&certs.ca_file, Some((&cert, &key)))).await;
    let forged_call = match forged {
        Ok(channel) => get(channel, None).await.map(|_| ()),
        Err(error) => Err(tonic::Status::unavailable(error.to_string())),
    };
    assert!(
        forged_call.is_err(),
        "a certificate of another CA is refused"
    );
    // No certificate: the key admits; nothing at all is UNAUTHENTICATED.
    get(app.channel.clone(), Some(KEY)).await.unwrap();
    assert_code(get(app.channel.clone(), None).await, Code::Unauthenticated);
    // The rest of the API over TLS, without a client certificate.
    app.validate(&reg.session_token).await.unwrap();

    let rows = audit(&app).await;
    let callers: Vec<(&str, &str)> = rows.iter().map(|r| (r.0.as_str(), r.3.as_str())).collect();
    assert!(
        callers.contains(&(&format!("uri:{}", Certs::CLIENT_URI), "Ok")),
        "{callers:?}"
    );
    assert!(
        callers
            .iter()
            .any(|(c, o)| (c.starts_with("uri:") || c.starts_with("dns:"))
                && *o == "PermissionDenied"),
        "{callers:?}"
    );
    assert!(callers.contains(&("key:ops", "Ok")), "{callers:?}");
    assert!(
        callers.contains(&("anonymous", "Unauthenticated")),
        "{callers:?}"
    );
}

/// cert-manager rotates the files: new connections get the new certificate without a restart,
/// and a connection opened before keeps working. Health is served in plain text on
/// HEALTH__ADDR for probes, and `authd healthcheck` speaks TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_a_restart_and_probes_have_a_plaintext_port() {
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&certs.server_cert, &cert).unwrap();
    std::fs::copy(&certs.server_key, &key).unwrap();
    let health_port = crate::redis_server::free_port();
    let mut settings = test_settings(Mode::NoRedis);
    settings.grpc.tls.cert_file = Some(cert.clone());
    settings.grpc.tls.key_file = Some(key.clone());
    settings.grpc.tls.reload_interval = Duration::from_millis(100);
    settings.health.addr = Some(([127, 0, 0, 1], health_port).into());
    let app = spawn_with_hooks(
        settings,
        Hooks {
            client_tls: Some(client_tls(&certs.ca_file, None)),
            ..Hooks::default()
        },
    )
    .await;
    let (_, reg) = app.register().await;
    let bin = env!("CARGO_BIN_EXE_authd");
    let healthcheck = |args: &[&str]| {
        Command::new(bin)
            .env_clear()
            .arg("healthcheck")
            .args(args)
            .output()
            .unwrap()
    };
    let addr = app.addr.to_string();
    let ca = certs.ca_file.to_str().unwrap();
    let ok = healthcheck(&[
        "--addr",
        &addr,
        "--ca-file",
        ca,
        "--server-name",
        "localhost",
    ]);
    assert!(ok.status.success(), "{ok:?}");
    let plain = healthcheck(&["--addr", &addr]);
    assert!(!plain.status.success(), "plain text to the TLS port fails");
    // …saying what to try, not only "h2 protocol error".
    let said = String::from_utf8_lossy(&plain.stderr);
    assert!(said.contains("add --tls"), "{said}");
    let probe = healthcheck(&["--addr", &format!("127.0.0.1:{health_port}")]);
    assert!(probe.status.success(), "{probe:?}");
    let probe_channel = Channel::from_shared(format!("http://127.0.0.1:{health_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(probe_channel);
    let serving = health
        .check(HealthCheckRequest {
            service: "authd.v1.AuthService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(serving.status(), ServingStatus::Serving);

    // Rotate to a certificate of another CA (as a CA rotation would).
    let (new_cert, new_key) = certs.other_server();
    std::fs::copy(&new_key, dir.path().join("tls.key.new")).unwrap();
    std::fs::copy(&new_cert, dir.path().join("tls.crt.new")).unwrap();
    std::fs::rename(dir.path().join("tls.key.new"), &key).unwrap();
    std::fs::rename(dir.path().join("tls.crt.new"), &cert).unwrap();
    eventually(
        Duration::from_secs(5),
        "new connections get the new certificate",
        || async {
            tls_channel(&app, client_tls(&certs.other_ca_file, None))
                .await
                .is_ok()
        },
    )
    .await;
    assert!(
        tls_channel(&app, client_tls(&certs.ca_file, None))
            .await
            .is_err()
    );
    // The connection opened before the rotation still works.
    app.validate(&reg.session_token).await.unwrap();
}
