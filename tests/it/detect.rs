//! The anomaly detectors as users write them in SQL, through the engine's own runner
//! (`Local`): each detector's scores against values computed here from the textbook
//! formulas (written independently of the engine's code), state carried across windows,
//! bounded memory with many keys, and the detector across sensors of one window.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::logical_expr::ScalarUDF;
use datafusion::prelude::SessionContext;
use fleetsql::functions::detect::{Detect, FORGET_AFTER_MS, Kind, models::Param};

use crate::util::*;

/// A per-reading pipeline scoring `value` with `call` (which names the detector and its
/// parameters; `OVER (PARTITION BY device_id)` is added).
fn pipeline(call: &str, columns: &str) -> String {
    format!(
        "CREATE TABLE t ({columns}, ts BIGINT)
           WITH (connector = 'mqtt', type = 'source', topic = 's/{{device_id}}', event_time = 'ts');
         CREATE TABLE out WITH (connector = 'parquet');
         INSERT INTO out
         SELECT device_id, ts,
                {call} OVER (PARTITION BY device_id)['score'] AS score,
                {call} OVER (PARTITION BY device_id)['is_anomaly'] AS anomaly
         FROM t;"
    )
}

/// Runs `payloads` (one reading each, device `d`, ts 1, 2, ...) and returns each reading's
/// (score, anomaly) in input order.
fn scores(sql: &str, payloads: &[String]) -> Vec<(Option<f64>, Option<bool>)> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.sql");
    std::fs::write(&file, sql).unwrap();
    runtime().block_on(async {
        let mut local = local(&file).await;
        for (i, p) in payloads.iter().enumerate() {
            let ts = i as i64 + 1;
            let body = format!("{{{p}, \"ts\": {ts}}}");
            local.message("s/d", body.as_bytes(), ts).await;
        }
        local.finish().await;
        let mut rows: Vec<(i64, Option<f64>, Option<bool>)> = Vec::new();
        for b in local.table("out").unwrap() {
            let ts = b
                .column_by_name("ts")
                .unwrap()
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            let s = b
                .column_by_name("score")
                .unwrap()
                .as_primitive::<Float64Type>();
            let a = b.column_by_name("anomaly").unwrap().as_boolean();
            for i in 0..b.num_rows() {
                rows.push((
                    ts.value(i),
                    s.is_valid(i).then(|| s.value(i)),
                    a.is_valid(i).then(|| a.value(i)),
                ));
            }
        }
        rows.sort_by_key(|r| r.0);
        assert_eq!(rows.len(), payloads.len(), "one row a reading");
        rows.into_iter().map(|(_, s, a)| (s, a)).collect()
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn values(xs: &[f64]) -> Vec<String> {
    xs.iter().map(|x| format!("\"value\": {x}")).collect()
}

/// erf(|z| / sqrt 2): the two-sided normal confidence the z-type detectors score.
fn confidence(z: f64) -> f64 {
    if z.is_infinite() {
        1.0
    } else {
        libm::erf(z.abs() / std::f64::consts::SQRT_2)
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn sample_sd(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn close(a: Option<f64>, b: f64, what: &str) {
    let a = a.unwrap_or_else(|| panic!("{what}: NULL, expected {b}"));
    assert!(
        (a - b).abs() <= 1e-9 * b.abs().max(1.0),
        "{what}: {a}, expected {b}"
    );
}

/// A test series: a slow wave with noise-like wiggles, then a spike and a level shift.
fn series() -> Vec<f64> {
    let mut xs: Vec<f64> = (0..40)
        .map(|i| 10.0 + (i as f64 * 0.7).sin() + 0.3 * ((i * 7 % 5) as f64))
        .collect();
    xs.push(25.0);
    xs.extend((0..25).map(|i| 14.0 + 0.2 * (i % 3) as f64));
    xs
}

#[test]
fn zscore_matches_the_formula_over_its_history() {
    let xs = series();
    let got = scores(
        &pipeline("zscore(value, 20, 3)", "value DOUBLE"),
        &values(&xs),
    );
    for (i, (s, a)) in got.iter().enumerate() {
        if i < 10 {
            assert_eq!(*s, None, "warm-up at {i}");
            continue;
        }
        let h = &xs[i.saturating_sub(20)..i];
        let z = (xs[i] - mean(h)) / sample_sd(h);
        close(*s, confidence(z), &format!("zscore at {i}"));
        assert_eq!(*a, Some(z.abs() >= 3.0), "flag at {i}");
    }
    assert_eq!(got[40].1, Some(true), "the spike is flagged");
    assert_eq!(got[30].1, Some(false));
}

#[test]
fn robust_zscore_uses_median_and_mad() {
    let xs = series();
    let got = scores(
        &pipeline("robust_zscore(value, history => 15)", "value DOUBLE"),
        &values(&xs),
    );
    for (i, (s, a)) in got.iter().enumerate().skip(10) {
        let h = &xs[i.saturating_sub(15)..i];
        let med = median(h);
        let mad = median(&h.iter().map(|v| (v - med).abs()).collect::<Vec<_>>());
        let z = 0.6745 * (xs[i] - med) / mad;
        close(*s, confidence(z), &format!("robust z at {i}"));
        assert_eq!(*a, Some(z.abs() >= 3.5), "flag at {i}");
    }
    // By hand: history 1..=5 (median 3, MAD 1): 10 is 0.6745 * 7 = 4.72 away.
    let hand = scores(
        &pipeline("robust_zscore(value, 5)", "value DOUBLE"),
        &values(&[1.0, 2.0, 3.0, 4.0, 5.0, 10.0]),
    );
    close(hand[5].0, confidence(0.6745 * 7.0), "robust z by hand");
    assert_eq!(hand[5].1, Some(true));
}

#[test]
fn ewma_chart_and_cusum_follow_their_recurrences() {
    let xs = series();
    let (lambda, alpha, l) = (0.3, 0.05, 3.0);
    let got = scores(
        &pipeline("ewma_chart(value, 0.3, 3, 0.05)", "value DOUBLE"),
        &values(&xs),
    );
    let (mut m, mut v, mut chart) = (xs[0], 0.0f64, xs[0]);
    for i in 1..xs.len() {
        let x = xs[i];
        let c = lambda * x + (1.0 - lambda) * chart;
        if i >= 10 {
            let z = (c - m) / (v.sqrt() * (lambda / (2.0 - lambda)).sqrt());
            close(got[i].0, confidence(z), &format!("ewma at {i}"));
            assert_eq!(got[i].1, Some(z.abs() >= l));
        } else {
            assert_eq!(got[i].0, None);
        }
        chart = c;
        let d = x - m;
        m += alpha * d;
        v = (1.0 - alpha) * (v + alpha * d * d);
    }

    let (k, h) = (0.5, 4.0);
    let got = scores(
        &pipeline(
            "cusum(value, k => 0.5, h => 4, alpha => 0.05)",
            "value DOUBLE",
        ),
        &values(&xs),
    );
    let (mut m, mut v, mut up, mut down) = (xs[0], 0.0f64, 0.0f64, 0.0f64);
    let mut alarms = 0;
    for i in 1..xs.len() {
        let x = xs[i];
        if i >= 10 {
            let z = (x - m) / v.sqrt();
            let (u, d) = ((up + z - k).max(0.0f64), (down - z - k).max(0.0f64));
            let s = u.max(d);
            close(got[i].0, (s / h).min(1.0), &format!("cusum at {i}"));
            assert_eq!(got[i].1, Some(s >= h));
            if s >= h {
                alarms += 1;
                (up, down) = (0.0, 0.0);
            } else {
                (up, down) = (u, d);
            }
        }
        let d = x - m;
        m += alpha * d;
        v = (1.0 - alpha) * (v + alpha * d * d);
    }
    assert!(alarms >= 1, "the level shift raises the CUSUM");
}

#[test]
fn spike_and_dip_and_change_point() {
    let xs = series();
    let got = scores(
        &pipeline("spike_and_dip(value, 95, 30, 'spikes')", "value DOUBLE"),
        &values(&xs),
    );
    for (i, (s, a)) in got.iter().enumerate().skip(10) {
        let h = &xs[i.saturating_sub(30)..i];
        let above = h.iter().filter(|v| **v >= xs[i]).count();
        let score = 1.0 - (above as f64 + 1.0) / (h.len() as f64 + 1.0);
        close(*s, score, &format!("spike at {i}"));
        assert_eq!(*a, Some(score >= 0.95));
    }
    assert_eq!(got[40].1, Some(true), "the spike is above all its history");

    // The level shift without the spike before it (a spike in the older half of the
    // history widens its spread and hides the shift).
    let xs: Vec<f64> = xs[..40].iter().chain(&xs[41..]).copied().collect();
    let got = scores(
        &pipeline("change_point(value, 20)", "value DOUBLE"),
        &values(&xs),
    );
    for (i, (s, a)) in got.iter().enumerate() {
        if i < 19 {
            assert_eq!(*s, None, "change_point waits for a full history at {i}");
            continue;
        }
        let w = &xs[i - 19..=i];
        let (a1, b1) = w.split_at(10);
        let se = (sample_sd(a1).powi(2) / 10.0 + sample_sd(b1).powi(2) / 10.0).sqrt();
        let t = (mean(b1) - mean(a1)) / se;
        close(*s, confidence(t), &format!("change point at {i}"));
        assert_eq!(*a, Some(t.abs() >= 5.0));
    }
    let first = got.iter().position(|r| r.1 == Some(true));
    assert!(
        first.is_some_and(|i| (42..55).contains(&i)),
        "the level shift at 40 is a change point within half the history: {first:?}"
    );
}

#[test]
fn mahalanobis_scores_two_columns_together() {
    // Vibration and temperature rise and fall together; then one reading breaks the
    // correlation without either value leaving its own range.
    let mut rows: Vec<(f64, f64)> = (0..30)
        .map(|i| {
            let s = (i as f64 * 0.9).sin();
            (1.0 + s, 60.0 + 5.0 * s + 0.1 * ((i % 3) as f64))
        })
        .collect();
    rows.push((1.8, 56.0));
    let payloads: Vec<String> = rows
        .iter()
        .map(|(v, t)| format!("\"vibration\": {v}, \"temperature\": {t}"))
        .collect();
    let got = scores(
        &pipeline(
            "mahalanobis(vibration, temperature, history => 30)",
            "vibration DOUBLE, temperature DOUBLE",
        ),
        &payloads,
    );
    for (i, (s, a)) in got.iter().enumerate().skip(10) {
        let h = &rows[..i];
        let n = h.len() as f64;
        let (mx, my) = (
            h.iter().map(|r| r.0).sum::<f64>() / n,
            h.iter().map(|r| r.1).sum::<f64>() / n,
        );
        let sxx = h.iter().map(|r| (r.0 - mx).powi(2)).sum::<f64>() / (n - 1.0);
        let syy = h.iter().map(|r| (r.1 - my).powi(2)).sum::<f64>() / (n - 1.0);
        let sxy = h.iter().map(|r| (r.0 - mx) * (r.1 - my)).sum::<f64>() / (n - 1.0);
        let (dx, dy) = (rows[i].0 - mx, rows[i].1 - my);
        let det = sxx * syy - sxy * sxy;
        let d2 = (syy * dx * dx - 2.0 * sxy * dx * dy + sxx * dy * dy) / det;
        // Chi-square with 2 degrees of freedom: 1 - exp(-d2 / 2).
        let score = 1.0 - (-d2 / 2.0).exp();
        let got = s.unwrap();
        assert!(
            (got - score).abs() < 1e-6,
            "mahalanobis at {i}: {got} vs {score}"
        );
        assert_eq!(*a, Some(got >= 0.999));
    }
    assert_eq!(got[30].1, Some(true), "the broken correlation is flagged");
    let (v, t) = rows[30];
    assert!(
        v < 2.0 && v > 0.0 && t > 54.0 && t < 66.0,
        "each value alone is in range"
    );
}

#[test]
fn detector_state_carries_across_windows() {
    // zscore over each device's 10-second averages: the history is the device's past
    // windows, kept between them.
    let sql = "CREATE TABLE t (value DOUBLE, ts BIGINT)
           WITH (connector = 'mqtt', type = 'source', topic = 's/{device_id}', event_time = 'ts');
         CREATE TABLE out WITH (connector = 'parquet');
         INSERT INTO out
         SELECT device_id, window_end, avg(value) AS value,
                zscore(avg(value), 5) OVER (PARTITION BY device_id)['score'] AS score
         FROM TUMBLE(t, event_time, INTERVAL '10 seconds')
         GROUP BY device_id, window_end;";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.sql");
    std::fs::write(&file, sql).unwrap();
    let averages = [5.0, 6.0, 5.0, 7.0, 6.0, 5.0, 6.0, 30.0];
    let rows = runtime().block_on(async {
        let mut local = local(&file).await;
        for (w, avg) in averages.iter().enumerate() {
            // Two readings a window, averaging `avg`; each window closes when the next starts.
            for (k, v) in [avg - 1.0, avg + 1.0].iter().enumerate() {
                // Event times in epoch seconds; received as they happen.
                let ts = w as i64 * 10 + 1 + k as i64;
                let body = format!("{{\"value\": {v}, \"ts\": {ts}}}");
                local.message("s/d", body.as_bytes(), ts * 1000).await;
            }
        }
        local.finish().await;
        local.table("out").unwrap()
    });
    let mut got: Vec<(i64, f64, Option<f64>)> = Vec::new();
    for b in &rows {
        let end = b.column_by_name("window_end").unwrap();
        let end = datafusion::arrow::compute::cast(end, &DataType::Int64).unwrap();
        let end = end.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        let v = b
            .column_by_name("value")
            .unwrap()
            .as_primitive::<Float64Type>();
        let s = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            got.push((end.value(i), v.value(i), s.is_valid(i).then(|| s.value(i))));
        }
    }
    got.sort_by_key(|r| r.0);
    assert_eq!(got.len(), averages.len(), "one row a window: {got:?}");
    // Warm-up: min(history, 10) = 5 past windows.
    assert!(got[..5].iter().all(|r| r.2.is_none()), "{got:?}");
    for i in 5..averages.len() {
        let h = &averages[i - 5..i];
        let z = (averages[i] - mean(h)) / sample_sd(h);
        close(got[i].2, confidence(z), &format!("window {i}"));
    }
}

#[test]
fn peer_outlier_finds_the_sensor_that_disagrees() {
    // Five light sensors at site a, one shaded by a bird; two sensors at site b: too few
    // to tell which one is wrong.
    let sql = "CREATE TABLE t (light DOUBLE, ts BIGINT)
           WITH (connector = 'mqtt', type = 'source', topic = 'sites/{site}/{device_id}', event_time = 'ts');
         CREATE TABLE out WITH (connector = 'parquet');
         INSERT INTO out
         WITH per_sensor AS (
             SELECT site, device_id, avg(light) AS light
             FROM TUMBLE(t, event_time, INTERVAL '10 seconds')
             GROUP BY site, device_id)
         SELECT site, device_id, light, v['score'] AS score, v['is_anomaly'] AS anomaly
         FROM (SELECT *, peer_outlier(light) OVER (PARTITION BY site) AS v FROM per_sensor);";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.sql");
    std::fs::write(&file, sql).unwrap();
    let readings = [
        ("a", "s1", 400.0),
        ("a", "s2", 410.0),
        ("a", "s3", 395.0),
        ("a", "s4", 405.0),
        ("a", "s5", 40.0),
        ("b", "s6", 100.0),
        ("b", "s7", 900.0),
    ];
    let rows = runtime().block_on(async {
        let mut local = local(&file).await;
        for (i, (site, dev, light)) in readings.iter().enumerate() {
            let ts = 1 + i as i64;
            let body = format!("{{\"light\": {light}, \"ts\": {ts}}}");
            local
                .message(&format!("sites/{site}/{dev}"), body.as_bytes(), ts * 1000)
                .await;
        }
        local.finish().await;
        local.table("out").unwrap()
    });
    let lights: Vec<f64> = readings[..5].iter().map(|r| r.2).collect();
    let med = median(&lights);
    let mad = median(&lights.iter().map(|v| (v - med).abs()).collect::<Vec<_>>());
    let mut seen = 0;
    for b in &rows {
        let dev = b.column_by_name("device_id").unwrap().as_string::<i32>();
        let light = b
            .column_by_name("light")
            .unwrap()
            .as_primitive::<Float64Type>();
        let s = b
            .column_by_name("score")
            .unwrap()
            .as_primitive::<Float64Type>();
        let a = b.column_by_name("anomaly").unwrap().as_boolean();
        for i in 0..b.num_rows() {
            seen += 1;
            if ["s6", "s7"].contains(&dev.value(i)) {
                assert!(s.is_null(i) && a.is_null(i), "two peers cannot judge");
                continue;
            }
            let z = 0.6745 * (light.value(i) - med) / mad;
            close(Some(s.value(i)), confidence(z), dev.value(i));
            assert_eq!(a.value(i), dev.value(i) == "s5", "{}: z {z}", dev.value(i));
        }
    }
    assert_eq!(seen, readings.len());
}

/// The detector function on its own, in a plain DataFusion session, over many keys.
#[test]
fn memory_stays_bounded_with_many_keys_and_forgets_silent_ones() {
    let kind = Kind::from_call("zscore", vec![Param::Number(50.0)], vec![]).unwrap();
    let detect = Arc::new(ScalarUDF::new_from_impl(Detect::new("__z", kind, 1)));
    let ctx = SessionContext::new();
    ctx.register_udf(detect.as_ref().clone());
    let schema = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Float64, false),
        Field::new("t", DataType::Int64, false),
        Field::new("k", DataType::Utf8, false),
    ]));
    let footprint = || detect.inner().downcast_ref::<Detect>().unwrap().footprint();
    let keys = 5_000;
    let run = |t0: i64, rounds: usize, keys: usize| {
        let mut batches = Vec::new();
        for r in 0..rounds {
            let t = t0 + r as i64;
            let v: Float64Array = (0..keys).map(|k| ((k + r) % 17) as f64).collect();
            let tt: Int64Array = (0..keys).map(|_| t).collect();
            let k: StringArray = (0..keys).map(|k| Some(format!("device-{k:05}"))).collect();
            batches.push(
                RecordBatch::try_new(schema.clone(), vec![Arc::new(v), Arc::new(tt), Arc::new(k)])
                    .unwrap(),
            );
        }
        runtime().block_on(async {
            for b in batches {
                let table = MemTable::try_new(schema.clone(), vec![vec![b]]).unwrap();
                let _ = ctx.deregister_table("x");
                ctx.register_table("x", Arc::new(table)).unwrap();
                ctx.sql("SELECT __z(v, t, k) FROM x")
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap();
            }
        });
    };
    run(0, 60, keys);
    let (n, bytes_after_60) = footprint();
    assert_eq!(n, keys);
    run(60, 140, keys);
    let (n, bytes_after_200) = footprint();
    assert_eq!(n, keys);
    // Each key holds at most its history (50 values) however long it runs.
    assert!(
        bytes_after_200 <= bytes_after_60 + keys * 64,
        "memory grew with time: {bytes_after_60} -> {bytes_after_200}"
    );
    assert!(
        bytes_after_200 < keys * (50 * 8 * 2 + 512),
        "{bytes_after_200} bytes for {keys} keys"
    );
    // A week of event time later only the keys still reporting are kept (checked every
    // 64 calls).
    run(FORGET_AFTER_MS + 1_000, 64, 10);
    let (n, _) = footprint();
    assert_eq!(n, 10, "silent keys are forgotten");
}

#[test]
fn detector_errors_point_at_the_call() {
    for (call, expected) in [
        ("zscore(value, history => 0)", "a whole number from 2"),
        ("zscore(value, hstory => 10)", "has no parameter `hstory`"),
        (
            "spike_and_dip(value, 95, 100, 'up')",
            "'spikes', 'dips' or 'spikesanddips'",
        ),
        ("zscore(value, 1, 2, 3)", "at most 2 parameter(s)"),
        ("ewma_chart(value, lambda => 2)", "in (0, 1]"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.sql");
        std::fs::write(&file, pipeline(call, "value DOUBLE")).unwrap();
        let err = runtime()
            .block_on(fleetsql::pipeline::load(&[file]))
            .err()
            .unwrap_or_else(|| panic!("{call} compiled"))
            .to_string();
        assert!(err.contains(expected), "{call}: {err}");
        // The place: line 6 of the generated file, where the call is.
        assert!(
            err.contains("p.sql:6:"),
            "{call}: no line and column in {err}"
        );
    }
}

/// DataFusion evaluates an expression more than once over one batch (`coalesce` becomes a
/// CASE naming it twice; WHERE and the SELECT list each call it): a batch holding many
/// readings of a key must get the same scores however often it is evaluated.
#[test]
fn evaluating_a_batch_twice_gives_the_same_scores() {
    let schema = Arc::new(Schema::new(vec![
        Field::new("v", DataType::Float64, false),
        Field::new("t", DataType::Int64, false),
        Field::new("k", DataType::Utf8, false),
    ]));
    let n = 300;
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(
                (0..n)
                    .map(|i| ((i * 7) % 11) as f64 + if i == 250 { 50.0 } else { 0.0 })
                    .collect::<Float64Array>(),
            ),
            Arc::new((0..n).map(|i| i as i64 / 2).collect::<Int64Array>()),
            Arc::new(
                (0..n)
                    .map(|i| Some(if i % 3 == 0 { "a" } else { "b" }))
                    .collect::<StringArray>(),
            ),
        ],
    )
    .unwrap();
    let scores = |sql: &str| -> Vec<Option<f64>> {
        let ctx = SessionContext::new();
        let kind = Kind::from_call("zscore", vec![Param::Number(20.0)], vec![]).unwrap();
        ctx.register_udf(ScalarUDF::new_from_impl(Detect::new("__z", kind, 1)));
        let table = MemTable::try_new(schema.clone(), vec![vec![batch.clone()]]).unwrap();
        ctx.register_table("x", Arc::new(table)).unwrap();
        let out =
            runtime().block_on(async { ctx.sql(sql).await.unwrap().collect().await.unwrap() });
        out.iter()
            .flat_map(|b| {
                let s = b.column(0).as_primitive::<Float64Type>();
                (0..b.num_rows())
                    .map(|i| s.is_valid(i).then(|| s.value(i)))
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let once = scores("SELECT __z(v, t, k)['score'] FROM x");
    assert_eq!(once.len(), n);
    assert!(once.iter().filter(|s| s.is_some()).count() > 200);
    let twice = scores("SELECT coalesce(__z(v, t, k)['score'], -1.0) FROM x");
    let expected: Vec<Option<f64>> = once.iter().map(|s| Some(s.unwrap_or(-1.0))).collect();
    assert_eq!(twice, expected, "coalesce evaluates the detector twice");
    // WHERE learns the batch, then the SELECT list scores the rows that passed.
    let filtered = scores("SELECT __z(v, t, k)['score'] FROM x WHERE __z(v, t, k)['score'] > 0.5");
    let expected: Vec<Option<f64>> = once
        .iter()
        .filter(|s| s.is_some_and(|s| s > 0.5))
        .copied()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(
        filtered, expected,
        "WHERE and the SELECT list see the same scores"
    );
}
