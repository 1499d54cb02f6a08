//! Where mesh keeps its files on a machine.

use std::path::PathBuf;

/// `$MESH_HOME`, else `~/.mesh`, else a `mesh` folder in the temp dir (no home at all).
pub fn mesh_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("MESH_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".mesh"),
        None => std::env::temp_dir().join("mesh"),
    }
}
