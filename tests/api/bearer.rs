//! The session token in `authorization: Bearer` metadata instead of the body: every call that
//! acts for a session takes it there, as standard interceptors send it.
use tonic::{Code, Request, metadata::MetadataValue};

use crate::helpers::{Mode, PASSWORD, assert_code, spawn_app, violation_fields};
use authd::proto::authd::v1 as pb;

/// `message` with `authorization: <value>`.
fn with_authorization<T>(message: T, value: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", MetadataValue::try_from(value).unwrap());
    request
}

fn bearer<T>(message: T, token: &str) -> Request<T> {
    with_authorization(message, &format!("Bearer {token}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_call_takes_the_token_from_bearer_metadata() {
    let app = spawn_app(Mode::Redis).await;
    let (email, reg) = app.register().await;
    let token = &reg.session_token;
    let mut auth = app.auth.clone();

    let validated = auth
        .validate_session(bearer(pb::ValidateSessionRequest::default(), token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.session.unwrap().user_id, reg.user_id);
    // The scheme in any case (RFC 7235), and the body too when it is the same token.
    auth.validate_session(with_authorization(
        pb::ValidateSessionRequest {
            session_token: token.clone(),
            ..Default::default()
        },
        &format!("bearer {token}"),
    ))
    .await
    .unwrap();

    let listed = auth
        .list_sessions(bearer(pb::ListSessionsRequest::default(), token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);

    let updated = app
        .profiles
        .clone()
        .update_profile(bearer(
            pb::UpdateProfileRequest {
                profile: Some(pb::Profile {
                    display_name: "Metadata".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["display_name".into()],
                }),
                ..Default::default()
            },
            token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.profile.unwrap().display_name, "Metadata");

    let new_password = "a much better passphrase";
    auth.change_password(bearer(
        pb::ChangePasswordRequest {
            current_password: PASSWORD.into(),
            new_password: new_password.into(),
            ..Default::default()
        },
        token,
    ))
    .await
    .unwrap();

    let other = app.login(&email, new_password).await.unwrap();
    auth.revoke_session(bearer(
        pb::RevokeSessionRequest {
            session_id: other.session.unwrap().session_id,
            ..Default::default()
        },
        token,
    ))
    .await
    .unwrap();
    assert_code(
        app.validate(&other.session_token).await,
        Code::Unauthenticated,
    );

    let third = app.login(&email, new_password).await.unwrap();
    let revoked = auth
        .revoke_all_sessions(bearer(pb::RevokeAllSessionsRequest::default(), token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.revoked_count, 1);
    assert_code(
        app.validate(&third.session_token).await,
        Code::Unauthenticated,
    );

    auth.logout(bearer(pb::LogoutRequest::default(), token))
        .await
        .unwrap();
    // Revoked: the metadata's token is refused like the body's.
    assert_code(
        auth.validate_session(bearer(pb::ValidateSessionRequest::default(), token))
            .await,
        Code::Unauthenticated,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_interceptor_authenticates_every_call() {
    let app = spawn_app(Mode::Redis).await;
    let (_, reg) = app.register().await;
    let value: MetadataValue<_> = format!("Bearer {}", reg.session_token).parse().unwrap();
    let mut auth = pb::auth_service_client::AuthServiceClient::with_interceptor(
        app.channel.clone(),
        move |mut request: Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
            Ok(request)
        },
    );
    let response = auth
        .validate_session(pb::ValidateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.session.unwrap().user_id, reg.user_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_metadata_and_another_in_the_body_is_invalid_argument() {
    let app = spawn_app(Mode::Redis).await;
    let (_, first) = app.register().await;
    let (_, second) = app.register().await;
    let mut auth = app.auth.clone();

    let status = assert_code(
        auth.validate_session(bearer(
            pb::ValidateSessionRequest {
                session_token: second.session_token.clone(),
                ..Default::default()
            },
            &first.session_token,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["session_token"]);
    let status = assert_code(
        auth.logout(bearer(
            pb::LogoutRequest {
                session_token: second.session_token.clone(),
            },
            &first.session_token,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["session_token"]);
    // Neither session was ended by the refused Logout.
    app.validate(&first.session_token).await.unwrap();
    app.validate(&second.session_token).await.unwrap();

    // Metadata that is not a bearer token names `authorization`.
    for value in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer  ",
        first.session_token.as_str(),
    ] {
        let status = assert_code(
            auth.validate_session(with_authorization(
                pb::ValidateSessionRequest {
                    session_token: first.session_token.clone(),
                    ..Default::default()
                },
                value,
            ))
            .await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), ["authorization"], "{value:?}");
    }
}
