//! When the pipeline runner runs its micro-batch queries (those without a window) and
//! writes raw rows: a stream read only by queries into tables gathers rows first, as do
//! the raw tables; one read by a command sink runs its queries at once.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use datafusion::arrow::record_batch::RecordBatch;
use fleetsql::decode::{Message, SourceDecoder, SourceShape};
use fleetsql::engine::runner::{GATHER_ROWS, Output, Outputs, Runner};
use fleetsql::metrics::Metrics;

use crate::util::*;

const PIPELINE: &str = "
CREATE TABLE a (x DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = 'a/{device_id}');
CREATE TABLE b (y DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = 'b/{device_id}');
CREATE TABLE hot WITH (connector = 'parquet');
CREATE TABLE cmd WITH (connector = 'mqtt', type = 'sink', topic = '{device_id}/commands');
INSERT INTO hot SELECT device_id, x FROM a WHERE x > 0;
INSERT INTO cmd SELECT device_id, y > 1 AS led_on FROM b;
";

fn rows(captured: &Arc<Mutex<Vec<RecordBatch>>>) -> usize {
    captured.lock().unwrap().iter().map(|b| b.num_rows()).sum()
}

#[tokio::test]
async fn table_only_queries_gather_rows_and_command_queries_run_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let pipeline = fleetsql::pipeline::load(&[path]).await.unwrap();
    let mut decoders: Vec<SourceDecoder> = pipeline
        .sources
        .iter()
        .map(|s| SourceDecoder::new(Arc::new(SourceShape::new(s))).unwrap())
        .collect();
    let streams = [pipeline.stream("a").unwrap(), pipeline.stream("b").unwrap()];
    let (hot, hot_rows) = Output::capture();
    let (cmd, cmd_rows) = Output::capture();
    let (raw_a, raw_rows) = Output::capture();
    let outputs = Outputs {
        raw: vec![raw_a, Output::Discard],
        sinks: vec![hot, cmd],
        dead_letters: Output::Discard,
        late_rows: Output::Discard,
    };
    let mut runner = Runner::new(pipeline, outputs, Metrics::new());
    let now = fleetsql::time::now_ms();
    let mut send = |runner: &mut Runner, source: usize, n: usize| {
        for i in 0..n {
            decoders[source].push(Message {
                topic: format!("{}/dev-{i}", ["a", "b"][source]),
                payload: Bytes::from(format!("{{\"x\": {i}.5, \"y\": {i}.5}}")),
                received_at: now,
            });
        }
        let (batch, dead) = decoders[source].flush();
        assert!(dead.is_empty(), "{dead:?}");
        runner.rows(streams[source], batch.unwrap(), now);
    };

    // A few readings of each source, as they come off the channel.
    send(&mut runner, 0, 10);
    send(&mut runner, 1, 3);
    runner.run_due_micro_batches().await;
    assert_eq!(rows(&cmd_rows), 3, "a command query runs on every arrival");
    assert_eq!(rows(&hot_rows), 0, "a table-only query waits for more rows");
    assert_eq!(rows(&raw_rows), 0, "raw rows wait for more rows");

    // Enough to run on.
    send(&mut runner, 0, GATHER_ROWS);
    runner.run_due_micro_batches().await;
    assert_eq!(
        rows(&hot_rows),
        10 + GATHER_ROWS,
        "a table-only query runs once its stream holds GATHER_ROWS, over every row queued"
    );
    assert_eq!(rows(&raw_rows), 10 + GATHER_ROWS, "so do raw rows");
    assert_eq!(
        raw_rows.lock().unwrap().len(),
        1,
        "gathered raw rows go to the table as one batch"
    );

    // The runner's tick runs whatever is queued, however little.
    send(&mut runner, 0, 5);
    runner.run_due_micro_batches().await;
    assert_eq!(rows(&hot_rows), 10 + GATHER_ROWS);
    runner.tick(now).await;
    assert_eq!(
        rows(&hot_rows),
        10 + GATHER_ROWS + 5,
        "the tick ran the rest"
    );
}
