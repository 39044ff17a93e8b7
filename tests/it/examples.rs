//! The example pipelines of pipelines/ as users run them: the real binary on the file in
//! place, a real mosquitto, devices simulated with mosquitto_pub (event times in the
//! payload, so minutes of event time are published in a moment), commands read with
//! mosquitto_sub and, after SIGTERM, the Parquet tables read back with DataFusion.
//!
//! Windows close on event time, and the watermark is per source: once any device's
//! readings are 1 s past a window's end, other devices' readings for it that are still on
//! their way are late (`publish` runs one mosquitto_pub per topic side by side, and shards
//! flush on their own timers; published all at once, most readings of a few minutes of
//! event time are late). So the windowed tests publish one window at a time, the next
//! only once the engine has ingested the previous ones (a condition, not a sleep), and
//! check that fleetsql_late_rows_total stays 0.
//!
//! Each golden file tests/golden/example_<name>.test holds its pipeline verbatim; the first
//! test here keeps the two in step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::util::*;

/// 2026-01-01T00:00:00Z in epoch milliseconds: event times of the tests' readings.
const T0: i64 = 1_767_225_600_000;

fn example(name: &str) -> PathBuf {
    repo().join("pipelines").join(name)
}

fn tools_present(test: &str) -> bool {
    have("mosquitto", test) && have("mosquitto_pub", test) && have("mosquitto_sub", test)
}

/// The rows of one query as sorted JSON lines (timestamps as RFC 3339).
fn json_rows(statement: String) -> Vec<String> {
    json_lines(&sql(&[statement]).remove(0))
}

/// Publishes `messages` and waits until the engine has ingested `total` rows of `source`
/// (the running total, this batch included).
fn publish_and_ingest(
    engine: &Engine,
    port: u16,
    source: &str,
    messages: &[(String, String)],
    total: usize,
) {
    publish(port, messages);
    let series = format!("fleetsql_rows_ingested_total{{source=\"{source}\"}}");
    wait_until(
        Duration::from_secs(10),
        &format!("{total} rows of `{source}` ingested"),
        || engine.metric(&series) == Some(total as f64),
    );
}

/// Every message the subscriber received, once the broker has delivered everything
/// published before now: a fence message on `fence_topic` (matching the subscriber's
/// filter) goes out and comes back last. Returns (topic, payload) pairs, fence left out.
fn received_after_fence(port: u16, sub: &Subscriber, fence_topic: &str) -> Vec<(String, String)> {
    let st = mosquitto_pub(port)
        .args(["-t", fence_topic, "-m", "fence"])
        .status()
        .unwrap();
    assert!(st.success());
    let fence = format!("{fence_topic} fence");
    wait_until(Duration::from_secs(10), "the fence message", || {
        sub.lines.lock().unwrap().iter().any(|(_, l)| *l == fence)
    });
    sub.lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| *l != fence)
        .map(|(_, l)| {
            let (t, p) = l.split_once(' ').unwrap();
            (t.to_string(), p.to_string())
        })
        .collect()
}

/// Payloads per topic, each topic's in the order received.
fn by_topic(messages: &[(String, String)]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, p) in messages {
        out.entry(t.clone()).or_default().push(p.clone());
    }
    out
}

fn late_rows(engine: &Engine, source: &str) -> Option<f64> {
    engine.metric(&format!(
        "fleetsql_late_rows_total{{reason=\"late\",source=\"{source}\"}}"
    ))
}

fn start_engine(data: &std::path::Path, pipeline: &str, broker: &Mosquitto, name: &str) -> Engine {
    let pipeline = example(pipeline).display().to_string();
    Engine::start(
        data,
        &[
            &pipeline,
            "--broker",
            &broker.url(),
            "--client-id",
            &format!("it-{name}-{}", broker.port),
            // The tests read every window's results after SIGTERM.
            "--drain",
        ],
    )
}

/// The golden files test the pipelines users copy, not a drifted copy of them.
#[test]
fn example_golden_files_hold_the_pipelines_verbatim() {
    let section = |text: &str, head: &str| -> String {
        let mut out = String::new();
        let mut inside = false;
        for line in text.lines() {
            if let Some(h) = line.strip_prefix("-- ") {
                let h = h.trim();
                let is_head = ["pipeline", "input", "error"].contains(&h)
                    || h.starts_with("file ")
                    || h.starts_with("output ");
                if is_head {
                    inside = h == head;
                    continue;
                }
            }
            if inside {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    };
    for name in [
        "stadium_lights",
        "thermostat",
        "machine_health",
        "fleet_presence",
    ] {
        let golden =
            std::fs::read_to_string(repo().join(format!("tests/golden/example_{name}.test")))
                .unwrap();
        let pipeline = std::fs::read_to_string(example(&format!("{name}.sql"))).unwrap();
        assert_eq!(
            section(&golden, "pipeline").trim_end(),
            pipeline.trim_end(),
            "tests/golden/example_{name}.test does not hold pipelines/{name}.sql verbatim"
        );
    }
    let golden =
        std::fs::read_to_string(repo().join("tests/golden/example_thermostat.test")).unwrap();
    let homes = std::fs::read_to_string(example("homes.csv")).unwrap();
    assert_eq!(
        section(&golden, "file homes.csv").trim_end(),
        homes.trim_end(),
        "tests/golden/example_thermostat.test does not hold pipelines/homes.csv verbatim"
    );
}

/// Stadium lights: one dark sensor of three changes nothing; two of three turn the site's
/// lights on. One retained command per site and window; the votes stored in `site_light`.
#[test]
fn example_stadium_lights() {
    let test = "example_stadium_lights";
    if !tools_present(test) {
        return;
    }
    let broker = Mosquitto::start();
    let port = broker.port;
    let data = tempfile::tempdir().unwrap();
    let engine = start_engine(data.path(), "stadium_lights.sql", &broker, "stadium");
    let sub = Subscriber::start(port, "stadium/+/lights", "stadium/probe/lights");

    // (second of event time, site, sensor, lux)
    let reading = |s: i64, site: &str, sensor: &str, lux: u32| {
        let ts = T0 + s * 1000;
        (
            format!("stadium/{site}/{sensor}/light"),
            format!("{{\"lux\": {lux}, \"ts\": {ts}}}"),
        )
    };
    let windows: Vec<Vec<(String, String)>> = vec![
        // 00:00-00:30: all bright; a bird over s1 for one reading.
        vec![
            reading(2, "north", "s1", 520),
            reading(2, "north", "s2", 450),
            reading(2, "north", "s3", 480),
            reading(12, "north", "s1", 15),
            reading(12, "north", "s2", 455),
            reading(12, "north", "s3", 470),
            reading(22, "north", "s1", 510),
            reading(22, "north", "s2", 460),
            reading(22, "north", "s3", 490),
            reading(5, "south", "s4", 600),
            reading(5, "south", "s5", 650),
        ],
        // 00:30-01:00: a cloud over s1 only; south half dark.
        vec![
            reading(32, "north", "s1", 120),
            reading(32, "north", "s2", 440),
            reading(32, "north", "s3", 475),
            reading(47, "north", "s1", 100),
            reading(47, "north", "s2", 430),
            reading(47, "north", "s3", 465),
            reading(35, "south", "s4", 80),
            reading(35, "south", "s5", 640),
        ],
        // 01:00-01:30: dusk at s1 and s2; south all dark.
        vec![
            reading(62, "north", "s1", 90),
            reading(62, "north", "s2", 210),
            reading(62, "north", "s3", 700),
            reading(77, "north", "s1", 60),
            reading(77, "north", "s2", 150),
            reading(77, "north", "s3", 690),
            reading(65, "south", "s4", 50),
            reading(65, "south", "s5", 60),
        ],
        // 01:30-02:00: one bright reading; it closes the window before, and its own
        // window closes at shutdown.
        vec![reading(92, "north", "s3", 700)],
    ];
    let mut total = 0;
    for w in &windows {
        total += w.len();
        publish_and_ingest(&engine, port, "light", w, total);
    }
    let on = |v: bool| format!("{{\"on\":{v}}}");
    wait_until(
        Duration::from_secs(10),
        "three windows' commands for both sites",
        || sub.count() >= 6,
    );
    let got = by_topic(&received_after_fence(port, &sub, "stadium/fence/lights"));
    let mut expected = BTreeMap::new();
    expected.insert(
        "stadium/north/lights".to_string(),
        vec![on(false), on(false), on(true)],
    );
    expected.insert(
        "stadium/south/lights".to_string(),
        vec![on(false), on(false), on(true)],
    );
    assert_eq!(got, expected, "lights commands per site, in window order");
    assert_eq!(
        late_rows(&engine, "light"),
        Some(0.0),
        "no reading was late"
    );

    // Shutdown closes the open window (north, one bright sensor): lights off.
    assert_eq!(engine.terminate(), 0, "SIGTERM exits 0");
    let got = by_topic(&received_after_fence(port, &sub, "stadium/fence/lights"));
    expected
        .get_mut("stadium/north/lights")
        .unwrap()
        .push(on(false));
    assert_eq!(
        got, expected,
        "the last window's command goes out at shutdown"
    );

    // Retained: a controller connecting now learns each site's state.
    let out = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-v"])
        .args(["-t", "stadium/+/lights", "-C", "2", "-W", "5"])
        .output()
        .unwrap();
    let mut retained: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    retained.sort();
    assert_eq!(
        retained,
        [
            "stadium/north/lights {\"on\":false}",
            "stadium/south/lights {\"on\":true}"
        ]
    );

    let d = data.path().display();
    let rows = json_rows(format!(
        "SELECT window_start, site, sensors, dark_sensors, darkest_lux, lights_on \
         FROM '{d}/site_light/'"
    ));
    let row = |m: &str, site: &str, n: u32, dark: u32, darkest: &str, on: bool| {
        format!(
            "{{\"window_start\":\"2026-01-01T00:{m}Z\",\"site\":\"{site}\",\"sensors\":{n},\"dark_sensors\":{dark},\"darkest_lux\":{darkest},\"lights_on\":{on}}}"
        )
    };
    let mut expected = vec![
        row("00:00", "north", 3, 0, "348.3", false),
        row("00:00", "south", 2, 0, "600.0", false),
        row("00:30", "north", 3, 1, "110.0", false),
        row("00:30", "south", 2, 1, "80.0", false),
        row("01:00", "north", 3, 2, "75.0", true),
        row("01:00", "south", 2, 2, "50.0", true),
        row("01:30", "north", 1, 0, "700.0", false),
    ];
    expected.sort();
    assert_eq!(rows, expected, "site_light rows");
    let windows_30s = sql(&[format!(
        "SELECT count(*) FROM '{d}/site_light/' WHERE window_end - window_start <> INTERVAL '30 seconds'"
    )]);
    assert_eq!(scalar(&windows_30s[0]), 0, "windows are 30 s long");
    let raw = sql(&[format!("SELECT count(*) FROM '{d}/light/'")]);
    assert_eq!(scalar(&raw[0]), total as i64, "every reading stored raw");
}

/// Thermostat: the rooms' average against homes.csv's setpoint, with a dead band of
/// +-0.5 degrees where nothing is sent; every window's decision stored.
#[test]
fn example_thermostat() {
    let test = "example_thermostat";
    if !tools_present(test) {
        return;
    }
    let broker = Mosquitto::start();
    let port = broker.port;
    let data = tempfile::tempdir().unwrap();
    // In place: the pipeline finds homes.csv beside itself.
    let engine = start_engine(data.path(), "thermostat.sql", &broker, "thermostat");
    let sub = Subscriber::start(port, "homes/+/thermostat", "homes/probe/thermostat");

    let reading = |s: i64, home: &str, room: &str, c: f64| {
        let ts = T0 + s * 1000;
        (
            format!("homes/{home}/{room}/temperature"),
            format!("{{\"celsius\": {c}, \"ts\": {ts}}}"),
        )
    };
    // maple-12: setpoint 21.0 (on below 20.5, off above 21.5); birch-3: 19.5 (19.0, 20.0).
    let minutes: Vec<Vec<(String, String)>> = vec![
        // maple-12 20.17 (the thermostat's own sensor, chatty, counts once): on.
        // birch-3 19.6: hold. oak-7 is not in homes.csv.
        vec![
            reading(3, "maple-12", "thermostat", 21.0),
            reading(18, "maple-12", "thermostat", 21.0),
            reading(33, "maple-12", "thermostat", 21.0),
            reading(48, "maple-12", "thermostat", 21.0),
            reading(10, "maple-12", "bedroom", 19.5),
            reading(12, "maple-12", "living-room", 20.0),
            reading(5, "birch-3", "thermostat", 19.3),
            reading(25, "birch-3", "kitchen", 19.9),
            reading(7, "oak-7", "thermostat", 15.0),
        ],
        // maple-12 20.87: hold. birch-3 20.2: off.
        vec![
            reading(63, "maple-12", "thermostat", 20.9),
            reading(70, "maple-12", "bedroom", 20.7),
            reading(72, "maple-12", "living-room", 21.0),
            reading(65, "birch-3", "thermostat", 20.3),
            reading(85, "birch-3", "kitchen", 20.1),
            reading(67, "oak-7", "thermostat", 15.0),
        ],
        // maple-12 21.6: off. birch-3 19.3: hold.
        vec![
            reading(123, "maple-12", "thermostat", 21.4),
            reading(130, "maple-12", "bedroom", 21.8),
            reading(132, "maple-12", "living-room", 21.6),
            reading(125, "birch-3", "thermostat", 19.4),
            reading(145, "birch-3", "kitchen", 19.2),
        ],
        // maple-12 20.1: on. birch-3 18.85: on.
        vec![
            reading(183, "maple-12", "thermostat", 20.0),
            reading(190, "maple-12", "bedroom", 20.2),
            reading(192, "maple-12", "living-room", 20.1),
            reading(185, "birch-3", "thermostat", 18.8),
            reading(205, "birch-3", "kitchen", 18.9),
        ],
        // Closes minute 3; its own minute (maple-12 21.0: hold) closes at shutdown.
        vec![reading(241, "maple-12", "thermostat", 21.0)],
    ];
    let mut total = 0;
    for m in &minutes {
        total += m.len();
        publish_and_ingest(&engine, port, "temperature", m, total);
    }
    let heating = |v: bool| format!("{{\"heating\":{v}}}");
    let mut expected = BTreeMap::new();
    expected.insert(
        "homes/maple-12/thermostat".to_string(),
        vec![heating(true), heating(false), heating(true)],
    );
    expected.insert(
        "homes/birch-3/thermostat".to_string(),
        vec![heating(false), heating(true)],
    );
    wait_until(Duration::from_secs(10), "five heating commands", || {
        sub.count() >= 5
    });
    assert_eq!(
        late_rows(&engine, "temperature"),
        Some(0.0),
        "no reading was late"
    );
    assert_eq!(engine.terminate(), 0, "SIGTERM exits 0");
    let got = by_topic(&received_after_fence(port, &sub, "homes/fence/thermostat"));
    assert_eq!(
        got, expected,
        "commands only outside the dead band, none for a home not in homes.csv"
    );

    let d = data.path().display();
    let rows = json_rows(format!(
        "SELECT window_start, home_id, rooms, avg_celsius, setpoint, decision \
         FROM '{d}/heating_decisions/'"
    ));
    let row = |m: u32, home: &str, rooms: u32, avg: &str, sp: &str, decision: &str| {
        format!(
            "{{\"window_start\":\"2026-01-01T00:0{m}:00Z\",\"home_id\":\"{home}\",\"rooms\":{rooms},\"avg_celsius\":{avg},\"setpoint\":{sp},\"decision\":\"{decision}\"}}"
        )
    };
    let mut expected = vec![
        row(0, "maple-12", 3, "20.17", "21.0", "on"),
        row(0, "birch-3", 2, "19.6", "19.5", "hold"),
        row(1, "maple-12", 3, "20.87", "21.0", "hold"),
        row(1, "birch-3", 2, "20.2", "19.5", "off"),
        row(2, "maple-12", 3, "21.6", "21.0", "off"),
        row(2, "birch-3", 2, "19.3", "19.5", "hold"),
        row(3, "maple-12", 3, "20.1", "21.0", "on"),
        row(3, "birch-3", 2, "18.85", "19.5", "on"),
        row(4, "maple-12", 1, "21.0", "21.0", "hold"),
    ];
    expected.sort();
    assert_eq!(rows, expected, "heating_decisions rows");
}

/// Machine health: after a steady warm-up, one spike gives one alert row and one stop
/// command; a spike during another machine's warm-up gives nothing.
#[test]
fn example_machine_health() {
    let test = "example_machine_health";
    if !tools_present(test) {
        return;
    }
    let broker = Mosquitto::start();
    let port = broker.port;
    let data = tempfile::tempdir().unwrap();
    let engine = start_engine(data.path(), "machine_health.sql", &broker, "machines");
    let sub = Subscriber::start(port, "factory/+/+/commands", "factory/probe/probe/commands");

    // Five readings a second. One topic per machine, so each machine's readings arrive in
    // order (the frame's state follows event time per machine).
    let mut msgs = Vec::new();
    let mut add = |topic: &str, i: i64, v: f64, t: f64| {
        let ts = T0 + i * 200;
        msgs.push((
            topic.to_string(),
            format!("{{\"vibration\": {v}, \"temperature\": {t}, \"ts\": {ts}}}"),
        ));
    };
    let press = "factory/line-1/press-07/telemetry";
    let lathe = "factory/line-2/lathe-03/telemetry";
    let mut i = 0;
    for k in 0..35 {
        let (v, t) = if k % 2 == 0 {
            (0.78, 61.0)
        } else {
            (0.82, 61.4)
        };
        add(press, i, v, t);
        i += 1;
    }
    add(press, i, 9.5, 61.2);
    let spike_ts = T0 + i * 200;
    i += 1;
    for _ in 0..3 {
        add(press, i, 0.8, 61.2);
        i += 1;
    }
    for k in 0..20 {
        let (v, t) = if k % 2 == 0 {
            (1.18, 70.0)
        } else {
            (1.22, 70.4)
        };
        add(lathe, k, v, t);
    }
    // Scores 4.36 at its 21st reading: still warming up.
    add(lathe, 20, 9.0, 70.2);
    add(lathe, 21, 1.2, 70.2);
    let total = msgs.len();
    publish_and_ingest(&engine, port, "telemetry", &msgs, total);
    wait_until(Duration::from_secs(10), "a stop command", || {
        sub.count() >= 1
    });
    assert_eq!(engine.terminate(), 0, "SIGTERM exits 0");
    let got = received_after_fence(port, &sub, "factory/fence/fence/commands");
    assert_eq!(
        got,
        [(
            "factory/line-1/press-07/commands".to_string(),
            "{\"stop\":true,\"reason\":\"vibration\",\"vibration\":9.5,\"temperature\":61.2}"
                .to_string()
        )],
        "exactly one stop command, for the spike after the warm-up"
    );

    let d = data.path().display();
    let rows = json_rows(format!(
        "SELECT CAST(event_time AS BIGINT) AS ts, line, device_id, vibration, vibration_z, \
         temperature_z, readings FROM '{d}/alerts/'"
    ));
    assert_eq!(
        rows,
        [format!(
            "{{\"ts\":{},\"line\":\"line-1\",\"device_id\":\"press-07\",\"vibration\":9.5,\"vibration_z\":5.83,\"temperature_z\":0.03,\"readings\":36}}",
            spike_ts
        )],
        "one alert row"
    );
}

/// Fleet presence: a device silent past the timeout (10 s) is listed with its last_seen
/// and alerted on MQTT; a device whose connection drops is listed at once, by its last will
/// on the status topic; a device that keeps reporting is not. `fleetsql_devices` counts
/// them by status.
#[test]
fn example_fleet_presence() {
    let test = "example_fleet_presence";
    if !tools_present(test) {
        return;
    }
    let broker = Mosquitto::start();
    let port = broker.port;
    let data = tempfile::tempdir().unwrap();
    let engine = start_engine(data.path(), "fleet_presence.sql", &broker, "presence");
    let sub = Subscriber::start(port, "fleet/alerts/#", "fleet/alerts/probe");

    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let van = |id: &str| {
        (
            format!("fleet/{id}/telemetry"),
            "{\"battery\": 3.9}".to_string(),
        )
    };
    // van-3 is a real MQTT client with a last will, connected (its probe came back).
    let van3 = Subscriber::start_with(
        port,
        "fleet/van-3/commands",
        "fleet/van-3/commands",
        &[
            "-i",
            "van-3",
            "--will-topic",
            "fleet/van-3/status",
            "--will-payload",
            "offline",
        ],
    );
    let before = now_ms();
    let started = Instant::now();
    publish_and_ingest(
        &engine,
        port,
        "telemetry",
        &[van("van-1"), van("van-2"), van("van-3")],
        3,
    );
    let after = now_ms();
    let dropped_at = now_ms();
    van3.kill();

    // van-2 keeps reporting (every 500 ms, well inside the timeout) until van-1's alert.
    let mut sent = 3;
    let mut van3_alert_after = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while sub.count() < 2 {
        assert!(
            Instant::now() < deadline,
            "{} offline alerts within 20 s; log:\n{}",
            sub.count(),
            engine.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        if van3_alert_after.is_none() && sub.count() == 1 {
            van3_alert_after = Some(started.elapsed());
        }
        sent += 1;
        publish_and_ingest(&engine, port, "telemetry", &[van("van-2")], sent);
    }
    let silent_for = started.elapsed();
    assert!(
        silent_for >= Duration::from_secs(10),
        "van-1 went offline after {silent_for:?}, before the 10 s timeout"
    );
    let van3_after = van3_alert_after.expect("van-3's alert came first, by itself");
    assert!(
        van3_after < Duration::from_secs(8),
        "van-3's will was acted on after {van3_after:?}, not at once"
    );
    let by_status = |s: &str| engine.metric(&format!("fleetsql_devices{{status=\"{s}\"}}"));
    wait_until(Duration::from_secs(10), "devices counted by status", || {
        by_status("online") == Some(1.0) && by_status("offline") == Some(2.0)
    });
    assert_eq!(engine.terminate(), 0, "SIGTERM exits 0");
    let alerts = received_after_fence(port, &sub, "fleet/alerts/fence");
    assert_eq!(alerts.len(), 2, "two alerts: {alerts:?}");
    let alert = |i: usize| -> serde_json::Value {
        assert_eq!(alerts[i].0, "fleet/alerts/offline");
        serde_json::from_str(&alerts[i].1).unwrap()
    };
    assert_eq!(alert(0)["device_id"], "van-3", "{}", alert(0));
    assert_eq!(alert(1)["device_id"], "van-1", "{}", alert(1));

    let d = data.path().display();
    let rows = json_rows(format!(
        "SELECT device_id, CAST(last_seen AS BIGINT) AS last_seen, CAST(since AS BIGINT) AS since, \
         CAST(detected_at AS BIGINT) AS detected_at FROM '{d}/offline/' ORDER BY device_id"
    ));
    assert_eq!(rows.len(), 2, "van-1 and van-3 are offline: {rows:?}");
    let row = |i: usize| -> serde_json::Value { serde_json::from_str(&rows[i]).unwrap() };
    let ms = |r: &serde_json::Value, c: &str| r[c].as_i64().unwrap_or_else(|| panic!("{c} in {r}"));
    for r in [row(0), row(1)] {
        // Receive time: after the publish began, and within the ingest wait after it.
        let last_seen = ms(&r, "last_seen");
        assert!(
            (before..=after).contains(&last_seen),
            "last_seen {last_seen} not within the publish, {before}..={after}: {r}"
        );
    }
    let (van1, van3) = (row(0), row(1));
    assert_eq!(van1["device_id"], "van-1");
    assert_eq!(
        ms(&van1, "since"),
        ms(&van1, "last_seen"),
        "offline since its last message"
    );
    let silence = ms(&van1, "detected_at") - ms(&van1, "last_seen");
    assert!(
        (10_000..=14_000).contains(&silence),
        "noticed {silence} ms after the last message (timeout 10 s, checked every 2.5 s)"
    );
    assert_eq!(van3["device_id"], "van-3");
    assert!(
        ms(&van3, "since") >= dropped_at && ms(&van3, "since") < dropped_at + 8_000,
        "van-3 offline since its will arrived, just after {dropped_at}: {van3}"
    );
    assert_eq!(ms(&van3, "detected_at"), ms(&van3, "since"));
    assert_eq!(
        alert(1)["last_seen"].as_str().map(str::to_string),
        Some(
            chrono::DateTime::from_timestamp_millis(ms(&van1, "last_seen"))
                .unwrap()
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ),
        "the alert carries the stored last_seen"
    );
}
