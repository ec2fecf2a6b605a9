//! AdminService: who is admitted (client certificate SAN, bearer key, rotation), the audit of
//! every call, what each call does, DisableUser against racing logins, pagination; and TLS on
//! the gRPC port (rotation without a restart, the plaintext health port, `authd healthcheck`).
use std::{path::Path, process::Command, time::Duration};

use authd::proto::authd::v1::{self as pb, admin_service_client::AdminServiceClient};
use futures::future::join_all;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    helpers::{
        Hooks, Mode, PASSWORD, TestApp, assert_code, eventually, spawn_sharing, spawn_with,
        spawn_with_hooks, test_settings, violation_fields,
    },
    proxy::{Link, Proxy},
    topology::Certs,
};

mod accounts;
mod audit;
mod tls;

pub const KEY: &str = "ops-key-0123456789abcdef";

/// A keys file holding `(name, key)` pairs (as their hashes).
pub fn write_keys(path: &Path, keys: &[(&str, &str)]) {
    let text: String = keys
        .iter()
        .map(|(name, key)| {
            format!(
                "[[key]]\nname = \"{name}\"\nsha256 = \"{}\"\n",
                hex::encode(Sha256::digest(key))
            )
        })
        .collect();
    // Written whole and renamed, as a Secret update is: never half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A plaintext app with AdminService admitted by [`KEY`] (keys file in `dir`).
async fn keyed_app(mode: Mode, dir: &Path) -> TestApp {
    spawn_with(keyed_settings(mode, dir)).await
}

/// The settings of [`keyed_app`].
fn keyed_settings(mode: Mode, dir: &Path) -> authd::config::Settings {
    let keys = dir.join("keys.toml");
    write_keys(&keys, &[("ops", KEY)]);
    let mut settings = test_settings(mode);
    settings.admin.api_keys_file = Some(keys);
    settings.admin.reload_interval = Duration::from_millis(100);
    settings.rate_limit.login_per_email = 0;
    settings
}

pub fn with_key<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    request
}

pub fn admin(app: &TestApp) -> AdminServiceClient<Channel> {
    AdminServiceClient::new(app.channel.clone())
}

pub async fn get_user(app: &TestApp, key: &str, user_id: &str) -> Result<pb::User, tonic::Status> {
    let lookup = pb::get_user_request::Lookup::UserId(user_id.to_owned());
    admin(app)
        .get_user(with_key(
            key,
            pb::GetUserRequest {
                lookup: Some(lookup),
            },
        ))
        .await
        .map(|r| r.into_inner().user.unwrap())
}

/// The audit rows, oldest first: (caller, method, target, outcome).
async fn audit(app: &TestApp) -> Vec<(String, String, String, String)> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(
        app.settings.database.url.expose_secret(),
    )
    .await
    .unwrap();
    sqlx::query_as("select caller, method, target, outcome from admin_audit order by id")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_service_is_not_served_unless_configured() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (_, reg) = app.register().await;
    let refused = get_user(&app, KEY, &reg.user_id).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    // Said so, with the settings that turn it on (not tonic's empty UNIMPLEMENTED).
    assert!(
        refused.message().contains("ADMIN__API_KEYS_FILE"),
        "{refused:?}"
    );
}

/// Bearer keys: no credential is UNAUTHENTICATED, a wrong key PERMISSION_DENIED, the right one
/// admitted; rewriting the file rotates keys while the server runs; every call is audited
/// (caller, method, target, outcome) without the key, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_admit_rotate_and_every_call_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let app = keyed_app(Mode::NoRedis, dir.path()).await;
    let (email, reg) = app.register().await;
    let lookup = pb::get_user_request::Lookup::UserId(reg.user_id.clone());
    let anonymous = admin(&app)
        .get_user(pb::GetUserRequest {
            lookup: Some(lookup),
        })
        .await;
    assert_code(anonymous, Code::Unauthenticated);
    assert_code(
        get_user(&app, "not-the-key", &reg.user_id).await,
        Code::PermissionDenied,
    );
    let user = get_user(&app, KEY, &reg.user_id).await.unwrap();
    assert_eq!(user.email, email);
    assert_eq!(user.active_session_count, 1);
    assert!(!user.disabled);

    write_keys(
        &dir.path().join("keys.toml"),
        &[("ops-2", "rotated-key-fedcba9876543210")],
    );
    eventually(
        Duration::from_secs(5),
        "the rotated key is admitted",
        || async {
            get_user(&app, "rotated-key-fedcba9876543210", &reg.user_id)
                .await
                .is_ok()
        },
    )
    .await;
    assert_code(
        get_user(&app, KEY, &reg.user_id).await,
        Code::PermissionDenied,
    );

    let rows = audit(&app).await;
    let expect = [
        ("anonymous", "Unauthenticated"),
        ("key:unknown", "PermissionDenied"),
        ("key:ops", "Ok"),
    ];
    for (i, (caller, outcome)) in expect.iter().enumerate() {
        assert_eq!(
            (rows[i].0.as_str(), rows[i].1.as_str(), rows[i].3.as_str()),
            (*caller, "GetUser", *outcome),
            "{rows:?}"
        );
        assert_eq!(rows[i].2, reg.user_id);
    }
    assert!(rows.iter().any(|r| r.0 == "key:ops-2" && r.3 == "Ok"));
    assert_eq!(
        rows.last().unwrap().0,
        "key:unknown",
        "the old key is refused"
    );
    let all = format!("{rows:?}");
    assert!(
        !all.contains(KEY) && !all.contains("rotated-key"),
        "no key in the audit"
    );
    let denied = app
        .metric("authd_admin_calls_total{method=\"GetUser\",outcome=\"PermissionDenied\"}")
        .await;
    assert!(denied >= 2.0, "{denied}");
}
