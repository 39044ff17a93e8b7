//! JSON -> Arrow: bad messages become dead letters and cost nothing around them.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Float64Array, StringArray, TimestampMillisecondArray};
use datafusion::arrow::record_batch::RecordBatch;
use fleetsql::decode::{Message, SourceDecoder, SourceShape};

use crate::util::*;

fn shape(columns: &str, options: &str) -> Arc<SourceShape> {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(
        dir.path(),
        "p.sql",
        &format!(
            "CREATE TABLE s ({columns}) WITH (connector = 'mqtt', type = 'source', topic = 'site/{{site}}/{{device_id}}/t'{options});\n\
             CREATE TABLE o WITH (connector = 'parquet');\nINSERT INTO o SELECT * FROM s;\n"
        ),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let compiled = rt
        .block_on(fleetsql::pipeline::load(&[p]))
        .unwrap_or_else(|e| panic!("{e}"));
    Arc::new(SourceShape::new(&compiled.sources[0]))
}

/// The column `name` of a decoded batch, as its Arrow array type.
fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> &'a T {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_any()
        .downcast_ref::<T>()
        .unwrap_or_else(|| panic!("column {name} is not a {}", std::any::type_name::<T>()))
}

fn msg(topic: &str, payload: &str, at: i64) -> Message {
    Message {
        topic: topic.into(),
        payload: payload.as_bytes().to_vec().into(),
        received_at: at,
    }
}

#[test]
fn bad_messages_are_isolated_with_reasons() {
    let mut d = SourceDecoder::new(shape("light DOUBLE NOT NULL", "")).unwrap();
    let payloads = [
        ("{\"light\": 1}", None),
        ("not json", Some("invalid_json")),
        ("{\"light\": 2.5, \"extra\": true}", None),
        ("{\"light\": \"dark\"}", Some("schema_mismatch")),
        ("{\"light\": 3}{\"light\": 4}", Some("not_one_object")),
        ("", Some("not_one_object")),
        ("{\"light\": ", Some("invalid_json")),
        ("{}", Some("schema_mismatch")),
        ("[1, 2]", Some("not_one_object")),
        (
            "[{\"light\": 6}, {\"light\": null}]",
            Some("schema_mismatch"),
        ),
        ("{\"light\": 5}", None),
        ("[{\"light\": 8}, {\"light\": 9}]", None),
    ];
    for (i, (p, _)) in payloads.iter().enumerate() {
        d.push(msg("site/north/dev-1/t", p, 1_000 + i as i64));
    }
    let (batch, dead) = d.flush();
    let batch = batch.expect("good rows");
    let light = column::<Float64Array>(&batch, "light");
    // An array of readings is one row per element, in order.
    assert_eq!(light.values().to_vec(), vec![1.0, 2.5, 5.0, 8.0, 9.0]);
    let site = column::<StringArray>(&batch, "site");
    assert_eq!(site.value(0), "north");
    let dev = column::<StringArray>(&batch, "device_id");
    assert_eq!(dev.value(2), "dev-1");
    let mut got: Vec<(String, &str)> = dead
        .iter()
        .map(|d| (String::from_utf8_lossy(&d.payload).into_owned(), d.reason))
        .collect();
    got.sort();
    let mut want: Vec<(String, &str)> = payloads
        .iter()
        .filter_map(|(p, r)| r.map(|r| (p.to_string(), r)))
        .collect();
    want.sort();
    assert_eq!(got, want);
    // The decoder recovers: the next flush of good rows takes the fast path.
    d.push(msg("site/north/dev-1/t", "{\"light\": 7}", 2_000));
    let (b, dead) = d.flush();
    assert_eq!(b.unwrap().num_rows(), 1);
    assert!(dead.is_empty());
}

#[test]
fn event_time_from_rfc3339_epoch_seconds_and_millis() {
    let mut d = SourceDecoder::new(shape("v DOUBLE, ts BIGINT", ", event_time = 'ts'")).unwrap();
    d.push(msg("site/a/d/t", "{\"v\": 1, \"ts\": 1700000000}", 5));
    d.push(msg("site/a/d/t", "{\"v\": 2, \"ts\": 1700000000123}", 6));
    d.push(msg("site/a/d/t", "{\"v\": 3}", 7));
    let (b, dead) = d.flush();
    assert!(dead.is_empty(), "{dead:?}");
    let b = b.unwrap();
    let et = column::<TimestampMillisecondArray>(&b, "event_time");
    assert_eq!(
        et.values().to_vec(),
        vec![1_700_000_000_000, 1_700_000_000_123, 7],
        "seconds, millis, receive time when absent"
    );

    let mut d = SourceDecoder::new(shape("v DOUBLE, ts TIMESTAMP", ", event_time = 'ts'")).unwrap();
    d.push(msg(
        "site/a/d/t",
        "{\"v\": 1, \"ts\": \"2026-11-22T10:00:00.250Z\"}",
        5,
    ));
    d.push(msg("site/a/d/t", "{\"v\": 2, \"ts\": \"yesterday\"}", 6));
    let (b, dead) = d.flush();
    let et = column::<TimestampMillisecondArray>(b.as_ref().unwrap(), "event_time").clone();
    assert_eq!(et.len(), 1);
    assert_eq!(et.value(0), 1_795_341_600_250);
    assert_eq!(dead.len(), 1, "an unparseable time is a dead letter");
}

/// Issue [3/6] point 5: duplicates of a source with a sequence field are dropped and counted.
#[test]
fn duplicates_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let p = crate::util::write_pipeline(
        dir.path(),
        "p.sql",
        "CREATE TABLE t (v DOUBLE, seq BIGINT) WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t', sequence = 'seq');\n\
         CREATE TABLE out WITH (connector = 'parquet');\n\
         INSERT INTO out SELECT device_id, v FROM t;\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut local = crate::util::local(&p).await;
        // Receive-time source: the sequence number alone identifies a reading, since a
        // redelivered message arrives at another time.
        for (i, payload) in [
            r#"{"v": 1, "seq": 7}"#,
            r#"{"v": 1, "seq": 7}"#,
            r#"{"v": 2, "seq": 8}"#,
            r#"{"v": 1, "seq": 7}"#,
        ]
        .iter()
        .enumerate()
        {
            local
                .message("d/t", payload.as_bytes(), 1_000 + i as i64)
                .await;
        }
        let rows: usize = local
            .table("out")
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(rows, 2);
        let m = local.metrics.render();
        assert_eq!(
            crate::util::metric_value(&m, "fleetsql_duplicates_total{source=\"t\"}"),
            Some(2.0)
        );
        assert_eq!(
            crate::util::metric_value(&m, "fleetsql_rows_ingested_total{source=\"t\"}"),
            Some(2.0)
        );
    });
}

/// More rows in one flush than the Arrow decoder's batch size (devices uploading buffered
/// readings as JSON arrays, or more single messages than a buffer usually holds): every
/// row comes out, in order, and none is a dead letter.
#[test]
fn a_flush_larger_than_the_decoder_batch_keeps_every_row() {
    let mut d = SourceDecoder::new(shape("light DOUBLE NOT NULL", "")).unwrap();
    let max = fleetsql::decode::MAX_BUFFERED_ROWS;
    // 100 arrays of 100 readings, then single messages past the batch size.
    let mut expected = Vec::new();
    for m in 0..100 {
        let items: Vec<String> = (0..100)
            .map(|k| {
                expected.push((m * 100 + k) as f64);
                format!("{{\"light\": {}}}", m * 100 + k)
            })
            .collect();
        d.push(msg(
            "site/north/dev-1/t",
            &format!("[{}]", items.join(",")),
            1_000,
        ));
    }
    for i in 0..max + 10 {
        expected.push(i as f64);
        d.push(msg(
            "site/north/dev-2/t",
            &format!("{{\"light\": {i}}}"),
            2_000,
        ));
    }
    let (batch, dead) = d.flush();
    assert!(
        dead.is_empty(),
        "dead letters: {:?}",
        dead.first().map(|d| &d.error)
    );
    let batch = batch.expect("rows");
    let light = column::<Float64Array>(&batch, "light");
    assert_eq!(light.len(), expected.len());
    assert_eq!(light.values().to_vec(), expected);
}
