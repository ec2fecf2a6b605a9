//! `client_validate`: the client's validation from memory, warm — what `Validator::validate`
//! does before any network call (the token's SHA-256, the lookup, the trust check, a copy of
//! the session) — on one thread. Target (issue "Callers validate in their own memory"):
//! at least 1,000,000 validations per second on one core, no network call.
//!
//! `cargo bench -p authd-client --bench validate`
use std::time::{Duration, Instant};

use authd_client::{Kept, State, TokenHash, proto as pb};
use sha2::{Digest, Sha256};

fn main() {
    const TOKENS: usize = 10_000;
    let state = State::new(100_000, 100_000, Duration::from_secs(60));
    state.primed();
    state.trust_until(u64::MAX);
    state.fresh_until(u64::MAX);
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let tokens: Vec<String> = (0..TOKENS)
        .map(|i| format!("v1.{i:08}.c2Vzc2lvbi10b2tlbi1vZi1hYm91dC1mb3J0eS10aHJlZS1i"))
        .collect();
    for (i, token) in tokens.iter().enumerate() {
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        let session = pb::Session {
            session_id: format!("01a24ce4-c97f-77a0-9ab3-{i:012}"),
            user_id: format!("01a24ce4-c97f-77a0-9ab3-{:012}", i / 3),
            expires_at: Some(later.into()),
            ..Default::default()
        };
        assert_eq!(state.keep(state.ticket(), hash, &session), Kept::Kept);
    }
    let validate = |token: &str| {
        let hash: TokenHash = Sha256::digest(token.as_bytes()).into();
        state.lookup(&hash)
    };
    for token in &tokens {
        assert!(validate(token).is_some());
    }
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let mut found = 0u64;
        let rounds = 100;
        for _ in 0..rounds {
            for token in &tokens {
                found += u64::from(validate(token).is_some());
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(found, (rounds * TOKENS) as u64);
        best = best.max(found as f64 / elapsed);
    }
    println!(
        "client_validate: {best:.0} validations/s on one thread (best of 5 runs of 1,000,000)"
    );
    assert!(best >= 1_000_000.0, "below the target of 1,000,000/s");
}
