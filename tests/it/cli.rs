//! The command line as users meet it: help text and exit codes.

use std::process::Command;

use crate::util::*;

#[test]
fn help_documents_every_run_option() {
    let out = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--broker",
        "--listen",
        "--data-dir",
        "--metrics-addr",
        "--simulate",
        "--client-id",
        "--device-idle-timeout",
        "--commit-interval",
        "--fsync",
        "--drain",
        "--max-backlog-bytes",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}:\n{help}");
    }
    let top = Command::new(BIN).arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    for sub in ["run", "check", "explain"] {
        assert!(top.contains(sub), "--help lacks {sub}");
    }
}

#[test]
fn every_example_pipeline_checks_and_explains() {
    // Only the pipelines: reference data (homes.csv) lives beside them.
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("pipelines")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        checked += 1;
        let out = Command::new(BIN).arg("check").arg(&p).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(BIN).arg("explain").arg(&p).output().unwrap();
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).contains("StreamingTableExec"));
    }
    assert!(checked >= 6, "example pipelines checked: {checked}");
}

#[test]
fn run_refuses_a_bad_pipeline_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_pipeline(
        dir.path(),
        "bad.sql",
        "CREATE TABLE t (x DOUBLE) WITH (connector = 'mqtt', type = 'source', topic = 'no/device');\n",
    );
    let out = Command::new(BIN)
        .arg("run")
        .arg(&p)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.sql:1:") && err.contains("must capture the device id"),
        "{err}"
    );
}
