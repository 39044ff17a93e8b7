//! Tumbling windows and watermarks, and the cached plan that runs over each window.

use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use fleetsql::engine::window::{SourceClock, Tumbling};
use std::sync::Arc;

use crate::util::*;

fn rows(times: &[i64]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Int64, false),
        Field::new("event_time", fleetsql::pipeline::compile::ts_type(), false),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(0..times.len() as i64)),
            Arc::new(TimestampMillisecondArray::from(times.to_vec()).with_timezone("UTC")),
        ],
    )
    .unwrap()
}

#[test]
fn rows_land_in_their_window_and_the_end_is_exclusive() {
    let mut w = Tumbling::new(1000);
    // 999 is in [0, 1000); 1000, exactly on the end, belongs to [1000, 2000).
    assert_eq!(w.add(&rows(&[0, 999, 1000, 2500, -1]), 1), 0);
    let closed = w.close_until(999);
    assert_eq!(
        closed.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![-1000],
        "[0, 1000) stays open at 999"
    );
    let closed = w.close_until(1000);
    assert_eq!(
        closed.len(),
        1,
        "a window closes when the watermark reaches its end"
    );
    assert_eq!(closed[0].0, 0);
    assert_eq!(closed[0].1.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    // Late: the [0, 1000) window is closed.
    assert_eq!(w.add(&rows(&[500, 1500]), 1), 1);
    let rest = w.close_all();
    assert_eq!(
        rest.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1000, 2000]
    );
    assert_eq!(rest[0].1.iter().map(|b| b.num_rows()).sum::<usize>(), 2);
}

#[test]
fn watermark_trails_event_time_and_moves_on_when_quiet() {
    let mut c = SourceClock::new(2000);
    assert_eq!(c.watermark(0), i64::MIN, "no rows, no progress");
    c.observe(&rows(&[10_000, 12_000, 11_000]), 1, 100_000);
    assert_eq!(
        c.watermark(100_000),
        10_000,
        "max event time minus the delay"
    );
    // Quiet for the delay plus a second: event time follows the clock from there.
    assert_eq!(c.watermark(103_000), 10_000);
    assert_eq!(c.watermark(105_000), 12_000);
}

/// The cached physical plan sees each window's own rows (a MemTable-backed plan would keep
/// the first window's), and agrees with planning afresh.
#[test]
fn cached_plan_reads_each_window_and_matches_replanning() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(
        dir.path(),
        "p.sql",
        "CREATE TABLE t (v DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t');\n\
         CREATE TABLE o WITH (connector = 'parquet');\n\
         INSERT INTO o SELECT window_start, device_id, count(*) AS n, sum(v) AS total\n\
         FROM TUMBLE(t, event_time, INTERVAL '1 second') GROUP BY window_start, device_id ORDER BY device_id;\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = fleetsql::pipeline::load(&[p]).await.unwrap();
        let q = &c.queries[0];
        let w = q.window.as_ref().unwrap();
        let source = &c.sources[0];
        for (round, devices) in [(1i64, vec!["a", "b"]), (2, vec!["c"])] {
            let mut shard = fleetsql::decode::SourceDecoder::new(Arc::new(
                fleetsql::decode::SourceShape::new(source),
            ))
            .unwrap();
            for d in &devices {
                for i in 0..round {
                    shard.push(fleetsql::decode::Message {
                        topic: format!("{d}/t"),
                        payload: format!("{{\"v\": {}}}", i + 1).into_bytes().into(),
                        received_at: round * 1000,
                    });
                }
            }
            let batch = shard.flush().0.unwrap();
            let n = batch.num_rows();
            let mut cols = batch.columns().to_vec();
            cols.push(Arc::new(
                TimestampMillisecondArray::from_value(round * 1000, n).with_timezone("UTC"),
            ));
            cols.push(Arc::new(
                TimestampMillisecondArray::from_value(round * 1000 + 1000, n).with_timezone("UTC"),
            ));
            w.slot
                .set(vec![RecordBatch::try_new(w.schema.clone(), cols).unwrap()]);
            let cached = q.execute(c.ctx.task_ctx()).await.unwrap();
            let fresh = q.execute_replanned(&c.ctx).await.unwrap();
            let show = |b: &[RecordBatch]| {
                datafusion::arrow::util::pretty::pretty_format_batches(b)
                    .unwrap()
                    .to_string()
            };
            assert_eq!(show(&cached), show(&fresh));
            assert_eq!(
                cached.iter().map(|b| b.num_rows()).sum::<usize>(),
                devices.len(),
                "round {round}: {}",
                show(&cached)
            );
            for d in &devices {
                assert!(
                    show(&cached).contains(&format!("| {d} ")),
                    "round {round} has device {d}"
                );
            }
        }
    });
}
