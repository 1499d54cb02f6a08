//! The sections of `node.toml` about a node running by itself: `[daemon]` (PID file, log
//! file and its rotation) and `[settle]` (settlement on a schedule).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, opt_line, toml_str, ConfigError};
use crate::daemon::{parse_size, LogRotation};
use crate::http::schedule::{parse_period, SettleSchedule};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Daemon {
    /// Default `mesh-node.pid` beside this file.
    pub pid_file: Option<PathBuf>,
    /// Where `start --daemon` writes its output; default `mesh-node.log` beside this file.
    pub log_file: Option<PathBuf>,
    /// Size at which the log is rotated, e.g. `"64MiB"`; `"0"` never rotates.
    pub log_max_size: String,
    /// Rotated logs kept (`mesh-node.log.1` … `.N`).
    pub log_keep: u32,
}

impl Default for Daemon {
    fn default() -> Self {
        Self {
            pid_file: None,
            log_file: None,
            log_max_size: "64MiB".into(),
            log_keep: 5,
        }
    }
}

impl Daemon {
    /// The log rotation, `None` when it is off.
    pub fn rotation(&self) -> Result<Option<LogRotation>, ConfigError> {
        let max_bytes =
            parse_size(&self.log_max_size).map_err(|m| invalid("daemon.log_max_size", m))?;
        Ok((max_bytes > 0).then_some(LogRotation {
            max_bytes,
            keep: self.log_keep,
        }))
    }

    pub(super) fn toml(&self) -> String {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| toml_str(&p.display().to_string()));
        format!(
            r#"[daemon]
# PID file written while the node runs (`mesh-node stop` signals it).
{pid_file}
# Output of `mesh-node start --daemon`.
{log_file}
# The log is rotated at this size ("64MiB", "512KiB"; "0" never) into mesh-node.log.1,
# .2, ...; log_keep of them are kept, the oldest deleted.
log_max_size = {max_size}
log_keep = {keep}
"#,
            pid_file = opt_line("pid_file", path(&self.pid_file), "\"mesh-node.pid\""),
            log_file = opt_line("log_file", path(&self.log_file), "\"mesh-node.log\""),
            max_size = toml_str(&self.log_max_size),
            keep = self.log_keep,
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settle {
    /// How often the running node settles, e.g. `"7d"`, `"12h"`; absent: only by hand.
    pub every: Option<String>,
    /// Micro-units due in all below which a scheduled settlement waits for the next one.
    pub minimum: u64,
}

impl Settle {
    /// The schedule, `None` when the node settles only by hand.
    pub fn schedule(&self) -> Result<Option<SettleSchedule>, ConfigError> {
        let Some(every) = &self.every else {
            return Ok(None);
        };
        let every = parse_period(every).map_err(|m| invalid("settle.every", m))?;
        Ok(Some(SettleSchedule {
            every,
            minimum: self.minimum,
        }))
    }

    pub(super) fn toml(&self) -> String {
        format!(
            r#"[settle]
# Settle on a schedule while the node runs ("7d", "24h", "30m"): each time, if the
# receipts due add up to at least `minimum` micro-units, a batch is written under
# <ledger>/settlements/ and the receipts are marked settled; below it, the node waits
# for the next time. Without `every` the node settles only by `mesh-node settle`.
{every}
minimum = {minimum}
"#,
            every = opt_line("every", self.every.as_deref().map(toml_str), "\"7d\""),
            minimum = self.minimum,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_and_schedule_resolve_or_name_the_key() {
        let d = Daemon::default();
        assert_eq!(
            d.rotation().unwrap(),
            Some(LogRotation {
                max_bytes: 64 << 20,
                keep: 5
            })
        );
        let off = Daemon {
            log_max_size: "0".into(),
            ..Daemon::default()
        };
        assert_eq!(off.rotation().unwrap(), None);
        let bad = Daemon {
            log_max_size: "big".into(),
            ..Daemon::default()
        };
        assert!(bad
            .rotation()
            .unwrap_err()
            .to_string()
            .starts_with("daemon.log_max_size"));

        assert_eq!(Settle::default().schedule().unwrap(), None);
        let weekly = Settle {
            every: Some("7d".into()),
            minimum: 1000,
        };
        let s = weekly.schedule().unwrap().unwrap();
        assert_eq!(s.every.as_secs(), 7 * 86_400);
        assert_eq!(s.minimum, 1000);
        let e = Settle {
            every: Some("weekly".into()),
            minimum: 0,
        };
        assert!(e
            .schedule()
            .unwrap_err()
            .to_string()
            .starts_with("settle.every"));
    }
}
