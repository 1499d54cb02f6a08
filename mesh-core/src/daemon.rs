//! The PID file of a running node, and stopping a node by it.
//!
//! ```no_run
//! # fn demo() -> Result<(), mesh_core::daemon::DaemonError> {
//! use mesh_core::daemon::{PidFile, stop};
//! let path = std::path::Path::new("/tmp/mesh-node.pid");
//! let pid_file = PidFile::claim(path)?; // fails if a live process holds it
//! pid_file.set_http_addr("127.0.0.1:9090".parse().unwrap())?;
//! // ... run; dropping `pid_file` removes the file ...
//! # drop(pid_file);
//! stop(path, std::time::Duration::from_secs(30))?; // from another process
//! # Ok(()) }
//! ```
//!
//! The PID file holds the decimal process id and a newline, as systemd's `PIDFile=`
//! expects. The node's actual HTTP address (the configured port may be 0) is kept beside
//! it, in the same path with the extension `http`, so `mesh-node status` can find it.
//! A PID file whose process is gone (a crash, a reboot) is stale and is replaced.
//! `daemon/rotate.rs` keeps the daemon's log file to a size ([`RotatingLog`]).

mod rotate;
pub use rotate::{parse_size, LogRotation, RotatingLog};

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Why a PID file could not be claimed, read or acted on.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Reading or writing the PID file failed.
    #[error("PID file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A live process already holds the PID file.
    #[error(
        "a node is already running with PID {pid} (PID file {path}); stop it with `mesh-node stop`"
    )]
    AlreadyRunning { pid: u32, path: PathBuf },
    /// The PID file does not hold a process id.
    #[error("PID file {path} does not hold a process id: {content:?}")]
    Garbled { path: PathBuf, content: String },
    /// Signalling the process failed (not ours to signal?).
    #[error("could not signal PID {pid}: {source}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    /// The process was still running when the deadline passed.
    #[error("PID {pid} still running {waited:?} after SIGTERM")]
    StillRunning { pid: u32, waited: Duration },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where the HTTP address of the node holding `pid_file` is kept.
pub fn http_addr_path(pid_file: &Path) -> PathBuf {
    pid_file.with_extension("http")
}

/// The PID in `path`, `None` if there is no file.
pub fn read_pid(path: &Path) -> Result<Option<u32>, DaemonError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&pid| pid > 0)
        .map(Some)
        .ok_or_else(|| DaemonError::Garbled {
            path: path.to_owned(),
            content: text.chars().take(40).collect(),
        })
}

/// The HTTP address the node holding `pid_file` wrote, if any.
pub fn read_http_addr(pid_file: &Path) -> Option<SocketAddr> {
    std::fs::read_to_string(http_addr_path(pid_file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The PID of a live process holding `path`, `None` if no file or a stale one.
pub fn running_pid(path: &Path) -> Result<Option<u32>, DaemonError> {
    Ok(read_pid(path)?.filter(|&pid| is_alive(pid)))
}

/// Whether process `pid` exists and is not a zombie.
#[cfg(unix)]
pub fn is_alive(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(raw, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    exists && !is_zombie(pid)
}

#[cfg(not(unix))]
pub fn is_alive(_pid: u32) -> bool {
    false
}

/// An exited process not yet reaped by its parent still answers signal 0.
fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last `)`.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// This process's claim on a PID file; dropping it removes the file (and the HTTP address
/// file) if they still name this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's PID to `path`, replacing a stale file, refusing if a live
    /// process holds it.
    pub fn claim(path: &Path) -> Result<Self, DaemonError> {
        let pid = std::process::id();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(path))?;
        }
        for _ in 0..3 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                Ok(mut file) => {
                    writeln!(file, "{pid}").map_err(io_err(path))?;
                    file.sync_all().map_err(io_err(path))?;
                    return Ok(Self {
                        path: path.to_owned(),
                        pid,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    match read_pid(path) {
                        Ok(Some(other)) if other != pid && is_alive(other) => {
                            return Err(DaemonError::AlreadyRunning {
                                pid: other,
                                path: path.to_owned(),
                            })
                        }
                        // Stale, garbled or our own: replace it.
                        _ => {
                            tracing::info!(path = %path.display(), "replacing a stale PID file");
                            let _ = std::fs::remove_file(path);
                        }
                    }
                }
                Err(e) => return Err(io_err(path)(e)),
            }
        }
        Err(io_err(path)(std::io::Error::other(
            "PID file keeps reappearing",
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the node's HTTP address beside the PID file.
    pub fn set_http_addr(&self, addr: SocketAddr) -> Result<(), DaemonError> {
        let path = http_addr_path(&self.path);
        std::fs::write(&path, format!("{addr}\n")).map_err(io_err(&path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if matches!(read_pid(&self.path), Ok(Some(pid)) if pid == self.pid) {
            let _ = std::fs::remove_file(http_addr_path(&self.path));
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Sends SIGTERM to `pid`.
#[cfg(unix)]
pub fn terminate(pid: u32) -> Result<(), DaemonError> {
    let raw = libc::pid_t::try_from(pid).map_err(|_| DaemonError::Signal {
        pid,
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: plain kill(2) on a PID read from the PID file.
    if unsafe { libc::kill(raw, libc::SIGTERM) } != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::ESRCH) {
            return Err(DaemonError::Signal { pid, source });
        }
    }
    Ok(())
}

#[cfg(not(unix))]
pub fn terminate(pid: u32) -> Result<(), DaemonError> {
    Err(DaemonError::Signal {
        pid,
        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
    })
}

/// Waits until `pid` is gone; false if it is still there after `limit`.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while is_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// What [`stop`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The process exited after SIGTERM.
    Stopped { pid: u32 },
    /// No PID file, or a stale one (now removed).
    NotRunning,
}

/// Stops the node holding `pid_file`: SIGTERM, wait up to `limit`, remove the PID file if
/// the node did not (it does on a clean exit).
pub fn stop(pid_file: &Path, limit: Duration) -> Result<Stopped, DaemonError> {
    let Some(pid) = read_pid(pid_file)? else {
        return Ok(Stopped::NotRunning);
    };
    let remove = || {
        let _ = std::fs::remove_file(http_addr_path(pid_file));
        let _ = std::fs::remove_file(pid_file);
    };
    if !is_alive(pid) {
        remove();
        return Ok(Stopped::NotRunning);
    }
    let started = Instant::now();
    terminate(pid)?;
    if !wait_gone(pid, limit) {
        return Err(DaemonError::StillRunning {
            pid,
            waited: started.elapsed(),
        });
    }
    // The node removes its PID file on a clean exit; give it a moment, then tidy up.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pid_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(read_pid(pid_file), Ok(Some(p)) if p == pid) {
        remove();
    }
    Ok(Stopped::Stopped { pid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_write_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/node.pid");
        let claim = PidFile::claim(&path).unwrap();
        assert_eq!(read_pid(&path).unwrap(), Some(std::process::id()));
        assert_eq!(running_pid(&path).unwrap(), Some(std::process::id()));
        claim
            .set_http_addr("127.0.0.1:9999".parse().unwrap())
            .unwrap();
        assert_eq!(read_http_addr(&path).unwrap().port(), 9999);
        drop(claim);
        assert!(!path.exists() && !http_addr_path(&path).exists());
        assert_eq!(
            stop(&path, Duration::from_secs(1)).unwrap(),
            Stopped::NotRunning
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_live_holder_is_refused_and_a_stale_file_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.pid");
        // PID 1 is always alive (init, or the container's first process).
        std::fs::write(&path, "1\n").unwrap();
        let err = PidFile::claim(&path).unwrap_err();
        assert!(
            matches!(err, DaemonError::AlreadyRunning { pid: 1, .. }),
            "{err}"
        );
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "1\n",
            "not overwritten"
        );

        // A process that has exited and been reaped.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        std::fs::write(&path, format!("{gone}\n")).unwrap();
        let claim = PidFile::claim(&path).unwrap();
        assert_eq!(read_pid(claim.path()).unwrap(), Some(std::process::id()));

        std::fs::write(dir.path().join("bad.pid"), "hello").unwrap();
        assert!(matches!(
            read_pid(&dir.path().join("bad.pid")),
            Err(DaemonError::Garbled { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn stop_terminates_and_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.pid");
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(&path, format!("{}\n", child.id())).unwrap();
        // Reap the child in the background so it does not linger as a zombie.
        let pid = child.id();
        let reaper = std::thread::spawn(move || child.wait());
        assert_eq!(
            stop(&path, Duration::from_secs(10)).unwrap(),
            Stopped::Stopped { pid }
        );
        assert!(!path.exists());
        let _ = reaper.join();
    }
}
