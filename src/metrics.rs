//! Prometheus metrics: one registry per engine, every series named `fleetsql_*`, served as
//! text on `/metrics`. Labels are low-cardinality by design (source, query, sink, table,
//! reason, client): never a device id, which would mean 100k series.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub messages_received: IntCounter,
    pub decode_errors: IntCounterVec,
    pub rows_ingested: IntCounterVec,
    pub late_rows: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub reference_reloads: IntCounterVec,
    pub pipeline_reloads: IntCounterVec,
    pub presence_changes: IntCounterVec,
    /// Known devices by presence status (`online`, `offline`); forgotten once retired.
    pub devices: IntGaugeVec,
    pub windows_closed: IntCounterVec,
    pub query_duration: HistogramVec,
    pub query_errors: IntCounterVec,
    pub commands_published: IntCounterVec,
    pub command_errors: IntCounterVec,
    pub parquet_rows: IntCounterVec,
    pub parquet_files: IntCounterVec,
    pub parquet_bytes: IntCounterVec,
    pub parquet_errors: IntCounterVec,
    pub device_actors: IntGauge,
    pub broker_connected: IntGaugeVec,
    pub broker_reconnects: IntCounterVec,
    pub window_close_latency: Histogram,
    /// Bytes of decoded rows waiting for the pipeline runner.
    pub backlog_bytes: IntGauge,
    /// The most bytes the backlog has held.
    pub backlog_peak_bytes: IntGauge,
    /// Time ingest spent waiting for the backlog to drain.
    pub backpressure_seconds: prometheus::Counter,
    /// Messages appended to the write-ahead log (and then acknowledged).
    pub wal_messages: IntCounter,
    /// Writes of the log forced to disk (with `--fsync off`, handed to the system): one per
    /// group of batches, so messages per sync is this against `wal_messages`.
    pub wal_syncs: IntCounter,
    /// Failed writes of the log: the engine stops taking messages.
    pub wal_errors: IntCounter,
    /// Broker redeliveries of messages already logged: acknowledged, not stored again.
    pub redeliveries: IntCounter,
    /// Messages processed again from the log at start.
    pub replayed: IntCounter,
    pub checkpoints: IntCounter,
    pub checkpoint_errors: IntCounter,
    /// Commands of a window computed again after a restart, already sent before it.
    pub commands_suppressed: IntCounterVec,
}

fn int_counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let messages_received = IntCounter::new(
            "fleetsql_mqtt_messages_received_total",
            "MQTT messages received on source topics",
        )
        .expect("valid metric");
        r.register(Box::new(messages_received.clone()))
            .expect("unique metric");
        let device_actors =
            IntGauge::new("fleetsql_device_actors", "Live device actors").expect("valid metric");
        r.register(Box::new(device_actors.clone()))
            .expect("unique metric");
        let broker_connected = IntGaugeVec::new(
            Opts::new(
                "fleetsql_broker_connected",
                "1 while the MQTT client is connected to the broker",
            ),
            &["client"],
        )
        .expect("valid metric");
        r.register(Box::new(broker_connected.clone()))
            .expect("unique metric");
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let query_duration = HistogramVec::new(
            HistogramOpts::new(
                "fleetsql_query_duration_seconds",
                "Time to run a query over one window or micro-batch",
            )
            .buckets(buckets.clone()),
            &["query"],
        )
        .expect("valid metric");
        r.register(Box::new(query_duration.clone()))
            .expect("unique metric");
        let window_close_latency = Histogram::with_opts(
            HistogramOpts::new(
                "fleetsql_window_close_seconds",
                "Time from a window's close to its results handed to the sinks",
            )
            .buckets(buckets),
        )
        .expect("valid metric");
        r.register(Box::new(window_close_latency.clone()))
            .expect("unique metric");
        let backlog_bytes = IntGauge::new(
            "fleetsql_backlog_bytes",
            "Bytes of decoded rows waiting for the pipeline runner; ingest pauses at --max-backlog",
        )
        .expect("valid metric");
        r.register(Box::new(backlog_bytes.clone()))
            .expect("unique metric");
        let backlog_peak_bytes = IntGauge::new(
            "fleetsql_backlog_peak_bytes",
            "The most bytes of decoded rows that have waited for the pipeline runner",
        )
        .expect("valid metric");
        r.register(Box::new(backlog_peak_bytes.clone()))
            .expect("unique metric");
        let backpressure_seconds = prometheus::Counter::new(
            "fleetsql_backpressure_seconds_total",
            "Time ingest waited for the pipeline runner (the broker held the messages meanwhile)",
        )
        .expect("valid metric");
        r.register(Box::new(backpressure_seconds.clone()))
            .expect("unique metric");
        Arc::new(Metrics {
            messages_received,
            decode_errors: counter(
                &r,
                "fleetsql_decode_errors_total",
                "Messages that could not become rows, kept as dead letters",
                &["source", "reason"],
            ),
            rows_ingested: counter(
                &r,
                "fleetsql_rows_ingested_total",
                "Rows decoded per source",
                &["source"],
            ),
            late_rows: counter(
                &r,
                "fleetsql_late_rows_total",
                "Rows a window query did not count, once per query that missed them; reason late (the window had closed) or ahead (event time too far ahead of the engine's clock)",
                &["source", "reason"],
            ),
            duplicates: counter(
                &r,
                "fleetsql_duplicates_total",
                "Readings dropped as repeats of one already taken (sources with a sequence field)",
                &["source"],
            ),
            reference_reloads: counter(
                &r,
                "fleetsql_reference_reloads_total",
                "Reloads of reference tables after their file changed, by result (ok, error)",
                &["table", "result"],
            ),
            pipeline_reloads: counter(
                &r,
                "fleetsql_pipeline_reloads_total",
                "Pipeline reloads (SIGHUP or --watch), by result (ok, refused)",
                &["result"],
            ),
            presence_changes: counter(
                &r,
                "fleetsql_presence_changes_total",
                "Device status changes, by new status (online, offline)",
                &["status"],
            ),
            devices: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "fleetsql_devices",
                        "Devices known to the presence table, by status (online, offline); a device is forgotten when its actor retires",
                    ),
                    &["status"],
                )
                .expect("valid metric");
                let _ = r.register(Box::new(g.clone()));
                for s in ["online", "offline"] {
                    g.with_label_values(&[s]);
                }
                g
            },
            windows_closed: counter(
                &r,
                "fleetsql_windows_closed_total",
                "Windows closed and evaluated",
                &["query"],
            ),
            query_errors: counter(
                &r,
                "fleetsql_query_errors_total",
                "Query executions that failed",
                &["query"],
            ),
            commands_published: counter(
                &r,
                "fleetsql_commands_published_total",
                "Commands published to devices",
                &["sink"],
            ),
            command_errors: counter(
                &r,
                "fleetsql_command_publish_errors_total",
                "Command rows not published",
                &["sink", "reason"],
            ),
            parquet_rows: counter(
                &r,
                "fleetsql_parquet_rows_written_total",
                "Rows committed to Parquet files",
                &["table"],
            ),
            parquet_files: counter(
                &r,
                "fleetsql_parquet_files_written_total",
                "Parquet files committed",
                &["table"],
            ),
            parquet_bytes: counter(
                &r,
                "fleetsql_parquet_bytes_written_total",
                "Bytes of committed Parquet files",
                &["table"],
            ),
            parquet_errors: counter(
                &r,
                "fleetsql_parquet_write_errors_total",
                "Failed Parquet writes",
                &["table"],
            ),
            broker_reconnects: counter(
                &r,
                "fleetsql_broker_reconnects_total",
                "Reconnections to the MQTT broker after a lost connection",
                &["client"],
            ),
            query_duration,
            device_actors,
            broker_connected,
            window_close_latency,
            backlog_bytes,
            backlog_peak_bytes,
            backpressure_seconds,
            wal_messages: int_counter(
                &r,
                "fleetsql_wal_messages_total",
                "Messages written to the write-ahead log before being acknowledged",
            ),
            wal_syncs: int_counter(
                &r,
                "fleetsql_wal_syncs_total",
                "Syncs of the write-ahead log, each writing (and with --fsync always forcing to \
                 disk) every message logged since the one before",
            ),
            wal_errors: int_counter(
                &r,
                "fleetsql_wal_errors_total",
                "Failed writes of the write-ahead log (the engine stops taking messages)",
            ),
            redeliveries: int_counter(
                &r,
                "fleetsql_mqtt_redeliveries_total",
                "Broker redeliveries of messages already logged: acknowledged, not stored twice",
            ),
            replayed: int_counter(
                &r,
                "fleetsql_wal_replayed_total",
                "Messages processed again from the write-ahead log after a restart",
            ),
            checkpoints: int_counter(
                &r,
                "fleetsql_checkpoints_total",
                "Checkpoints committed (state, files and log position together)",
            ),
            checkpoint_errors: int_counter(
                &r,
                "fleetsql_checkpoint_errors_total",
                "Checkpoints that failed (the engine stops; the log keeps what they would have committed)",
            ),
            commands_suppressed: counter(
                &r,
                "fleetsql_commands_suppressed_total",
                "Commands not sent again for a window recomputed after a restart",
                &["sink"],
            ),
            registry: r,
        })
    }

    /// Creates every labelled series at zero, so dashboards and alerts see 0 rather than
    /// no data before the first event.
    pub fn init_series(&self, p: &crate::pipeline::CompiledPipeline) {
        use crate::decode::reason;
        for s in &p.sources {
            let n = s.spec.name.as_str();
            self.rows_ingested.with_label_values(&[n]);
            for reason in [crate::engine::LATE, crate::engine::AHEAD] {
                self.late_rows.with_label_values(&[n, reason]);
            }
            self.duplicates.with_label_values(&[n]);
            self.parquet_rows.with_label_values(&[n]);
            self.parquet_files.with_label_values(&[n]);
            self.parquet_bytes.with_label_values(&[n]);
            self.parquet_errors.with_label_values(&[n]);
            for r in [
                reason::INVALID_JSON,
                reason::NOT_ONE_OBJECT,
                reason::SCHEMA_MISMATCH,
                reason::BAD_EVENT_TIME,
            ] {
                self.decode_errors.with_label_values(&[n, r]);
            }
        }
        self.decode_errors
            .with_label_values(&["", reason::NO_SOURCE]);
        for q in &p.queries {
            let n = q.spec.name.as_str();
            self.windows_closed.with_label_values(&[n]);
            self.query_errors.with_label_values(&[n]);
            self.query_duration.with_label_values(&[n]);
        }
        for s in &p.sinks {
            let n = s.spec.name.as_str();
            match s.spec.kind {
                crate::pipeline::parse::SinkKind::Mqtt { .. } => {
                    self.commands_published.with_label_values(&[n]);
                    self.commands_suppressed.with_label_values(&[n]);
                    for r in ["encode", "publish", "bad_topic"] {
                        self.command_errors.with_label_values(&[n, r]);
                    }
                }
                crate::pipeline::parse::SinkKind::Parquet => {
                    self.parquet_rows.with_label_values(&[n]);
                    self.parquet_files.with_label_values(&[n]);
                    self.parquet_bytes.with_label_values(&[n]);
                    self.parquet_errors.with_label_values(&[n]);
                }
            }
        }
        for t in [crate::engine::DEAD_LETTERS, crate::engine::LATE_ROWS] {
            self.parquet_rows.with_label_values(&[t]);
            self.parquet_files.with_label_values(&[t]);
        }
        for r in &p.references {
            for result in ["ok", "error"] {
                self.reference_reloads
                    .with_label_values(&[r.spec.name.as_str(), result]);
            }
        }
        for result in ["ok", "refused"] {
            self.pipeline_reloads.with_label_values(&[result]);
        }
        for status in ["online", "offline"] {
            self.presence_changes.with_label_values(&[status]);
        }
        for c in ["ingest", "commands"] {
            self.broker_connected.with_label_values(&[c]);
            self.broker_reconnects.with_label_values(&[c]);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Serves `/metrics` until the returned task is aborted. Binds before returning, so a port
/// in use is an error at start, not a warning later.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    use axum::{Router, http::header, routing::get};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for /metrics on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {e}");
        }
    });
    Ok((local, task))
}
