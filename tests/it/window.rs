//! Window assignment (TUMBLE, HOP, SESSION) and watermarks, and the cached plan that runs
//! over each window.

use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use fleetsql::engine::window::{Closed, Panes, SourceClock, Windows};
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

fn starts(closed: &[Closed]) -> Vec<i64> {
    closed.iter().map(|c| c.inputs[0][0].0).collect()
}

#[test]
fn rows_land_in_their_window_and_the_end_is_exclusive() {
    let mut w = Windows::Panes(Panes::new(1000, 1000, 1));
    // 999 is in [0, 1000); 1000, exactly on the end, belongs to [1000, 2000).
    assert_eq!(w.add(0, &rows(&[0, 999, 1000, 2500, -1]), 1).rows(), 0);
    let closed = w.close_until(999);
    assert_eq!(starts(&closed), vec![-1000], "[0, 1000) stays open at 999");
    let closed = w.close_until(1000);
    assert_eq!(
        closed.len(),
        1,
        "a window closes when the watermark reaches its end"
    );
    assert_eq!(starts(&closed), vec![0]);
    assert_eq!(closed[0].rows(), 2);
    assert_eq!(closed[0].inputs[0][0].1, 1000, "window_end");
    // Late: the [0, 1000) window is closed.
    assert_eq!(w.add(0, &rows(&[500, 1500]), 1).rows(), 1);
    let rest = w.close_all();
    assert_eq!(starts(&rest), vec![1000, 2000]);
    assert_eq!(rest[0].rows(), 2);
}

/// Under QoS 1 a pane receives thousands of small batches; they are joined as they
/// accumulate, and no row is lost or counted twice.
#[test]
fn many_small_batches_in_a_pane_are_joined() {
    let mut w = Windows::Panes(Panes::new(1000, 1000, 1));
    for i in 0..320 {
        let t = (i * 3) as i64;
        assert_eq!(w.add(0, &rows(&[t; 20]), 1).rows(), 0);
    }
    let closed = w.close_all();
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].rows(), 320 * 20, "every row once");
    let batches = closed[0].inputs[0].len();
    assert!(
        batches < 320 / 2,
        "{batches} batches for 320 small ones handed in"
    );
}

#[test]
fn hop_windows_overlap_and_share_rows() {
    // 3 s windows every second: a row at 2.5 s is in [0,3), [1,4) and [2,5).
    let mut w = Windows::Panes(Panes::new(3000, 1000, 1));
    assert_eq!(w.add(0, &rows(&[2500, 4200]), 1).rows(), 0);
    let closed = w.close_all();
    let got: Vec<(i64, usize)> = closed
        .iter()
        .map(|c| (c.inputs[0][0].0, c.rows()))
        .collect();
    assert_eq!(
        got,
        vec![(0, 1), (1000, 1), (2000, 2), (3000, 1), (4000, 1)],
        "each window holds the rows of its three panes"
    );
    // A quiet stretch is skipped, not walked one slide at a time.
    let mut w = Windows::Panes(Panes::new(3000, 1000, 1));
    w.add(0, &rows(&[0, 1_000_000_000]), 1);
    assert_eq!(w.close_all().len(), 6);
}

#[test]
fn sessions_split_on_gaps_per_key_and_merge_out_of_order_rows() {
    let schema = Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("event_time", fleetsql::pipeline::compile::ts_type(), false),
    ]));
    let batch = |ids: &[&str], times: &[i64]| {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(datafusion::arrow::array::StringArray::from(ids.to_vec())),
                Arc::new(TimestampMillisecondArray::from(times.to_vec()).with_timezone("UTC")),
            ],
        )
        .unwrap()
    };
    let kind = fleetsql::pipeline::rewrite::WindowKind::Session {
        gap: std::time::Duration::from_secs(1),
        keys: vec!["device_id".into()],
    };
    let mut w = Windows::new(&kind, 1, vec![0], &schema);
    // a: 0, 500 | 3000 ; b: 200
    assert_eq!(
        w.add(0, &batch(&["a", "a", "b", "a"], &[0, 500, 200, 3000]), 1)
            .rows(),
        0
    );
    // 1200 arrives late in receive order but bridges nothing: a's first session is 0..1500.
    assert_eq!(w.add(0, &batch(&["a"], &[1200]), 1).rows(), 0);
    let closed = w.close_until(2300);
    assert_eq!(
        closed.len(),
        1,
        "one execution for every session that ended"
    );
    let mut got: Vec<(i64, i64, usize)> = closed[0].inputs[0]
        .iter()
        .map(|(s, e, b)| (*s, *e, b.num_rows()))
        .collect();
    got.sort();
    // a's 0..1200 session ends 1 s after its last row; b's ends at 1200.
    assert_eq!(got, vec![(0, 2200, 1), (0, 2200, 2), (200, 1200, 1)]);
    // A row for a closed stretch that joins no open session is late.
    assert_eq!(w.add(0, &batch(&["b"], &[300]), 1).rows(), 1);
    // A row that bridges into the open session of a at 3000 merges.
    assert_eq!(w.add(0, &batch(&["a"], &[2600]), 1).rows(), 0);
    let rest = w.close_all();
    let got: Vec<(i64, i64)> = rest[0].inputs[0].iter().map(|(s, e, _)| (*s, *e)).collect();
    assert!(got.iter().all(|g| *g == (2600, 4000)), "{got:?}");
    assert_eq!(rest[0].rows(), 2);
}

#[test]
fn watermark_trails_event_time_and_moves_on_when_quiet() {
    let mut c = SourceClock::new(2000, 60_000);
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

#[test]
fn event_time_ahead_of_the_clock_does_not_move_the_watermark_past_it() {
    let mut c = SourceClock::new(1000, 60_000);
    // A device an hour fast, received at 10 s: the watermark goes no further than the
    // engine's clock minus the delay.
    c.observe(&rows(&[3_610_000]), 1, 10_000);
    assert_eq!(c.watermark(10_000), 9_000);
    assert_eq!(c.future_limit(10_000), 70_000);
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
            let input = &w.inputs[0];
            input.slot.set(vec![
                RecordBatch::try_new(input.schema.clone(), cols).unwrap(),
            ]);
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
