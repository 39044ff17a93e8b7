//! Duplicate readings: when a source declares a `sequence` field, a reading of a device
//! that repeats one the engine already took is dropped and counted
//! (`fleetsql_duplicates_total{source}`), before it reaches the raw table or any query.
//!
//! A reading is the same as an earlier one when its device, sequence number and (for a
//! source with an event-time field) event time are the same: a device that restarts its
//! numbering after a reboot sends new event times, so its new readings are not taken for
//! old ones. The engine remembers each device's last [`REMEMBERED`] readings, and forgets a
//! device [`FORGET_AFTER_MS`] after its last reading: duplicates come from redelivery
//! (QoS 1 after a reconnect, a device resending what it was not sure got through), which
//! happens soon after the original.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};

use datafusion::arrow::array::{Array, AsArray, BooleanArray, TimestampMillisecondArray};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::arrow::record_batch::RecordBatch;

use crate::pipeline::parse::{DEVICE_ID, EVENT_TIME};

/// Readings remembered per device.
pub const REMEMBERED: usize = 64;
/// A device silent this long is forgotten.
pub const FORGET_AFTER_MS: i64 = 10 * 60 * 1000;

/// The readings remembered, in a checkpoint: per device, their hashes and last reading.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DedupeState {
    pub devices: Vec<(String, Vec<u64>, i64)>,
}

pub struct Dedupe {
    seq: usize,
    device: usize,
    /// The event-time column, when the source takes it from the payload.
    event_time: Option<usize>,
    devices: HashMap<Box<str>, Recent>,
    /// Fixed keys: remembered readings are checkpointed as hashes and must match after a
    /// restart.
    hasher: std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>,
    last_sweep: i64,
}

struct Recent {
    keys: VecDeque<u64>,
    last_seen: i64,
}

impl Dedupe {
    /// `from_payload`: whether event time is a payload field (else it is the receive time,
    /// which differs on redelivery and must not be part of the identity).
    pub fn new(schema: &Schema, sequence: &str, from_payload: bool) -> Option<Dedupe> {
        Some(Dedupe {
            seq: schema.index_of(sequence).ok()?,
            device: schema.index_of(DEVICE_ID).ok()?,
            event_time: if from_payload {
                schema.index_of(EVENT_TIME).ok()
            } else {
                None
            },
            devices: HashMap::new(),
            hasher: Default::default(),
            last_sweep: i64::MIN,
        })
    }

    /// The batch without its duplicates, and how many were dropped.
    pub fn filter(&mut self, batch: RecordBatch, now: i64) -> (RecordBatch, usize) {
        self.sweep(now);
        let n = batch.num_rows();
        let (Ok(seq), Ok(device)) = (
            cast(batch.column(self.seq), &DataType::Utf8),
            cast(batch.column(self.device), &DataType::Utf8),
        ) else {
            return (batch, 0);
        };
        let (seq, device) = (seq.as_string::<i32>(), device.as_string::<i32>());
        let times = self.event_time.and_then(|i| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
        });
        let mut keep = Vec::with_capacity(n);
        let mut dropped = 0;
        for i in 0..n {
            if seq.is_null(i) || device.is_null(i) {
                keep.push(true);
                continue;
            }
            let mut h = self.hasher.build_hasher();
            seq.value(i).hash(&mut h);
            if let Some(t) = times {
                t.value(i).hash(&mut h);
            }
            let key = h.finish();
            let id = device.value(i);
            if !self.devices.contains_key(id) {
                self.devices.insert(
                    id.into(),
                    Recent {
                        keys: VecDeque::with_capacity(4),
                        last_seen: now,
                    },
                );
            }
            let Some(recent) = self.devices.get_mut(id) else {
                keep.push(true);
                continue;
            };
            recent.last_seen = now;
            if recent.keys.contains(&key) {
                keep.push(false);
                dropped += 1;
            } else {
                if recent.keys.len() == REMEMBERED {
                    recent.keys.pop_front();
                }
                recent.keys.push_back(key);
                keep.push(true);
            }
        }
        if dropped == 0 {
            return (batch, 0);
        }
        match filter_record_batch(&batch, &BooleanArray::from(keep)) {
            Ok(b) => (b, dropped),
            Err(_) => (batch, 0),
        }
    }

    pub fn state(&self) -> DedupeState {
        DedupeState {
            devices: self
                .devices
                .iter()
                .map(|(id, r)| {
                    (
                        id.to_string(),
                        r.keys.iter().copied().collect(),
                        r.last_seen,
                    )
                })
                .collect(),
        }
    }

    pub fn restore(&mut self, state: DedupeState) {
        self.devices = state
            .devices
            .into_iter()
            .map(|(id, keys, last_seen)| {
                (
                    id.into_boxed_str(),
                    Recent {
                        keys: keys.into(),
                        last_seen,
                    },
                )
            })
            .collect();
    }

    fn sweep(&mut self, now: i64) {
        if now < self.last_sweep.saturating_add(60_000) {
            return;
        }
        self.last_sweep = now;
        self.devices
            .retain(|_, r| r.last_seen >= now - FORGET_AFTER_MS);
    }
}
