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
}
