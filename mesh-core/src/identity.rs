//! A peer's persistent ed25519 identity, kept on disk.
//!
//! The file holds the 32-byte ed25519 secret seed and nothing else. It is created on first
//! use with mode `0600` inside a directory created with mode `0700`; a key file readable by
//! group or others is refused when loading (fix it with `chmod 600 FILE`). The same key gives
//! the libp2p [`PeerId`] and, later, signs ledger receipts ([`Identity::signing_key`]).
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let path = dir.path().join("node.key");
//! let a = mesh_core::identity::Identity::load_or_create(&path).unwrap();
//! let b = mesh_core::identity::Identity::load_or_create(&path).unwrap();
//! assert_eq!(a.peer_id(), b.peer_id());
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use libp2p::identity::{self, Keypair};
use libp2p::PeerId;

/// Length of the key file: one raw ed25519 secret seed.
pub const KEY_FILE_LEN: usize = 32;

/// Why an identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading, creating or renaming the key file (or its directory) failed.
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold exactly [`KEY_FILE_LEN`] bytes.
    #[error("key file {path} holds {len} bytes, expected {KEY_FILE_LEN}")]
    BadLength { path: PathBuf, len: usize },
    /// The key path names a directory (or another non-file): `--key` or `key` points at
    /// the wrong place.
    #[error("key file {path} is a directory, not a key file: point --key (or `key` in node.toml) at a file, e.g. {path}/node.key")]
    NotAFile { path: PathBuf },
    /// The key file is readable or writable by group or others.
    #[error("key file {path} has mode {mode:o}; run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    /// The bytes are not a valid ed25519 secret key.
    #[error("invalid ed25519 key: {0}")]
    Decode(#[from] identity::DecodingError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One peer's ed25519 key pair, usable both by libp2p and for signing receipts.
#[derive(Clone)]
pub struct Identity {
    secret: [u8; KEY_FILE_LEN],
    keypair: Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random identity (not saved anywhere).
    pub fn generate() -> Self {
        let kp = identity::ed25519::Keypair::generate();
        let mut secret = [0u8; KEY_FILE_LEN];
        secret.copy_from_slice(kp.secret().as_ref());
        Self {
            secret,
            keypair: Keypair::from(kp),
        }
    }

    /// The identity whose ed25519 secret seed is `secret`.
    pub fn from_secret(secret: [u8; KEY_FILE_LEN]) -> Result<Self, IdentityError> {
        let mut copy = secret;
        let keypair = Keypair::ed25519_from_bytes(&mut copy)?;
        Ok(Self { secret, keypair })
    }

    /// Default key path for a role (`node`, `bootstrap`, `client`): `<mesh home>/<role>.key`.
    pub fn default_path(role: &str) -> PathBuf {
        crate::paths::mesh_home().join(format!("{role}.key"))
    }

    /// Loads the key at `path`, or creates it (and its directory) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// Loads an existing key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let meta = std::fs::metadata(path).map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(IdentityError::NotAFile {
                path: path.to_owned(),
            });
        }
        check_permissions(path, &meta)?;
        if meta.len() != KEY_FILE_LEN as u64 {
            return Err(IdentityError::BadLength {
                path: path.to_owned(),
                len: usize::try_from(meta.len()).unwrap_or(usize::MAX),
            });
        }
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let secret: [u8; KEY_FILE_LEN] =
            bytes
                .as_slice()
                .try_into()
                .map_err(|_| IdentityError::BadLength {
                    path: path.to_owned(),
                    len: bytes.len(),
                })?;
        Self::from_secret(secret)
    }

    /// Creates a new key at `path` (mode 0600, directory 0700), failing if it already exists.
    pub fn create(path: &Path) -> Result<Self, IdentityError> {
        let id = Self::generate();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        // Write to a temporary file first so a crash never leaves a truncated key behind.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = open_private(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&id.secret).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        if let Err(e) = std::fs::hard_link(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            // Another process created the key first: use theirs.
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return Self::load(path);
            }
            return Err(io_err(path)(e));
        }
        std::fs::remove_file(&tmp).map_err(io_err(&tmp))?;
        Ok(id)
    }

    /// The libp2p key pair (for the swarm and gossipsub signing).
    pub fn keypair(&self) -> Keypair {
        self.keypair.clone()
    }

    /// The peer id derived from the public key.
    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// The same key as an ed25519-dalek signing key (for receipts).
    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_bytes(&self.secret)
    }
}

#[cfg(unix)]
fn check_permissions(path: &Path, meta: &std::fs::Metadata) -> Result<(), IdentityError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), IdentityError> {
    Ok(())
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded_with_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("node.key");
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(
            a.signing_key().verifying_key(),
            b.signing_key().verifying_key()
        );
        // The dalek key and the libp2p key are the same key.
        let msg = b"receipt";
        let sig = a.keypair().sign(msg).unwrap();
        let dalek_sig = ed25519_dalek::Signer::sign(&a.signing_key(), msg);
        assert_eq!(sig, dalek_sig.to_bytes().to_vec());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600);
            assert_eq!(mode(path.parent().unwrap()), 0o700);
        }
    }

    #[test]
    fn rejects_bad_length_and_open_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        std::fs::write(&path, b"short").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(matches!(
                Identity::load(&path),
                Err(IdentityError::BadLength { len: 5, .. })
            ));
            std::fs::write(&path, [7u8; 32]).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                Identity::load(&path),
                Err(IdentityError::Permissions { .. })
            ));
        }
    }
}
