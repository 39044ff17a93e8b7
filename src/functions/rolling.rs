//! Aggregates over a frame that reaches back across windows and micro-batches:
//! `avg(x) OVER (PARTITION BY device_id RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND
//! CURRENT ROW)` is rewritten by the parser into a call of one [`Rolling`] function with
//! arguments `(value, time, key...)`.
//!
//! State is kept incrementally, per key, in bounded memory:
//! - a RANGE frame keeps at most [`RANGE_BUCKETS`] + 1 summaries per key (count, mean, M2,
//!   min, max of the values in a time bucket of `range / RANGE_BUCKETS`); a bucket counts
//!   while any of it lies inside the frame, so the frame may reach back by up to one bucket
//!   more than asked (0.4 %). Keys silent for longer than the range are forgotten.
//! - a ROWS frame keeps the last N + 1 values per key, exactly.
//!
//! Evaluation is idempotent: DataFusion may evaluate one expression twice (in WHERE and in
//! the SELECT list), and a window's results may be recomputed after a restart. Values at
//! a key's newest time are kept apart until a later time arrives; a call that presents
//! values already held for that time (all of them, or the subset a WHERE let through) is
//! a re-evaluation and adds nothing, while other values at that time are new rows and
//! count. (So one device sending the very same value twice at the same millisecond counts
//! once: a duplicate.) Rows older than the key's newest are answered against the state but not added
//! to it (they arrived after the frame moved on).

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::arrow::row::RowConverter;
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::keyed::{self, Arrival, Newest, Rowset};
use crate::pipeline::rewrite::{Frame, RollingFn};

/// Buckets per RANGE frame.
pub const RANGE_BUCKETS: i64 = 256;

#[derive(Debug)]
pub struct Rolling {
    name: String,
    func: RollingFn,
    frame: Frame,
    signature: Signature,
    state: Arc<Mutex<State>>,
}

impl Rolling {
    pub fn new(name: &str, func: RollingFn, frame: Frame) -> Rolling {
        Rolling {
            name: name.to_string(),
            func,
            frame,
            signature: Signature::variadic_any(Volatility::Volatile),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// The state across windows, for a checkpoint.
    pub fn save(&self) -> RollingState {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        RollingState {
            calls: st.calls,
            newest: st.newest,
            keys: st
                .keys
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_vec(),
                        SavedKey {
                            past: v.past.iter().map(|(t, s)| (*t, s.save())).collect(),
                            newest: v.at.time,
                            current: v.at.values.iter().map(|x| x.map(f64::to_bits)).collect(),
                            current_call: v.at.call,
                            used: v.at.used.clone(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Takes up checkpointed state. Keys are in arrow's row format, which the converter
    /// built at the next call reproduces from the same key types.
    pub fn restore(&self, saved: RollingState) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.calls = saved.calls;
        st.newest = saved.newest;
        st.keys = saved
            .keys
            .into_iter()
            .map(|(k, v)| {
                (
                    k.into_boxed_slice(),
                    KeyState {
                        past: v
                            .past
                            .into_iter()
                            .map(|(t, s)| (t, Summary::load(s)))
                            .collect(),
                        at: Newest {
                            time: v.newest,
                            values: v
                                .current
                                .into_iter()
                                .map(|x| x.map(f64::from_bits))
                                .collect(),
                            used: v.used,
                            call: v.current_call,
                        },
                    },
                )
            })
            .collect();
    }

    /// Keys held now (for tests of bounded memory).
    pub fn keys(&self) -> usize {
        self.state.lock().map(|s| s.keys.len()).unwrap_or(0)
    }
}

impl PartialEq for Rolling {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for Rolling {}
impl Hash for Rolling {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

#[derive(Default)]
struct State {
    keys: HashMap<Box<[u8]>, KeyState>,
    converter: Option<RowConverter>,
    calls: u64,
    newest: i64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Running summary of some values: count, mean and M2 (Welford), min, max.
#[derive(Debug, Clone, Copy)]
struct Summary {
    n: u64,
    mean: f64,
    m2: f64,
    min: f64,
    max: f64,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            n: 0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Summary {
    /// Floats as their bits: JSON has no infinities or NaN.
    fn save(&self) -> [u64; 5] {
        [
            self.n,
            self.mean.to_bits(),
            self.m2.to_bits(),
            self.min.to_bits(),
            self.max.to_bits(),
        ]
    }

    fn load(s: [u64; 5]) -> Summary {
        Summary {
            n: s[0],
            mean: f64::from_bits(s[1]),
            m2: f64::from_bits(s[2]),
            min: f64::from_bits(s[3]),
            max: f64::from_bits(s[4]),
        }
    }

    fn add(&mut self, v: f64) {
        self.n += 1;
        let d = v - self.mean;
        self.mean += d / self.n as f64;
        self.m2 += d * (v - self.mean);
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// Chan et al.'s parallel merge: stable where sum-of-squares is not.
    fn merge(&mut self, o: &Summary) {
        if o.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *o;
            return;
        }
        let n = self.n + o.n;
        let d = o.mean - self.mean;
        self.mean += d * o.n as f64 / n as f64;
        self.m2 += o.m2 + d * d * (self.n as f64) * (o.n as f64) / n as f64;
        self.n = n;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }

    fn result(&self, f: RollingFn) -> Option<f64> {
        match f {
            RollingFn::Count => Some(self.n as f64),
            _ if self.n == 0 => None,
            RollingFn::Avg => Some(self.mean),
            RollingFn::Sum => Some(self.mean * self.n as f64),
            RollingFn::Min => Some(self.min),
            RollingFn::Max => Some(self.max),
            RollingFn::Stddev if self.n < 2 => None,
            RollingFn::Stddev => Some((self.m2 / (self.n - 1) as f64).sqrt()),
        }
    }
}

/// A [`Rolling`] function's state in a checkpoint.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RollingState {
    calls: u64,
    newest: i64,
    keys: Vec<(Vec<u8>, SavedKey)>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedKey {
    past: Vec<(i64, [u64; 5])>,
    newest: Option<i64>,
    current: Vec<Option<u64>>,
    current_call: u64,
    used: Vec<bool>,
}

#[derive(Default)]
struct KeyState {
    /// Committed past: (bucket start, summary) for RANGE, one entry per row for ROWS.
    past: VecDeque<(i64, Summary)>,
    /// The newest time seen and the values at it (nulls included, for matching), not yet
    /// in `past`.
    at: Newest<Option<f64>>,
}

/// Adds the values at time `t` to a key's committed past.
fn commit(past: &mut VecDeque<(i64, Summary)>, frame: Frame, t: i64, values: &[Option<f64>]) {
    match frame {
        Frame::Range(r) => {
            let width = (r.as_millis() as i64 / RANGE_BUCKETS).max(1);
            let b = t.div_euclid(width) * width;
            for v in values.iter().flatten() {
                match past.back_mut() {
                    Some((s, sum)) if *s == b => sum.add(*v),
                    _ => {
                        let mut s = Summary::default();
                        s.add(*v);
                        past.push_back((b, s));
                    }
                }
            }
        }
        Frame::Rows(n) => {
            for v in values.iter().flatten() {
                let mut s = Summary::default();
                s.add(*v);
                past.push_back((t, s));
            }
            while past.len() as u64 > n {
                past.pop_front();
            }
        }
    }
}

impl KeyState {
    /// Drops buckets entirely before `t - range`.
    fn evict(&mut self, frame: Frame, t: i64) {
        if let Frame::Range(r) = frame {
            let width = (r.as_millis() as i64 / RANGE_BUCKETS).max(1);
            let from = t - r.as_millis() as i64;
            while let Some((s, _)) = self.past.front() {
                if s + width <= from {
                    self.past.pop_front();
                } else {
                    break;
                }
            }
        }
    }

    /// The frame ending at `t` (the newest time), including the current values.
    fn summary(&self, frame: Frame, extra: Option<f64>) -> Summary {
        let mut s = Summary::default();
        let rows_cap = match frame {
            Frame::Rows(n) => Some(n as usize + 1),
            Frame::Range(_) => None,
        };
        let mut current = Summary::default();
        for v in self.at.values.iter().flatten().chain(extra.as_ref()) {
            current.add(*v);
        }
        match rows_cap {
            None => {
                for (_, p) in &self.past {
                    s.merge(p);
                }
            }
            Some(cap) => {
                let room = cap.saturating_sub(current.n as usize);
                for (_, p) in self.past.iter().rev().take(room) {
                    s.merge(p);
                }
            }
        }
        s.merge(&current);
        s
    }
}

impl ScalarUDFImpl for Rolling {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.len() < 2 {
            return Err(DataFusionError::Plan(
                "a frame over past windows needs a value and a time".into(),
            ));
        }
        if !keyed::is_time(&arg_types[1]) {
            return Err(DataFusionError::Plan(format!(
                "a frame over past windows is ordered by a time (window_end, event_time or a TIMESTAMP column), not by a {}",
                arg_types[1]
            )));
        }
        if !(arg_types[0].is_numeric() || arg_types[0] == DataType::Null) {
            return Err(DataFusionError::Plan(format!(
                "a frame over past windows aggregates numbers, not {}",
                arg_types[0]
            )));
        }
        Ok(match self.func {
            RollingFn::Count => DataType::Int64,
            _ => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<_>>()?;
        let values = cast(&arrays[0], &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        st.calls += 1;
        let call = st.calls;
        let rows = Rowset::new(&arrays[1], &arrays[2..], &mut st.converter, |e| {
            DataFusionError::Execution(format!(
                "the ORDER BY of a frame over past windows must be a time: {e}"
            ))
        })?;
        let mut out: Vec<Option<f64>> = vec![None; n];
        let frame = self.frame;
        for &i in &rows.order {
            let t = rows.times.value(i);
            let v = values.is_valid(i).then(|| values.value(i));
            st.newest = st.newest.max(t);
            let key = rows.key(i);
            let ks = match st.keys.get_mut(key) {
                Some(ks) => ks,
                None => st.keys.entry(key.into()).or_default(),
            };
            let past = &mut ks.past;
            let summary = match ks
                .at
                .present(call, t, &[v], |at, values| commit(past, frame, at, values))
            {
                // Late for this key: answer against the frame, remember nothing.
                Arrival::Late => ks.summary(frame, v),
                Arrival::Newest => ks.summary(frame, None),
                Arrival::Later => {
                    ks.evict(frame, t);
                    ks.summary(frame, None)
                }
            };
            out[i] = summary.result(self.func);
        }

        // Forget keys that fell out of every frame (RANGE only: ROWS frames have no age).
        if let Frame::Range(r) = frame
            && call.is_multiple_of(64)
        {
            let horizon = st.newest - r.as_millis() as i64;
            st.keys
                .retain(|_, k| k.at.time.is_some_and(|t| t >= horizon));
        }

        let array: ArrayRef = match self.func {
            RollingFn::Count => Arc::new(
                out.iter()
                    .map(|v| v.map(|v| v as i64))
                    .collect::<Int64Array>(),
            ),
            _ => Arc::new(out.into_iter().collect::<Float64Array>()),
        };
        Ok(ColumnarValue::Array(array))
    }
}
