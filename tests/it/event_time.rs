//! Event time over a whole pipeline, in process with the engine's own runner and times given
//! by the test: a fleet that goes quiet, a device with a gap, and a device that comes back
//! after an hour offline and uploads its buffered readings.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::TimestampMillisecondType;
use datafusion::arrow::record_batch::RecordBatch;
use fleetsql::engine::local::Local;

use crate::util::{local, write_pipeline};

/// 2026-01-01T00:00:00Z: event times are epoch seconds in the payload.
const T0: i64 = 1_767_225_600_000;

const PIPELINE: &str = "
CREATE TABLE telemetry (v DOUBLE, ts DOUBLE)
  WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t',
        event_time = 'ts', watermark_delay = '2 seconds');
CREATE TABLE counts WITH (connector = 'parquet');
INSERT INTO counts SELECT window_start, device_id, count(*) AS n
FROM TUMBLE(telemetry, event_time, INTERVAL '10 seconds') GROUP BY window_start, device_id;
";

async fn pipeline(dir: &std::path::Path) -> Local {
    local(&write_pipeline(dir, "p.sql", PIPELINE)).await
}

/// One reading of `device` taken at `at` (ms), received `lag` ms later.
async fn reading(l: &mut Local, device: &str, at: i64, lag: i64) {
    let payload = format!(r#"{{"v": 1, "ts": {}}}"#, at as f64 / 1000.0);
    l.message(&format!("{device}/t"), payload.as_bytes(), at + lag)
        .await;
}

/// (window start in seconds after T0, device, n) of every row of `counts`.
fn counts(l: &Local) -> Vec<(i64, String, i64)> {
    let mut out = Vec::new();
    for b in l.table("counts").unwrap() {
        let start = b.column(0).as_primitive::<TimestampMillisecondType>();
        let device = datafusion::arrow::compute::cast(
            b.column(1),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let device = device.as_string::<i32>();
        let n = b
            .column(2)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            out.push((
                (start.value(i) - T0) / 1000,
                device.value(i).to_string(),
                n.value(i),
            ));
        }
    }
    out.sort();
    out
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

fn late_total(l: &Local) -> f64 {
    l.metrics
        .late_rows
        .with_label_values(&["telemetry", "late"])
        .get() as f64
}

/// The fleet stops sending: the last window still closes, by the clock, without any new
/// reading and without shutting down; at the time the watermark rules say.
#[tokio::test]
async fn an_idle_fleet_still_closes_its_last_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = pipeline(dir.path()).await;
    for s in 0..=25 {
        for d in ["a", "b", "c"] {
            reading(&mut l, d, T0 + s * 1000, 0).await;
        }
    }
    assert!(
        counts(&l).iter().all(|(w, _, _)| *w < 20),
        "the window [20 s, 30 s) is open while readings are at 25 s: {:?}",
        counts(&l)
    );
    // Newest event time 25 s, delay 2 s, idle after delay + 1 s = 3 s of silence; from then
    // the watermark moves with the clock: it reaches 30 s when the clock reads 35 s.
    l.advance(T0 + 34_999).await;
    assert!(counts(&l).iter().all(|(w, _, _)| *w < 20));
    l.advance(T0 + 35_000).await;
    let last: Vec<_> = counts(&l)
        .into_iter()
        .filter(|(w, _, _)| *w == 20)
        .collect();
    assert_eq!(
        last,
        vec![
            (20, "a".into(), 6),
            (20, "b".into(), 6),
            (20, "c".into(), 6)
        ]
    );
}

/// A device falls silent for ten minutes and comes back: its last window before the gap
/// closes during the gap, no empty windows appear for the gap, and its readings after the
/// gap are on time (the idle advance never runs ahead of real time).
#[tokio::test]
async fn a_gap_closes_the_window_before_it_and_the_readings_after_it_are_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = pipeline(dir.path()).await;
    for s in 0..6 {
        reading(&mut l, "a", T0 + s * 1000, 50).await;
    }
    for minute in 1..=10 {
        l.advance(T0 + minute * 60_000).await;
    }
    assert_eq!(
        counts(&l),
        vec![(0, "a".into(), 6)],
        "closed during the gap"
    );
    for s in 605..615 {
        reading(&mut l, "a", T0 + s * 1000, 50).await;
    }
    l.finish().await;
    assert_eq!(
        counts(&l),
        vec![
            (0, "a".into(), 6),
            (600, "a".into(), 5),
            (610, "a".into(), 5)
        ]
    );
    assert_eq!(rows(&l.table("late_rows").unwrap()), 0);
    assert_eq!(late_total(&l), 0.0);
}

/// Device `b` is offline for an hour while `a` keeps reporting; when it reconnects it
/// uploads the hour it buffered (in messages of 100 readings each, shuffled) and goes on
/// live. Every reading is stored with its own time; those whose windows had closed are
/// late and kept in `late_rows`; `a`'s results are untouched; `b`'s live readings after the
/// upload are on time.
#[tokio::test]
async fn a_backlog_uploaded_after_reconnect_is_stored_and_late_rows_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = pipeline(dir.path()).await;
    const HOUR: i64 = 3600;
    // `a` reports every 5 s throughout; `b` every second until it drops off at 60 s.
    for s in 0..HOUR {
        if s % 5 == 0 {
            reading(&mut l, "a", T0 + s * 1000, 100).await;
        }
        if s < 60 {
            reading(&mut l, "b", T0 + s * 1000, 100).await;
        }
    }
    // `b` was measuring every second while offline, from 60 s to the hour.
    let mut backlog: Vec<i64> = (60..HOUR).collect();
    // A fixed shuffle (multiplicative hashing), so the test is the same on every run.
    backlog.sort_by_key(|s| (s * 2_654_435_761) % 4_294_967_296);
    let upload_at = T0 + HOUR * 1000 + 500;
    for chunk in backlog.chunks(100) {
        let payload = format!(
            "[{}]",
            chunk
                .iter()
                .map(|s| format!(r#"{{"v": 1, "ts": {}}}"#, (T0 / 1000) + s))
                .collect::<Vec<_>>()
                .join(",")
        );
        l.message("b/t", payload.as_bytes(), upload_at).await;
    }
    // Live again, both devices, for 30 s.
    for s in HOUR + 1..HOUR + 31 {
        reading(&mut l, "a", T0 + s * 1000, 100).await;
        reading(&mut l, "b", T0 + s * 1000, 100).await;
    }
    l.finish().await;

    // Every reading in the raw table, with its own event time.
    let raw = l.table("telemetry").unwrap();
    let mut b_times: Vec<i64> = Vec::new();
    for batch in &raw {
        let device = batch.column_by_name("device_id").unwrap();
        let device =
            datafusion::arrow::compute::cast(device, &datafusion::arrow::datatypes::DataType::Utf8)
                .unwrap();
        let device = device.as_string::<i32>();
        let et = batch
            .column_by_name("event_time")
            .unwrap()
            .as_primitive::<TimestampMillisecondType>();
        for i in 0..batch.num_rows() {
            if device.value(i) == "b" {
                b_times.push((et.value(i) - T0) / 1000);
            }
        }
    }
    b_times.sort();
    let expected: Vec<i64> = (0..60).chain(60..HOUR).chain(HOUR + 1..HOUR + 31).collect();
    assert_eq!(
        b_times, expected,
        "every reading of b stored once, at its own time"
    );

    // At the upload the watermark stood at 3595 s - 2 s (a's last reading): windows up to
    // [3580 s, 3590 s) had closed. b's readings from 3590 s on were still on time.
    let on_time_backlog = (3590..HOUR).count();
    let late = backlog.len() - on_time_backlog;
    assert_eq!(late_total(&l), late as f64);
    let late_rows = l.table("late_rows").unwrap();
    assert_eq!(rows(&late_rows), late);
    for b in &late_rows {
        let reason = b.column_by_name("reason").unwrap().as_string::<i32>();
        let device = b.column_by_name("device_id").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            assert_eq!((reason.value(i), device.value(i)), ("late", "b"));
        }
    }

    let counts = counts(&l);
    // a: every window full (two readings per 10 s), none disturbed by b's upload.
    let a: Vec<_> = counts.iter().filter(|(_, d, _)| d == "a").collect();
    assert_eq!(a.len(), 364);
    assert!(a[..360].iter().all(|(_, _, n)| *n == 2), "{:?}", &a[..5]);
    // b: its live windows before the outage, the one window the upload still reached, and
    // its live windows after.
    let b: Vec<_> = counts
        .iter()
        .filter(|(_, d, _)| d == "b")
        .map(|(w, _, n)| (*w, *n))
        .collect();
    let mut want: Vec<(i64, i64)> = (0..60).step_by(10).map(|w| (w, 10)).collect();
    want.push((3590, 10));
    want.extend([(3600, 9), (3610, 10), (3620, 10), (3630, 1)]);
    assert_eq!(b, want);
}
