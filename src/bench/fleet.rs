//! A large fleet on one box: `devices` devices each sending one reading a second through
//! the whole engine (topic routing, shard routers, one actor per device, JSON decoding, the
//! raw Parquet table, a per-device TUMBLE aggregate into Parquet), with only the MQTT
//! client replaced by an in-process channel, so the figures are the engine's and not the
//! broker's. It measures:
//!
//! - resident memory: before the first reading, at its peak, with every device idle (all
//!   windows closed), and after the idle actors retired; the memory returned on retirement,
//!   divided by the devices, is what one idle device costs;
//! - for each window, the time from its close to its results handed to the Parquet sink
//!   (`fleetsql_window_close_seconds`);
//! - that every reading was stored: rows in the raw table and the sum of the per-device
//!   counts, read back from Parquet, both equal the readings sent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::decode::Message;
use crate::engine::EngineConfig;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct Options {
    pub devices: usize,
    /// How long the fleet sends (whole windows of `window` are measured).
    pub seconds: u64,
    /// The TUMBLE window.
    pub window: Duration,
    /// Device actors retire after this long without a message.
    pub idle_timeout: Duration,
    /// Shard threads; `0`: one shard on the caller's thread, which must then be an actix
    /// system's (`device::block_on`).
    pub shards: usize,
    /// The engine's `--max-backlog-bytes`.
    pub max_backlog: usize,
    /// Where the Parquet tables go; the caller cleans it up.
    pub data_dir: PathBuf,
    /// Print a line per second while running.
    pub verbose: bool,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub devices: usize,
    pub readings: u64,
    pub send_seconds: f64,
    /// Readings per second actually fed (the target is `devices` per second).
    pub rate: f64,
    /// How far the feed fell behind its schedule at worst: the engine pushing back.
    pub max_feed_lag: Duration,
    /// CPU time of the whole process (engine and generator) from the first reading until
    /// the last window closed, per reading.
    pub cpu_per_reading: Duration,
    pub rss_baseline: u64,
    pub rss_peak: u64,
    /// Every device known and idle, every window closed.
    pub rss_idle: u64,
    /// After the idle actors retired.
    pub rss_retired: u64,
    pub actors_peak: i64,
    pub actors_after_retire: i64,
    /// Close-to-results time of each window that closed while running, in order.
    pub window_close: Vec<Duration>,
    /// Readings in the windows measured.
    pub rows_per_window: Vec<u64>,
    pub raw_rows: i64,
    pub aggregated_rows: i64,
}

impl Report {
    /// Idle memory above the baseline, per device.
    pub fn idle_bytes_per_device(&self) -> f64 {
        self.rss_idle.saturating_sub(self.rss_baseline) as f64 / self.devices.max(1) as f64
    }

    /// Memory given back when the idle devices' actors retired, per device: what one idle
    /// device actor (and its entry in its shard) holds.
    pub fn retired_bytes_per_device(&self) -> f64 {
        self.rss_idle.saturating_sub(self.rss_retired) as f64 / self.devices.max(1) as f64
    }

    /// A Markdown summary, the form docs/benchmarks.md quotes.
    pub fn markdown(&self) -> String {
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        let windows: Vec<String> = self
            .window_close
            .iter()
            .zip(&self.rows_per_window)
            .map(|(d, n)| format!("{:.0} ms ({n} rows)", d.as_secs_f64() * 1e3))
            .collect();
        format!(
            "| figure | value |\n|---|---|\n\
             | devices | {} |\n\
             | readings sent | {} in {:.1} s ({:.0}/s; feed at most {:.0} ms behind schedule) |\n\
             | CPU per reading (whole process, generator included) | {:.2} us |\n\
             | RSS before the first reading | {:.1} MiB |\n\
             | RSS peak | {:.1} MiB |\n\
             | RSS with every device idle, windows closed | {:.1} MiB ({:.0} bytes per device above the baseline) |\n\
             | RSS after the idle actors retired | {:.1} MiB ({:.0} bytes per device returned) |\n\
             | device actors: peak, after retirement | {}, {} |\n\
             | window close to results | {} |\n\
             | rows stored: raw table, sum of per-device counts | {}, {} (sent {}) |\n",
            self.devices,
            self.readings,
            self.send_seconds,
            self.rate,
            self.max_feed_lag.as_secs_f64() * 1e3,
            self.cpu_per_reading.as_secs_f64() * 1e6,
            mb(self.rss_baseline),
            mb(self.rss_peak),
            mb(self.rss_idle),
            self.idle_bytes_per_device(),
            mb(self.rss_retired),
            self.retired_bytes_per_device(),
            self.actors_peak,
            self.actors_after_retire,
            if windows.is_empty() {
                "none closed".to_string()
            } else {
                windows.join(", ")
            },
            self.raw_rows,
            self.aggregated_rows,
            self.readings,
        )
    }
}

const PIPELINE: &str = "\
CREATE TABLE telemetry (temp DOUBLE, seq BIGINT)
  WITH (connector = 'mqtt', type = 'source', topic = 'fleet/{device_id}/telemetry');
CREATE TABLE per_device WITH (connector = 'parquet');
INSERT INTO per_device
SELECT window_start, device_id, count(*) AS n,
       avg(temp) AS avg_temp, min(temp) AS min_temp, max(temp) AS max_temp
FROM TUMBLE(telemetry, event_time, INTERVAL '{WINDOW} seconds')
GROUP BY window_start, device_id;
";

/// Runs the fleet; see the module documentation.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let window_s = opts.window.as_secs().max(1);
    std::fs::create_dir_all(&opts.data_dir)?;
    let pipeline_path = opts.data_dir.join("fleet.sql");
    std::fs::write(
        &pipeline_path,
        PIPELINE.replace("{WINDOW}", &window_s.to_string()),
    )?;
    let pipeline = crate::pipeline::load(std::slice::from_ref(&pipeline_path))
        .await
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    let mut cfg = EngineConfig::in_process(vec![pipeline_path], opts.data_dir.join("data"))?;
    cfg.device_idle_timeout = opts.idle_timeout;
    cfg.shards = opts.shards;
    cfg.max_backlog = opts.max_backlog;
    // Files commit every two seconds (the default here), so idle memory is not rows
    // waiting in a writer.
    let data_dir = cfg.data_dir.clone();

    // Topics first: they are the generator's, not the engine's, memory.
    let topics: Vec<String> = (0..opts.devices)
        .map(|i| format!("fleet/dev-{i:06}/telemetry"))
        .collect();
    let engine = super::InProcess::start(cfg, pipeline);
    let (tx, metrics) = (engine.tx.clone(), engine.metrics.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    crate::mem::trim();
    let rss_baseline = crate::mem::rss_bytes().unwrap_or(0);

    // A sampler: peak memory and actors, and each window's close-to-results time.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = tokio::spawn(sample(metrics.clone(), sampling.clone(), opts.verbose));

    // Start on a window boundary, so the windows measured are full.
    let now = crate::time::now_ms();
    let w_ms = (window_s * 1000) as i64;
    let start_ms = (now / w_ms + 1) * w_ms;
    tokio::time::sleep(Duration::from_millis((start_ms - now) as u64)).await;
    let started = Instant::now();
    let cpu_start = crate::mem::cpu_time();

    // Every 10 ms, the next hundredth of the fleet sends one reading.
    const TICK: Duration = Duration::from_millis(10);
    let per_tick = opts.devices.div_ceil(100);
    let ticks = opts.seconds * 100;
    let mut readings = 0u64;
    let mut max_lag = Duration::ZERO;
    let mut next = 0usize;
    for t in 0..ticks {
        let due = started + TICK * t as u32;
        let now = Instant::now();
        if now < due {
            tokio::time::sleep_until(due.into()).await;
        } else {
            max_lag = max_lag.max(now - due);
        }
        let received_at = crate::time::now_ms();
        let seq = t / 100;
        for _ in 0..per_tick.min(opts.devices) {
            let payload = format!(r#"{{"temp": {}.5, "seq": {seq}}}"#, 15 + (next % 10));
            let m = Message {
                topic: topics[next].clone(),
                payload: Bytes::from(payload),
                received_at,
            };
            if tx.send(m).await.is_err() {
                anyhow::bail!("the engine stopped while the fleet was sending");
            }
            readings += 1;
            next = (next + 1) % opts.devices;
        }
    }
    let send_seconds = started.elapsed().as_secs_f64();

    // Idle: wait until the last window (partly filled) has closed by the clock.
    let windows_sent = opts.seconds.div_ceil(window_s);
    let closed = || {
        metrics
            .windows_closed
            .with_label_values(&["per_device"])
            .get()
    };
    let deadline = Instant::now() + opts.window * 3 + Duration::from_secs(10);
    while closed() < windows_sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = crate::mem::cpu_time().saturating_sub(cpu_start);
    // Let the last files commit (roll interval) and the allocator settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    crate::mem::trim();
    let rss_idle = crate::mem::rss_bytes().unwrap_or(0);

    // Retirement: every actor stops after the idle timeout; memory goes back.
    let deadline = Instant::now() + opts.idle_timeout * 2 + Duration::from_secs(60);
    while metrics.device_actors.get() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The routers return memory one sweep after the retirement.
    tokio::time::sleep(
        (opts.idle_timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(30)) * 2,
    )
    .await;
    let actors_after_retire = metrics.device_actors.get();
    let rss_retired = crate::mem::rss_bytes().unwrap_or(0);

    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let (rss_peak, actors_peak, closes) = sampler.await?;
    drop(tx);
    engine.stop().await?;

    let raw_rows = super::count_rows(&data_dir, "telemetry", "count(*)").await?;
    let aggregated_rows = super::count_rows(&data_dir, "per_device", "sum(n)").await?;
    let full: Vec<(Duration, u64)> = closes.into_iter().take(windows_sent as usize).collect();
    Ok(Report {
        devices: opts.devices,
        readings,
        send_seconds,
        rate: readings as f64 / send_seconds,
        max_feed_lag: max_lag,
        cpu_per_reading: cpu / readings.max(1) as u32,
        rss_baseline,
        rss_peak: rss_peak.max(rss_idle),
        rss_idle,
        rss_retired,
        actors_peak,
        actors_after_retire,
        window_close: full.iter().map(|(d, _)| *d).collect(),
        rows_per_window: full.iter().map(|(_, n)| *n).collect(),
        raw_rows,
        aggregated_rows,
    })
}

/// Samples every 50 ms until told to stop: peak RSS, peak actors, and for each window
/// closed, its close-to-results time and the rows it held (from the metrics' deltas).
async fn sample(
    metrics: Arc<Metrics>,
    running: Arc<std::sync::atomic::AtomicBool>,
    verbose: bool,
) -> (u64, i64, Vec<(Duration, u64)>) {
    let (mut peak, mut actors) = (0u64, 0i64);
    let mut closes = Vec::new();
    let latency = &metrics.window_close_latency;
    let rows = || {
        metrics
            .rows_ingested
            .with_label_values(&["telemetry"])
            .get()
    };
    let (mut count, mut sum) = (latency.get_sample_count(), latency.get_sample_sum());
    let mut rows_at_close = rows();
    let mut last_print = Instant::now();
    while running.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(crate::mem::rss_bytes().unwrap_or(0));
        actors = actors.max(metrics.device_actors.get());
        let (c, s) = (latency.get_sample_count(), latency.get_sample_sum());
        if c > count {
            // Rows ingested since the previous close approximate this window's rows.
            let r = rows();
            closes.push((
                Duration::from_secs_f64((s - sum) / (c - count) as f64),
                r - rows_at_close,
            ));
            rows_at_close = r;
            (count, sum) = (c, s);
        }
        if verbose && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "rss {:.0} MiB, actors {}, rows {}, windows closed {}",
                crate::mem::rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
                metrics.device_actors.get(),
                rows(),
                closes.len()
            );
        }
    }
    (peak, actors, closes)
}
