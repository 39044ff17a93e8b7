//! What the functions with state per key share ([`super::rolling`] and [`super::detect`]):
//! reading their arguments (values, then a time, then the PARTITION BY keys) into rows in
//! time order with a key each, and the values held at each key's newest time.
//!
//! Those held values are what make evaluation idempotent. DataFusion may evaluate one
//! expression twice over the same rows (in WHERE and in the SELECT list, or twice within a
//! CASE), so a value at a key's newest time that a call presents again must be recognised
//! as the same row, not counted as a new one; other values at that time are new rows. The
//! values join the key's history only once a later time arrives.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::common::{DataFusionError, Result};

/// Whether a column of this type can order a frame or a detector.
pub fn is_time(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64
    ) || t.is_integer()
}

/// One call's rows: their times in milliseconds, their keys, and the order to visit them.
pub struct Rowset {
    pub times: Int64Array,
    keys: Option<Rows>,
    /// Rows with a time, by time (the input usually is in order: then sorting is one pass).
    pub order: Vec<usize>,
}

impl Rowset {
    /// Reads `time` and `keys`. The converter is kept across calls by the caller, so a key
    /// has the same bytes in every call (and in a checkpoint). `bad_time` words the error
    /// for a time column that does not convert to milliseconds.
    pub fn new(
        time: &ArrayRef,
        keys: &[ArrayRef],
        converter: &mut Option<RowConverter>,
        bad_time: impl FnOnce(ArrowError) -> DataFusionError,
    ) -> Result<Rowset> {
        let times = cast(time, &DataType::Timestamp(TimeUnit::Millisecond, None))
            .and_then(|t| cast(&t, &DataType::Int64))
            .map_err(bad_time)?;
        let times = times.as_primitive::<Int64Type>().clone();
        if converter.is_none() {
            let fields = keys
                .iter()
                .map(|k| SortField::new(k.data_type().clone()))
                .collect();
            *converter = Some(RowConverter::new(fields)?);
        }
        // Without PARTITION BY every row has the same (empty) key.
        let keys = match converter {
            Some(c) if !keys.is_empty() => Some(c.convert_columns(keys)?),
            _ => None,
        };
        let mut order: Vec<usize> = (0..times.len()).filter(|i| times.is_valid(*i)).collect();
        order.sort_by_key(|i| times.value(*i));
        Ok(Rowset { times, keys, order })
    }

    /// Row `i`'s key, in arrow's row format.
    pub fn key(&self, i: usize) -> &[u8] {
        match &self.keys {
            Some(r) => r.row(i).data(),
            None => &[],
        }
    }
}

/// A value compared bit for bit: a re-evaluation presents exactly the same values.
pub trait SameBits: Copy {
    fn same(&self, other: &Self) -> bool;
}

impl SameBits for f64 {
    fn same(&self, other: &Self) -> bool {
        self.to_bits() == other.to_bits()
    }
}

impl SameBits for Option<f64> {
    fn same(&self, other: &Self) -> bool {
        self.map(f64::to_bits) == other.map(f64::to_bits)
    }
}

/// The values at one key's newest time, a row of a fixed width each.
#[derive(Debug, Default)]
pub struct Newest<T> {
    pub time: Option<i64>,
    pub values: Vec<T>,
    /// Which rows of `values` the call `call` has presented.
    pub used: Vec<bool>,
    pub call: u64,
}

/// Where a row's time falls for its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Before the key's newest time: it came after the key moved on; held nowhere.
    Late,
    /// At the newest time: held (or recognised as held already).
    Newest,
    /// After it (or the key's first row): the row is now the newest.
    Later,
}

impl<T: SameBits> Newest<T> {
    /// Presents `row` at time `t` in call `call`. When it is later than the newest time,
    /// `commit` is given that time and its values first, to add to the key's history.
    pub fn present(
        &mut self,
        call: u64,
        t: i64,
        row: &[T],
        commit: impl FnOnce(i64, &[T]),
    ) -> Arrival {
        let w = row.len().max(1);
        match self.time {
            Some(newest) if t < newest => Arrival::Late,
            Some(newest) if t == newest => {
                if self.call != call {
                    self.call = call;
                    self.used.iter_mut().for_each(|u| *u = false);
                }
                let held = (0..self.used.len()).find(|&j| {
                    !self.used[j]
                        && self.values[j * w..(j + 1) * w]
                            .iter()
                            .zip(row)
                            .all(|(a, b)| a.same(b))
                });
                match held {
                    Some(j) => self.used[j] = true,
                    None => {
                        self.values.extend_from_slice(row);
                        self.used.push(true);
                    }
                }
                Arrival::Newest
            }
            _ => {
                if let Some(previous) = self.time {
                    commit(previous, &self.values);
                }
                self.time = Some(t);
                self.values.clear();
                self.values.extend_from_slice(row);
                self.used.clear();
                self.used.push(true);
                self.call = call;
                Arrival::Later
            }
        }
    }
}
