//! The detectors' mathematics one series at a time, without SQL: hand-computed medians and
//! z-scores, chi-squared quantiles, warm-up, the likelihood detector's alarms, and every
//! model's state across a checkpoint (`src/functions/detect/models.rs`, `likelihood.rs`).

use fleetsql::functions::detect::likelihood::{LEARN, Likelihood, RESYNC, Ring};
use fleetsql::functions::detect::models::{Param, chi2_cdf, median, robust_z};
use fleetsql::functions::detect::{Kind, Model, Verdict};

/// Scores each value against the values before it, as the engine does window by window.
fn run(kind: &Kind, xs: &[f64]) -> Vec<Option<Verdict>> {
    let mut m = kind.model(1);
    xs.iter()
        .enumerate()
        .map(|(t, x)| {
            let v = m.score(kind, &[*x], t as i64);
            m.update(kind, &[*x], t as i64);
            v
        })
        .collect()
}

#[test]
fn median_and_robust_z_by_hand() {
    assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    // values 1..=5: median 3, deviations 2,1,0,1,2, MAD 1: z(10) = 0.6745 * 7.
    let z = robust_z(10.0, [1.0, 2.0, 3.0, 4.0, 5.0].into_iter());
    assert!((z - 0.6745 * 7.0).abs() < 1e-12, "{z}");
}

#[test]
fn chi2_matches_known_quantiles() {
    // 95 % quantiles: 3.841 (1), 5.991 (2), 7.815 (3).
    assert!((chi2_cdf(3.841, 1) - 0.95).abs() < 1e-3);
    assert!((chi2_cdf(5.991, 2) - 0.95).abs() < 1e-3);
    assert!((chi2_cdf(7.815, 3) - 0.95).abs() < 2e-3);
}

#[test]
fn zscore_warms_up_then_scores() {
    let kind = Kind::from_call("zscore", vec![Param::Number(10.0)], vec![]).unwrap();
    let xs = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 5.5, 40.0];
    let out = run(&kind, &xs);
    assert!(out[..10].iter().all(Option::is_none), "{out:?}");
    // history 1..=10: mean 5.5, sd 3.02765: 5.5 scores 0; 40 is z = 11.39.
    assert_eq!(out[10].unwrap().score, 0.0);
    assert!(!out[10].unwrap().anomaly);
    assert!(out[11].unwrap().anomaly);
}

/// A model written to a checkpoint (JSON) and read back goes on exactly as the original.
#[test]
fn every_model_survives_a_checkpoint() {
    let calls = [
        "zscore",
        "robust_zscore",
        "ewma_chart",
        "cusum",
        "spike_and_dip",
        "change_point",
        "anomaly_likelihood",
    ];
    let xs: Vec<f64> = (0..900)
        .map(|i| (i as f64 * 0.37).sin() * 10.0 + (i / 450) as f64 * 30.0)
        .collect();
    for name in calls {
        let kind = Kind::from_call(name, vec![], vec![]).unwrap();
        let mut a = kind.model(1);
        for (t, x) in xs[..500].iter().enumerate() {
            a.update(&kind, &[*x], t as i64);
        }
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Model = serde_json::from_str(&json).unwrap();
        for (t, x) in xs[500..].iter().enumerate() {
            assert_eq!(
                a.score(&kind, &[*x], t as i64),
                b.score(&kind, &[*x], t as i64),
                "{name}"
            );
            a.update(&kind, &[*x], t as i64);
            b.update(&kind, &[*x], t as i64);
        }
    }
}

#[test]
fn likelihood_is_quiet_on_a_learnt_range_then_alarms_on_a_break_of_it() {
    let mut d = Likelihood::default();
    // A sawtooth between 0 and 9: nothing anomalous once learnt.
    for i in 0..2000 {
        let x = (i % 10) as f64;
        let v = d.score(x).unwrap();
        if i < LEARN as usize {
            assert_eq!(v.score, 0.0, "warm-up at {i}");
        } else {
            assert!(!v.anomaly, "false alarm at {i}: {v:?}");
        }
        d.update(x);
    }
    // 9 + 5 % of the range (0.45) is the edge: 9.4 is inside, 9.5 outside.
    assert!(!d.score(9.4).unwrap().anomaly);
    let v = d.score(9.5).unwrap();
    assert_eq!(v.score, 1.0);
    d.update(9.5);
    // Then damped for R values: the same break scores half.
    assert_eq!(d.score(20.0).unwrap().score, 0.5);
}

/// The running sum is what a push predicts, and stays within rounding of an exact sum across
/// the periodic recomputation.
#[test]
fn the_ring_agrees_with_an_exact_sum_across_a_resync() {
    let mut r = Ring::new(7);
    for i in 0..(RESYNC as usize * 2 + 3) {
        let x = (i as f64 * 0.37).sin() * 1e3;
        let predicted = r.peek(x).s;
        r.push(x);
        assert_eq!(predicted, r.sum(), "at {i}");
        let exact: f64 = r.values().iter().sum();
        assert!((exact - r.sum()).abs() < 1e-6, "{exact} vs {}", r.sum());
    }
}
