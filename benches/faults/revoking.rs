//! Revoking calls as a careful client makes them: retried, on any instance, while the answer
//! leaves the outcome unknown (README: retrying is safe); every attempt is an operation of the
//! history.
use authd::proto::authd::v1::{
    self as pb, admin_service_client::AdminServiceClient, auth_service_client::AuthServiceClient,
};
use tonic::Status;

use crate::{
    history::Op,
    workload::{PASSWORDS, Shared, end_user, keyed, outcome},
};

/// A revoking call, as a client retries it after an answer that leaves the outcome unknown.
pub(crate) enum Revoking {
    Logout {
        token: String,
    },
    Session {
        token: String,
        target: String,
    },
    All {
        token: String,
    },
    User {
        user_id: String,
    },
    Disable {
        user_id: String,
    },
    Delete {
        user_id: String,
    },
    /// CompletePasswordReset with `code`, to [`PASSWORDS`]`[password]`, from the end user of
    /// account `user`.
    Reset {
        code: String,
        password: usize,
        user: usize,
    },
}

/// Answers after which a careful client retries a revoking call: the change may or may not be
/// committed (README: retrying is safe).
fn retryable(outcome: &str) -> bool {
    matches!(
        outcome,
        "Unavailable" | "DeadlineExceeded" | "Cancelled" | "Transport"
    )
}

async fn send(shared: &Shared, instance: usize, call: &Revoking) -> Result<(), Status> {
    let channel = shared.channels[instance].clone();
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel);
    let key = &shared.admin_key;
    match call {
        Revoking::Logout { token } => {
            let request = pb::LogoutRequest {
                session_token: token.clone(),
            };
            auth.logout(request).await.map(|_| ())
        }
        Revoking::Session { token, target } => {
            let request = pb::RevokeSessionRequest {
                session_token: token.clone(),
                session_id: target.clone(),
            };
            auth.revoke_session(request).await.map(|_| ())
        }
        Revoking::All { token } => {
            let request = pb::RevokeAllSessionsRequest {
                session_token: token.clone(),
                include_current: true,
            };
            auth.revoke_all_sessions(request).await.map(|_| ())
        }
        Revoking::User { user_id } => {
            let request = pb::RevokeUserSessionsRequest {
                user_id: user_id.clone(),
            };
            admin
                .revoke_user_sessions(keyed(key, request))
                .await
                .map(|_| ())
        }
        Revoking::Disable { user_id } => {
            let request = pb::DisableUserRequest {
                user_id: user_id.clone(),
                reason: "fault run".into(),
            };
            admin.disable_user(keyed(key, request)).await.map(|_| ())
        }
        Revoking::Delete { user_id } => {
            let request = pb::DeleteUserRequest {
                user_id: user_id.clone(),
            };
            admin.delete_user(keyed(key, request)).await.map(|_| ())
        }
        Revoking::Reset {
            code,
            password,
            user,
        } => {
            let request = pb::CompletePasswordResetRequest {
                code: code.clone(),
                new_password: PASSWORDS[*password].into(),
                client: end_user(*user),
            };
            auth.complete_password_reset(request).await.map(|_| ())
        }
    }
}

/// Sends `call` (first on `op.instance`) and, while the answer leaves its outcome unknown,
/// retries it up to twice on any instance: every attempt is an operation of the history, and an
/// OK one covers `covers`, retry or not.
pub(crate) async fn revoke(
    shared: &Shared,
    rng: &mut fastrand::Rng,
    mut op: Op,
    call: Revoking,
    covers: Vec<String>,
) {
    if let Revoking::Reset { .. } = call {
        // Until an answer says so, either password may be the account's.
        shared.accounts[op.user].lock().unwrap().password = PASSWORDS.len();
    }
    for attempt in 0..3 {
        if attempt > 0 {
            op.instance = rng.usize(..shared.channels.len());
            op.start_us = shared.now_us();
        }
        let result = send(shared, op.instance, &call).await;
        op.outcome = outcome(&result);
        op.end_us = shared.now_us();
        let retry = retryable(&op.outcome);
        if result.is_ok() {
            op.covers = covers.clone();
            shared.forget(op.user, &covers);
            let mut account = shared.accounts[op.user].lock().unwrap();
            match call {
                Revoking::Disable { .. } => account.disabled = true,
                Revoking::Delete { .. } => account.deleted = true,
                Revoking::Reset { password, .. } => account.password = password,
                _ => {}
            }
        }
        shared.history.record(op.clone());
        if !retry {
            break;
        }
    }
}
