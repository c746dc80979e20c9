//! Rule directories for tests: a copy of the shipped `rules/*.yaml` plus a test's own files,
//! removed when the guard drops.

use std::path::{Path, PathBuf};

/// The repository's shipped rules directory.
pub fn shipped_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../rules")
}

/// A temporary copy of the shipped rule files plus `extra` (file name, text).
pub fn rules_dir_with(extra: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for entry in std::fs::read_dir(shipped_rules()).expect("the shipped rules") {
        let path = entry.expect("a directory entry").path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).expect("copy");
        }
    }
    for (name, text) in extra {
        std::fs::write(dir.path().join(name), text).expect("write a rule file");
    }
    dir
}
