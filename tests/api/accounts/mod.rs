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
mod email;
mod required;
mod reset;
mod second_factor;

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

/// The `authd_account_flows_total` sample of completions of `flow` that ended so.
pub fn completions(flow: &str, outcome: &str) -> String {
    format!("authd_account_flows_total{{flow=\"{flow}\",outcome=\"{outcome}\",step=\"complete\"}}")
}

/// `holder` serves each of `tokens` from its memory (the second validation of each is a hit).
pub async fn held(holder: &TestApp, tokens: &[String]) {
    let hits = "authd_local_cache_lookups_total{cache=\"sessions\",result=\"hit\"}";
    for token in tokens {
        holder.validate(token).await.unwrap();
    }
    let before = holder.metric(hits).await;
    for token in tokens {
        holder.validate(token).await.unwrap();
    }
    let after = holder.metric(hits).await;
    assert_eq!(after, before + tokens.len() as f64, "held in memory");
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

    /// StartEmailVerification as the notifier, for an end user at 192.0.2.1.
    pub async fn start_verification(
        &self,
        user_id: &str,
    ) -> Result<pb::StartEmailVerificationResponse, Status> {
        let request = pb::StartEmailVerificationRequest {
            user_id: user_id.to_owned(),
            client: client("192.0.2.1"),
        };
        accounts(self)
            .start_email_verification(with_key(NOTIFIER_KEY, request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// StartEmailChange as the notifier, on behalf of the owner of `token` (at 192.0.2.1).
    pub async fn start_change(
        &self,
        token: &str,
        new_email: &str,
        password: &str,
    ) -> Result<pb::StartEmailChangeResponse, Status> {
        let request = pb::StartEmailChangeRequest {
            session_token: token.to_owned(),
            new_email: new_email.to_owned(),
            password: password.to_owned(),
            client: client("192.0.2.1"),
        };
        accounts(self)
            .start_email_change(with_key(NOTIFIER_KEY, request))
            .await
            .map(tonic::Response::into_inner)
    }

    /// VerifyEmail from an end user at 192.0.2.1.
    pub async fn verify_email(&self, code: &str) -> Result<pb::VerifyEmailResponse, Status> {
        self.auth
            .clone()
            .verify_email(pb::VerifyEmailRequest {
                code: code.to_owned(),
                client: client("192.0.2.1"),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// ConfirmEmailChange from an end user at 192.0.2.1.
    pub async fn confirm_change(
        &self,
        code: &str,
    ) -> Result<pb::ConfirmEmailChangeResponse, Status> {
        self.auth
            .clone()
            .confirm_email_change(pb::ConfirmEmailChangeRequest {
                code: code.to_owned(),
                client: client("192.0.2.1"),
            })
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
