//! Models already in the local Hugging Face cache, found by hub id the way transformers
//! finds them offline (`HF_HUB_OFFLINE=1`): `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`; then `models--Org--Name/refs/main` names the snapshot.
//! Nothing is ever downloaded.

use std::path::{Path, PathBuf};

use super::ModelError;

/// `arg` itself when it exists on disk; else, when it is a hub id (`Org/Name`), the
/// snapshot directory of that model in the local cache.
pub fn resolve(arg: &Path) -> Result<PathBuf, ModelError> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    match arg.to_str().filter(|s| is_hub_id(s)) {
        Some(id) => snapshot(&cache_root(), id),
        None => Ok(arg.to_path_buf()),
    }
}

/// A model path made absolute against `base` (relative paths in node.toml are relative
/// to the file), except a hub id that names no local path, which is kept as written.
pub fn absolute_or_id(p: &Path, base: impl FnOnce(&Path) -> PathBuf) -> PathBuf {
    match p.to_str() {
        Some(s) if is_hub_id(s) && !p.exists() => p.to_path_buf(),
        _ => base(p),
    }
}

/// `Org/Name`: two plain name parts, as the hub spells repository ids.
fn is_hub_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let plain = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    plain(org) && plain(name) && !s.contains("..")
}

/// The hub cache directory, from the environment as `huggingface_hub` reads it.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE") {
        return p;
    }
    if let Some(p) = var("HF_HOME") {
        return p.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// The snapshot `refs/main` points at in `root` for model `id`.
pub fn snapshot(root: &Path, id: &str) -> Result<PathBuf, ModelError> {
    let repo = root.join(format!("models--{}", id.replace('/', "--")));
    let absent = |why: String| ModelError::NotInHubCache {
        id: id.to_string(),
        cache: root.to_path_buf(),
        why,
    };
    let refs = repo.join("refs").join("main");
    let rev = std::fs::read_to_string(&refs)
        .map_err(|_| absent(format!("{} is missing", refs.display())))?;
    let rev = rev.trim();
    if rev.is_empty() || !rev.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(absent(format!("{} holds no commit hash", refs.display())));
    }
    let dir = repo.join("snapshots").join(rev);
    if !dir.join("config.json").exists() {
        return Err(absent(format!("{} has no config.json", dir.display())));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_two_plain_parts() {
        assert!(is_hub_id("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(is_hub_id("meta-llama/Llama-3.2-1B"));
        for bad in [
            "Qwen",
            "a/b/c",
            "../x",
            "a/..",
            "/abs/path",
            "a/.hidden",
            "a b/c",
        ] {
            assert!(!is_hub_id(bad), "{bad}");
        }
    }

    #[test]
    fn finds_the_snapshot_refs_main_names() {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("models--Qwen--Qwen2.5-0.5B-Instruct");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        let err = snapshot(root.path(), "Qwen/Qwen2.5-0.5B-Instruct").unwrap_err();
        assert!(err.to_string().contains("refs/main"), "{err}");
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        let err = snapshot(root.path(), "Qwen/Qwen2.5-0.5B-Instruct").unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(
            snapshot(root.path(), "Qwen/Qwen2.5-0.5B-Instruct").unwrap(),
            snap
        );
        let err = snapshot(root.path(), "Org/Absent").unwrap_err().to_string();
        assert!(
            err.contains("Org/Absent") && err.contains("never downloads"),
            "{err}"
        );
    }
}
