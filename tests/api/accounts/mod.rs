//! The account flows as the notifier (AccountService) and the end user (AuthService) see them.
use std::path::Path;

use authd::proto::authd::v1::{self as pb, account_service_client::AccountServiceClient};
use tonic::{Status, transport::Channel};

use crate::{
    admin::{with_key, write_keys},
    helpers::{Mode, TestApp, test_settings},
};

mod deletion;
mod required;
mod reset;

pub const NOTIFIER_KEY: &str = "notifier-key-0123456789abcdef";

/// Settings with AccountService admitting [`NOTIFIER_KEY`] (keys file in `dir`).
pub fn notifier_settings(mode: Mode, dir: &Path) -> authd::config::Settings {
    let mut settings = test_settings(mode);
    let notifiers = dir.join("notifiers.toml");
    write_keys(&notifiers, &[("mailer", NOTIFIER_KEY)]);
    settings.accounts.api_keys_file = Some(notifiers);
    settings
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
