//! Changing a running pipeline: hot reload of pipeline files (SIGHUP, --watch), reference
//! tables reloaded when their file changes, and the bounded state of frames over past
//! windows.

use std::time::Duration;

use datafusion::arrow::array::{Array, Float64Array};
use datafusion::execution::FunctionRegistry;
use fleetsql::engine::local::Local;

use crate::util::*;

/// Replaces the file in one step, as editors do.
fn replace(file: &std::path::Path, text: &str) {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

const V1: &str = "\
CREATE TABLE telemetry (light DOUBLE, ts BIGINT)
  WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/telemetry', event_time = 'ts');
CREATE TABLE commands WITH (connector = 'mqtt', type = 'sink', topic = '{device_id}/commands');
CREATE TABLE counts WITH (connector = 'parquet');
INSERT INTO counts SELECT window_start, device_id, count(*) AS n
FROM TUMBLE(telemetry, event_time, INTERVAL '1 hour') GROUP BY window_start, device_id;
INSERT INTO commands SELECT device_id, light < 300 AS led_on FROM telemetry;
";

/// Issue 2/6 point 7: a changed file is picked up by --watch and by SIGHUP; the query
/// that did not change keeps its open window (its count spans the reload); a broken file
/// is refused with its errors and the running pipeline keeps answering.
#[test]
fn hot_reload_keeps_unchanged_windows_and_refuses_broken_files() {
    let t = "hot_reload_keeps_unchanged_windows_and_refuses_broken_files";
    if !have("mosquitto", t) || !have("mosquitto_pub", t) {
        return;
    }
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let file = write_pipeline(dir.path(), "p.sql", V1);
    let data = dir.path().join("data");
    let engine = Engine::start(
        &data,
        &[
            file.to_str().unwrap(),
            "--broker",
            &broker.url(),
            "--client-id",
            &format!("it-reload-{}", broker.port),
            "--watch",
            "--drain",
        ],
    );
    let sub = Subscriber::start(broker.port, "+/commands", "probe/commands");
    let commands_for = |device: &str| -> Vec<String> {
        sub.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, l)| {
                l.strip_prefix(&format!("{device}/commands "))
                    .map(str::to_string)
            })
            .collect()
    };
    // Event times stay inside one hour-long window, which stays open throughout.
    let reading = |device: &str, light: u32, ts: u32| {
        publish(
            broker.port,
            &[(
                format!("{device}/telemetry"),
                format!("{{\"light\": {light}, \"ts\": {ts}}}"),
            )],
        )
    };
    reading("a", 200, 1_000);
    wait_until(Duration::from_secs(10), "v1 answers", || {
        commands_for("a").len() == 1
    });
    assert_eq!(commands_for("a"), vec!["{\"led_on\":true}"]);

    // v2: a stricter threshold; the counting query is untouched.
    replace(&file, &V1.replace("light < 300", "light < 100"));
    wait_until(Duration::from_secs(10), "--watch reloads", || {
        engine.metric("fleetsql_pipeline_reloads_total{result=\"ok\"}") == Some(1.0)
    });
    // The log is read from the engine's stderr by a thread: wait for the line to arrive.
    wait_until(
        Duration::from_secs(10),
        "the reload's summary in the log",
        || {
            engine
                .log()
                .contains("1 queries kept their state, 1 new or changed")
        },
    );
    reading("b", 200, 1_001);
    wait_until(Duration::from_secs(10), "v2 answers", || {
        commands_for("b").len() == 1
    });
    assert_eq!(
        commands_for("b"),
        vec!["{\"led_on\":false}"],
        "the new rule"
    );

    // A broken file: refused (by --watch, then by SIGHUP), with its error in the log.
    replace(&file, &V1.replace("light < 300", "lux < 100"));
    wait_until(Duration::from_secs(10), "--watch refuses", || {
        engine.metric("fleetsql_pipeline_reloads_total{result=\"refused\"}") == Some(1.0)
    });
    unsafe {
        libc::kill(engine.proc.0.as_ref().unwrap().id() as i32, libc::SIGHUP);
    }
    wait_until(Duration::from_secs(10), "SIGHUP refuses again", || {
        engine.metric("fleetsql_pipeline_reloads_total{result=\"refused\"}") == Some(2.0)
    });
    wait_until(Duration::from_secs(10), "the refusal in the log", || {
        engine.log().contains("pipeline reload refused (SIGHUP)")
    });
    let log = engine.log();
    assert!(log.contains("lux"), "the refusal names the problem:\n{log}");
    reading("c", 50, 1_002);
    reading("c", 200, 1_003);
    wait_until(Duration::from_secs(10), "v2 still answers", || {
        commands_for("c").len() == 2
    });
    assert_eq!(
        commands_for("c"),
        vec!["{\"led_on\":true}", "{\"led_on\":false}"]
    );

    let log = engine.log.clone();
    assert_eq!(engine.terminate(), 0);
    // The hour window was open across both reloads: one row per device, nothing lost.
    let rows = sql(&[format!(
        "SELECT string_agg(device_id || ':' || CAST(n AS VARCHAR), ',' ORDER BY device_id) AS s FROM '{}/counts/'",
        data.display()
    )]);
    let got = datafusion::arrow::util::pretty::pretty_format_batches(&rows[0])
        .unwrap()
        .to_string();
    assert!(
        got.contains("| a:1,b:1,c:2 |"),
        "{got}\nlog:\n{}",
        log.lock().unwrap()
    );
}

/// Issue 2/6 point 3: a reference table is read again when its file changes; the cached
/// plans see the new rows without being re-planned; a broken file keeps the old contents.
#[test]
fn reference_table_reloads_when_its_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("setpoints.csv");
    std::fs::write(&csv, "device_id,setpoint\nd1,20\n").unwrap();
    let p = write_pipeline(
        dir.path(),
        "p.sql",
        "CREATE TABLE t (celsius DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t');\n\
         CREATE TABLE setpoints (device_id VARCHAR, setpoint DOUBLE) WITH (connector = 'file', path = 'setpoints.csv');\n\
         CREATE TABLE out WITH (connector = 'parquet');\n\
         INSERT INTO out SELECT t.device_id, s.setpoint - t.celsius AS gap FROM t JOIN setpoints s USING (device_id);\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut local = local(&p).await;
        let gaps = |local: &Local| -> Vec<f64> {
            local
                .table("out")
                .unwrap()
                .iter()
                .flat_map(|b| {
                    let a = b
                        .column(1)
                        .as_any()
                        .downcast_ref::<Float64Array>()
                        .unwrap()
                        .clone();
                    (0..a.len()).map(move |i| a.value(i))
                })
                .collect()
        };
        local.message("d1/t", br#"{"celsius": 18}"#, 1_000).await;
        assert_eq!(gaps(&local), vec![2.0]);
        std::fs::write(&csv, "device_id,setpoint\nd1,22.5\nd2,19\n").unwrap();
        // Checked once a second (of the runner's time).
        local.advance(2_500).await;
        local.message("d1/t", br#"{"celsius": 18}"#, 2_600).await;
        local.message("d2/t", br#"{"celsius": 18}"#, 2_600).await;
        assert_eq!(gaps(&local), vec![2.0, 4.5, 1.0]);
        assert_eq!(
            metric_value(
                &local.metrics.render(),
                "fleetsql_reference_reloads_total{result=\"ok\",table=\"setpoints\"}"
            ),
            Some(1.0)
        );
        // Unreadable contents: refused, counted, the old rows stay.
        std::fs::write(&csv, "device_id,setpoint\nd1,not-a-number\n").unwrap();
        local.advance(4_000).await;
        local.message("d1/t", br#"{"celsius": 18}"#, 4_100).await;
        assert_eq!(gaps(&local), vec![2.0, 4.5, 1.0, 4.5]);
        assert_eq!(
            metric_value(
                &local.metrics.render(),
                "fleetsql_reference_reloads_total{result=\"error\",table=\"setpoints\"}"
            ),
            Some(1.0)
        );
    });
}

/// Issue 2/6 point 5: a RANGE frame's per-key state is forgotten once a key falls out of
/// every frame, so many short-lived keys do not grow memory without bound.
#[test]
fn frame_state_forgets_keys_outside_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(
        dir.path(),
        "p.sql",
        "CREATE TABLE t (v DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t');\n\
         CREATE TABLE out WITH (connector = 'parquet');\n\
         INSERT INTO out SELECT device_id, avg(v) OVER (PARTITION BY device_id RANGE BETWEEN INTERVAL '10 seconds' PRECEDING AND CURRENT ROW) AS a FROM t;\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let compiled = fleetsql::pipeline::load(&[p]).await.unwrap();
        let name = &compiled.queries[0].spec.rolling[0].udf;
        let udf = compiled.ctx.udf(name).expect("the frame's function");
        let keys = || {
            (udf.inner().as_ref() as &dyn std::any::Any)
                .downcast_ref::<fleetsql::functions::rolling::Rolling>()
                .expect("a Rolling")
                .keys()
        };
        let mut local = Local::new(compiled).unwrap();
        for d in 0..1000 {
            local
                .message(&format!("d{d}/t"), br#"{"v": 1}"#, 1_000)
                .await;
        }
        assert_eq!(keys(), 1000);
        // One key keeps talking for a minute; the others fall out of the 10 s frame.
        for i in 0..200 {
            local.message("d0/t", br#"{"v": 1}"#, 2_000 + i * 300).await;
        }
        assert!(keys() <= 1, "keys held: {}", keys());
    });
}

/// Reference data from a Parquet file: columns taken by name and cast to the declared
/// types; a rewritten file is picked up like a CSV.
#[test]
fn parquet_reference_table_joins_and_reloads() {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sites.parquet");
    // Written by another tool: an extra column, and an integer where the pipeline wants DOUBLE.
    let write = |rows: &[(&str, &str, i64)]| {
        let schema = Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, false),
            Field::new("site", DataType::Utf8, false),
            Field::new("max_lux", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap();
        let tmp = path.with_extension("tmp");
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&tmp).unwrap(),
            schema,
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    write(&[("s1", "north", 500)]);
    let p = write_pipeline(
        dir.path(),
        "p.sql",
        "CREATE TABLE t (lux DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t');\n\
         CREATE TABLE sites (device_id VARCHAR, max_lux DOUBLE) WITH (connector = 'file', path = 'sites.parquet');\n\
         CREATE TABLE out WITH (connector = 'parquet');\n\
         INSERT INTO out SELECT t.device_id, t.lux > s.max_lux AS too_bright FROM t JOIN sites s USING (device_id);\n",
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut local = local(&p).await;
        local.message("s1/t", br#"{"lux": 600}"#, 1_000).await;
        local.message("s2/t", br#"{"lux": 600}"#, 1_000).await;
        assert_eq!(
            json_lines(&local.table("out").unwrap()),
            vec![r#"{"device_id":"s1","too_bright":true}"#]
        );
        write(&[("s1", "north", 700), ("s2", "south", 100)]);
        local.advance(2_500).await;
        local.message("s1/t", br#"{"lux": 600}"#, 2_600).await;
        local.message("s2/t", br#"{"lux": 600}"#, 2_600).await;
        assert_eq!(
            json_lines(&local.table("out").unwrap()),
            vec![
                r#"{"device_id":"s1","too_bright":false}"#,
                r#"{"device_id":"s1","too_bright":true}"#,
                r#"{"device_id":"s2","too_bright":true}"#,
            ]
        );
    });
}
