//! `authd.v1.AccountService` over gRPC: the notifier's admission (as AdminService's, from lists
//! of its own, `ACCOUNTS__*`), then the flow's start (see `crate::auth::recovery`).
use std::sync::Arc;

use secrecy::ExposeSecret;
use tonic::{Request, Response, Status};

use super::{auth::end_user, timestamp};
use crate::{
    admin::{Access, Admission},
    auth::{
        AuthError, AuthService,
        input::{self, Violations},
    },
    proto::authd::v1::{self as pb, account_service_server::AccountService as AccountServiceRpc},
};

pub use crate::proto::authd::v1::account_service_server::AccountServiceServer;

pub struct AccountGrpc {
    service: Arc<AuthService>,
    notifiers: Arc<Access>,
}

impl AccountGrpc {
    pub fn new(service: Arc<AuthService>, notifiers: Arc<Access>) -> Self {
        Self { service, notifiers }
    }

    /// The notifier's admission, before anything else is read.
    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        match super::admission(&self.notifiers, request) {
            Admission::Admitted { .. } => Ok(()),
            Admission::Unauthenticated => Err(Status::unauthenticated(
                "AccountService needs a client certificate or `authorization: Bearer <key>`",
            )),
            Admission::Denied { caller } => {
                tracing::warn!(caller, "account flow refused: not a notifier");
                Err(Status::permission_denied(
                    "this caller may not start account flows",
                ))
            }
        }
    }
}

#[tonic::async_trait]
impl AccountServiceRpc for AccountGrpc {
    async fn start_password_reset(
        &self,
        request: Request<pb::StartPasswordResetRequest>,
    ) -> Result<Response<pb::StartPasswordResetResponse>, Status> {
        self.admit(&request)?;
        let req = request.get_ref();
        let mut v = Violations::default();
        let email = v.check("email", input::email(&req.email));
        let client = end_user(&mut v, req.client.as_ref());
        let (email, client) = v
            .finish(|| Some((email?, client?)))
            .map_err(AuthError::InvalidInput)?;
        let issued = self.service.start_password_reset(&email, &client).await?;
        Ok(Response::new(pb::StartPasswordResetResponse {
            code: issued.code.expose_secret().to_owned(),
            expires_at: Some(timestamp(issued.expires_at)),
        }))
    }

    async fn start_email_verification(
        &self,
        request: Request<pb::StartEmailVerificationRequest>,
    ) -> Result<Response<pb::StartEmailVerificationResponse>, Status> {
        self.admit(&request)?;
        let req = request.get_ref();
        let mut v = Violations::default();
        let user_id = v.check("user_id", input::uuid(&req.user_id));
        let client = end_user(&mut v, req.client.as_ref());
        let (user_id, client) = v
            .finish(|| Some((user_id?, client?)))
            .map_err(AuthError::InvalidInput)?;
        let (issued, email) = self
            .service
            .start_email_verification(user_id, &client)
            .await?;
        Ok(Response::new(pb::StartEmailVerificationResponse {
            code: issued.code.expose_secret().to_owned(),
            expires_at: Some(timestamp(issued.expires_at)),
            email,
        }))
    }

    async fn start_email_change(
        &self,
        request: Request<pb::StartEmailChangeRequest>,
    ) -> Result<Response<pb::StartEmailChangeResponse>, Status> {
        self.admit(&request)?;
        let req = request.get_ref();
        let mut v = Violations::default();
        let new_email = v.check("new_email", input::email(&req.new_email));
        let password = match req.password.is_empty() {
            true => Some(None),
            false => v
                .check("password", input::password(&req.password))
                .map(Some),
        };
        // In the body only: the authorization metadata carries the notifier's key.
        if req.session_token.is_empty() {
            v.check::<()>(
                "session_token",
                Err("is required: the account owner's session".into()),
            );
        }
        let client = end_user(&mut v, req.client.as_ref());
        let (new_email, password, client) = v
            .finish(|| Some((new_email?, password?, client?)))
            .map_err(AuthError::InvalidInput)?;
        let started = self
            .service
            .start_email_change(&req.session_token, &new_email, password, &client)
            .await?;
        Ok(Response::new(pb::StartEmailChangeResponse {
            code: started.issued.code.expose_secret().to_owned(),
            expires_at: Some(timestamp(started.issued.expires_at)),
            new_email: started.new_email,
            current_email: started.current_email,
        }))
    }
}
