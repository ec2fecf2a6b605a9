//! `authd.v1.AuthService` over gRPC.
use std::sync::Arc;

use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use super::timestamp;
use crate::{
    auth::{
        self, AuthError, Credentials, EmailCode, IssuedSession, PasswordReset, Registration,
        SessionView,
        input::{self, Violations},
        second_factor::{FactorCode, SecondFactorLogin, exposed},
    },
    profile::ProfileService,
    proto::authd::v1::{self as pb, auth_service_server::AuthService as AuthServiceRpc},
};

pub use crate::proto::authd::v1::auth_service_server::AuthServiceServer;

/// The `factor` oneof, alike in every request that has one.
type Factor = pb::complete_second_factor_request::Factor;

pub struct AuthGrpc {
    service: Arc<auth::AuthService>,
    /// DeleteAccount erases the profile too.
    profiles: Arc<ProfileService>,
}

impl AuthGrpc {
    pub fn new(service: Arc<auth::AuthService>, profiles: Arc<ProfileService>) -> Self {
        Self { service, profiles }
    }
}

impl From<SessionView> for pb::Session {
    fn from(view: SessionView) -> Self {
        let r = view.record;
        pb::Session {
            session_id: r.id.to_string(),
            user_id: r.user_id.to_string(),
            created_at: Some(timestamp(r.created_at)),
            expires_at: Some(timestamp(view.expires_at)),
            last_seen_at: Some(timestamp(r.last_seen_at)),
            ip_address: r.ip_address,
            user_agent: r.user_agent,
            assurance_level: assurance_level(r.aal).into(),
        }
    }
}

fn assurance_level(aal: u8) -> pb::AssuranceLevel {
    match aal {
        2 => pb::AssuranceLevel::Aal2,
        _ => pb::AssuranceLevel::Aal1,
    }
}

/// A second factor given in a request's `factor` (one of `totp_code`, `recovery_code`).
fn factor_code(v: &mut Violations, factor: Option<&Factor>) -> Option<FactorCode> {
    match factor {
        Some(Factor::TotpCode(code)) => v
            .check("totp_code", input::totp_code(code))
            .map(FactorCode::Totp),
        Some(Factor::RecoveryCode(code)) => v
            .check("recovery_code", input::recovery_code(code))
            .map(FactorCode::Recovery),
        None => v.check::<FactorCode>(
            "factor",
            Err(
                "is required: totp_code or recovery_code, a code of the account's second factor"
                    .into(),
            ),
        ),
    }
}

/// A call that presents a code of the account's second factor with its session.
fn session_factor(factor: Option<&Factor>) -> Result<FactorCode, AuthError> {
    let mut v = Violations::default();
    let code = factor_code(&mut v, factor);
    v.finish(|| code).map_err(AuthError::InvalidInput)
}

fn client_info(
    v: &mut Violations,
    client: Option<&pb::ClientInfo>,
) -> Option<auth::session::ClientInfo> {
    let client = client.cloned().unwrap_or_default();
    input::client_info(
        v,
        "client",
        &client.ip_address,
        &client.user_agent,
        &client.device_id,
    )
}

/// The end user of an account flow call: [`client_info`], with the address required (the
/// per-address limit counts on it; without one, every caller would share one bucket).
pub(super) fn end_user(
    v: &mut Violations,
    client: Option<&pb::ClientInfo>,
) -> Option<auth::session::ClientInfo> {
    if client.is_none_or(|c| c.ip_address.is_empty()) {
        v.check::<()>(
            "client.ip_address",
            Err(
                "is required: the end user's address, which the per-address limit counts on".into(),
            ),
        );
    }
    client_info(v, client)
}

/// An email flow's completion: `code` and `client.ip_address` required.
fn email_code(code: &str, client: Option<&pb::ClientInfo>) -> Result<EmailCode, AuthError> {
    let mut v = Violations::default();
    let code_hash = v.check("code", input::code(code));
    let client = end_user(&mut v, client);
    v.finish(|| {
        Some(EmailCode {
            code_hash: code_hash?,
            client: client?,
        })
    })
    .map_err(AuthError::InvalidInput)
}

fn parse_registration(req: &pb::RegisterRequest) -> Result<Registration, AuthError> {
    let mut v = Violations::default();
    let email = v.check("email", input::email(&req.email));
    let password = v.check("password", input::password(&req.password));
    let display_name = v.check("display_name", input::display_name(&req.display_name));
    let client = client_info(&mut v, req.client.as_ref());
    v.finish(|| {
        Some(Registration {
            email: email?,
            password: password?,
            display_name: display_name?,
            client: client?,
        })
    })
    .map_err(AuthError::InvalidInput)
}

fn parse_credentials(req: &pb::LoginRequest) -> Result<Credentials, AuthError> {
    let mut v = Violations::default();
    let email = v.check("email", input::email(&req.email));
    let password = v.check("password", input::password(&req.password));
    let client = client_info(&mut v, req.client.as_ref());
    v.finish(|| {
        Some(Credentials {
            email: email?,
            password: password?,
            client: client?,
        })
    })
    .map_err(AuthError::InvalidInput)
}

/// A `password` that may be left empty (a recent sign-in stands for it).
fn optional_password(raw: &str) -> Result<Option<secrecy::SecretString>, AuthError> {
    if raw.is_empty() {
        return Ok(None);
    }
    input::field("password", input::password(raw).map(Some)).map_err(AuthError::InvalidInput)
}

fn split(issued: IssuedSession) -> (String, Option<pb::Session>) {
    (
        issued.token.expose_secret().to_owned(),
        Some(issued.session.into()),
    )
}

#[tonic::async_trait]
impl AuthServiceRpc for AuthGrpc {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let registration = parse_registration(request.get_ref())?;
        let (user_id, issued) = self.service.register(registration).await?;
        let (session_token, session) = split(issued);
        Ok(Response::new(pb::RegisterResponse {
            user_id: user_id.to_string(),
            session_token,
            session,
        }))
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let credentials = parse_credentials(request.get_ref())?;
        let (session_token, session) = split(self.service.login(credentials).await?);
        Ok(Response::new(pb::LoginResponse {
            session_token,
            session,
        }))
    }

    async fn validate_session(
        &self,
        request: Request<pb::ValidateSessionRequest>,
    ) -> Result<Response<pb::ValidateSessionResponse>, Status> {
        let req = request.get_ref();
        let mut v = Violations::default();
        let max_auth_age = req.max_auth_age.map(|age| {
            std::time::Duration::try_from(age)
                .map_err(|_| "must be a duration of zero or more".to_owned())
        });
        let max_auth_age = v.check("max_auth_age", max_auth_age.transpose());
        // An unknown level (a later release's) is refused, never taken for "none".
        let min_aal = match pb::AssuranceLevel::try_from(req.min_assurance_level) {
            Ok(pb::AssuranceLevel::Aal2) => Ok(2),
            Ok(_) => Ok(0),
            Err(_) => Err("must be ASSURANCE_LEVEL_AAL1 or ASSURANCE_LEVEL_AAL2".to_owned()),
        };
        let min_aal = v.check("min_assurance_level", min_aal);
        let (max_auth_age, min_aal) = v
            .finish(|| Some((max_auth_age?, min_aal?)))
            .map_err(AuthError::InvalidInput)?;
        let token = super::session_token(&request, &req.session_token)?;
        let view = self
            .service
            .validate_recent(token, max_auth_age, min_aal)
            .await?;
        let verified_at = view.record.email_verified_at;
        Ok(Response::new(pb::ValidateSessionResponse {
            assurance_level: assurance_level(view.record.aal).into(),
            authenticated_at: Some(timestamp(view.record.authenticated_at)),
            email_verified: verified_at.is_some(),
            email_verified_at: verified_at.map(timestamp),
            session: Some(view.into()),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        self.service
            .logout(super::session_token(
                &request,
                &request.get_ref().session_token,
            )?)
            .await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let list = self
            .service
            .list_sessions(super::session_token(
                &request,
                &request.get_ref().session_token,
            )?)
            .await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: list.sessions.into_iter().map(Into::into).collect(),
            current_session_id: list.current_session_id.to_string(),
        }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let mut v = Violations::default();
        let session_id = v.check("session_id", input::uuid(&req.session_id));
        let session_id = v.finish(|| session_id).map_err(AuthError::InvalidInput)?;
        self.service.revoke_session(token, session_id).await?;
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }

    async fn revoke_all_sessions(
        &self,
        request: Request<pb::RevokeAllSessionsRequest>,
    ) -> Result<Response<pb::RevokeAllSessionsResponse>, Status> {
        let req = request.get_ref();
        let revoked = self
            .service
            .revoke_all_sessions(
                super::session_token(&request, &req.session_token)?,
                req.include_current,
            )
            .await?;
        Ok(Response::new(pb::RevokeAllSessionsResponse {
            revoked_count: count(revoked),
        }))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let mut v = Violations::default();
        let current = v.check("current_password", input::password(&req.current_password));
        let new = v.check("new_password", input::password(&req.new_password));
        let (current, new) = v
            .finish(|| Some((current?, new?)))
            .map_err(AuthError::InvalidInput)?;
        let revoked = self.service.change_password(token, current, new).await?;
        Ok(Response::new(pb::ChangePasswordResponse {
            revoked_count: count(revoked),
        }))
    }

    async fn complete_password_reset(
        &self,
        request: Request<pb::CompletePasswordResetRequest>,
    ) -> Result<Response<pb::CompletePasswordResetResponse>, Status> {
        let req = request.get_ref();
        let mut v = Violations::default();
        let code_hash = v.check("code", input::code(&req.code));
        let new_password = v.check("new_password", input::password(&req.new_password));
        let client = end_user(&mut v, req.client.as_ref());
        let reset = v
            .finish(|| {
                Some(PasswordReset {
                    code_hash: code_hash?,
                    new_password: new_password?,
                    client: client?,
                })
            })
            .map_err(AuthError::InvalidInput)?;
        let revoked = self.service.complete_password_reset(reset).await?;
        Ok(Response::new(pb::CompletePasswordResetResponse {
            revoked_count: count(revoked),
        }))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let password = optional_password(&req.password)?;
        let revoked = self.profiles.delete_account(token, password).await?;
        Ok(Response::new(pb::DeleteAccountResponse {
            revoked_count: count(revoked),
        }))
    }

    async fn verify_email(
        &self,
        request: Request<pb::VerifyEmailRequest>,
    ) -> Result<Response<pb::VerifyEmailResponse>, Status> {
        let req = request.get_ref();
        let code = email_code(&req.code, req.client.as_ref())?;
        let done = self.profiles.verify_email(code).await?;
        Ok(Response::new(pb::VerifyEmailResponse {
            user_id: done.user_id.to_string(),
            email: done.email,
            email_verified_at: Some(timestamp(done.email_verified_at)),
        }))
    }

    async fn confirm_email_change(
        &self,
        request: Request<pb::ConfirmEmailChangeRequest>,
    ) -> Result<Response<pb::ConfirmEmailChangeResponse>, Status> {
        let req = request.get_ref();
        let code = email_code(&req.code, req.client.as_ref())?;
        let done = self.profiles.confirm_email_change(code).await?;
        Ok(Response::new(pb::ConfirmEmailChangeResponse {
            user_id: done.user_id.to_string(),
            email: done.email,
            email_verified_at: Some(timestamp(done.email_verified_at)),
        }))
    }

    async fn enroll_totp(
        &self,
        request: Request<pb::EnrollTotpRequest>,
    ) -> Result<Response<pb::EnrollTotpResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let password = input::field("password", input::password(&req.password))
            .map_err(AuthError::InvalidInput)?;
        let enrolment = self.service.enroll_totp(token, password).await?;
        Ok(Response::new(pb::EnrollTotpResponse {
            secret: enrolment.secret.expose_secret().to_owned(),
            otpauth_uri: enrolment.uri.expose_secret().to_owned(),
        }))
    }

    async fn confirm_totp(
        &self,
        request: Request<pb::ConfirmTotpRequest>,
    ) -> Result<Response<pb::ConfirmTotpResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let code =
            input::field("code", input::totp_code(&req.code)).map_err(AuthError::InvalidInput)?;
        let codes = self.service.confirm_totp(token, &code).await?;
        Ok(Response::new(pb::ConfirmTotpResponse {
            recovery_codes: exposed(&codes),
        }))
    }

    async fn complete_second_factor(
        &self,
        request: Request<pb::CompleteSecondFactorRequest>,
    ) -> Result<Response<pb::CompleteSecondFactorResponse>, Status> {
        let req = request.get_ref();
        let mut v = Violations::default();
        let challenge_hash = v.check("challenge", input::code(&req.challenge));
        let code = factor_code(&mut v, req.factor.as_ref());
        let client = client_info(&mut v, req.client.as_ref());
        let login = v
            .finish(|| {
                Some(SecondFactorLogin {
                    challenge_hash: challenge_hash?,
                    code: code?,
                    client: client?,
                })
            })
            .map_err(AuthError::InvalidInput)?;
        let (session_token, session) = split(self.service.complete_second_factor(login).await?);
        Ok(Response::new(pb::CompleteSecondFactorResponse {
            session_token,
            session,
        }))
    }

    async fn remove_totp(
        &self,
        request: Request<pb::RemoveTotpRequest>,
    ) -> Result<Response<pb::RemoveTotpResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let factor = req.factor.clone().map(|f| match f {
            pb::remove_totp_request::Factor::TotpCode(c) => Factor::TotpCode(c),
            pb::remove_totp_request::Factor::RecoveryCode(c) => Factor::RecoveryCode(c),
        });
        let code = session_factor(factor.as_ref())?;
        self.service.remove_totp(token, code).await?;
        Ok(Response::new(pb::RemoveTotpResponse {}))
    }

    async fn regenerate_recovery_codes(
        &self,
        request: Request<pb::RegenerateRecoveryCodesRequest>,
    ) -> Result<Response<pb::RegenerateRecoveryCodesResponse>, Status> {
        use pb::regenerate_recovery_codes_request::Factor as Given;
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        let factor = req.factor.clone().map(|f| match f {
            Given::TotpCode(c) => Factor::TotpCode(c),
            Given::RecoveryCode(c) => Factor::RecoveryCode(c),
        });
        let code = session_factor(factor.as_ref())?;
        let codes = self.service.regenerate_recovery_codes(token, code).await?;
        Ok(Response::new(pb::RegenerateRecoveryCodesResponse {
            recovery_codes: exposed(&codes),
        }))
    }

    async fn issue_jwt(
        &self,
        request: Request<pb::IssueJwtRequest>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        let req = request.get_ref();
        let token = super::session_token(&request, &req.session_token)?;
        // A negative duration is out of range like a zero one.
        let ttl = req
            .ttl
            .map(|ttl| std::time::Duration::try_from(ttl).unwrap_or_default());
        let minted = self.service.issue_jwt(token, &req.audience, ttl).await?;
        Ok(Response::new(pb::IssueJwtResponse {
            jwt: minted.jwt,
            expires_at: Some(timestamp(minted.expires_at)),
        }))
    }

    async fn get_jwks(
        &self,
        _request: Request<pb::GetJwksRequest>,
    ) -> Result<Response<pb::GetJwksResponse>, Status> {
        let jwks = self.service.jwks()?;
        Ok(Response::new(pb::GetJwksResponse {
            keys: jwks.keys.iter().map(json_web_key).collect(),
        }))
    }
}

/// A JWK as the proto carries it: its members by name.
fn json_web_key(jwk: &jsonwebtoken::jwk::Jwk) -> pb::JsonWebKey {
    let value = serde_json::to_value(jwk).unwrap_or_default();
    let member = |name: &str| {
        value
            .get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    pb::JsonWebKey {
        kty: member("kty"),
        crv: member("crv"),
        x: member("x"),
        y: member("y"),
        kid: member("kid"),
        alg: member("alg"),
        r#use: member("use"),
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
