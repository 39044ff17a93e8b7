//! Backpressure between the device shards and the pipeline runner.
//!
//! Decoded rows wait on the runner's channel while it runs queries. The backlog counts
//! their bytes. Once the count reaches its limit, the topic router stops handing readings
//! to the shards. Then the ingest channel fills, the MQTT client stops reading its socket,
//! and the broker keeps the rest: with QoS 1 and a persistent session, nothing is dropped.
//! Memory stays bounded, and the engine catches up when the runner does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::Notify;

use crate::metrics::Metrics;

pub struct Backlog {
    bytes: AtomicUsize,
    limit: usize,
    peak: AtomicUsize,
    below_limit: Notify,
    metrics: std::sync::Arc<Metrics>,
}

impl Backlog {
    pub fn new(limit: usize, metrics: std::sync::Arc<Metrics>) -> Backlog {
        Backlog {
            bytes: AtomicUsize::new(0),
            limit: limit.max(1),
            peak: AtomicUsize::new(0),
            below_limit: Notify::new(),
            metrics,
        }
    }

    /// Rows of `n` bytes are on their way to the runner.
    pub fn add(&self, n: usize) {
        let now = self.bytes.fetch_add(n, Ordering::SeqCst) + n;
        let peak = self.peak.fetch_max(now, Ordering::SeqCst).max(now);
        self.metrics.backlog_bytes.set(now as i64);
        self.metrics.backlog_peak_bytes.set(peak as i64);
    }

    /// The runner has taken rows of `n` bytes.
    pub fn done(&self, n: usize) {
        let before = self.bytes.fetch_sub(n, Ordering::SeqCst);
        let now = before.saturating_sub(n);
        self.metrics.backlog_bytes.set(now as i64);
        if now < self.limit {
            self.below_limit.notify_waiters();
        }
    }

    /// Returns once the backlog is below its limit; the time spent waiting is counted in
    /// `fleetsql_backpressure_seconds_total`.
    pub async fn admit(&self) {
        let mut waited: Option<Instant> = None;
        loop {
            let notified = self.below_limit.notified();
            tokio::pin!(notified);
            // Registered before the check, so a `done` in between is not missed.
            notified.as_mut().enable();
            if self.bytes.load(Ordering::SeqCst) < self.limit {
                break;
            }
            waited.get_or_insert_with(Instant::now);
            notified.await;
        }
        if let Some(t) = waited {
            self.metrics
                .backpressure_seconds
                .inc_by(t.elapsed().as_secs_f64());
        }
    }

    /// The most the backlog ever held, in bytes.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}
