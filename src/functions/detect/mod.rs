//! Anomaly detectors in SQL. `zscore(vibration) OVER (PARTITION BY device_id)` and its
//! siblings (see [`models`]) are rewritten by the parser, like frames over past windows,
//! into a call of one [`Detect`] function with arguments `(value..., time, key...)`; it keeps
//! one model per key across windows and micro-batches and answers, for each row, a struct
//! `{score, is_anomaly}` (NULL while the key's model warms up, or for a NULL value).
//!
//! A row is scored against the history of its key *before* the row's time, and its value
//! joins the history once a later time arrives for the key. That makes evaluation
//! idempotent, as DataFusion needs (it may evaluate one expression in WHERE and again in
//! the SELECT list): a value at the key's newest time that a call presents again is the
//! same row, not a new one. Rows older than the key's newest time are scored but do not
//! change the history (they arrived after it moved on). Memory per key is fixed by the
//! detector's parameters; keys silent for [`FORGET_AFTER_MS`] of event time are forgotten.
//!
//! [`peer`] is the detector across sensors of one window: an ordinary window function.

pub mod likelihood;
pub mod models;
pub mod peer;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, StructArray};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Fields, Float64Type};
use datafusion::arrow::row::RowConverter;
use datafusion::common::{DataFusionError, Result};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

pub use models::{Kind, Model, Verdict};

use super::keyed::{self, Newest, Rowset};

/// A key with no row for this long (in event time) is forgotten: a week.
pub const FORGET_AFTER_MS: i64 = 7 * 24 * 3600 * 1000;

/// The struct every detector returns.
pub fn verdict_type() -> DataType {
    DataType::Struct(verdict_fields())
}

fn verdict_fields() -> Fields {
    Fields::from(vec![
        Field::new("score", DataType::Float64, true),
        Field::new("is_anomaly", DataType::Boolean, true),
    ])
}

/// Builds the `{score, is_anomaly}` column.
pub fn verdict_array(out: &[Option<Verdict>]) -> ArrayRef {
    let score: Float64Array = out.iter().map(|v| v.map(|v| v.score)).collect();
    let flag: BooleanArray = out.iter().map(|v| v.map(|v| v.anomaly)).collect();
    let nulls = NullBuffer::from(out.iter().map(Option::is_some).collect::<Vec<_>>());
    Arc::new(StructArray::new(
        verdict_fields(),
        vec![Arc::new(score), Arc::new(flag)],
        Some(nulls),
    ))
}

#[derive(Debug)]
pub struct Detect {
    name: String,
    kind: Kind,
    /// How many leading arguments are values (the rest: time, then keys).
    dims: usize,
    signature: Signature,
    state: Arc<Mutex<State>>,
}

impl Detect {
    pub fn new(name: &str, kind: Kind, dims: usize) -> Detect {
        Detect {
            name: name.to_string(),
            kind,
            dims: dims.max(1),
            signature: Signature::variadic_any(Volatility::Volatile),
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    /// The models of every key, for a checkpoint.
    pub fn save(&self) -> DetectState {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        DetectState {
            calls: st.calls,
            newest: st.newest,
            series: st
                .series
                .iter()
                .map(|(k, s)| {
                    (
                        k.to_vec(),
                        SavedSeries {
                            model: s.model.clone(),
                            newest: s.at.time,
                            current: s.at.values.iter().map(|v| v.to_bits()).collect(),
                            used: s.at.used.clone(),
                            current_call: s.at.call,
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn restore(&self, saved: DetectState) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.calls = saved.calls;
        st.newest = saved.newest;
        st.series = saved
            .series
            .into_iter()
            .map(|(k, s)| {
                (
                    k.into_boxed_slice(),
                    Series {
                        model: s.model,
                        at: Newest {
                            time: s.newest,
                            values: s.current.into_iter().map(f64::from_bits).collect(),
                            used: s.used,
                            call: s.current_call,
                        },
                    },
                )
            })
            .collect();
    }

    /// Keys held now, and roughly the bytes their models take (for tests of bounded memory).
    pub fn footprint(&self) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = st
            .series
            .iter()
            .map(|(k, s)| k.len() + s.model.size() + s.at.values.capacity() * 8)
            .sum();
        (st.series.len(), bytes)
    }
}

impl PartialEq for Detect {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for Detect {}
impl Hash for Detect {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

#[derive(Default)]
struct State {
    series: HashMap<Box<[u8]>, Series>,
    converter: Option<RowConverter>,
    calls: u64,
    newest: i64,
    /// What the previous call answered, row by row in the order it scored them.
    memo: Vec<Memo>,
}

/// One answered row: DataFusion may evaluate an expression again over the same rows (a
/// `coalesce` becomes a CASE that names it twice; WHERE and the SELECT list each call it),
/// and the rows before a key's newest time must then get the answers they got, not be
/// scored again against a history that has moved on.
#[derive(Clone, Copy)]
struct Memo {
    key: u64,
    t: i64,
    bits: u64,
    verdict: Option<Verdict>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("series", &self.series.len())
            .finish()
    }
}

/// One key's model, and the values at its newest time (`dims` a row), which join the
/// model when a later time arrives.
struct Series {
    model: Model,
    at: Newest<f64>,
}

/// A [`Detect`] function's state in a checkpoint.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DetectState {
    calls: u64,
    newest: i64,
    series: Vec<(Vec<u8>, SavedSeries)>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedSeries {
    model: Model,
    newest: Option<i64>,
    current: Vec<u64>,
    used: Vec<bool>,
    current_call: u64,
}

impl ScalarUDFImpl for Detect {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.len() < self.dims + 1 {
            return Err(DataFusionError::Plan(
                "a detector needs its value(s) and a time".into(),
            ));
        }
        for t in &arg_types[..self.dims] {
            if !(t.is_numeric() || *t == DataType::Null) {
                return Err(DataFusionError::Plan(format!(
                    "a detector scores numbers, not {t}"
                )));
            }
        }
        let time = &arg_types[self.dims];
        if !keyed::is_time(time) {
            return Err(DataFusionError::Plan(format!(
                "a detector is ordered by a time (window_end, event_time or a TIMESTAMP column), not by a {time}"
            )));
        }
        Ok(verdict_type())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| a.to_array(n))
            .collect::<Result<_>>()?;
        let d = self.dims;
        let values: Vec<ArrayRef> = arrays[..d]
            .iter()
            .map(|a| cast(a, &DataType::Float64))
            .collect::<std::result::Result<_, _>>()?;
        let values: Vec<&Float64Array> = values
            .iter()
            .map(|a| a.as_primitive::<Float64Type>())
            .collect();
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        st.calls += 1;
        let call = st.calls;
        let rows = Rowset::new(&arrays[d], &arrays[d + 1..], &mut st.converter, |e| {
            DataFusionError::Execution(format!("a detector's ORDER BY must be a time: {e}"))
        })?;
        let mut out: Vec<Option<Verdict>> = vec![None; n];
        let mut x = vec![0.0; d];
        // A re-evaluation presents rows the previous call answered, in the same order (or
        // a subset of them): matched with a cursor that only moves forward. The first row
        // not found there shows the call is new rows.
        let previous = std::mem::take(&mut st.memo);
        let mut cursor = 0;
        let mut replaying = true;
        let mut memo = Vec::with_capacity(n);
        for &i in &rows.order {
            let t = rows.times.value(i);
            st.newest = st.newest.max(t);
            // NULLs and non-numbers (NaN, infinities) are not scored and not learnt from.
            let mut ok = true;
            for (k, col) in values.iter().enumerate() {
                ok &= col.is_valid(i) && col.value(i).is_finite();
                x[k] = if col.is_valid(i) { col.value(i) } else { 0.0 };
            }
            if !ok {
                continue;
            }
            let key = rows.key(i);
            let bits = x.iter().fold(0u64, |h, v| h.rotate_left(17) ^ v.to_bits());
            let key_hash = {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                key.hash(&mut h);
                h.finish()
            };
            let known = st
                .series
                .get(key)
                .and_then(|s| s.at.time)
                .is_some_and(|newest| t <= newest);
            if replaying && known {
                let found = previous[cursor..]
                    .iter()
                    .position(|m| m.key == key_hash && m.t == t && m.bits == bits);
                match found {
                    Some(j) => {
                        let m = previous[cursor + j];
                        cursor += j + 1;
                        out[i] = m.verdict;
                        memo.push(m);
                        continue;
                    }
                    None => replaying = false,
                }
            }
            let s = match st.series.get_mut(key) {
                Some(s) => s,
                None => st.series.entry(key.into()).or_insert_with(|| Series {
                    model: self.kind.model(d),
                    at: Newest::default(),
                }),
            };
            let model = &mut s.model;
            s.at.present(call, t, &x, |at, values| {
                for row in values.chunks_exact(d) {
                    model.update(&self.kind, row, at);
                }
            });
            out[i] = s.model.score(&self.kind, &x, t);
            memo.push(Memo {
                key: key_hash,
                t,
                bits,
                verdict: out[i],
            });
        }
        st.memo = memo;

        if call.is_multiple_of(64) {
            let horizon = st.newest.saturating_sub(FORGET_AFTER_MS);
            st.series
                .retain(|_, s| s.at.time.is_some_and(|t| t >= horizon));
        }
        drop(guard);
        Ok(ColumnarValue::Array(verdict_array(&out)))
    }
}
