use authd::proto::authd::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    both_modes,
    helpers::violation_fields,
    helpers::{Mode, PASSWORD, assert_code, register_request, spawn_app, unique_email},
};

both_modes!(
    register_creates_a_user_with_a_working_session,
    a_taken_email_is_already_exists_whatever_its_case,
    each_invalid_field_is_named_in_a_bad_request,
    password_length_is_8_to_128_characters_after_nfkc,
);

async fn register_creates_a_user_with_a_working_session(mode: Mode) {
    let app = spawn_app(mode).await;
    let (_, reg) = app.register().await;
    let user_id: uuid::Uuid = reg.user_id.parse().expect("user_id is a UUID");
    assert!(reg.session_token.starts_with("authd_"));
    let session = reg.session.expect("the new session is described");
    assert_eq!(session.user_id, user_id.to_string());
    assert_ne!(session.session_id, session.user_id);
    assert_eq!(session.ip_address, "192.0.2.10");
    assert_eq!(session.user_agent, "authd-tests/1.0");
    let created = session.created_at.unwrap();
    let expires = session.expires_at.unwrap();
    // Default idle timeout (7 days) is earlier than the absolute one (30 days).
    assert_eq!(expires.seconds - created.seconds, 7 * 24 * 3600);
    assert_eq!(session.last_seen_at, session.created_at);

    let validated = app.validate(&reg.session_token).await.unwrap();
    assert_eq!(validated, session);
}

async fn a_taken_email_is_already_exists_whatever_its_case(mode: Mode) {
    let app = spawn_app(mode).await;
    let (email, _) = app.register().await;
    let shouted = format!("  {}  ", email.to_uppercase());
    let status = assert_code(
        app.auth.clone().register(register_request(&shouted)).await,
        Code::AlreadyExists,
    );
    assert!(!status.message().contains(&email), "{status:?}");
}

async fn each_invalid_field_is_named_in_a_bad_request(mode: Mode) {
    let app = spawn_app(mode).await;
    type Mutation = fn(&mut pb::RegisterRequest);
    let cases: Vec<(&str, Mutation)> = vec![
        ("email", |r| r.email = String::new()),
        ("email", |r| r.email = "not-an-email".into()),
        ("email", |r| {
            r.email = format!("{}@example.com", "a".repeat(250))
        }),
        ("password", |r| r.password = "short".into()),
        ("password", |r| r.password = "x".repeat(129)),
        ("display_name", |r| r.display_name = "   ".into()),
        ("display_name", |r| r.display_name = "x".repeat(65)),
        ("display_name", |r| r.display_name = "bell\u{7}".into()),
        ("client.ip_address", |r| {
            r.client.as_mut().unwrap().ip_address = "999.1.1.1".into()
        }),
        ("client.user_agent", |r| {
            r.client.as_mut().unwrap().user_agent = "u".repeat(513)
        }),
    ];
    for (field, mutate) in cases {
        let mut request = register_request(&unique_email());
        mutate(&mut request);
        let status = assert_code(
            app.auth.clone().register(request).await,
            Code::InvalidArgument,
        );
        let bad_request = status
            .get_details_bad_request()
            .expect("INVALID_ARGUMENT carries google.rpc.BadRequest");
        let fields: Vec<_> = bad_request
            .field_violations
            .iter()
            .map(|v| v.field.as_str())
            .collect();
        assert_eq!(fields, [field], "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }

    // Every violation of one request is reported at once.
    let status = assert_code(
        app.auth
            .clone()
            .register(pb::RegisterRequest::default())
            .await,
        Code::InvalidArgument,
    );
    let fields = violation_fields(&status);
    assert_eq!(fields, ["email", "password", "display_name"]);
}

async fn password_length_is_8_to_128_characters_after_nfkc(mode: Mode) {
    let app = spawn_app(mode).await;
    let register = |password: String| {
        let mut request = register_request(&unique_email());
        request.password = password;
        let mut client = app.auth.clone();
        async move { client.register(request).await.map(|r| r.into_inner()) }
    };
    assert_code(register("1234567".into()).await, Code::InvalidArgument);
    register("12345678".into()).await.unwrap();
    // 128 two-byte characters are 128 characters, not 256.
    register("é".repeat(128)).await.unwrap();
    assert_code(register("é".repeat(129)).await, Code::InvalidArgument);

    // The password is NFKC-normalised before hashing: both spellings log in.
    let mut request = register_request(&unique_email());
    request.password = "ﬁsh and A\u{30a}pples".into();
    let email = request.email.clone();
    app.auth.clone().register(request).await.unwrap();
    app.login(&email, "fish and Åpples").await.unwrap();
    assert_code(app.login(&email, PASSWORD).await, Code::Unauthenticated);
}
