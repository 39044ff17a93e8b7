//! Device presence: online when a device's first reading arrives, offline once it has been
//! silent for the presence table's timeout; and, when the presence table names a status
//! topic, whatever is announced there: a device's `online` when it connects, and the
//! `offline` its last will makes the broker publish when the connection drops. Changes
//! become rows of the pipeline's presence stream (`device_id`, `status`, `since`,
//! `last_seen`, `event_time`) and move the `fleetsql_devices{status}` gauge.
//!
//! Times are receive times (the engine's clock): silence is measured by the engine, which
//! cannot trust a device's clock to tell it that the device went quiet.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, StringArray, TimestampMillisecondArray};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use crate::pipeline::compile::presence_schema;
use crate::pipeline::parse::StatusTopicSpec;

pub const ONLINE: &str = "online";
pub const OFFLINE: &str = "offline";

/// What a device's message says about its presence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Telemetry: the device is alive.
    Reading,
    /// Its status topic said online (`true`) or offline (`false`).
    Announced(bool),
}

/// One device's presence.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    online: bool,
    since: i64,
    last_seen: i64,
}

/// A status change, ready to become a row.
#[derive(Debug, Clone)]
pub struct Change {
    pub device: Arc<str>,
    pub status: &'static str,
    /// When the status began: the first reading (online) or the last one (offline).
    pub since: i64,
    pub last_seen: i64,
    /// When the engine noticed: the row's event time.
    pub at: i64,
}

impl Status {
    /// The status of a device first heard of at `now`, and the change to report.
    pub fn first(device: &Arc<str>, signal: Signal, now: i64) -> (Status, Change) {
        let s = Status {
            online: !matches!(signal, Signal::Announced(false)),
            since: now,
            last_seen: now,
        };
        (s, s.change(device, now))
    }

    fn change(&self, device: &Arc<str>, at: i64) -> Change {
        Change {
            device: device.clone(),
            status: if self.online { ONLINE } else { OFFLINE },
            since: self.since,
            last_seen: self.last_seen,
            at,
        }
    }

    /// A known device's message at `now`: a change if its status flips. A reading or an
    /// `online` announcement counts as a sign of life; an `offline` one keeps the last
    /// reading's time. `device` is only called on a change, so the common case copies no id.
    pub fn next(
        &mut self,
        device: impl FnOnce() -> Arc<str>,
        signal: Signal,
        now: i64,
    ) -> Option<Change> {
        let online = !matches!(signal, Signal::Announced(false));
        if online {
            self.last_seen = self.last_seen.max(now);
        }
        if self.online == online {
            return None;
        }
        self.online = online;
        self.since = now;
        Some(self.change(&device(), now))
    }

    /// Goes offline when silent for `timeout_ms` by `now`.
    pub fn check(&mut self, device: &Arc<str>, now: i64, timeout_ms: i64) -> Option<Change> {
        if !self.online || now - self.last_seen < timeout_ms {
            return None;
        }
        self.online = false;
        self.since = self.last_seen;
        Some(self.change(device, now))
    }

    /// Offline now, whatever the silence: the device's actor is being retired.
    pub fn retire(&mut self, device: &Arc<str>, now: i64) -> Option<Change> {
        self.check(device, now, i64::MIN)
    }

    pub fn is_online(&self) -> bool {
        self.online
    }
}

/// What a message on the status topic says: `Some(true)` online, `Some(false)` offline,
/// `None` for an empty payload (a retained status being cleared), an error for anything
/// else. The payload is a bare word (`online`), a JSON string (`"online"`) or boolean, or a
/// JSON object with a `status` (or `state`, or `online`) field.
pub fn parse_status(spec: &StatusTopicSpec, payload: &[u8]) -> Result<Option<bool>, String> {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let word = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => {
            match ["status", "state", "online"].iter().find_map(|k| o.get(*k)) {
                Some(v) => json_word(v),
                None => {
                    return Err(
                        "a JSON status needs a `status`, `state` or `online` field".to_string()
                    );
                }
            }
        }
        Ok(v) => json_word(&v),
        Err(_) => text.to_string(),
    }
    .to_lowercase();
    if spec.online.contains(&word) {
        Ok(Some(true))
    } else if spec.offline.contains(&word) {
        Ok(Some(false))
    } else {
        Err(format!(
            "status `{word}` is neither online ({}) nor offline ({})",
            spec.online.join(", "),
            spec.offline.join(", ")
        ))
    }
}

fn json_word(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Rows of the presence stream.
pub fn rows(changes: &[Change]) -> Result<RecordBatch, ArrowError> {
    let ts = |f: &dyn Fn(&Change) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMillisecondArray::from_iter_values(changes.iter().map(f))
                .with_timezone(crate::time::TZ),
        )
    };
    RecordBatch::try_new(
        presence_schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                changes.iter().map(|c| &*c.device),
            )),
            Arc::new(StringArray::from_iter_values(
                changes.iter().map(|c| c.status),
            )),
            ts(&|c| c.since),
            ts(&|c| c.last_seen),
            ts(&|c| c.at),
        ],
    )
}
