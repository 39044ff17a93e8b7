//! The pipeline language's diagnostics: each error names file, line and column.

use std::process::Command;

use crate::util::*;

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(dir.path(), "p.sql", text);
    let out = Command::new(BIN).arg("check").arg(&p).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SOURCE: &str = "CREATE TABLE telemetry (light DOUBLE)\n  WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/telemetry');\n";
const SINK: &str = "CREATE TABLE commands WITH (connector = 'mqtt', type = 'sink', topic = '{device_id}/commands');\n";

#[test]
fn syntax_error_has_line_and_column() {
    let (code, err) = check(&format!(
        "{SOURCE}{SINK}INSERT INTO commands SELEC device_id FROM telemetry;\n"
    ));
    assert_eq!(code, 1);
    assert!(err.contains("p.sql:4:"), "{err}");
    assert!(err.contains("syntax error"), "{err}");
}

#[test]
fn unknown_option_lists_the_valid_ones() {
    let (code, err) = check(
        "CREATE TABLE telemetry (light DOUBLE)\n  WITH (connector = 'mqtt', type = 'source',\n        topik = '{device_id}/telemetry');\n",
    );
    assert_eq!(code, 1);
    // `topic` is missing, reported first; fix it and the typo is named with the valid list.
    assert!(err.contains("missing option `topic`"), "{err}");
    let (_, err) = check(
        "CREATE TABLE telemetry (light DOUBLE)\n  WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/t',\n        colour = 'red');\n",
    );
    assert!(err.contains("p.sql:3:9"), "{err}");
    assert!(
        err.contains("unknown option `colour`")
            && err.contains("valid options: connector, type, topic"),
        "{err}"
    );
    assert!(err.contains("^"), "caret under the place: {err}");
}

#[test]
fn unknown_column_is_caught_before_running() {
    let (code, err) = check(&format!(
        "{SOURCE}{SINK}\nINSERT INTO commands\nSELECT device_id, lux < 300 AS led_on FROM telemetry;\n"
    ));
    assert_eq!(code, 1);
    assert!(err.contains("lux"), "{err}");
    assert!(err.contains("p.sql:6:"), "points into the query: {err}");
}

#[test]
fn sink_topic_needs_its_columns_and_sinks_must_exist() {
    let (code, err) = check(&format!(
        "{SOURCE}{SINK}INSERT INTO commands SELECT light < 300 AS led_on FROM telemetry;\n"
    ));
    assert_eq!(code, 1);
    assert!(err.contains("no column `device_id`"), "{err}");
    let (_, err) = check(&format!(
        "{SOURCE}INSERT INTO nowhere SELECT device_id FROM telemetry;\n"
    ));
    assert!(
        err.contains("unknown sink `nowhere`") && err.contains("p.sql:3:1"),
        "{err}"
    );
}

#[test]
fn several_errors_are_reported_together() {
    let (code, err) = check(
        "CREATE TABLE a (x DOUBLE) WITH (connector = 'kafka');\nCREATE TABLE b (x DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = 'x/{device_id}', qos = '7');\n",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("p.sql:1:") && err.contains("valid values: mqtt, parquet"),
        "{err}"
    );
    assert!(
        err.contains("p.sql:2:") && err.contains("qos must be 0, 1 or 2"),
        "{err}"
    );
    assert!(err.contains("2 errors"), "{err}");
}

#[test]
fn window_syntax_is_checked() {
    let (code, err) = check(&format!(
        "{SOURCE}CREATE TABLE out WITH (connector = 'parquet');\nINSERT INTO out SELECT window_start, count(*) AS n\nFROM TUMBLE(telemetry, received_at, INTERVAL '10 seconds') GROUP BY window_start;\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("event_time") && err.contains("p.sql:5:6"),
        "{err}"
    );
}
