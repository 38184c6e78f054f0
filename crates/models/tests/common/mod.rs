//! Helpers shared by the integration tests of `reflex-models`.

use std::path::PathBuf;

/// `REFLEX_DATA_DIR`, else `../shared/data` beside the checkout, else the workplace's
/// `/work/shared/data` (for checkouts made elsewhere, such as a CI clone in /tmp).
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REFLEX_DATA_DIR") {
        return PathBuf::from(dir);
    }
    let beside = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data");
    if beside.exists() {
        beside
    } else {
        PathBuf::from("/work/shared/data")
    }
}
