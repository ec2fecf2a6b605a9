//! RFC 6238 as every authenticator app reads an `otpauth://` URI: SHA-1, 6 digits, 30-second
//! steps. Shared by the domain (enrolment, `auth::second_factor`) and the storage layer, which
//! checks a code under the account's lock (`store::second_factor`).
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, TOTP};

/// RFC 6238's time step, in seconds.
pub const STEP: i64 = 30;

/// The authenticator's view of `secret`, labelled `issuer:account` (neither may hold ':' in an
/// otpauth label: the issuer is checked at start-up, the account's ':' become '_').
pub fn authenticator(secret: Vec<u8>, issuer: &str, account: &str) -> TOTP {
    TOTP::new_unchecked(
        Algorithm::SHA1,
        6,
        1,
        STEP.unsigned_abs(),
        secret,
        Some(issuer.to_owned()),
        account.replace(':', "_"),
    )
}

/// The latest step, among the one of `now` (Unix seconds) and its neighbours (±30 s of skew),
/// whose code is `code` and which is later than `after`: a code is good once, and never after a
/// later one.
pub fn matching_step(secret: &[u8], code: &str, now: i64, after: i64) -> Option<i64> {
    let totp = authenticator(secret.to_vec(), "", "");
    let current = now.div_euclid(STEP);
    (current - 1..=current + 1).rev().find(|&step| {
        step > after
            && u64::try_from(step * STEP)
                .is_ok_and(|t| bool::from(totp.generate(t).as_bytes().ct_eq(code.as_bytes())))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238's test vector (SHA-1, the 20-byte ASCII secret), cut to 6 digits.
    #[test]
    fn the_rfc_vectors_match_with_one_step_of_skew_and_only_later_steps() {
        let secret = b"12345678901234567890";
        // T = 59 s: 94287082; T = 1111111109: 07081804.
        assert_eq!(matching_step(secret, "287082", 59, 0), Some(1));
        assert_eq!(
            matching_step(secret, "081804", 1_111_111_109, 0),
            Some(37_037_036)
        );
        // One step either side is accepted; two are not.
        assert_eq!(matching_step(secret, "287082", 59 + 30, 0), Some(1));
        assert_eq!(matching_step(secret, "287082", 59 - 30, 0), Some(1));
        assert_eq!(matching_step(secret, "287082", 59 + 60, 0), None);
        // Not at or after the last accepted step.
        assert_eq!(matching_step(secret, "287082", 59, 1), None);
        assert_eq!(matching_step(secret, "000000", 59, 0), None);
    }
}
