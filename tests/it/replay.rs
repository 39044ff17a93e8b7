//! `fleetsql replay`, run as users run it: recorded CSV and Parquet files in a tempdir, the
//! real binary, and the tables read back with DataFusion.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use serde_json::Value;

use crate::util::*;

/// 2014-04-01T00:00:00Z, the recordings' first second.
const T0: i64 = 1_396_310_400;

/// A source without an event-time field (the files' time column gives it), a windowed
/// aggregation into Parquet, and commands for high readings.
const PIPELINE: &str = "
CREATE TABLE telemetry (vibration DOUBLE NOT NULL, temp DOUBLE)
  WITH (connector = 'mqtt', type = 'source', topic = 'plant/{device_id}/telemetry');
CREATE TABLE vib_10s WITH (connector = 'parquet');
CREATE TABLE commands WITH (connector = 'mqtt', type = 'sink', topic = 'plant/{device_id}/commands');
INSERT INTO vib_10s
SELECT window_start, device_id, avg(vibration) AS avg_vibration, count(*) AS n
FROM TUMBLE(telemetry, event_time, INTERVAL '10 seconds')
GROUP BY window_start, device_id;
INSERT INTO commands
SELECT device_id, true AS stop, vibration FROM telemetry WHERE vibration > 4;
";

/// The reading of device `d` (0..3) at second `s`: exact in binary, so averages compare.
fn value(d: usize, s: i64) -> f64 {
    (d as f64) + (s % 7) as f64 * 0.5
}

const DEVICES: [&str; 3] = ["pump-1", "pump-2", "pump-3"];

/// 60 seconds of three devices, one reading each a second, in time order.
fn fleet_csv(dir: &Path) -> std::path::PathBuf {
    let mut text = String::from("timestamp,device_id,vibration,temp\n");
    for s in 0..60 {
        for (d, id) in DEVICES.iter().enumerate() {
            let t = chrono::DateTime::from_timestamp(T0 + s, 0).unwrap();
            text.push_str(&format!(
                "{},{id},{},{}\n",
                t.format("%Y-%m-%d %H:%M:%S"),
                value(d, s),
                20 + s
            ));
        }
    }
    let p = dir.join("fleet.csv");
    std::fs::write(&p, text).unwrap();
    p
}

fn replay(args: &[&str]) -> Output {
    Command::new(BIN).arg("replay").args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay failed:\n{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every row of `query`, as JSON objects, in the order DataFusion returns them.
fn rows(query: String) -> Vec<Value> {
    sql(&[query])
        .remove(0)
        .iter()
        .flat_map(|b| fleetsql::sink::json_rows(b).unwrap())
        .map(|l| serde_json::from_str(&l).unwrap())
        .collect()
}

/// (window start in seconds after T0, device, average, count) of `vib_10s`.
fn windows(data: &Path) -> Vec<(i64, String, f64, i64)> {
    rows(format!(
        "SELECT CAST(to_unixtime(window_start) AS BIGINT) AS start, device_id, avg_vibration, n
         FROM '{}/vib_10s/' ORDER BY start, device_id",
        data.display()
    ))
    .into_iter()
    .map(|r| {
        (
            r["start"].as_i64().unwrap() - T0,
            r["device_id"].as_str().unwrap().to_string(),
            r["avg_vibration"].as_f64().unwrap(),
            r["n"].as_i64().unwrap(),
        )
    })
    .collect()
}

fn expected_windows(devices: &[(usize, &str)], seconds: i64) -> Vec<(i64, String, f64, i64)> {
    let mut out = Vec::new();
    for start in (0..seconds).step_by(10) {
        for (d, id) in devices {
            let vals: Vec<f64> = (start..(start + 10).min(seconds))
                .map(|s| value(*d, s))
                .collect();
            let avg = vals.iter().sum::<f64>() / vals.len() as f64;
            out.push((start, id.to_string(), avg, vals.len() as i64));
        }
    }
    out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    out
}

fn assert_windows(actual: &[(i64, String, f64, i64)], expected: &[(i64, String, f64, i64)]) {
    assert_eq!(actual.len(), expected.len(), "{actual:?}\nvs\n{expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert_eq!((a.0, &a.1, a.3), (e.0, &e.1, e.3), "{actual:?}");
        assert!((a.2 - e.2).abs() < 1e-9, "{a:?} vs {e:?}");
    }
}

fn count(query: String) -> i64 {
    scalar(&sql(&[query])[0])
}

#[test]
fn a_csv_recording_through_a_windowed_aggregation() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let csv = fleet_csv(dir.path());
    let data = dir.path().join("data");
    let err = ok(&replay(&[
        s(&p),
        "--input",
        s(&csv),
        "--data-dir",
        s(&data),
        "--csv",
        "--batch-rows",
        "50",
    ]));
    assert!(
        err.contains("replayed 180 rows (0 dead letters)") && err.contains("rows/s"),
        "{err}"
    );
    let devices: Vec<(usize, &str)> = DEVICES.iter().copied().enumerate().collect();
    assert_windows(&windows(&data), &expected_windows(&devices, 60));
    // The raw table, as `fleetsql run` writes it: received_at is the event time.
    let d = data.display();
    assert_eq!(count(format!("SELECT count(*) FROM '{d}/telemetry/'")), 180);
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM '{d}/telemetry/' WHERE received_at <> event_time"
        )),
        0
    );
    assert_eq!(
        count(format!(
            "SELECT CAST(min(to_unixtime(event_time)) AS BIGINT) FROM '{d}/telemetry/'"
        )),
        T0
    );
    // --csv: the sink as a CSV file, timestamps as `YYYY-MM-DD HH:MM:SS`, rows in the
    // order the windows closed.
    let text = std::fs::read_to_string(data.join("vib_10s.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "window_start,device_id,avg_vibration,n");
    assert_eq!(lines.len(), 1 + 18, "{text}");
    assert!(
        lines[1].starts_with("2014-04-01 00:00:00,pump-"),
        "{}",
        lines[1]
    );
    assert!(lines[18].starts_with("2014-04-01 00:00:50,"), "{text}");
    assert!(data.join("commands.csv").exists());
    // Nothing left in staging: every file was published.
    assert!(!data.join(".staging").exists());
}

/// Parquet written by the test: epoch-millisecond times, another name for the value, and
/// the device id given on the command line.
#[test]
fn a_parquet_recording_with_a_fixed_device_id() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let file = dir.path().join("rec.parquet");
    let schema = Arc::new(Schema::new(vec![
        Field::new("ts", DataType::Int64, false),
        Field::new("value", DataType::Float64, false),
    ]));
    let secs: Vec<i64> = (0..35).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(
                secs.iter().map(|s| (T0 + s) * 1000),
            )) as ArrayRef,
            Arc::new(Float64Array::from_iter_values(
                secs.iter().map(|s| value(2, *s)),
            )),
        ],
    )
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&file).unwrap(), schema, None)
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let data = dir.path().join("data");
    ok(&replay(&[
        s(&p),
        "--input",
        s(&file),
        "--data-dir",
        s(&data),
        "--set",
        "device_id=pump-7",
        "--map",
        "value=vibration",
        "--time-column",
        "ts",
        "--quiet",
    ]));
    assert_windows(&windows(&data), &expected_windows(&[(2, "pump-7")], 35));
    // temp is nullable and not in the file: NULL.
    assert_eq!(
        count(format!(
            "SELECT count(*) FROM '{}/telemetry/' WHERE temp IS NULL AND device_id = 'pump-7'",
            data.display()
        )),
        35
    );
}

/// The device id from a column, from --set (which wins over the column), and from the
/// files' names: many recorded files, many devices.
#[test]
fn the_device_id_from_a_column_a_fixed_value_or_the_file_name() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let csv = fleet_csv(dir.path());
    let devices = |data: &Path| -> Vec<(String, i64)> {
        rows(format!(
            "SELECT device_id, count(*) AS n FROM '{}/telemetry/' GROUP BY device_id ORDER BY device_id",
            data.display()
        ))
        .into_iter()
        .map(|r| {
            (
                r["device_id"].as_str().unwrap().to_string(),
                r["n"].as_i64().unwrap(),
            )
        })
        .collect()
    };
    let by_column = dir.path().join("by-column");
    ok(&replay(&[
        s(&p),
        "--input",
        s(&csv),
        "--data-dir",
        s(&by_column),
    ]));
    assert_eq!(
        devices(&by_column),
        DEVICES
            .iter()
            .map(|d| (d.to_string(), 60))
            .collect::<Vec<_>>()
    );
    let by_set = dir.path().join("by-set");
    ok(&replay(&[
        s(&p),
        "--input",
        s(&csv),
        "--data-dir",
        s(&by_set),
        "--set",
        "device_id=pump-9",
    ]));
    assert_eq!(devices(&by_set), vec![("pump-9".to_string(), 180)]);

    // One file per device, named after it, without a device column; replayed one after the
    // other, so each file covers its own stretch of time (files are not merged by time).
    let mut inputs = Vec::new();
    for (k, name) in ["press-a", "press-b"].iter().enumerate() {
        let mut text = String::from("timestamp,vibration\n");
        for s in 0..10 {
            text.push_str(&format!("{},{}\n", T0 + 100 * k as i64 + s, s));
        }
        let f = dir.path().join(format!("{name}.csv"));
        std::fs::write(&f, text).unwrap();
        inputs.push(f);
    }
    let by_file = dir.path().join("by-file");
    ok(&replay(&[
        s(&p),
        "--input",
        s(&inputs[0]),
        s(&inputs[1]),
        "--data-dir",
        s(&by_file),
        "--key-from-file",
        "device_id",
    ]));
    assert_eq!(
        devices(&by_file),
        vec![("press-a".to_string(), 10), ("press-b".to_string(), 10)]
    );
    // Epoch seconds in the CSV's text were read as times.
    assert_eq!(
        count(format!(
            "SELECT CAST(max(to_unixtime(event_time)) AS BIGINT) FROM '{}/telemetry/'",
            by_file.display()
        )),
        T0 + 109
    );
}

/// What an MQTT sink would have published lands in its table: topic and exact payload.
#[test]
fn commands_land_in_a_table_with_their_exact_payloads() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let csv = fleet_csv(dir.path());
    let data = dir.path().join("data");
    ok(&replay(&[
        s(&p),
        "--input",
        s(&csv),
        "--data-dir",
        s(&data),
    ]));
    let got: Vec<(String, String)> = rows(format!(
        "SELECT topic, payload FROM '{}/commands/'",
        data.display()
    ))
    .into_iter()
    .map(|r| {
        (
            r["topic"].as_str().unwrap().to_string(),
            r["payload"].as_str().unwrap().to_string(),
        )
    })
    .collect();
    // In replay order: by second, then device.
    let mut expected = Vec::new();
    for s in 0..60 {
        for (d, id) in DEVICES.iter().enumerate() {
            let v = value(d, s);
            if v > 4.0 {
                expected.push((
                    format!("plant/{id}/commands"),
                    format!(r#"{{"stop":true,"vibration":{v:?}}}"#),
                ));
            }
        }
    }
    assert!(!expected.is_empty());
    assert_eq!(got, expected);
    // The payload is what the command publisher encodes, byte for byte.
    let topic =
        fleetsql::pipeline::topic::TopicPattern::parse("plant/{device_id}/commands").unwrap();
    let row = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("device_id", DataType::Utf8, true),
            Field::new("stop", DataType::Boolean, true),
            Field::new("vibration", DataType::Float64, true),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["pump-3"])) as ArrayRef,
            Arc::new(datafusion::arrow::array::BooleanArray::from(vec![true])),
            Arc::new(Float64Array::from(vec![value(2, 6)])),
        ],
    )
    .unwrap();
    let (t, payload) = fleetsql::sink::commands::encode(&topic, &row)
        .unwrap()
        .remove(0);
    let last = expected
        .iter()
        .rev()
        .find(|(t, _)| t.contains("pump-3"))
        .unwrap();
    assert_eq!(
        (t.unwrap(), String::from_utf8(payload).unwrap()),
        last.clone()
    );
}

/// A cell that is not a number, and a time that is not a time: their rows become dead
/// letters that say where they are; every other row is replayed.
#[test]
fn a_malformed_cell_is_a_dead_letter_and_its_neighbours_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let mut text = String::from("timestamp,device_id,vibration\n");
    for s in 0..20 {
        let v = if s == 7 {
            "abc".to_string()
        } else {
            s.to_string()
        };
        let t = if s == 12 {
            "yesterday".to_string()
        } else {
            (T0 + s).to_string()
        };
        text.push_str(&format!("{t},pump-1,{v}\n"));
    }
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, text).unwrap();
    let data = dir.path().join("data");
    let err = ok(&replay(&[
        s(&p),
        "--input",
        s(&csv),
        "--data-dir",
        s(&data),
    ]));
    assert!(err.contains("replayed 18 rows (2 dead letters)"), "{err}");
    let dead = rows(format!(
        "SELECT source, topic, payload, reason, error FROM '{}/dead_letters/' ORDER BY reason DESC",
        data.display()
    ));
    assert_eq!(dead.len(), 2, "{dead:?}");
    // Line 9: header, then second 0 on line 2.
    assert_eq!(dead[0]["reason"], "schema_mismatch");
    assert_eq!(dead[0]["source"], "telemetry");
    assert_eq!(dead[0]["topic"], "plant/pump-1/telemetry");
    let e0 = dead[0]["error"].as_str().unwrap();
    assert!(
        e0.contains("bad.csv:9:") && e0.contains("vibration") && e0.contains("abc"),
        "{e0}"
    );
    assert!(
        dead[0]["payload"]
            .as_str()
            .unwrap()
            .contains(r#""vibration":"abc""#)
    );
    assert_eq!(dead[1]["reason"], "bad_event_time");
    let e1 = dead[1]["error"].as_str().unwrap();
    assert!(
        e1.contains("bad.csv:14:") && e1.contains("yesterday"),
        "{e1}"
    );
    // The neighbours: every other second, in its window.
    let n: i64 = windows(&data).iter().map(|w| w.3).sum();
    assert_eq!(n, 18);
}

/// Same input, same output: two replays write the same rows in the same order.
#[test]
fn a_replay_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let csv = fleet_csv(dir.path());
    let run = |name: &str| {
        let data = dir.path().join(name);
        ok(&replay(&[
            s(&p),
            "--input",
            s(&csv),
            "--data-dir",
            s(&data),
            "--csv",
            "--batch-rows",
            "7",
        ]));
        let mut tables = Vec::new();
        // dead_letters and late_rows are empty here: a folder without files, which
        // DataFusion cannot read as a table.
        for t in ["telemetry", "vib_10s", "commands"] {
            let b = sql(&[format!("SELECT * FROM '{}/{t}/'", data.display())]).remove(0);
            tables.push((
                t,
                b.iter()
                    .flat_map(|b| fleetsql::sink::json_rows(b).unwrap())
                    .collect::<Vec<_>>(),
            ));
        }
        for t in ["vib_10s.csv", "commands.csv"] {
            tables.push((t, vec![std::fs::read_to_string(data.join(t)).unwrap()]));
        }
        tables
    };
    let (a, b) = (run("one"), run("two"));
    assert!(a[0].1.len() == 180 && !a[1].1.is_empty() && !a[2].1.is_empty());
    assert_eq!(a, b);
    // And into a data dir that already holds a replay's tables: refused, not mixed.
    let again = replay(&[
        s(&p),
        "--input",
        s(&csv),
        "--data-dir",
        s(&dir.path().join("one")),
    ]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds Parquet files"));
}

/// Errors name what is missing, where, and what to do, before anything is written.
#[test]
fn clear_errors_for_missing_columns() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", PIPELINE);
    let csv = dir.path().join("rec.csv");
    std::fs::write(&csv, format!("timestamp,device_id,value\n{T0},a,1\n")).unwrap();
    let data = dir.path().join("data");
    let out = replay(&[s(&p), "--input", s(&csv), "--data-dir", s(&data)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no column `vibration`")
            && err.contains("rec.csv")
            && err.contains("NOT NULL")
            && err.contains("timestamp, device_id, value")
            && err.contains("--map"),
        "{err}"
    );
    assert!(!data.join("telemetry").exists(), "nothing written");

    // A topic capture that is not given suggests --set.
    std::fs::write(&csv, format!("timestamp,vibration\n{T0},1\n")).unwrap();
    let out = replay(&[s(&p), "--input", s(&csv), "--data-dir", s(&data)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("device_id") && err.contains("--set device_id=VALUE"),
        "{err}"
    );

    // No time column.
    std::fs::write(&csv, "at,device_id,vibration\n1,a,1\n").unwrap();
    let out = replay(&[s(&p), "--input", s(&csv), "--data-dir", s(&data)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--time-column"), "{err}");
}

#[test]
fn help_documents_every_replay_option() {
    let out = Command::new(BIN)
        .args(["replay", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--input",
        "--source",
        "--data-dir",
        "--set",
        "--map",
        "--key-from-file",
        "--time-column",
        "--batch-rows",
        "--csv",
        "--quiet",
    ] {
        assert!(help.contains(flag), "replay --help lacks {flag}:\n{help}");
    }
}
