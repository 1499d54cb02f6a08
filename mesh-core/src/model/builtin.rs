//! The models built into every binary, by name: nothing is downloaded to try mesh.
//!
//! - [`Builtin::Demo`] (`mesh-demo`), the default: a 6-block Llama trained on
//!   public-domain novels (`scripts/train_demo_model.py`), so the first command a newcomer
//!   runs prints English words, not noise.
//! - [`Builtin::DemoDraft`] (`mesh-demo-draft`): two blocks distilled from it, same tokenizer,
//!   the draft model for speculative decoding with the demo model.
//! - [`Builtin::Tiny`] (`tiny-llama-mesh`): random weights from a fixed seed, for tests
//!   that need exact numbers and the smallest possible model.
//!
//! Each is written once into `$MESH_HOME/models/<name>-<fingerprint>` as a real Hugging
//! Face directory and read from there like any other model.

use std::path::{Path, PathBuf};

use super::{tiny, ModelError};

/// The trained models' files, embedded at build time.
struct Embedded {
    id: &'static str,
    files: &'static [(&'static str, &'static [u8])],
}

macro_rules! embed_model {
    ($dir:literal) => {
        Embedded {
            id: $dir,
            files: &[
                (
                    "config.json",
                    include_bytes!(concat!("../../models/", $dir, "/config.json")),
                ),
                (
                    "model.safetensors",
                    include_bytes!(concat!("../../models/", $dir, "/model.safetensors")),
                ),
                (
                    "tokenizer.json",
                    include_bytes!(concat!("../../models/", $dir, "/tokenizer.json")),
                ),
                (
                    "tokenizer_config.json",
                    include_bytes!(concat!("../../models/", $dir, "/tokenizer_config.json")),
                ),
            ],
        }
    };
}

static DEMO: Embedded = embed_model!("mesh-demo");
static DEMO_DRAFT: Embedded = embed_model!("mesh-demo-draft");

/// A model that ships inside the binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Demo,
    DemoDraft,
    Tiny,
}

/// What `demo`, `local`, `mesh-node` and the examples serve unless told otherwise.
pub const DEFAULT: Builtin = Builtin::Demo;

/// [`DEFAULT`]'s name, for argument defaults.
pub const DEFAULT_ID: &str = "mesh-demo";

impl Builtin {
    pub const ALL: [Builtin; 3] = [Builtin::Demo, Builtin::DemoDraft, Builtin::Tiny];

    /// The name the model is served under on the mesh.
    pub fn id(self) -> &'static str {
        match self {
            Self::Demo => DEMO.id,
            Self::DemoDraft => DEMO_DRAFT.id,
            Self::Tiny => tiny::TINY_MODEL_ID,
        }
    }

    /// The built-in model served under `id`, if any.
    pub fn named(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.id() == id)
    }

    /// The names of all built-in models, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::id).join(", ")
    }

    /// Writes the model under `$MESH_HOME/models` unless an identical copy is there.
    pub fn ensure(self) -> Result<PathBuf, ModelError> {
        self.ensure_under(&crate::paths::mesh_home().join("models"))
    }

    /// Writes the model under `models_dir` unless an identical copy is there; returns
    /// its directory.
    pub fn ensure_under(self, models_dir: &Path) -> Result<PathBuf, ModelError> {
        match self {
            Self::Tiny => tiny::ensure(&models_dir.join(tiny::dir_name())),
            Self::Demo => DEMO.ensure(models_dir),
            Self::DemoDraft => DEMO_DRAFT.ensure(models_dir),
        }
    }

    /// The built-in model whose copy `dir` is (by the marker [`Builtin::ensure`] and
    /// the tiny model's writer leave), if any: the name to serve it under.
    pub fn of_dir(dir: &Path) -> Option<Self> {
        if dir.join(tiny::MARKER).is_file() {
            return Some(Self::Tiny);
        }
        let marker = std::fs::read_to_string(dir.join(MARKER)).ok()?;
        let id = marker.split_whitespace().next()?;
        Self::named(id)
    }
}

/// The file that says a directory holds a complete copy (written last).
const MARKER: &str = "mesh-builtin.fingerprint";

impl Embedded {
    /// FNV-1a over every file: a new build of the model gets a new directory, so a copy
    /// left by an older binary is never mistaken for it.
    fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, bytes) in self.files {
            for b in name.bytes().chain(bytes.iter().copied()) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    fn ensure(&self, models_dir: &Path) -> Result<PathBuf, ModelError> {
        let fingerprint = self.fingerprint();
        let dir = models_dir.join(format!("{}-{}", self.id, &fingerprint[..8]));
        let marker = dir.join(MARKER);
        let stamp = format!("{} {fingerprint}", self.id);
        if std::fs::read_to_string(&marker).is_ok_and(|v| v == stamp) {
            return Ok(dir.to_path_buf());
        }
        std::fs::create_dir_all(&dir).map_err(|source| ModelError::Write {
            path: dir.clone(),
            source,
        })?;
        for (name, bytes) in self.files {
            tiny::write_atomic(&dir.join(name), bytes)?;
        }
        tiny::write_atomic(&marker, stamp.as_bytes())?;
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelFiles;

    #[test]
    fn every_builtin_is_written_once_and_opens_as_a_model() {
        let home = tempfile::tempdir().unwrap();
        for b in Builtin::ALL {
            let dir = b.ensure_under(home.path()).unwrap();
            assert_eq!(Builtin::named(b.id()), Some(b));
            assert_eq!(Builtin::of_dir(&dir), Some(b));
            let files = ModelFiles::open(&dir).unwrap();
            assert!(files.config.num_blocks() >= 1, "{b:?}");
            // A second call finds the copy and leaves it alone.
            let written = std::fs::metadata(dir.join("config.json"))
                .unwrap()
                .modified()
                .unwrap();
            assert_eq!(b.ensure_under(home.path()).unwrap(), dir);
            let again = std::fs::metadata(dir.join("config.json"))
                .unwrap()
                .modified()
                .unwrap();
            assert_eq!(written, again, "{b:?} was rewritten");
        }
        assert_eq!(Builtin::named("gpt-5"), None);
        assert_eq!(Builtin::of_dir(home.path()), None);
        assert_eq!(DEFAULT.id(), DEFAULT_ID);
    }

    #[test]
    fn the_draft_shares_the_demo_models_tokenizer() {
        assert_eq!(DEMO.files[2].1, DEMO_DRAFT.files[2].1);
    }
}
