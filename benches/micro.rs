//! Criterion micro-benchmarks of the engine's hot path, one stage at a time:
//!
//!     cargo bench --bench micro                    # every group, about two minutes
//!     cargo bench --bench micro -- query           # one group (a name filter)
//!
//! Groups: `decode` (JSON to Arrow), `actor_hop` (shard router -> device actor -> shard
//! buffer -> engine channel), `window_close` (TUMBLE panes), `query` (the compiled window
//! query) and `parquet_write` (the Parquet sink). Throughput is in readings (rows), except
//! `actor_hop/flush_only` (the flush's round trip to every device actor), in devices. The
//! bodies, and what each one times, are in fleetsql::bench::micro; the test suite runs
//! them in smoke mode.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main,
};
use fleetsql::bench::micro::{self, Body, Payload};
use tokio::runtime::Runtime;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Times `body`: each iteration's input is made outside the timing, and its output is
/// dropped outside it.
fn bench<B: Body>(
    g: &mut BenchmarkGroup<'_, WallTime>,
    rt: &Runtime,
    id: BenchmarkId,
    rows: usize,
    body: &mut B,
) {
    g.throughput(Throughput::Elements(rows as u64));
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let input = body.input();
                let start = Instant::now();
                let out = rt
                    .block_on(body.run(black_box(input)))
                    .expect("benchmark iteration");
                total += start.elapsed();
                drop(black_box(out));
            }
            total
        })
    });
}

fn decode(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("decode");
    for payload in [Payload::Light, Payload::Climate] {
        for n in [1_000, 10_000] {
            let mut body = rt.block_on(micro::Decode::new(payload, n)).expect("setup");
            let id = BenchmarkId::new(micro::source(payload), n);
            bench(&mut g, &rt, id, n, &mut body);
        }
    }
    g.finish();
}

/// The shards' flush alone, with nothing to flush: the `Sync` round trip to every device
/// actor that `flush_shards` makes, part of each `actor_hop` iteration.
struct FlushOnly<'a>(&'a mut micro::ActorHop);

impl Body for FlushOnly<'_> {
    type Input = <micro::ActorHop as Body>::Input;
    type Output = usize;

    fn input(&self) -> Self::Input {
        Vec::new()
    }

    async fn run(&mut self, input: Self::Input) -> anyhow::Result<usize> {
        self.0.run(input).await
    }
}

fn actor_hop(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("actor_hop");
    for n in [10_000, 100_000] {
        let devices = micro::devices_for(n);
        let mut body = rt.block_on(micro::ActorHop::new(n)).expect("setup");
        let id = BenchmarkId::new(format!("{devices}_devices"), n);
        bench(&mut g, &rt, id, n, &mut body);
        // Throughput in devices here.
        let id = BenchmarkId::new("flush_only", format!("{devices}_devices"));
        bench(&mut g, &rt, id, devices, &mut FlushOnly(&mut body));
    }
    g.finish();
}

fn window_close(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("window_close");
    for n in [10_000, 100_000] {
        let mut body = rt.block_on(micro::WindowClose::new(n)).expect("setup");
        bench(&mut g, &rt, BenchmarkId::from_parameter(n), n, &mut body);
    }
    g.finish();
}

fn query(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("query");
    for n in [1_000, 10_000, 100_000] {
        let mut body = rt.block_on(micro::Query::new(n)).expect("setup");
        let id = BenchmarkId::new(format!("{}_devices", micro::devices_for(n)), n);
        bench(&mut g, &rt, id, n, &mut body);
    }
    g.finish();
}

fn parquet_write(c: &mut Criterion) {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut g = c.benchmark_group("parquet_write");
    for n in [10_000, 100_000] {
        let mut body = rt
            .block_on(micro::ParquetWrite::new(n, dir.path()))
            .expect("setup");
        bench(&mut g, &rt, BenchmarkId::from_parameter(n), n, &mut body);
    }
    g.finish();
}

/// Short runs: the whole suite in about two minutes on a two-core box. Command-line
/// options (`--measurement-time`, `--sample-size`, ...) override these.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
}

criterion_group! {
    name = micro;
    config = config();
    targets = decode, actor_hop, window_close, query, parquet_write
}
criterion_main!(micro);
