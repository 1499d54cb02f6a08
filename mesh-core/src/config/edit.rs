//! Changing one key of an existing `node.toml` in place, keeping the operator's comments
//! and layout (`mesh-node register` writes the span it checked this way).

use std::path::Path;

use super::{invalid, toml_str, ConfigError, NodeFile};
use crate::types::BlockRange;

/// `key` if `line` sets it (`key = ...`), or shows it commented out (`# key = ...`).
fn sets_key(line: &str, key: &str) -> Option<bool> {
    let t = line.trim_start();
    let (commented, t) = match t.strip_prefix('#') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, t),
    };
    let rest = t.strip_prefix(key)?;
    rest.trim_start().starts_with('=').then_some(commented)
}

/// Sets `blocks = "START..END"` in the config file at `path` and keeps everything else as
/// it is (comments, other keys, their order): a top-level `blocks` line is replaced (a
/// set one first, else the commented-out example), or one is added before the first
/// table. The new text is parsed back before it replaces the file (written beside, then
/// renamed), so a failure leaves the file as it was.
pub fn set_blocks(path: &Path, span: BlockRange) -> Result<(), ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let value = format!("{}..{}", span.start, span.end);
    let new_line = format!("blocks = {}", toml_str(&value));
    let lines: Vec<&str> = text.lines().collect();
    let top = lines
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(lines.len());
    let find = |commented| (0..top).find(|&i| sets_key(lines[i], "blocks") == Some(commented));
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    match find(false).or_else(|| find(true)) {
        Some(i) => out[i] = new_line,
        None => {
            out.insert(top, String::new());
            out.insert(top, new_line);
        }
    }
    let mut new_text = out.join("\n");
    new_text.push('\n');
    let parsed = NodeFile::parse(&new_text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })?;
    if parsed.blocks.as_deref() != Some(value.as_str()) {
        return Err(invalid(
            "blocks",
            format!("could not be set in {}", path.display()),
        ));
    }
    let tmp = path.with_extension(format!("toml.tmp{}", std::process::id()));
    std::fs::write(&tmp, new_text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_blocks_keeps_the_rest_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let mut f = NodeFile::default();
        f.network.bootstrap = vec!["/ip4/1.2.3.4/tcp/31337".into()];
        f.write_new(&path, false).unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        assert!(before.contains("# blocks = \"0..8\""), "{before}");
        set_blocks(&path, BlockRange::new(2, 6)).unwrap();
        let after = std::fs::read_to_string(&path).unwrap();
        let back = NodeFile::load(&path).unwrap();
        assert_eq!(back.blocks.as_deref(), Some("2..6"));
        assert_eq!(back.network.bootstrap, f.network.bootstrap);
        // One line changed: the commented example became the setting.
        let changed: Vec<_> = before
            .lines()
            .zip(after.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(changed, vec![("# blocks = \"0..8\"", "blocks = \"2..6\"")]);
        // Set again: the set line is replaced, not the comment above it.
        set_blocks(&path, BlockRange::new(0, 3)).unwrap();
        assert_eq!(
            NodeFile::load(&path).unwrap().blocks.as_deref(),
            Some("0..3")
        );
        // A file without the line gets it before its first table; comments stay.
        std::fs::write(
            &path,
            "# mine\nmodel = \"tiny-llama-mesh\"\n[limits]\nmax_len = 64\n",
        )
        .unwrap();
        set_blocks(&path, BlockRange::new(1, 2)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("# mine\nmodel = \"tiny-llama-mesh\"\nblocks = \"1..2\"\n"),
            "{text}"
        );
        assert_eq!(NodeFile::load(&path).unwrap().limits.max_len, 64);
        // A broken file stays as it is.
        std::fs::write(&path, "modle = 1\n").unwrap();
        assert!(set_blocks(&path, BlockRange::new(0, 1)).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "modle = 1\n");
    }
}
