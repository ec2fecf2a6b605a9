//! Password hashing: argon2id (m=19456 KiB, t=2, p=1), PHC strings.
//!
//! One hash costs ~20 ms of a core, so hashing never runs on the async runtime: it runs on the
//! blocking pool behind a semaphore sized by `AUTH__HASH_CONCURRENCY`, with a bounded queue in
//! front. A burst of logins therefore gets RESOURCE_EXHAUSTED quickly instead of taking every core
//! from ValidateSession and the health service.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher as _, PasswordVerifier, Version,
    password_hash::{SaltString, rand_core::OsRng},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;
use unicode_normalization::UnicodeNormalization;

use crate::{config::AuthSettings, metrics::Metrics};

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("password hashing is saturated")]
    Overloaded,
    #[error("password hashing failed: {0}")]
    Failed(String),
}

/// argon2id with the parameters every stored hash uses.
fn argon2() -> Argon2<'static> {
    let params = Params::new(19_456, 2, 1, None).expect("constant argon2 parameters are valid");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// The form that is hashed: NFKC, so the same password typed on different keyboards matches.
fn normalize(password: &SecretString) -> SecretString {
    SecretString::from(password.expose_secret().nfkc().collect::<String>())
}

fn hash_blocking(password: &SecretString) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()
        .hash_password(normalize(password).expose_secret().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError::Failed(e.to_string()))
}

fn verify_blocking(password: &SecretString, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|parsed| {
        argon2()
            .verify_password(normalize(password).expose_secret().as_bytes(), &parsed)
            .is_ok()
    })
}

pub struct PasswordHasher {
    slots: Arc<Semaphore>,
    /// Calls waiting for or holding a slot.
    admitted: Arc<AtomicUsize>,
    capacity: usize,
    /// Verified against when the user does not exist, so an unknown email costs as much time as
    /// a wrong password.
    dummy_hash: String,
    metrics: Arc<Metrics>,
}

/// Releases a place in the queue however the call ends (including cancellation).
struct Admission(Arc<AtomicUsize>, Arc<Metrics>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.hash_queue_depth.dec();
    }
}

impl PasswordHasher {
    pub fn new(settings: &AuthSettings, metrics: Arc<Metrics>) -> Result<Self, HashError> {
        let dummy_hash = hash_blocking(&SecretString::from("authd dummy password"))?;
        Ok(Self {
            slots: Arc::new(Semaphore::new(settings.hash_concurrency)),
            admitted: Arc::new(AtomicUsize::new(0)),
            capacity: settings.hash_concurrency + settings.hash_queue,
            dummy_hash,
            metrics,
        })
    }

    /// Takes a place among the calls that may hash (computing or queued), or refuses at once
    /// when they are all taken. Take it *before* any other work a hash is for (the database
    /// lookup of a login, say): a flood is then refused before it costs anything.
    pub fn admit(&self) -> Result<Admitted<'_>, HashError> {
        let previous = self.admitted.fetch_add(1, Ordering::AcqRel);
        self.metrics.hash_queue_depth.inc();
        let admission = Admission(self.admitted.clone(), self.metrics.clone());
        if previous >= self.capacity {
            self.metrics.hash_rejections.inc();
            return Err(HashError::Overloaded);
        }
        Ok(Admitted {
            hasher: self,
            admission,
        })
    }

    pub async fn hash(&self, password: SecretString) -> Result<String, HashError> {
        self.admit()?.hash(password).await
    }

    /// Verifies against `phc`, or against the dummy hash when there is no user.
    pub async fn verify(
        &self,
        password: SecretString,
        phc: Option<String>,
    ) -> Result<bool, HashError> {
        self.admit()?.verify(password, phc).await
    }
}

/// A place among the calls that may hash; one hash (or verification) spends it.
pub struct Admitted<'a> {
    hasher: &'a PasswordHasher,
    admission: Admission,
}

impl Admitted<'_> {
    pub async fn hash(self, password: SecretString) -> Result<String, HashError> {
        self.run(move || hash_blocking(&password)).await?
    }

    /// Verifies against `phc`, or against the dummy hash when there is no user (the same cost
    /// either way).
    pub async fn verify(
        self,
        password: SecretString,
        phc: Option<String>,
    ) -> Result<bool, HashError> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.hasher.dummy_hash.clone());
        let matched = self.run(move || verify_blocking(&password, &phc)).await?;
        Ok(known && matched)
    }

    async fn run<T: Send + 'static>(
        self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        let permit = self
            .hasher
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HashError::Overloaded)?;
        let admission = self.admission;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _admission = admission;
            work()
        })
        .await
        .map_err(|e| HashError::Failed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_phc_strings_with_the_agreed_cost() {
        let phc = hash_blocking(&SecretString::from("correct horse")).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_blocking(&SecretString::from("correct horse"), &phc));
        assert!(!verify_blocking(
            &SecretString::from("correct horse!"),
            &phc
        ));
    }

    #[test]
    fn passwords_are_compared_after_nfkc_normalisation() {
        // "ﬁ" (U+FB01) is NFKC-equivalent to "fi"; "Å" may be one code point or two.
        let phc = hash_blocking(&SecretString::from("ﬁsh Å pass")).unwrap();
        assert!(verify_blocking(
            &SecretString::from("fish A\u{30a} pass"),
            &phc
        ));
    }

    #[tokio::test]
    async fn past_the_queue_callers_are_refused_at_once() {
        let hasher = Arc::new(
            PasswordHasher::new(
                &AuthSettings {
                    hash_concurrency: 1,
                    hash_queue: 1,
                    ..AuthSettings::default()
                },
                Metrics::new(),
            )
            .unwrap(),
        );
        let calls: Vec<_> = (0..6)
            .map(|_| {
                let h = hasher.clone();
                tokio::spawn(async move { h.hash(SecretString::from("password1")).await })
            })
            .collect();
        let mut refused = 0;
        for call in calls {
            match call.await.unwrap() {
                Ok(_) => {}
                Err(HashError::Overloaded) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            refused >= 1,
            "a queue of 1 behind 1 slot must refuse some of 6 calls"
        );
        // Every place was given back: a new call is admitted.
        hasher.hash(SecretString::from("password1")).await.unwrap();
    }
}
