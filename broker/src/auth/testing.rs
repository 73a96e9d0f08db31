//! What the tests of the credentials modules share.

use std::path::PathBuf;

use super::password::{GENERATED_PARAMS, hash_password};

/// A fresh path in the temporary directory (the file is not created).
pub(super) fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "fleetbeat-auth-{name}-{}-{:08x}.toml",
        std::process::id(),
        fastrand::u32(..)
    ))
}

/// A cheap PHC hash of the password `s3cret-pw`.
pub(super) const FAST_PHC_OF_SECRET: fn() -> String =
    || hash_password("s3cret-pw", GENERATED_PARAMS).unwrap();
