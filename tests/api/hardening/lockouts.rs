//! Findings 7 and 8, and what attacking them found: lockouts, and one address written several ways.
use super::*;

both_modes!(
    guesses_from_elsewhere_do_not_lock_out_a_trusted_device,
    consecutive_failures_lock_out_untrusted_clients_only,
    no_window_edge_lets_twice_the_limit_through,
    addresses_are_counted_in_their_canonical_form_and_per_ipv6_64,
    requests_without_an_address_share_one_bucket,
    a_trusted_address_is_that_address_not_its_network,
    password_changes_pay_a_bucket_that_a_correct_password_does_not_refund,
);

/// Before: one counter per email: a stranger's guesses locked the owner out too, for the whole
/// window. Now a client that signed in to the account before (here by its device identifier) has
/// a bucket of its own there: the stranger is refused, and so is anyone else untrusted, but the
/// owner's device gets in (even from a new address).
async fn guesses_from_elsewhere_do_not_lock_out_a_trusted_device(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let laptop = || client("192.0.2.10", "owner-laptop-1");
    login_as(&app, &email, PASSWORD, laptop()).await.unwrap();

    let stranger = || client("203.0.113.66", "stranger");
    for _ in 0..2 {
        assert_code(
            login_as(&app, &email, "guess", stranger()).await,
            Code::Unauthenticated,
        );
    }
    assert_limited(login_as(&app, &email, "guess", stranger()).await);
    assert_limited(login_as(&app, &email, PASSWORD, client("203.0.113.67", "")).await);

    let travelling = client("198.51.100.200", "owner-laptop-1");
    login_as(&app, &email, PASSWORD, travelling)
        .await
        .expect("the owner's device is not locked out");
    login_as(&app, &email, PASSWORD, laptop()).await.unwrap();
    assert_limited(login_as(&app, &email, PASSWORD, stranger()).await);
}

/// Before: no cap on consecutive failures beyond the window's count. Now, with per-window
/// limits far away, `RATE_LIMIT__MAX_FAILED_LOGINS` consecutive wrong passwords (kept in
/// PostgreSQL) make the account refuse the right password from any client it does not trust
/// (RESOURCE_EXHAUSTED), while its owner's device still gets in.
async fn consecutive_failures_lock_out_untrusted_clients_only(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 1000;
    settings.rate_limit.max_failed_logins = 5;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let phone = || client("192.0.2.10", "owner-phone");
    login_as(&app, &email, PASSWORD, phone()).await.unwrap();
    for i in 0..5 {
        assert_code(
            login_as(&app, &email, "guess", client(&format!("203.0.113.{i}"), "")).await,
            Code::Unauthenticated,
        );
    }
    assert_code(
        login_as(&app, &email, PASSWORD, client("203.0.113.99", "")).await,
        Code::ResourceExhausted,
    );
    assert_code(
        login_as(&app, &email, PASSWORD, client("203.0.113.99", "new-device")).await,
        Code::ResourceExhausted,
    );
    login_as(&app, &email, PASSWORD, phone())
        .await
        .expect("the trusted device still gets in");
}

/// Before: fixed windows: `limit` guesses just before a window ended and `limit` more just after
/// it began — twice the limit within moments. Now (GCRA) at most `limit` guesses are evaluated in
/// any window: one guess, a pause to just before the window's end, then guesses as fast as
/// possible: in no stretch shorter than a window are more than `limit` evaluated, and guesses
/// keep being evaluated at the steady rate.
async fn no_window_edge_lets_twice_the_limit_through(mode: Mode) {
    const LIMIT: usize = 4;
    const WINDOW: Duration = Duration::from_secs(2);
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = LIMIT as u32;
    settings.rate_limit.login_window = WINDOW;
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let start = Instant::now();
    let mut evaluated = Vec::new();
    assert_code(app.login(&email, "guess").await, Code::Unauthenticated);
    evaluated.push(start);
    tokio::time::sleep(WINDOW - Duration::from_millis(200)).await;
    while start.elapsed() < WINDOW * 5 / 2 {
        let sent = Instant::now();
        match app.login(&email, "guess").await {
            Err(s) if s.code() == Code::Unauthenticated => evaluated.push(sent),
            other => assert_limited(other),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Send times, not evaluation times: a stretch of a window less a margin for the time from
    // sending to counting.
    let stretch = WINDOW - Duration::from_millis(300);
    for (i, first) in evaluated.iter().enumerate() {
        let within = evaluated[i..]
            .iter()
            .take_while(|t| t.duration_since(*first) <= stretch)
            .count();
        assert!(
            within <= LIMIT,
            "{within} guesses evaluated within {stretch:?} (from {:?})",
            first.duration_since(start)
        );
    }
    // Burst, then one per window / (limit - burst + 1): about 7 in these 5 s.
    assert!(evaluated.len() >= 5, "{} evaluated", evaluated.len());
    let last = evaluated.last().unwrap().duration_since(start);
    assert!(last > WINDOW * 3 / 2, "nothing evaluated after {last:?}");
}

/// Before: the address was counted as written: `::ffff:198.51.100.7` and `198.51.100.7` had a
/// bucket each, and every IPv6 address (of the 2^64 of one /64) had its own. Now addresses are
/// counted in canonical form, IPv6 per /64 (`RATE_LIMIT__IPV6_PREFIX`).
async fn addresses_are_counted_in_their_canonical_form_and_per_ipv6_64(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_ip = 4; // 2 at once
    let app = spawn_with(settings).await;
    let app = &app;
    let guess =
        |ip: &'static str| async move { app.login_from(&unique_email(), PASSWORD, ip).await };
    for ip in ["::ffff:198.51.100.7", "::FFFF:198.51.100.7"] {
        assert_code(guess(ip).await, Code::Unauthenticated);
    }
    assert_limited(guess("198.51.100.7").await);

    for ip in ["2001:db8:aa:bb::1", "2001:db8:aa:bb:ffff:ffff:ffff:ffff"] {
        assert_code(guess(ip).await, Code::Unauthenticated);
    }
    assert_limited(guess("2001:db8:aa:bb:1234::2").await);
    assert_limited(guess("2001:DB8:AA:BB::3").await);
    assert_code(guess("2001:db8:aa:bc::1").await, Code::Unauthenticated);
}

/// Before: requests without `client.ip_address` were not counted per address at all: 25
/// Registers without one all succeeded with `RATE_LIMIT__REGISTER_PER_IP=20`. Now they share one
/// bucket of their own (with or without a ClientInfo), which refuses them past the limit, while a
/// request with an address has its own.
async fn requests_without_an_address_share_one_bucket(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.register_per_ip = 20;
    let app = spawn_with(settings).await;
    let (mut served, mut refused) = (0, 0);
    for i in 0..25 {
        let mut request = register_request(&unique_email());
        request.client = (i % 2 == 0).then(|| client("", ""));
        match app.auth.clone().register(request).await {
            Ok(_) => served += 1,
            other => {
                assert_limited(other);
                refused += 1;
            }
        }
    }
    assert!((1..=20).contains(&served), "{served} served");
    assert_eq!(served + refused, 25);
    let mut elsewhere = register_request(&unique_email());
    elsewhere.client = Some(client("192.0.2.55", ""));
    app.auth
        .clone()
        .register(elsewhere)
        .await
        .expect("an address has a bucket of its own");
}

/// Before: an account trusted the owner's address per IPv6 /64 (as the address limit counts
/// it), so any neighbour in the owner's /64 shared the owner's own bucket: its guesses used the
/// owner's allowance up and locked the owner out. Now trust is for the exact address: the
/// neighbour is refused like any stranger, and the owner still gets in.
async fn a_trusted_address_is_that_address_not_its_network(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (email, _) = app.register().await;
    let owner = || client("2001:db8:77:1::10", "");
    login_as(&app, &email, PASSWORD, owner()).await.unwrap();
    let neighbour = || client("2001:db8:77:1::99", "");
    let mut refused = false;
    for _ in 0..6 {
        match login_as(&app, &email, "guess", neighbour()).await {
            Err(status) if status.code() == Code::Unauthenticated => {}
            other => {
                assert_limited(other);
                refused = true;
                break;
            }
        }
    }
    assert!(refused, "the neighbour's guesses are limited");
    login_as(&app, &email, PASSWORD, owner())
        .await
        .expect("the owner's exact address is not locked out by its neighbour");
}

/// Before: ChangePassword paid only the account's guess bucket, which a correct current
/// password resets: a session holder could ask for two hashes per call in a loop. Now every
/// ChangePassword also pays the account's password-change bucket, right or wrong, never
/// refunded: the loop is refused (RESOURCE_EXHAUSTED with RetryInfo) within the limit.
async fn password_changes_pay_a_bucket_that_a_correct_password_does_not_refund(mode: Mode) {
    let mut settings = test_settings(mode);
    settings.rate_limit.login_per_email = 4;
    settings.rate_limit.login_window = Duration::from_secs(3600);
    let app = spawn_with(settings).await;
    let (_, reg) = app.register().await;
    let passwords = [PASSWORD, "another correct horse battery"];
    let (mut served, mut refused) = (0, 0);
    for i in 0..8 {
        let (current, new) = (passwords[i % 2], passwords[(i + 1) % 2]);
        match app.change_password(&reg.session_token, current, new).await {
            Ok(_) => served += 1,
            other => {
                assert_limited(other);
                refused += 1;
            }
        }
    }
    assert!((1..=4).contains(&served), "{served} changes served");
    assert_eq!(served + refused, 8);
}
