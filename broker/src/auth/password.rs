//! Password hashing: argon2id at the cost a password's origin calls for (see the
//! [module docs](super)), checking a password against a stored PHC string, and the randomness
//! and constant-time comparison that secrets need.

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::error::CredentialsError;

/// argon2id parameters (memory KiB, iterations, lanes) for generated, 128-bit passwords.
pub(crate) const GENERATED_PARAMS: (u32, u32, u32) = (1024, 1, 1);

/// argon2id parameters (memory KiB, iterations, lanes) for passwords a person chose.
pub(crate) const CHOSEN_PARAMS: (u32, u32, u32) = (19 * 1024, 2, 1);

/// Where a password came from, which decides what its hash costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordOrigin {
    /// Generated at random with at least 128 bits: hashed cheaply (argon2id m = 1 MiB, t = 1).
    Generated,
    /// Chosen by a person: hashed expensively (argon2id m = 19 MiB, t = 2).
    Chosen,
}

/// The PHC hash of `password` at the cost its `origin` calls for.
pub(crate) fn hash_for(password: &str, origin: PasswordOrigin) -> Result<String, CredentialsError> {
    if password.chars().count() < 8 {
        return Err(CredentialsError::Invalid {
            entry: String::new(),
            reason: "a password has at least 8 characters".to_owned(),
        });
    }
    match origin {
        PasswordOrigin::Generated => hash_password(password, GENERATED_PARAMS),
        PasswordOrigin::Chosen => hash_password(password, CHOSEN_PARAMS),
    }
}

/// `N` bytes from the operating system's random number generator.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], CredentialsError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|err| CredentialsError::Random(err.to_string()))?;
    Ok(bytes)
}

/// Hashes `password` as a PHC string with argon2id and `params` (memory KiB, iterations,
/// lanes).
pub(super) fn hash_password(
    password: &str,
    params: (u32, u32, u32),
) -> Result<String, CredentialsError> {
    let invalid = |reason: String| CredentialsError::Invalid {
        entry: "password".to_owned(),
        reason,
    };
    let (m, t, p) = params;
    let params = Params::new(m, t, p, None).map_err(|err| invalid(err.to_string()))?;
    let salt =
        SaltString::encode_b64(&random_bytes::<16>()?).map_err(|err| invalid(err.to_string()))?;
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| invalid(err.to_string()))
}

/// Whether `password` matches the PHC string `phc`. Slow by design (argon2).
pub(crate) fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .and_then(|hash| Argon2::default().verify_password(password.as_bytes(), &hash))
        .is_ok()
}

/// Checks that `phc` is an argon2id PHC string with valid parameters; the reason if not.
pub(crate) fn check_phc(phc: &str) -> Result<(), String> {
    let hash =
        PasswordHash::new(phc).map_err(|err| format!("`password` is not a PHC hash: {err}"))?;
    if Algorithm::try_from(hash.algorithm).is_err() {
        return Err(format!(
            "`password` uses {}, expected argon2id",
            hash.algorithm
        ));
    }
    Params::try_from(&hash)
        .map_err(|err| format!("`password` has invalid argon2 parameters: {err}"))?;
    Ok(())
}

/// Whether `a` and `b` are equal, in time that depends on their length only (for secrets).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_passwords_get_the_strong_parameters() {
        let phc = hash_for("correct horse", PasswordOrigin::Chosen).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        let phc = hash_for("0123456789abcdef", PasswordOrigin::Generated).unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{phc}");
        assert!(hash_for("short", PasswordOrigin::Generated).is_err());
    }
}
