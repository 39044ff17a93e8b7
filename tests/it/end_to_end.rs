//! The whole path through real brokers: telemetry in, commands out, Parquet and /metrics.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::util::*;

fn nightlight() -> String {
    repo()
        .join("pipelines/nightlight.sql")
        .display()
        .to_string()
}

/// Issue 1/6 points 3, 5, 6, 7: the nightlight answer for every reading within 2 s, through
/// mosquitto with mosquitto's own clients; bad messages become dead letters without
/// disturbing their neighbours; the README's datafusion-cli statements count what was stored.
#[test]
fn nightlight_through_mosquitto() {
    if !have("mosquitto", "nightlight_through_mosquitto")
        || !have("mosquitto_pub", "nightlight_through_mosquitto")
    {
        return;
    }
    let broker = Mosquitto::start();
    let data = tempfile::tempdir().unwrap();
    let client_id = format!("it-nightlight-{}", broker.port);
    let engine = Engine::start(
        data.path(),
        &[
            &nightlight(),
            "--broker",
            &broker.url(),
            "--client-id",
            &client_id,
        ],
    );
    let sub = Subscriber::start(broker.port, "+/commands", "probe/commands");

    let (devices, per_device) = (5, 20);
    let mut msgs = Vec::new();
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for d in 0..devices {
        for i in 0..per_device {
            let light = (d * 97 + i * 131) % 1000;
            msgs.push((
                format!("lamp-{d}/telemetry"),
                format!("{{\"light\": {light}}}"),
            ));
            expected
                .entry(format!("lamp-{d}"))
                .or_default()
                .push(format!("{{\"led_on\":{}}}", light < 300));
            if d == 0 && i == 5 {
                // Two bad messages between good ones of the same device.
                msgs.push(("lamp-0/telemetry".into(), "not json".into()));
                msgs.push(("lamp-0/telemetry".into(), "{\"light\": \"dark\"}".into()));
            }
        }
    }
    let total = devices * per_device;
    publish(broker.port, &msgs);
    let published = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "a command for every reading",
        || sub.count() >= total,
    );
    let lines = sub.lines.lock().unwrap().clone();
    let last = lines.iter().map(|(t, _)| *t).max().unwrap();
    assert!(
        last.saturating_duration_since(published) < Duration::from_secs(2),
        "commands took {:?} after the last publish",
        last.saturating_duration_since(published)
    );
    let mut got: HashMap<String, Vec<String>> = HashMap::new();
    for (_, l) in &lines {
        let (topic, payload) = l.split_once(' ').unwrap();
        let device = topic.strip_suffix("/commands").unwrap();
        got.entry(device.to_string())
            .or_default()
            .push(payload.to_string());
    }
    assert_eq!(got, expected, "commands per device, in order");

    wait_until(Duration::from_secs(5), "decode errors counted", || {
        engine.metric("fleetsql_decode_errors_total{reason=\"invalid_json\",source=\"telemetry\"}")
            == Some(1.0)
            && engine.metric(
                "fleetsql_decode_errors_total{reason=\"schema_mismatch\",source=\"telemetry\"}",
            ) == Some(1.0)
    });
    let m = engine.metrics();
    assert_eq!(
        metric_value(&m, "fleetsql_mqtt_messages_received_total"),
        Some((total + 2) as f64)
    );
    assert_eq!(
        metric_value(&m, "fleetsql_rows_ingested_total{source=\"telemetry\"}"),
        Some(total as f64)
    );
    assert_eq!(
        metric_value(&m, "fleetsql_commands_published_total{sink=\"commands\"}"),
        Some(total as f64)
    );
    assert_eq!(
        metric_value(&m, "fleetsql_device_actors"),
        Some(devices as f64)
    );
    assert_eq!(
        metric_value(&m, "fleetsql_broker_connected{client=\"commands\"}"),
        Some(1.0)
    );

    assert_eq!(engine.terminate(), 0, "SIGTERM exits 0");
    assert_eq!(sub.count(), total, "no command twice");

    // Exactly the README's statements, on this run's data dir.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme
        .split("<!-- datafusion-cli:begin -->")
        .nth(1)
        .and_then(|r| r.split("<!-- datafusion-cli:end -->").next())
        .expect("README has the datafusion-cli block");
    let statements: Vec<String> = block
        .lines()
        .filter(|l| !l.starts_with("```") && !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .split(';')
        .map(|s| {
            s.trim()
                .replace("./data", &data.path().display().to_string())
        })
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(statements.len(), 5, "{statements:?}");
    let r = sql(&statements);
    assert_eq!(scalar(&r[1]), total as i64, "CREATE EXTERNAL TABLE count");
    assert_eq!(
        r[2].iter().map(|b| b.num_rows()).sum::<usize>(),
        devices,
        "one row per device"
    );
    assert_eq!(scalar(&r[3]), total as i64, "SELECT FROM path count");
    let reasons = datafusion::arrow::util::pretty::pretty_format_batches(&r[4])
        .unwrap()
        .to_string();
    assert!(
        reasons.contains("invalid_json") && reasons.contains("schema_mismatch"),
        "{reasons}"
    );
    let dead = sql(&[format!(
        "SELECT count(*) FROM '{}/dead_letters/' WHERE topic = 'lamp-0/telemetry' AND payload = 'not json'",
        data.path().display()
    )]);
    assert_eq!(
        scalar(&dead[0]),
        1,
        "the dead letter keeps topic and payload"
    );
}

/// The zero-setup path (embedded broker, four simulated devices) on an example pipeline,
/// each device sending every `interval`; `default_log`: logged as a user's run is
/// (`RUST_LOG` unset).
fn zero_setup(
    data: &std::path::Path,
    example: &str,
    interval: &str,
    extra: &[&str],
    default_log: bool,
) -> Engine {
    let listen = format!("127.0.0.1:{}", free_port());
    let pipeline = repo().join("pipelines").join(example).display().to_string();
    let mut args = vec![
        pipeline.as_str(),
        "--listen",
        &listen,
        "--simulate",
        "4",
        "--simulate-interval",
        interval,
    ];
    args.extend_from_slice(extra);
    if default_log {
        Engine::start_with_default_log(data, &args)
    } else {
        Engine::start(data, &args)
    }
}

/// The zero-setup path: embedded broker, simulated devices, a tumbling window; SIGTERM
/// flushes every open window, so each stored reading is counted in exactly one window.
#[test]
fn embedded_broker_simulated_devices_and_windows() {
    let data = tempfile::tempdir().unwrap();
    let engine = zero_setup(
        data.path(),
        "light_summary.sql",
        "100ms",
        &["--commit-interval", "1s", "--drain"],
        false,
    );
    wait_until(
        Duration::from_secs(20),
        "simulated devices receive commands",
        || {
            engine
                .metric("fleetsql_commands_published_total{sink=\"commands\"}")
                .unwrap_or(0.0)
                >= 40.0
                && engine
                    .log()
                    .matches("simulated device received command")
                    .count()
                    >= 40
        },
    );
    // Every metric the Grafana dashboard plots is exported.
    let names = std::process::Command::new("python3")
        .arg(repo().join("grafana/check_dashboard.py"))
        .output()
        .unwrap();
    assert!(
        names.status.success(),
        "{}",
        String::from_utf8_lossy(&names.stderr)
    );
    let m = engine.metrics();
    // Series labelled by a reference table exist only when the pipeline has one; the
    // reload tests scrape them (reload::reference_table_reloads_when_its_file_changes).
    let needs_reference_tables = ["fleetsql_reference_reloads_total"];
    for name in String::from_utf8_lossy(&names.stdout)
        .lines()
        .filter(|n| !needs_reference_tables.contains(n))
    {
        assert!(
            m.lines().any(|l| l.starts_with(name)),
            "dashboard metric {name} missing from /metrics"
        );
    }
    assert_eq!(engine.terminate(), 0);

    let d = data.path().display();
    let r = sql(&[
        format!("SELECT count(*) FROM '{d}/telemetry/'"),
        format!("SELECT CAST(sum(readings) AS BIGINT) FROM '{d}/light_10s/'"),
        format!(
            "SELECT count(*) FROM '{d}/light_10s/' WHERE window_end - window_start <> INTERVAL '10 seconds'"
        ),
        format!(
            "SELECT count(*) FROM (SELECT device_id, min(light) a, max(light) b FROM '{d}/telemetry/' GROUP BY device_id) t \
             JOIN (SELECT device_id, min(min_light) a, max(max_light) b FROM '{d}/light_10s/' GROUP BY device_id) w \
             ON t.device_id = w.device_id AND t.a = w.a AND t.b = w.b"
        ),
    ]);
    let stored = scalar(&r[0]);
    assert!(stored >= 40, "stored {stored} readings");
    assert_eq!(
        scalar(&r[1]),
        stored,
        "every stored reading is in exactly one window"
    );
    assert_eq!(scalar(&r[2]), 0, "windows are 10 s long");
    assert_eq!(
        scalar(&r[3]),
        4,
        "per-device min/max agree between raw rows and windows"
    );
}

/// Idle device actors are retired; the engine survives a broker restart and resumes.
#[test]
fn idle_actors_retire_and_broker_restart_resumes() {
    if !have("mosquitto", "idle_actors_retire_and_broker_restart_resumes")
        || !have(
            "mosquitto_pub",
            "idle_actors_retire_and_broker_restart_resumes",
        )
    {
        return;
    }
    let mut broker = Mosquitto::start();
    let port = broker.port;
    let data = tempfile::tempdir().unwrap();
    let engine = Engine::start(
        data.path(),
        &[
            &nightlight(),
            "--broker",
            &broker.url(),
            "--client-id",
            &format!("it-idle-{port}"),
            "--device-idle-timeout",
            "1s",
        ],
    );
    let msgs: Vec<(String, String)> = (0..3)
        .map(|d| (format!("idle-{d}/telemetry"), "{\"light\": 10}".to_string()))
        .collect();
    publish(port, &msgs);
    wait_until(Duration::from_secs(5), "three device actors", || {
        engine.metric("fleetsql_device_actors") == Some(3.0)
    });
    wait_until(Duration::from_secs(10), "idle actors retired", || {
        engine.metric("fleetsql_device_actors") == Some(0.0)
    });

    broker.stop();
    wait_until(Duration::from_secs(10), "disconnect seen", || {
        engine.metric("fleetsql_broker_connected{client=\"ingest\"}") == Some(0.0)
    });
    let _broker2 = Mosquitto::start_on(port);
    wait_until(Duration::from_secs(20), "reconnected", || {
        engine.metric("fleetsql_broker_connected{client=\"ingest\"}") == Some(1.0)
            && engine
                .metric("fleetsql_broker_reconnects_total{client=\"ingest\"}")
                .unwrap_or(0.0)
                >= 1.0
    });
    let sub = Subscriber::start(port, "+/commands", "probe/commands");
    // Publishes one reading and waits for the `n`-th command, which must be `expected`.
    let send_and_expect = |topic: &str, payload: &str, n: usize, expected: &str| {
        publish(port, &[(topic.into(), payload.into())]);
        wait_until(Duration::from_secs(10), expected, || sub.count() >= n);
        assert_eq!(sub.lines.lock().unwrap()[n - 1].1, expected);
    };
    send_and_expect(
        "idle-0/telemetry",
        "{\"light\": 900}",
        1,
        "idle-0/commands {\"led_on\":false}",
    );

    // A 2 MiB payload is a dead letter, not a dropped connection; the next reading goes through.
    let big = data.path().join("big.json");
    std::fs::write(
        &big,
        format!("{{\"light\": 1, \"pad\": \"{}\"}}", "x".repeat(2 << 20)),
    )
    .unwrap();
    let st = mosquitto_pub(port)
        .args(["-t", "idle-1/telemetry", "-f"])
        .arg(&big)
        .status()
        .unwrap();
    assert!(st.success());
    send_and_expect(
        "idle-1/telemetry",
        "{\"light\": 5}",
        2,
        "idle-1/commands {\"led_on\":true}",
    );
    assert_eq!(
        engine.metric("fleetsql_decode_errors_total{reason=\"payload_too_large\",source=\"\"}"),
        Some(1.0)
    );
    assert_eq!(engine.terminate(), 0);
}

/// `mqtts://` with a private CA: mosquitto with a TLS listener, certificates made by openssl.
#[test]
fn tls_broker_with_private_ca() {
    if !have("mosquitto", "tls_broker_with_private_ca")
        || !have("openssl", "tls_broker_with_private_ca")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sh = |cmd: &str| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.crt",
    );
    sh(
        "openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
    );
    std::fs::write(d.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    sh(
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext -out server.crt",
    );
    let port = free_port();
    std::fs::write(
        d.join("m.conf"),
        format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\ncafile {0}/ca.crt\ncertfile {0}/server.crt\nkeyfile {0}/server.key\n",
            d.display()
        ),
    )
    .unwrap();
    let _broker = Proc(Some(
        std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(d.join("m.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_until(Duration::from_secs(10), "TLS listener", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let data = tempfile::tempdir().unwrap();
    let ca = d.join("ca.crt").display().to_string();
    let engine = Engine::start(
        data.path(),
        &[
            &nightlight(),
            "--broker",
            &format!("mqtts://127.0.0.1:{port}"),
            "--ca-file",
            &ca,
            "--client-id",
            &format!("it-tls-{port}"),
        ],
    );
    let st = mosquitto_pub(port)
        .args([
            "--cafile",
            &ca,
            "-t",
            "tls-0/telemetry",
            "-m",
            "{\"light\": 100}",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    wait_until(Duration::from_secs(10), "a command over TLS", || {
        engine.metric("fleetsql_commands_published_total{sink=\"commands\"}") == Some(1.0)
    });
    assert_eq!(engine.terminate(), 0);
}

/// Logged as a user's run logs (`RUST_LOG` unset), the zero-setup run of the nightlight
/// example and its stop log no warning and no error: an operator reads every one.
#[test]
fn a_clean_run_and_stop_log_no_warning() {
    let data = tempfile::tempdir().unwrap();
    let engine = zero_setup(data.path(), "nightlight.sql", "50ms", &[], true);
    wait_until(
        Duration::from_secs(20),
        "simulated devices receive commands",
        || {
            engine
                .log()
                .matches("simulated device received command")
                .count()
                >= 8
        },
    );
    let log = engine.log.clone();
    assert_eq!(engine.terminate(), 0);
    wait_until(
        Duration::from_secs(10),
        "the engine's stderr closes",
        || log.lock().unwrap().ends_with(STDERR_CLOSED),
    );
    let log = log.lock().unwrap();
    assert!(
        !log.contains("ERROR") && !log.contains("WARN"),
        "a clean run and stop logged a warning or an error:\n{log}"
    );
}

/// Simulated devices keep publishing at an interval shorter than an MQTT connect: each
/// device's event loop used to be dropped half-way by its ticker, so at 2 ms none ever
/// connected and the engine received nothing.
#[test]
fn simulated_devices_publish_at_short_intervals() {
    let data = tempfile::tempdir().unwrap();
    let engine = zero_setup(data.path(), "light_summary.sql", "2ms", &[], false);
    // Four devices at 500 readings/s each.
    wait_until(Duration::from_secs(20), "1,000 readings logged", || {
        engine.metric("fleetsql_wal_messages_total").unwrap_or(0.0) >= 1000.0
    });
    assert_eq!(engine.terminate(), 0);
}
