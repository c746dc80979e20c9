//! Reading the files under `deploy/` for the tests that check them.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

/// The repository's `deploy/` directory.
pub fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a YAML file, with merge keys (`<<: *anchor`) applied.
pub fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            value.apply_merge().unwrap();
            value
        })
        .collect()
}
