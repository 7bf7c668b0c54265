//! `log_format = "json"`: one JSON object per log line, with stable keys
//! (`ts`, `level`, `msg`, then the line's fields). An event of the event
//! stream is logged with all its keys at the top level (`event`, `seq`,
//! `slot`, …), so a log shipper needs no second source.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Log formats (the `log_format` setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-04T12:26:05.123456Z  INFO message key=value`
    Text,
    /// `{"ts":"2026-12-04T12:26:05.123Z","level":"info","msg":"message",...}`
    Json,
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether the log is JSON (events are logged only then: the text log
/// already says the same in words).
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// The field that carries an event's JSON object into the log.
pub const EVENT_FIELD: &str = "event_json";

/// Logs one event of the event stream, in a JSON log only.
pub fn log_event(line: &str) {
    if is_json() {
        tracing::info!(target: "drover::event", event_json = line);
    }
}

/// The JSON line formatter.
pub struct JsonLines;

impl JsonLines {
    /// Makes [`is_json`] true: from now on events are logged.
    pub fn install() -> JsonLines {
        JSON.store(true, Ordering::Relaxed);
        JsonLines
    }
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().to_string(), Value::from(v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn fmt::Debug) {
        self.0
            .insert(f.name().to_string(), Value::from(format!("{v:?}")));
    }
}

/// One log record as a JSON object, its keys `ts`, `level`, `msg` first,
/// then the others in alphabetical order.
pub fn line(ts: SystemTime, level: &tracing::Level, fields: Map<String, Value>) -> String {
    let mut o = object(ts, level, fields);
    let mut out = String::from("{");
    for key in ["ts", "level", "msg"] {
        let v = o.remove(key).unwrap_or(Value::Null);
        out.push_str(&format!("{}:{v},", Value::from(key)));
    }
    for (k, v) in o {
        out.push_str(&format!("{}:{v},", Value::from(k)));
    }
    out.pop();
    out.push('}');
    out
}

/// One log record's keys and values.
pub fn object(
    ts: SystemTime,
    level: &tracing::Level,
    fields: Map<String, Value>,
) -> Map<String, Value> {
    let mut fields = fields;
    let mut out = Map::new();
    out.insert("ts".into(), Value::from(crate::events::rfc3339(ts)));
    out.insert(
        "level".into(),
        Value::from(level.as_str().to_ascii_lowercase()),
    );
    // A worker's output line is the message itself; its fields say whose.
    let msg = fields
        .remove("line")
        .or_else(|| fields.remove("message"))
        .unwrap_or(Value::from(""));
    fields.remove("message");
    let event = fields.remove(EVENT_FIELD);
    out.insert("msg".into(), msg);
    if let Some(Value::String(text)) = event {
        if let Ok(Value::Object(event)) = serde_json::from_str(&text) {
            if let Some(name) = event.get("event") {
                out.insert("msg".into(), name.clone());
            }
            out.extend(event);
        }
    }
    out.extend(fields);
    out
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let text = line(SystemTime::now(), event.metadata().level(), fields.0);
        writeln!(writer, "{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_events_are_flattened() {
        let mut f = Map::new();
        f.insert("message".into(), Value::from("worker 1 ready"));
        f.insert("slot".into(), Value::from(1));
        assert_eq!(
            line(SystemTime::UNIX_EPOCH, &tracing::Level::INFO, f),
            r#"{"ts":"1970-01-01T00:00:00.000Z","level":"info","msg":"worker 1 ready","slot":1}"#
        );
        let mut f = Map::new();
        f.insert(
            EVENT_FIELD.into(),
            Value::from(r#"{"seq":4,"ts":"x","event":"paused","trigger":"SIGWINCH"}"#),
        );
        let o = object(SystemTime::UNIX_EPOCH, &tracing::Level::INFO, f);
        assert_eq!(o["msg"], "paused");
        assert_eq!(o["event"], "paused");
        assert_eq!(o["seq"], 4);
        assert_eq!(o["trigger"], "SIGWINCH");
        assert_eq!(o["ts"], "x", "the event's own time");
    }

    #[test]
    fn a_workers_line_is_the_message() {
        let mut f = Map::new();
        f.insert("message".into(), Value::from("worker 1 (pid 5) stdout: hi"));
        f.insert("line".into(), Value::from("hi"));
        f.insert("stream".into(), Value::from("stdout"));
        let o = object(SystemTime::UNIX_EPOCH, &tracing::Level::WARN, f);
        assert_eq!(o["msg"], "hi");
        assert_eq!(o["level"], "warn");
        assert_eq!(o["stream"], "stdout");
        assert!(o.get("line").is_none());
    }
}
