//! The account flows as the notifier (AccountService) and the end user (AuthService) see them.
use std::{path::Path, time::Duration};

use authd::proto::authd::v1::{self as pb, account_service_client::AccountServiceClient};
use tonic::{Status, transport::Channel};

use crate::{
    admin::{KEY as ADMIN_KEY, with_key, write_keys},
    events::{SUBSCRIBER_KEY, Watcher, subscribed_settings},
    helpers::{Mode, TestApp, eventually, spawn_sharing, spawn_with, test_settings},
};

mod deletion;
mod required;
mod reset;

pub const NOTIFIER_KEY: &str = "notifier-key-0123456789abcdef";

/// Settings with AccountService admitting [`NOTIFIER_KEY`] (keys file in `dir`).
pub fn notifier_settings(mode: Mode, dir: &Path) -> authd::config::Settings {
    let mut settings = test_settings(mode);
    admit_notifier(&mut settings, dir);
    settings
}

/// AccountService admits [`NOTIFIER_KEY`] (keys file in `dir`).
pub fn admit_notifier(settings: &mut authd::config::Settings, dir: &Path) {
    let notifiers = dir.join("notifiers.toml");
    write_keys(&notifiers, &[("mailer", NOTIFIER_KEY)]);
    settings.accounts.api_keys_file = Some(notifiers);
}

/// AdminService admits [`ADMIN_KEY`] (keys file in `dir`).
pub fn admit_operator(settings: &mut authd::config::Settings, dir: &Path) {
    let operators = dir.join("operators.toml");
    write_keys(&operators, &[("ops", ADMIN_KEY)]);
    settings.admin.api_keys_file = Some(operators);
}

/// Three instances sharing a database and a Redis, each holding a lease (so revoking calls wait
/// for all of them), with AccountService, AdminService and EventService served, and a bounded
/// stream on the first, past its first batch.
pub async fn watched_fleet(dir: &Path) -> ([TestApp; 3], Watcher) {
    let mut settings = subscribed_settings(Mode::Redis, dir);
    admit_notifier(&mut settings, dir);
    let a = spawn_with(settings).await;
    let b = spawn_sharing(&a, |_| {}).await;
    let c = spawn_sharing(&a, |_| {}).await;
    eventually(Duration::from_secs(15), "three lease holders", || async {
        a.db.leases().held().await.unwrap() == 3
    })
    .await;
    let mut watcher = Watcher::open(&a, Some(SUBSCRIBER_KEY), pb::Mode::Bounded, "")
        .await
        .unwrap();
    watcher.next().await.unwrap();
    ([a, b, c], watcher)
}

pub fn accounts(app: &TestApp) -> AccountServiceClient<Channel> {
    AccountServiceClient::new(app.channel.clone())
}

/// The end user's client, at `ip`.
pub fn client(ip: &str) -> Option<pb::ClientInfo> {
    Some(pb::ClientInfo {
        ip_address: ip.to_owned(),
        ..Default::default()
    })
}

impl TestApp {
    /// StartPasswordReset as the notifier, for an end user at 192.0.2.1.
    pub async fn start_reset(&self, email: &str) -> Result<pb::StartPasswordResetResponse, Status> {
        let request = pb::StartPasswordResetRequest {
            email: email.to_owned(),
            client: client("192.0.2.1"),
        };
        accounts(self)
            .start_password_reset(with_key(NOTIFIER_KEY, request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// CompletePasswordReset from an end user at 192.0.2.1: the revoked count.
    pub async fn complete_reset(&self, code: &str, new_password: &str) -> Result<i32, Status> {
        self.auth
            .clone()
            .complete_password_reset(pb::CompletePasswordResetRequest {
                code: code.to_owned(),
                new_password: new_password.to_owned(),
                client: client("192.0.2.1"),
            })
            .await
            .map(|r| r.into_inner().revoked_count)
    }
}
