//! The benchmarks in smoke mode: they run and their checks hold, at a size that takes
//! seconds. How fast is for `cargo bench`, not for tests.

use std::time::Duration;

/// The fleet benchmark with 300 devices: every reading stored (raw table and per-device
/// counts read back from Parquet), every window's results out, every actor retired.
/// With two shard threads, and with none (`0`, the default on two cores: the actors on
/// the caller's actix system).
#[test]
fn fleet_benchmark_smoke() {
    for shards in [2, 0] {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let report = fleetsql::device::block_on(
            shards,
            rt,
            fleetsql::bench::fleet::run(fleetsql::bench::fleet::Options {
                devices: 300,
                seconds: 3,
                window: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(2),
                shards,
                max_backlog: 64 << 20,
                data_dir: dir.path().to_path_buf(),
                verbose: false,
            }),
        )
        .unwrap_or_else(|e| panic!("shards {shards}: {e:#}"));
        println!("shards {shards}\n{}", report.markdown());
        assert_eq!(report.readings, 900, "3 s of 300 devices at 1/s");
        assert_eq!(
            report.raw_rows, 900,
            "shards {shards}: every reading in the raw table"
        );
        assert_eq!(
            report.aggregated_rows, 900,
            "shards {shards}: every reading in a window's count"
        );
        assert_eq!(report.actors_peak, 300, "shards {shards}");
        assert_eq!(
            report.actors_after_retire, 0,
            "shards {shards}: idle actors retired"
        );
        assert_eq!(
            report.window_close.len(),
            3,
            "shards {shards}: each 1-second window closed"
        );
        assert!(report.rss_peak >= report.rss_baseline && report.rss_baseline > 0);
    }
}

/// Each micro-benchmark body (benches/micro.rs) once at a tiny size: every reading comes
/// out of each stage, as a row or in a count.
#[test]
fn micro_benchmarks_smoke() {
    use fleetsql::bench::micro::{self, Payload};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // Past the decoder's batch size too: the body flushes as a shard buffer does.
        for n in [100, fleetsql::decode::MAX_BUFFERED_ROWS + 10] {
            for payload in [Payload::Light, Payload::Climate] {
                let mut b = micro::Decode::new(payload, n).await.unwrap();
                assert_eq!(micro::once(&mut b).await.unwrap(), n, "{payload:?} decoded");
                assert_eq!(micro::once(&mut b).await.unwrap(), n, "decoder reused");
            }
        }

        let mut b = micro::ActorHop::new(200).await.unwrap();
        for _ in 0..2 {
            assert_eq!(
                micro::once(&mut b).await.unwrap(),
                200,
                "rows on the engine channel"
            );
        }
        drop(b);

        let mut b = micro::WindowClose::new(100).await.unwrap();
        assert_eq!(
            micro::once(&mut b).await.unwrap(),
            100,
            "rows in the closed window"
        );

        let mut b = micro::Query::new(100).await.unwrap();
        for _ in 0..2 {
            let out = micro::once(&mut b).await.unwrap();
            assert_eq!(
                micro::summary_counts(&out).unwrap(),
                (micro::devices_for(100), 100),
                "one row per device, counting every reading (the slot refilled each run)"
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let mut b = micro::ParquetWrite::new(100, dir.path()).await.unwrap();
        for _ in 0..2 {
            assert_eq!(
                micro::once(&mut b).await.unwrap(),
                100,
                "rows in the Parquet file"
            );
        }
    });
}

/// `fleetsql bench` in smoke mode: every broker scenario against a real mosquitto with
/// the engine as a child process, and the in-process core path. Each checks zero loss
/// itself (commands received, rows counted in Parquet) and fails otherwise; here the
/// limits it measures beside the engine are checked to be there and complete.
#[test]
fn bench_scenarios_smoke() {
    use fleetsql::bench::scenario::{self, Scenario};
    if !crate::util::have("mosquitto", "bench_scenarios_smoke") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (s, messages, devices, rate) in [
        (Scenario::Filter, 2_000, 20, None),
        (Scenario::Aggregate, 2_000, 200, None),
        (Scenario::Nightlight, 1_000, 10, None),
        (Scenario::Latency, 500, 10, Some(500.0)),
    ] {
        let args = fleetsql::bench::BenchArgs {
            messages: Some(messages),
            devices: Some(devices),
            rate,
            seconds: 1,
            qos: 1,
            connections: 2,
            sut_cmd: None,
            engine_args: vec!["--fsync=off".into()],
            no_limits: false,
            pin: false,
            timeout: 60,
            runs: 1,
        };
        let report = rt
            .block_on(scenario::run(args.options(s).unwrap()))
            .unwrap_or_else(|e| panic!("{s:?}: {e:#}"));
        println!("{}", report.markdown());
        assert_eq!(report.sut.load.sent, messages, "{s:?}: readings sent");
        let limit = report
            .limit()
            .unwrap_or_else(|| panic!("{s:?}: no limit measured"));
        assert_eq!(
            limit.load.received, messages,
            "{s:?}: the limit's run is complete"
        );
        assert!(report.ratio().is_some_and(|r| r > 0.0), "{s:?}: ratio");
        assert!(
            limit.cpu_per_msg.is_some_and(|c| c > Duration::ZERO),
            "{s:?}: the limit's process CPU"
        );
        if s == Scenario::Nightlight || s == Scenario::Latency {
            assert_eq!(
                report.sut.load.received, messages,
                "{s:?}: a command per reading"
            );
            assert_eq!(
                report.sut.load.latencies_us.len(),
                messages as usize,
                "{s:?}: a latency per reading"
            );
        }
        assert!(
            report
                .sut
                .check
                .contains(&format!("raw rows {messages}/{messages}")),
            "{s:?}: {}",
            report.sut.check
        );
        assert!(report.sut.cpu_per_msg.is_some_and(|c| c > Duration::ZERO));
    }

    // d, the core path, with two shard threads and with none.
    for shards in [2, 0] {
        let dir = tempfile::tempdir().unwrap();
        let core = fleetsql::device::block_on(
            shards,
            tokio::runtime::Runtime::new().unwrap(),
            fleetsql::bench::core::run(fleetsql::bench::core::CoreOptions {
                devices: 100,
                messages: 20_000,
                shards,
                data_dir: dir.path().to_path_buf(),
            }),
        )
        .unwrap_or_else(|e| panic!("core, shards {shards}: {e:#}"));
        println!("shards {shards}\n{}", core.markdown());
        assert_eq!(core.readings, 20_000);
        assert_eq!(
            core.raw_rows, 20_000,
            "shards {shards}: every reading in the raw table"
        );
        assert_eq!(
            core.aggregated_rows, 20_000,
            "shards {shards}: every reading in a window's count"
        );
    }
}

/// `fleetsql run --shards 0` (the one shard on the runtime's own thread, no arbiters)
/// through mosquitto, at both QoS: a command back for every reading, every reading in the
/// raw Parquet table, and the process exits cleanly after the load (the scenario fails
/// otherwise).
#[test]
fn one_thread_engine_round_trip() {
    use fleetsql::bench::scenario::{self, Scenario};
    if !crate::util::have("mosquitto", "one_thread_engine_round_trip") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for qos in [0, 1] {
        let args = fleetsql::bench::BenchArgs {
            messages: Some(1_000),
            devices: Some(10),
            rate: None,
            seconds: 1,
            qos,
            connections: 2,
            sut_cmd: None,
            engine_args: vec!["--fsync=off".into(), "--shards".into(), "0".into()],
            no_limits: true,
            pin: false,
            timeout: 60,
            runs: 1,
        };
        let report = rt
            .block_on(scenario::run(args.options(Scenario::Nightlight).unwrap()))
            .unwrap_or_else(|e| panic!("QoS {qos}: {e:#}"));
        println!("{}", report.markdown());
        assert!(
            report.sut.system.contains("--shards 0"),
            "{}",
            report.sut.system
        );
        assert_eq!(
            report.sut.load.received, 1_000,
            "QoS {qos}: a command per reading"
        );
        assert!(
            report.sut.check.contains("raw rows 1000/1000"),
            "QoS {qos}: {}",
            report.sut.check
        );
    }
}

/// The CPU clock of another process counts below a scheduler tick: a child that
/// spins for 2 ms reads as more than zero and less than a second, and a process
/// that is gone reads as nothing.
#[test]
fn cpu_time_of_a_child_is_finer_than_a_tick() {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg("read line")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sh");
    let pid = child.id();
    let before = fleetsql::bench::procs::cpu_time(pid).expect("a running child has a CPU clock");
    assert!(before < Duration::from_secs(1), "{before:?}");
    drop(child.stdin.take());
    child.wait().unwrap();
    assert_eq!(
        fleetsql::bench::procs::cpu_time(pid),
        None,
        "a reaped child has no clock"
    );
    // Our own process has run for well over a tick's worth of nanoseconds by now,
    // and the figure is not rounded to whole ticks.
    let me = fleetsql::bench::procs::cpu_time(std::process::id()).unwrap();
    assert!(
        me > Duration::ZERO && !me.subsec_nanos().is_multiple_of(1_000_000),
        "{me:?}"
    );
}

/// `fleetsql bench --pin`: a child started for a role runs on that role's CPUs only, as
/// Linux reports them (`Cpus_allowed_list`), and a pinned scenario runs and says so.
#[test]
fn bench_pin_confines_broker_and_system() {
    use fleetsql::bench::procs::{Pinning, Proc, Role};
    use fleetsql::bench::scenario::{self, Scenario};
    let pin = match Pinning::new() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED bench_pin_confines_broker_and_system: {e}");
            return;
        }
    };
    let broker = pin.cpus(Role::Broker);
    let system = pin.cpus(Role::System);
    assert_eq!(broker.len(), 1, "the broker gets one CPU: {broker:?}");
    assert!(
        !system.is_empty() && !system.contains(&broker[0]),
        "{system:?}"
    );
    for (role, want) in [(Role::Broker, &broker), (Role::System, &system)] {
        let mut p = Proc::spawn_pinned(
            "sleep",
            std::process::Command::new("sleep").arg("30"),
            Some(&pin),
            role,
        )
        .unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|l| l.trim().to_string())
            .unwrap();
        assert_eq!(allowed, cpu_list(want), "{role:?}");
        p.stop(Duration::from_secs(5));
    }

    if !crate::util::have("mosquitto", "bench_pin_confines_broker_and_system") {
        return;
    }
    let args = fleetsql::bench::BenchArgs {
        messages: Some(1_000),
        devices: Some(10),
        rate: None,
        seconds: 1,
        qos: 1,
        connections: 2,
        sut_cmd: None,
        engine_args: vec!["--fsync=off".into()],
        no_limits: true,
        pin: true,
        timeout: 60,
        runs: 1,
    };
    let report = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(scenario::run(args.options(Scenario::Filter).unwrap()))
        .unwrap();
    assert!(report.pinned);
    assert!(
        report.markdown().contains("pinned"),
        "{}",
        report.markdown()
    );
    assert!(
        report.sut.check.contains("raw rows 1000/1000"),
        "{}",
        report.sut.check
    );
}

/// CPU ids as Linux lists them: `0`, `1-3`, `0,2`.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// The spread of a figure over runs: least, median (the mean of the middle two for an
/// even count), greatest; figures a run did not give are left out.
#[test]
fn spread_of_runs() {
    use fleetsql::bench::scenario::Spread;
    let s = Spread::of([3.0, 1.0, 2.0]).unwrap();
    assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
    let s = Spread::of([4.0, 1.0, f64::NAN, 2.0, 10.0]).unwrap();
    assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 10.0));
    assert_eq!(Spread::of([f64::NAN]), None);
    assert_eq!(Spread::of(std::iter::empty()), None);
}

/// `fleetsql bench --runs 2`: each run's table, each with its own delivery limit, then a
/// summary with a row per run and the least, median and greatest of each column, which
/// are those of the runs' rows; for the round trip at a fixed rate, its latencies too.
#[test]
fn bench_runs_summarised() {
    if !crate::util::have("mosquitto", "bench_runs_summarised") {
        return;
    }
    let small = ["--devices", "10", "--connections", "2", "--timeout", "60"];
    let (stdout, summary) = bench_runs(&["filter", "--messages", "1000"], &small);
    assert_eq!(
        stdout.matches("| broker delivery limit").count(),
        2,
        "{stdout}"
    );
    check_spread(&summary, 4, "msg/s");
    check_spread(&summary, 2, "limit msg/s");

    let (_, summary) = bench_runs(
        &["latency", "--rate", "500", "--seconds", "1", "--no-limits"],
        &small,
    );
    check_spread(&summary, 9, "p99");
}

/// Runs `fleetsql bench ARGS --runs 2` with the engine's fsync off; its output and the
/// part from the summary on.
fn bench_runs(args: &[&str], more: &[&str]) -> (String, String) {
    let out = std::process::Command::new(crate::util::BIN)
        .arg("bench")
        .args(args)
        .args(more)
        .args(["--runs", "2", "--engine-arg=--fsync=off"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
    let summary = stdout
        .split("2 runs of `fleetsql run --fsync=off`")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary in:\n{stdout}"))
        .to_string();
    (stdout, summary)
}

/// In the summary, column `col` of the rows `min`, `median` and `max` is the least, the
/// mean and the greatest of runs 1 and 2 (to the rounding of the table).
fn check_spread(summary: &str, col: usize, what: &str) {
    let value = |row: &str| -> f64 {
        let line = summary
            .lines()
            .find(|l| l.starts_with(&format!("| {row} |")))
            .unwrap_or_else(|| panic!("no row {row} in:\n{summary}"));
        let cell = line.split('|').nth(col).unwrap().trim();
        cell.trim_end_matches(" ms")
            .parse()
            .unwrap_or_else(|e| panic!("{what} `{cell}`: {e}"))
    };
    let (r1, r2) = (value("1"), value("2"));
    assert!(r1 > 0.0 && r2 > 0.0, "{what}: {r1}, {r2}");
    assert_eq!(value("**min**"), r1.min(r2), "{what}");
    assert_eq!(value("**max**"), r1.max(r2), "{what}");
    let tolerance = if what.ends_with("msg/s") { 1.01 } else { 0.011 };
    assert!(
        (value("**median**") - (r1 + r2) / 2.0).abs() <= tolerance,
        "{what}\n{summary}"
    );
}
