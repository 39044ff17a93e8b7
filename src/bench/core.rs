//! Scenario d, the core path without a broker: readings handed to the engine in process
//! as fast as it takes them, through topic routing, the shard routers, one actor per
//! device, JSON decoding, the raw Parquet table and scenario b's pipeline (a 1-second
//! TUMBLE per device, avg/min/max, into Parquet). Only the MQTT client is replaced, by
//! an in-process channel; the payloads are made before the clock starts.
//!
//! Zero loss is checked as in the broker scenarios: the raw table's rows and the sum of
//! the per-device window counts, read back from Parquet, both equal the readings sent.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::load::Payload;
use crate::decode::Message;
use crate::engine::EngineConfig;

#[derive(Debug, Clone)]
pub struct CoreOptions {
    pub devices: usize,
    /// Readings in all (rounded down to a multiple of `devices`).
    pub messages: u64,
    /// Shard threads; `0`: one shard on the caller's thread, which must then be an actix
    /// system's (`device::block_on`).
    pub shards: usize,
    /// Where the Parquet tables go; the caller cleans it up.
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CoreReport {
    pub devices: usize,
    pub readings: u64,
    /// From the first reading handed in to the last one decoded and in its window.
    pub ingest_seconds: f64,
    /// From the first reading to the engine stopped: every window closed, files written.
    pub total_seconds: f64,
    /// CPU time of the whole process over `total_seconds`, per reading.
    pub cpu_per_reading: Duration,
    pub rss_peak: u64,
    pub raw_rows: i64,
    pub aggregated_rows: i64,
}

impl CoreReport {
    pub fn rate(&self) -> f64 {
        self.readings as f64 / self.ingest_seconds.max(1e-9)
    }

    pub fn markdown(&self) -> String {
        format!(
            "| figure | value |\n|---|---|\n\
             | readings, devices | {}, {} |\n\
             | ingest rate (decoded, in windows) | {:.0} msg/s ({:.2} s) |\n\
             | until stopped (windows closed, Parquet written) | {:.2} s ({:.0} msg/s) |\n\
             | CPU per reading (whole process) | {:.2} us |\n\
             | peak RSS | {:.0} MiB |\n\
             | rows in Parquet: raw table, sum of window counts | {}, {} (sent {}) |\n",
            self.readings,
            self.devices,
            self.rate(),
            self.ingest_seconds,
            self.total_seconds,
            self.readings as f64 / self.total_seconds.max(1e-9),
            self.cpu_per_reading.as_secs_f64() * 1e6,
            self.rss_peak as f64 / (1 << 20) as f64,
            self.raw_rows,
            self.aggregated_rows,
            self.readings,
        )
    }
}

pub async fn run(opts: CoreOptions) -> anyhow::Result<CoreReport> {
    std::fs::create_dir_all(&opts.data_dir)?;
    let pipeline_path = opts.data_dir.join("aggregate.sql");
    std::fs::write(
        &pipeline_path,
        include_str!("../../benches/pipelines/aggregate.sql"),
    )?;
    let pipeline = crate::pipeline::load(std::slice::from_ref(&pipeline_path))
        .await
        .map_err(|d| anyhow::anyhow!("{d}"))?;
    let mut cfg = EngineConfig::in_process(vec![pipeline_path], opts.data_dir.join("data"))?;
    cfg.shards = opts.shards;
    cfg.drain_on_stop = true;
    let data_dir = cfg.data_dir.clone();

    // The readings, made before the clock starts: device d's k-th is scenario b's.
    let per_device = (opts.messages / opts.devices.max(1) as u64) as usize;
    let readings = (per_device * opts.devices) as u64;
    anyhow::ensure!(readings > 0, "no readings to send (messages < devices?)");
    let topics: Vec<String> = (0..opts.devices)
        .map(|d| format!("dev-{d:06}/telemetry"))
        .collect();
    let mut buf = Vec::new();
    let mut payloads = Vec::with_capacity(readings as usize);
    for k in 0..per_device {
        for d in 0..opts.devices {
            Payload::Climate.reading(d, k, &mut buf);
            payloads.push((d, Bytes::copy_from_slice(&buf)));
        }
    }

    let engine = super::InProcess::start(cfg, pipeline);
    let (tx, metrics) = (engine.tx.clone(), engine.metrics.clone());
    let ingested = || metrics.rows_ingested.with_label_values(&["climate"]).get();
    let rss_peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, on) = (rss_peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(
                    crate::mem::rss_bytes().unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let started = Instant::now();
    let cpu_start = crate::mem::cpu_time();
    for (d, payload) in payloads {
        let m = Message {
            topic: topics[d].clone(),
            payload,
            received_at: crate::time::now_ms(),
        };
        if tx.send(m).await.is_err() {
            anyhow::bail!("the engine stopped while readings were handed in");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120 + readings / 100_000);
    while ingested() < readings && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ingest_seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        ingested() >= readings,
        "only {} of {readings} readings ingested in time",
        ingested()
    );
    drop(tx);
    engine.stop().await?;
    let total_seconds = started.elapsed().as_secs_f64();
    let cpu = crate::mem::cpu_time().saturating_sub(cpu_start);
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();

    let raw_rows = super::count_rows(&data_dir, "climate", "count(*)").await?;
    let aggregated_rows = super::count_rows(&data_dir, "per_device_1s", "sum(n)").await?;
    Ok(CoreReport {
        devices: opts.devices,
        readings,
        ingest_seconds,
        total_seconds,
        cpu_per_reading: cpu / readings as u32,
        rss_peak: rss_peak.load(std::sync::atomic::Ordering::Relaxed),
        raw_rows,
        aggregated_rows,
    })
}
