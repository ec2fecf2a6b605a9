//! The client crate's `Validator` in strict mode, beside a fleet of three instances: a token
//! revoked on one instance is refused by every validator as soon as the revocation returned,
//! though the validators answer from their own memory.
use authd_client::{Config, Mode as ClientMode, Validator};
use tonic::Code;

use super::{SUBSCRIBER_KEY, subscribed_settings};
use crate::{
    both_modes,
    helpers::{Mode, PASSWORD, TestApp, eventually, spawn_sharing, spawn_with},
};

both_modes!(no_validator_accepts_a_token_once_its_revocation_returned);

/// A strict validator of the client crate following `app`'s stream.
pub fn strict_validator(app: &TestApp) -> Validator {
    Validator::new(
        app.channel.clone(),
        Config {
            mode: ClientMode::Strict,
            api_key: Some(SUBSCRIBER_KEY.to_owned()),
            ..Config::default()
        },
    )
}

async fn no_validator_accepts_a_token_once_its_revocation_returned(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let first = spawn_with(subscribed_settings(mode, dir.path())).await;
    let second = spawn_sharing(&first, |_| {}).await;
    let third = spawn_sharing(&first, |_| {}).await;
    let fleet = [&first, &second, &third];
    // Each validator follows the stream of an instance of its own.
    let validators = [strict_validator(&second), strict_validator(&third)];
    for v in &validators {
        eventually(
            std::time::Duration::from_secs(20),
            "the validator trusts its memory",
            || async { v.trusted() },
        )
        .await;
    }
    let (email, _) = first.register().await;
    // Without Redis a revocation waits for the subscribers' catch-up through the logs (polled
    // every 100 ms): fewer rounds.
    let rounds = if mode == Mode::NoRedis { 40 } else { 200 };
    for round in 0..rounds {
        let login = fleet[round % 3].login(&email, PASSWORD).await.unwrap();
        let token = login.session_token;
        for v in &validators {
            v.validate(&token).await.expect("a fresh session is valid");
            v.validate(&token)
                .await
                .expect("and valid again, from memory");
        }
        fleet[(round + 1) % 3].logout(&token).await.unwrap();
        for (k, v) in validators.iter().enumerate() {
            let answer = v.validate(&token).await;
            assert_eq!(
                answer.as_ref().err().map(|s| s.code()),
                Some(Code::Unauthenticated),
                "round {round}: validator {k} accepted a token whose Logout returned: {answer:?}"
            );
        }
    }
    for v in &validators {
        assert!(
            v.local_hits() >= rounds as u64 / 2,
            "the validators answered from memory ({} hits)",
            v.local_hits()
        );
    }
}
