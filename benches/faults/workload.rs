//! Concurrent clients: each loops over a random mix of operations (mostly validations) against a
//! random instance, and records every one in the history with what it covered or saw.
use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use authd::proto::authd::v1::{
    self as pb, account_service_client::AccountServiceClient,
    admin_service_client::AdminServiceClient, auth_service_client::AuthServiceClient,
    profile_service_client::ProfileServiceClient,
};
use authd_client::Validator;
use tonic::{Code, Request, Status, transport::Channel};

use crate::{
    history::{History, Kind, Op},
    revoking::{Revoking, revoke},
};

pub const PASSWORDS: [&str; 2] = ["correct horse battery staple", "another fine passphrase"];

/// What the clients believe about one account.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: String,
    pub email: String,
    /// Index into [`PASSWORDS`] believed current (a ChangePassword without an answer leaves it
    /// unknown: logins then try both).
    pub password: usize,
    /// Sessions (id, token) and when their creation returned.
    pub sessions: Vec<(String, String, u64)>,
    pub disabled: bool,
    /// Deleted (an acknowledged DeleteUser): the clients leave it alone.
    pub deleted: bool,
}

/// A caller validating in its own memory: an `authd-client` Validator following an instance.
pub struct Local {
    pub validator: Validator,
    pub instance: usize,
    /// `strict` or `bounded`.
    pub mode: &'static str,
}

pub struct Shared {
    pub channels: Vec<Channel>,
    /// Callers validating in their own memory (some validations and profile reads go to them).
    pub locals: Vec<Local>,
    pub accounts: Vec<Mutex<Account>>,
    /// Accounts only ever guessed at (wrong passwords).
    pub targets: Vec<String>,
    pub history: History,
    pub t0: Instant,
    pub admin_key: String,
}

impl Shared {
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.t0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// A revocation of `covers` returned OK: `user`'s clients no longer use those sessions.
    pub(crate) fn forget(&self, user: usize, covers: &[String]) {
        self.accounts[user]
            .lock()
            .unwrap()
            .sessions
            .retain(|s| !covers.contains(&s.0));
    }
}

pub(crate) fn outcome<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "Ok".into(),
        // tonic reports transport failures as Unavailable/Unknown with a source; keep the code.
        Err(status) if status.code() == Code::Unknown && status.message().contains("transport") => {
            "Transport".into()
        }
        // A call sent on a connection the server had already sent GOAWAY on (its graceful
        // shutdown): h2 fails the stream with NO_ERROR, and tonic's client turns the hyper error
        // into INTERNAL "h2 protocol error: http2 error" (the reason is not kept). authd never
        // answers INTERNAL with that text (its own INTERNAL says "internal error"): the code is
        // the client library's, a transport failure, so it counts as no answer — excused only
        // while the instance stops or PostgreSQL is faulted, like a refused connection.
        Err(status)
            if status.code() == Code::Internal
                && status.message().starts_with("h2 protocol error") =>
        {
            "Transport".into()
        }
        Err(status) => format!("{:?}", status.code()),
    }
}

/// The end user of account `user`, at an address of their own (the account flows require one).
pub(crate) fn end_user(user: usize) -> Option<pb::ClientInfo> {
    Some(pb::ClientInfo {
        ip_address: format!("10.{}.{}.1", user / 256 % 256, user % 256),
        ..Default::default()
    })
}

pub(crate) fn keyed<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {key}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// One client's loop until `deadline`.
pub async fn client(shared: Arc<Shared>, seed: u64, deadline: Instant) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while Instant::now() < deadline {
        let instance = rng.usize(..shared.channels.len());
        let roll = rng.u32(..1000);
        let user = rng.usize(..shared.accounts.len());
        step(&shared, &mut rng, instance, roll, user).await;
    }
}

async fn step(shared: &Shared, rng: &mut fastrand::Rng, instance: usize, roll: u32, user: usize) {
    let channel = shared.channels[instance].clone();
    let mut auth = AuthServiceClient::new(channel.clone());
    let mut profiles = ProfileServiceClient::new(channel.clone());
    let mut admin = AdminServiceClient::new(channel);
    let account = shared.accounts[user].lock().unwrap().clone();
    if account.deleted {
        return;
    }
    let pick = |rng: &mut fastrand::Rng| {
        (!account.sessions.is_empty())
            .then(|| account.sessions[rng.usize(..account.sessions.len())].clone())
    };
    let start = shared.now_us();
    let mut op = Op {
        id: 0,
        kind: Kind::Validate,
        instance,
        start_us: start,
        end_us: 0,
        outcome: String::new(),
        user,
        session: None,
        covers: Vec::new(),
        versions: Vec::new(),
        created_user: None,
        local: None,
    };
    // A fifth of the validations and profile reads go to a caller validating in its memory.
    let readable = matches!(roll, 0..=599 | 770..=879);
    let local = (readable && roll.is_multiple_of(5) && !shared.locals.is_empty())
        .then(|| &shared.locals[rng.usize(..shared.locals.len())]);
    if let Some(local) = local {
        op.instance = local.instance;
        op.local = Some(local.mode);
    }
    // Sessions covered by a revocation of all of the user's sessions: those whose creation
    // returned before it started.
    let all_before = |skip: Option<&str>| -> Vec<String> {
        account
            .sessions
            .iter()
            .filter(|(id, _, created)| *created < start && Some(id.as_str()) != skip)
            .map(|(id, _, _)| id.clone())
            .collect()
    };
    match roll {
        // Validations: most of the traffic.
        0..=599 => {
            let Some((id, token, _)) = pick(rng) else {
                return;
            };
            op.session = Some(id);
            op.outcome = match local {
                Some(local) => outcome(&local.validator.validate(&token).await),
                None => outcome(
                    &auth
                        .validate_session(pb::ValidateSessionRequest {
                            session_token: token,
                            ..Default::default()
                        })
                        .await,
                ),
            };
        }
        600..=659 => {
            op.kind = Kind::Login;
            let tries = if account.password < PASSWORDS.len() {
                vec![account.password]
            } else {
                vec![0, 1]
            };
            let mut result = Err(Status::unknown("not tried"));
            for p in tries {
                result = auth
                    .login(pb::LoginRequest {
                        email: account.email.clone(),
                        password: PASSWORDS[p].into(),
                        client: None,
                    })
                    .await;
                if result.is_ok() {
                    shared.accounts[user].lock().unwrap().password = p;
                    break;
                }
            }
            op.outcome = outcome(&result);
            if let Ok(response) = result {
                let r = response.into_inner();
                let id = r.session.map(|s| s.session_id).unwrap_or_default();
                op.session = Some(id.clone());
                let end = shared.now_us();
                let mut a = shared.accounts[user].lock().unwrap();
                a.sessions.push((id, r.session_token, end));
                // Keep the believed set small: older ones are still validated by the checker's
                // history, not by the clients.
                if a.sessions.len() > 8 {
                    a.sessions.remove(0);
                }
            }
        }
        660..=699 => {
            op.kind = Kind::WrongLogin;
            op.user = 10_000 + rng.usize(..shared.targets.len());
            let email = shared.targets[op.user - 10_000].clone();
            let result = auth
                .login(pb::LoginRequest {
                    email,
                    password: "definitely not it".into(),
                    client: None,
                })
                .await;
            op.outcome = outcome(&result);
        }
        720..=729 => {
            // One of the user's sessions revoked with another's token (or its own).
            op.kind = Kind::RevokeSession;
            let (Some((id, token, _)), Some((target, _, _))) = (pick(rng), pick(rng)) else {
                return;
            };
            op.session = Some(id);
            let call = Revoking::Session {
                token,
                target: target.clone(),
            };
            return revoke(shared, rng, op, call, vec![target]).await;
        }
        700..=719 => {
            op.kind = Kind::Logout;
            let Some((id, token, _)) = pick(rng) else {
                return;
            };
            op.session = Some(id.clone());
            return revoke(shared, rng, op, Revoking::Logout { token }, vec![id]).await;
        }
        730..=744 => {
            op.kind = Kind::RevokeAll;
            let Some((id, token, _)) = pick(rng) else {
                return;
            };
            op.session = Some(id);
            let covers = all_before(None);
            return revoke(shared, rng, op, Revoking::All { token }, covers).await;
        }
        750..=754 => {
            // The notifier starts a reset, the user completes it: every session of the account
            // that existed before is covered.
            op.kind = Kind::PasswordReset;
            let next = match account.password {
                p if p < PASSWORDS.len() => 1 - p,
                _ => rng.usize(..PASSWORDS.len()),
            };
            let channel = shared.channels[instance].clone();
            let request = pb::StartPasswordResetRequest {
                email: account.email.clone(),
                client: end_user(user),
            };
            let started = AccountServiceClient::new(channel)
                .start_password_reset(keyed(&shared.admin_key, request))
                .await;
            let code = match started {
                Ok(response) => response.into_inner().code,
                Err(status) => {
                    op.outcome = outcome::<()>(&Err(status));
                    op.end_us = shared.now_us();
                    shared.history.record(op);
                    return;
                }
            };
            let covers = all_before(None);
            let call = Revoking::Reset {
                code,
                password: next,
                user,
            };
            return revoke(shared, rng, op, call, covers).await;
        }
        745..=749 => {
            op.kind = Kind::ChangePassword;
            let Some((id, token, _)) = pick(rng) else {
                return;
            };
            if account.password >= PASSWORDS.len() {
                return;
            }
            op.session = Some(id.clone());
            let covers = all_before(Some(&id));
            let next = 1 - account.password;
            let result = auth
                .change_password(pb::ChangePasswordRequest {
                    session_token: token,
                    current_password: PASSWORDS[account.password].into(),
                    new_password: PASSWORDS[next].into(),
                })
                .await;
            op.outcome = outcome(&result);
            let mut a = shared.accounts[user].lock().unwrap();
            match &result {
                Ok(_) => {
                    op.covers = covers.clone();
                    a.password = next;
                    a.sessions.retain(|s| !covers.contains(&s.0));
                }
                // No answer: the password may or may not have changed.
                Err(status)
                    if !matches!(
                        status.code(),
                        Code::Unauthenticated | Code::InvalidArgument | Code::ResourceExhausted
                    ) =>
                {
                    a.password = PASSWORDS.len();
                }
                Err(_) => {}
            }
        }
        755..=769 => {
            op.kind = Kind::ListSessions;
            let Some((id, token, _)) = pick(rng) else {
                return;
            };
            op.session = Some(id);
            let result = auth
                .list_sessions(pb::ListSessionsRequest {
                    session_token: token,
                })
                .await;
            op.outcome = outcome(&result);
        }
        770..=879 => {
            op.kind = Kind::GetProfile;
            // The version read.
            let result = match local {
                Some(local) => local
                    .validator
                    .profile(&account.user_id)
                    .await
                    .map(|p| p.version),
                None => profiles
                    .get_profile(pb::GetProfileRequest {
                        user_id: account.user_id.clone(),
                    })
                    .await
                    .and_then(|r| {
                        r.into_inner()
                            .profile
                            .map(|p| p.version)
                            .ok_or_else(|| Status::internal("no profile in the answer"))
                    }),
            };
            op.outcome = outcome(&result);
            if let Ok(version) = result {
                op.versions = vec![(user, version)];
            }
        }
        880..=909 => {
            op.kind = Kind::BatchGetProfiles;
            let others: Vec<usize> = (0..4).map(|_| rng.usize(..shared.accounts.len())).collect();
            let mut ids: Vec<(usize, String)> = others
                .into_iter()
                .map(|u| (u, shared.accounts[u].lock().unwrap().user_id.clone()))
                .collect();
            ids.sort_by(|a, b| a.1.cmp(&b.1));
            ids.dedup_by(|a, b| a.1 == b.1);
            let result = profiles
                .batch_get_profiles(pb::BatchGetProfilesRequest {
                    user_ids: ids.iter().map(|(_, id)| id.clone()).collect(),
                })
                .await;
            op.outcome = outcome(&result);
            if let Ok(response) = result {
                for p in response.into_inner().profiles {
                    if let Some((u, _)) = ids.iter().find(|(_, id)| *id == p.user_id) {
                        op.versions.push((*u, p.version));
                    }
                }
            }
        }
        910..=969 => {
            op.kind = Kind::UpdateProfile;
            let Some((id, token, _)) = pick(rng) else {
                return;
            };
            op.session = Some(id);
            let result = profiles
                .update_profile(pb::UpdateProfileRequest {
                    session_token: token,
                    profile: Some(pb::Profile {
                        bio: format!("bio {}", rng.u32(..1_000_000)),
                        ..pb::Profile::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["bio".into()],
                    }),
                    expected_version: 0,
                })
                .await;
            op.outcome = outcome(&result);
            if let Ok(response) = result
                && let Some(p) = response.into_inner().profile
            {
                op.versions = vec![(user, p.version)];
            }
        }
        // A few accounts are deleted over a run (about one in 6,400 operations).
        975..=979 if rng.u32(..32) == 0 => {
            op.kind = Kind::DeleteUser;
            let covers = all_before(None);
            let call = Revoking::Delete {
                user_id: account.user_id.clone(),
            };
            return revoke(shared, rng, op, call, covers).await;
        }
        970..=979 => {
            op.kind = Kind::AdminRevokeAll;
            let covers = all_before(None);
            let call = Revoking::User {
                user_id: account.user_id.clone(),
            };
            return revoke(shared, rng, op, call, covers).await;
        }
        980..=989 => {
            let disable = !account.disabled;
            if disable {
                op.kind = Kind::DisableUser;
                let covers = all_before(None);
                let call = Revoking::Disable {
                    user_id: account.user_id.clone(),
                };
                return revoke(shared, rng, op, call, covers).await;
            } else {
                op.kind = Kind::EnableUser;
                let result = admin
                    .enable_user(keyed(
                        &shared.admin_key,
                        pb::EnableUserRequest {
                            user_id: account.user_id.clone(),
                        },
                    ))
                    .await;
                op.outcome = outcome(&result);
                if result.is_ok() {
                    shared.accounts[user].lock().unwrap().disabled = false;
                }
            }
        }
        _ => {
            op.kind = Kind::Register;
            let email = format!("late-{}@faults.example", uuid::Uuid::new_v4().simple());
            let result = auth
                .register(pb::RegisterRequest {
                    email,
                    password: PASSWORDS[0].into(),
                    display_name: "Late Comer".into(),
                    client: None,
                })
                .await;
            op.outcome = outcome(&result);
            if let Ok(response) = result {
                let r = response.into_inner();
                op.session = r.session.map(|s| s.session_id);
                op.created_user = Some(r.user_id);
            }
        }
    }
    op.end_us = shared.now_us();
    shared.history.record(op);
    // A little think time keeps the mix rather than the queueing in charge.
    tokio::time::sleep(Duration::from_millis(u64::from(roll % 3))).await;
}
