//! A daemon's log file that cannot fill the disk: once it passes `max_bytes` it is renamed
//! `NAME.1` (the older ones shifting to `NAME.2` … `NAME.KEEP`, the oldest deleted) and a
//! fresh `NAME` is started. Log lines are written through [`RotatingLog`], which rotates
//! between lines, never inside one; with `redirect_stdio` the process's stdout and stderr
//! are pointed at each fresh file too, so what else it prints (start-up lines, a panic)
//! lands in the current log rather than in a renamed one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::DaemonError;

/// How large a log grows before it is rotated, and how many rotated files are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRotation {
    pub max_bytes: u64,
    /// Rotated files kept beside the current one (0: the full log is deleted).
    pub keep: u32,
}

struct State {
    path: PathBuf,
    file: File,
    written: u64,
    rotation: LogRotation,
    redirect_stdio: bool,
    /// Not rotating for now (see [`RotatingLog::pause`]).
    paused: bool,
}

/// A log file rotated by size; cheap to clone (clones write to the same file).
#[derive(Clone)]
pub struct RotatingLog(Arc<Mutex<State>>);

impl RotatingLog {
    /// Appends to `path` (created if missing), counting what is already there.
    pub fn open(
        path: &Path,
        rotation: LogRotation,
        redirect_stdio: bool,
    ) -> Result<Self, DaemonError> {
        let file = open_append(path)?;
        let written = file.metadata().map_err(super::io_err(path))?.len();
        let state = State {
            path: path.to_owned(),
            file,
            written,
            rotation,
            redirect_stdio,
            paused: false,
        };
        if redirect_stdio {
            redirect(&state.file);
        }
        Ok(Self(Arc::new(Mutex::new(state))))
    }

    /// Stop rotating (the file grows) until called again with `false`: a daemon's start-up
    /// output stays in one file for `start --daemon` to read back.
    pub fn pause(&self, paused: bool) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).paused = paused;
    }

    /// Write one whole line (or several), rotating first if it would pass the size.
    pub fn write_line(&self, line: &[u8]) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let over = s.written.saturating_add(line.len() as u64) > s.rotation.max_bytes;
        if over && s.written > 0 && !s.paused {
            // A log that cannot rotate keeps going in the same file: losing lines is worse.
            if let Err(e) = s.rotate() {
                let _ = writeln!(s.file, "log rotation failed: {e}");
            }
        }
        s.file.write_all(line)?;
        s.written = s.written.saturating_add(line.len() as u64);
        Ok(())
    }
}

impl State {
    fn rotate(&mut self) -> std::io::Result<()> {
        let keep = self.rotation.keep;
        let numbered = |n: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            // The oldest goes; each other moves one up; the current becomes .1.
            match std::fs::remove_file(numbered(keep)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for n in (1..keep).rev() {
                match std::fs::rename(numbered(n), numbered(n + 1)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        if self.redirect_stdio {
            redirect(&self.file);
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File, DaemonError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(super::io_err(path))
}

/// Points this process's stdout and stderr at `file`.
#[cfg(unix)]
fn redirect(file: &File) {
    use std::os::fd::AsRawFd;
    let _ = std::io::stdout().flush();
    for target in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 onto the standard descriptors from a file we hold open; on failure
        // they keep pointing where they did.
        unsafe { libc::dup2(file.as_raw_fd(), target) };
    }
}

#[cfg(not(unix))]
fn redirect(_file: &File) {}

impl std::io::Write for RotatingLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_line(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Parses a size such as `64MiB`, `512KiB`, `1GiB`, `64M`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as \"64MiB\""))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (B, KiB, MiB or GiB)"
            ))
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5TB").unwrap_err().contains("unknown unit"));
    }

    /// Real files: lines are never split, at most `keep` rotated files stay, the newest
    /// lines are in the current file and the one before in `.1`.
    #[test]
    fn a_log_rotates_by_size_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.log");
        let rotation = LogRotation {
            max_bytes: 100,
            keep: 2,
        };
        let log = RotatingLog::open(&path, rotation, false).unwrap();
        for i in 0..40 {
            log.write_line(format!("line {i:03} of the log\n").as_bytes())
                .unwrap();
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        let current = read(&path);
        let one = read(&dir.path().join("node.log.1"));
        let two = read(&dir.path().join("node.log.2"));
        assert!(!dir.path().join("node.log.3").exists(), "only 2 kept");
        for text in [&current, &one, &two] {
            assert!(text.len() <= 100, "{text:?}");
            assert!(text.lines().all(|l| l.ends_with("of the log")), "{text:?}");
        }
        assert!(current.ends_with("line 039 of the log\n"), "{current}");
        let next = |t: &str| t.lines().next().unwrap().to_string();
        let last = |t: &str| t.lines().last().unwrap().to_string();
        let number = |l: String| l[5..8].parse::<u32>().unwrap();
        assert_eq!(number(last(&one)) + 1, number(next(&current)));
        assert_eq!(number(last(&two)) + 1, number(next(&one)));
        // Reopened, it counts what the file holds already.
        drop(log);
        let log = RotatingLog::open(&path, rotation, false).unwrap();
        log.write_line(&[b'x'; 90]).unwrap();
        assert_eq!(read(&path).len(), 90, "rotated before the line, not after");
        // Paused, the file grows past the size; resumed, the next line rotates it.
        log.pause(true);
        log.write_line(&[b'y'; 90]).unwrap();
        assert_eq!(read(&path).len(), 180);
        log.pause(false);
        log.write_line(b"z\n").unwrap();
        assert_eq!(read(&path), "z\n");
        assert_eq!(read(&dir.path().join("node.log.1")).len(), 180);
    }
}
