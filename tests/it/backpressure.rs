//! Backpressure: when the pipeline is slower than the input, ingest waits instead of piling
//! decoded rows up in memory, and nothing is dropped.

use std::time::Duration;

use bytes::Bytes;
use fleetsql::decode::Message;
use fleetsql::engine::{EngineConfig, Input};
use fleetsql::metrics::Metrics;

use crate::util::write_pipeline;

/// Every micro-batch of readings is joined with 3,000 reference rows, so the runner is far
/// slower than the input. With a backlog limit of 64 KiB, 100,000 readings are fed as fast
/// as the engine takes them: ingest has to wait, the backlog's peak stays within a few
/// batches of its limit (not the megabytes the input amounts to), and every reading is in
/// the raw table afterwards.
#[test]
fn a_slow_pipeline_holds_ingest_back_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..3000).map(|i| format!("{i}\n")).collect();
    std::fs::write(dir.path().join("big.csv"), format!("k\n{rows}")).unwrap();
    let pipeline = write_pipeline(
        dir.path(),
        "slow.sql",
        "CREATE TABLE telemetry (v DOUBLE)
           WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t');
         CREATE TABLE big (k BIGINT) WITH (connector = 'file', path = 'big.csv');
         CREATE TABLE joined WITH (connector = 'parquet');
         INSERT INTO joined
         SELECT t.device_id, count(*) AS n, sum(t.v * b.k) AS s
         FROM telemetry t CROSS JOIN big b GROUP BY t.device_id;",
    );
    const LIMIT: usize = 64 << 10;
    const READINGS: usize = 100_000;
    let data = dir.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = Metrics::new();
    rt.block_on(async {
        let compiled = fleetsql::pipeline::load(std::slice::from_ref(&pipeline))
            .await
            .unwrap();
        let mut cfg = EngineConfig::in_process(vec![pipeline.clone()], data.clone()).unwrap();
        cfg.max_backlog = LIMIT;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let engine = tokio::spawn(fleetsql::engine::run_with(
            cfg,
            compiled,
            Input::Channel(rx),
            metrics.clone(),
            std::future::pending(),
        ));
        for i in 0..READINGS {
            let m = Message {
                topic: format!("d{}/t", i % 100),
                payload: Bytes::from(format!(r#"{{"v": {}}}"#, i % 7)),
                received_at: fleetsql::time::now_ms(),
            };
            tx.send(m).await.expect("engine running");
        }
        // The input ends: the engine drains, closes its files and returns.
        drop(tx);
        tokio::time::timeout(Duration::from_secs(120), engine)
            .await
            .expect("the engine drained its backlog within 2 minutes")
            .unwrap()
            .unwrap();
    });
    let waited = metrics.backpressure_seconds.get();
    println!(
        "waited {waited:.2} s, backlog peak {} bytes",
        metrics.backlog_peak_bytes.get()
    );
    assert!(
        waited > 0.0,
        "ingest never had to wait: the pipeline was not slow enough"
    );
    let peak = metrics.backlog_peak_bytes.get() as usize;
    // Past the limit by at most what the shards had already been handed when ingest
    // paused: a full batch per shard (8,192 rows of about 45 bytes) and one routing batch.
    // The input decodes to about 4.5 MB.
    assert!(
        peak < (1500 << 10),
        "backlog peaked at {peak} bytes (limit {LIMIT})"
    );
    assert_eq!(metrics.backlog_bytes.get(), 0, "drained");
    let stored = rt
        .block_on(fleetsql::bench::count_rows(&data, "telemetry", "count(*)"))
        .unwrap();
    assert_eq!(stored, READINGS as i64, "every reading in the raw table");
}
