//! Findings 3 and 4: oversized passwords, and hashing monopolised from one address.
use super::*;

both_modes!(correct_logins_from_one_address_are_limited_too,);

/// 57 Hangul syllables written as conjoining jamo: 513 bytes (one over the byte bound of a
/// 128-character password), but 57 characters once NFKC composes them. A bound counted after
/// normalisation lets it through; the byte bound, checked before any normalisation, does not.
fn over_the_byte_bound() -> String {
    let password = "\u{1112}\u{1161}\u{11AB}".repeat(57);
    assert_eq!(
        password.len(),
        authd::auth::input::PASSWORD_MAX_CHARS * 4 + 1
    );
    password
}

/// Before: a password's length was only counted after NFKC normalisation (of up to 4 MiB of
/// input: U+FDFA expands 18-fold), so the 513-byte password above passed as 57 characters: Login
/// answered UNAUTHENTICATED after a hash, ChangePassword looked the token up first. Now the byte
/// bound rejects it before anything else, naming the field — for Login, Register and both fields
/// of ChangePassword, whatever the token (the fields are checked before it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_over_the_byte_bound_are_refused_before_anything_else() {
    let app = spawn_with(test_settings(Mode::NoRedis)).await;
    let (email, reg) = app.register().await;
    let long = over_the_byte_bound();
    let expanding = "\u{FDFA}".repeat(171); // 513 bytes, 3078 characters after NFKC
    for password in [&long, &expanding] {
        let status = assert_code(app.login(&email, password).await, Code::InvalidArgument);
        assert_eq!(violation_fields(&status), ["password"]);
        let mut request = register_request(&unique_email());
        request.password = password.clone();
        let status = assert_code(
            app.auth.clone().register(request).await,
            Code::InvalidArgument,
        );
        assert_eq!(violation_fields(&status), ["password"]);
        for token in ["not-a-token", reg.session_token.as_str()] {
            let status = assert_code(
                app.change_password(token, password, password).await,
                Code::InvalidArgument,
            );
            assert_eq!(
                violation_fields(&status),
                ["current_password", "new_password"],
                "token {token:?}"
            );
            let status = assert_code(
                app.change_password(token, PASSWORD, password).await,
                Code::InvalidArgument,
            );
            assert_eq!(violation_fields(&status), ["new_password"]);
        }
    }
    // Nothing was changed.
    app.login(&email, PASSWORD).await.unwrap();
}

/// Before: only failed logins counted against the client's address, so accounts of one's own
/// logging in correctly in a loop from one address got every hash they asked for. Now every
/// Login pays the address's bucket (`RATE_LIMIT__LOGIN_PER_IP`, at most that many in any
/// window): the loop is refused with RESOURCE_EXHAUSTED (counted in
/// `authd_rate_limited_total{operation="login"}`), and other addresses are not affected.
async fn correct_logins_from_one_address_are_limited_too(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_ip = 10;
    let app = spawn_with(settings).await;
    let mut emails = Vec::new();
    for _ in 0..3 {
        emails.push(app.register().await.0);
    }
    let metric = "authd_rate_limited_total{operation=\"login\"}";
    let before = app.metric(metric).await;
    let (mut served, mut refused) = (0, 0);
    for i in 0..15 {
        match app
            .login_from(&emails[i % emails.len()], PASSWORD, "198.51.100.20")
            .await
        {
            Ok(_) => served += 1,
            other => {
                assert_limited(other);
                refused += 1;
            }
        }
    }
    assert!((1..=10).contains(&served), "{served} logins served");
    assert!(refused >= 5, "{refused} refused");
    assert_eq!(app.metric(metric).await - before, f64::from(refused));
    app.login_from(&emails[0], PASSWORD, "198.51.100.21")
        .await
        .expect("another address is not limited");
}

/// Before: Register hashed the password first and found the email taken only when inserting, so
/// Registers of an existing email took hashing slots (and were refused when the slots were
/// busy). Now the cheap uniqueness check comes first: with one hashing slot and no queue, 20
/// concurrent Registers of a taken email all answer ALREADY_EXISTS and no hash is refused —
/// while 20 concurrent Logins, which do hash, are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_a_taken_email_takes_no_hashing_slot() {
    let mut settings = test_settings(Mode::NoRedis);
    settings.auth.hash_concurrency = 1;
    settings.auth.hash_queue = 0;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let rejections = "authd_password_hash_rejections_total";
    assert_eq!(app.metric(rejections).await, 0.0);
    let registers = join_all((0..20).map(|_| {
        let mut auth = app.auth.clone();
        let request = register_request(&email);
        async move { auth.register(request).await }
    }))
    .await;
    for register in registers {
        assert_code(register, Code::AlreadyExists);
    }
    assert_eq!(app.metric(rejections).await, 0.0, "no hash was asked for");
    // The same concurrency with hashing does overflow the one slot.
    let logins = join_all((0..20).map(|_| app.login(&email, PASSWORD))).await;
    assert!(
        logins.iter().any(|l| l
            .as_ref()
            .is_err_and(|s| s.code() == Code::ResourceExhausted)),
        "{logins:?}"
    );
    assert!(app.metric(rejections).await > 0.0);
}
