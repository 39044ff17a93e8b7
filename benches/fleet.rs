//! 100,000 devices each sending one reading a second through the engine in process:
//! memory per idle device, window close to results, and every row stored.
//!
//!     cargo bench --bench fleet                      # 100k devices, 35 s
//!     cargo bench --bench fleet -- --devices 20000 --seconds 12
//!
//! See fleetsql::bench::fleet for what is measured and how; docs/benchmarks.md quotes it.

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    /// How long the fleet sends.
    #[arg(long, default_value_t = 35)]
    seconds: u64,
    /// TUMBLE window, seconds.
    #[arg(long, default_value_t = 10)]
    window: u64,
    /// Device actors retire after this many idle seconds.
    #[arg(long, default_value_t = 15)]
    idle_timeout: u64,
    /// Shard routers (threads); `0` for one on the main thread. Default: as `fleetsql run`.
    #[arg(long)]
    shards: Option<usize>,
    /// `cargo bench` passes this; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let opts = fleetsql::bench::fleet::Options {
        devices: args.devices,
        seconds: args.seconds,
        window: Duration::from_secs(args.window),
        idle_timeout: Duration::from_secs(args.idle_timeout),
        shards: args.shards.unwrap_or_else(fleetsql::device::default_shards),
        max_backlog: 64 << 20,
        data_dir: dir.path().to_path_buf(),
        verbose: true,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = fleetsql::device::block_on(opts.shards, rt, fleetsql::bench::fleet::run(opts))?;
    println!("{}", report.markdown());
    Ok(())
}
