//! Event-time bookkeeping: the open windows of each windowed query, and a watermark per
//! source.
//!
//! A window closes when the watermark of every stream it reads passes its end. The
//! watermark is per source, not per device: windows aggregate across devices, so they can
//! only close when the source as a whole has moved past them (docs/pipeline-sql.md).
//!
//! TUMBLE and HOP windows share one layout: rows are kept in panes of one slide each, and
//! a closing window takes its panes' batches (Arc clones, not copies), so a row in ten
//! overlapping windows is stored once. SESSION windows are kept per key.

use std::collections::{BTreeMap, HashMap};

use datafusion::arrow::array::{Array, BooleanArray, TimestampMillisecondArray, UInt32Array};
use datafusion::arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::row::{RowConverter, SortField};

use serde::{Deserialize, Serialize};

use crate::durable::checkpoint::Batches;
use crate::pipeline::rewrite::WindowKind;

/// Rows of one closed window execution, per input, each batch with its window's bounds.
#[derive(Debug, Default)]
pub struct Closed {
    pub inputs: Vec<Vec<(i64, i64, RecordBatch)>>,
}

impl Closed {
    pub fn rows(&self) -> usize {
        self.inputs
            .iter()
            .flatten()
            .map(|(_, _, b)| b.num_rows())
            .sum()
    }
}

/// Rows too late for the window they belong to (it has closed).
#[derive(Debug, Default)]
pub struct Late(pub Vec<RecordBatch>);

impl Late {
    pub fn rows(&self) -> usize {
        self.0.iter().map(|b| b.num_rows()).sum()
    }
}

/// The open windows of one query.
pub enum Windows {
    Panes(Panes),
    Sessions(Sessions),
}

impl Windows {
    /// `schemas`: the input streams' schemas (session keys are looked up in the first).
    pub fn new(
        kind: &WindowKind,
        inputs: usize,
        session_keys: Vec<usize>,
        schema: &SchemaRef,
    ) -> Windows {
        match kind {
            WindowKind::Tumble { size } => {
                let s = size.as_millis() as i64;
                Windows::Panes(Panes::new(s, s, inputs))
            }
            WindowKind::Hop { size, slide } => Windows::Panes(Panes::new(
                size.as_millis() as i64,
                slide.as_millis() as i64,
                inputs,
            )),
            WindowKind::Session { gap, .. } => {
                Windows::Sessions(Sessions::new(gap.as_millis() as i64, session_keys, schema))
            }
        }
    }

    /// Assigns rows of input `input` to windows by their event time (column `et`); returns
    /// the rows that were too late for their window.
    pub fn add(&mut self, input: usize, batch: &RecordBatch, et: usize) -> Late {
        match self {
            Windows::Panes(p) => p.add(input, batch, et),
            Windows::Sessions(s) => s.add(batch, et),
        }
    }

    /// Removes and returns the windows whose end is at or before `watermark`, oldest first.
    pub fn close_until(&mut self, watermark: i64) -> Vec<Closed> {
        match self {
            Windows::Panes(p) => p.close_until(watermark),
            Windows::Sessions(s) => s.close_until(watermark),
        }
    }

    /// Every open window, for a drain at shutdown. Windows up to the last one closed
    /// count as closed afterwards (their rows are late), later ones do not: a restart
    /// after a drain goes on from there.
    pub fn close_all(&mut self) -> Vec<Closed> {
        let last_end = match self {
            Windows::Panes(p) => p
                .panes
                .last_key_value()
                .map_or(p.closed, |(k, _)| k.saturating_add(p.size)),
            Windows::Sessions(s) => s
                .open
                .values()
                .flatten()
                .map(|x| x.last.saturating_add(s.gap))
                .max()
                .unwrap_or(s.closed),
        };
        self.close_until(last_end)
    }

    /// The open windows for a checkpoint: their rows go to `batches` under
    /// `<name>-<input>`.
    pub fn save(&self, name: &str, batches: &mut Batches) -> WindowsState {
        let list = |k: usize| format!("{name}-{k}");
        match self {
            Windows::Panes(p) => WindowsState::Panes {
                closed: p.closed,
                panes: p
                    .panes
                    .iter()
                    .map(|(start, inputs)| {
                        let refs = inputs
                            .iter()
                            .enumerate()
                            .map(|(k, bs)| {
                                bs.iter()
                                    .map(|b| batches.add(&list(k), b.clone()))
                                    .collect()
                            })
                            .collect();
                        (*start, refs)
                    })
                    .collect(),
            },
            Windows::Sessions(s) => WindowsState::Sessions {
                closed: s.closed,
                open: s
                    .open
                    .iter()
                    .map(|(key, sessions)| {
                        let sessions = sessions
                            .iter()
                            .map(|x| {
                                let refs = x
                                    .batches
                                    .iter()
                                    .map(|b| batches.add(&list(0), b.clone()))
                                    .collect();
                                (x.start, x.last, refs)
                            })
                            .collect();
                        (key.to_vec(), sessions)
                    })
                    .collect(),
            },
        }
    }

    /// Puts back windows saved by [`Windows::save`] (into windows of the same kind).
    pub fn restore(
        &mut self,
        state: WindowsState,
        name: &str,
        batches: &Batches,
    ) -> Result<(), String> {
        let get = |k: usize, i: usize| {
            batches
                .get(&format!("{name}-{k}"), i)
                .cloned()
                .ok_or_else(|| format!("checkpointed rows {name}-{k}#{i} are missing"))
        };
        match (self, state) {
            (Windows::Panes(p), WindowsState::Panes { closed, panes }) => {
                p.closed = closed;
                p.panes.clear();
                for (start, inputs) in panes {
                    let mut per_input = vec![Vec::new(); p.inputs];
                    for (k, refs) in inputs.into_iter().enumerate().take(p.inputs) {
                        for i in refs {
                            per_input[k].push(get(k, i)?);
                        }
                    }
                    p.panes.insert(start, per_input);
                }
                Ok(())
            }
            (Windows::Sessions(s), WindowsState::Sessions { closed, open }) => {
                s.closed = closed;
                s.open.clear();
                for (key, sessions) in open {
                    let mut list = Vec::new();
                    for (start, last, refs) in sessions {
                        let batches = refs
                            .into_iter()
                            .map(|i| get(0, i))
                            .collect::<Result<_, _>>()?;
                        list.push(Session {
                            start,
                            last,
                            batches,
                        });
                    }
                    s.open.insert(key.into_boxed_slice(), list);
                }
                Ok(())
            }
            _ => Err("the checkpointed windows are of another kind".into()),
        }
    }
}

/// A query's open windows in a checkpoint; rows are referred to by their place in the
/// checkpoint's [`Batches`].
#[derive(Debug, Serialize, Deserialize)]
pub enum WindowsState {
    Panes {
        closed: i64,
        /// Pane start, and per input the rows' batch numbers.
        panes: Vec<(i64, Vec<Vec<usize>>)>,
    },
    Sessions {
        closed: i64,
        /// Key (row format), and its sessions.
        open: Vec<(Vec<u8>, Vec<SessionState>)>,
    },
}

/// A session in a checkpoint: start, last event time, batch numbers.
pub type SessionState = (i64, i64, Vec<usize>);

fn times(batch: &RecordBatch, et: usize) -> Option<&TimestampMillisecondArray> {
    batch
        .column(et)
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
}

/// Rows a pane's trailing small batches are joined into one batch at (see `Panes::put`).
const COALESCE_ROWS: usize = 4096;

/// TUMBLE (slide = size) and HOP windows of one query, as panes of one slide.
pub struct Panes {
    size: i64,
    slide: i64,
    inputs: usize,
    /// Pane start -> batches per input.
    panes: BTreeMap<i64, Vec<Vec<RecordBatch>>>,
    /// Every window ending at or before this has been closed.
    closed: i64,
}

impl Panes {
    pub fn new(size: i64, slide: i64, inputs: usize) -> Panes {
        Panes {
            size,
            slide,
            inputs,
            panes: BTreeMap::new(),
            closed: i64::MIN,
        }
    }

    fn pane_of(&self, t: i64) -> i64 {
        t.div_euclid(self.slide).saturating_mul(self.slide)
    }

    fn put(&mut self, pane: i64, input: usize, batch: RecordBatch) {
        let n = self.inputs;
        let batches = &mut self
            .panes
            .entry(pane)
            .or_insert_with(|| vec![Vec::new(); n])[input];
        batches.push(batch);
        // Under QoS 1 a pane receives a batch per dozen readings: thousands a second, each
        // a step of the window's query at its close. Every so often the small batches at
        // the end are joined into one, once they hold enough rows.
        if batches.len().is_multiple_of(32) {
            let small = batches
                .iter()
                .rev()
                .take_while(|b| b.num_rows() < COALESCE_ROWS)
                .count();
            let from = batches.len() - small;
            let rows: usize = batches[from..].iter().map(|b| b.num_rows()).sum();
            if small > 1 && rows >= COALESCE_ROWS {
                let schema = batches[from].schema();
                if let Ok(joined) = concat_batches(&schema, &batches[from..]) {
                    batches.truncate(from);
                    batches.push(joined);
                }
            }
        }
    }

    /// A row is late when the first window it belongs to has closed; it still counts in
    /// its later windows (HOP) if any is open.
    fn add(&mut self, input: usize, batch: &RecordBatch, et: usize) -> Late {
        let Some(ts) = times(batch, et) else {
            return Late::default();
        };
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        for t in ts.values().iter() {
            let p = self.pane_of(*t);
            lo = lo.min(p);
            hi = hi.max(p);
        }
        if lo == i64::MAX {
            return Late::default();
        }
        let (slide, size, closed) = (self.slide, self.size, self.closed);
        let late = move |p: i64| p.saturating_add(slide) <= closed;
        let kept = move |p: i64| p.saturating_add(size) > closed;
        if lo == hi {
            // The common case: the whole batch belongs to one pane.
            if kept(lo) {
                self.put(lo, input, batch.clone());
            }
            return Late(if late(lo) {
                vec![batch.clone()]
            } else {
                vec![]
            });
        }
        let per_row: Vec<i64> = ts.values().iter().map(|t| self.pane_of(*t)).collect();
        let mut panes = per_row.clone();
        panes.sort_unstable();
        panes.dedup();
        let mut late_rows = Late::default();
        for p in panes {
            let mask: BooleanArray = per_row.iter().map(|r| Some(*r == p)).collect();
            let (is_late, is_kept) = (late(p), kept(p));
            if !is_late && !is_kept {
                continue;
            }
            let Ok(part) = filter_record_batch(batch, &mask) else {
                continue;
            };
            if is_late {
                late_rows.0.push(part.clone());
            }
            if is_kept {
                self.put(p, input, part);
            }
        }
        late_rows
    }

    fn close_until(&mut self, watermark: i64) -> Vec<Closed> {
        let mut out = Vec::new();
        if watermark <= self.closed {
            return out;
        }
        let Some(&first) = self.panes.keys().next() else {
            self.closed = watermark;
            return out;
        };
        // Window starts are multiples of the slide; start from the first window that holds
        // the first pane and is not closed yet.
        let mut s = first.saturating_sub(self.size - self.slide);
        while s.saturating_add(self.size) <= self.closed {
            s += self.slide;
        }
        while s.saturating_add(self.size) <= watermark {
            let end = s + self.size;
            let mut inputs = vec![Vec::new(); self.inputs];
            let mut any = false;
            for (_, per_input) in self.panes.range(s..end) {
                for (i, batches) in per_input.iter().enumerate() {
                    for b in batches {
                        inputs[i].push((s, end, b.clone()));
                        any = true;
                    }
                }
            }
            if any {
                out.push(Closed { inputs });
                s += self.slide;
            } else {
                // A quiet stretch: jump to the first window holding the next pane.
                match self.panes.range(end..).next() {
                    Some((&p, _)) => {
                        s = (s + self.slide).max(p.saturating_sub(self.size - self.slide))
                    }
                    None => break,
                }
            }
        }
        self.closed = watermark;
        // Panes whose last window has closed are done.
        let size = self.size;
        while let Some((&p, _)) = self.panes.first_key_value() {
            if p.saturating_add(size) <= watermark {
                self.panes.pop_first();
            } else {
                break;
            }
        }
        out
    }
}

/// SESSION windows of one query: per key, runs of rows closer than `gap` to each other.
pub struct Sessions {
    gap: i64,
    keys: Vec<usize>,
    converter: Option<RowConverter>,
    open: HashMap<Box<[u8]>, Vec<Session>>,
    /// The watermark at the last close: a row that would form a session already past it
    /// (and joins no open one) is late.
    closed: i64,
}

struct Session {
    start: i64,
    last: i64,
    batches: Vec<RecordBatch>,
}

impl Sessions {
    pub fn new(gap: i64, keys: Vec<usize>, schema: &SchemaRef) -> Sessions {
        let fields = keys
            .iter()
            .map(|k| SortField::new(schema.field(*k).data_type().clone()))
            .collect();
        Sessions {
            gap,
            keys,
            converter: RowConverter::new(fields).ok(),
            open: HashMap::new(),
            closed: i64::MIN,
        }
    }

    fn add(&mut self, batch: &RecordBatch, et: usize) -> Late {
        let Some(ts) = times(batch, et) else {
            return Late::default();
        };
        let Some(conv) = &self.converter else {
            return Late::default();
        };
        let cols: Vec<_> = self.keys.iter().map(|k| batch.column(*k).clone()).collect();
        let Ok(rows) = conv.convert_columns(&cols) else {
            return Late::default();
        };
        let mut groups: HashMap<&[u8], Vec<u32>> = HashMap::new();
        for i in 0..batch.num_rows() {
            groups.entry(rows.row(i).data()).or_default().push(i as u32);
        }
        let gap = self.gap;
        let mut late = Late::default();
        for (key, mut idx) in groups {
            idx.sort_by_key(|i| ts.value(*i as usize));
            // Split the key's rows into runs no more than a gap apart.
            let mut runs: Vec<Vec<u32>> = Vec::new();
            for i in idx {
                let t = ts.value(i as usize);
                match runs.last_mut() {
                    Some(r) if t < ts.value(*r.last().unwrap_or(&i) as usize) + gap => r.push(i),
                    _ => runs.push(vec![i]),
                }
            }
            let sessions = self.open.entry(key.into()).or_default();
            for run in runs {
                let lo = ts.value(run[0] as usize);
                let hi = ts.value(run[run.len() - 1] as usize);
                let (merge, keep): (Vec<Session>, Vec<Session>) = std::mem::take(sessions)
                    .into_iter()
                    .partition(|s| lo < s.last + gap && s.start < hi + gap);
                *sessions = keep;
                let too_late = merge.is_empty() && hi.saturating_add(gap) <= self.closed;
                let Ok(part) = take_record_batch(batch, &UInt32Array::from(run)) else {
                    continue;
                };
                if too_late {
                    late.0.push(part);
                    continue;
                }
                let mut s = Session {
                    start: lo,
                    last: hi,
                    batches: vec![part],
                };
                for m in merge {
                    s.start = s.start.min(m.start);
                    s.last = s.last.max(m.last);
                    s.batches.extend(m.batches);
                }
                sessions.push(s);
            }
        }
        self.open.retain(|_, v| !v.is_empty());
        late
    }

    /// All sessions that ended by the watermark, as one execution: their rows carry their
    /// own session's bounds.
    fn close_until(&mut self, watermark: i64) -> Vec<Closed> {
        let gap = self.gap;
        let mut done: Vec<Session> = Vec::new();
        for sessions in self.open.values_mut() {
            let (closed, open): (Vec<Session>, Vec<Session>) = std::mem::take(sessions)
                .into_iter()
                .partition(|s| s.last.saturating_add(gap) <= watermark);
            *sessions = open;
            done.extend(closed);
        }
        self.open.retain(|_, v| !v.is_empty());
        self.closed = self.closed.max(watermark);
        if done.is_empty() {
            return vec![];
        }
        done.sort_by_key(|s| (s.start, s.last));
        let batches = done
            .into_iter()
            .flat_map(|s| {
                let end = s.last.saturating_add(gap);
                s.batches.into_iter().map(move |b| (s.start, end, b))
            })
            .collect();
        vec![Closed {
            inputs: vec![batches],
        }]
    }
}

/// A source's progress in event time.
#[derive(Debug, Clone)]
pub struct SourceClock {
    delay: i64,
    /// Without rows for this long, event time moves on with the wall clock.
    idle: i64,
    /// Rows further ahead of the engine's clock than this are not windowed.
    max_future: i64,
    max_event: Option<i64>,
    last_rows_at: i64,
}

/// A clock's progress in a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClockState {
    pub max_event: Option<i64>,
    pub last_rows_at: i64,
}

/// The out-of-orderness of a receive-time source: rows of different shards reach the
/// runner up to a flush interval apart.
pub const RECEIVE_TIME_SLACK_MS: i64 = 250;

impl SourceClock {
    /// `delay_ms`: how far the watermark trails the newest event time seen;
    /// `max_future_ms`: how far ahead of the engine's clock a row may be and still count.
    pub fn new(delay_ms: i64, max_future_ms: i64) -> SourceClock {
        SourceClock {
            delay: delay_ms,
            idle: delay_ms + 1000,
            max_future: max_future_ms,
            max_event: None,
            last_rows_at: 0,
        }
    }

    /// Notes the rows of a batch received at `now`. Event time only advances up to `now`:
    /// one device whose clock runs fast would otherwise drag the source's watermark ahead
    /// and make every other device's readings late.
    pub fn observe(&mut self, batch: &RecordBatch, event_time: usize, now: i64) {
        if let Some(ts) = batch
            .column(event_time)
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            && let Some(m) = ts.values().iter().max()
        {
            let m = (*m).min(now);
            self.max_event = Some(self.max_event.map_or(m, |x| x.max(m)));
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

    pub fn state(&self) -> ClockState {
        ClockState {
            max_event: self.max_event,
            last_rows_at: self.last_rows_at,
        }
    }

    /// Takes up a checkpointed clock at `now`. The restart counts as activity: the broker
    /// is about to redeliver what came in meanwhile, and the idle rule must not close the
    /// windows it belongs to first.
    pub fn restore(&mut self, state: &ClockState, now: i64) {
        self.max_event = state.max_event;
        self.last_rows_at = state.last_rows_at.max(now);
    }

    /// Rows with an event time after this, at `now`, are too far ahead to be windowed.
    pub fn future_limit(&self, now: i64) -> i64 {
        now.saturating_add(self.max_future)
    }
}
