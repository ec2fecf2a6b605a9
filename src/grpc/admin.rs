//! `authd.v1.AdminService` over gRPC: admission (client certificate SAN or bearer key), input
//! validation, and one audit record per call — admitted or refused — with its outcome.
use std::{future::Future, panic::AssertUnwindSafe, sync::Arc};

use futures::FutureExt;
use secrecy::ExposeSecret;

use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{observe::RequestId, timestamp};
use crate::{
    admin::{AdminService, Admission},
    auth::{
        AuthError,
        input::{self, Violations},
    },
    profile::ProfileService,
    proto::authd::v1::{self as pb, admin_service_server::AdminService as AdminServiceRpc},
    store::{AdminUser, AuditEntry, UserLookup},
};

pub use crate::proto::authd::v1::admin_service_server::AdminServiceServer;

/// Listing page sizes: the default, and the largest.
const PAGE_DEFAULT: i32 = 50;
const PAGE_MAX: i32 = 100;
/// Longest DisableUser reason, in characters.
const REASON_MAX_CHARS: usize = 500;
/// Longest target recorded in the audit (what the caller named, bounded): room for `email:` and
/// the longest email (254 characters of up to 4 bytes), which a deletion finds whole.
const TARGET_MAX_BYTES: usize = 1024;

pub struct AdminGrpc {
    service: Arc<AdminService>,
    /// DeleteUser erases the profile too.
    profiles: Arc<ProfileService>,
}

impl AdminGrpc {
    pub fn new(service: Arc<AdminService>, profiles: Arc<ProfileService>) -> Self {
        Self { service, profiles }
    }

    /// Admits the caller, runs `action` when admitted, and audits the call either way. Action
    /// and audit run in a task of their own, which shutdown waits for: a caller that hangs up
    /// (or whose deadline passes) cancels neither, so nothing is done without its audit record.
    /// The answer waits for the row until just before the call's deadline.
    async fn call<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        target: impl FnOnce(&Req) -> String,
        action: F,
    ) -> Result<Response<Resp>, Status>
    where
        Req: Send + 'static,
        Resp: Send + 'static,
        F: FnOnce(Arc<AdminService>, Req) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_default();
        let admission = super::admission(&self.service.access, &request);
        let req = request.into_inner();
        let mut target = target(&req);
        if target.len() > TARGET_MAX_BYTES {
            let mut end = TARGET_MAX_BYTES;
            while !target.is_char_boundary(end) {
                end -= 1;
            }
            target.truncate(end);
        }
        let service = self.service.clone();
        let (answer, answered) = tokio::sync::oneshot::channel();
        let call = async move {
            let (caller, admitted, result) = match admission {
                Admission::Admitted { caller } => {
                    // A panicking action is still audited (as INTERNAL).
                    let acted = AssertUnwindSafe(action(service.clone(), req))
                        .catch_unwind()
                        .await;
                    let result = acted.unwrap_or_else(|_| {
                        tracing::error!(method, "admin action panicked");
                        Err(Status::internal("internal error"))
                    });
                    (caller, true, result)
                }
                Admission::Unauthenticated => (
                    "anonymous".to_owned(),
                    false,
                    Err(Status::unauthenticated(
                        "AdminService needs a client certificate or `authorization: Bearer <key>`",
                    )),
                ),
                Admission::Denied { caller } => (
                    caller,
                    false,
                    Err(Status::permission_denied(
                        "this caller may not use AdminService",
                    )),
                ),
            };
            let outcome = match &result {
                Ok(_) => tonic::Code::Ok,
                Err(status) => status.code(),
            };
            let outcome = format!("{outcome:?}");
            let entry = AuditEntry {
                caller: &caller,
                method,
                target: &target,
                outcome: &outcome,
                request_id: &request_id,
                count: 1,
            };
            let _ = answer.send(result);
            service.audit(entry, admitted).await;
        };
        let task = self
            .service
            .tasks
            // In the call's span: its spans and events are the call's (logs and traces).
            .spawn(crate::store::carry(crate::clock::carry_deadline(call)).in_current_span());
        let Ok(result) = answered.await else {
            tracing::error!(method, "admin call task failed");
            return Err(Status::internal("internal error"));
        };
        // The answer waits for the audit row, unless that would outlast the call's deadline
        // (a committed action is never cut off: the row is still written, by the task).
        match crate::clock::answer_by() {
            Some(by) => {
                if tokio::time::timeout_at(by.into(), task).await.is_err() {
                    tracing::warn!(
                        method,
                        "answering before the audit row is written (the call's deadline is near)"
                    );
                }
            }
            None => {
                let _ = task.await;
            }
        }
        result.map(Response::new)
    }
}

fn user(u: AdminUser) -> pb::User {
    pb::User {
        user_id: u.id.to_string(),
        email: u.email,
        display_name: u.display_name,
        created_at: Some(timestamp(u.created_at)),
        disabled: u.disabled_at.is_some(),
        disabled_at: u.disabled_at.map(timestamp),
        disabled_reason: u.disabled_reason,
        active_session_count: i32::try_from(u.active_sessions).unwrap_or(i32::MAX),
        last_login_at: u.last_login_at.map(timestamp),
        password_change_required: u.password_change_required,
        email_verified: u.email_verified_at.is_some(),
        email_verified_at: u.email_verified_at.map(timestamp),
        second_factor: u.second_factor,
        recovery_codes_left: i32::try_from(u.recovery_codes_left).unwrap_or(i32::MAX),
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The one user id field of a request.
fn user_id(raw: &str) -> Result<uuid::Uuid, Status> {
    Ok(input::field("user_id", input::uuid(raw)).map_err(AuthError::InvalidInput)?)
}

fn invalid(field: &str, description: &str) -> Status {
    AuthError::InvalidInput(vec![input::FieldViolation {
        field: field.to_owned(),
        description: description.to_owned(),
    }])
    .into()
}

#[tonic::async_trait]
impl AdminServiceRpc for AdminGrpc {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::GetUserResponse>, Status> {
        use pb::get_user_request::Lookup;
        let target = |req: &pb::GetUserRequest| match &req.lookup {
            Some(Lookup::UserId(id)) => id.clone(),
            // As Login compares it, so that a deletion finds every row naming the account.
            Some(Lookup::Email(email)) => match input::email(email) {
                Ok(parsed) => format!("email:{}", parsed.normalized),
                Err(_) => format!("email:{email}"),
            },
            None => String::new(),
        };
        self.call("GetUser", request, target, |service, req| async move {
            let found = match req.lookup {
                Some(Lookup::UserId(raw)) => {
                    let id = user_id(&raw)?;
                    service.auth.admin_user(UserLookup::Id(id)).await?
                }
                Some(Lookup::Email(raw)) => {
                    let mut v = Violations::default();
                    let email = v.check("email", input::email(&raw));
                    let email = v.finish(|| email).map_err(AuthError::InvalidInput)?;
                    service
                        .auth
                        .admin_user(UserLookup::Email(&email.normalized))
                        .await?
                }
                None => return Err(invalid("lookup", "user_id or email is required")),
            };
            Ok(pb::GetUserResponse {
                user: Some(user(found)),
            })
        })
        .await
    }

    async fn list_user_sessions(
        &self,
        request: Request<pb::ListUserSessionsRequest>,
    ) -> Result<Response<pb::ListUserSessionsResponse>, Status> {
        let target = |req: &pb::ListUserSessionsRequest| req.user_id.clone();
        self.call(
            "ListUserSessions",
            request,
            target,
            |service, req| async move {
                let mut v = Violations::default();
                let id = v.check("user_id", input::uuid(&req.user_id));
                let size = v.check(
                    "page_size",
                    match req.page_size {
                        0 => Ok(PAGE_DEFAULT),
                        n if (1..=PAGE_MAX).contains(&n) => Ok(n),
                        _ => Err(format!("must be 0 (for {PAGE_DEFAULT}) to {PAGE_MAX}")),
                    },
                );
                let (id, size) = v
                    .finish(|| Some((id?, size?)))
                    .map_err(AuthError::InvalidInput)?;
                let tokens = service
                    .page_tokens()
                    .await
                    .map_err(|e| Status::from(AuthError::Store(e)))?;
                let after = match req.page_token.as_str() {
                    "" => None,
                    token => Some(tokens.verify(id, token).ok_or_else(|| {
                        invalid(
                            "page_token",
                            "is not a page token of this listing (take it from next_page_token)",
                        )
                    })?),
                };
                let mut page = service
                    .auth
                    .admin_sessions(id, after, i64::from(size) + 1)
                    .await?;
                let more = page.len() > usize::try_from(size).unwrap_or(usize::MAX);
                page.truncate(usize::try_from(size).unwrap_or(usize::MAX));
                let next_page_token = match page.last() {
                    Some(last) if more => tokens.sign(
                        id,
                        crate::store::SessionCursor {
                            created_at: last.record.created_at,
                            id: last.record.id,
                        },
                    ),
                    _ => String::new(),
                };
                Ok(pb::ListUserSessionsResponse {
                    sessions: page.into_iter().map(pb::Session::from).collect(),
                    next_page_token,
                })
            },
        )
        .await
    }

    async fn revoke_user_session(
        &self,
        request: Request<pb::RevokeUserSessionRequest>,
    ) -> Result<Response<pb::RevokeUserSessionResponse>, Status> {
        let target = |req: &pb::RevokeUserSessionRequest| req.user_id.clone();
        self.call(
            "RevokeUserSession",
            request,
            target,
            |service, req| async move {
                let mut v = Violations::default();
                let id = v.check("user_id", input::uuid(&req.user_id));
                let session = v.check("session_id", input::uuid(&req.session_id));
                let (id, session) = v
                    .finish(|| Some((id?, session?)))
                    .map_err(AuthError::InvalidInput)?;
                service.auth.admin_revoke_session(id, session).await?;
                Ok(pb::RevokeUserSessionResponse {})
            },
        )
        .await
    }

    async fn revoke_user_sessions(
        &self,
        request: Request<pb::RevokeUserSessionsRequest>,
    ) -> Result<Response<pb::RevokeUserSessionsResponse>, Status> {
        let target = |req: &pb::RevokeUserSessionsRequest| req.user_id.clone();
        self.call(
            "RevokeUserSessions",
            request,
            target,
            |service, req| async move {
                let id = user_id(&req.user_id)?;
                let revoked = service.auth.admin_revoke_sessions(id).await?;
                Ok(pb::RevokeUserSessionsResponse {
                    revoked_count: count(revoked),
                })
            },
        )
        .await
    }

    async fn disable_user(
        &self,
        request: Request<pb::DisableUserRequest>,
    ) -> Result<Response<pb::DisableUserResponse>, Status> {
        let target = |req: &pb::DisableUserRequest| req.user_id.clone();
        self.call("DisableUser", request, target, |service, req| async move {
            let mut v = Violations::default();
            let id = v.check("user_id", input::uuid(&req.user_id));
            let reason = v.check("reason", input::text(&req.reason, REASON_MAX_CHARS));
            let (id, reason) = v
                .finish(|| Some((id?, reason?)))
                .map_err(AuthError::InvalidInput)?;
            let revoked = service.auth.disable_user(id, &reason).await?;
            Ok(pb::DisableUserResponse {
                revoked_count: count(revoked),
            })
        })
        .await
    }

    async fn enable_user(
        &self,
        request: Request<pb::EnableUserRequest>,
    ) -> Result<Response<pb::EnableUserResponse>, Status> {
        let target = |req: &pb::EnableUserRequest| req.user_id.clone();
        self.call("EnableUser", request, target, |service, req| async move {
            let id = user_id(&req.user_id)?;
            service.auth.enable_user(id).await?;
            Ok(pb::EnableUserResponse {})
        })
        .await
    }

    async fn reset_user_password(
        &self,
        request: Request<pb::ResetUserPasswordRequest>,
    ) -> Result<Response<pb::ResetUserPasswordResponse>, Status> {
        let target = |req: &pb::ResetUserPasswordRequest| req.user_id.clone();
        self.call(
            "ResetUserPassword",
            request,
            target,
            |service, req| async move {
                let id = user_id(&req.user_id)?;
                let issued = service.auth.admin_reset_password(id).await?;
                Ok(pb::ResetUserPasswordResponse {
                    code: issued.code.expose_secret().to_owned(),
                    expires_at: Some(timestamp(issued.expires_at)),
                })
            },
        )
        .await
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let target = |req: &pb::DeleteUserRequest| req.user_id.clone();
        let profiles = self.profiles.clone();
        self.call("DeleteUser", request, target, |_, req| async move {
            let id = user_id(&req.user_id)?;
            let revoked = profiles.delete_user(id).await?;
            Ok(pb::DeleteUserResponse {
                revoked_count: count(revoked),
            })
        })
        .await
    }

    async fn require_password_change(
        &self,
        request: Request<pb::RequirePasswordChangeRequest>,
    ) -> Result<Response<pb::RequirePasswordChangeResponse>, Status> {
        let target = |req: &pb::RequirePasswordChangeRequest| req.user_id.clone();
        self.call(
            "RequirePasswordChange",
            request,
            target,
            |service, req| async move {
                let id = user_id(&req.user_id)?;
                service.auth.require_password_change(id).await?;
                Ok(pb::RequirePasswordChangeResponse {})
            },
        )
        .await
    }

    async fn remove_second_factor(
        &self,
        request: Request<pb::RemoveSecondFactorRequest>,
    ) -> Result<Response<pb::RemoveSecondFactorResponse>, Status> {
        let target = |req: &pb::RemoveSecondFactorRequest| req.user_id.clone();
        self.call(
            "RemoveSecondFactor",
            request,
            target,
            |service, req| async move {
                let id = user_id(&req.user_id)?;
                let removed = service.auth.remove_second_factor_for(id).await?;
                Ok(pb::RemoveSecondFactorResponse { removed })
            },
        )
        .await
    }
}
