//! The detectors' mathematics, one series at a time: each model scores a new value against
//! the history it holds (without changing it), and takes the value into its history once
//! the value's time has passed. Scores are in [0, 1]; each model says when a score is an
//! anomaly. Memory per series is fixed by the parameters (a ring of at most `history`
//! values, or a few numbers).
//!
//! The formulas are written out, with their defaults, in `docs/pipeline-sql.md`
//! ("Anomaly detection"); keep the two in step.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::likelihood::Likelihood;

/// Values a series must have seen before it is scored (fewer if `history` is smaller): a
/// mean and a spread from fewer values are mostly noise.
pub const WARMUP: usize = 10;
/// Most values a detector keeps per series.
pub const MAX_HISTORY: usize = 10_000;

/// Which detector, with its parameters checked.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    ZScore {
        history: usize,
        threshold: f64,
    },
    RobustZScore {
        history: usize,
        threshold: f64,
    },
    EwmaChart {
        lambda: f64,
        threshold: f64,
        alpha: f64,
    },
    Cusum {
        k: f64,
        h: f64,
        alpha: f64,
    },
    SpikeAndDip {
        confidence: f64,
        history: usize,
        mode: Mode,
    },
    ChangePoint {
        history: usize,
        threshold: f64,
    },
    Mahalanobis {
        history: usize,
        confidence: f64,
    },
    /// [`super::likelihood`]: one fixed configuration.
    Likelihood,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Spikes,
    Dips,
    Both,
}

/// A parameter as written in SQL.
#[derive(Debug, Clone)]
pub enum Param {
    Number(f64),
    Text(String),
}

/// Name, parameter names in positional order, and how many value columns it takes.
struct Def {
    name: &'static str,
    params: &'static [&'static str],
    /// Several value columns (named parameters only).
    multi: bool,
}

const DEFS: &[Def] = &[
    Def {
        name: "zscore",
        params: &["history", "threshold"],
        multi: false,
    },
    Def {
        name: "robust_zscore",
        params: &["history", "threshold"],
        multi: false,
    },
    Def {
        name: "ewma_chart",
        params: &["lambda", "threshold", "alpha"],
        multi: false,
    },
    Def {
        name: "cusum",
        params: &["k", "h", "alpha"],
        multi: false,
    },
    Def {
        name: "spike_and_dip",
        params: &["confidence", "history", "mode"],
        multi: false,
    },
    Def {
        name: "change_point",
        params: &["history", "threshold"],
        multi: false,
    },
    Def {
        name: "mahalanobis",
        params: &["history", "confidence"],
        multi: true,
    },
    Def {
        name: "anomaly_likelihood",
        params: &[],
        multi: false,
    },
];

/// Whether `name` (lower case) is a detector function.
pub fn is_detector(name: &str) -> bool {
    DEFS.iter().any(|d| d.name == name)
}

/// Whether the detector takes several value columns.
pub fn is_multi(name: &str) -> bool {
    DEFS.iter().any(|d| d.name == name && d.multi)
}

/// The parameter names of a detector, in positional order.
pub fn param_names(name: &str) -> &'static [&'static str] {
    DEFS.iter()
        .find(|d| d.name == name)
        .map_or(&[], |d| d.params)
}

impl Kind {
    /// Checks a call's parameters: `positional` after the value, then `named`.
    pub fn from_call(
        name: &str,
        positional: Vec<Param>,
        named: Vec<(String, Param)>,
    ) -> Result<Kind, String> {
        let Some(def) = DEFS.iter().find(|d| d.name == name) else {
            return Err(format!("`{name}` is not a detector"));
        };
        if positional.len() > def.params.len() {
            return Err(format!(
                "`{name}` takes at most {} parameter(s) after the value: {}",
                def.params.len(),
                def.params.join(", ")
            ));
        }
        let mut set: Vec<(&str, Param)> = def.params.iter().copied().zip(positional).collect();
        for (n, p) in named {
            let n = n.to_ascii_lowercase();
            let Some(known) = def.params.iter().find(|k| **k == n) else {
                return Err(format!(
                    "`{name}` has no parameter `{n}`; it has: {}",
                    if def.params.is_empty() {
                        "none".to_string()
                    } else {
                        def.params.join(", ")
                    }
                ));
            };
            if set.iter().any(|(k, _)| k == known) {
                return Err(format!("`{n}` is given twice"));
            }
            set.push((known, p));
        }
        let get = |k: &str| set.iter().find(|(n, _)| *n == k).map(|(_, p)| p.clone());
        let num =
            |k: &str, default: f64, ok: &dyn Fn(f64) -> bool, what: &str| -> Result<f64, String> {
                match get(k) {
                    None => Ok(default),
                    Some(Param::Number(v)) if ok(v) => Ok(v),
                    Some(p) => Err(format!("`{k}` of `{name}` must be {what}, not {p:?}")),
                }
            };
        let positive = |v: f64| v > 0.0 && v.is_finite();
        let unit = |v: f64| v > 0.0 && v <= 1.0;
        let history = |default: usize, min: usize| -> Result<usize, String> {
            let v = num(
                "history",
                default as f64,
                &|v| v.fract() == 0.0 && v >= min as f64 && v <= MAX_HISTORY as f64,
                &format!("a whole number from {min} to {MAX_HISTORY}"),
            )?;
            Ok(v as usize)
        };
        let confidence = |default: f64| {
            num(
                "confidence",
                default,
                &|v| v > 0.0 && v < 100.0,
                "a percentage above 0 and below 100",
            )
        };
        Ok(match name {
            "zscore" => Kind::ZScore {
                history: history(100, 2)?,
                threshold: num("threshold", 3.0, &positive, "a positive number")?,
            },
            "robust_zscore" => Kind::RobustZScore {
                history: history(100, 3)?,
                threshold: num("threshold", 3.5, &positive, "a positive number")?,
            },
            "ewma_chart" => Kind::EwmaChart {
                lambda: num("lambda", 0.2, &unit, "in (0, 1]")?,
                threshold: num("threshold", 3.0, &positive, "a positive number")?,
                alpha: num("alpha", 0.01, &unit, "in (0, 1]")?,
            },
            "cusum" => Kind::Cusum {
                k: num("k", 0.5, &|v| v >= 0.0 && v.is_finite(), "zero or more")?,
                h: num("h", 5.0, &positive, "a positive number")?,
                alpha: num("alpha", 0.01, &unit, "in (0, 1]")?,
            },
            "spike_and_dip" => Kind::SpikeAndDip {
                confidence: confidence(95.0)?,
                history: history(120, 2)?,
                mode: match get("mode") {
                    None => Mode::Both,
                    Some(Param::Text(t)) => match t.to_ascii_lowercase().as_str() {
                        "spikes" => Mode::Spikes,
                        "dips" => Mode::Dips,
                        "spikesanddips" | "spikes_and_dips" => Mode::Both,
                        _ => {
                            return Err(format!(
                                "`mode` is 'spikes', 'dips' or 'spikesanddips', not '{t}'"
                            ));
                        }
                    },
                    Some(p) => {
                        return Err(format!(
                            "`mode` is 'spikes', 'dips' or 'spikesanddips', not {p:?}"
                        ));
                    }
                },
            },
            "change_point" => Kind::ChangePoint {
                history: history(40, 4)?,
                threshold: num("threshold", 5.0, &positive, "a positive number")?,
            },
            "mahalanobis" => Kind::Mahalanobis {
                history: history(100, 3)?,
                confidence: confidence(99.9)?,
            },
            "anomaly_likelihood" => Kind::Likelihood,
            _ => unreachable!("every name in DEFS has a case"),
        })
    }

    /// A fresh model for one series of `dims` values.
    pub fn model(&self, dims: usize) -> Model {
        match self {
            Kind::ZScore { history, .. }
            | Kind::RobustZScore { history, .. }
            | Kind::SpikeAndDip { history, .. }
            | Kind::ChangePoint { history, .. } => Model::Ring(Ring::new(*history)),
            Kind::Mahalanobis { history, .. } => Model::Ring(Ring::new(*history * dims)),
            Kind::EwmaChart { .. } => Model::Ewma(Ewma::default()),
            Kind::Cusum { .. } => Model::Cusum(Cusum::default()),
            Kind::Likelihood => Model::Likelihood(Box::default()),
        }
    }
}

/// One series' state; which variant goes with which [`Kind`] is fixed by [`Kind::model`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Model {
    Ring(Ring),
    Ewma(Ewma),
    Cusum(Cusum),
    Likelihood(Box<Likelihood>),
}

/// What a detector says of one value: its score, and whether that is an anomaly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub score: f64,
    pub anomaly: bool,
}

impl Model {
    /// Scores `x` (`dims` values for a multi-column detector) against the history; `None`
    /// while warming up.
    pub fn score(&self, kind: &Kind, x: &[f64], _t: i64) -> Option<Verdict> {
        match (self, kind) {
            (Model::Ring(r), Kind::ZScore { threshold, .. }) => {
                if r.len() < WARMUP.min(r.cap) {
                    return None;
                }
                let (mean, sd) = mean_sd(r.iter());
                Some(two_sided(standardise(x[0], mean, sd), *threshold))
            }
            (Model::Ring(r), Kind::RobustZScore { threshold, .. }) => {
                if r.len() < WARMUP.min(r.cap) {
                    return None;
                }
                Some(two_sided(robust_z(x[0], r.iter()), *threshold))
            }
            (
                Model::Ewma(e),
                Kind::EwmaChart {
                    lambda, threshold, ..
                },
            ) => {
                if e.n < WARMUP as u64 {
                    return None;
                }
                let chart = lambda * x[0] + (1.0 - lambda) * e.chart;
                let spread = e.var.sqrt() * (lambda / (2.0 - lambda)).sqrt();
                Some(two_sided(standardise(chart, e.mean, spread), *threshold))
            }
            (Model::Cusum(c), Kind::Cusum { k, h, .. }) => {
                if c.base.n < WARMUP as u64 {
                    return None;
                }
                let (up, down) = c.sums(x[0], *k);
                let s = up.max(down);
                Some(Verdict {
                    score: (s / h).min(1.0),
                    anomaly: s >= *h,
                })
            }
            (
                Model::Ring(r),
                Kind::SpikeAndDip {
                    confidence, mode, ..
                },
            ) => {
                if r.len() < WARMUP.min(r.cap) {
                    return None;
                }
                let (mut above, mut below) = (0usize, 0usize);
                for v in r.iter() {
                    above += (v >= x[0]) as usize;
                    below += (v <= x[0]) as usize;
                }
                // Conformal p-values: the share of history at least as extreme, counting x.
                let n = r.len() as f64 + 1.0;
                let spike = 1.0 - (above as f64 + 1.0) / n;
                let dip = 1.0 - (below as f64 + 1.0) / n;
                let score = match mode {
                    Mode::Spikes => spike,
                    Mode::Dips => dip,
                    Mode::Both => spike.max(dip),
                };
                Some(Verdict {
                    score,
                    anomaly: score >= confidence / 100.0,
                })
            }
            (Model::Ring(r), Kind::ChangePoint { threshold, .. }) => {
                // The history's older half against its newer half, which ends with x.
                if r.len() + 1 < r.cap {
                    return None;
                }
                let all: Vec<f64> = r.iter().skip(r.len() + 1 - r.cap).chain([x[0]]).collect();
                let (a, b) = all.split_at(all.len() / 2);
                let (ma, sa) = mean_sd(a.iter().copied());
                let (mb, sb) = mean_sd(b.iter().copied());
                let se = (sa * sa / a.len() as f64 + sb * sb / b.len() as f64).sqrt();
                Some(two_sided(standardise(mb, ma, se), *threshold))
            }
            (Model::Ring(r), Kind::Mahalanobis { confidence, .. }) => {
                let d = x.len();
                let n = r.len() / d;
                if n < WARMUP.max(d + 2).min(r.cap / d) {
                    return None;
                }
                let q = mahalanobis2(x, r, d)?;
                let score = chi2_cdf(q, d);
                Some(Verdict {
                    score,
                    anomaly: score >= confidence / 100.0,
                })
            }
            (Model::Likelihood(m), Kind::Likelihood) => m.score(x[0]),
            _ => None,
        }
    }

    /// Takes `x` into the history (after it was scored).
    pub fn update(&mut self, kind: &Kind, x: &[f64], _t: i64) {
        match (self, kind) {
            (Model::Ring(r), _) => {
                for v in x {
                    r.push(*v);
                }
            }
            (Model::Ewma(e), Kind::EwmaChart { lambda, alpha, .. }) => {
                e.chart = if e.n == 0 {
                    x[0]
                } else {
                    lambda * x[0] + (1.0 - lambda) * e.chart
                };
                e.add(x[0], *alpha);
            }
            (Model::Cusum(c), Kind::Cusum { k, h, alpha }) => {
                if c.base.n >= WARMUP as u64 {
                    let (up, down) = c.sums(x[0], *k);
                    // After an alarm the sums restart: the next alarm needs new evidence.
                    if up.max(down) >= *h {
                        (c.up, c.down) = (0.0, 0.0);
                    } else {
                        (c.up, c.down) = (up, down);
                    }
                }
                c.base.add(x[0], *alpha);
            }
            (Model::Likelihood(m), Kind::Likelihood) => m.update(x[0]),
            _ => {}
        }
    }

    /// Roughly the bytes this model holds.
    pub fn size(&self) -> usize {
        let held = match self {
            Model::Ring(r) => r.values.capacity() * 8,
            Model::Likelihood(_) => Likelihood::size(),
            _ => 0,
        };
        held + std::mem::size_of::<Model>()
    }
}

/// The last `cap` values of a series.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ring {
    cap: usize,
    values: VecDeque<f64>,
}

impl Ring {
    fn new(cap: usize) -> Ring {
        Ring {
            cap,
            values: VecDeque::new(),
        }
    }
    fn len(&self) -> usize {
        self.values.len()
    }
    fn iter(&self) -> impl Iterator<Item = f64> + Clone + '_ {
        self.values.iter().copied()
    }
    fn push(&mut self, v: f64) {
        if self.values.len() == self.cap {
            self.values.pop_front();
        }
        self.values.push_back(v);
    }
}

/// An exponentially weighted mean and variance.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ewma {
    n: u64,
    mean: f64,
    var: f64,
    /// The EWMA chart's statistic.
    chart: f64,
}

impl Ewma {
    fn add(&mut self, x: f64, alpha: f64) {
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            // West's incremental form of the weighted mean and variance.
            let d = x - self.mean;
            self.mean += alpha * d;
            self.var = (1.0 - alpha) * (self.var + alpha * d * d);
        }
        self.n += 1;
    }
}

/// Two one-sided cumulative sums of standardised values, over an EWMA baseline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cusum {
    base: Ewma,
    up: f64,
    down: f64,
}

impl Cusum {
    fn sums(&self, x: f64, k: f64) -> (f64, f64) {
        let z = standardise(x, self.base.mean, self.base.var.sqrt());
        let z = z.clamp(-1e6, 1e6);
        ((self.up + z - k).max(0.0), (self.down - z - k).max(0.0))
    }
}

/// `(x - mean) / spread`, with a spread of zero read as: the same is normal, anything else
/// is infinitely far.
pub fn standardise(x: f64, mean: f64, spread: f64) -> f64 {
    if spread > 0.0 && spread.is_finite() {
        (x - mean) / spread
    } else if x == mean {
        0.0
    } else {
        f64::INFINITY.copysign(x - mean)
    }
}

/// Score of a standard normal statistic: the two-sided confidence that `z` is not noise,
/// erf(|z| / sqrt 2) = 2 Phi(|z|) - 1; anomalous from `threshold` on.
pub fn two_sided(z: f64, threshold: f64) -> Verdict {
    Verdict {
        score: normal_confidence(z),
        anomaly: z.abs() >= threshold,
    }
}

pub fn normal_confidence(z: f64) -> f64 {
    if z.is_infinite() {
        1.0
    } else {
        libm::erf(z.abs() / std::f64::consts::SQRT_2)
    }
}

/// Mean and sample standard deviation (two passes: exact for any offset).
pub fn mean_sd(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let (mut n, mut sum) = (0usize, 0.0);
    for v in values.clone() {
        n += 1;
        sum += v;
    }
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = sum / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let ss: f64 = values.map(|v| (v - mean) * (v - mean)).sum();
    (mean, (ss / (n - 1) as f64).sqrt())
}

/// The median (of an even count, the mean of the two middle values); reorders `v`.
pub fn median(v: &mut [f64]) -> f64 {
    let n = v.len();
    let mid = n / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    let m = *m;
    if n % 2 == 1 {
        m
    } else {
        // The largest of the lower half.
        let lower = v[..mid].iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lower + m) / 2.0
    }
}

/// Iglewicz and Hoaglin's modified z-score, 0.6745 (x - median) / MAD; when more than half
/// of the values are equal (MAD = 0), the mean absolute deviation stands in, scaled to match
/// a standard deviation of normal data (1.2533).
pub fn robust_z(x: f64, values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    let med = median(&mut v);
    let mut dev: Vec<f64> = v.iter().map(|a| (a - med).abs()).collect();
    let mean_ad = dev.iter().sum::<f64>() / dev.len() as f64;
    let mad = median(&mut dev);
    if mad > 0.0 {
        0.6745 * (x - med) / mad
    } else {
        standardise(x, med, 1.2533 * mean_ad)
    }
}

/// Squared Mahalanobis distance of `x` from the rows held in `ring` (`d` values a row),
/// with the sample covariance; a small ridge keeps a degenerate covariance invertible.
fn mahalanobis2(x: &[f64], ring: &Ring, d: usize) -> Option<f64> {
    let values: Vec<f64> = ring.iter().collect();
    let n = values.len() / d;
    let mut mean = vec![0.0; d];
    for row in values.chunks_exact(d) {
        for (m, v) in mean.iter_mut().zip(row) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![0.0; d * d];
    for row in values.chunks_exact(d) {
        for i in 0..d {
            for j in 0..=i {
                cov[i * d + j] += (row[i] - mean[i]) * (row[j] - mean[j]) / (n - 1) as f64;
            }
        }
    }
    match distance2(x, &mean, &cov, d) {
        Some(q) => Some(q),
        None => {
            // A degenerate covariance (a constant column, or columns in lockstep): a ridge
            // of a billionth of the mean variance makes it invertible.
            let trace: f64 = (0..d).map(|i| cov[i * d + i]).sum();
            let ridge = (trace / d as f64).max(f64::MIN_POSITIVE) * 1e-9;
            for i in 0..d {
                cov[i * d + i] += ridge;
            }
            distance2(x, &mean, &cov, d)
        }
    }
}

/// Cholesky, L L^T = cov, then L y = x - mean: the squared distance is |y|^2. `None` when
/// `cov` is not positive definite.
fn distance2(x: &[f64], mean: &[f64], cov: &[f64], d: usize) -> Option<f64> {
    let mut l = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            if i == j {
                let v = cov[i * d + i] - s;
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i * d + j] = v.sqrt();
            } else {
                l[i * d + j] = (cov[i * d + j] - s) / l[j * d + j];
            }
        }
    }
    let mut y = vec![0.0; d];
    for i in 0..d {
        let s: f64 = (0..i).map(|k| l[i * d + k] * y[k]).sum();
        y[i] = (x[i] - mean[i] - s) / l[i * d + i];
    }
    let q: f64 = y.iter().map(|v| v * v).sum();
    Some(if q.is_finite() { q } else { f64::INFINITY })
}

/// P(chi-square with `d` degrees of freedom <= q): exact for 1 and 2, Wilson and
/// Hilferty's normal approximation above.
pub fn chi2_cdf(q: f64, d: usize) -> f64 {
    if q.is_infinite() {
        return 1.0;
    }
    match d {
        1 => libm::erf((q / 2.0).sqrt()),
        2 => 1.0 - (-q / 2.0).exp(),
        _ => {
            let d = d as f64;
            let z = ((q / d).cbrt() - (1.0 - 2.0 / (9.0 * d))) / (2.0 / (9.0 * d)).sqrt();
            0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
        }
    }
}
