use authd::proto::authd::v1 as pb;
use tonic::Code;
use tonic_types::StatusExt;

use crate::{
    both_modes,
    helpers::violation_fields,
    helpers::{
        Mode, PASSWORD, assert_code, register_request, spawn_app, spawn_with, test_settings,
        unique_email,
    },
};

both_modes!(
    register_creates_a_user_with_a_working_session,
    a_taken_email_is_already_exists_whatever_its_case,
    each_invalid_field_is_named_in_a_bad_request,
    password_length_is_8_to_128_characters_after_nfkc,
    common_passwords_and_context_words_are_refused,
    lookalike_emails_reach_no_account_and_names_are_canonical,
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
    assert_code(register("zq8!vbn".into()).await, Code::InvalidArgument);
    register("zq8!vbn3".into()).await.unwrap();
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

/// NIST SP 800-63B: a new password is not one of the most common ones (whatever its case), nor
/// made of the account's own words; ChangePassword refuses them too, before it looks at the
/// current password. The minimum length is a setting.
async fn common_passwords_and_context_words_are_refused(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.auth.password_min_length = 15;
    let app = spawn_with(settings).await;
    let email = unique_email();
    let local = email.split('@').next().unwrap().to_owned();
    let register = |password: &str| {
        let mut request = register_request(&email);
        request.password = password.to_owned();
        request.display_name = "Grace Brewster Hopper".into();
        let mut client = app.auth.clone();
        async move { client.register(request).await.map(|r| r.into_inner()) }
    };
    let refused = |result: Result<_, tonic::Status>, why: &str| {
        let status = assert_code(result, Code::InvalidArgument);
        assert_eq!(violation_fields(&status), ["password"], "{status:?}");
        assert!(status.message().contains(why), "{why}: {status:?}");
    };
    refused(register("fourteen chars").await, "at least 15 characters");
    for common in ["passwordpassword", "QWERTYUIOPASDFGHJKL", "123123123123123"] {
        refused(register(common).await, "most common passwords");
    }
    refused(register(&email.to_uppercase()).await, "must not contain");
    refused(
        register(&format!("{local}-2024-spring")).await,
        "must not contain",
    );
    refused(register("admiral brewster 1906").await, "must not contain");
    refused(register("authd is my password").await, "must not contain");
    let registered = register(PASSWORD).await.unwrap();

    let token = &registered.session_token;
    for weak in ["passwordpassword".to_owned(), format!("{email}!!")] {
        let status = assert_code(
            app.change_password(token, "wrong", &weak).await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), ["new_password"], "{status:?}");
    }
    // A good new password gets as far as the current one (wrong here).
    assert_code(
        app.change_password(token, "wrong", "a much better passphrase")
            .await,
        Code::Unauthenticated,
    );
}

/// RFC 8265/8266: the Kelvin sign (U+212A) is not a "k" — it can neither register beside
/// k@… nor sign in to it; display names are stored in their canonical form (spaces collapsed,
/// NFKC) and refuse invisible characters.
async fn lookalike_emails_reach_no_account_and_names_are_canonical(mode: Mode) {
    let app = spawn_app(mode).await;
    let domain = unique_email().split('@').nth(1).unwrap().to_owned();
    let email = format!("k@{domain}");
    let mut request = register_request(&email);
    request.display_name = "  Ｋａｔｈｅｒｉｎｅ   Johnson ".into();
    let registered = app
        .auth
        .clone()
        .register(request)
        .await
        .unwrap()
        .into_inner();
    let lookalike = format!("\u{212A}@{domain}");
    let status = assert_code(app.login(&lookalike, PASSWORD).await, Code::InvalidArgument);
    assert_eq!(violation_fields(&status), ["email"]);
    let status = assert_code(
        app.auth
            .clone()
            .register(register_request(&lookalike))
            .await,
        Code::InvalidArgument,
    );
    assert_eq!(violation_fields(&status), ["email"]);
    app.login(&email.to_uppercase(), PASSWORD).await.unwrap();
    let profile = app.get_profile(&registered.user_id).await.unwrap();
    assert_eq!(profile.display_name, "Katherine Johnson");
}
