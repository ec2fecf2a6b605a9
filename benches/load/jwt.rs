//! `issue_jwt`: IssueJwt on an instance with the in-process cache, warm (the session comes from
//! memory: what is measured is the JWT's making and its signature).
use std::sync::Arc;

use authd::proto::authd::v1::{self as pb, auth_service_client::AuthServiceClient};
use tonic::transport::Channel;

use crate::{
    driver::{self, Load, Pace},
    report::Row,
    scenarios::measure,
    setup::{Env, JWT_AUDIENCE, Server},
};

/// An IssueJwt of each user's token in turn (the audience the bench's settings allow).
fn issue_jwt_call(tokens: Arc<Vec<String>>) -> impl driver::Call {
    move |ch: Channel, seq| {
        let token = tokens[seq as usize % tokens.len()].clone();
        async move {
            AuthServiceClient::new(ch)
                .issue_jwt(pb::IssueJwtRequest {
                    session_token: token,
                    audience: JWT_AUDIENCE.into(),
                    ttl: None,
                })
                .await
                .map(|_| ())
        }
    }
}

pub async fn issue_jwt(env: &Env, server: &Server, load: Load) -> anyhow::Result<Row> {
    let tokens: Arc<Vec<String>> = Arc::new(env.users.iter().map(|u| u.token.clone()).collect());
    let call = issue_jwt_call(tokens);
    let (row, _) = measure(env, server, "issue_jwt", load, Pace::Closed, &[], call).await?;
    Ok(row)
}
