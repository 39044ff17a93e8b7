//! `anomaly_likelihood(x)`: the general-purpose detector, the one scored on the Numenta
//! Anomaly Benchmark (docs/anomaly-detection.md). Four steps per value:
//!
//! 1. a level shift: the mean of the last [`S`] values against the mean and spread of the
//!    [`W`] values before them, `r = min(1, |shift| / (K sd))`;
//! 2. Numenta's anomaly likelihood: the average of the last [`A`] raw scores against the
//!    mean and variance of that average over the last [`H`] values, through the Gaussian
//!    tail; only the first value of a run of very unlikely ones ("red") keeps its tail;
//!    `score = -ln(tail) / -ln(1e-10)`, so a tail of 1e-4 scores 0.4, the alarm level;
//! 3. Numenta's range check: a value more than [`TOL`] of the range seen so far beyond its
//!    minimum or maximum scores 1;
//! 4. after an alarm the next [`R`] scores are halved, so a second alarm needs a range
//!    break or a far stronger signal.
//!
//! One configuration for every series (the benchmark allows no per-file tuning); 0 for
//! the first [`LEARN`] values. Memory: 3,330 numbers per series. Work: O(1) per value.
//!
//! A value is scored first ([`Likelihood::score`], which changes nothing) and learnt from
//! later ([`Likelihood::update`]); both go through [`Likelihood::step`], so they agree to
//! the bit.

use serde::{Deserialize, Serialize};

use super::models::Verdict;

pub const S: usize = 10;
pub const W: usize = 300;
pub const K: f64 = 4.0;
/// Raw scores are 0 until the reference holds this many values.
const MIN_REF: usize = 20;
pub const A: usize = 20;
pub const H: usize = 3000;
/// The likelihood needs this much history.
const MIN_HIST: usize = 100;
pub const LEARN: u64 = 300;
const VAR_FLOOR: f64 = 0.0003;
pub const RED: f64 = 1e-4;
const YELLOW: f64 = 1e-3;
const TAIL_EPS: f64 = 1e-10;
pub const TOL: f64 = 0.05;
pub const ALARM: f64 = 0.4;
pub const R: u32 = 200;
const DAMP: f64 = 0.5;
/// Running sums are recomputed exactly this often, so rounding does not drift.
pub const RESYNC: u32 = 4096;

/// A fixed-capacity FIFO with a running sum and sum of squares.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ring {
    cap: usize,
    buf: Vec<f64>,
    head: usize,
    s: f64,
    ss: f64,
    ops: u32,
}

/// What a push would do: the sums after it and the value it would evict.
pub struct Pushed {
    n: usize,
    /// The running sum after the push.
    pub s: f64,
    ss: f64,
    old: Option<f64>,
}

impl Pushed {
    fn mean(&self) -> f64 {
        self.s / self.n as f64
    }
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            cap,
            buf: Vec::new(),
            head: 0,
            s: 0.0,
            ss: 0.0,
            ops: 0,
        }
    }

    fn n(&self) -> usize {
        self.buf.len()
    }

    /// The running sum, as kept (not summed again).
    pub fn sum(&self) -> f64 {
        self.s
    }

    /// The values held, in no particular order.
    pub fn values(&self) -> &[f64] {
        &self.buf
    }

    fn mean(&self) -> f64 {
        self.s / self.n() as f64
    }

    /// Population variance.
    fn var(&self) -> f64 {
        let m = self.mean();
        (self.ss / self.n() as f64 - m * m).max(0.0)
    }

    /// The sums after pushing `x`, without pushing.
    pub fn peek(&self, x: f64) -> Pushed {
        let full = self.n() == self.cap;
        let old = full.then(|| self.buf[self.head]);
        let n = if full { self.n() } else { self.n() + 1 };
        if self.ops + 1 == RESYNC {
            // Summed exactly, oldest to newest, as `push` will.
            let (mut s, mut ss) = (0.0, 0.0);
            let skip = usize::from(full);
            for k in skip..self.n() {
                let v = self.buf[(self.head + k) % self.cap];
                s += v;
                ss += v * v;
            }
            s += x;
            ss += x * x;
            return Pushed { n, s, ss, old };
        }
        let (mut s, mut ss) = (self.s, self.ss);
        if let Some(o) = old {
            s -= o;
            ss -= o * o;
        }
        Pushed {
            n,
            s: s + x,
            ss: ss + x * x,
            old,
        }
    }

    /// Appends `x`; returns the value it evicts once full.
    pub fn push(&mut self, x: f64) -> Option<f64> {
        let p = self.peek(x);
        if p.old.is_some() {
            self.buf[self.head] = x;
            self.head = (self.head + 1) % self.cap;
        } else {
            self.buf.push(x);
        }
        self.s = p.s;
        self.ss = p.ss;
        self.ops = (self.ops + 1) % RESYNC;
        p.old
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Likelihood {
    short: Ring,
    reference: Ring,
    avg: Ring,
    hist: Ring,
    i: u64,
    lo: f64,
    hi: f64,
    prev_red: bool,
    cool: u32,
}

impl Default for Likelihood {
    fn default() -> Self {
        Likelihood {
            short: Ring::new(S),
            reference: Ring::new(W),
            avg: Ring::new(A),
            hist: Ring::new(H),
            i: 0,
            lo: f64::MAX,
            hi: f64::MIN,
            prev_red: false,
            cool: 0,
        }
    }
}

/// Everything one value does to the state.
struct Step {
    /// The raw score and the average of raw scores, as pushed.
    raw: f64,
    avg: f64,
    /// The red flag after this value (unchanged during warm-up).
    red: bool,
    score: f64,
}

fn q_tail(z: f64) -> f64 {
    0.5 * libm::erfc(z / std::f64::consts::SQRT_2)
}

impl Likelihood {
    fn step(&self, x: f64) -> Step {
        // 1. Level shift: the short window after x, the reference after what it evicts.
        let short = self.short.peek(x);
        let raw = match short.old {
            Some(old) if self.reference.n() + 1 >= MIN_REF => {
                let r = self.reference.peek(old);
                let m = r.mean();
                let sd = (r.ss / r.n as f64 - m * m).max(0.0).sqrt();
                let d = (short.mean() - m).abs();
                if sd == 0.0 {
                    if d == 0.0 { 0.0 } else { 1.0 }
                } else {
                    (d / (K * sd)).min(1.0)
                }
            }
            _ => 0.0,
        };
        // 2. Likelihood of the averaged raw score against its history.
        let avg = self.avg.peek(raw).mean();
        let mut red = self.prev_red;
        let mut score = 0.0;
        if self.i >= LEARN && self.hist.n() >= MIN_HIST {
            let m = self.hist.mean();
            let v = self.hist.var().max(VAR_FLOOR);
            let mut tail = q_tail((avg - m) / v.sqrt());
            let now_red = tail <= RED;
            if now_red && self.prev_red {
                tail = YELLOW;
            }
            red = now_red;
            score = (-(tail + TAIL_EPS).ln() / -TAIL_EPS.ln()).clamp(0.0, 1.0);
        }
        // 3. Range check against everything seen before x.
        if self.i >= LEARN && self.hi > self.lo {
            let tol = (self.hi - self.lo) * TOL;
            if x > self.hi + tol || x < self.lo - tol {
                score = 1.0;
            }
        }
        // 4. Damped after an alarm.
        if self.cool > 0 {
            score *= DAMP;
        }
        Step {
            raw,
            avg,
            red,
            score,
        }
    }

    pub fn score(&self, x: f64) -> Option<Verdict> {
        let s = self.step(x).score;
        Some(Verdict {
            score: s,
            anomaly: s >= ALARM,
        })
    }

    pub fn update(&mut self, x: f64) {
        let step = self.step(x);
        if let Some(old) = self.short.push(x) {
            self.reference.push(old);
        }
        self.avg.push(step.raw);
        self.hist.push(step.avg);
        self.prev_red = step.red;
        self.lo = self.lo.min(x);
        self.hi = self.hi.max(x);
        if self.cool > 0 {
            self.cool -= 1;
        } else if step.score >= ALARM {
            self.cool = R;
        }
        self.i += 1;
    }

    pub fn size() -> usize {
        (S + W + A + H) * 8 + std::mem::size_of::<Likelihood>()
    }
}
