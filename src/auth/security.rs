//! Security events: one structured log line per event that a security team follows — a
//! failed login, an account reaching its lockout, a password changed (or a wrong current
//! password), sessions revoked, an AdminService call. Target `authd::security`, message
//! `security event`, and a stable schema (docs/security.md, "Security events"): `event`, the
//! account (`user_id`, empty when an email matches none), the end user's address as the calling
//! service sent it (`client_ip`), the calling service's own address (`peer`), and fields of the
//! event's own. Never a token, a password, a hash or a key.
use uuid::Uuid;

/// The calling service's address, when the call came over the network.
fn peer() -> String {
    crate::store::current_work()
        .peer
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

fn account(user_id: Option<Uuid>) -> String {
    user_id.map(|id| id.to_string()).unwrap_or_default()
}

/// A login refused: `reason` is `unknown_account`, `wrong_password`, `account_locked` (the
/// account reached its lockout, the client is not one it trusts), `account_disabled` (the
/// right password, for a disabled account) or `password_change_required` (the right password,
/// for an account that must change it: answered with a reset code).
pub(super) fn login_failed(user_id: Option<Uuid>, client_ip: &str, reason: &'static str) {
    tracing::info!(
        target: "authd::security",
        event = "login_failed",
        user_id = %account(user_id),
        client_ip,
        peer = %peer(),
        reason,
        "security event"
    );
}

/// A wrong password brought the account to `RATE_LIMIT__MAX_FAILED_LOGINS` consecutive
/// failures: from now on only clients it trusts may sign in (until a success or EnableUser).
pub(super) fn account_locked(user_id: Uuid, client_ip: &str, failed_logins: i32) {
    tracing::warn!(
        target: "authd::security",
        event = "account_locked",
        user_id = %user_id,
        client_ip,
        peer = %peer(),
        failed_logins,
        "security event"
    );
}

/// ChangePassword: `outcome` is `changed` (`revoked` other sessions ended) or
/// `wrong_current_password`; `client_ip` is the address the calling session signed in from.
pub(super) fn password_change(
    user_id: Uuid,
    session_id: Uuid,
    client_ip: &str,
    outcome: &'static str,
    revoked: usize,
) {
    let event = match outcome {
        "changed" => "password_changed",
        _ => "password_change_failed",
    };
    tracing::info!(
        target: "authd::security",
        event,
        user_id = %user_id,
        session_id = %session_id,
        client_ip,
        peer = %peer(),
        outcome,
        revoked,
        "security event"
    );
}

/// An account flow's step (`flow` `password_reset`; `step` `start` or `complete`) and its
/// outcome (the `outcome` label of `authd_account_flows_total`); `user_id` empty when no account
/// is known (an unknown email, an invalid code). `event` is `<flow>_started` for a start,
/// `<flow>_completed` for a completion that succeeded (`completed`, `retried`), else
/// `<flow>_failed`.
pub(super) fn account_flow(
    flow: &'static str,
    step: &'static str,
    user_id: Option<Uuid>,
    client_ip: &str,
    outcome: &'static str,
) {
    let event = match (step, outcome) {
        ("start", _) => format!("{flow}_started"),
        (_, "completed" | "retried") => format!("{flow}_completed"),
        _ => format!("{flow}_failed"),
    };
    tracing::info!(
        target: "authd::security",
        event,
        user_id = %account(user_id),
        client_ip,
        peer = %peer(),
        outcome,
        "security event"
    );
}

/// A change to an account's second factor (`action`: see `metrics::FACTOR_ACTIONS`) and how it
/// ended (`done`, `invalid_code`, `refused`); `client_ip`: the session's (empty for an operator).
pub(super) fn second_factor_changed(
    action: &'static str,
    user_id: Uuid,
    client_ip: &str,
    outcome: &'static str,
) {
    tracing::info!(
        target: "authd::security",
        event = "second_factor_changed",
        action,
        %user_id,
        client_ip,
        peer = %peer(),
        outcome,
        "security event"
    );
}

/// An account deleted, `by` its `user` or an `operator`; `revoked`: its sessions that were still
/// usable.
pub(super) fn account_deleted(user_id: Uuid, by: &'static str, revoked: usize) {
    tracing::info!(
        target: "authd::security",
        event = "account_deleted",
        user_id = %user_id,
        peer = %peer(),
        by,
        revoked,
        "security event"
    );
}

/// Sessions of an account revoked, `count` of them, for `reason` (the label of
/// `authd_sessions_revoked_total`: `logout`, `revoke`, `revoke_all`, `password_change`,
/// `session_cap`, `admin`, `password_reset`, `user_deleted`).
pub(super) fn sessions_revoked(user_id: Uuid, reason: &str, count: usize) {
    tracing::info!(
        target: "authd::security",
        event = "sessions_revoked",
        user_id = %user_id,
        peer = %peer(),
        reason,
        count,
        "security event"
    );
}

/// An AdminService call, admitted or refused: who (`caller`: `uri:<SAN>`, `dns:<SAN>`,
/// `key:<name>`, `key:unknown`, `anonymous`), what (`method`), on whom (`target_user`), and
/// how it ended (`outcome`, a gRPC code name).
pub fn admin_action(caller: &str, method: &str, target: &str, outcome: &str, request_id: &str) {
    tracing::info!(
        target: "authd::security",
        event = "admin_action",
        caller,
        method,
        target_user = target,
        outcome,
        request_id,
        peer = %peer(),
        "security event"
    );
}
