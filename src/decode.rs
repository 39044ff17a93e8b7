//! JSON payloads -> Arrow rows of a source, with bad messages isolated as dead letters.
//!
//! The fast path feeds a shard's buffered payloads for one source through one arrow-json
//! `Decoder` and flushes a single `RecordBatch`. Only when that fails (a payload is not
//! JSON, is not one object, or has a field of the wrong type) does it fall back to decoding
//! each payload alone, so one bad message costs its own row and nothing around it.

use std::sync::Arc;

use bytes::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, StringBuilder, TimestampMillisecondArray,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::ReaderBuilder;
use datafusion::arrow::json::reader::Decoder;
use datafusion::arrow::record_batch::RecordBatch;

use crate::pipeline::compile::{CompiledSource, EventTime, ts_type};
use crate::pipeline::topic::TopicPattern;

/// What decoding needs to know of a source; shared by every shard.
#[derive(Debug)]
pub struct SourceShape {
    pub name: String,
    pub topic: TopicPattern,
    pub payload_schema: SchemaRef,
    pub row_schema: SchemaRef,
    pub event_time: EventTime,
    /// Which topic capture is the device id.
    pub device_capture: usize,
}

impl SourceShape {
    pub fn new(s: &CompiledSource) -> SourceShape {
        SourceShape {
            name: s.spec.name.clone(),
            topic: s.spec.topic.clone(),
            payload_schema: s.payload_schema.clone(),
            row_schema: s.row_schema.clone(),
            event_time: s.event_time.clone(),
            device_capture: s
                .spec
                .topic
                .captures()
                .position(|c| c == crate::pipeline::parse::DEVICE_ID)
                .unwrap_or(0),
        }
    }
}

/// The first source whose topic pattern matches `topic`, and where the device id sits in
/// the topic (a range, so callers look devices up without copying the id).
pub fn route(sources: &[Arc<SourceShape>], topic: &str) -> Option<(usize, std::ops::Range<usize>)> {
    let mut caps: Vec<&str> = Vec::with_capacity(4);
    for (i, s) in sources.iter().enumerate() {
        caps.clear();
        if s.topic.match_into(topic, &mut caps) {
            let id = caps.get(s.device_capture)?;
            let start = id.as_ptr() as usize - topic.as_ptr() as usize;
            return Some((i, start..start + id.len()));
        }
    }
    None
}

/// One MQTT message on its way to becoming a row.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// Epoch milliseconds when the engine received it.
    pub received_at: i64,
}

/// A message that could not become a row, kept with the reason.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: Option<String>,
    pub topic: String,
    pub payload: Bytes,
    /// A short, fixed label (metrics are labelled by it).
    pub reason: &'static str,
    /// The decoder's own words.
    pub error: String,
    pub received_at: i64,
}

pub mod reason {
    pub const INVALID_JSON: &str = "invalid_json";
    pub const NOT_ONE_OBJECT: &str = "not_one_object";
    pub const SCHEMA_MISMATCH: &str = "schema_mismatch";
    pub const BAD_EVENT_TIME: &str = "bad_event_time";
    pub const NO_SOURCE: &str = "no_matching_source";
    pub const TOO_LARGE: &str = "payload_too_large";
    /// A presence status topic's payload that says neither online nor offline.
    pub const BAD_STATUS: &str = "bad_status";
}

/// Buffers one source's messages in one shard and turns them into rows.
pub struct SourceDecoder {
    shape: Arc<SourceShape>,
    decoder: Decoder,
    pending: Vec<Message>,
}

impl SourceDecoder {
    pub fn new(shape: Arc<SourceShape>) -> Result<SourceDecoder, ArrowError> {
        let decoder = build_decoder(&shape.payload_schema)?;
        Ok(SourceDecoder {
            shape,
            decoder,
            pending: Vec::new(),
        })
    }

    /// Buffers a message; the caller flushes at [`MAX_BUFFERED_ROWS`].
    pub fn push(&mut self, m: Message) {
        self.pending.push(m);
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Decodes everything buffered. Never fails as a whole: what cannot be decoded comes
    /// back as dead letters.
    pub fn flush(&mut self) -> (Option<RecordBatch>, Vec<DeadLetter>) {
        if self.pending.is_empty() {
            return (None, vec![]);
        }
        // The next flush holds about as many: start there rather than grow from empty.
        let next = Vec::with_capacity(self.pending.len());
        let pending = std::mem::replace(&mut self.pending, next);
        let mut dead = Vec::new();
        let (payload, good, counts) =
            match decode_all(&mut self.decoder, &self.shape.payload_schema, &pending) {
                Ok((batch, counts)) => (batch, pending, counts),
                Err(_) => {
                    // Something in the lot is bad: the decoder's state is unknown, start afresh
                    // and find the culprits one by one.
                    if let Ok(d) = build_decoder(&self.shape.payload_schema) {
                        self.decoder = d;
                    }
                    let mut good = Vec::with_capacity(pending.len());
                    for m in pending {
                        match decode_one(&self.shape.payload_schema, &m.payload) {
                            Ok(()) => good.push(m),
                            Err((reason, error)) => dead.push(self.dead(m, reason, error)),
                        }
                    }
                    if good.is_empty() {
                        return (None, dead);
                    }
                    match decode_all(&mut self.decoder, &self.shape.payload_schema, &good) {
                        Ok((b, counts)) => (b, good, counts),
                        Err((reason, error)) => {
                            // Each decoded alone but not together: should not happen; lose nothing.
                            if let Ok(d) = build_decoder(&self.shape.payload_schema) {
                                self.decoder = d;
                            }
                            dead.extend(
                                good.into_iter()
                                    .map(|m| self.dead(m, reason, error.clone())),
                            );
                            return (None, dead);
                        }
                    }
                }
            };
        match self.rows(payload, &good, &counts) {
            Ok((batch, bad_time)) => {
                for (i, err) in bad_time {
                    dead.push(self.dead(good[i].clone(), reason::BAD_EVENT_TIME, err));
                }
                (Some(batch).filter(|b| b.num_rows() > 0), dead)
            }
            Err(e) => {
                dead.extend(
                    good.into_iter()
                        .map(|m| self.dead(m, reason::SCHEMA_MISMATCH, e.to_string())),
                );
                (None, dead)
            }
        }
    }

    fn dead(&self, m: Message, reason: &'static str, error: String) -> DeadLetter {
        DeadLetter {
            source: Some(self.shape.name.clone()),
            topic: m.topic,
            payload: m.payload,
            reason,
            error,
            received_at: m.received_at,
        }
    }

    /// Adds topic captures, event time and receive time to decoded payload columns.
    /// Rows whose declared event time is unusable are dropped from the batch and returned
    /// by index for the dead-letter table.
    /// `counts[i]`: how many rows message `i` produced (more than one for a JSON array).
    fn rows(
        &self,
        payload: RecordBatch,
        msgs: &[Message],
        counts: &[usize],
    ) -> Result<(RecordBatch, Vec<(usize, String)>), ArrowError> {
        let shape = &self.shape;
        let n = payload.num_rows();
        // Row -> the message it came from.
        let row_msg: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(i, c)| std::iter::repeat_n(i, *c))
            .collect();
        if row_msg.len() != n {
            return Err(ArrowError::InvalidArgumentError(format!(
                "{n} rows decoded from messages that hold {}",
                row_msg.len()
            )));
        }
        let captures: Vec<&str> = shape.topic.captures().collect();
        let mut builders: Vec<StringBuilder> = captures
            .iter()
            .map(|_| StringBuilder::with_capacity(n, n * 12))
            .collect();
        let mut vals = Vec::with_capacity(captures.len());
        for m in row_msg.iter().map(|i| &msgs[*i]) {
            vals.clear();
            if !shape.topic.match_into(&m.topic, &mut vals) {
                return Err(ArrowError::InvalidArgumentError(format!(
                    "topic {} does not match {}",
                    m.topic, shape.topic
                )));
            }
            for (b, v) in builders.iter_mut().zip(&vals) {
                b.append_value(v);
            }
        }
        let received = TimestampMillisecondArray::from_iter_values(
            row_msg.iter().map(|i| msgs[*i].received_at),
        )
        .with_timezone(crate::time::TZ);
        let mut bad = Vec::new();
        let event_time: ArrayRef = match &shape.event_time {
            EventTime::Received => Arc::new(received.clone()),
            EventTime::Field { name } => {
                let col = payload
                    .column_by_name(name)
                    .ok_or_else(|| ArrowError::SchemaError(format!("no column {name}")))?;
                let (times, invalid) = event_times(col, &received)?;
                bad = invalid
                    .into_iter()
                    .map(|i| {
                        (
                            i,
                            format!("event time field `{name}` holds a value that is not a time"),
                        )
                    })
                    .collect();
                times
            }
        };
        let mut columns: Vec<ArrayRef> = builders
            .into_iter()
            .map(|mut b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        columns.extend(payload.columns().iter().cloned());
        columns.push(event_time);
        columns.push(Arc::new(received));
        let batch = RecordBatch::try_new(shape.row_schema.clone(), columns)?;
        if bad.is_empty() {
            return Ok((batch, bad));
        }
        let keep: BooleanArray = (0..n)
            .map(|i| Some(!bad.iter().any(|(b, _)| *b == i)))
            .collect();
        let batch = filter_record_batch(&batch, &keep)?;
        // Dead letters are per message: report each bad reading with its message.
        let bad = bad.into_iter().map(|(row, e)| (row_msg[row], e)).collect();
        Ok((batch, bad))
    }
}

/// Most rows one decoder holds between flushes. The decoder stops taking input at its
/// batch size, so buffers flush before they reach it.
pub const MAX_BUFFERED_ROWS: usize = 8192;

fn build_decoder(schema: &SchemaRef) -> Result<Decoder, ArrowError> {
    ReaderBuilder::new(schema.clone())
        .with_batch_size(MAX_BUFFERED_ROWS)
        .build_decoder()
}

/// A payload is one JSON object (one row) or an array of objects (one row each: a device
/// uploading buffered readings); returns the rows it added to the decoder.
fn feed(
    decoder: &mut Decoder,
    payload: &[u8],
    full: &mut Vec<RecordBatch>,
) -> Result<usize, (&'static str, String)> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        // Arrays are the backfill path, not the hot one: parse, then hand each element to
        // the Arrow decoder like a message of its own.
        let items: Vec<serde_json::Value> =
            serde_json::from_slice(payload).map_err(|e| (reason::INVALID_JSON, e.to_string()))?;
        let mut bytes = Vec::new();
        for (k, item) in items.iter().enumerate() {
            if !item.is_object() {
                return Err((
                    reason::NOT_ONE_OBJECT,
                    format!("array element {k} is not a JSON object"),
                ));
            }
            bytes.clear();
            serde_json::to_writer(&mut bytes, item)
                .map_err(|e| (reason::INVALID_JSON, e.to_string()))?;
            feed_object(decoder, &bytes, full)?;
        }
        return Ok(items.len());
    }
    feed_object(decoder, payload, full)?;
    Ok(1)
}

/// Feeds one payload that must be exactly one complete JSON object. A decoder holding a
/// full batch takes no more input: its rows go to `full` first (JSON arrays can put more
/// rows in one flush than the batch size).
fn feed_object(
    decoder: &mut Decoder,
    payload: &[u8],
    full: &mut Vec<RecordBatch>,
) -> Result<(), (&'static str, String)> {
    if decoder.len() >= MAX_BUFFERED_ROWS {
        match decoder.flush() {
            Ok(Some(b)) => full.push(b),
            Ok(None) => {}
            Err(e) => return Err((reason::SCHEMA_MISMATCH, e.to_string())),
        }
    }
    let before = decoder.len();
    decoder
        .decode(payload)
        .map_err(|e| (reason::INVALID_JSON, e.to_string()))?;
    if decoder.has_partial_record() {
        return Err((
            reason::INVALID_JSON,
            "payload ends inside a JSON value".into(),
        ));
    }
    let added = decoder.len() - before;
    if added != 1 {
        return Err((
            reason::NOT_ONE_OBJECT,
            format!("payload holds {added} JSON values, expected one object"),
        ));
    }
    Ok(())
}

/// Decodes every message into one batch; returns it with the rows per message.
fn decode_all(
    decoder: &mut Decoder,
    schema: &SchemaRef,
    msgs: &[Message],
) -> Result<(RecordBatch, Vec<usize>), (&'static str, String)> {
    let mut counts = Vec::with_capacity(msgs.len());
    let mut full = Vec::new();
    for m in msgs {
        counts.push(feed(decoder, &m.payload, &mut full)?);
    }
    match decoder.flush() {
        Ok(Some(b)) if full.is_empty() => Ok((b, counts)),
        // Only empty arrays: no rows, nothing wrong.
        Ok(None) if full.is_empty() && counts.iter().all(|c| *c == 0) => {
            Ok((RecordBatch::new_empty(schema.clone()), counts))
        }
        Ok(None) if full.is_empty() => Err((reason::NOT_ONE_OBJECT, "nothing decoded".into())),
        Ok(last) => {
            full.extend(last);
            match concat_batches(&full[0].schema(), &full) {
                Ok(b) => Ok((b, counts)),
                Err(e) => Err((reason::SCHEMA_MISMATCH, e.to_string())),
            }
        }
        Err(e) => Err((reason::SCHEMA_MISMATCH, e.to_string())),
    }
}

fn decode_one(schema: &SchemaRef, payload: &[u8]) -> Result<(), (&'static str, String)> {
    let mut d = build_decoder(schema).map_err(|e| (reason::SCHEMA_MISMATCH, e.to_string()))?;
    let mut full = Vec::new();
    if feed(&mut d, payload, &mut full)? == 0 {
        return Ok(());
    }
    match d.flush() {
        Ok(Some(_)) => Ok(()),
        Ok(None) if !full.is_empty() => Ok(()),
        Ok(None) => Err((reason::NOT_ONE_OBJECT, "nothing decoded".into())),
        Err(e) => Err((reason::SCHEMA_MISMATCH, e.to_string())),
    }
}

/// Event times in epoch milliseconds. Null falls back to the receive time; a value that is
/// present but unusable is reported by row index.
fn event_times(
    col: &ArrayRef,
    received: &TimestampMillisecondArray,
) -> Result<(ArrayRef, Vec<usize>), ArrowError> {
    let ms = event_time_ms(col)?;
    let mut invalid = Vec::new();
    let mut out = Vec::with_capacity(ms.len());
    for i in 0..ms.len() {
        if ms.is_valid(i) {
            out.push(ms.value(i));
        } else {
            if col.is_valid(i) {
                invalid.push(i);
            }
            out.push(received.value(i));
        }
    }
    Ok((
        Arc::new(TimestampMillisecondArray::from(out).with_timezone(crate::time::TZ)),
        invalid,
    ))
}

/// A column of event times as epoch milliseconds, by the rules of an event-time field:
/// timestamps (any unit or zone) and timestamp text (RFC 3339, `2014-04-01 00:00:00`) by
/// Arrow's cast; numbers as epoch seconds or milliseconds, told apart by size. A value that
/// is not a time becomes null, like a null value: callers tell the two apart by `col`'s
/// own nulls. `fleetsql replay` converts recorded times with it too, so a value in a file
/// means the same time as in a live payload.
pub fn event_time_ms(col: &ArrayRef) -> Result<TimestampMillisecondArray, ArrowError> {
    let target = ts_type();
    Ok(match col.data_type() {
        DataType::Timestamp(_, _) | DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => {
            let options = datafusion::arrow::compute::CastOptions {
                safe: true,
                ..Default::default()
            };
            let c = datafusion::arrow::compute::cast_with_options(col, &target, &options)?;
            c.as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .cloned()
                .ok_or_else(|| ArrowError::CastError("event time".into()))?
        }
        t if t.is_numeric() => {
            let f = cast(col, &DataType::Float64)?;
            let f = f
                .as_any()
                .downcast_ref::<Float64Array>()
                .cloned()
                .ok_or_else(|| ArrowError::CastError("event time".into()))?;
            // Epoch seconds and milliseconds told apart by size: 10^11 s is the year 5138,
            // 10^11 ms is 1973.
            f.iter()
                .map(|v| {
                    v.and_then(|v| {
                        if !v.is_finite() {
                            None
                        } else if v.abs() < 1e11 {
                            Some((v * 1000.0).round() as i64)
                        } else {
                            Some(v.round() as i64)
                        }
                    })
                })
                .collect()
        }
        other => return Err(ArrowError::CastError(format!("event time of type {other}"))),
    })
}
