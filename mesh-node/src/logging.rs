//! Log lines: human-readable text by default, or one JSON object a line for collectors.
//!
//! Every JSON line has the same leading keys, whatever emitted it, so a collector can index
//! them without knowing mesh's events:
//!
//! ```text
//! {"ts":"2025-06-01T12:34:56.789Z","level":"info","peer_id":"12D3KooW...","session_id":null,
//!  "event":"span loaded","target":"mesh_core::node","model":"tiny-llama-mesh",...}
//! ```
//!
//! `peer_id` is this node's (null until its key is loaded), `session_id` the event's
//! `session` or `session_id` field (null when the event is not about one session), `event`
//! the message; the event's other fields follow under their own names.

use std::fmt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

static PEER_ID: OnceLock<String> = OnceLock::new();

/// Names this node in every later JSON line; the first call wins.
pub fn set_peer_id(peer_id: &str) {
    let _ = PEER_ID.set(peer_id.to_owned());
}

/// Installs the global subscriber: `RUST_LOG` if set, else `default_filter`; on stderr.
pub fn init(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.event_format(JsonLines).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// Like [`init`], writing to the daemon's log file, which rotates by size (see
/// `mesh_core::daemon::RotatingLog`).
pub fn init_rotating(json: bool, default_filter: &str, log: mesh_core::daemon::RotatingLog) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || log.clone())
        .with_ansi(false);
    if json {
        builder.event_format(JsonLines).init();
    } else {
        builder.init();
    }
}

/// `2025-06-01T12:34:56.789Z` for ms since the Unix epoch.
fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) % 86_400;
    format!(
        "{}T{:02}:{:02}:{:02}.{:03}Z",
        mesh_core::ledger::utc_day(ms),
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60,
        ms % 1000
    )
}

/// An event's fields as JSON values; the message and the session id set apart.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    session: Option<String>,
    other: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        match field.name() {
            "message" => {
                self.message = Some(match value {
                    Value::String(s) => s,
                    v => v.to_string(),
                })
            }
            "session" | "session_id" => {
                self.session = Some(match value {
                    Value::String(s) => s,
                    v => v.to_string(),
                })
            }
            name => {
                self.other.insert(name.to_owned(), value);
            }
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

/// The JSON line format (see the module docs).
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let meta = event.metadata();
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let fixed = [
            ("ts", Value::String(rfc3339(ms))),
            (
                "level",
                Value::String(meta.level().as_str().to_ascii_lowercase()),
            ),
            (
                "peer_id",
                PEER_ID
                    .get()
                    .map_or(Value::Null, |p| Value::String(p.clone())),
            ),
            (
                "session_id",
                fields.session.map_or(Value::Null, Value::String),
            ),
            (
                "event",
                Value::String(fields.message.unwrap_or_else(|| meta.name().to_owned())),
            ),
            ("target", Value::String(meta.target().to_owned())),
        ];
        // Written by hand to keep the fixed keys first, in this order.
        let mut line = String::from("{");
        let mut put = |k: &str, v: &Value| {
            if line.len() > 1 {
                line.push(',');
            }
            line.push_str(&Value::String(k.to_owned()).to_string());
            line.push(':');
            line.push_str(&v.to_string());
        };
        for (k, v) in &fixed {
            put(k, v);
        }
        for (k, v) in &fields.other {
            // A field named like a fixed key keeps its value under another name.
            if fixed.iter().any(|(f, _)| f == k) {
                put(&format!("field.{k}"), v);
            } else {
                put(k, v);
            }
        }
        line.push('}');
        writeln!(writer, "{line}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(951_782_400_000 + 3_723_004),
            "2000-02-29T01:02:03.004Z"
        );
    }
}
