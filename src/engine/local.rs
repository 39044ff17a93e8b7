//! The engine's pipeline without broker, actors or files: messages with their receive
//! times go in, every table's rows come out in memory. Golden tests and the examples in
//! docs/pipeline-sql.md run through it; time is whatever the caller says it is, so a
//! result never depends on how fast the machine is.
//!
//! It uses the same decoder, presence logic, runner, windows and plans as `fleetsql run`;
//! only the transport (MQTT, actors) and the outputs (Parquet, MQTT) are left out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::arrow::record_batch::RecordBatch;

use super::runner::{Output, Outputs, Runner};
use crate::decode::{DeadLetter, Message, SourceDecoder, SourceShape, reason, route};
use crate::device::PresenceConfig;
use crate::device::presence::{self, Signal, Status};
use crate::metrics::Metrics;
use crate::pipeline::CompiledPipeline;

type Captured = Arc<Mutex<Vec<RecordBatch>>>;

pub struct Local {
    runner: Runner,
    shapes: Vec<Arc<SourceShape>>,
    decoders: Vec<SourceDecoder>,
    presence: Option<PresenceConfig>,
    devices: HashMap<Arc<str>, Status>,
    tables: Vec<(String, Captured)>,
    pub metrics: Arc<Metrics>,
}

impl Local {
    pub fn new(pipeline: CompiledPipeline) -> anyhow::Result<Local> {
        let metrics = Metrics::new();
        let shapes: Vec<Arc<SourceShape>> = pipeline
            .sources
            .iter()
            .map(|s| Arc::new(SourceShape::new(s)))
            .collect();
        let decoders = shapes
            .iter()
            .map(|s| SourceDecoder::new(s.clone()))
            .collect::<Result<_, _>>()?;
        let mut tables = Vec::new();
        let mut capture = |name: &str| {
            let (out, rows) = Output::capture();
            tables.push((name.to_string(), rows));
            out
        };
        let raw = pipeline
            .sources
            .iter()
            .map(|s| capture(&s.spec.name))
            .collect();
        let sinks = pipeline
            .sinks
            .iter()
            .map(|s| capture(&s.spec.name))
            .collect();
        let dead_letters = capture(super::DEAD_LETTERS);
        let late_rows = capture(super::LATE_ROWS);
        let presence = PresenceConfig::of(&pipeline);
        let runner = Runner::new(
            pipeline,
            Outputs {
                raw,
                sinks,
                dead_letters,
                late_rows,
            },
            metrics.clone(),
        );
        Ok(Local {
            runner,
            shapes,
            decoders,
            presence,
            devices: HashMap::new(),
            tables,
            metrics,
        })
    }

    /// One message received at `at` (epoch ms): decoded, routed, and every query it feeds
    /// run; then time moves to `at`.
    pub async fn message(&mut self, topic: &str, payload: &[u8], at: i64) {
        let msg = Message {
            topic: topic.to_string(),
            payload: Bytes::copy_from_slice(payload),
            received_at: at,
        };
        let status = self.presence.as_ref().and_then(|p| {
            let device = crate::ingest::status_device(&p.status.as_ref()?.topic, topic)?;
            Some((p.clone(), device))
        });
        match (route(&self.shapes, topic), status) {
            (Some((source, device)), _) => {
                self.presence_signal(&topic[device], Signal::Reading, at);
                self.decoders[source].push(msg);
                let (batch, dead) = self.decoders[source].flush();
                if !dead.is_empty() {
                    self.runner.dead_letters(dead);
                }
                if let Some(b) = batch {
                    self.runner.rows(source, b, at);
                }
            }
            (None, Some((p, device))) => {
                let spec = p.status.as_ref().expect("matched a status topic");
                match presence::parse_status(spec, payload) {
                    Ok(None) => {}
                    Ok(Some(online)) => {
                        self.presence_signal(&topic[device], Signal::Announced(online), at)
                    }
                    Err(error) => self.runner.dead_letters(vec![DeadLetter {
                        source: Some(p.name.to_string()),
                        error,
                        topic: msg.topic,
                        payload: msg.payload,
                        reason: reason::BAD_STATUS,
                        received_at: at,
                    }]),
                }
            }
            (None, None) => self.runner.dead_letters(vec![DeadLetter {
                source: None,
                error: format!("topic `{topic}` matches no source"),
                topic: msg.topic,
                payload: msg.payload,
                reason: reason::NO_SOURCE,
                received_at: at,
            }]),
        }
        self.runner.run_micro_batches().await;
        self.advance(at).await;
    }

    /// Moves time to `now`: silent devices go offline, windows whose watermark passed close.
    pub async fn advance(&mut self, now: i64) {
        if let Some(p) = &self.presence {
            let (stream, timeout) = (p.stream, p.timeout.as_millis() as i64);
            let mut changes: Vec<_> = self
                .devices
                .iter_mut()
                .filter_map(|(id, s)| s.check(id, now, timeout))
                .collect();
            changes.sort_by(|a, b| a.device.cmp(&b.device));
            self.presence_rows(stream, changes, now);
        }
        self.runner.tick(now).await;
    }

    /// A device's message, as the shard routers take it: its presence moves, and a change
    /// becomes a row of the presence stream.
    fn presence_signal(&mut self, id: &str, signal: Signal, at: i64) {
        let Some(stream) = self.presence.as_ref().map(|p| p.stream) else {
            return;
        };
        let change = match self.devices.get_mut(id) {
            Some(s) => s.next(|| Arc::from(id), signal, at),
            None => {
                let id: Arc<str> = Arc::from(id);
                let (s, c) = Status::first(&id, signal, at);
                self.devices.insert(id, s);
                Some(c)
            }
        };
        self.presence_rows(stream, change.into_iter().collect(), at);
    }

    fn presence_rows(&mut self, stream: usize, changes: Vec<presence::Change>, at: i64) {
        if changes.is_empty() {
            return;
        }
        match presence::rows(&changes) {
            Ok(b) => self.runner.rows(stream, b, at),
            Err(e) => tracing::error!("presence rows: {e}"),
        }
    }

    /// The end of input: every open window closes, as at shutdown.
    pub async fn finish(&mut self) {
        self.runner.finish().await;
    }

    /// Rows written so far to a table: a sink, a source's raw table, `dead_letters` or
    /// `late_rows`.
    pub fn table(&self, name: &str) -> Option<Vec<RecordBatch>> {
        self.tables
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, rows)| rows.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
