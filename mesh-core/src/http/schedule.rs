//! Settlement on a schedule (`[settle] every = "7d"`, `minimum`), as a weekly payout with
//! a minimum works: each period the running node adds up what its receipts have due and,
//! if that reaches the minimum, settles them as `POST /api/settle` would (a batch under
//! `<ledger>/settlements/`, receipts marked settled); below it, it waits for the next
//! period. `/healthz` shows what it did last and when it settles next.
//!
//! The first time comes a period after the newest batch in `<ledger>/settlements/` (so a
//! restart does not reset a weekly schedule), or a period after start when there is none.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::settle::{SettleRequest, SETTLEMENTS_DIR};
use super::HttpState;
use crate::ledger;

/// How often to settle, and the least worth settling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettleSchedule {
    pub every: Duration,
    /// Micro-units due in all below which a settlement waits for the next period.
    pub minimum: u64,
}

/// Parses a period: a number and a unit, `s`, `m`, `h`, `d` or `w` (`"7d"`, `"90s"`).
pub fn parse_period(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a period such as \"7d\" or \"12h\""))?;
    let secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (s, m, h, d or w)")),
    };
    match n.checked_mul(secs) {
        Some(0) => Err(format!("{s:?}: the period must be longer than 0")),
        Some(total) => Ok(Duration::from_secs(total)),
        None => Err(format!("{s:?} is too long")),
    }
}

/// What one scheduled settlement did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledRun {
    /// When it ran, ms since the Unix epoch.
    pub at_ms: u64,
    /// `settled`, `waiting` (below the minimum) or `failed`.
    pub outcome: String,
    /// Micro-units due when it ran.
    pub due: u64,
    /// Lines of the batch written (settled only).
    #[serde(default)]
    pub lines: usize,
    /// The batch file (settled only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The schedule as `/healthz` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleStatus {
    pub every_secs: u64,
    pub minimum: u64,
    /// When it runs next, ms since the Unix epoch.
    pub next_ms: u64,
    /// Scheduled settlements made, and times it waited below the minimum.
    pub settled: u64,
    pub waited: u64,
    pub last: Option<ScheduledRun>,
}

/// The newest batch's time in `<ledger>/settlements/` (`settlement-<ms>[-n].json`).
fn newest_batch_ms(ledger_dir: &Path) -> Option<u64> {
    std::fs::read_dir(ledger_dir.join(SETTLEMENTS_DIR))
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix("settlement-")?.strip_suffix(".json")?;
            rest.split('-').next()?.parse::<u64>().ok()
        })
        .max()
}

impl HttpState {
    /// The schedule's status, `None` without one.
    pub fn schedule_status(&self) -> Option<ScheduleStatus> {
        self.0
            .schedule
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn update_schedule(&self, f: impl FnOnce(&mut ScheduleStatus)) {
        let mut s = self.0.schedule.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = s.as_mut() {
            f(status);
        }
    }

    /// Settle every `schedule.every` while the node runs; runs until dropped (spawn it,
    /// abort it at shutdown). Waits for the node to be up before the first period counts.
    pub async fn settle_on_schedule(self, schedule: SettleSchedule) {
        let every_ms = u64::try_from(schedule.every.as_millis()).unwrap_or(u64::MAX);
        while self.0.node.get().is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ledger_dir = self
            .0
            .node
            .get()
            .and_then(|n| n.ledger().map(|s| s.path().to_owned()));
        let Some(ledger_dir) = ledger_dir else {
            tracing::warn!(
                "[settle] every is set, but this node keeps no ledger: nothing to settle"
            );
            return;
        };
        let now = ledger::now_ms();
        let mut next_ms = newest_batch_ms(&ledger_dir)
            .map_or(now, |last| last.max(now.saturating_sub(every_ms)))
            .saturating_add(every_ms);
        *self.0.schedule.lock().unwrap_or_else(|p| p.into_inner()) = Some(ScheduleStatus {
            every_secs: schedule.every.as_secs(),
            minimum: schedule.minimum,
            next_ms,
            ..ScheduleStatus::default()
        });
        tracing::info!(every = ?schedule.every, minimum = schedule.minimum, next_ms, "settlement scheduled");
        loop {
            let wait = next_ms.saturating_sub(ledger::now_ms());
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let run = self.scheduled_settlement(schedule.minimum).await;
            next_ms = ledger::now_ms().saturating_add(every_ms);
            self.update_schedule(|s| {
                match run.outcome.as_str() {
                    "settled" => s.settled += 1,
                    "waiting" => s.waited += 1,
                    _ => {}
                }
                s.next_ms = next_ms;
                s.last = Some(run);
            });
        }
    }

    /// One scheduled settlement: settle everything due if it reaches `minimum`.
    pub async fn scheduled_settlement(&self, minimum: u64) -> ScheduledRun {
        let at_ms = ledger::now_ms();
        let failed = |due, e: String| {
            tracing::warn!("scheduled settlement failed: {e}");
            ScheduledRun {
                at_ms,
                outcome: "failed".into(),
                due,
                error: Some(e),
                ..ScheduledRun::default()
            }
        };
        let req = SettleRequest {
            // Nothing due is never worth a batch.
            min_total: minimum.max(1),
            ..SettleRequest::default()
        };
        match self.settle(req).await {
            Ok(answer) if answer.waited => {
                let due = answer.batch.total_due;
                tracing::info!(
                    due,
                    minimum,
                    "scheduled settlement waits: {due} due, below the minimum of {minimum}"
                );
                ScheduledRun {
                    at_ms,
                    outcome: "waiting".into(),
                    due,
                    ..ScheduledRun::default()
                }
            }
            Ok(answer) => {
                let due = answer.batch.total_due;
                let lines = answer.batch.lines.len();
                tracing::info!(
                    due,
                    lines,
                    path = %answer.path.display(),
                    "settled by schedule: {lines} lines, {due} due"
                );
                ScheduledRun {
                    at_ms,
                    outcome: "settled".into(),
                    due,
                    lines,
                    path: Some(answer.path),
                    error: None,
                }
            }
            Err(e) => failed(0, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse() {
        assert_eq!(parse_period("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_period("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_period(" 2w "), Ok(Duration::from_secs(1_209_600)));
        assert!(parse_period("0h").unwrap_err().contains("longer than 0"));
        assert!(parse_period("7 days").unwrap_err().contains("unknown unit"));
        assert!(parse_period("d").is_err());
    }

    #[test]
    fn the_newest_batch_sets_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(newest_batch_ms(dir.path()), None);
        let batches = dir.path().join(SETTLEMENTS_DIR);
        std::fs::create_dir_all(&batches).unwrap();
        for name in [
            "settlement-1000.json",
            "settlement-3000-1.json",
            "settlement-2000.json",
            "notes.txt",
        ] {
            std::fs::write(batches.join(name), "{}").unwrap();
        }
        assert_eq!(newest_batch_ms(dir.path()), Some(3000));
    }
}
