//! The JWT signing keys' life: published before they sign, published until their JWTs expire,
//! a change of algorithm, and a key that does not parse.
use super::*;

/// Keys rotate: the next is published at once and signs only after the lead, so a verifier's
/// copy of the JWKS has it before any JWT names it; the previous key stays published until
/// every JWT it signed has expired (`JWT__MAX_TTL` plus a minute after its successor began
/// signing), and its JWTs verify until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_and_the_old_key_verifies_until_its_jwts_expire() {
    let app = spawn_with(minting(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let token = &reg.session_token;
    let first = issue(&app, token, AUDIENCE, None).await.unwrap();
    let one = published(&app).await;
    assert_eq!(one.len(), 1);

    // The newest key is older than JWT__KEY_ROTATION less the lead: the next is made.
    let mut conn = sql(&app).await;
    sqlx::query("update jwt_keys set activates_at = activates_at - interval '24 hours'")
        .execute(&mut conn)
        .await
        .unwrap();
    app.refresh_keys().await;
    let both = published(&app).await;
    assert_eq!(both.len(), 2, "published before it signs");
    assert_eq!(both[0], one[0]);
    let during_lead = issue(&app, token, AUDIENCE, None).await.unwrap();
    let (_, header) = verify(&app, &during_lead.jwt, AUDIENCE).await.unwrap();
    assert_eq!(
        header["kid"],
        one[0].as_str(),
        "the new key does not sign during the lead"
    );

    // The lead is over: the new key signs; the first key's JWTs still verify.
    sqlx::query("update jwt_keys set activates_at = now() where id = 2")
        .execute(&mut conn)
        .await
        .unwrap();
    app.refresh_keys().await;
    let second = issue(&app, token, AUDIENCE, None).await.unwrap();
    let (_, header) = verify(&app, &second.jwt, AUDIENCE).await.unwrap();
    assert_eq!(header["kid"], both[1].as_str());
    verify(&app, &first.jwt, AUDIENCE)
        .await
        .expect("a JWT of the previous key verifies until it expires");
    assert_eq!(published(&app).await, both);

    // An hour (the longest JWT__MAX_TTL any instance may have) and a minute after the successor
    // began signing, every JWT of the first key has expired: it is no longer published.
    sqlx::query(
        "update jwt_keys set activates_at = now() - interval '60 minutes 59 seconds' where id = 2",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    app.refresh_keys().await;
    assert_eq!(
        published(&app).await,
        both,
        "kept until the hour and a minute"
    );
    sqlx::query(
        "update jwt_keys set activates_at = now() - interval '61 minutes 1 second' where id = 2",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    app.refresh_keys().await;
    assert_eq!(published(&app).await, [both[1].clone()]);
    verify(&app, &second.jwt, AUDIENCE).await.unwrap();
    assert_eq!(
        verify(&app, &first.jwt, AUDIENCE).await.unwrap_err(),
        "PyJWKClientError",
        "no key verifies a JWT of a key no longer published"
    );

    // A change of algorithm takes effect with a new key, made at once.
    let es256 = spawn_sharing(&app, |s| s.jwt.algorithm = JwtAlgorithm::ES256).await;
    let (_, document) = jwks_document(&es256).await;
    let algorithms: Vec<&str> = document["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["alg"].as_str().unwrap())
        .collect();
    assert_eq!(algorithms, ["EdDSA", "ES256"]);
    // Instances of both settings during the change add no key at each refresh.
    for _ in 0..3 {
        app.refresh_keys().await;
        es256.refresh_keys().await;
    }
    assert_eq!(published(&es256).await.len(), 2);
}

/// A key in PostgreSQL that does not parse is never used, never published, retires nothing and
/// counts for nothing: the key before it goes on signing, stays published and is not purged
/// however old the bad row is, and the next key is made when the good one is due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_parse_is_passed_over() {
    let app = spawn_with(minting(Mode::Redis)).await;
    let (_, reg) = app.register().await;
    let good = published(&app).await;
    let mut conn = sql(&app).await;
    sqlx::query("update jwt_keys set activates_at = now() - interval '3 days'")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query(
        "insert into jwt_keys (algorithm, private_key, activates_at)
         values ('EdDSA', '\\x0badc0de', now() - interval '2 days')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    for _ in 0..2 {
        app.refresh_keys().await;
    }
    let now = published(&app).await;
    assert_eq!(now.len(), 2, "the good key, and the next one made");
    assert_eq!(
        now[0], good[0],
        "the good key is neither retired nor purged"
    );
    let minted = issue(&app, &reg.session_token, AUDIENCE, None)
        .await
        .unwrap();
    let (_, header) = verify(&app, &minted.jwt, AUDIENCE).await.unwrap();
    assert_eq!(
        header["kid"],
        good[0].as_str(),
        "it signs until the next activates"
    );
    let rows: i64 = sqlx::query_scalar("select count(*) from jwt_keys")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 3);
}
