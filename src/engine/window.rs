//! Event-time bookkeeping: tumbling windows per query and a watermark per source.
//!
//! A window `[start, start + size)` closes when its source's watermark passes its end.
//! The watermark is per source, not per device: windows aggregate across devices, so they
//! can only close when the source as a whole has moved past them.

use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, BooleanArray, TimestampMillisecondArray};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::record_batch::RecordBatch;

/// Open tumbling windows of one query.
pub struct Tumbling {
    size: i64,
    open: BTreeMap<i64, Vec<RecordBatch>>,
    /// Every window starting before this is closed; rows for them are late.
    closed_before: i64,
}

impl Tumbling {
    pub fn new(size_ms: i64) -> Tumbling {
        Tumbling {
            size: size_ms,
            open: BTreeMap::new(),
            closed_before: i64::MIN,
        }
    }

    /// Assigns rows to windows by their event time; returns how many were late.
    pub fn add(&mut self, batch: &RecordBatch, event_time: usize) -> usize {
        let Some(ts) = batch
            .column(event_time)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
        else {
            return 0;
        };
        let size = self.size;
        let start_of = |t: i64| t.div_euclid(size).saturating_mul(size);
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for t in ts.values().iter() {
            let s = start_of(*t);
            lo = lo.min(s);
            hi = hi.max(s);
        }
        if lo == i64::MAX {
            return 0;
        }
        if lo == hi {
            // The common case: the whole batch belongs to one window.
            if lo < self.closed_before {
                return batch.num_rows();
            }
            self.open.entry(lo).or_default().push(batch.clone());
            return 0;
        }
        let mut starts: Vec<i64> = ts.values().iter().map(|t| start_of(*t)).collect();
        let per_row = starts.clone();
        starts.sort_unstable();
        starts.dedup();
        let mut late = 0;
        for s in starts {
            let mask: BooleanArray = per_row.iter().map(|r| Some(*r == s)).collect();
            if s < self.closed_before {
                late += mask.true_count();
                continue;
            }
            if let Ok(part) = filter_record_batch(batch, &mask) {
                self.open.entry(s).or_default().push(part);
            }
        }
        late
    }

    /// Removes and returns the windows whose end is at or before `watermark`, oldest first.
    pub fn close_until(&mut self, watermark: i64) -> Vec<(i64, Vec<RecordBatch>)> {
        let mut out = Vec::new();
        while let Some((&start, _)) = self.open.first_key_value() {
            if start.saturating_add(self.size) > watermark {
                break;
            }
            if let Some((s, b)) = self.open.pop_first() {
                out.push((s, b));
            }
        }
        if watermark == i64::MIN {
            return out;
        }
        let first_open = watermark.div_euclid(self.size).saturating_mul(self.size);
        // Windows whose end passed the watermark are closed even if they never saw a row.
        let bound = if first_open.saturating_add(self.size) <= watermark {
            first_open + self.size
        } else {
            first_open
        };
        self.closed_before = self.closed_before.max(bound);
        out
    }

    /// Every open window, for the final flush at shutdown.
    pub fn close_all(&mut self) -> Vec<(i64, Vec<RecordBatch>)> {
        let out: Vec<_> = std::mem::take(&mut self.open).into_iter().collect();
        if let Some((s, _)) = out.last() {
            self.closed_before = self.closed_before.max(s + self.size);
        }
        out
    }
}

/// A source's progress in event time.
pub struct SourceClock {
    delay: i64,
    /// Without rows for this long, event time moves on with the wall clock.
    idle: i64,
    max_event: Option<i64>,
    last_rows_at: i64,
}

/// The out-of-orderness of a receive-time source: rows of different shards reach the
/// runner up to a flush interval apart.
pub const RECEIVE_TIME_SLACK_MS: i64 = 250;

impl SourceClock {
    /// `delay_ms`: how far the watermark trails the newest event time seen.
    pub fn new(delay_ms: i64) -> SourceClock {
        SourceClock {
            delay: delay_ms,
            idle: delay_ms + 1000,
            max_event: None,
            last_rows_at: 0,
        }
    }

    pub fn observe(&mut self, batch: &RecordBatch, event_time: usize, now: i64) {
        if let Some(ts) = batch
            .column(event_time)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
        {
            if let Some(m) = ts.values().iter().max() {
                self.max_event = Some(self.max_event.map_or(*m, |x| x.max(*m)));
            }
        }
        self.last_rows_at = now;
    }

    /// The newest event time minus the delay; when the source has been quiet longer than
    /// the delay plus a second, it moves on at the wall clock's pace so the last windows
    /// close (devices that stop sending must not hold results back).
    pub fn watermark(&self, now: i64) -> i64 {
        match self.max_event {
            None => i64::MIN,
            Some(m) => {
                let quiet = now - self.last_rows_at - self.idle;
                m - self.delay + quiet.max(0)
            }
        }
    }
}
